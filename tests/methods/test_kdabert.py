"""KDABert on tiny random models: the adversarial losses against hand/numpy/torch values, spectral
norm, the features and the lambda_adv schedule; the alternating jitted steps (one trace each,
disjoint gradients, frozen teacher, each side learns); resume; the health warnings; config
refusals; and an end-to-end `distill.distill` run with configs/kdabert.py."""

import json

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import REPO_ROOT, write_toy_task, write_toy_teacher
from kdjax import config as config_lib, data, distill, losses, metrics, optim
from kdjax import methods
from kdjax.methods import kdabert as adversarial
from kdjax import recipes, sharding, train
from kdjax.models.bert import BertClassifier, BertConfig

TEACHER = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=32, max_position_embeddings=32, initializer_range=0.5)
PAIRS = ((1, 2), (2, 4))  # A 2-layer student under the uniform map of a 4-layer teacher.
SPEC = distill.loss_spec(ce=0.5, soft=0.5, temperature=2.0, adversarial=1.0,
                        adversarial_warmup=0.0, adversarial_ramp=0.0, layer_pairs=PAIRS,
                        total_steps=40)
GAME = adversarial.GameSpec(loss="bce", label_smoothing=0.1, discriminator_steps=1)
BATCH, LENGTH = 16, 12


def _split(n=48, seed=0) -> data.EncodedSplit:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, LENGTH + 1, n).astype(np.int32)
    ids = rng.integers(4, 64, (n, LENGTH))
    ids[:, 0] = 1  # [CLS]
    ids[np.arange(n), lengths - 1] = 2  # [SEP]
    ids = ids * (np.arange(LENGTH)[None] < lengths[:, None])
    labels = rng.integers(0, 3, n)
    labels[:6] = -1  # Unlabelled rows, as in a transfer set.
    return data.EncodedSplit(ids.astype(np.int32), np.zeros((n, LENGTH), np.int32), lengths,
                             labels.astype(np.int32))


def _batcher() -> data.Batcher:
    return data.Batcher(_split(), BATCH, buckets=(LENGTH,), shuffle=True, seed=0)


def _batches(mesh, count):
    return [sharding.shard_batch(b, mesh) for b in list(_batcher().epoch(0))[:count]]


def _teacher():
    return BertClassifier(TEACHER, 3, rngs=nnx.Rngs(0))


def _optimizers():
    """The student's and the discriminators' optimizers, built once: they are static parts of
    the states, so fresh states with the same optimizer objects reuse the compiled steps."""
    if not _OPTIMIZERS:
        optim_config = recipes.optim_config(5e-3)
        optim_config.warmup_ratio = 0.0
        section = adversarial.discriminator_config("bce")
        _OPTIMIZERS.extend([optim.make_optimizer(optim_config, 40),
                            adversarial.make_discriminator_optimizer(section)])
    return _OPTIMIZERS


_OPTIMIZERS = []


def _fresh_state(mesh) -> adversarial.AdversarialState:
    """A narrow 2-layer student (width 8, projection to 16) and two spectrally normalised
    discriminators, always initialised the same way."""
    student = BertClassifier(distill.student_config(TEACHER, layers=2, hidden=8), 3,
                             rngs=nnx.Rngs(1))
    module = distill.DistillStudent(student, TEACHER.hidden_size, rngs=nnx.Rngs(2))
    student_tx, discriminator_tx = _optimizers()
    discriminators = adversarial.Discriminators(len(PAIRS), TEACHER.hidden_size, 32,
                                                spectral_norm=True, rngs=nnx.Rngs(3))
    # With the adaptive gate's state (its factor is 1 under SPEC, which turns it off, but its
    # running means are updated and checkpointed like the rest).
    state = adversarial.AdversarialState(
        train.TrainState.create(module, student_tx),
        adversarial.DiscriminatorState.create(discriminators, discriminator_tx),
        gate=adversarial.new_gate())
    return sharding.replicate(state, mesh)


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(8)


@pytest.fixture(scope="module")
def teacher_and_params():
    teacher = _teacher()
    return teacher, jax.device_get(nnx.state(teacher, nnx.Param))


@pytest.fixture(scope="module")
def alternating(mesh, teacher_and_params):
    """The one AlternatingStep whose three jitted functions every step test shares: each may
    trace once in the whole module."""
    chex.clear_trace_counter()
    teachers = sharding.replicate(distill.Teachers.create([teacher_and_params[0]]), mesh)
    return adversarial.AlternatingStep(
        mesh, SPEC, GAME, teachers,
        inputs_fn=chex.assert_max_traces(adversarial.game_inputs, n=1),
        discriminator_fn=chex.assert_max_traces(adversarial.discriminator_step, n=1),
        student_fn=chex.assert_max_traces(adversarial.student_step, n=1))


