"""Tests for kdjax.losses: every public loss, evaluated under `jax.jit`, against an independent
reference — hand-computed values for tiny inputs, float64 NumPy formulas, or PyTorch
(`F.kl_div`, `F.cross_entropy`, `F.cosine_similarity`, `F.normalize` + `F.mse_loss` as in the
Patient-KD code, TinyBERT's zero-then-MSE attention loss). Gradients of `soft_kl` and
`patient_loss` are checked against torch autograd and, for `soft_kl`, the closed form
T * (q - p) / B. Also: padding invariance of the token-level losses and the error paths.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdjax import losses

RTOL, ATOL = 1e-5, 1e-6


def _rng(seed=0):
    return np.random.default_rng(seed)


def _randn(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _softmax64(x, axis=-1):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _log_softmax64(x, axis=-1):
    x = np.asarray(x, np.float64)
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def _mask(lengths, max_len):
    return np.arange(max_len)[None, :] < np.asarray(lengths)[:, None]


def _close(got, want, rtol=RTOL, atol=ATOL):
    got = np.asarray(got)
    assert got.dtype == np.float32, got.dtype
    np.testing.assert_allclose(got, np.asarray(want, np.float64), rtol=rtol, atol=atol)


def _t(x):
    return torch.tensor(np.asarray(x))


# --------------------------------------------------------------------------------- soft_targets

def test_soft_targets_single_teacher_by_hand():
    # softmax([0, 2 ln 3] / 2) = softmax([0, ln 3]) = [1/4, 3/4].
    logits = np.array([[0.0, 2 * math.log(3.0)]], np.float32)
    got = jax.jit(losses.soft_targets)(logits, 2.0)
    _close(got, [[0.25, 0.75]])


def test_soft_targets_multi_teacher_averages_probabilities_by_hand():
    # Example 0: teacher A [0, ln 3] -> [1/4, 3/4], B [ln 3, 0] -> [3/4, 1/4]; mean [1/2, 1/2].
    # Example 1: A [0, 0] -> [1/2, 1/2], B [0, ln 3] -> [1/4, 3/4]; mean [3/8, 5/8] (averaging
    # the logits instead would give softmax([0, ln 3 / 2]) = [0.366, 0.634]).
    ln3 = math.log(3.0)
    logits = np.array([[[0.0, ln3], [0.0, 0.0]],
                       [[ln3, 0.0], [0.0, ln3]]], np.float32)  # [K=2, B=2, C=2]
    got = jax.jit(losses.soft_targets)(logits, 1.0)
    assert got.shape == (2, 2)
    _close(got, [[0.5, 0.5], [3 / 8, 5 / 8]])


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_soft_targets_single_teacher_matches_torch_softmax(temperature):
    logits = _randn(_rng(1), 4, 7, scale=3.0)
    got = jax.jit(losses.soft_targets)(logits, temperature)
    want = F.softmax(_t(logits).double() / temperature, dim=-1).numpy()
    _close(got, want)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_soft_targets_multi_teacher_matches_mean_of_torch_softmaxes(temperature):
    logits = _randn(_rng(2), 3, 4, 6, scale=3.0)  # K=3 teachers
    got = jax.jit(losses.soft_targets)(logits, temperature)
    want = F.softmax(_t(logits).double() / temperature, dim=-1).mean(dim=0).numpy()
    _close(got, want)
    _close(jnp.sum(got, -1), np.ones(4))


# ------------------------------------------------------------------------------------- soft_kl

def test_soft_kl_by_hand():
    # p = [1/2, 1/2], q = softmax([0, 2 ln 3] / 2) = [1/4, 3/4]:
    # KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3); times T^2 = 4 -> 2 ln(4/3).
    z_s = np.array([[0.0, 2 * math.log(3.0)]], np.float32)
    p = np.array([[0.5, 0.5]], np.float32)
    _close(jax.jit(losses.soft_kl, static_argnames="scale_by_t2")(z_s, p, 2.0),
           [2 * math.log(4 / 3)])
    _close(jax.jit(losses.soft_kl, static_argnames="scale_by_t2")(z_s, p, 2.0, scale_by_t2=False),
           [0.5 * math.log(4 / 3)])


@pytest.mark.parametrize("scale_by_t2", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 10.0])
def test_soft_kl_matches_torch_kl_div(temperature, scale_by_t2):
    rng = _rng(3)
    z_s, z_t = _randn(rng, 5, 7, scale=3.0), _randn(rng, 5, 7, scale=3.0)
    p = _softmax64(z_t / temperature).astype(np.float32)
    fn = jax.jit(lambda s, q, t: losses.soft_kl(s, q, t, scale_by_t2=scale_by_t2))
    got = fn(z_s, p, temperature)  # temperature traced
    log_q = F.log_softmax(_t(z_s).double() / temperature, dim=-1)
    want = F.kl_div(log_q, _t(p).double(), reduction="none").sum(-1)
    if scale_by_t2:
        want = want * temperature**2
    assert got.shape == (5,)
    _close(got, want.numpy(), atol=1e-5)


def test_soft_kl_is_zero_when_student_matches_teacher():
    z = _randn(_rng(4), 3, 5)
    p = jax.jit(losses.soft_targets)(z, 3.0)
    _close(jax.jit(losses.soft_kl)(z, p, 3.0), np.zeros(3), atol=1e-5)


@pytest.mark.parametrize("scale_by_t2", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_soft_kl_gradient_matches_closed_form_and_torch(temperature, scale_by_t2):
    rng = _rng(5)
    batch = 6
    z_s, z_t = _randn(rng, batch, 5, scale=2.0), _randn(rng, batch, 5, scale=2.0)
    p = _softmax64(z_t / temperature).astype(np.float32)

    grad = jax.jit(jax.grad(
        lambda s: jnp.mean(losses.soft_kl(s, p, temperature, scale_by_t2=scale_by_t2))))(z_s)

    # Closed form: d/dz_s of T^2 KL(p || softmax(z_s/T)) is T (q - p); without T^2 it is
    # (q - p) / T; the batch mean divides by B.
    q = _softmax64(z_s / temperature)
    factor = temperature if scale_by_t2 else 1.0 / temperature
    _close(grad, factor * (q - p) / batch, rtol=1e-5, atol=1e-7)

    zt = _t(z_s).double().requires_grad_(True)
    loss = F.kl_div(F.log_softmax(zt / temperature, -1), _t(p).double(), reduction="batchmean")
    if scale_by_t2:
        loss = loss * temperature**2
    loss.backward()
    _close(grad, zt.grad.numpy(), rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------------- soft_cross_entropy

def test_soft_cross_entropy_by_hand():
    # -(1/2 ln 1/4 + 1/2 ln 3/4) = ln 4 - 1/2 ln 3; default temperature is 1.
    z_s = np.array([[0.0, math.log(3.0)]], np.float32)
    p = np.array([[0.5, 0.5]], np.float32)
    _close(jax.jit(losses.soft_cross_entropy)(z_s, p), [math.log(4) - 0.5 * math.log(3)])


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_soft_cross_entropy_matches_torch_without_t2(temperature):
    rng = _rng(6)
    z_s, z_t = _randn(rng, 4, 6, scale=2.0), _randn(rng, 4, 6, scale=2.0)
    p = _softmax64(z_t / temperature).astype(np.float32)
    got = jax.jit(losses.soft_cross_entropy)(z_s, p, temperature)
    want = -(_t(p).double() * F.log_softmax(_t(z_s).double() / temperature, -1)).sum(-1)
    _close(got, want.numpy())
    # torch's cross_entropy with probability targets is the same quantity.
    _close(got, F.cross_entropy(_t(z_s).double() / temperature, _t(p).double(),
                                reduction="none").numpy())


# -------------------------------------------------------------------------- hard_cross_entropy

def test_hard_cross_entropy_by_hand_and_ignored_label():
    # softmax([0, ln 3]) = [1/4, 3/4]: label 1 -> ln(4/3), label 0 -> ln 4, label -1 -> 0.
    logits = np.array([[0.0, math.log(3.0)]] * 3, np.float32)
    labels = np.array([1, 0, -1], np.int32)
    _close(jax.jit(losses.hard_cross_entropy)(logits, labels),
           [math.log(4 / 3), math.log(4.0), 0.0])


def test_hard_cross_entropy_matches_torch_with_ignore_index():
    rng = _rng(7)
    logits = _randn(rng, 8, 5, scale=3.0)
    labels = rng.integers(0, 5, size=8).astype(np.int32)
    labels[[2, 5]] = -1
    got = jax.jit(losses.hard_cross_entropy)(logits, labels)
    want = F.cross_entropy(_t(logits).double(), _t(labels).long(), ignore_index=-1,
                           reduction="none")
    _close(got, want.numpy())
    assert np.all(np.asarray(got)[[2, 5]] == 0.0)


def test_hard_cross_entropy_gradient_is_zero_for_ignored_examples():
    logits = _randn(_rng(8), 3, 4)
    labels = np.array([2, -1, 0], np.int32)
    grad = jax.jit(jax.grad(lambda z: jnp.sum(losses.hard_cross_entropy(z, labels))))(logits)
    assert np.all(np.asarray(grad)[1] == 0.0)
    assert np.all(np.isfinite(grad))


# ----------------------------------------------------------------------------------- logit_mse

def test_logit_mse_by_hand():
    # ((1-1)^2 + (2-0)^2 + (3-0)^2) / 3 = 13/3; no temperature.
    z_s = np.array([[1.0, 2.0, 3.0]], np.float32)
    z_t = np.array([[1.0, 0.0, 0.0]], np.float32)
    _close(jax.jit(losses.logit_mse)(z_s, z_t), [13 / 3])


def test_logit_mse_matches_torch_mse_loss():
    rng = _rng(9)
    z_s, z_t = _randn(rng, 4, 6, scale=2.0), _randn(rng, 4, 6, scale=2.0)
    want = F.mse_loss(_t(z_s).double(), _t(z_t).double(), reduction="none").mean(-1)
    _close(jax.jit(losses.logit_mse)(z_s, z_t), want.numpy())


# ---------------------------------------------------------------------------------- hidden_mse

def _hidden_mse_reference(h_s, h_t, mask):
    per_token = ((np.float64(h_s) - np.float64(h_t)) ** 2).mean(-1)  # [B, L]
    if mask is None:
        return per_token.mean(-1)
    n = mask.sum(-1)
    return np.where(n > 0, (per_token * mask).sum(-1) / np.maximum(n, 1), 0.0)


def test_hidden_mse_by_hand():
    # Token 0: mean((1, 3)^2) = 5; token 1: mean((2, 0)^2) = 2; token 2 is padding.
    h_s = np.array([[[1.0, 3.0], [2.0, 0.0], [100.0, 100.0]]], np.float32)
    h_t = np.zeros_like(h_s)
    mask = np.array([[True, True, False]])
    _close(jax.jit(losses.hidden_mse)(h_s, h_t, mask), [3.5])
    _close(jax.jit(losses.hidden_mse)(h_s, h_t), [(5 + 2 + 10000) / 3])


def test_hidden_mse_with_mask_matches_numpy():
    rng = _rng(10)
    h_s, h_t = _randn(rng, 4, 6, 8), _randn(rng, 4, 6, 8)
    mask = _mask([6, 3, 1, 0], 6)  # last example has no real token -> 0
    got = jax.jit(losses.hidden_mse)(h_s, h_t, mask)
    _close(got, _hidden_mse_reference(h_s, h_t, mask))
    assert float(got[3]) == 0.0
    _close(jax.jit(losses.hidden_mse)(h_s, h_t), _hidden_mse_reference(h_s, h_t, None))


def test_hidden_mse_with_projection_matches_torch_linear():
    rng = _rng(11)
    h_s, h_t = _randn(rng, 3, 5, 4), _randn(rng, 3, 5, 8)
    w, b = _randn(rng, 4, 8, scale=0.5), _randn(rng, 8)
    mask = _mask([5, 2, 4], 5)
    fn = jax.jit(lambda s, t, m: losses.hidden_mse(s, t, m, projection=lambda x: x @ w + b))
    projected = F.linear(_t(h_s).double(), _t(w).double().T, _t(b).double()).numpy()
    _close(fn(h_s, h_t, mask), _hidden_mse_reference(projected, h_t, mask))


def test_hidden_mse_width_mismatch_raises():
    rng = _rng(12)
    h_s, h_t = _randn(rng, 2, 3, 4), _randn(rng, 2, 3, 8)
    with pytest.raises(ValueError, match="projection"):
        jax.jit(losses.hidden_mse)(h_s, h_t)
    with pytest.raises(ValueError, match="width"):  # a projection to the wrong width
        jax.jit(lambda s, t: losses.hidden_mse(s, t, projection=lambda x: x[..., :2]))(h_s, h_t)


# --------------------------------------------------------------------------------- cosine_loss

def test_cosine_loss_by_hand():
    # Token 0: parallel -> 0; token 1: orthogonal -> 1; token 2: opposite -> 2 (padding).
    h_s = np.array([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]], np.float32)
    h_t = np.array([[[3.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]], np.float32)
    _close(jax.jit(losses.cosine_loss)(h_s, h_t, np.array([[1, 1, 0]])), [0.5])
    _close(jax.jit(losses.cosine_loss)(h_s, h_t), [1.0])


def test_cosine_loss_matches_torch_cosine_similarity():
    rng = _rng(13)
    h_s, h_t = _randn(rng, 4, 6, 8), _randn(rng, 4, 6, 8)
    mask = _mask([6, 4, 1, 0], 6)
    got = jax.jit(losses.cosine_loss)(h_s, h_t, mask)
    per_token = 1 - F.cosine_similarity(_t(h_s).double(), _t(h_t).double(), dim=-1,
                                        eps=1e-8).numpy()
    n = mask.sum(-1)
    want = np.where(n > 0, (per_token * mask).sum(-1) / np.maximum(n, 1), 0.0)
    _close(got, want)
    _close(jax.jit(losses.cosine_loss)(h_s, h_t), per_token.mean(-1))


def test_cosine_loss_width_mismatch_raises():
    rng = _rng(14)
    with pytest.raises(ValueError, match="width"):
        jax.jit(losses.cosine_loss)(_randn(rng, 2, 3, 4), _randn(rng, 2, 3, 5))


# ------------------------------------------------------------------------- attention_score_mse

def _attention_mse_reference(s, t, mask):
    """Loop over examples: squared error over real (query, key) pairs and heads, averaged."""
    out = []
    for b in range(s.shape[0]):
        real = np.flatnonzero(mask[b])
        if real.size == 0:
            out.append(0.0)
            continue
        diff = np.float64(s[b])[:, real][:, :, real] - np.float64(t[b])[:, real][:, :, real]
        out.append(float(np.mean(diff**2)))
    return np.array(out)


def test_attention_score_mse_by_hand():
    # One head, L = 3, tokens 0 and 1 real: pairs (0,0)=1, (0,1)=2, (1,0)=3, (1,1)=4 differences;
    # (1 + 4 + 9 + 16) / 4 = 7.5. The padded row and column hold huge differences.
    s = np.array([[[[1.0, 2.0, 50.0], [3.0, 4.0, 60.0], [70.0, 80.0, 90.0]]]], np.float32)
    t = np.zeros_like(s)
    _close(jax.jit(losses.attention_score_mse)(s, t, np.array([[1, 1, 0]])), [7.5])


def test_attention_score_mse_matches_numpy_and_excludes_padded_queries_and_keys():
    rng = _rng(15)
    s, t = _randn(rng, 3, 4, 6, 6, scale=2.0), _randn(rng, 3, 4, 6, 6, scale=2.0)
    mask = _mask([6, 4, 2], 6).astype(np.int32)
    fn = jax.jit(losses.attention_score_mse)
    got = fn(s, t, mask)
    _close(got, _attention_mse_reference(s, t, mask))

    # Garbage in padded key columns only, then in padded query rows only: no change.
    pad = ~mask.astype(bool)
    s_keys = np.where(pad[:, None, None, :], np.float32(1e4), s)
    s_queries = np.where(pad[:, None, :, None], np.float32(-1e4), s)
    _close(fn(s_keys, t, mask), np.asarray(got))
    _close(fn(s_queries, t, mask), np.asarray(got))
    # ...and garbage at a real pair does change it (the mask is not excluding everything).
    s_real = s.copy()
    s_real[1, 2, 3, 0] += 10.0
    assert not np.allclose(fn(s_real, t, mask), got)


def test_attention_score_mse_matches_tinybert_zero_then_mse_rescaled():
    # TinyBERT zeroes masked entries in both tensors and takes F.mse_loss over all h*L*L
    # entries; kdjax averages over the real pairs instead: ours = theirs * h*L*L / (h * n^2).
    rng = _rng(16)
    heads, length = 2, 5
    s, t = _randn(rng, 2, heads, length, length), _randn(rng, 2, heads, length, length)
    mask = _mask([5, 3], length)
    got = jax.jit(losses.attention_score_mse)(s, t, mask)
    pair = torch.tensor(mask[:, None, :, None] & mask[:, None, None, :])
    zero = torch.zeros((), dtype=torch.float64)
    for b, n in enumerate(mask.sum(-1)):
        theirs = F.mse_loss(torch.where(pair[b], _t(s[b]).double(), zero),
                            torch.where(pair[b], _t(t[b]).double(), zero))
        _close(got[b], float(theirs) * length * length / n**2)


def test_attention_score_mse_unchanged_by_extra_padding():
    rng = _rng(17)
    heads, length, extra = 3, 5, 4
    s, t = _randn(rng, 2, heads, length, length), _randn(rng, 2, heads, length, length)
    mask = _mask([5, 3], length)
    fn = jax.jit(losses.attention_score_mse)
    base = np.asarray(fn(s, t, mask))

    big = length + extra
    s_pad, t_pad = _randn(rng, 2, heads, big, big, scale=5.0), _randn(rng, 2, heads, big, big)
    s_pad[..., :length, :length], t_pad[..., :length, :length] = s, t
    mask_pad = np.concatenate([mask, np.zeros((2, extra), bool)], axis=1)
    _close(fn(s_pad, t_pad, mask_pad), base)
    _close(base, _attention_mse_reference(s, t, mask))


def test_attention_score_mse_no_real_token_gives_zero():
    rng = _rng(18)
    s, t = _randn(rng, 1, 2, 3, 3), _randn(rng, 1, 2, 3, 3)
    _close(jax.jit(losses.attention_score_mse)(s, t, np.zeros((1, 3), np.int32)), [0.0])


def test_attention_score_mse_head_mismatch_raises():
    rng = _rng(19)
    with pytest.raises(ValueError, match="heads"):
        jax.jit(losses.attention_score_mse)(_randn(rng, 2, 4, 3, 3), _randn(rng, 2, 2, 3, 3),
                                            np.ones((2, 3), np.int32))


# -------------------------------------------------------------------------------- attention_kl

def _attention_probs(rng, batch, heads, length, mask, scale=2.0):
    """Row-wise softmax over real keys; padded keys get probability exactly 0."""
    scores = _randn(rng, batch, heads, length, length, scale=scale)
    scores = np.where(mask[:, None, None, :], scores, -np.inf)
    return _softmax64(scores).astype(np.float32)


def _attention_kl_reference(a_s, a_t, mask):
    out = []
    for b in range(a_s.shape[0]):
        real = np.flatnonzero(mask[b])
        if real.size == 0:
            out.append(0.0)
            continue
        p = np.float64(a_t[b])[:, real][:, :, real]
        q = np.float64(a_s[b])[:, real][:, :, real]
        terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(q)), 0.0)
        out.append(float(terms.sum(-1).mean()))  # sum over keys, mean over heads and queries
    return np.array(out)


def test_attention_kl_by_hand():
    # L = 3, tokens 0 and 1 real, one head.
    # query 0: p = [1/2, 1/2], q = [1/4, 3/4] -> 1/2 ln(4/3); query 1: p = [1, 0], q = [1/2, 1/2]
    # -> ln 2 (the teacher's zero contributes 0). Mean over the 2 real queries.
    a_t = np.array([[[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]]], np.float32)
    a_s = np.array([[[[0.25, 0.75, 0.0], [0.5, 0.5, 0.0], [0.9, 0.05, 0.05]]]], np.float32)
    got = jax.jit(losses.attention_kl)(a_s, a_t, np.array([[1, 1, 0]]))
    _close(got, [(0.5 * math.log(4 / 3) + math.log(2.0)) / 2])


def test_attention_kl_matches_numpy_and_torch_kl_div():
    rng = _rng(20)
    batch, heads, length = 3, 2, 6
    mask = _mask([6, 4, 1], length)
    a_s = _attention_probs(rng, batch, heads, length, mask)
    a_t = _attention_probs(rng, batch, heads, length, mask)
    got = jax.jit(losses.attention_kl)(a_s, a_t, mask.astype(np.int32))
    _close(got, _attention_kl_reference(a_s, a_t, mask), atol=1e-5)

    # Same thing via torch.kl_div on the real block of each example.
    for b, n in enumerate(mask.sum(-1)):
        kl = F.kl_div(torch.log(_t(a_s[b, :, :n, :n]).double()), _t(a_t[b, :, :n, :n]).double(),
                      reduction="none").sum(-1).mean()
        _close(got[b], float(kl), atol=1e-5)


def test_attention_kl_unchanged_by_extra_padding_and_finite():
    rng = _rng(21)
    batch, heads, length, extra = 2, 2, 4, 3
    mask = _mask([4, 2], length)
    a_s = _attention_probs(rng, batch, heads, length, mask)
    a_t = _attention_probs(rng, batch, heads, length, mask)
    fn = jax.jit(losses.attention_kl)
    base = np.asarray(fn(a_s, a_t, mask))

    big = length + extra
    mask_pad = np.concatenate([mask, np.zeros((batch, extra), bool)], axis=1)
    # Padded query rows are arbitrary distributions; padded key columns are 0 in real rows.
    s_pad = _attention_probs(rng, batch, heads, big, np.ones((batch, big), bool))
    t_pad = _attention_probs(rng, batch, heads, big, np.ones((batch, big), bool))
    s_pad[:, :, :length, :] = 0.0
    t_pad[:, :, :length, :] = 0.0
    s_pad[:, :, :length, :length], t_pad[:, :, :length, :length] = a_s, a_t
    got = fn(s_pad, t_pad, mask_pad)
    assert np.all(np.isfinite(got))
    _close(got, base)


def test_attention_kl_head_mismatch_raises():
    rng = _rng(22)
    mask = np.ones((1, 3), bool)
    with pytest.raises(ValueError, match="heads"):
        jax.jit(losses.attention_kl)(_attention_probs(rng, 1, 2, 3, mask),
                                     _attention_probs(rng, 1, 3, 3, mask), mask)


# -------------------------------------------------------------------------------- patient_loss

def _pkd_reference(h_s, h_t):
    """PKD's patience loss: F.mse_loss of F.normalize'd [CLS] vectors, per example."""
    return F.mse_loss(F.normalize(h_s, p=2, dim=-1), F.normalize(h_t, p=2, dim=-1),
                      reduction="none").mean(-1)


def test_patient_loss_by_hand():
    # [3, 4]/5 vs [1, 0]: ((0.6 - 1)^2 + 0.8^2) / 2 = (0.16 + 0.64) / 2 = 0.4.
    got = jax.jit(losses.patient_loss)(np.array([[3.0, 4.0]], np.float32),
                                       np.array([[2.0, 0.0]], np.float32))
    _close(got, [0.4])


def test_patient_loss_matches_pkd_torch_reference():
    rng = _rng(23)
    h_s, h_t = _randn(rng, 5, 8, scale=3.0), _randn(rng, 5, 8)
    got = jax.jit(losses.patient_loss)(h_s, h_t)
    _close(got, _pkd_reference(_t(h_s).double(), _t(h_t).double()).numpy())
    # PKD's batch loss F.mse_loss(..., reduction="mean") is the mean of the per-example values.
    whole = F.mse_loss(F.normalize(_t(h_s).double(), dim=-1), F.normalize(_t(h_t).double(), dim=-1))
    _close(jnp.mean(got), float(whole))


def test_patient_loss_with_projection_matches_torch():
    rng = _rng(24)
    h_s, h_t = _randn(rng, 4, 6), _randn(rng, 4, 10)
    w, b = _randn(rng, 6, 10, scale=0.5), _randn(rng, 10)
    fn = jax.jit(lambda s, t: losses.patient_loss(s, t, projection=lambda x: x @ w + b))
    projected = F.linear(_t(h_s).double(), _t(w).double().T, _t(b).double())
    _close(fn(h_s, h_t), _pkd_reference(projected, _t(h_t).double()).numpy())


@pytest.mark.parametrize("with_projection", [False, True])
def test_patient_loss_gradient_matches_torch_autograd(with_projection):
    rng = _rng(25)
    width_t = 7 if with_projection else 5
    h_s, h_t = _randn(rng, 4, 5, scale=2.0), _randn(rng, 4, width_t)
    w = _randn(rng, 5, width_t, scale=0.5)
    proj = (lambda x: x @ w) if with_projection else None

    grad = jax.jit(jax.grad(lambda s: jnp.mean(losses.patient_loss(s, h_t, projection=proj))))(h_s)

    hs = _t(h_s).double().requires_grad_(True)
    student = hs @ _t(w).double() if with_projection else hs
    F.mse_loss(F.normalize(student, dim=-1), F.normalize(_t(h_t).double(), dim=-1)).backward()
    _close(grad, hs.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_patient_loss_width_mismatch_raises():
    rng = _rng(26)
    h_s, h_t = _randn(rng, 2, 4), _randn(rng, 2, 6)
    with pytest.raises(ValueError, match="projection"):
        jax.jit(losses.patient_loss)(h_s, h_t)


# --------------------------------------------------------------------------- mlm_cross_entropy

def test_mlm_cross_entropy_by_hand():
    # Position 0 (masked): softmax([0, ln 3]) target 1 -> ln(4/3); position 1 (masked): target 0
    # -> ln 4; position 2 (not masked, huge logits) is ignored. Second example: nothing masked.
    ln3 = math.log(3.0)
    logits = np.array([[[0.0, ln3], [0.0, ln3], [-1e4, 1e4]],
                       [[0.0, ln3], [0.0, ln3], [0.0, ln3]]], np.float32)
    targets = np.array([[1, 0, 0], [1, 1, 1]], np.int32)
    where = np.array([[True, True, False], [False, False, False]])
    got = jax.jit(losses.mlm_cross_entropy)(logits, targets, where)
    _close(got, [(math.log(4 / 3) + math.log(4.0)) / 2, 0.0])


def test_mlm_cross_entropy_matches_torch_over_masked_positions_only():
    rng = _rng(27)
    batch, positions, vocab = 4, 6, 11
    logits = _randn(rng, batch, positions, vocab, scale=3.0)
    targets = rng.integers(0, vocab, size=(batch, positions)).astype(np.int32)
    where = rng.random((batch, positions)) < 0.5
    where[0, :] = False
    where[1, 0] = True
    fn = jax.jit(losses.mlm_cross_entropy)
    got = fn(logits, targets, where)

    want = []
    for b in range(batch):
        sel = np.flatnonzero(where[b])
        want.append(0.0 if sel.size == 0 else float(F.cross_entropy(
            _t(logits[b, sel]).double(), _t(targets[b, sel]).long())))
    _close(got, want)

    # Logits at unmasked positions do not matter.
    scrambled = np.where(where[..., None], logits, _randn(rng, batch, positions, vocab, scale=50))
    _close(fn(scrambled, targets, where), np.asarray(got))


# ------------------------------------------------------------------------------ float32 outputs

def test_bfloat16_inputs_give_float32_losses():
    rng = _rng(28)

    def bf(*shape):
        return jnp.asarray(_randn(rng, *shape), jnp.bfloat16)

    mask = _mask([3, 2], 3)
    probs = jax.nn.softmax(bf(2, 4).astype(jnp.float32))
    att = jnp.asarray(_attention_probs(rng, 2, 2, 3, mask), jnp.bfloat16)
    cases = [
        (losses.soft_targets, (bf(2, 4), 2.0)),
        (losses.soft_kl, (bf(2, 4), probs, 2.0)),
        (losses.soft_cross_entropy, (bf(2, 4), probs)),
        (losses.hard_cross_entropy, (bf(2, 4), jnp.array([1, -1]))),
        (losses.logit_mse, (bf(2, 4), bf(2, 4))),
        (losses.hidden_mse, (bf(2, 3, 4), bf(2, 3, 4), mask)),
        (losses.cosine_loss, (bf(2, 3, 4), bf(2, 3, 4), mask)),
        (losses.attention_score_mse, (bf(2, 2, 3, 3), bf(2, 2, 3, 3), mask)),
        (losses.attention_kl, (att, att, mask)),
        (losses.patient_loss, (bf(2, 4), bf(2, 4))),
        (losses.mlm_cross_entropy, (bf(2, 3, 5), jnp.zeros((2, 3), jnp.int32), mask)),
    ]
    for fn, args in cases:
        out = jax.jit(fn)(*args)
        assert out.dtype == jnp.float32, fn.__name__
        assert np.all(np.isfinite(out)), fn.__name__
