"""Distillation losses as pure functions, in optax's style.

Every function returns one value per example (unreduced, shape [B]); the caller weights and
averages (see `kdjax.distill.combined_loss`). Inputs are cast to float32 first, so a bfloat16
model still gets float32 losses. Token-level losses take a `where` mask ([B, L], True for real
tokens) and average over the real tokens of each example, so the value does not depend on how
much padding a length bucket added. An example with no real token gives 0.

References (formulas and official-code details in shared/METHODS.md):
  Hinton et al. 2015, Distilling the Knowledge in a Neural Network.
  Sanh et al. 2019, DistilBERT.        Jiao et al. 2020, TinyBERT.
  Sun et al. 2019, Patient Knowledge Distillation.       Tang et al. 2019, Distilled BiLSTM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

_f32 = lambda x: jnp.asarray(x, jnp.float32)


def _masked_token_mean(per_token: jax.Array, where: jax.Array | None) -> jax.Array:
    """[B, L] -> [B]: mean over positions where `where` is True (all positions when None)."""
    if where is None:
        return jnp.mean(per_token, axis=-1)
    where = where.astype(bool)
    total = jnp.sum(jnp.where(where, per_token, 0.0), axis=-1)
    return total / jnp.maximum(jnp.sum(where, axis=-1), 1)


def soft_targets(teacher_logits: jax.Array, temperature: float | jax.Array) -> jax.Array:
    """Teacher probabilities softmax(z_t / T), averaged over teachers.

    Args:
      teacher_logits: [B, C] for one teacher, or [K, B, C] for K teachers (multi-teacher KD
        averages their tempered probabilities, as TextBrewer does).
      temperature: T > 0.

    Returns:
      [B, C] probabilities.
    """
    probs = jax.nn.softmax(_f32(teacher_logits) / temperature, axis=-1)
    return jnp.mean(probs, axis=0) if probs.ndim == 3 else probs


def soft_kl(student_logits: jax.Array, teacher_probs: jax.Array,
            temperature: float | jax.Array, *, scale_by_t2: bool = True) -> jax.Array:
    """Hinton's soft-target loss T^2 * KL(p_t || softmax(z_s / T)) per example.

    Args:
      student_logits: [B, C].
      teacher_probs: [B, C] soft targets (see `soft_targets`).
      temperature: T > 0; the same T made `teacher_probs`.
      scale_by_t2: multiply by T^2 so the gradient's scale does not depend on T.

    Returns:
      [B] losses (summed over classes: PyTorch's `kl_div(..., reduction="batchmean")` is their
      mean).
    """
    log_q = jax.nn.log_softmax(_f32(student_logits) / temperature, axis=-1)
    kl = optax.losses.kl_divergence(log_q, _f32(teacher_probs))
    return kl * temperature**2 if scale_by_t2 else kl


def soft_cross_entropy(student_logits: jax.Array, teacher_probs: jax.Array,
                       temperature: float | jax.Array = 1.0) -> jax.Array:
    """TinyBERT's prediction loss -sum p_t log softmax(z_s / t) per example (no t^2).

    Differs from `soft_kl` by the teacher's entropy, a constant for the student, and by the
    missing t^2 factor (TinyBERT uses t = 1, where both agree in gradient).
    """
    return optax.losses.softmax_cross_entropy(_f32(student_logits) / temperature,
                                              _f32(teacher_probs))


def hard_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy against integer labels; label -1 (unlabelled, padding) gives 0."""
    per_example = optax.losses.softmax_cross_entropy_with_integer_labels(
        _f32(logits), jnp.maximum(labels, 0))
    return jnp.where(labels >= 0, per_example, 0.0)


