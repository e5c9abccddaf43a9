"""The distillation engine on tiny random models: layer maps, student initialisation, masking,
schedules, every recipe's jitted step (one trace, loss goes down, teacher untouched), clear
refusals, and end-to-end `distill` runs on the toy task."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO_ROOT, random_token_batch, write_toy_task
from kdjax import config as config_lib, distill, hf, methods, optim, sharding, train
from kdjax.methods.distilbert import DistilBERT, mask_tokens
from kdjax.methods.kd import KD
from kdjax.models.bert import BertOutput, BertClassifier, BertConfig, count_params

TEACHER = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=32, max_position_embeddings=32)
# Tiny vocabulary: ids 0-2 are special, 3 is [MASK].
TINY_TOKENS = dict(mask_token_id=3, special_token_ids=(0, 1, 2), vocab_size=64)


def _with_tiny_tokens(spec):
    """`spec` with DistilBERT's token ids set for the tiny vocabulary."""
    return dataclasses.replace(spec, methods=tuple(
        dataclasses.replace(m, **TINY_TOKENS) if isinstance(m, DistilBERT) else m
        for m in spec.methods))


def _batch(seed, batch_size=16, length=12):
    return random_token_batch(seed, batch_size, length)


# ------------------------------------------------------------------------------------------------
# Layer maps and initialisation


def test_layer_maps_follow_the_papers_index_conventions():
    assert distill.layer_map("uniform", 4, 12) == (3, 6, 9, 12)  # TinyBERT4: g(m) = 3m
    assert distill.layer_map("uniform", 3, 6) == (2, 4, 6)
    assert distill.layer_map("skip", 6, 12) == (2, 4, 6, 8, 10, 12)  # PKD-Skip {2,4,6,8,10}
    assert distill.layer_map("last", 6, 12) == (7, 8, 9, 10, 11, 12)  # PKD-Last {7..11}
    assert distill.layer_map("last", 3, 6) == (4, 5, 6)
    assert distill.layer_map("explicit", 2, 6, (1, 6)) == (1, 6)


@pytest.mark.parametrize("args, message", [
    (("uniform", 4, 6), "divide"),
    (("skip", 5, 12), "divide"),
    (("explicit", 3, 6, (2, 4)), "has 2 entries"),
    (("explicit", 2, 6, (0, 7)), "outside 1..6"),
    (("diagonal", 2, 6), "unknown layer map"),
    (("uniform", 8, 6), "student has 8 layers"),
])
def test_bad_layer_maps_are_refused_with_a_clear_message(args, message):
    with pytest.raises(distill.DistillError, match=message):
        distill.layer_map(*args)


def test_spread_and_first_layers():
    assert distill.spread_layers(12, 6) == (0, 2, 4, 7, 9, 11)  # The released DistilBERT.
    assert distill.spread_layers(6, 3) == (0, 2, 5)
    assert distill.first_layers(12, 6) == (0, 1, 2, 3, 4, 5)


def test_init_from_teacher_copies_the_chosen_layers():
    teacher = BertClassifier(TEACHER, 3, rngs=nnx.Rngs(0))
    student = BertClassifier(distill.student_config(TEACHER, layers=2), 3, rngs=nnx.Rngs(1))
    distill.init_from_teacher(student, teacher, (0, 3))
    for i, j in enumerate((0, 3)):
        chex.assert_trees_all_equal(nnx.state(student.bert.layers[i], nnx.Param),
                                    nnx.state(teacher.bert.layers[j], nnx.Param))
    chex.assert_trees_all_equal(nnx.state(student.bert.embeddings, nnx.Param),
                                nnx.state(teacher.bert.embeddings, nnx.Param))
    narrow = BertClassifier(distill.student_config(TEACHER, layers=2, hidden=8), 3,
                            rngs=nnx.Rngs(1))
    with pytest.raises(distill.DistillError, match="same hidden_size"):
        distill.init_from_teacher(narrow, teacher, (0, 3))


# ------------------------------------------------------------------------------------------------
# Pieces of the step


