"""Hinton KD and the other terms on task logits: hard-label cross-entropy, Hinton's tempered
KL, TinyBERT's soft cross-entropy and the Distilled BiLSTM's logit MSE.

References: Hinton et al. 2015 (soft targets, T^2); Jiao et al. 2020 (TinyBERT's prediction
loss); Tang et al. 2019 (logit MSE). Formulas in shared/METHODS.md; losses in kdjax/losses.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kdjax import losses
from kdjax.engine.method import Method, Needs, TermInputs


@dataclasses.dataclass(frozen=True)
class KD(Method):
    """Terms on the task logits. The temperature is the stage's (`loss.temperature`, with its
    schedule); several teachers' tempered probabilities are averaged."""

    ce: float = 0.0  # Hard-label cross-entropy (labelled examples only).
    soft: float = 0.0  # Hinton: T^2 * KL(teacher || student) on task logits.
    soft_ce: float = 0.0  # TinyBERT prediction loss: soft cross-entropy, no T^2.
    logit_mse: float = 0.0  # Distilled BiLSTM: MSE on logits.
    hard_labels_from_teacher: bool = False  # CE on unlabelled examples uses the teacher argmax.

    TERMS = ("ce", "soft", "soft_ce", "logit_mse")

    def needs(self, spec) -> Needs:
        return Needs(teacher_logits=bool(self.soft or self.soft_ce or self.logit_mse
                                         or self.hard_labels_from_teacher))

    def terms(self, inputs: TermInputs) -> dict:
        student, teacher, rows = inputs.student, inputs.teacher, inputs.rows
        labels, temperature = inputs.batch["labels"], inputs.temperature
        factor = inputs.teacher_factor
        terms = {}
        if self.ce:
            hard = labels
            if self.hard_labels_from_teacher:
                teacher_pred = jnp.argmax(jnp.mean(jax.nn.softmax(teacher["logits"]), 0), -1)
                hard = jnp.where(labels >= 0, labels, teacher_pred)
            terms["ce"] = (self.ce, losses.hard_cross_entropy(student.logits, hard),
                           rows * (hard >= 0))
        if self.soft:
            targets = losses.soft_targets(teacher["logits"], temperature)
            terms["soft"] = (self.soft * factor,
                             losses.soft_kl(student.logits, targets, temperature), rows)
        if self.soft_ce:
            targets = losses.soft_targets(teacher["logits"], temperature)
            terms["soft_ce"] = (self.soft_ce * factor,
                                losses.soft_cross_entropy(student.logits, targets, temperature),
                                rows)
        if self.logit_mse:
            terms["logit_mse"] = (self.logit_mse * factor,
                                  losses.logit_mse(student.logits,
                                                   jnp.mean(teacher["logits"], 0)), rows)
        return terms


METHODS = (KD,)
