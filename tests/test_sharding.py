"""Sharded state everywhere, FSDP, gradient accumulation and bfloat16, on tiny random models.

For every update step kind (fine-tuning, distillation with a KD spec and with a hidden/attention
spec, KDABert's alternating step, NewsBERT's joint step, the BiLSTM step): two steps on the
8-device mesh with FSDP and micro-batches give the parameters of the plain 1-device step; the
FSDP state is really split and stays split; donation works; no step retraces. FSDP alone and
accumulation alone too (on the BiLSTM step, the cheapest to compile). Then: the shape rule, the
strided micro-batch split and the accumulated gradient against a hand-computed one, resume of an
FSDP + accumulation run through `train.train_loop`, refusals naming `train.grad_accum_steps`,
and bfloat16 compute with float32 parameters, optimizer state and losses.

Compiling the steps dominates the time: models have 1-2 layers, and every jitted step is built
once per (kind, devices, fsdp, micro-batches) and shared by the tests (`_step`).
"""

import dataclasses
import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import REPO_ROOT, random_token_batch
from kdjax import config as config_lib, data, distill, metrics
from kdjax import methods
from kdjax.engine import run as engine_run
from kdjax.methods import bilstm, kdabert as adversarial, newsbert
from kdjax import optim, recipes, sharding, train
from kdjax.models.bert import BertOutput, BertClassifier, BertConfig
from kdjax.models.bilstm import BiLSTMClassifier, BiLSTMConfig

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TEACHER = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=32, max_position_embeddings=32, initializer_range=0.5,
                     **NO_DROPOUT)
FINE_TUNE = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=32, **NO_DROPOUT)
SMALL_BILSTM = BiLSTMConfig(vocab_size=64, embedding_dim=8, hidden_size=6, mlp_size=5,
                            num_labels=3, dropout=0.0, skip_token_ids=(0, 1, 2))
PAIRS = ((1, 2),)  # A 1-layer student under the uniform map of a 2-layer teacher.
BATCH = 32  # A multiple of 4 micro-batches x 8 devices.
# SGD with momentum: its state mirrors the parameters (so FSDP splits it too), and unlike Adam
# it does not turn float noise in exactly-zero gradients into +-lr steps between layouts.
# Static parts of the states: one object each, so equal states reuse compiled steps.
TX = optax.sgd(0.5, momentum=0.9)
TX_DISCRIMINATOR = optax.sgd(0.1, momentum=0.9)


@pytest.fixture
def small_fsdp_threshold(monkeypatch):
    """Tiny models have no array of 2**14 elements: split everything from 64 elements up."""
    monkeypatch.setattr(sharding, "FSDP_MIN_SIZE", 64)


def _batch(seed: int) -> dict:
    """Every row labelled (so each loss term's denominator is the real rows, and micro-batch
    shares are exact); the last 2 rows are padding, so micro-batches get unequal shares."""
    batch = random_token_batch(seed, BATCH, 12)
    batch["labels"] = np.abs(batch["labels"]).astype(np.int32)
    batch["example_index"] = np.arange(BATCH, dtype=np.int32)  # As data.Batcher's batches.
    return batch


def _host(tree):
    return jax.device_get(tree)


# ------------------------------------------------------------------------------------------------
# The step kinds


@dataclasses.dataclass
class StepKind:
    """How to build one step kind's fresh state and its jitted loop step on a mesh."""

    make_state: callable  # () -> host state, the same every call
    make_step: callable  # (mesh, fsdp, k) -> (state, sharded batch, key) -> (state, metrics)
    batch: callable = _batch
    params: callable = lambda state: state.params  # What the comparison looks at.


def _teachers(mesh, fsdp):
    teacher = BertClassifier(TEACHER, 3, rngs=nnx.Rngs(0))
    return sharding.place_state(distill.Teachers.create([teacher]), mesh, fsdp=fsdp)


def _distill_student():
    student = BertClassifier(distill.student_config(TEACHER, layers=1, hidden=8), 3,
                             rngs=nnx.Rngs(1))
    return distill.DistillStudent(student, TEACHER.hidden_size, rngs=nnx.Rngs(2))


