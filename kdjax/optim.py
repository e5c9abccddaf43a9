"""Optimizers: AdamW with linear warmup and linear decay, global-norm clipping, and weight decay
on everything but biases and LayerNorm parameters (the BERT convention)."""

from __future__ import annotations

import jax
import optax

# Leaf names that never get weight decay: biases and LayerNorm scales.
NO_DECAY = ("bias", "scale")


def _leaf_name(path) -> str:
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return str(names[-1]) if names else ""


def decay_mask(params):
    """True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) not in NO_DECAY, params)


def warmup_linear_decay(peak_lr: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
    """0 → peak over the warmup steps, then linearly back to 0 at `total_steps`."""
    warmup = int(round(warmup_ratio * total_steps))
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak_lr, max(warmup, 1)),
         optax.linear_schedule(peak_lr, 0.0, max(total_steps - warmup, 1))],
        boundaries=[warmup])


def make_optimizer(optim_config, total_steps: int) -> optax.GradientTransformation:
    """AdamW from the `optim` config section (lr, warmup_ratio, weight_decay, grad_clip, b1, b2,
    eps)."""
    schedule = warmup_linear_decay(optim_config.lr, total_steps, optim_config.warmup_ratio)
    adamw = optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                        weight_decay=optim_config.weight_decay, mask=decay_mask)
    if optim_config.grad_clip:
        return optax.chain(optax.clip_by_global_norm(optim_config.grad_clip), adamw)
    return adamw