def _host(tree):
    return jax.device_get(tree)


def _assert_trees_differ(a, b):
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ------------------------------------------------------------------------------------------------
# Losses, spectral norm, features, schedule


def test_bce_discriminator_loss_with_one_sided_label_smoothing_by_hand_and_torch():
    import torch

    # r = f = 0: -(0.9 log 1/2 + 0.1 log 1/2) - log 1/2 = 2 log 2.
    got = losses.bce_discriminator_loss(jnp.zeros(1), jnp.zeros(1), label_smoothing=0.1)
    assert float(got[0]) == pytest.approx(2 * np.log(2), rel=1e-6)
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=7) * 3, rng.normal(size=7) * 3
    got = jax.jit(losses.bce_discriminator_loss)(real, fake)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    want = (bce(torch.tensor(real), torch.full((7,), 0.9, dtype=torch.float64), reduction="none")
            + bce(torch.tensor(fake), torch.zeros(7, dtype=torch.float64), reduction="none"))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5)
    # Without smoothing it is the textbook -log s(r) - log(1 - s(f)).
    sigmoid = lambda x: 1 / (1 + np.exp(-x))
    np.testing.assert_allclose(
        losses.bce_discriminator_loss(real, fake, label_smoothing=0.0),
        -np.log(sigmoid(real)) - np.log(1 - sigmoid(fake)), rtol=1e-5)
    np.testing.assert_allclose(losses.bce_generator_loss(fake), -np.log(sigmoid(fake)),
                               rtol=1e-5)


def test_hinge_and_wasserstein_losses_by_hand():
    real, fake = jnp.array([2.0, 0.5, -1.0]), jnp.array([-2.0, 0.0, 0.5])
    np.testing.assert_allclose(losses.hinge_discriminator_loss(real, fake), [0.0, 1.5, 3.5])
    np.testing.assert_allclose(losses.hinge_generator_loss(fake), [2.0, 0.0, -0.5])
    np.testing.assert_allclose(losses.wasserstein_critic_loss(real, fake), [-4.0, -0.5, 1.5])
    np.testing.assert_allclose(losses.wasserstein_generator_loss(fake), [2.0, 0.0, -0.5])


def test_gradient_penalty_of_a_linear_critic_is_closed_form():
    # D(x) = x . w + b has gradient w everywhere: penalty (||w|| - 1)^2 whatever the mix.
    w = jnp.array([0.3, -1.2, 2.0, 0.5])
    critic = lambda x: x @ w + 0.7
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    got = jax.jit(losses.gradient_penalty, static_argnums=0)(critic, real, fake,
                                                             rng.uniform(size=5))
    np.testing.assert_allclose(got, np.full(5, (np.linalg.norm(w) - 1) ** 2), rtol=1e-5)


def test_gradient_penalty_of_an_mlp_critic_matches_numpy_finite_differences():
    d = adversarial.LayerDiscriminator(6, 8, spectral_norm=False, rngs=nnx.Rngs(0))
    as64 = lambda v: np.asarray(v[...], np.float64)
    w1, b1 = as64(d.hidden_layer.kernel), as64(d.hidden_layer.bias)
    w2, b2 = as64(d.output_layer.kernel), as64(d.output_layer.bias)

    def critic64(x):  # An independent float64 numpy copy of D.
        h = x @ w1 + b1
        return (np.where(h > 0, h, 0.2 * h) @ w2 + b2)[..., 0]

    rng = np.random.default_rng(1)
    real, fake, mix = rng.normal(size=(4, 6)), rng.normal(size=(4, 6)), rng.uniform(size=4)
    x_hat = mix[:, None] * real + (1 - mix[:, None]) * fake
    eps = 1e-6
    grads = np.stack([(critic64(x_hat + eps * e) - critic64(x_hat - eps * e)) / (2 * eps)
                      for e in np.eye(6)], -1)
    want = (np.linalg.norm(grads, axis=-1) - 1) ** 2
    np.testing.assert_allclose(losses.gradient_penalty(d, real, fake, mix), want, rtol=1e-4)


