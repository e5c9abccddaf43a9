"""NewsBERT on tiny random models: momentum mixing against hand-computed values, the joint
gradient against separate references (shared head gets both losses' gradients, the teacher only
its CE), one trace on 8 devices, 8 vs 1 devices, clear refusals, and an end-to-end toy run that
saves both the student and the jointly trained teacher."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import REPO_ROOT, random_token_batch, write_toy_task
from kdjax import config as config_lib, distill, hf, sharding, train
from kdjax import methods
from kdjax.methods import newsbert
from kdjax.models import bert
from kdjax.models.bert import BertClassifier, BertConfig, count_params

TEACHER = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=32, max_position_embeddings=32)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CONFIG_FILE = str(REPO_ROOT / "configs" / "newsbert.py")


def _batch(seed, batch_size=16, length=12):
    return random_token_batch(seed, batch_size, length)


def _pair(*, dropout=True, init_from_teacher=True, teacher_layers=2):
    """A teacher and a student of half its depth (K = 2) sharing pooler and classifier. The
    jitted-step tests use 2 + 1 layers: compiling a joint forward and backward pass dominates
    their time."""
    arch = TEACHER.replace(num_hidden_layers=teacher_layers, initializer_range=0.2,
                           **({} if dropout else NO_DROPOUT))
    teacher = BertClassifier(arch, 3, rngs=nnx.Rngs(0))
    student = BertClassifier(distill.student_config(arch, layers=teacher_layers // 2), 3,
                             rngs=nnx.Rngs(1))
    if init_from_teacher:
        distill.init_from_teacher(student, teacher,
                                  distill.first_layers(teacher_layers, teacher_layers // 2))
    return newsbert.NewsBertPair(teacher, student)


def _spec(teacher_layers=2, **changes):
    section = config_lib.load_config(CONFIG_FILE).newsbert
    with section.unlocked():
        section.update(changes)
    return newsbert.NewsBertSpec.from_config(section, student_layers=teacher_layers // 2,
                                             teacher_layers=teacher_layers)


# ------------------------------------------------------------------------------------------------
# Momentum distillation


def test_momentum_mix_matches_hand_computed_values():
    student = [{"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 4.0])}]
    teacher = [{"w": jnp.array([10.0, 20.0])}, {"w": jnp.array([30.0, 40.0])},
               {"w": jnp.array([0.0, 0.0])}, {"w": jnp.array([100.0, -100.0])}]
    mixed = jax.jit(newsbert.momentum_mix, static_argnums=(2, 3))(student, teacher, 0.25, 2)
    # Block 1: mean(10, 30), mean(20, 40) = 20, 30 -> 0.25 * 20 + 0.75 * 1 = 5.75, ...
    np.testing.assert_allclose(mixed[0]["w"], [5.75, 9.0])
    # Block 2: mean(0, 100), mean(0, -100) = 50, -50 -> 12.5 + 2.25, -12.5 + 3.
    np.testing.assert_allclose(mixed[1]["w"], [14.75, -9.5])
    chex.assert_trees_all_equal(newsbert.momentum_mix(student, teacher, 0.0, 2), student)
    np.testing.assert_allclose(newsbert.momentum_mix(student, teacher[:2], 1.0, 1)[1]["w"],
                               [30.0, 40.0])
    with pytest.raises(distill.DistillError, match="3 teacher layers for 2 student layers"):
        newsbert.momentum_mix(student, teacher[:3], 0.5, 2)


def test_mixing_the_joint_gradient_touches_only_the_student_layers():
    pair = _pair(init_from_teacher=False, teacher_layers=4)  # Two blocks of K = 2.
    _, params = nnx.split(pair, nnx.Param)
    # Any tree of the right structure will do as "gradients": the parameters themselves.
    grads = jax.tree.map(lambda x: x * 1.0, params)
    before = jax.device_get(grads)
    mixed = newsbert.mix_student_layer_grads(grads, 0.3, 2)
    chex.assert_trees_all_equal(jax.device_get(grads), before)  # The input is left alone.
    leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]
    s_layers, t_layers = before["student"]["bert"]["layers"], before["teacher"]["bert"]["layers"]
    for k in range(2):
        expected = [0.3 * (a + b) / 2 + 0.7 * s for s, a, b in zip(
            leaves(s_layers[k]), leaves(t_layers[2 * k]), leaves(t_layers[2 * k + 1]))]
        for got, want in zip(leaves(mixed["student"]["bert"]["layers"][k]), expected):
            np.testing.assert_allclose(got, want, rtol=1e-6)
    # Embeddings, the shared head and the teacher are not mixed.
    chex.assert_trees_all_equal(mixed["student"]["bert"]["embeddings"],
                                before["student"]["bert"]["embeddings"])
    chex.assert_trees_all_equal(mixed["shared"], before["shared"])
    chex.assert_trees_all_equal(mixed["teacher"], before["teacher"])
    chex.assert_trees_all_equal(newsbert.mix_student_layer_grads(grads, 0.0, 2), before)


# ------------------------------------------------------------------------------------------------
# The joint model and its gradient


def test_pooler_and_classifier_are_one_set_of_parameters():
    pair = _pair()
    assert pair.student.bert.pooler is pair.teacher.bert.pooler
    assert pair.student.classifier is pair.teacher.classifier
    graphdef, params = nnx.split(pair, nnx.Param)
    assert set(params) == {"shared", "student", "teacher"}
    assert "pooler" not in params["student"]["bert"] and "pooler" not in params["teacher"]["bert"]
    head = count_params(nnx.state(pair.shared, nnx.Param))
    assert head == 16 * 16 + 16 + 16 * 3 + 3
    assert count_params(params) == (count_params(nnx.state(pair.teacher, nnx.Param))
                                    + count_params(nnx.state(pair.student, nnx.Param)) - head)
    merged = nnx.merge(graphdef, params)
    assert merged.student.classifier is merged.teacher.classifier


def _reference_losses(params, graphdef, batch, w, *, stop_teacher=True):
    """The teacher's CE and the student loss written out from the formulas (no kdjax losses)."""
    pair = nnx.merge(graphdef, params)
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    t = pair.teacher(ids, mask, types, output_hidden_states=True)
    s = pair.student(ids, mask, types, output_hidden_states=True)
    block = (len(t.hidden_states) - 1) // (len(s.hidden_states) - 1)
    sg = jax.lax.stop_gradient if stop_teacher else (lambda x: x)
    rows, labels = jnp.asarray(batch["weights"]), jnp.asarray(batch["labels"])
    labelled = rows * (labels >= 0)
    real = jnp.asarray(mask, jnp.float32)

    def ce(logits):  # [B]
        log_p = logits - jax.scipy.special.logsumexp(logits, -1, keepdims=True)
        return -jnp.take_along_axis(log_p, jnp.maximum(labels, 0)[:, None], 1)[:, 0]

    def token_mse(a, b):  # [B]: mean over H, then over real tokens
        return jnp.sum(jnp.mean((a - b) ** 2, -1) * real, -1) / jnp.sum(real, -1)

    labelled_mean = lambda x: jnp.sum(x * labelled) / jnp.sum(labelled)
    teacher_loss = labelled_mean(ce(t.logits))
    p_teacher = jax.nn.softmax(sg(t.logits) / w["temperature"])
    log_q = jax.nn.log_softmax(s.logits / w["temperature"])
    per_example = (
        w["embedding"] * token_mse(s.hidden_states[0], sg(t.hidden_states[0]))
        + w["hidden"] * sum(token_mse(s.hidden_states[i], sg(t.hidden_states[block * i]))
                            for i in range(1, len(s.hidden_states)))
        + w["pooled"] * jnp.mean((s.pooled - sg(t.pooled)) ** 2, -1)
        + w["soft_ce"] * -jnp.sum(p_teacher * log_q, -1))
    student_loss = jnp.sum(per_example * rows) / jnp.sum(rows) + w["ce"] * labelled_mean(
        ce(s.logits))
    return w["teacher_ce"] * teacher_loss, student_loss