def _distill_kind(spec: distill.LossSpec) -> StepKind:
    def make_step(mesh, fsdp, k):
        jitted = distill.make_distill_step(
            mesh, spec, chex.assert_max_traces(distill.distill_step, n=1), fsdp=fsdp,
            grad_accum_steps=k)
        return functools.partial(engine_run._with_teachers, jitted, _teachers(mesh, fsdp))

    return StepKind(lambda: train.TrainState.create(_distill_student(), TX), make_step)


KD_SPEC = distill.loss_spec(ce=0.5, soft=0.5, temperature=2.0)
ADVERSARIAL_SPEC = distill.loss_spec(ce=0.5, soft=0.5, temperature=2.0, adversarial=1.0,
                                    adversarial_warmup=0.0, adversarial_ramp=0.0,
                                    layer_pairs=PAIRS, total_steps=10)


def _adversarial_state():
    discriminators = adversarial.Discriminators(len(PAIRS), TEACHER.hidden_size, 32,
                                                spectral_norm=True, rngs=nnx.Rngs(3))
    return adversarial.AdversarialState(
        train.TrainState.create(_distill_student(), TX),
        adversarial.DiscriminatorState.create(discriminators, TX_DISCRIMINATOR))


def _adversarial_step(mesh, fsdp, k):
    return adversarial.AlternatingStep(
        mesh, ADVERSARIAL_SPEC, adversarial.GameSpec(loss="bce"), _teachers(mesh, fsdp),
        inputs_fn=chex.assert_max_traces(adversarial.game_inputs, n=1),
        discriminator_fn=chex.assert_max_traces(adversarial.discriminator_step, n=1),
        student_fn=chex.assert_max_traces(adversarial.student_step, n=1),
        fsdp=fsdp, grad_accum_steps=k)


def _newsbert_pair():
    arch = TEACHER.replace(num_hidden_layers=2, initializer_range=0.2)
    teacher = BertClassifier(arch, 3, rngs=nnx.Rngs(0))
    student = BertClassifier(distill.student_config(arch, layers=1), 3, rngs=nnx.Rngs(1))
    return newsbert.NewsBertPair(teacher, student)


def _newsbert_step(mesh, fsdp, k):
    section = config_lib.load_config(str(REPO_ROOT / "configs" / "newsbert.py")).newsbert
    spec = newsbert.NewsBertSpec.from_config(section, student_layers=1, teacher_layers=2)
    return newsbert.make_newsbert_step(mesh, spec,
                                       chex.assert_max_traces(newsbert.newsbert_step, n=1),
                                       fsdp=fsdp, grad_accum_steps=k)


def _bilstm_batch(seed):
    batch = _batch(seed)
    batch["teacher_logits"] = np.random.default_rng(seed).normal(
        size=(BATCH, 1, 3)).astype(np.float32)
    return batch


def _bilstm_step(mesh, fsdp, k):
    spec = distill.loss_spec(ce=0.5, logit_mse=0.5, hard_labels_from_teacher=True)
    step = functools.partial(chex.assert_max_traces(bilstm.bilstm_step, n=1), spec=spec)
    return train.make_train_step(mesh, step, fsdp=fsdp, grad_accum_steps=k)


KINDS = {
    "fine_tune": StepKind(
        lambda: train.TrainState.create(BertClassifier(FINE_TUNE, 3, rngs=nnx.Rngs(0)), TX),
        lambda mesh, fsdp, k: train.make_train_step(
            mesh, chex.assert_max_traces(train.train_step, n=1), fsdp=fsdp,
            grad_accum_steps=k)),
    "distill_kd": _distill_kind(KD_SPEC),
    "distill_hidden_attention": _distill_kind(distill.loss_spec(
        embedding=1.0, hidden=1.0, attention=1.0, layer_pairs=PAIRS)),
    "adversarial": StepKind(_adversarial_state, _adversarial_step,
                            params=lambda state: (state.student.params,
                                                  state.discriminator.params)),
    "newsbert": StepKind(lambda: train.TrainState.create(_newsbert_pair(), TX), _newsbert_step),
    "bilstm": StepKind(
        lambda: train.TrainState.create(BiLSTMClassifier(SMALL_BILSTM, rngs=nnx.Rngs(1)), TX),
        _bilstm_step, batch=_bilstm_batch),
}
# Micro-batches per kind in the sharded run (32 rows: 2 or 4 micro-batches of 16 or 8).
ACCUMULATION = {"fine_tune": 2, "distill_kd": 4, "distill_hidden_attention": 2,
                "adversarial": 2, "newsbert": 2, "bilstm": 4}