def test_mask_tokens_masks_about_15_percent_of_real_non_special_tokens():
    spec = distill.loss_spec(mlm=1.0, **TINY_TOKENS)
    batch = _batch(0, batch_size=64, length=32)
    masked = jax.jit(mask_tokens, static_argnums=2)(batch, jax.random.key(0),
                                                    spec.method(DistilBERT))
    where, positions = np.asarray(masked["mlm_where"]), np.asarray(masked["mlm_positions"])
    ids, new_ids = batch["input_ids"], np.asarray(masked["input_ids"])
    eligible = (batch["attention_mask"] == 1) & (ids > 2)
    rows = np.arange(64)[:, None]
    assert eligible[rows, positions][where].all()  # Only real, non-special tokens.
    np.testing.assert_array_equal(where.sum(1), np.round(0.15 * eligible.sum(1)).clip(1))
    np.testing.assert_array_equal(np.asarray(masked["mlm_targets"])[where],
                                  ids[rows, positions][where])
    untouched = np.ones_like(ids, bool)
    untouched[np.broadcast_to(rows, positions.shape)[where], positions[where]] = False
    np.testing.assert_array_equal(new_ids[untouched], ids[untouched])
    replaced = new_ids[rows, positions][where]
    assert 0.65 < np.mean(replaced == 3) < 0.95  # ~80 % [MASK]


def test_schedules_and_temperature():
    step = lambda s: jnp.asarray(s)
    assert float(distill.schedule_factor("constant", step(7), 100, 0.1)) == 1.0
    assert float(distill.schedule_factor("linear_warmup", step(5), 100, 0.1)) == pytest.approx(0.5)
    assert float(distill.schedule_factor("linear_warmup", step(50), 100, 0.1)) == 1.0
    assert float(distill.schedule_factor("linear_decay", step(25), 100, 0.1)) == pytest.approx(0.75)
    spec = distill.loss_spec(temperature=4.0, temperature_end=1.0,
                            temperature_schedule="linear_decay", total_steps=100)
    assert float(distill.temperature_at(spec, step(50))) == pytest.approx(2.5)
    with pytest.raises(distill.DistillError, match="weight_schedule"):
        distill.loss_spec(weight_schedule="cosine")


def test_combined_loss_adds_weighted_terms_and_reports_each():
    rng = np.random.default_rng(0)
    student_logits = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    teacher_logits = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)  # Two teachers.
    batch = {"labels": jnp.array([0, 2, -1, 1]), "weights": jnp.array([1.0, 1.0, 1.0, 0.0]),
             "attention_mask": jnp.ones((4, 5), jnp.int32)}
    spec = distill.loss_spec(ce=0.3, soft=0.7, temperature=2.0)
    out = BertOutput(last_hidden_state=jnp.zeros((4, 5, 2)), logits=student_logits)
    loss, metrics = distill.combined_loss(spec, out, {"logits": teacher_logits}, batch,
                                          jnp.asarray(0))
    # Independent numpy: CE over the 2 labelled real rows, soft KL against the teachers'
    # averaged tempered probabilities over the 3 real rows.
    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    s, t = np.asarray(student_logits, np.float64), np.asarray(teacher_logits, np.float64)
    ce = -np.log(softmax(s)[[0, 1], [0, 2]]).mean()
    p = softmax(t / 2).mean(0)
    kl = (p * (np.log(p) - np.log(softmax(s / 2)))).sum(-1)[:3].mean() * 4
    assert float(loss) == pytest.approx(0.3 * ce + 0.7 * kl, rel=1e-5)
    assert float(metrics["ce_sum"] / metrics["ce_count"]) == pytest.approx(ce, rel=1e-5)
    assert float(metrics["ce_count"]) == 2 and float(metrics["soft_count"]) == 3


# ------------------------------------------------------------------------------------------------
# Every recipe's step


def _recipe_stages():
    cases = []
    for recipe in ("kd", "pkd_skip", "pkd_last", "tinybert", "distilbert", "baseline"):
        config = config_lib.load_config(str(REPO_ROOT / "configs" / f"{recipe}.py"))
        cases += [(recipe, name) for name in config.stages]
    return cases


