"""TinyBERT's intermediate-layer terms: MSE on embedding outputs and mapped hidden states
(through the student's learned projection when widths differ), MSE on mapped pre-softmax
attention scores, and the KL between mapped attention distributions.

Reference: Jiao et al. 2020, TinyBERT. Layer map m <-> g(m) (`loss.layer_map`, uniform by
default); hidden and attention terms are summed over the layer pairs, as in TinyBERT's code. The
recipe (general distillation, then task distillation) is configs/tinybert.py.
"""

from __future__ import annotations

import dataclasses

from kdjax import losses
from kdjax.engine.method import DistillError, Method, Needs, TermInputs


def check_projection(term: str, spec, student, teacher, *, projection: bool) -> None:
    """Refuses a term on hidden states of different widths without the learned projection."""
    if student.hidden_size != teacher.hidden_size and not projection:
        raise DistillError(f"student width {student.hidden_size} != teacher width "
                           f"{teacher.hidden_size} and student.projection is off; the {term} "
                           "term needs a projection")


def check_heads(term: str, student, teacher) -> None:
    """Refuses a term that compares attention maps head by head when head counts differ."""
    if student.num_attention_heads != teacher.num_attention_heads:
        raise DistillError(f"the {term} term compares attention maps head by head and needs "
                           f"equal head counts (student {student.num_attention_heads}, teacher "
                           f"{teacher.num_attention_heads})")


@dataclasses.dataclass(frozen=True)
class TinyBERT(Method):
    embedding: float = 0.0  # MSE on embedding outputs (projected when widths differ).
    hidden: float = 0.0  # MSE on mapped hidden states.
    attention: float = 0.0  # MSE on mapped pre-softmax attention scores.
    attention_kl: float = 0.0  # KL between mapped attention distributions.

    TERMS = ("embedding", "hidden", "attention", "attention_kl")

    def uses_layer_map(self) -> bool:
        return bool(self.hidden or self.attention or self.attention_kl)

    def needs(self, spec) -> Needs:
        teacher_hidden = set()
        if self.embedding:
            teacher_hidden.add(0)
        if self.hidden:
            teacher_hidden.update(t for _, t in spec.layer_pairs)
        attention = bool(self.attention or self.attention_kl)
        return Needs(teacher_hidden=tuple(sorted(teacher_hidden)), teacher_attention=attention,
                     student_hidden=bool(self.embedding or self.hidden),
                     student_attention=attention)

    def check(self, spec, student, teacher, *, projection: bool) -> None:
        for term in ("embedding", "hidden"):
            if getattr(self, term):
                check_projection(term, spec, student, teacher, projection=projection)
        for term in ("attention", "attention_kl"):
            if getattr(self, term):
                check_heads(term, student, teacher)

    def terms(self, inputs: TermInputs) -> dict:
        s, t, spec = inputs.student, inputs.teacher, inputs.spec
        mask, rows, factor, projection = (inputs.mask, inputs.rows, inputs.teacher_factor,
                                          inputs.projection)
        terms = {}
        if self.embedding:
            terms["embedding"] = (self.embedding * factor,
                                  losses.hidden_mse(s.hidden_states[0], t["hidden_states"][0],
                                                    mask, projection), rows)
        if self.hidden:
            per_example = sum(losses.hidden_mse(s.hidden_states[m], t["hidden_states"][g], mask,
                                                projection) for m, g in spec.layer_pairs)
            terms["hidden"] = (self.hidden * factor, per_example, rows)
        if self.attention:
            per_example = sum(losses.attention_score_mse(
                s.attention_scores[m - 1], t["attention_scores"][g - 1], mask)
                for m, g in spec.layer_pairs)
            terms["attention"] = (self.attention * factor, per_example, rows)
        if self.attention_kl:
            per_example = sum(losses.attention_kl(
                s.attention_probs[m - 1], t["attention_probs"][g - 1], mask)
                for m, g in spec.layer_pairs)
            terms["attention_kl"] = (self.attention_kl * factor, per_example, rows)
        return terms


METHODS = (TinyBERT,)
