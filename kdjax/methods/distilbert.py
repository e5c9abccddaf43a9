"""DistilBERT's terms: the cosine between last-layer hidden states and the masked-LM
cross-entropy on dynamically masked input (the student's MLM head is tied to its word
embeddings), beside the soft-target KL of `kdjax.methods.kd`.

Reference: Sanh et al. 2019, DistilBERT. The recipe (5 soft + 2 MLM + 1 cosine, T = 2, student
from evenly spread teacher layers) is configs/distilbert.py.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kdjax import losses
from kdjax.engine.method import DistillError, Method, Needs, TermInputs


def mask_tokens(batch: dict, key: jax.Array, method: "DistilBERT") -> dict:
    """DistilBERT's dynamic masking, redrawn every step: round(p * n) of each example's n
    maskable tokens (real, not special), 80 % [MASK] / 10 % random / 10 % kept.

    Adds `mlm_positions`, `mlm_targets`, `mlm_where` ([B, P], P = ceil(p * L) + 1 slots) and
    replaces `input_ids`. Token choice is uniform (the official script weights by count^-0.7).
    """
    ids, real = batch["input_ids"], batch["attention_mask"].astype(bool)
    b, length = ids.shape
    eligible = real & ~jnp.isin(ids, jnp.asarray(method.special_token_ids))
    n_eligible = jnp.sum(eligible, -1)
    n_masked = jnp.where(n_eligible > 0,
                         jnp.maximum(1, jnp.round(method.mlm_probability * n_eligible)), 0)
    slots = min(length, math.ceil(method.mlm_probability * length) + 1)
    k_rank, k_kind, k_random = jax.random.split(key, 3)
    scores = jnp.where(eligible, jax.random.uniform(k_rank, ids.shape), -1.0)
    top, positions = jax.lax.top_k(scores, slots)  # [B, P]
    where = (jnp.arange(slots)[None] < n_masked[:, None]) & (top >= 0)
    targets = jnp.take_along_axis(ids, positions, 1)
    kind = jax.random.uniform(k_kind, (b, slots))
    random_ids = jax.random.randint(k_random, (b, slots), 0, method.vocab_size, ids.dtype)
    replaced = jnp.where(kind < 0.8, method.mask_token_id,
                         jnp.where(kind < 0.9, random_ids, targets))
    rows = jnp.arange(b)[:, None]
    new_ids = ids.at[rows, positions].set(jnp.where(where, replaced, targets))
    return {**batch, "input_ids": new_ids, "mlm_positions": positions, "mlm_targets": targets,
            "mlm_where": where}


@dataclasses.dataclass(frozen=True)
class DistilBERT(Method):
    cosine: float = 0.0  # 1 - cos on last-layer hidden states.
    mlm: float = 0.0  # Masked-LM cross-entropy on dynamically masked input.
    mlm_probability: float = 0.15
    # From the tokenizer (`from_config`), not config keys.
    mask_token_id: int = dataclasses.field(default=103, metadata={"config": False})
    special_token_ids: tuple[int, ...] = dataclasses.field(default=(0, 101, 102),
                                                           metadata={"config": False})
    vocab_size: int = dataclasses.field(default=30522, metadata={"config": False})

    TERMS = ("cosine", "mlm")
    RULES = (("mlm_probability", lambda v: 0 < v < 1, "must be in (0, 1)"),)

    @classmethod
    def from_config(cls, loss, *, tokenizer=None) -> "DistilBERT":
        method = super().from_config(loss)
        if tokenizer is None:
            return method
        return dataclasses.replace(
            method, mask_token_id=tokenizer.mask_token_id,
            special_token_ids=tuple(sorted(set(tokenizer.all_special_ids))),
            vocab_size=len(tokenizer))

    def needs(self, spec) -> Needs:
        return Needs(
            teacher_hidden=(spec.teacher_layers,) if self.cosine else (),
            # The student's hidden states are requested as before the method interface existed:
            # the terms read only its last layer, which every forward pass returns.
            student_hidden=True, student_mlm_head=bool(self.mlm),
            uncacheable=("its mlm term re-masks the input every step (DistilBERT's dynamic "
                         "masking), so the teacher never sees the same input twice")
            if self.mlm else "")

    def check(self, spec, student, teacher, *, projection: bool) -> None:
        if self.cosine and student.hidden_size != teacher.hidden_size:
            raise DistillError(f"loss.cosine compares hidden states directly, but the student is "
                               f"{student.hidden_size} wide and the teacher "
                               f"{teacher.hidden_size}; use loss.hidden (projected MSE) instead")

    def prepare_batch(self, spec, batch: dict, key: jax.Array) -> dict:
        return mask_tokens(batch, key, self) if self.mlm else batch

    def terms(self, inputs: TermInputs) -> dict:
        terms = {}
        if self.cosine:
            teacher_last = inputs.teacher["hidden_states"][inputs.spec.teacher_layers]
            terms["cosine"] = (self.cosine * inputs.teacher_factor,
                               losses.cosine_loss(inputs.student.last_hidden_state,
                                                  teacher_last, inputs.mask), inputs.rows)
        if self.mlm:
            batch, model = inputs.batch, inputs.model.model
            # The vocabulary projection only at the masked slots: [B, P, H] -> [B, P, V].
            at_slots = jnp.take_along_axis(inputs.student.last_hidden_state,
                                           batch["mlm_positions"][..., None], 1)
            mlm_logits = model.mlm(at_slots, model.bert.embeddings.word_embeddings.embedding[...])
            has_mask = jnp.any(batch["mlm_where"], -1)
            terms["mlm"] = (self.mlm, losses.mlm_cross_entropy(mlm_logits, batch["mlm_targets"],
                                                               batch["mlm_where"]),
                            inputs.rows * has_mask)
        return terms


METHODS = (DistilBERT,)
