"""The optimizer against PyTorch's AdamW + transformers' linear warmup schedule."""

import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

from kdjax import config as config_lib, optim


def test_schedule_hand_values():
    schedule = optim.warmup_linear_decay(1e-3, total_steps=10, warmup_ratio=0.2)
    # Warmup 2 steps: 0, 0.5e-3, then 1e-3 decaying to 0 at step 10.
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 1, 2, 6, 10)],
                               [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=1e-9)


def test_decay_mask_spares_biases_and_layer_norm():
    params = {"layer": {"kernel": 1.0, "bias": 1.0}, "layer_norm": {"scale": 1.0, "bias": 1.0},
              "embeddings": {"embedding": 1.0}}
    assert optim.decay_mask(params) == {"layer": {"kernel": True, "bias": False},
                                        "layer_norm": {"scale": False, "bias": False},
                                        "embeddings": {"embedding": True}}


def test_matches_torch_adamw_with_linear_warmup_and_clipping():
    config = config_lib.load_config("configs/finetune.py").optim
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(4, 3)), rng.normal(size=3)
    grads = [(rng.normal(size=(4, 3)) * 3, rng.normal(size=3)) for _ in range(6)]
    total = 8

    tx = optim.make_optimizer(config, total)
    params = {"dense": {"kernel": jnp.asarray(weight, jnp.float32),
                        "bias": jnp.asarray(bias, jnp.float32)}}
    state = tx.init(params)
    for gw, gb in grads:
        g = {"dense": {"kernel": jnp.asarray(gw, jnp.float32), "bias": jnp.asarray(gb, jnp.float32)}}
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)

    tw = torch.nn.Parameter(torch.tensor(weight, dtype=torch.float32))
    tb = torch.nn.Parameter(torch.tensor(bias, dtype=torch.float32))
    opt = torch.optim.AdamW([{"params": [tw], "weight_decay": config.weight_decay},
                             {"params": [tb], "weight_decay": 0.0}], lr=config.lr,
                            betas=(config.b1, config.b2), eps=config.eps)
    sched = transformers.get_linear_schedule_with_warmup(
        opt, int(round(config.warmup_ratio * total)), total)
    for gw, gb in grads:
        tw.grad = torch.tensor(gw, dtype=torch.float32)
        tb.grad = torch.tensor(gb, dtype=torch.float32)
        torch.nn.utils.clip_grad_norm_([tw, tb], config.grad_clip)
        opt.step()
        sched.step()
    np.testing.assert_allclose(params["dense"]["kernel"], tw.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(params["dense"]["bias"], tb.detach().numpy(), atol=1e-6)
    assert not np.allclose(params["dense"]["kernel"], weight)  # It did move.
