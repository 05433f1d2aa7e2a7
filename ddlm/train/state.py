"""Train state and its sharded initialisation.

Parameters are never materialised whole on one device: `jax.eval_shape` gives the abstract (boxed)
parameters with their logical axis names, the rules turn those names into NamedShardings, and the
initialiser is jitted with those `out_shardings` so each device only computes its own shard.
(Pattern of flax examples/lm1b `setup_initial_state`.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from ddlm import sharding
from ddlm.sharding import abstract_params, model_init_inputs  # noqa: F401 -- used here and by callers


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: optimizer updates done so far
    params: Any  # unboxed parameter tree
    opt_state: Any  # optax state of `params`
    ema_params: Any  # exponential moving average of `params` (used for eval and sampling)
    rng: jax.Array  # uint32 [2]: the run's base key; step k draws from fold_in(rng, k)


def state_shardings(boxed_abstract_params, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """NamedShardings for every leaf of the TrainState, from the parameters' logical axis names.

    The optimizer state's shardings come from running `tx.init` abstractly on the *boxed* parameters:
    optax maps over the boxes' leaves and keeps the boxes, so Adam's mu/nu inherit the parameters'
    logical names (and hence are sharded over `fsdp` like them); scalars like `count` are replicated.
    """
    param_specs = nn.get_partition_spec(boxed_abstract_params)
    opt_specs = nn.get_partition_spec(jax.eval_shape(tx.init, boxed_abstract_params))
    param_sh = sharding.logical_to_sharding(param_specs, mesh)
    opt_sh = sharding.logical_to_sharding(opt_specs, mesh)
    rep = sharding.replicated(mesh)
    return TrainState(step=rep, params=param_sh, opt_state=opt_sh, ema_params=param_sh, rng=rep)


def make_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    seed: int,
    init_inputs,
) -> tuple[Callable[[], TrainState], TrainState, Callable[[], TrainState]]:
    """Returns (init_fn, shardings, abstract_fn): a function making a freshly initialised sharded
    state, the shardings of its leaves, and a function giving the abstract state (ShapeDtypeStructs carrying the target
    shardings; orbax restores into it, resharding if the checkpoint was written on another mesh)."""
    boxed, init_params = abstract_params(model, init_inputs)

    def init_state(seed_key):
        params_key, train_key = jax.random.split(seed_key)
        params = nn.meta.unbox(init_params(params_key))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema_params=params,
            rng=jax.random.key_data(train_key),
        )

    seed_key = jax.random.key(seed)
    shapes = jax.eval_shape(init_state, seed_key)
    shardings = jax.tree.map(
        lambda sh, s: sharding.fit_to_shape(sh, s.shape), state_shardings(boxed, tx, mesh), shapes
    )

    def init_fn():
        return jax.jit(init_state, out_shardings=shardings)(seed_key)

    def abstract_state():
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
        )

    return init_fn, shardings, abstract_state


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
