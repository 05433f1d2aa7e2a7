"""Device mesh and logical-axis sharding rules.

The mesh has three named axes, `data`, `fsdp` and `tensor`, with sizes from `config.mesh`. Networks
annotate parameters and activations with logical names ('batch', 'embed', 'mlp', ...); the one table
`LOGICAL_AXIS_RULES` below maps those names to mesh axes. Changing the parallelism is changing the
config or this table, never the model.

Mesh axis types are **Auto** (not Explicit): flax.linen annotates activations with
`nn.with_logical_constraint`, which lowers to `jax.lax.with_sharding_constraint`, and that is only allowed
on Auto axes (on Explicit axes it raises "can only refer to Auto axes"). With Auto axes XLA's sharding
propagation fills in whatever we leave unconstrained, and the model code stays free of `reshard` calls.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or axes, or None = replicated). About 7 rules, in the spirit of t5x's
# `standard_logical_axis_rules`: the batch is split over every data-parallel axis (`data` and `fsdp`),
# parameters are split over `fsdp` along their model (`embed`) dimension and over `tensor` along their
# wide dimension (`mlp`, `heads`, `vocab`).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("layers", None),  # the stacked-layer axis of scanned blocks (ddlm/models/stack.py): never split
    ("vocab", "tensor"),
    ("length", None),
)


class ConfigError(ValueError):
    """A configuration that cannot run; its message is one line that names the offending field."""


def mesh_sizes(mesh_config) -> dict[str, int]:
    """`config.mesh`'s sizes by axis, each checked (data may be -1 = 'the rest'), without the device count."""
    sizes = {name: int(mesh_config[name]) for name in MESH_AXES}
    for name, size in sizes.items():
        if size == 0 or size < -1 or (size == -1 and name != "data"):
            raise ConfigError(
                f"config.mesh.{name} must be a positive integer{' or -1' if name == 'data' else ''}, got {size}"
            )
    return sizes


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
    """Resolves `config.mesh` ({data, fsdp, tensor}; data may be -1 = 'the rest') to three sizes."""
    sizes = mesh_sizes(mesh_config)
    if sizes["data"] == -1:
        rest = sizes["fsdp"] * sizes["tensor"]
        if num_devices % rest:
            raise ConfigError(
                f"config.mesh: fsdp*tensor = {sizes['fsdp']}*{sizes['tensor']} = {rest} does not divide "
                f"the device count {num_devices}"
            )
        sizes["data"] = num_devices // rest
    product = math.prod(sizes.values())
    if product != num_devices:
        raise ConfigError(
            f"config.mesh: data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']} = {product} "
            f"must equal the device count {num_devices}"
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(mesh_config, devices=None) -> Mesh:
    """A Mesh with Auto axes ('data', 'fsdp', 'tensor') over `devices` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    # jax.make_mesh orders the devices so that the innermost axis (tensor) gets the fastest links.
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def logical_to_sharding(logical_specs, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Tree of logical PartitionSpecs (e.g. from `nn.get_partition_spec`) -> tree of NamedShardings."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def fit_to_shape(named: NamedSharding, shape) -> NamedSharding:
    """Drops the mesh axes of any dimension they do not divide (that dimension is then replicated).

    jit requires each sharded dimension to be divisible by its mesh axes' total size; e.g. a GPT-2 vocab
    of 50,258 cannot be split 4 ways over `tensor`. Replicating that one dimension keeps the rest sharded."""
    spec = tuple(named.spec) + (None,) * (len(shape) - len(named.spec))
    fitted = []
    for dim, axes in zip(shape, spec):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(named.mesh.shape[a] for a in names)
        fitted.append(axes if dim % size == 0 else None)
    return NamedSharding(named.mesh, P(*fitted))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [batch, length] array: batch over ('data', 'fsdp'), length replicated."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), LOGICAL_AXIS_RULES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


@contextlib.contextmanager
def mesh_context(mesh: Mesh):
    """The mesh and the logical-axis rules in scope while tracing (for the networks' activation constraints)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield mesh


# ------------------------------------------------------------------------------------------------ parameters


def model_init_inputs(loss_name: str, batch_size: int, seq_len: int):
    """Dummy (tokens, t, x0) that `model.init` traces with; they only fix shapes."""
    tokens = jnp.zeros((batch_size, seq_len), jnp.int32)
    t = jnp.full((batch_size,), 0.5, jnp.float32)
    x0 = tokens if loss_name == "bd3lm" else None
    return tokens, t, x0


def abstract_params(model: nn.Module, init_inputs) -> Any:
    """The boxed (nn.LogicallyPartitioned) parameter tree as ShapeDtypeStructs: no FLOPs, no memory."""
    tokens, t, x0 = init_inputs

    def init(rng):
        return model.init({"params": rng, "dropout": rng}, tokens, t, x0=x0, train=False)["params"]

    return jax.eval_shape(init, jax.random.key(0)), init


def sharded_abstract_params(boxed_abstract_params, mesh: Mesh) -> Any:
    """Unboxed parameter ShapeDtypeStructs carrying the NamedShardings their logical names map to (the
    target of a sharded checkpoint restore)."""
    shardings = logical_to_sharding(nn.get_partition_spec(boxed_abstract_params), mesh)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=fit_to_shape(sh, s.shape)),
        nn.meta.unbox(boxed_abstract_params),
        shardings,
    )
