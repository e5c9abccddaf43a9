"""TinyBERT's and Patient KD's layer terms against numpy: TinyBERT sums its hidden-state MSE
over the layer pairs (embeddings included for `embedding`), Patient KD averages the normalised
[CLS] distance over the intermediate pairs only (the last is left to the soft loss)."""

import jax.numpy as jnp
import numpy as np

from kdjax import distill
from kdjax.models.bert import BertOutput

PAIRS = ((1, 2), (2, 4), (3, 6))


def _hidden(seed, layers, width, batch=5, length=7):
    rng = np.random.default_rng(seed)
    return tuple(rng.normal(size=(batch, length, width)).astype(np.float32)
                 for _ in range(layers + 1))


def _batch():
    mask = np.ones((5, 7), np.int32)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    return {"attention_mask": jnp.asarray(mask), "weights": jnp.asarray([1, 1, 1, 1, 0.0]),
            "labels": jnp.asarray([0, 1, -1, 0, 1])}


def _loss(spec, student_hidden, teacher_hidden):
    out = BertOutput(last_hidden_state=jnp.asarray(student_hidden[-1]),
                     hidden_states=tuple(map(jnp.asarray, student_hidden)))
    teacher = {"hidden_states": tuple(map(jnp.asarray, teacher_hidden))}
    return distill.combined_loss(spec, out, teacher, _batch(), jnp.asarray(0))


def test_tinybert_hidden_and_embedding_terms_match_numpy():
    s, t = _hidden(0, 3, 8), _hidden(1, 6, 8)
    spec = distill.loss_spec(hidden=2.0, embedding=0.5, layer_pairs=PAIRS, student_layers=3,
                             teacher_layers=6)
    loss, metrics = _loss(spec, s, t)
    mask = np.asarray(_batch()["attention_mask"], bool)
    rows = np.asarray(_batch()["weights"], bool)

    def mse(a, b):  # Mean over width, then over each example's real tokens.
        per_token = ((a.astype(np.float64) - b) ** 2).mean(-1)
        return (per_token * mask).sum(-1) / mask.sum(-1)

    hidden = sum(mse(s[m], t[g]) for m, g in PAIRS)[rows].sum()
    embedding = mse(s[0], t[0])[rows].sum()
    np.testing.assert_allclose(float(metrics["hidden_sum"]), hidden, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["embedding_sum"]), embedding, rtol=1e-5)
    np.testing.assert_allclose(float(loss), (2.0 * hidden + 0.5 * embedding) / rows.sum(),
                               rtol=1e-5)


def test_patient_kd_averages_the_intermediate_pairs_only():
    s, t = _hidden(2, 3, 8), _hidden(3, 6, 8)
    spec = distill.loss_spec(pkd=100.0, layer_pairs=PAIRS, student_layers=3, teacher_layers=6)
    assert spec.needs.teacher_hidden == (2, 4)  # Not 6: the last pair is the soft loss's.
    loss, metrics = _loss(spec, s, t)
    rows = np.asarray(_batch()["weights"], bool)

    def normalised(v):
        v = v.astype(np.float64)
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    per_example = np.mean([((normalised(s[m][:, 0]) - normalised(t[g][:, 0])) ** 2).mean(-1)
                           for m, g in PAIRS[:-1]], axis=0)
    np.testing.assert_allclose(float(metrics["pkd_sum"]), per_example[rows].sum(), rtol=1e-5)
    np.testing.assert_allclose(float(loss), 100.0 * per_example[rows].mean(), rtol=1e-5)