_STEPS = {}


def _step(name: str, devices: int, fsdp: bool, k: int):
    """The kind's jitted step for this layout, built once per module (each traces once)."""
    if (name, devices, fsdp, k) not in _STEPS:
        chex.clear_trace_counter()  # Only this build's jitted functions count from here.
        _STEPS[name, devices, fsdp, k] = KINDS[name].make_step(sharding.make_mesh(devices),
                                                               fsdp, k)
    return _STEPS[name, devices, fsdp, k]


def _run(name: str, devices: int, *, fsdp: bool, k: int = 1, steps: int = 2):
    """`steps` updates from the kind's fresh state; returns (initial, final state, metrics)."""
    kind = KINDS[name]
    mesh = sharding.make_mesh(devices)
    step = _step(name, devices, fsdp, k)
    state = sharding.place_state(kind.make_state(), mesh, fsdp=fsdp)
    initial = _host(kind.params(state))
    key = sharding.replicate(jax.random.key(0), mesh)
    for i in range(steps):
        donated = jax.tree.leaves(state.arrays())
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. "donated buffers were not usable"
            state, step_metrics = step(state, sharding.shard_batch(kind.batch(i), mesh), key)
        if i:  # (The first state's host copy, `initial`, keeps its buffers from donation.)
            assert all(leaf.is_deleted() for leaf in donated)  # Donation still works.
    return initial, state, _host(step_metrics)


def _assert_laid_out_by_the_rule(state, *, fsdp: bool):
    """Every array of the state has the shape rule's sharding over 8 devices."""
    split = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.arrays()):
        expected = sharding.leaf_partition(leaf.shape, 8, fsdp=fsdp)
        assert leaf.sharding.is_equivalent_to(
            jax.sharding.NamedSharding(leaf.sharding.mesh, expected), leaf.ndim), (
                jax.tree_util.keystr(path), leaf.sharding.spec, expected)
        assert len(leaf.sharding.device_set) == 8
        if sharding.DATA_AXIS in expected:
            split += 1
            shard_shape = leaf.addressable_shards[0].data.shape
            assert np.prod(shard_shape) * 8 == leaf.size  # 1/8 of the array per device.
    assert (split > 0) == fsdp


def _assert_same_run(name, runs):
    """Every run's parameters and metric sums equal the first's (a plain 1-device run)."""
    (initial, reference, reference_metrics), *others = runs
    params = KINDS[name].params
    want = _host(params(reference))
    moved = optax.tree.norm(jax.tree.map(jnp.subtract, want, initial))
    assert float(moved) > 1e-3  # The comparison is about real updates.
    for _, state, step_metrics in others:
        chex.assert_trees_all_close(_host(params(state)), want, rtol=1e-4, atol=1e-6)
        for key in ("loss_sum", "count", "correct", "grad_norm"):
            np.testing.assert_allclose(step_metrics[key], reference_metrics[key], rtol=1e-4,
                                       err_msg=key)


@pytest.mark.parametrize("name", list(KINDS))
def test_fsdp_with_micro_batches_on_8_devices_matches_one_device(name, small_fsdp_threshold):
    runs = [_run(name, 1, fsdp=False), _run(name, 8, fsdp=True, k=ACCUMULATION[name])]
    _assert_same_run(name, runs)
    _assert_laid_out_by_the_rule(runs[1][1], fsdp=True)  # Still split after the steps.


def test_fsdp_alone_and_micro_batches_alone_match_too(small_fsdp_threshold):
    runs = [_run("bilstm", 1, fsdp=False), _run("bilstm", 8, fsdp=True),
            _run("bilstm", 8, fsdp=False, k=2)]
    _assert_same_run("bilstm", runs)
    _assert_laid_out_by_the_rule(runs[1][1], fsdp=True)
    _assert_laid_out_by_the_rule(runs[2][1], fsdp=False)