WEIGHTS = dict(teacher_ce=1.3, embedding=0.5, hidden=2.0, pooled=3.0, soft_ce=1.5, ce=0.7,
               temperature=2.0, beta=0.3)


LR = 0.1


@pytest.fixture(scope="module")
def sgd_steps():
    """The jitted step for WEIGHTS with plain SGD, on 8 devices and on 1, shared by the tests
    below (compiling dominates their time): each may trace once, whichever test calls first.

    Plain SGD moves every parameter by exactly -LR * its gradient, which the gradient test
    reads off; and Adam would hide a gradient scaled by the device count (it is scale-invariant)
    and turn float noise in exactly-zero gradients (the attention key bias, which softmax
    ignores) into +-lr steps in the 8 vs 1 device comparison."""
    chex.clear_trace_counter()
    once_per_mesh = chex.assert_max_traces(newsbert.newsbert_step, n=2)
    tx = optax.sgd(LR)  # Static in the TrainState: one object, so the compilations are reused.
    return {n: (newsbert.make_newsbert_step(sharding.make_mesh(n), _spec(**WEIGHTS),
                                            once_per_mesh), tx) for n in (8, 1)}


def _sgd_run(sgd_steps, devices, batches):
    """Steps from a fresh random-init, dropout-free pair; (initial params, final state,
    metrics of the first step)."""
    step, tx = sgd_steps[devices]
    mesh = sharding.make_mesh(devices)
    state = sharding.replicate(
        train.TrainState.create(_pair(dropout=False, init_from_teacher=False), tx), mesh)
    initial = jax.device_get(state.params)
    key = sharding.replicate(jax.random.key(0), mesh)
    metrics = []
    for batch in batches:
        state, step_metrics = step(state, sharding.shard_batch(batch, mesh), key)
        metrics.append(step_metrics)
    return initial, state, metrics[0]


