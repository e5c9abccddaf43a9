"""Every loss method's `needs()` is exactly what its terms read: terms computed from teacher
outputs holding only the declared parts equal those from the full outputs, and taking away any
declared teacher layer breaks them. The teacher forward, the student forward and the teacher
cache all trust this one declaration."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import random_token_batch
from kdjax import distill
from kdjax.models.bert import BertClassifier, BertConfig

TEACHER = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=32, max_position_embeddings=32, initializer_range=0.5)
EVERYTHING = distill.Needs(teacher_logits=True, teacher_hidden=tuple(range(5)),
                           teacher_attention=True, teacher_qkv=True)
CASES = {
    "kd": dict(ce=0.5, soft=0.5, temperature=2.0),
    "kd_hard_labels": dict(ce=1.0, hard_labels_from_teacher=True),
    "soft_ce": dict(soft_ce=1.0),
    "logit_mse": dict(logit_mse=1.0),
    "embedding": dict(embedding=1.0),
    "hidden": dict(hidden=1.0),
    "attention": dict(attention=1.0, attention_kl=1.0),
    "pkd": dict(pkd=1.0),
    "cosine": dict(cosine=1.0),
    "minilm": dict(minilm_attention=1.0, minilm_value=1.0),
    "minilm_v2": dict(minilm_v2=1.0, minilm_v2_heads=2, minilm_v2_teacher_layer=3),
}


def _only_declared(full: dict, needs: distill.Needs) -> dict:
    out = {}
    if needs.teacher_logits:
        out["logits"] = full["logits"]
    if needs.teacher_hidden:
        out["hidden_states"] = tuple(h if i in needs.teacher_hidden else None
                                     for i, h in enumerate(full["hidden_states"]))
    if needs.teacher_attention:
        out.update(attention_scores=full["attention_scores"],
                   attention_probs=full["attention_probs"])
    if needs.teacher_qkv:
        out.update(queries=full["queries"], keys=full["keys"], values=full["values"])
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_terms_read_exactly_what_needs_declares(case):
    spec = distill.loss_spec(**CASES[case], student_layers=2, teacher_layers=4,
                             teacher_heads=4, layer_pairs=((1, 2), (2, 4)))
    needs = spec.needs
    teacher = BertClassifier(TEACHER, 3, rngs=nnx.Rngs(0))
    student = BertClassifier(distill.student_config(TEACHER, layers=2), 3, rngs=nnx.Rngs(1))
    batch = {k: jnp.asarray(v) for k, v in random_token_batch(0, 8, 10, vocab=64).items()}
    full = distill.teacher_forward(distill.Teachers.create([teacher]), batch, EVERYTHING)
    # The student runs exactly as the step runs it: with what the needs ask of it.
    out = student(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                  output_hidden_states=needs.student_hidden,
                  output_attentions=needs.student_attention, output_qkv=needs.student_qkv)
    module = distill.DistillStudent(student, None, rngs=nnx.Rngs(2))
    step = jnp.asarray(0)
    want, want_metrics = distill.combined_loss(spec, out, full, batch, step, module)
    got, got_metrics = distill.combined_loss(spec, out, _only_declared(full, needs), batch,
                                             step, module)
    assert float(want) > 0
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert set(got_metrics) == set(want_metrics)
    for layer in needs.teacher_hidden:  # Nothing declared is superfluous.
        fewer = dataclasses.replace(needs, teacher_hidden=tuple(
            i for i in needs.teacher_hidden if i != layer))
        with pytest.raises((TypeError, KeyError, AttributeError)):
            distill.combined_loss(spec, out, _only_declared(full, fewer), batch, step, module)