@pytest.mark.parametrize("recipe, stage", _recipe_stages())
def test_recipe_step_traces_once_learns_and_leaves_the_teacher_untouched(recipe, stage):
    config = config_lib.load_config(str(REPO_ROOT / "configs" / f"{recipe}.py"))
    spec = distill.LossSpec.from_config(config[stage].loss, methods=methods.loss_methods(),
                                        student_layers=2, teacher_layers=4, total_steps=40)
    spec = _with_tiny_tokens(spec)
    distilbert = spec.method(DistilBERT)
    mlm = bool(distilbert and distilbert.mlm)
    # A larger init makes the random teacher's predictions differ between examples, so soft
    # targets carry something to learn.
    teacher = BertClassifier(TEACHER.replace(initializer_range=0.5), 3, rngs=nnx.Rngs(0))
    # Narrow students (with a projection) where the recipe allows it.
    hidden = 16 if (distilbert and distilbert.cosine) or recipe == "baseline" else 8
    student = BertClassifier(distill.student_config(TEACHER, layers=2, hidden=hidden), 3,
                             rngs=nnx.Rngs(1), mlm_head=mlm)
    module = distill.DistillStudent(student, TEACHER.hidden_size, rngs=nnx.Rngs(2))
    assert (module.projection is not None) == (hidden != 16)
    teacher_before = jax.device_get(nnx.state(teacher, nnx.Param))

    mesh = sharding.make_mesh(8)
    optim_config = config.optim.copy_and_resolve_references()
    with optim_config.unlocked():
        optim_config.lr, optim_config.warmup_ratio = 1e-2, 0.0
    state = sharding.replicate(
        train.TrainState.create(module, optim.make_optimizer(optim_config, 40)), mesh)
    assert count_params(state.params) == count_params(nnx.state(module, nnx.Param))
    teachers = sharding.replicate(distill.Teachers.create([teacher]), mesh)
    chex.clear_trace_counter()
    step = distill.make_distill_step(mesh, spec, chex.assert_max_traces(distill.distill_step, n=1))
    key = sharding.replicate(jax.random.key(0), mesh)
    batch = sharding.shard_batch(_batch(0), mesh)
    losses_seen = []
    for _ in range(40):
        state, metrics = step(state, teachers, batch, key)
        losses_seen.append(float(metrics["loss_sum"] / metrics["count"]))
    assert np.isfinite(losses_seen).all()
    floor = 0.0
    kd = spec.method(KD)
    if kd and kd.soft_ce:  # Soft cross-entropy cannot go below the teacher's entropy.
        b = _batch(0)
        probs = np.asarray(jax.nn.softmax(teacher(b["input_ids"], b["attention_mask"],
                                                  b["token_type_ids"]).logits), np.float64)
        entropy = -(probs * np.log(probs)).sum(-1)
        floor = kd.soft_ce * float((entropy * b["weights"]).sum() / b["weights"].sum())
    excess = np.asarray(losses_seen) - floor
    assert np.mean(excess[-5:]) < 0.9 * np.mean(excess[:5]), losses_seen
    chex.assert_trees_all_equal(jax.device_get(nnx.state(teacher, nnx.Param)), teacher_before)
    chex.assert_trees_all_equal(jax.device_get(teachers.params[0]), teacher_before)


def test_teacher_forward_returns_only_what_is_asked_and_stacks_teachers():
    teachers = distill.Teachers.create([BertClassifier(TEACHER, 3, rngs=nnx.Rngs(i))
                                        for i in range(2)])
    out = distill.teacher_forward(teachers, _batch(0), distill.Needs(teacher_logits=True))
    assert set(out) == {"logits"} and out["logits"].shape == (2, 16, 3)
    out = distill.teacher_forward(teachers, _batch(0), distill.Needs(
        teacher_hidden=(0, 4), teacher_attention=True))
    assert set(out) == {"hidden_states", "attention_scores", "attention_probs"}
    assert len(out["hidden_states"]) == 5
    out = distill.teacher_forward(teachers, _batch(0), distill.Needs(teacher_qkv=True))
    assert set(out) == {"queries", "keys", "values"} and len(out["values"]) == 4
    assert out["values"][0].shape == (16, 12, TEACHER.hidden_size)


def test_width_and_head_mismatches_are_refused():
    narrow = distill.student_config(TEACHER, layers=2, hidden=8)
    with pytest.raises(distill.DistillError, match="projection is off"):
        distill.loss_spec(hidden=1.0).check(narrow, TEACHER, projection=False)
    with pytest.raises(distill.DistillError, match="cosine"):
        distill.loss_spec(cosine=1.0).check(narrow, TEACHER, projection=True)
    two_heads = distill.student_config(TEACHER, layers=2, heads=2)
    with pytest.raises(distill.DistillError, match="head counts"):
        distill.loss_spec(attention=1.0).check(two_heads, TEACHER, projection=True)
    # A narrow student with the projection on is fine for the projected terms.
    distill.loss_spec(hidden=1.0, pkd=1.0).check(narrow, TEACHER, projection=True)


