"""The student step of every recipe's stages on tiny random models (one trace, the loss goes down,
the teacher is untouched), and the teacher forward of what the needs ask."""

import dataclasses

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from conftest import REPO_ROOT, random_token_batch
from kdjax import config as config_lib, distill, methods, optim, sharding, train
from kdjax.methods.distilbert import DistilBERT
from kdjax.methods.kd import KD
from kdjax.models.bert import BertClassifier, BertConfig, count_params

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