def logit_mse(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """Distilled BiLSTM's ||z_t - z_s||^2, averaged over classes, per example (no temperature)."""
    return jnp.mean(optax.losses.squared_error(_f32(student_logits), _f32(teacher_logits)), -1)


def hidden_mse(student_hidden: jax.Array, teacher_hidden: jax.Array,
               where: jax.Array | None = None, projection=None) -> jax.Array:
    """TinyBERT's hidden-state (or embedding) loss MSE(h_s W, h_t) per example.

    Args:
      student_hidden: [B, L, Hs].
      teacher_hidden: [B, L, Ht].
      where: [B, L] real-token mask.
      projection: optional callable [.., Hs] -> [.., Ht] (the learned W_h when widths differ).

    Returns:
      [B]: squared error averaged over the hidden dimension and the real tokens.
    """
    student_hidden = _f32(student_hidden)
    if projection is not None:
        student_hidden = _f32(projection(student_hidden))
    if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
        raise ValueError(f"hidden_mse: student width {student_hidden.shape[-1]} != teacher "
                         f"width {teacher_hidden.shape[-1]}; pass a projection")
    per_token = jnp.mean(optax.losses.squared_error(student_hidden, _f32(teacher_hidden)), -1)
    return _masked_token_mean(per_token, where)


def cosine_loss(student_hidden: jax.Array, teacher_hidden: jax.Array,
                where: jax.Array | None = None) -> jax.Array:
    """DistilBERT's 1 - cos(h_s, h_t) averaged over real tokens, per example. [B, L, H] -> [B]."""
    if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
        raise ValueError(f"cosine_loss: student width {student_hidden.shape[-1]} != teacher "
                         f"width {teacher_hidden.shape[-1]}")
    per_token = optax.losses.cosine_distance(_f32(student_hidden), _f32(teacher_hidden),
                                             epsilon=1e-8)
    return _masked_token_mean(per_token, where)


def _pair_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, L] -> [B, 1, L, L]: True where both query and key are real tokens."""
    real = attention_mask.astype(bool)
    return (real[:, :, None] & real[:, None, :])[:, None]


def attention_score_mse(student_scores: jax.Array, teacher_scores: jax.Array,
                        attention_mask: jax.Array) -> jax.Array:
    """TinyBERT's attention loss on pre-softmax scores QK^T/sqrt(d), per example.

    TinyBERT's code sets masked entries to 0 in both tensors before an MSE; zeroed entries add
    nothing, so we average over real (query, key) pairs and heads instead of all L*L entries —
    the same gradient direction, without a dependence on the bucket's padding.

    Args:
      student_scores, teacher_scores: [B, heads, L, L] (same number of heads).
      attention_mask: [B, L], 1 for real tokens.

    Returns:
      [B] losses.
    """
    if student_scores.shape[1] != teacher_scores.shape[1]:
        raise ValueError(f"attention_score_mse: student has {student_scores.shape[1]} heads, "
                         f"teacher {teacher_scores.shape[1]}; they must match")
    pair = _pair_mask(attention_mask)
    err = jnp.where(pair, optax.losses.squared_error(_f32(student_scores), _f32(teacher_scores)),
                    0.0)
    count = jnp.sum(pair, axis=(1, 2, 3)) * student_scores.shape[1]
    return jnp.sum(err, axis=(1, 2, 3)) / jnp.maximum(count, 1)


def attention_kl(student_probs: jax.Array, teacher_probs: jax.Array,
                 attention_mask: jax.Array) -> jax.Array:
    """KL(A_t || A_s) between attention distributions (MiniLM-style), per example.

    Args:
      student_probs, teacher_probs: [B, heads, L, L] softmax probabilities (padded keys are 0).
      attention_mask: [B, L].

    Returns:
      [B]: KL summed over keys, averaged over heads and real query positions.
    """
    if student_probs.shape[1] != teacher_probs.shape[1]:
        raise ValueError(f"attention_kl: student has {student_probs.shape[1]} heads, teacher "
                         f"{teacher_probs.shape[1]}; they must match")
    key_real = attention_mask.astype(bool)[:, None, None, :]
    tiny = jnp.finfo(jnp.float32).tiny
    log_s = jnp.log(jnp.maximum(_f32(student_probs), tiny))
    kl = optax.losses.kl_divergence(log_s, _f32(teacher_probs), where=key_real)  # [B, h, L]
    query_real = attention_mask.astype(bool)[:, None, :]
    count = jnp.sum(query_real, axis=(1, 2)) * student_probs.shape[1]
    return jnp.sum(jnp.where(query_real, kl, 0.0), axis=(1, 2)) / jnp.maximum(count, 1)


def patient_loss(student_cls: jax.Array, teacher_cls: jax.Array, projection=None) -> jax.Array:
    """Patient KD's L_PT for one layer pair: mean squared distance of L2-normalised [CLS] vectors.

    Args:
      student_cls: [B, Hs]; teacher_cls: [B, Ht].
      projection: optional callable Hs -> Ht applied before normalising (widths differ).

    Returns:
      [B]: squared error averaged over the hidden dimension, the reduction of PKD's
      `F.mse_loss` that its beta of 100-500 assumes. Average over layer pairs outside.
    """
    student_cls = _f32(student_cls)
    if projection is not None:
        student_cls = _f32(projection(student_cls))
    if student_cls.shape[-1] != teacher_cls.shape[-1]:
        raise ValueError(f"patient_loss: student width {student_cls.shape[-1]} != teacher "
                         f"width {teacher_cls.shape[-1]}; pass a projection")
    normalise = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    return jnp.mean(optax.losses.squared_error(normalise(student_cls),
                                               normalise(_f32(teacher_cls))), -1)


def mlm_cross_entropy(mlm_logits: jax.Array, target_ids: jax.Array,
                      where: jax.Array) -> jax.Array:
    """Masked-LM cross-entropy averaged over the masked positions of each example.

    Args:
      mlm_logits: [B, P, vocab] logits at P candidate positions.
      target_ids: [B, P] original token ids.
      where: [B, P] True at positions that were masked (and count).

    Returns:
      [B] losses (0 for an example with no masked position).
    """
    per_position = optax.losses.softmax_cross_entropy_with_integer_labels(
        _f32(mlm_logits), target_ids)
    return _masked_token_mean(per_position, where)


# ------------------------------------------------------------------------------------------------
# Adversarial losses (KDABert, kdjax/methods/kdabert.py). A discriminator D scores a feature vector
# with one logit; teacher features are "real" (target 1), student features "fake" (target 0).
# Each function takes D's logits per example ([B], one layer) and returns [B].
#
# References: Goodfellow et al. 2014 (non-saturating GAN loss); Salimans et al. 2016 (one-sided
# label smoothing); Lim & Ye 2017, Miyato et al. 2018 (hinge loss); Arjovsky et al. 2017,
# Gulrajani et al. 2017 (WGAN, gradient penalty).


def bce_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array, *,
                           label_smoothing: float = 0.1) -> jax.Array:
    """The non-saturating GAN's discriminator loss with one-sided label smoothing, per example.

    `-[s log sigmoid(r) + (1 - s) log(1 - sigmoid(r))] - log(1 - sigmoid(f))` with the real
    target `s = 1 - label_smoothing` (0.9 by default); fake targets stay 0 (one-sided).

    Args:
      real_logits: [B] D's logits on teacher features.
      fake_logits: [B] D's logits on (stop-gradient) student features.
      label_smoothing: how far below 1 the real target is; 0 gives plain binary cross-entropy.

    Returns:
      [B] losses.
    """
    real_logits, fake_logits = _f32(real_logits), _f32(fake_logits)
    real = optax.losses.sigmoid_binary_cross_entropy(
        real_logits, jnp.full_like(real_logits, 1.0 - label_smoothing))
    fake = optax.losses.sigmoid_binary_cross_entropy(fake_logits, jnp.zeros_like(fake_logits))
    return real + fake


def bce_generator_loss(fake_logits: jax.Array) -> jax.Array:
    """The non-saturating generator (student) loss `-log sigmoid(D(h_s))`, per example. [B]."""
    return jax.nn.softplus(-_f32(fake_logits))


def hinge_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Hinge discriminator loss `max(0, 1 - D(h_t)) + max(0, 1 + D(h_s))`, per example. [B]."""
    return jax.nn.relu(1.0 - _f32(real_logits)) + jax.nn.relu(1.0 + _f32(fake_logits))