def test_joint_step_matches_separate_gradients_of_the_two_losses(sgd_steps):
    # A random student, so every term (embeddings too) has a gradient; no dropout, so the
    # reference sees the same forward passes.
    graphdef, params = nnx.split(_pair(dropout=False, init_from_teacher=False), nnx.Param)
    batch = _batch(0)
    reference = lambda p, **kw: _reference_losses(p, graphdef, batch, WEIGHTS, **kw)
    g_teacher = jax.grad(lambda p: reference(p)[0])(params)
    g_student = jax.grad(lambda p: reference(p)[1])(params)
    g_student_no_sg = jax.grad(lambda p: reference(p, stop_teacher=False)[1])(params)
    norm = lambda tree: float(optax.tree.norm(tree))
    # The checks below can fail: without stop_gradient the student loss would pull on the
    # teacher, the teacher's CE never reaches the student, and both reach the shared head.
    assert norm(g_student_no_sg["teacher"]["bert"]["layers"]) > 1e-3
    assert norm(g_teacher["student"]) == 0.0 and norm(g_student["teacher"]) == 0.0
    assert norm(g_teacher["shared"]) > 1e-3 and norm(g_student["shared"]) > 1e-3

    # One jitted step on 8 devices: every parameter moves once, by -LR * its gradient, which
    # must be: the teacher's CE alone for the teacher, the sum of both losses for the shared
    # pooler and classifier, the student loss for the student's embeddings, and for student
    # layer k the momentum mix beta * mean(teacher block k) + (1 - beta) * student.
    before, state, metrics = _sgd_run(sgd_steps, 8, [batch])
    chex.assert_trees_all_equal(before, jax.device_get(params))
    after = jax.device_get(state.params)
    loss_t, loss_s = reference(params)
    assert float(metrics["loss_sum"] / metrics["count"]) == pytest.approx(
        float(loss_t + loss_s), rel=1e-5)

    close = lambda a, b: chex.assert_trees_all_close(a, b, rtol=2e-4, atol=1e-6)
    sgd = lambda p, g: jax.tree.map(lambda p, g: p - LR * g, p, g)
    close(after["teacher"], sgd(before["teacher"], g_teacher["teacher"]))
    close(after["shared"], sgd(before["shared"], jax.tree.map(jnp.add, g_teacher["shared"],
                                                              g_student["shared"])))
    close(after["student"]["bert"]["embeddings"],
          sgd(before["student"]["bert"]["embeddings"], g_student["student"]["bert"]["embeddings"]))
    beta, teacher_layers = WEIGHTS["beta"], g_teacher["teacher"]["bert"]["layers"]
    mixed = jax.tree.map(lambda s, a, b: beta * (a + b) / 2 + (1 - beta) * s,
                         g_student["student"]["bert"]["layers"][0], teacher_layers[0],
                         teacher_layers[1])
    close(after["student"]["bert"]["layers"][0], sgd(before["student"]["bert"]["layers"][0],
                                                     mixed))
    # Mixing changed something: beta = 0 would have given a different student layer.
    assert norm(jax.tree.map(jnp.subtract, mixed,
                             g_student["student"]["bert"]["layers"][0])) > 1e-4


def test_8_devices_and_1_device_give_the_same_parameters(sgd_steps):
    batches = [_batch(0), _batch(1)]
    (initial, state_8, _), (_, state_1, _) = (_sgd_run(sgd_steps, n, batches) for n in (8, 1))
    params_8, params_1 = jax.device_get(state_8.params), jax.device_get(state_1.params)
    chex.assert_trees_all_close(params_8, params_1, rtol=1e-4, atol=1e-6)
    # Two steps really moved the parameters (the comparison is not of two initial states).
    assert float(optax.tree.norm(jax.tree.map(jnp.subtract, params_8, initial))) > 1e-2


