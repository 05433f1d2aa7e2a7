"""The stack of transformer blocks: unrolled (one traced copy per layer) or one `nn.scan` over stacked
parameters, with a selectable rematerialisation policy. Generic over the block class: any block whose
call is `block(x, *broadcast_args, *static_args) -> x` (training) and
`block(x, *broadcast_args, *static_args, layer_cache, decode_masks) -> (x, layer_cache)` (decoding).

Why scan: unrolled, XLA optimises and compiles every layer separately, so compile time grows with depth (a
24-layer network compiles ~10x longer than a 2-layer one); scanned, the body is compiled once
(benchmarks/RESULTS.md, "Layer scan"). Unrolled, the Python of the layers is traced once all the same: the
layers have equal shapes, so a lifted jit reuses one traced block (`_traced_once`).

Parameter layouts (what a checkpoint holds):
  unrolled: params['block_0'], params['block_1'], ... each a block's tree;
  scanned:  params['blocks'], the same tree with a leading [num_layers] axis on every leaf (logical axis
            name 'layers', replicated by the sharding rules).
`stack_layers` / `unstack_layers` convert a parameter tree (or an optimizer-state or EMA tree of the same
structure) between the two, so a checkpoint written with one layout loads into the other.

Remat policies ('none' | 'full' | 'dots_saveable', with config.model.remat=True choosing between the last
two): 'full' saves only each block's input and recomputes the whole block in the backward pass (least
memory, ~1/3 more FLOPs); 'dots_saveable' keeps the matmul outputs and recomputes only the elementwise ops
(more memory, almost no extra FLOPs).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

REMAT_POLICIES = ("none", "full", "dots_saveable")
SCANNED_NAME = "blocks"
LAYER_AXIS = "layers"
# Unrolled, the layers are traced once through a lifted jit (`_traced_once`); False traces each layer's Python
# again (the same values: tests/test_stack.py compares the two).
TRACE_BLOCKS_ONCE = True


def _block_name(i: int) -> str:
    return f"block_{i}"


def _checkpoint_policy(name: str):
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat policy must be one of {REMAT_POLICIES}, got {name!r}")
    return {"full": None, "dots_saveable": jax.checkpoint_policies.dots_saveable}.get(name)


def _scan(body, num_layers: int, in_axes: tuple):
    """nn.scan of body(block, carry, *xs) over num_layers copies of the block's parameters (stacked on axis
    0, logical name 'layers'), each layer with its own dropout key."""
    return nn.scan(
        body,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=in_axes,
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: LAYER_AXIS},
    )


def apply_blocks(
    block_cls: type[nn.Module],
    block_kwargs: dict,
    num_layers: int,
    x: jax.Array,
    broadcast_args: tuple,
    static_args: tuple,
    *,
    scan: bool,
    remat_policy: str = "none",
    trace_once: bool = False,
) -> jax.Array:
    """x -> block_{n-1}(... block_0(x, *broadcast_args, *static_args)): the training/eval forward.

    Call inside the parent's compact method (the blocks become its submodules). x: [B, L, d] carry;
    broadcast_args: arrays (or None) every layer reads; static_args: Python values (is_causal, train);
    trace_once: unrolled, trace one block for every layer (`_traced_once`, when stack.TRACE_BLOCKS_ONCE)
    rather than each layer's Python. Under flax's lifted jit initial parameters and dropout masks come from
    other keys than per layer (each layer still draws its own); the transformer initialises per layer."""
    policy = _checkpoint_policy(remat_policy)
    cls = block_cls
    if remat_policy != "none":
        # The static args follow x and the broadcast args (argument 0 is the module itself). Inside a scan
        # XLA cannot merge the recomputation with the forward, so CSE prevention is only needed unrolled.
        static = tuple(range(2 + len(broadcast_args), 2 + len(broadcast_args) + len(static_args)))
        cls = nn.remat(block_cls, policy=policy, prevent_cse=not scan, static_argnums=static)
    if not scan:
        args = (*broadcast_args, *static_args)
        call = _call
        if trace_once and TRACE_BLOCKS_ONCE:
            # call(block, x, *args): numpy broadcast args and the static args are jit-static, the rest traced
            static = [2 + i for i, a in enumerate(args) if isinstance(a, np.ndarray) or i >= len(broadcast_args)]
            args = tuple(_Constant(a) if isinstance(a, np.ndarray) else a for a in args)
            call = _traced_once(tuple(static))
        for i in range(num_layers):
            x = call(cls(**block_kwargs, name=_block_name(i)), x, *args)
        return x

    def body(block, carry, *args):
        return block(carry, *args, *static_args), None

    scanned = _scan(body, num_layers, in_axes=(nn.broadcast,) * len(broadcast_args))
    x, _ = scanned(cls(**block_kwargs, name=SCANNED_NAME), x, *broadcast_args)
    return x


class _Constant:
    """A numpy broadcast argument (the full forward's rotary positions 0..L-1) passed to the jitted block as a
    static argument, hashed by its content: inside, the block sees the numpy array again, so what it computes
    from it stays a trace-time constant (`layers.rotary_embedding`'s cached tables), as without the jit."""

    def __init__(self, value: np.ndarray):
        self.value = value
        self._key = (value.dtype.str, value.shape, value.tobytes())

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Constant) and self._key == other._key


@functools.lru_cache(maxsize=None)
def _traced_once(static_argnums: tuple):
    """call(block, x, *args) -> block(x, *args) under flax's lifted jit: the unrolled layers have equal shapes,
    so the block is traced (and differentiated) once and its jaxpr reused by every layer instead of tracing
    each layer's Python again (`small`'s train step: tracing 3.1-3.6 -> 1.6-1.9 s, compile 1.2x faster).
    Flax keys its cache on the block's fields, so blocks configured otherwise trace anew. XLA inlines the
    calls: the same computation, with fewer materialised copies (benchmarks/RESULTS.md, issue 28)."""

    def call(block, x, *args):
        return _call(block, x, *(a.value if isinstance(a, _Constant) else a for a in args))

    return nn.jit(call, static_argnums=static_argnums)


def _call(block, x, *args):
    return block(x, *args)


def decode_blocks(
    block_cls: type[nn.Module],
    block_kwargs: dict,
    num_layers: int,
    x: jax.Array,
    broadcast_args: tuple,
    static_args: tuple,
    cache_keys: tuple,
    cache_values: tuple,
    decode_masks: Any,
    layer_cache_cls: Any,
    *,
    scan: bool,
):
    """The decode path through the same parameters: returns (x, new keys tuple, new values tuple).

    Scanned, the per-layer caches are stacked into [num_layers, ...] for the scan and split again after it
    (a copy of the cache per call; the unrolled layout decodes without it)."""
    if not scan:
        keys, values = [], []
        for i in range(num_layers):
            block = block_cls(**block_kwargs, name=_block_name(i))
            x, layer_cache = block(
                x,
                *broadcast_args,
                *static_args,
                layer_cache_cls(cache_keys[i], cache_values[i]),
                decode_masks,
            )
            keys.append(layer_cache.keys)
            values.append(layer_cache.values)
        return x, tuple(keys), tuple(values)

    def body(block, carry, layer_keys, layer_values, *args):
        carry, layer_cache = block(
            carry, *args, *static_args, layer_cache_cls(layer_keys, layer_values), decode_masks
        )
        return carry, (layer_cache.keys, layer_cache.values)

    scanned = _scan(body, num_layers, in_axes=(0, 0) + (nn.broadcast,) * len(broadcast_args))
    x, (keys, values) = scanned(
        block_cls(**block_kwargs, name=SCANNED_NAME),
        x,
        jnp.stack(cache_keys),
        jnp.stack(cache_values),
        *broadcast_args,
    )
    return x, tuple(keys[i] for i in range(num_layers)), tuple(values[i] for i in range(num_layers))


def stack_layers(tree: dict, num_layers: int) -> dict:
    """Unrolled layout -> scanned: {'block_0': t0, ..., 'block_{n-1}': t} -> {'blocks': stack(t_i)}; the
    other entries are kept. Works on a params tree and on any tree of the same structure (Adam moments)."""
    missing = [_block_name(i) for i in range(num_layers) if _block_name(i) not in tree]
    if missing:
        raise ValueError(
            f"stack_layers: the tree lacks {missing[:3]} (not an unrolled {num_layers}-layer tree)"
        )
    out = {k: v for k, v in tree.items() if not _is_block_key(k)}
    out[SCANNED_NAME] = jax.tree.map(
        lambda *xs: jnp.stack(xs), *[tree[_block_name(i)] for i in range(num_layers)]
    )
    return out


def unstack_layers(tree: dict) -> dict:
    """Scanned layout -> unrolled: {'blocks': stacked} -> {'block_0': ..., 'block_{n-1}': ...}."""
    if SCANNED_NAME not in tree:
        raise ValueError(f"unstack_layers: the tree has no {SCANNED_NAME!r} entry (not a scanned tree)")
    stacked = tree[SCANNED_NAME]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in tree.items() if k != SCANNED_NAME}
    for i in range(num_layers):
        out[_block_name(i)] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out


def _is_block_key(key: str) -> bool:
    return key.startswith("block_") and key[len("block_") :].isdigit()