def test_spectral_norm_divides_by_the_largest_singular_value():
    layer = adversarial.DiscriminatorDense(12, 5, spectral_norm=True, rngs=nnx.Rngs(0))
    for _ in range(50):
        layer.power_iteration()
    sigma = np.linalg.svd(np.asarray(layer.kernel[...]), compute_uv=False)[0]
    assert sigma > 1.2  # So the normalisation does something.
    effective = np.asarray(layer.effective_kernel())
    assert np.linalg.svd(effective, compute_uv=False)[0] == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(effective, np.asarray(layer.kernel[...]) / sigma, rtol=1e-4)


def test_pooled_features_are_masked_mean_and_cls():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
    mask = (np.arange(5)[None] < np.array([[2], [5], [1]])).astype(np.int32)
    got = np.asarray(adversarial.pooled_features(hidden, mask))
    for b, n in enumerate((2, 5, 1)):
        np.testing.assert_allclose(got[b, 0], hidden[b, :n].mean(0), rtol=1e-6)
        np.testing.assert_allclose(got[b, 1], hidden[b, 0])
    # Projecting after pooling equals projecting every token first (the weights sum to 1).
    projection = nnx.Linear(4, 6, rngs=nnx.Rngs(0))
    per_token = adversarial.layer_features((projection(hidden),), (0,), mask)
    pooled_first = adversarial.layer_features((hidden,), (0,), mask, projection)
    np.testing.assert_allclose(per_token, pooled_first, rtol=1e-5, atol=1e-6)
    assert pooled_first.shape == (1, 3, 12)


def test_adversarial_weight_is_zero_in_the_warmup_then_ramps_or_jumps():
    ramp = distill.loss_spec(ce=0.5, adversarial=0.1, adversarial_warmup=0.1,
                             adversarial_ramp=0.2, total_steps=100)
    weights = [float(adversarial.adversarial_weight(ramp, jnp.asarray(s)))
               for s in (0, 10, 20, 30, 90)]
    np.testing.assert_allclose(weights, [0.0, 0.0, 0.05, 0.1, 0.1], atol=1e-7)
    jump = distill.loss_spec(ce=0.5, adversarial=0.1, adversarial_warmup=0.1,
                             adversarial_ramp=0.0, total_steps=100)
    weights = [float(adversarial.adversarial_weight(jump, jnp.asarray(s))) for s in (9, 10)]
    np.testing.assert_allclose(weights, [0.0, 0.1], atol=1e-7)


def test_gate_waits_for_the_task_loss_to_fall_then_backs_off_a_winning_discriminator():
    method = adversarial.KDABert(adversarial=0.1, adversarial_after_loss_drop=0.2,
                                 adversarial_max_d_accuracy=0.9)
    gate = adversarial.new_gate()
    assert float(adversarial.gate_factor(method, gate)) == 0.0  # Closed before any step.
    gate = adversarial._gate_after_student(method, gate, jnp.asarray(0.7))
    assert float(gate["start_loss"]) == pytest.approx(0.7)
    # A plateau at the first loss keeps it closed; the running mean is 0.98 m + 0.02 loss.
    for _ in range(10):
        gate = adversarial._gate_after_student(method, gate, jnp.asarray(0.7))
    assert not bool(gate["opened"])
    mean = float(gate["loss_mean"])
    while mean > 0.8 * 0.7:  # By hand: the steps of loss 0.1 it takes to fall 20 % below 0.7.
        mean = 0.98 * mean + 0.02 * 0.1
        gate = adversarial._gate_after_student(method, gate, jnp.asarray(0.1))
    assert bool(gate["opened"]) and float(gate["loss_mean"]) == pytest.approx(mean, rel=1e-5)
    # Open, it stays open when the loss rises again.
    gate = adversarial._gate_after_student(method, gate, jnp.asarray(5.0))
    assert bool(gate["opened"])
    # D's running accuracy 0.5 -> full weight, 0.7 -> half (0.5..0.9), >= 0.9 -> none.
    for accuracy, factor in ((0.5, 1.0), (0.7, 0.5), (0.9, 0.0), (0.99, 0.0)):
        g = {**gate, "d_accuracy_mean": jnp.asarray(accuracy)}
        assert float(adversarial.gate_factor(method, g)) == pytest.approx(factor, abs=1e-6)
    # Both off (the old schedule): factor 1, whatever the gate holds.
    off = adversarial.KDABert(adversarial=0.1)
    assert float(adversarial.gate_factor(off, adversarial.new_gate())) == 1.0


# ------------------------------------------------------------------------------------------------
# The steps


