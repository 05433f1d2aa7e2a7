"""Optimizer: AdamW with linear warmup then cosine or constant learning rate, global-norm clipping.

Gradient accumulation is not an optax wrapper here: the train step scans over micro-batches and makes one
optimizer update per step (see `ddlm/train/step.py`), so `step` counts updates and the schedule is in
updates whatever `optim.grad_accum_steps` is.
"""

from __future__ import annotations

import jax
import optax

from ddlm.train.sharding import ConfigError


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then `decay` ('cosine' to lr*min_lr_ratio, or 'constant')."""
    lr = float(optim_config.lr)
    warmup = int(optim_config.warmup_steps)
    if optim_config.decay == "constant":
        decay = optax.constant_schedule(lr)
    elif optim_config.decay == "cosine":
        decay = optax.cosine_decay_schedule(
            lr, decay_steps=max(total_steps - warmup, 1), alpha=float(optim_config.min_lr_ratio)
        )
    else:
        raise ConfigError(f"config.optim.decay must be 'cosine' or 'constant', got {optim_config.decay!r}")
    if warmup <= 0:
        return decay
    warmup_fn = optax.linear_schedule(0.0, lr, warmup)
    return optax.join_schedules([warmup_fn, decay], [warmup])


def make_optimizer(optim_config, total_steps: int) -> optax.GradientTransformation:
    if optim_config.name != "adamw":
        raise ConfigError(f"config.optim.name must be 'adamw', got {optim_config.name!r}")
    schedule = learning_rate_schedule(optim_config, total_steps)
    parts = []
    if optim_config.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(optim_config.grad_clip)))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(optim_config.b1),
            b2=float(optim_config.b2),
            eps=float(optim_config.eps),
            weight_decay=float(optim_config.weight_decay),
            # No decay on biases, norms' scales and other vectors: only on matrices.
            mask=_matrix_mask,
        )
    )
    return optax.chain(*parts)


def _matrix_mask(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)
