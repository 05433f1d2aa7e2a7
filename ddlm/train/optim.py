"""Optimizer: AdamW with linear warmup then cosine or constant learning rate, global-norm clipping.

Gradient accumulation is not an optax wrapper here: the train step scans over micro-batches and makes one
optimizer update per step (see `ddlm/train/step.py`), so `step` counts updates and the schedule is in
updates whatever `optim.grad_accum_steps` is.

`make_optimizer` returns a `FusedAdamW`: an optax GradientTransformation (init/update: exactly
optax.chain(clip_by_global_norm, adamw), whose state the checkpoints hold) with a second way to make the same
update, `apply`, written for XLA's fusion: per parameter, the clipped Adam moments, the direction and the new
parameter in four elementwise passes instead of optax's eight to ten (its clip divides every gradient by the
norm, and a divide is an op XLA will not recompute in two consumers, so the clipped gradient, the direction and
the scaled update are each written out and read back). Fewer distinct kernels is most of the train step's
compile time on CPU (each parameter shape compiles its own), fewer passes over the state its memory traffic.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
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
    """clip_by_global_norm + AdamW (decay on matrices only); with config.optim.fused_update (the default) a
    FusedAdamW, whose `apply` the train step then runs (the same update and state): `small`'s step compiles
    ~1.1x faster and steps as fast (benchmarks/RESULTS.md, issue 28). fused_update=False, and configs stored
    before the field existed, get optax's chain, applied as optax applies it."""
    if optim_config.name != "adamw":
        raise ConfigError(f"config.optim.name must be 'adamw', got {optim_config.name!r}")
    schedule = learning_rate_schedule(optim_config, total_steps)
    tx = fused_adamw(
        schedule,
        b1=float(optim_config.b1),
        b2=float(optim_config.b2),
        eps=float(optim_config.eps),
        weight_decay=float(optim_config.weight_decay),
        grad_clip=float(optim_config.grad_clip),
    )
    if optim_config.get("fused_update", False):
        return tx
    return optax.GradientTransformation(tx.init, tx.update)  # optax's chain, applied as optax applies it


class FusedAdamW(NamedTuple):
    """optax.chain(clip_by_global_norm(grad_clip) if grad_clip > 0, adamw(..., mask=matrices)) as init/update
    (a GradientTransformation: the state and the update are optax's), plus
    `apply(grads, grad_norm, opt_state, params) -> (new_params, new_opt_state, update_norm)`: the same update
    written as one elementwise expression per parameter (see the module docstring), given the gradient's
    global norm, which the train step computes anyway for its finiteness guard. Rounding differs from
    `update` only in the last bits (a division by a scalar is a multiplication by its reciprocal).
    """

    init: Any
    update: Any
    apply: Any


def fused_adamw(
    learning_rate: optax.Schedule,
    *,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    grad_clip: float,
) -> FusedAdamW:
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    parts.append(
        optax.adamw(
            learning_rate,
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=weight_decay,
            # No decay on biases, norms' scales and other vectors: only on matrices.
            mask=_matrix_mask,
        )
    )
    chain = optax.chain(*parts)
    adamw_index = len(parts) - 1  # the state: (EmptyState() of the clip,) + ((adam, masked decay, schedule),)

    def apply(grads, grad_norm, opt_state, params):
        adam, masked, schedule = opt_state[adamw_index]
        count = optax.safe_increment(adam.count)
        # Scalars first: clipping as optax.clip_by_global_norm (g unchanged below the threshold, else g * c/|g|),
        # bias corrections 1 - b^t (scale_by_adam), the schedule at its own count (scale_by_schedule).
        scale = jnp.where(grad_norm < grad_clip, 1.0, grad_clip / grad_norm) if grad_clip > 0 else 1.0
        inv_bc1 = 1.0 / (1.0 - b1 ** count.astype(jnp.float32))
        inv_bc2 = 1.0 / (1.0 - b2 ** count.astype(jnp.float32))
        step_size = -learning_rate(schedule.count)

        def leaf(g, m, v, p):
            g = g * jnp.asarray(scale, g.dtype)
            m = (1 - b1) * g + b1 * m
            v = (1 - b2) * g**2 + b2 * v
            direction = (m * inv_bc1.astype(m.dtype)) / (jnp.sqrt(v * inv_bc2.astype(v.dtype)) + eps)
            if weight_decay and p.ndim > 1:  # _matrix_mask
                direction = direction + weight_decay * p
            return m, v, direction

        flat_grads, treedef = jax.tree.flatten(grads)
        per_leaf = [
            leaf(*args)
            for args in zip(flat_grads, *(treedef.flatten_up_to(t) for t in (adam.mu, adam.nu, params)))
        ]
        mu, nu, direction = (treedef.unflatten([out[i] for out in per_leaf]) for i in range(3))
        new_params = jax.tree.map(
            lambda p, d: (p + jnp.asarray(step_size, d.dtype) * d).astype(p.dtype), params, direction
        )
        # |step_size| * |direction|: the direction is written once and read by the parameter update and by
        # this sum (the scaled update would be a second array).
        update_norm = jnp.abs(step_size) * optax.tree.norm(direction)
        new_adam = adam._replace(count=count, mu=mu, nu=nu)
        new_schedule = schedule._replace(count=optax.safe_increment(schedule.count))
        new_state = opt_state[:adamw_index] + ((new_adam, masked, new_schedule),)
        return new_params, new_state, update_norm

    return FusedAdamW(chain.init, chain.update, apply)


def _matrix_mask(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)