def test_alternating_step_traces_once_trains_both_sides_and_reports_metrics(
        mesh, alternating, teacher_and_params):
    state = _fresh_state(mesh)
    before = _host(state.arrays())
    key = sharding.replicate(jax.random.key(0), mesh)
    for batch in _batches(mesh, 3) * 2:
        state, step_metrics = alternating(state, batch, key)
    after = _host(state.arrays())
    _assert_trees_differ(before["student"]["params"], after["student"]["params"])
    _assert_trees_differ(before["discriminator"]["params"], after["discriminator"]["params"])
    _assert_trees_differ(before["discriminator"]["power_vectors"],
                         after["discriminator"]["power_vectors"])
    assert int(after["student"]["step"]) == int(after["discriminator"]["step"]) == 6
    m = _host(step_metrics)
    for name in ("loss", "soft", "ce", "adversarial", "adversarial_weight", "d_loss",
                 "d_real_accuracy", "d_fake_accuracy", "d_grad_norm"):
        assert np.isfinite(m[f"{name}_sum"]), name
    assert np.isfinite(m["grad_norm"]) and m["count"] == BATCH
    assert 0 <= m["d_real_accuracy_sum"] <= m["d_real_accuracy_count"]
    assert m["d_real_accuracy_count"] == 2 * m["count"]  # Two layers, real rows only.
    assert m["adversarial_weight_sum"] / m["adversarial_weight_count"] == pytest.approx(1.0)
    chex.assert_trees_all_equal(_host(alternating.teachers.params[0]), teacher_and_params[1])


def test_each_step_differentiates_only_its_own_parameters(mesh, alternating, teacher_and_params):
    state = _fresh_state(mesh)
    key = sharding.replicate(jax.random.key(0), mesh)
    batch = _batches(mesh, 1)[0]
    inputs = alternating.inputs(state, alternating.teachers, batch, key)
    features = {k: inputs[k] for k in ("real", "fake", "weights")}

    before = _host(state.arrays())
    state, _ = alternating.discriminator(state, features, key)
    after_d = _host(state.arrays())
    chex.assert_trees_all_equal(after_d["student"], before["student"])  # Bit-identical.
    _assert_trees_differ(after_d["discriminator"]["params"], before["discriminator"]["params"])

    state, _ = alternating.student(state, inputs, batch, key)
    after_s = _host(state.arrays())
    chex.assert_trees_all_equal(after_s["discriminator"], after_d["discriminator"])
    _assert_trees_differ(after_s["student"]["params"], after_d["student"]["params"])
    chex.assert_trees_all_equal(_host(alternating.teachers.params[0]), teacher_and_params[1])
    chex.assert_trees_all_equal(_host(nnx.state(teacher_and_params[0], nnx.Param)),
                                teacher_and_params[1])


@pytest.mark.parametrize("kind", adversarial.LOSS_KINDS)
def test_discriminator_loss_decreases_on_fixed_features(kind):
    rng = np.random.default_rng(0)
    # Teacher and student features from two overlapping Gaussians: separable, not trivially.
    real = jnp.asarray(rng.normal(0.5, 1.0, (2, 64, 8)), jnp.float32)
    fake = jnp.asarray(rng.normal(-0.5, 1.0, (2, 64, 8)), jnp.float32)
    section = adversarial.discriminator_config(kind)
    section.hidden = 16
    section.lr = 1e-2  # Faster than the default, so 40 steps show the trend.
    d_state = adversarial.DiscriminatorState.create(
        adversarial.Discriminators(2, 4, 16, spectral_norm=section.spectral_norm,
                                   rngs=nnx.Rngs(0)),
        adversarial.make_discriminator_optimizer(section))
    state = adversarial.AdversarialState(student=None, discriminator=d_state)
    game = adversarial.GameSpec.from_config(section)
    step = jax.jit(lambda s, f, k: adversarial.discriminator_step(s, f, k, game=game))
    features = {"real": real, "fake": fake, "weights": jnp.ones(64)}
    seen = []
    for _ in range(40):
        state, m = step(state, features, jax.random.key(0))
        seen.append(float(m["d_loss_sum"] / m["d_loss_count"]))
    assert np.mean(seen[-5:]) < np.mean(seen[:5]) - 0.1, seen
    accuracy = (m["d_real_accuracy_sum"] + m["d_fake_accuracy_sum"]) / (2 * 128)
    if kind != "wgan_gp":  # A critic's sign is not a classification.
        assert float(accuracy) > 0.6