# ------------------------------------------------------------------------------------------------
# The shape rule


def test_shape_rule_splits_large_arrays_along_their_largest_divisible_dimension():
    rule = functools.partial(sharding.leaf_partition, num_shards=8)
    assert sharding.FSDP_MIN_SIZE == 2**14
    assert rule((30522, 384), fsdp=True) == P(None, "data")  # 30522 is not divisible by 8.
    assert rule((384, 1536), fsdp=True) == P(None, "data")
    assert rule((1536, 384), fsdp=True) == P("data", None)
    assert rule((384, 384), fsdp=True) == P("data", None)  # A tie: the first dimension.
    assert rule((384, 384), fsdp=False) == P()
    assert rule((384,), fsdp=True) == P()  # Below the threshold.
    assert rule((), fsdp=True) == P()
    assert rule((16381, 3), fsdp=True) == P()  # No dimension divisible by 8.
    assert sharding.leaf_partition((384, 384), 1, fsdp=True) == P()


def test_optimizer_moments_get_their_parameters_layout():
    config = BertConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=256, max_position_embeddings=32)
    state = jax.eval_shape(lambda: train.TrainState.create(
        BertClassifier(config, 2, rngs=nnx.Rngs(0)),
        optim.make_optimizer(recipes.optim_config(), 10)))
    shardings = sharding.state_shardings(state, sharding.make_mesh(8), fsdp=True)
    params = jax.tree.leaves(shardings.params)
    assert any(s.spec != P() for s in params)
    adam = [x for x in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
            if hasattr(x, "mu")][0]
    for moment in (adam.mu, adam.nu):
        specs = jax.tree.leaves(sharding.state_shardings(moment, sharding.make_mesh(8),
                                                         fsdp=True))
        assert [s.spec for s in specs] == [s.spec for s in params]
    assert len(jax.tree.leaves(shardings.opt_state)) == len(jax.tree.leaves(state.opt_state))


# ------------------------------------------------------------------------------------------------
# Gradient accumulation


def test_micro_batches_are_strided_so_each_spans_every_device():
    batch = {"x": np.arange(32 * 2).reshape(32, 2), "weights": np.ones(32)}
    micro = train.split_micro_batches(batch, 4)
    assert micro["x"].shape == (4, 8, 2)
    np.testing.assert_array_equal(micro["x"][1, :, 0], np.arange(1, 32, 4) * 2)  # i * k + j
    # Contiguous device blocks of 4 rows: micro-batch j takes row 4d + j from every device d.
    owners = np.arange(32) // 4
    np.testing.assert_array_equal(owners[np.arange(32).reshape(8, 4).T[2]], np.arange(8))