def test_dropout_masks_do_not_depend_on_the_sharding():
    """The dropout-free comparison above relies on this for dropout runs: a key draws the same
    mask whether the batch is split over 8 devices or not (partitionable threefry)."""
    x = jnp.ones((16, 12, 16))
    draw = lambda x, key: bert.dropout(x, 0.1, key)
    masks = []
    for n in (8, 1):
        mesh = sharding.make_mesh(n)
        step = jax.jit(draw, in_shardings=(sharding.batch_sharded(mesh),
                                           sharding.replicated(mesh)))
        masks.append(np.asarray(step(x, jax.random.key(5))))
    np.testing.assert_array_equal(masks[0], masks[1])
    assert 0.05 < np.mean(masks[0] == 0) < 0.15


# ------------------------------------------------------------------------------------------------
# Adam on the mesh, dropout on


def test_joint_step_traces_once_and_both_losses_go_down():
    mesh = sharding.make_mesh(8)
    chex.clear_trace_counter()
    step = newsbert.make_newsbert_step(mesh, _spec(),
                                       chex.assert_max_traces(newsbert.newsbert_step, n=1))
    state = sharding.replicate(train.TrainState.create(_pair(), optax.adam(1e-2)), mesh)
    key, batch = sharding.replicate(jax.random.key(0), mesh), sharding.shard_batch(_batch(0), mesh)
    teacher_losses, student_losses = [], []
    # The student chases a teacher that moves (its hidden-state terms rise while the teacher
    # learns fastest), so it needs enough steps for the teacher to settle.
    for _ in range(40):
        state, metrics = step(state, batch, key)
        teacher_losses.append(float(metrics["teacher_ce_sum"] / metrics["teacher_ce_count"]))
        student_losses.append(float(metrics["student_loss_sum"] / metrics["count"]))
    assert np.isfinite(teacher_losses + student_losses).all()
    assert np.mean(teacher_losses[-5:]) < 0.2 * np.mean(teacher_losses[:5]), teacher_losses
    assert np.mean(student_losses[-5:]) < 0.7 * np.mean(student_losses[:5]), student_losses
    assert {"ce_sum", "soft_ce_sum", "embedding_sum", "hidden_sum", "pooled_sum",
            "teacher_accuracy_sum", "grad_norm"} <= set(metrics)
    model = state.model()
    assert model.student.classifier is model.teacher.classifier


# ------------------------------------------------------------------------------------------------
# Config and refusals


def test_config_settings_and_validation():
    for setting, repeats in (("half_depth", 1), ("few_labels", 10)):
        config = methods.validate(config_lib.load_config(f"{CONFIG_FILE}:{setting}"))
        assert config.method == "newsbert" and config.student.init_layers == "first"
        assert config.newsbert.beta == 0.5 and config.newsbert.labelled_repeats == repeats
    config = config_lib.load_config(CONFIG_FILE)
    for override, key in (("newsbert.beta=1.5", "newsbert.beta"),
                          ("newsbert.temperature=0", "newsbert.temperature"),
                          ("newsbert.pooled=-1", "newsbert.pooled"),
                          ("newsbert.labelled_repeats=0", "newsbert.labelled_repeats")):
        bad = config_lib.apply_overrides(config.copy_and_resolve_references(), [override])
        with pytest.raises(config_lib.ConfigError, match=f"'{key}'"):
            methods.validate(bad)
    # Keys that joint training would ignore are gone, so overriding them fails loudly.
    with pytest.raises(config_lib.ConfigError, match="unknown config key 'distill"):
        config_lib.apply_overrides(config, ["distill.epochs=2"])


def test_width_and_depth_mismatches_are_refused():
    minilm = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536)
    assert newsbert.check_architecture(distill.student_config(minilm, layers=3), minilm) == 2
    tenth = distill.student_config(minilm, layers=3, hidden=168, heads=12, intermediate=672)
    with pytest.raises(distill.DistillError, match="as wide as the teacher.*hidden_size"):
        newsbert.check_architecture(tenth, minilm)
    with pytest.raises(distill.DistillError, match="divide the teacher's 6 layers"):
        newsbert.check_architecture(distill.student_config(minilm, layers=4), minilm)


# ------------------------------------------------------------------------------------------------
# End to end on the toy task


