"""MiniLMv2 (Wang et al. 2021): multi-head self-attention relation distillation.

The queries, keys and values of one teacher layer and of the student's last layer are each split
into `minilm_v2_heads` relation heads (any count that divides both widths, so student and teacher
may differ in width and head count), and the student learns the teacher's Q-Q, K-K and V-V
relations softmax(X_h X_h^T / sqrt(d_r)): KL(teacher || student) per relation head and query,
padded keys masked, summed over the three relations. The paper takes the teacher's upper-middle
layer for large teachers and the last for small ones (`minilm_v2_teacher_layer`, 0 = last).
"""

from __future__ import annotations

import dataclasses

from kdjax.engine.method import DistillError, Method, Needs, TermInputs
from kdjax.methods.minilm import chosen_layer, relation_kl

RELATIONS = ("queries", "keys", "values")


@dataclasses.dataclass(frozen=True)
class MiniLMv2(Method):
    minilm_v2: float = 0.0  # Q-Q + K-K + V-V relation KL, student last layer vs a teacher layer.
    minilm_v2_heads: int = 0  # Relation heads (0 = the teacher's attention heads).
    minilm_v2_teacher_layer: int = 0  # The teacher layer (1-based; 0 = the last).

    TERMS = ("minilm_v2",)
    RULES = (("minilm_v2_heads", lambda v: v >= 0, "must be >= 0 (0 = the teacher's heads)"),
             ("minilm_v2_teacher_layer", lambda v: v >= 0, "must be >= 0 (0 = the last layer)"))

    def needs(self, spec) -> Needs:
        return Needs(teacher_qkv=True, student_qkv=True)

    def check(self, spec, student, teacher, *, projection: bool) -> None:
        heads = self.minilm_v2_heads or teacher.num_attention_heads
        for name, width in (("student", student.hidden_size), ("teacher", teacher.hidden_size)):
            if width % heads:
                raise DistillError(f"loss.minilm_v2_heads: {heads} relation heads do not divide "
                                   f"the {name} width {width}; choose a common divisor of "
                                   f"{student.hidden_size} and {teacher.hidden_size}")
        chosen_layer(self.minilm_v2_teacher_layer, teacher.num_hidden_layers,
                     "loss.minilm_v2_teacher_layer")

    def terms(self, inputs: TermInputs) -> dict:
        spec, s, t = inputs.spec, inputs.student, inputs.teacher
        layer = chosen_layer(self.minilm_v2_teacher_layer, spec.teacher_layers,
                             "loss.minilm_v2_teacher_layer") - 1
        heads = self.minilm_v2_heads or spec.teacher_heads
        per_example = sum(relation_kl(getattr(s, name)[-1], t[name][layer], inputs.mask, heads)
                          for name in RELATIONS)
        return {"minilm_v2": (self.minilm_v2 * inputs.teacher_factor, per_example, inputs.rows)}


METHODS = (MiniLMv2,)
