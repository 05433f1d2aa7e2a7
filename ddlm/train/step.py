"""The train step and the eval step: pure functions, jitted once by the trainer.

    train_step(state, batch, rng) -> (state, metrics)
    eval_step(params, batch, rng) -> {'loss_sum', 'tokens'}

batch = {'tokens': int32 [B, L], 'loss_mask': float32 [B, L]}. Which loss, schedule and network are used
is bound in with functools.partial; the loss itself is `ddlm.losses.training_loss` (time sampling,
corruption, the network call through `apply_fn`, and the per-token loss live there, not here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ddlm.train import optim
from ddlm.train.state import TrainState

# loss_fn(params, batch, rng, train[, step]) -> (scalar loss, metrics dict)
LossFn = Callable[[Any, dict, jax.Array, bool], tuple[jax.Array, dict]]


def make_loss_fn(
    model: nn.Module, diffusion_config, model_config, *, vocab_size: int, mask_id: int, anneal_steps: int = 0
) -> LossFn:
    """Binds the network and the diffusion config into loss_fn(params, batch, rng, train, step=None).

    With loss 'duo' and a curriculum (config.diffusion.curriculum.end > 0) the loss uses the `step` too.
    anneal_steps > 0 (AR-to-diffusion adaptation, ddlm/train/adapt.py): when given the optimizer `step`, the
    network attends through that step's annealed causal-to-bidirectional mask; without a step (eval) it
    uses its own (bidirectional) attention.
    config.diffusion.self_conditioning = p > 0 (a network with model.self_conditioning): training calls the
    network twice, the second pass seeing the first's prediction with probability p
    (losses.self_conditioned_apply); eval (train=False) always does (p = 1), as the samplers do after their
    first step, so the eval NELBO is that of the network the samplers run."""
    from ddlm import losses, schedules  # the lead's modules (see CONTRACTS.md)

    schedule = schedules.get_schedule(diffusion_config.schedule, **dict(diffusion_config.schedule_kwargs))
    loss_name = diffusion_config.loss
    block_size = int(model_config.block_size) if loss_name == "bd3lm" else None
    num_steps = int(diffusion_config.num_steps) or None
    curriculum = duo_curriculum(diffusion_config, vocab_size)
    self_conditioning = float(diffusion_config.get("self_conditioning", 0.0))  # configs stored before the field: off

    def loss_fn(params, batch, rng, train, step=None):
        dropout_rng, loss_rng = jax.random.split(rng)
        extra = {}
        if anneal_steps and step is not None:
            from ddlm.train import adapt

            mask_rng = jax.random.fold_in(rng, 0x616E6E)  # its own stream: the other draws are unchanged
            extra["attention_mask"] = adapt.annealed_attention_mask(
                mask_rng, step, batch["tokens"].shape[1], anneal_steps
            )

        def apply_fn(xt, t, x0_context, self_cond=None):
            kwargs = dict(extra) if self_cond is None else dict(extra, self_cond=self_cond)
            logits = model.apply(
                {"params": params}, xt, t, x0=x0_context, train=train, rngs={"dropout": dropout_rng}, **kwargs
            )
            return logits.astype(jnp.float32)

        return losses.training_loss(
            loss_name,
            apply_fn,
            batch["tokens"],
            batch["loss_mask"],
            loss_rng,
            schedule=schedule,
            vocab_size=vocab_size,
            mask_id=mask_id,
            block_size=block_size,
            num_steps=num_steps,
            antithetic=bool(diffusion_config.antithetic),
            step=step if curriculum is not None else None,
            curriculum=curriculum,
            self_conditioning=(self_conditioning if train else 1.0) if self_conditioning else 0.0,
        )

    return loss_fn


def duo_curriculum(diffusion_config, vocab_size: int):
    """DUO's Gaussian-relaxation curriculum (ddlm.losses.DuoCurriculum) of config.diffusion.curriculum, or None
    (another loss, or curriculum.end = 0). The train step then passes the optimizer step to the loss."""
    from ddlm import losses, processes

    c = diffusion_config.curriculum
    if diffusion_config.loss != "duo" or not c.end:
        return None
    relaxation = processes.GaussianRelaxation(vocab_size, gamma_min=c.gamma_min, gamma_max=c.gamma_max)
    return losses.DuoCurriculum(
        relaxation, tau_log10_start=c.tau_log10_start, tau_log10_end=c.tau_log10_end, start=c.start, end=c.end
    )


def _split_micro_batches(batch: dict, accum_steps: int) -> dict:
    """[B, ...] -> [accum_steps, B // accum_steps, ...], micro-batch j = rows j, j+A, j+2A, ...

    Reshaping to [B/A, A, ...] then swapping keeps each device's rows on that device (the batch axis is
    sharded in contiguous chunks), so no data moves between devices."""

    def split(x):
        b = x.shape[0]
        x = x.reshape((b // accum_steps, accum_steps) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def train_step(
    state: TrainState,
    batch: dict,
    rng: jax.Array,
    *,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    accum_steps: int,
    ema_decay: float,
) -> tuple[TrainState, dict]:
    """One optimizer update on `batch` (split into `accum_steps` micro-batches whose grads are averaged).

    A non-finite loss or gradient leaves the state unchanged except for `step` and reports metrics['finite']
    = 0 (update_norm and param_norm are then NaN); the trainer then stops or skips according to
    `train.nan_policy`."""
    grad_fn = jax.value_and_grad(lambda p, b, r: loss_fn(p, b, r, True), has_aux=True)

    if accum_steps == 1:
        (loss, aux), grads = grad_fn(state.params, batch, rng)
    else:
        micro = _split_micro_batches(batch, accum_steps)
        keys = jax.random.split(rng, accum_steps)

        def body(carry, xs):
            grads_sum, loss_sum, aux_sum = carry
            (loss_i, aux_i), grads_i = grad_fn(state.params, xs[0], xs[1])
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads_i)
            aux_sum = jax.tree.map(jnp.add, aux_sum, aux_i)
            return (grads_sum, loss_sum + loss_i, aux_sum), None

        first = jax.tree.map(lambda x: x[0], micro)
        aux_shape = jax.eval_shape(lambda: grad_fn(state.params, first, keys[0])[0][1])
        init = (
            jax.tree.map(jnp.zeros_like, state.params),
            jnp.zeros((), jnp.float32),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape),
        )
        (grads, loss, aux), _ = jax.lax.scan(body, init, (micro, keys))
        scale = 1.0 / accum_steps
        grads = jax.tree.map(lambda g: g * scale, grads)
        loss = loss * scale
        aux = jax.tree.map(lambda a: a * scale, aux)

    grad_norm = optax.tree.norm(grads)
    # With a finite loss and a finite gradient norm every g^2 is finite, so AdamW's moments and direction are
    # finite too: the guard is known before the update, without a pass over the updates. lax.cond makes it a
    # scalar branch: a skipped step returns the state as it was, and the update is written in place into
    # the donated buffers (a `where(finite, new, old)` over the state made XLA copy params, mu and nu first,
    # since the old values were still read after the new ones were written).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    n = state.step.astype(jnp.float32)
    # EMA with the usual warm start (decay grows as (1+n)/(10+n) up to ema_decay), so short runs'
    # averages are not dominated by the random initialisation.
    decay = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))

    def update(state):
        if isinstance(tx, optim.FusedAdamW):  # the same update as tx.update in fewer passes (train/optim.py)
            params, opt_state, update_norm = tx.apply(grads, grad_norm, state.opt_state, state.params)
        else:
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            update_norm = optax.tree.norm(updates)
        ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        norms = (update_norm, optax.tree.norm(params))
        return state.replace(params=params, opt_state=opt_state, ema_params=ema_params), norms

    def skip(state):
        nan = jnp.full((), jnp.nan, jnp.float32)
        return state, (nan, nan)

    new_state, (update_norm, param_norm) = jax.lax.cond(finite, update, skip, state)
    new_state = new_state.replace(step=state.step + 1)

    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "update_norm": update_norm,
        "param_norm": param_norm,
        "learning_rate": lr_schedule(state.step),
        "finite": finite.astype(jnp.float32),
    }
    for key, value in aux.items():
        if jnp.ndim(value) == 0 and key not in metrics:
            metrics[key] = value
    return new_state, metrics


def eval_step(params, batch: dict, rng: jax.Array, *, loss_fn: LossFn) -> dict:
    """NELBO (nats per token) of `batch` under `params` with dropout off, as a token-weighted sum.

    For the diffusion losses `training_loss` is an unbiased Monte-Carlo estimate of the NELBO (a bound on
    the negative log-likelihood); for 'ar' it is the exact NLL."""
    loss, _ = loss_fn(params, batch, rng, False)
    tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    return {"loss_sum": loss * tokens, "tokens": tokens}
