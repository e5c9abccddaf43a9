"""MiniLM (Wang et al. 2020): deep self-attention distillation of the last layer.

Two terms, both KL(teacher || student) per head and query position, averaged over heads and
the real query positions, padded keys masked:
  minilm_attention: the attention distributions softmax(Q K^T / sqrt(d_head)) of the two last
    layers;
  minilm_value: the value relations softmax(V V^T / sqrt(d_head)), V split into the heads.
Student and teacher must have the same number of heads (their head sizes may differ); MiniLMv2
(`kdjax.methods.minilm_v2`) lifts that with relation heads. The paper's student learns from the
teacher's last layer only, with no layer map and no projection: `minilm_teacher_layer` picks
another teacher layer (1-based; 0 = the last).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kdjax import losses
from kdjax.engine.method import DistillError, Method, Needs, TermInputs


def relation_log_probs(x: jax.Array, attention_mask: jax.Array, heads: int) -> jax.Array:
    """log softmax(X_h X_h^T / sqrt(d)) per relation head, over the real keys.

    Args:
      x: [B, L, H] (queries, keys or values of one layer).
      attention_mask: [B, L], 1 for real tokens.
      heads: relation heads; must divide H (d = H / heads).

    Returns:
      [B, heads, L, L] float32 log-probabilities; padded keys hold a very negative number.
    """
    b, length, width = x.shape
    if width % heads:
        raise ValueError(f"relation heads: {heads} do not divide the width {width}")
    d = width // heads
    xh = x.astype(jnp.float32).reshape(b, length, heads, d)
    scores = jnp.einsum("bqhd,bkhd->bhqk", xh, xh) / math.sqrt(d)
    key_real = attention_mask.astype(bool)[:, None, None, :]
    return jax.nn.log_softmax(jnp.where(key_real, scores, -1e30), axis=-1)


def relation_kl(student_x: jax.Array, teacher_x: jax.Array, attention_mask: jax.Array,
                heads: int) -> jax.Array:
    """KL(R_t || R_s) between self-relation distributions (`relation_log_probs`), per example:
    summed over the real keys, averaged over relation heads and real query positions.

    Args:
      student_x: [B, L, Hs]; teacher_x: [B, L, Ht] (widths may differ; both divisible by heads).
      attention_mask: [B, L].
      heads: relation heads.

    Returns:
      [B] losses (0 for an example with no real token).
    """
    log_s = relation_log_probs(student_x, attention_mask, heads)
    log_t = relation_log_probs(teacher_x, attention_mask, heads)
    key_real = attention_mask.astype(bool)[:, None, None, :]
    kl = jnp.sum(jnp.where(key_real, jnp.exp(log_t) * (log_t - log_s), 0.0), -1)  # [B, h, L]
    query_real = attention_mask.astype(bool)[:, None, :]
    count = jnp.sum(query_real, axis=(1, 2)) * heads
    return jnp.sum(jnp.where(query_real, kl, 0.0), axis=(1, 2)) / jnp.maximum(count, 1)


def chosen_layer(layer: int, num_layers: int, what: str) -> int:
    """A 1-based layer index from a setting where 0 means the last layer."""
    chosen = layer or num_layers
    if not 1 <= chosen <= num_layers:
        raise DistillError(f"{what} = {layer}: the model has layers 1..{num_layers} "
                           "(0 = the last)")
    return chosen


@dataclasses.dataclass(frozen=True)
class MiniLM(Method):
    minilm_attention: float = 0.0  # KL between last-layer attention distributions.
    minilm_value: float = 0.0  # KL between last-layer value relations.
    minilm_teacher_layer: int = 0  # The teacher layer the student's last layer learns (0 = last).

    TERMS = ("minilm_attention", "minilm_value")
    RULES = (("minilm_teacher_layer", lambda v: v >= 0, "must be >= 0 (0 = the last layer)"),)

    def needs(self, spec) -> Needs:
        return Needs(teacher_attention=bool(self.minilm_attention),
                     student_attention=bool(self.minilm_attention),
                     teacher_qkv=bool(self.minilm_value), student_qkv=bool(self.minilm_value))

    def check(self, spec, student, teacher, *, projection: bool) -> None:
        if student.num_attention_heads != teacher.num_attention_heads:
            raise DistillError(
                f"MiniLM (loss.minilm_attention / loss.minilm_value) compares the last layers "
                f"head by head and needs equal head counts (student "
                f"{student.num_attention_heads}, teacher {teacher.num_attention_heads}); "
                "MiniLMv2's relation heads (loss.minilm_v2) do not")
        chosen_layer(self.minilm_teacher_layer, teacher.num_hidden_layers,
                     "loss.minilm_teacher_layer")

    def terms(self, inputs: TermInputs) -> dict:
        spec, s, t = inputs.spec, inputs.student, inputs.teacher
        teacher_layer = chosen_layer(self.minilm_teacher_layer, spec.teacher_layers,
                                     "loss.minilm_teacher_layer") - 1
        terms = {}
        if self.minilm_attention:
            per_example = losses.attention_kl(s.attention_probs[-1],
                                              t["attention_probs"][teacher_layer], inputs.mask)
            terms["minilm_attention"] = (self.minilm_attention * inputs.teacher_factor,
                                         per_example, inputs.rows)
        if self.minilm_value:
            heads = inputs.model.model.config.num_attention_heads  # The teacher's too (`check`).
            per_example = relation_kl(s.values[-1], t["values"][teacher_layer], inputs.mask,
                                      heads)
            terms["minilm_value"] = (self.minilm_value * inputs.teacher_factor, per_example,
                                     inputs.rows)
        return terms


METHODS = (MiniLM,)
