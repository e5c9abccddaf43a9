"""MiniLMv2's relation term against an independent numpy formula (student and teacher of
different widths and head counts), its defaults and its refusals."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import random_token_batch
from kdjax import distill
from kdjax.models.bert import BertClassifier, BertConfig
from test_minilm import _numpy_relation_kl

TEACHER = BertConfig(vocab_size=64, hidden_size=24, num_hidden_layers=4, num_attention_heads=6,
                     intermediate_size=32, max_position_embeddings=32, initializer_range=0.5)


@pytest.mark.parametrize("heads, teacher_layer", [(0, 0), (4, 2)])
def test_minilm_v2_term_is_the_sum_of_qq_kk_vv_relations(heads, teacher_layer):
    teacher = BertClassifier(TEACHER, 3, rngs=nnx.Rngs(0))
    # 16 wide with 2 attention heads: relation heads need not be attention heads.
    student = BertClassifier(distill.student_config(TEACHER, layers=2, hidden=16, heads=2), 3,
                             rngs=nnx.Rngs(1))
    spec = distill.loss_spec(minilm_v2=1.5, minilm_v2_heads=heads,
                             minilm_v2_teacher_layer=teacher_layer, student_layers=2,
                             teacher_layers=4, teacher_heads=6)
    assert spec.needs.teacher_qkv and spec.needs.student_qkv and not spec.needs.teacher_hidden
    if not heads:  # 0 = the teacher's 6 heads, which do not divide the student's 16.
        with pytest.raises(distill.DistillError, match="6 relation heads do not divide the "
                                                      "student width 16"):
            spec.check(student.config, TEACHER, projection=True)
        return
    spec.check(student.config, TEACHER, projection=True)
    batch = {k: jnp.asarray(v) for k, v in random_token_batch(1, 6, 10, vocab=64).items()}
    inputs = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    s_out = student(*inputs, output_qkv=True)
    t_out = distill.teacher_forward(distill.Teachers.create([teacher]), batch, spec.needs)
    loss, metrics = distill.combined_loss(spec, s_out, t_out, batch, jnp.asarray(0))
    mask, rows = np.asarray(batch["attention_mask"]), np.asarray(batch["weights"], bool)
    layer = teacher_layer - 1
    expected = sum(_numpy_relation_kl(getattr(s_out, name)[-1], t_out[name][layer], mask,
                                      heads)
                   for name in ("queries", "keys", "values"))[rows]
    np.testing.assert_allclose(float(metrics["minilm_v2_sum"]), expected.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(loss), 1.5 * expected.sum() / rows.sum(), rtol=1e-5)


def test_minilm_v2_default_heads_are_the_teachers_and_a_missing_layer_is_refused():
    same_width = distill.student_config(TEACHER, layers=2)
    distill.loss_spec(minilm_v2=1.0, teacher_layers=4).check(same_width, TEACHER,
                                                             projection=True)
    far = distill.loss_spec(minilm_v2=1.0, minilm_v2_teacher_layer=7, teacher_layers=4)
    with pytest.raises(distill.DistillError, match="minilm_v2_teacher_layer = 7"):
        far.check(same_width, TEACHER, projection=True)