def test_accumulated_gradient_equals_the_hand_computed_full_batch_gradient():
    """Least squares with weighted rows (two padding rows, so micro-batches hold unequal
    shares), against the closed-form gradient in numpy; micro-batches stay split over 8."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 3)), rng.normal(size=32)
    weights = np.ones(32)
    weights[[5, 9]] = 0.0
    params = np.array([0.3, -0.2, 0.5])
    mesh = sharding.make_mesh(8)
    seen_shardings = []

    def micro_step(params, batch, key):
        del key
        jax.debug.inspect_array_sharding(batch["x"], callback=seen_shardings.append)
        def loss(p):
            per_example = (batch["x"] @ p - batch["y"]) ** 2
            return jnp.sum(per_example * batch["weights"]) / jnp.maximum(
                jnp.sum(batch["weights"]), 1)
        return jax.grad(loss)(params), {"count": jnp.sum(batch["weights"])}

    def step(params, batch, key):
        return train.accumulate_gradients(micro_step, params, batch, 4, key)

    jitted = sharding.jit_step(step, mesh, (sharding.REPLICATED, sharding.BATCH,
                                            sharding.REPLICATED), returns_state=False,
                               donate_state=False)
    batch = {"x": x.astype(np.float32), "y": y.astype(np.float32),
             "weights": weights.astype(np.float32)}
    grads, sums = jitted(jnp.asarray(params, jnp.float32), sharding.shard_batch(batch, mesh),
                         jax.random.key(0))
    expected = 2 * (weights * (x @ params - y)) @ x / weights.sum()
    np.testing.assert_allclose(np.asarray(grads), expected, rtol=1e-5)
    assert float(sums["count"]) == 30
    assert seen_shardings and all(len(s.device_set) == 8 and s.spec[0] == "data"
                                  for s in seen_shardings)


def test_grad_accum_steps_and_fsdp_are_validated_naming_the_key(tmp_path):
    config = recipes.finetune_config()
    config.data.batch_size = 24
    config.train.grad_accum_steps = 2  # 24 is not a multiple of 2 x 8 devices.
    with pytest.raises(ValueError, match=r"train\.grad_accum_steps=2.*multiple of.*16"):
        train.start_run(config, tmp_path / "run")
    config.data.batch_size = 32
    train.start_run(config, tmp_path / "run")  # 2 micro-batches of 16: 2 rows per device.
    config.train.grad_accum_steps = 0
    with pytest.raises(config_lib.ConfigError, match="'train.grad_accum_steps' must be"):
        methods.validate(config)
    distill_config = recipes.distill_config()
    distill_config.lock()
    with pytest.raises(config_lib.ConfigError, match="'train.fsdp' expects bool"):
        config_lib.apply_overrides(distill_config, ["train.fsdp=yes"])
    config_lib.apply_overrides(distill_config, ["train.fsdp=True", "train.grad_accum_steps=4"])
    assert distill_config.train.fsdp is True and distill_config.train.grad_accum_steps == 4
    with pytest.raises(ValueError, match="train.grad_accum_steps=3 must divide"):
        jax.eval_shape(lambda batch: train.accumulate_gradients(
            lambda p, b, k: (p, {}), jnp.zeros(2), batch, 3, jax.random.key(0)),
            {"weights": jnp.ones(16)})


# ------------------------------------------------------------------------------------------------
# Resume under FSDP


def test_fsdp_run_with_accumulation_resumes_through_the_loop(tmp_path, small_fsdp_threshold):
    """2 loop steps with FSDP and 2 micro-batches, stopped after 1 and resumed from the Orbax
    checkpoint (restored straight into the split layout), equal 2 plain 1-device steps."""
    kind = KINDS["fine_tune"]
    rng = np.random.default_rng(1)
    lengths = rng.integers(4, 13, 64).astype(np.int32)
    ids = (rng.integers(4, 64, (64, 12)) * (np.arange(12)[None] < lengths[:, None]))
    split = data.EncodedSplit(ids.astype(np.int32), np.zeros((64, 12), np.int32), lengths,
                              rng.integers(0, 3, 64).astype(np.int32))
    batcher = data.Batcher(split, BATCH, buckets=(12,), shuffle=True, seed=0)
    mesh = sharding.make_mesh(8)
    step = _step("fine_tune", 8, True, ACCUMULATION["fine_tune"])
    key = sharding.replicate(jax.random.key(0), mesh)
    log = metrics.MetricLog(tmp_path)
    train_config = ml_collections.ConfigDict(dict(
        seed=0, log_every=1, checkpoint_every=1, keep_checkpoints=2, stop_after_steps=1))
    for invocation in range(2):
        state = sharding.place_state(kind.make_state(), mesh, fsdp=True)
        run = train.train_loop(state, step, batcher, total_steps=2, train_config=train_config,
                               checkpoint_dir=tmp_path / "ckpt", log=log, mesh=mesh,
                               dropout_key=key, progress=False)
        assert run.steps == invocation + 1
    _assert_laid_out_by_the_rule(run.state, fsdp=True)

    one = sharding.make_mesh(1)
    reference = sharding.place_state(kind.make_state(), one, fsdp=False)
    plain = _step("fine_tune", 1, False, 1)
    one_key = sharding.replicate(jax.random.key(0), one)
    for batch in list(batcher.epoch(0))[:2]:
        reference, _ = plain(reference, sharding.shard_batch(batch, one), one_key)
    chex.assert_trees_all_close(_host(run.state.params), _host(reference.params), rtol=1e-4,
                                atol=1e-6)


# ------------------------------------------------------------------------------------------------
# bfloat16


def test_bfloat16_distill_step_keeps_float32_parameters_state_and_loss():
    """The KD step with bfloat16 teacher and student computation, from the same float32
    parameters as the float32 run of the first test."""
    _, _, float32_metrics = _run("distill_kd", 1, fsdp=False)
    mesh = sharding.make_mesh(1)
    arch = TEACHER.replace(dtype="bfloat16")
    teachers = sharding.place_state(distill.Teachers.create(
        [BertClassifier(arch, 3, rngs=nnx.Rngs(0))]), mesh, fsdp=False)
    student = BertClassifier(distill.student_config(arch, layers=1, hidden=8, dtype="bfloat16"),
                             3, rngs=nnx.Rngs(1))
    state = sharding.place_state(train.TrainState.create(
        distill.DistillStudent(student, TEACHER.hidden_size, rngs=nnx.Rngs(2)), TX), mesh,
        fsdp=False)
    step = distill.make_distill_step(mesh, KD_SPEC)
    key = sharding.replicate(jax.random.key(0), mesh)
    for i in range(2):
        state, step_metrics = step(state, teachers, sharding.shard_batch(_batch(i), mesh), key)
    floats = [x for x in jax.tree.leaves((state.params, state.opt_state))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert len(floats) > len(jax.tree.leaves(state.params))  # The momentum is there too.
    assert all(x.dtype == jnp.float32 for x in floats)
    for name in ("loss_sum", "ce_sum", "soft_sum", "grad_norm"):
        assert step_metrics[name].dtype == jnp.float32, name
    loss = {"float32": float32_metrics["loss_sum"] / float32_metrics["count"],
            "bfloat16": float(step_metrics["loss_sum"] / step_metrics["count"])}
    assert loss["bfloat16"] == pytest.approx(loss["float32"], rel=5e-2)
    assert loss["bfloat16"] != loss["float32"]  # bfloat16 really computed something else.


def test_combined_loss_of_bfloat16_outputs_is_computed_in_float32():
    """bfloat16 student/teacher outputs: the loss equals float64 numpy on the same (upcast)
    values to float32 precision, far closer than bfloat16 arithmetic (~3 digits) could."""
    rng = np.random.default_rng(0)
    bf16 = lambda shape: jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
    s_logits, t_logits = bf16((6, 3)), bf16((1, 6, 3))
    s_hidden, t_hidden = bf16((6, 5, 4)), bf16((6, 5, 4))
    mask = np.ones((6, 5), np.int32)
    mask[:, 3:] = 0
    batch = {"labels": jnp.array([0, 2, 1, 1, 0, 2]), "attention_mask": jnp.asarray(mask),
             "weights": jnp.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])}
    out = BertOutput(last_hidden_state=s_hidden, logits=s_logits,
                             hidden_states=(s_hidden, s_hidden))
    spec = distill.loss_spec(ce=0.3, soft=0.7, hidden=2.0, temperature=2.0,
                            layer_pairs=((1, 1),))
    loss, sums = distill.combined_loss(spec, out, {"logits": t_logits,
                                                   "hidden_states": (t_hidden, t_hidden)},
                                       batch, jnp.asarray(0))
    assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in sums.values())

    f64 = lambda a: np.asarray(a, np.float64)
    log_softmax = lambda z: z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(
        -1, keepdims=True)) - z.max(-1, keepdims=True)
    s, t, w = f64(s_logits), f64(t_logits)[0], np.array([1, 1, 1, 1, 1, 0.0])
    ce = -log_softmax(s)[np.arange(6), [0, 2, 1, 1, 0, 2]]
    p = np.exp(log_softmax(t / 2))
    kl = 4 * (p * (np.log(p) - log_softmax(s / 2))).sum(-1)
    per_token = ((f64(s_hidden) - f64(t_hidden)) ** 2).mean(-1)
    hidden = (per_token * mask).sum(-1) / mask.sum(-1)
    expected = sum(weight * (v * w).sum() / w.sum()
                   for weight, v in ((0.3, ce), (0.7, kl), (2.0, hidden)))
    assert float(loss) == pytest.approx(expected, rel=2e-6)
