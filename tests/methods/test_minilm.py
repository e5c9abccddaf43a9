"""MiniLM's relation losses against an independent numpy formula and torch's gradient, its
terms in the engine's loss, its refusals, and its jitted step on tiny random models."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from conftest import random_token_batch
from kdjax import distill, sharding, train
from kdjax.methods import minilm
from kdjax.models.bert import BertClassifier, BertConfig

TEACHER = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=32, max_position_embeddings=32, initializer_range=0.5)


def _numpy_relation_kl(xs, xt, mask, heads):
    """sum_k p_t log(p_t / p_s) over real keys, mean over heads and real queries, per example."""
    xs, xt = np.asarray(xs, np.float64), np.asarray(xt, np.float64)
    out = []
    for b in range(xs.shape[0]):
        real = np.flatnonzero(mask[b])
        total, count = 0.0, 0
        for h in range(heads):
            def probs(x):
                d = x.shape[-1] // heads
                xh = x[b, real, h * d:(h + 1) * d]
                s = xh @ xh.T / np.sqrt(d)
                e = np.exp(s - s.max(-1, keepdims=True))
                return e / e.sum(-1, keepdims=True)
            ps, pt = probs(xs), probs(xt)
            total += np.sum(pt * (np.log(pt) - np.log(ps)))
            count += len(real)
        out.append(total / max(count, 1))
    return np.array(out)


def _inputs(seed=0, widths=(8, 12)):
    rng = np.random.default_rng(seed)
    mask = np.array([[1] * 7 + [0] * 2, [1] * 9, [1] * 3 + [0] * 6], np.int32)
    xs = rng.normal(size=(3, 9, widths[0])).astype(np.float32)
    xt = rng.normal(size=(3, 9, widths[1])).astype(np.float32)
    # Padding must not matter: give the padded positions large values.
    xs[mask == 0], xt[mask == 0] = 50.0, -50.0
    return xs, xt, mask


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_relation_kl_matches_numpy_with_padding_and_different_widths(heads):
    xs, xt, mask = _inputs()
    got = minilm.relation_kl(jnp.asarray(xs), jnp.asarray(xt), jnp.asarray(mask), heads)
    np.testing.assert_allclose(np.asarray(got), _numpy_relation_kl(xs, xt, mask, heads),
                               rtol=1e-5, atol=1e-6)
    # Identical inputs give zero.
    same = minilm.relation_kl(jnp.asarray(xt), jnp.asarray(xt), jnp.asarray(mask), heads)
    np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-6)


def test_relation_kl_gradient_matches_torch_autograd():
    xs, xt, mask = _inputs(1)
    heads = 2
    weights = np.array([0.5, 1.0, 2.0], np.float32)

    def jax_loss(x):
        return jnp.sum(minilm.relation_kl(x, jnp.asarray(xt), jnp.asarray(mask), heads) * weights)

    grad = np.asarray(jax.grad(jax_loss)(jnp.asarray(xs)))

    x = torch.tensor(xs, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(xt, dtype=torch.float64)
    m = torch.tensor(mask, dtype=torch.bool)

    def log_rel(v):
        b, length, width = v.shape
        d = width // heads
        vh = v.reshape(b, length, heads, d).permute(0, 2, 1, 3)
        scores = vh @ vh.transpose(-1, -2) / d ** 0.5
        scores = scores.masked_fill(~m[:, None, None, :], float("-inf"))
        return torch.log_softmax(scores, -1)

    ls, lt = log_rel(x), log_rel(t)
    kl = torch.where(m[:, None, None, :], lt.exp() * (lt - ls), torch.zeros(()))
    per_query = kl.sum(-1)  # [B, h, L]
    per_example = (per_query * m[:, None, :]).sum((1, 2)) / (m.sum(-1) * heads)
    (per_example * torch.tensor(weights, dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(grad, x.grad.numpy(), rtol=1e-4, atol=1e-6)
    assert np.abs(grad[mask == 0]).max() == 0  # Padded positions get no gradient.


def _student(hidden=8, heads=4, layers=2):
    return BertClassifier(distill.student_config(TEACHER, layers=layers, hidden=hidden,
                                                 heads=heads), 3, rngs=nnx.Rngs(1))


def test_minilm_terms_are_the_last_layers_attention_kl_and_value_relation():
    teacher = BertClassifier(TEACHER, 3, rngs=nnx.Rngs(0))
    student = _student()
    batch = {k: jnp.asarray(v) for k, v in random_token_batch(0, 6, 10, vocab=64).items()}
    inputs = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    spec = distill.loss_spec(minilm_attention=1.0, minilm_value=2.0, student_layers=2,
                             teacher_layers=4)
    needs = spec.needs
    assert needs.teacher_attention and needs.teacher_qkv and not needs.teacher_hidden
    s_out = student(*inputs, output_attentions=True, output_qkv=True)
    t_out = distill.teacher_forward(distill.Teachers.create([teacher]), batch, needs)
    module = distill.DistillStudent(student, None, rngs=nnx.Rngs(2))
    loss, metrics = distill.combined_loss(spec, s_out, t_out, batch, jnp.asarray(0), module)
    rows = np.asarray(batch["weights"], bool)
    mask = np.asarray(batch["attention_mask"])
    value = _numpy_relation_kl(s_out.values[-1], t_out["values"][-1], mask, 4)[rows]
    np.testing.assert_allclose(float(metrics["minilm_value_sum"]), value.sum(), rtol=1e-5)
    # The attention term: KL of the stored probabilities, by hand.
    ps = np.asarray(s_out.attention_probs[-1], np.float64)
    pt = np.asarray(t_out["attention_probs"][-1], np.float64)
    real = mask.astype(bool)
    kl = np.where(real[:, None, None, :], pt * (np.log(np.maximum(pt, 1e-30))
                                                - np.log(np.maximum(ps, 1e-30))), 0).sum(-1)
    attention = ((kl * real[:, None, :]).sum((1, 2)) / (real.sum(-1) * 4))[rows]
    np.testing.assert_allclose(float(metrics["minilm_attention_sum"]), attention.sum(),
                               rtol=1e-4)
    count = rows.sum()
    np.testing.assert_allclose(float(loss), attention.sum() / count + 2 * value.sum() / count,
                               rtol=1e-4)


def test_minilm_refuses_unequal_head_counts_and_a_missing_teacher_layer():
    spec = distill.loss_spec(minilm_attention=1.0, minilm_value=1.0, teacher_layers=4)
    two_heads = distill.student_config(TEACHER, layers=2, heads=2)
    with pytest.raises(distill.DistillError, match="equal head counts.*minilm_v2"):
        spec.check(two_heads, TEACHER, projection=True)
    far = distill.loss_spec(minilm_value=1.0, minilm_teacher_layer=5, teacher_layers=4)
    with pytest.raises(distill.DistillError, match="minilm_teacher_layer = 5"):
        far.check(distill.student_config(TEACHER, layers=2), TEACHER, projection=True)


def test_minilm_step_traces_once_and_learns_the_relations():
    teacher = BertClassifier(TEACHER, 3, rngs=nnx.Rngs(0))
    module = distill.DistillStudent(_student(), None, rngs=nnx.Rngs(2))
    spec = distill.loss_spec(minilm_attention=1.0, minilm_value=1.0, student_layers=2,
                             teacher_layers=4, total_steps=30)
    mesh = sharding.make_mesh(2)
    state = sharding.replicate(train.TrainState.create(module, optax.adam(1e-2)), mesh)
    teachers = sharding.replicate(distill.Teachers.create([teacher]), mesh)
    chex.clear_trace_counter()
    step = distill.make_distill_step(mesh, spec, chex.assert_max_traces(distill.distill_step, n=1))
    key = sharding.replicate(jax.random.key(0), mesh)
    batch = sharding.shard_batch(random_token_batch(0, 16, 12, vocab=64), mesh)
    seen = []
    for _ in range(30):
        state, metrics = step(state, teachers, batch, key)
        seen.append(float(metrics["loss_sum"] / metrics["count"]))
    assert np.isfinite(seen).all() and np.mean(seen[-3:]) < 0.7 * np.mean(seen[:3]), seen