def test_student_adversarial_loss_decreases_against_a_fixed_discriminator(mesh, alternating):
    state = _fresh_state(mesh)
    d_before = _host(state.discriminator.arrays())
    key = sharding.replicate(jax.random.key(0), mesh)
    batch = _batches(mesh, 1)[0]
    seen = []
    for _ in range(25):  # Student steps only: D stays as initialised.
        inputs = alternating.inputs(state, alternating.teachers, batch, key)
        state, m = alternating.student(state, inputs, batch, key)
        seen.append(float(m["adversarial_sum"] / m["adversarial_count"]))
    assert np.mean(seen[-3:]) < 0.7 * np.mean(seen[:3]), seen
    chex.assert_trees_all_equal(_host(state.discriminator.arrays()), d_before)


def _train_config(**changes) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(dict(seed=0, log_every=2, checkpoint_every=0,
                                            keep_checkpoints=1, stop_after_steps=0))
    config.update(changes)
    return config


def test_resumed_run_equals_an_uninterrupted_one(mesh, alternating, tmp_path):
    key = sharding.replicate(jax.random.key(0), mesh)
    log = metrics.MetricLog(tmp_path)

    def run(directory, **changes):
        alternating._step = None  # A new run: the step counter starts from the state.
        return train.train_loop(_fresh_state(mesh), alternating, _batcher(), total_steps=5,
                                train_config=_train_config(**changes),
                                checkpoint_dir=tmp_path / directory, log=log, mesh=mesh,
                                dropout_key=key, progress=False)

    straight = run("straight")
    first = run("resumed", stop_after_steps=2)
    assert not first.finished and first.steps == 2
    second = run("resumed")
    assert second.finished and second.steps == 5
    a, b = _host(straight.state.arrays()), _host(second.state.arrays())
    assert int(b["discriminator"]["step"]) == 5
    assert float(b["gate"]["start_loss"]) > 0 and float(b["gate"]["d_accuracy_mean"]) != 0.5
    chex.assert_trees_all_equal(a, b)  # Bitwise: both sides, optimizer states, power vectors.
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"d_loss", "d_real_accuracy", "d_fake_accuracy", "adversarial"} <= set(logged[-1])


# ------------------------------------------------------------------------------------------------
# Health warnings, configs, end to end


def test_monitor_warns_once_per_stretch_on_a_synthetic_metric_stream(tmp_path, capsys):
    log = metrics.MetricLog(tmp_path)
    monitor = adversarial.DiscriminatorMonitor(window=200, log=log, description="distill")
    observe = lambda step, r, f, g=0.5: monitor.observe(step, real_accuracy=r, fake_accuracy=f,
                                                        grad_norm=g)
    step = 0
    for _ in range(300):  # Healthy: D around 0.5-0.8.
        assert not observe(step, 0.75, 0.6)
        step += 1
    raised = [(step, observe(step, 1.0, 0.995)) for step in range(step, step + 450)]
    assert [s for s, w in raised if w] == [300 + 199]  # Once for the whole stretch.
    step = 750
    observe(step, 0.7, 0.7)  # Breaks the stretch.
    assert observe(step + 1, 1.0, 1.0) == []
    raised = [s for s in range(800, 1000) if observe(s, 1.0, 0.0)]  # One class only.
    assert raised == [999]
    raised = [s for s in range(1000, 1300) if observe(s, 0.5, 0.5, 0.0)]  # No gradient.
    assert raised == []  # ... the same stretch continues: no second warning.
    kinds = [k for _, k, _ in monitor.warnings]
    assert kinds == ["wins", "collapses"]
    assert "wins completely" in capsys.readouterr().out
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["warning"] for r in logged] == ["discriminator_wins", "discriminator_collapses"]
    assert all(r["split"] == "warning" for r in logged)

    # Through the device path: sums fetched once every `check_every` steps.
    monitor = adversarial.DiscriminatorMonitor(window=20, check_every=10)
    sums = {"d_real_accuracy_sum": jnp.asarray(16.0), "d_real_accuracy_count": jnp.asarray(16.0),
            "d_fake_accuracy_sum": jnp.asarray(16.0), "d_fake_accuracy_count": jnp.asarray(16.0),
            "d_grad_norm_sum": jnp.asarray(0.3), "d_grad_norm_count": jnp.asarray(1.0)}
    for s in range(19):
        monitor.add(s, sums)
    assert monitor.warnings == []
    monitor.add(19, sums)
    assert [k for _, k, _ in monitor.warnings] == ["wins"]