def hinge_generator_loss(fake_logits: jax.Array) -> jax.Array:
    """Hinge generator (student) loss `-D(h_s)`, per example. [B]."""
    return -_f32(fake_logits)


def wasserstein_critic_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """WGAN critic loss `D(h_s) - D(h_t)` per example (add `gradient_penalty`). [B]."""
    return _f32(fake_logits) - _f32(real_logits)


def wasserstein_generator_loss(fake_logits: jax.Array) -> jax.Array:
    """WGAN generator (student) loss `-D(h_s)`, per example. [B]."""
    return -_f32(fake_logits)


def gradient_penalty(critic, real_features: jax.Array, fake_features: jax.Array,
                     interpolation: jax.Array) -> jax.Array:
    """WGAN-GP's `(||grad_x D(x_hat)||_2 - 1)^2` at `x_hat = e * real + (1 - e) * fake`.

    Args:
      critic: [B, F] -> [B]; each row's score must depend on that row only (an MLP), so the
        gradient of the summed scores gives every row's own input gradient.
      real_features, fake_features: [B, F].
      interpolation: [B] mixing weights e, drawn from U[0, 1].

    Returns:
      [B] penalties (differentiable with respect to the critic's parameters).
    """
    e = _f32(interpolation)[:, None]
    x_hat = e * _f32(real_features) + (1.0 - e) * _f32(fake_features)
    grads = jax.grad(lambda x: jnp.sum(critic(x)))(x_hat)  # [B, F]
    # The epsilon keeps the norm's own gradient finite where the input gradient vanishes.
    norm = jnp.sqrt(jnp.sum(jnp.square(grads), axis=-1) + 1e-12)
    return jnp.square(norm - 1.0)
