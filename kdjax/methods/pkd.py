"""Patient KD's intermediate term: the distance of L2-normalised [CLS] vectors on mapped
intermediate layers (the last layer is left to the soft loss), averaged over the pairs.

Reference: Sun et al. 2019, Patient Knowledge Distillation. PKD-Skip maps every k-th teacher
layer (`loss.layer_map=skip`), PKD-Last the last ones (`last`); the recipe (0.5 CE + 0.5 T^2 KL
+ beta L_PT, T = 5, beta = 100, student from the teacher's first layers) is `recipes.pkd`.
"""

from __future__ import annotations

import dataclasses

from kdjax import losses
from kdjax.engine.method import Method, Needs, TermInputs
from kdjax.methods.tinybert import check_projection


@dataclasses.dataclass(frozen=True)
class PatientKD(Method):
    pkd: float = 0.0  # Normalised [CLS] distance on mapped intermediate layers.

    TERMS = ("pkd",)

    def uses_layer_map(self) -> bool:
        return True

    def _pairs(self, spec):
        return spec.layer_pairs[:-1]  # Intermediate layers only.

    def needs(self, spec) -> Needs:
        return Needs(teacher_hidden=tuple(sorted({t for _, t in self._pairs(spec)})),
                     student_hidden=True)

    def check(self, spec, student, teacher, *, projection: bool) -> None:
        check_projection("pkd", spec, student, teacher, projection=projection)

    def terms(self, inputs: TermInputs) -> dict:
        pairs = self._pairs(inputs.spec)
        if not pairs:
            return {}
        s, t = inputs.student.hidden_states, inputs.teacher["hidden_states"]
        per_example = sum(losses.patient_loss(s[m][:, 0], t[g][:, 0], inputs.projection)
                          for m, g in pairs) / len(pairs)
        return {"pkd": (self.pkd * inputs.teacher_factor, per_example, inputs.rows)}


METHODS = (PatientKD,)