def test_mlm_term_without_a_teacher_mlm_head_says_what_to_do():
    config = config_lib.load_config(str(REPO_ROOT / "configs" / "distilbert.py"))
    with config.unlocked():
        config.student.mlm_head_init = "teacher"
    teacher = BertClassifier(TEACHER, 3, rngs=nnx.Rngs(0))
    with pytest.raises(distill.DistillError, match="no MLM head.*mlm_head_init=random.*mlm=0"):
        distill.build_student(config, teacher, 3, mlm_head=True)


# ------------------------------------------------------------------------------------------------
# End to end on the toy task


def _toy_distill_config(tmp_path, tiny_hf_dir, recipe, *overrides):
    train_file, dev_file = write_toy_task(tmp_path / "data")
    config = config_lib.load_config(str(REPO_ROOT / "configs" / f"{recipe}.py"))
    return methods.validate(config_lib.apply_overrides(config, [
        f"teacher.name={tiny_hf_dir}", "teacher.epochs=8", "teacher.optim.lr=1e-2",
        "data.task=toy", f"data.train_file={train_file}", f"data.dev_file={dev_file}",
        "data.max_length=16", "data.batch_size=16", "data.eval_batch_size=16",
        "optim.lr=1e-2", "train.log_every=2", "train.num_devices=2", *overrides]))


def test_distill_end_to_end_fine_tunes_the_teacher_then_saves_a_student(tmp_path, tiny_hf_dir):
    config = _toy_distill_config(tmp_path, tiny_hf_dir, "kd", "student.layers=1",
                                 "distill.epochs=8")
    result = distill.distill(config, tmp_path / "run", progress=False, measure_throughput=False)
    assert (tmp_path / "run" / "teacher-seed0" / "model" / "model.safetensors").is_file()
    assert result["teacher_accuracy"] > 0.8  # The toy task is learnable.
    assert result["accuracy"] > 0.7 and result["student_layers"] == 1
    # The exported student is a plain HF classifier that reproduces the reported accuracy.
    saved = train.evaluate_saved_model(tmp_path / "run" / "model", config_lib.apply_overrides(
        config_lib.load_config(str(REPO_ROOT / "configs" / "finetune.py")),
        ["data.task=toy", f"data.train_file={config.data.train_file}",
         f"data.dev_file={config.data.dev_file}", "data.max_length=16",
         "data.eval_batch_size=16", "train.num_devices=1"]))
    assert saved["accuracy"] == pytest.approx(result["accuracy"])
    model, report, _ = hf.load_pretrained(str(tmp_path / "run" / "model"))
    assert model.config.num_hidden_layers == 1 and not report.newly_initialized
    # Run again: teacher and stage are reused, nothing retrains, same answer.
    again = distill.distill(config, tmp_path / "run", progress=False, measure_throughput=False)
    assert again["accuracy"] == result["accuracy"]
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["accuracy"] == \
        result["accuracy"]


def test_tinybert_runs_its_three_stages_with_a_narrow_student(tmp_path, tiny_hf_dir):
    config = _toy_distill_config(tmp_path, tiny_hf_dir, "tinybert", "student.layers=1",
                                 "student.hidden=16", "student.heads=4", "student.init=random",
                                 "train.max_steps=3")
    result = distill.distill(config, tmp_path / "run", progress=False, measure_throughput=False)
    assert list(result["stages"]) == ["general", "intermediate", "prediction"]
    assert all(s["steps"] == 3 for s in result["stages"].values())
    logged = [json.loads(line)["split"] for line in
              (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"general", "intermediate", "prediction", "dev"} <= set(logged)



def test_kd_ensemble_fine_tunes_one_teacher_per_seed_and_reports_each(tmp_path, tiny_hf_dir):
    config = _toy_distill_config(tmp_path, tiny_hf_dir, "kd_ensemble", "teacher.seeds=(0,1)",
                                 "student.layers=1", "train.max_steps=4")
    result = distill.distill(config, tmp_path / "run", progress=False, measure_throughput=False)
    # Each member's accuracy, measured independently from its saved directory.
    eval_config = config_lib.apply_overrides(
        config_lib.load_config(str(REPO_ROOT / "configs" / "finetune.py")),
        ["data.task=toy", f"data.train_file={config.data.train_file}",
         f"data.dev_file={config.data.dev_file}", "data.max_length=16",
         "data.eval_batch_size=16", "train.num_devices=1"])
    each = [train.evaluate_saved_model(tmp_path / "run" / f"teacher-seed{seed}" / "model",
                                       eval_config)["accuracy"] for seed in (0, 1)]
    assert result["teacher_accuracies"] == pytest.approx(each)
    assert result["best_single_teacher_accuracy"] == pytest.approx(max(each))