@pytest.mark.parametrize("recipe", ["kdabert", "kdabert_mse"])
def test_configs_run_in_every_setting_and_refuse_bad_values(recipe):
    path = str(REPO_ROOT / "configs" / f"{recipe}.py")
    config = config_lib.load_config(path)
    assert config.setting == "tenth_size" and config.student.hidden == 168
    assert config.distill.loss.hidden == (1.0 if recipe == "kdabert_mse" else 0.0)
    # The recipes' default: the adaptive gate on (the ungated term held tenth_size at chance).
    assert (config.distill.loss.adversarial_after_loss_drop,
            config.distill.loss.adversarial_max_d_accuracy) == (0.2, 0.9)
    for setting in recipes.SETTINGS:
        for kind in adversarial.LOSS_KINDS:
            config = methods.validate(config_lib.load_config(f"{path}:{setting},{kind}"))
            spec = distill.LossSpec.from_config(
                config.distill.loss, methods=methods.loss_methods(), student_layers=3,
                teacher_layers=6, total_steps=10)
            assert spec.layer_pairs == ((1, 2), (2, 4), (3, 6)) and spec.uses_teacher
            game = adversarial.GameSpec.from_config(config.discriminator)
            assert game.discriminator_steps == (5 if kind == "wgan_gp" else 1)
    for override, key in [("discriminator.loss=gan", "discriminator.loss"),
                          ("distill.loss.adversarial=-0.1", "distill.loss.adversarial"),
                          ("distill.loss.adversarial_warmup=1.0",
                           "distill.loss.adversarial_warmup"),
                          ("discriminator.label_smoothing=0.9", "discriminator.label_smoothing")]:
        config = config_lib.apply_overrides(config_lib.load_config(path), [override])
        with pytest.raises(config_lib.ConfigError, match=f"'{key}'"):
            methods.validate(config)
    with pytest.raises(config_lib.ConfigError, match="unknown discriminator loss 'gan'"):
        config_lib.load_config(f"{path}:tenth_size,gan")


def test_kdabert_distills_end_to_end_through_the_engine(tmp_path, tiny_hf_dir):
    train_file, dev_file = write_toy_task(tmp_path / "data")
    write_toy_teacher(tiny_hf_dir, tmp_path / "teacher", train_file, dev_file)
    config = config_lib.load_config(str(REPO_ROOT / "configs" / "kdabert.py"))
    config = methods.validate(config_lib.apply_overrides(config, [
        f"teacher.name={tmp_path / 'teacher'}", "data.task=toy",
        f"data.train_file={train_file}", f"data.dev_file={dev_file}",
        "data.max_length=16", "data.batch_size=16", "data.eval_batch_size=16",
        "data.buckets=(16,)",  # One padded length: one compilation per step function.
        "student.layers=1", "student.hidden=16", "student.heads=4", "student.intermediate=32",
        "discriminator.hidden=32", "train.max_steps=4", "train.log_every=2",
        "train.num_devices=2", "optim.lr=1e-2", "distill.loss.adversarial_after_loss_drop=0.1",
        "distill.loss.adversarial_max_d_accuracy=0.9"]))
    result = distill.distill(config, tmp_path / "run", progress=False, measure_throughput=False)
    assert result["finished"] and result["stages"]["distill"]["steps"] == 4
    expected = {"accuracy", "teacher_accuracy", "teacher_agreement", "student_layers",
                "student_hidden", "student_params", "student_non_embedding_params",
                "teacher_non_embedding_params", "train_seconds", "stages", "examples"}
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert expected <= set(saved) and saved["student_hidden"] == 16
    logged = [json.loads(line) for line in
              (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stage_records = [r for r in logged if r["split"] == "distill"]
    assert [r["step"] for r in stage_records] == [2, 4]
    for name in ("d_loss", "d_real_accuracy", "d_fake_accuracy", "adversarial",
                 "adversarial_weight", "soft", "ce"):
        assert np.isfinite(stage_records[-1][name]), name
    assert "hidden" not in stage_records[-1]  # gamma = 0: the adversarial term replaces the MSE.
    # The stage checkpoint holds both sides; a rerun restores it and retrains nothing.
    saved_tree = (tmp_path / "run" / "stages" / "distill" / "checkpoints" / "4" / "state" /
                  "_METADATA").read_text()
    assert "'discriminator', 'power_vectors'" in saved_tree and "'student', 'params'" in saved_tree
    again = distill.distill(config, tmp_path / "run", progress=False, measure_throughput=False)
    assert again["accuracy"] == result["accuracy"]
