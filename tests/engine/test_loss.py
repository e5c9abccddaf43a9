"""A stage's loss: schedules and temperature, and the methods' architecture refusals (the
combined loss itself is checked against hand-computed values in tests/methods/)."""


import jax.numpy as jnp
import pytest

from kdjax import distill
from kdjax.models.bert import BertConfig

TEACHER = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=32, max_position_embeddings=32)


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
