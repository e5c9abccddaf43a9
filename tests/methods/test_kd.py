"""Hinton KD's terms in the engine's combined loss against hand-computed numpy values: hard CE
over labelled rows only, T^2 KL against two teachers' averaged soft targets."""

import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import distill
from kdjax.models.bert import BertOutput


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