def _toy_config(tmp_path, tiny_hf_dir, *overrides, setting=""):
    train_file, dev_file = write_toy_task(tmp_path / "data")
    config = config_lib.load_config(CONFIG_FILE + setting)
    return methods.validate(config_lib.apply_overrides(config, [
        f"teacher.name={tiny_hf_dir}", "data.task=toy", f"data.train_file={train_file}",
        f"data.dev_file={dev_file}", "data.max_length=16", "data.batch_size=16",
        "data.eval_batch_size=16", "data.buckets=(16,)", "optim.lr=1e-2", "train.log_every=2",
        "train.num_devices=2", *overrides]))


def test_tenth_size_is_refused_before_any_work(tmp_path, tiny_hf_dir):
    config = _toy_config(tmp_path, tiny_hf_dir, "student.hidden=16", "student.heads=4",
                         "student.intermediate=32")
    with pytest.raises(distill.DistillError, match="as wide as the teacher"):
        distill.distill(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.json").exists()


def test_distill_newsbert_end_to_end_saves_student_and_teacher(tmp_path, tiny_hf_dir):
    # The tiny pretrained teacher has 2 layers: a 1-layer student, K = 2.
    config = _toy_config(tmp_path, tiny_hf_dir, "student.layers=1", "newsbert.epochs=8")
    run_dir = tmp_path / "run"
    result = distill.distill(config, run_dir, progress=False, measure_throughput=False)
    assert result["finished"] and result["stages"]["joint"]["steps"] == 48  # 8 x 96 / 16
    assert result["student_layers"] == 1 and result["student_hidden"] == 32
    assert result["teacher_accuracy"] > 0.8  # The teacher learned the task jointly.
    assert result["accuracy"] > 0.7
    assert not (run_dir / "teacher-seed0").exists()  # No separate teacher fine-tuning.
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved["accuracy"] == result["accuracy"]
    assert {"teacher_agreement", "student_params", "student_non_embedding_params",
            "teacher_non_embedding_params", "train_seconds", "examples"} <= set(saved)
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"joint", "dev"} <= {entry["split"] for entry in logged}

    # Both directories are plain HF classifiers that reproduce the reported accuracies.
    eval_config = config_lib.apply_overrides(
        config_lib.load_config(str(REPO_ROOT / "configs" / "finetune.py")),
        ["data.task=toy", f"data.train_file={config.data.train_file}",
         f"data.dev_file={config.data.dev_file}", "data.max_length=16",
         "data.eval_batch_size=16", "train.num_devices=1"])
    for directory, layers, key in (("model", 1, "accuracy"),
                                   ("teacher_model", 2, "teacher_accuracy")):
        model, report, _ = hf.load_pretrained(str(run_dir / directory))
        assert model.config.num_hidden_layers == layers and not report.newly_initialized
        assert train.evaluate_saved_model(run_dir / directory, eval_config)["accuracy"] == \
            pytest.approx(result[key])
    student, teacher = (hf.load_pretrained(str(run_dir / d))[0] for d in ("model",
                                                                         "teacher_model"))
    chex.assert_trees_all_equal(nnx.state(student.classifier, nnx.Param),
                                nnx.state(teacher.classifier, nnx.Param))  # Shared head.

    # Run again: the finished checkpoint is restored, nothing retrains, same answer.
    again = distill.distill(config, run_dir, progress=False, measure_throughput=False)
    assert again["accuracy"] == result["accuracy"]
    assert again["teacher_accuracy"] == result["teacher_accuracy"]


def test_few_labels_trains_on_the_repeated_labels_and_the_transfer_set(tmp_path, tiny_hf_dir):
    # The run itself is the end-to-end test's code path; only the training split differs.
    config = _toy_config(tmp_path, tiny_hf_dir, "data.train_limit=32",
                         "newsbert.labelled_repeats=2", setting=":few_labels")
    inputs = train.prepare_task(config_lib.apply_overrides(
        config_lib.load_config(str(REPO_ROOT / "configs" / "finetune.py")),
        [f"model.name={tiny_hf_dir}", "data.task=toy",
         f"data.train_file={config.data.train_file}", f"data.dev_file={config.data.dev_file}",
         "data.max_length=16", "data.train_limit=32"]))
    split = newsbert._training_split(config, inputs)
    assert len(split) == 2 * 32 + 64 and (split.labels == -1).sum() == 64
    np.testing.assert_array_equal(split.labels[:32], split.labels[32:64])
    half_depth = config_lib.apply_overrides(config.copy_and_resolve_references(),
                                            ["data.unlabelled_rest=False"])
    assert len(newsbert._training_split(half_depth, inputs)) == 32
