"""The network bound to its parameters, with the KV-cache decode path: what the cached samplers call.

    decoder = make_decoder(model, variables)          # variables = {'params': params}
    logits = decoder.forward(tokens, t, x0)           # the training forward, no cache: [B, L, V]
    cache = decoder.init_cache(batch, capacity)        # KVCache of zeros: per layer [B, C, heads, head_dim]
    logits, cache = decoder.prefill(tokens, capacity)  # keys/values of a whole sequence, written at slots 0..L-1
    logits, cache = decoder.step(cache, tokens, positions, attend, self_attend, t, write_index)

Everything is a pure function of explicit arrays (jit-able, a lax loop carry); see `Transformer.decode` for the
meaning of the step's arguments. Slots are the cache's own indexing: a slot holds the keys of whatever
absolute position was written there (keys are stored rotated), so a ring buffer (sliding window) needs no
re-rotation: attention scores depend on position differences only.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddlm.models import layers
from ddlm.models.layers import KVCache
from ddlm.models.transformer import Transformer


def causal_mask(length: int) -> jax.Array:
    """bool [length, length], lower-triangular: query i sees keys j <= i."""
    return jnp.tril(jnp.ones((length, length), bool))


def block_causal_mask(length: int, block_size: int) -> jax.Array:
    """bool [length, length]: query i sees key j iff block(j) <= block(i) (the clean half of BD3-LM)."""
    if block_size <= 0 or length % block_size:
        raise ValueError(f"block_size must divide the slice length {length}, got block_size={block_size}")
    block = jnp.arange(length) // block_size
    return block[None, :] <= block[:, None]


def init_cache(model: Transformer, batch: int, capacity: int) -> KVCache:
    """Zeros: per layer keys and values [batch, capacity, heads, head_dim] in the model's compute dtype,
    constrained to ('batch', 'length', 'heads', 'kv') (sharded over the batch and heads under the rules);
    heads = the key/value heads (`model.cache_layout`: fewer than the query heads under GQA)."""
    heads, head_dim = model.cache_layout
    shape = (batch, capacity, heads, head_dim)

    def zeros():
        return nn.with_logical_constraint(jnp.zeros(shape, model.dtype), layers.BLHK)

    return KVCache(
        tuple(zeros() for _ in range(model.num_layers)), tuple(zeros() for _ in range(model.num_layers))
    )


class Decoder:
    """A Transformer bound to its variables: forward (no cache), init_cache, prefill and step (cached).

    Attributes mirror the network: attention ('causal' | 'block_causal' | 'bidirectional'), block_size,
    time_conditioning, vocab_size.
    """

    def __init__(self, model: Transformer, variables):
        self.model = model
        self.variables = variables

    @property
    def attention(self) -> str:
        return self.model.attention

    @property
    def block_size(self) -> int:
        return self.model.block_size

    @property
    def time_conditioning(self) -> bool:
        return self.model.time_conditioning

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def logit_shift(self) -> bool:
        """With the logit shift, `forward` is shifted (position i = output at i - 1) but `step` and `prefill`
        return the output layer at each position of their slice: the prediction for a slice's first position
        is the output at the position before it, which the caller keeps (ddlm/sampling/block.py)."""
        return self.model.logit_shift

    def forward(self, tokens, t=None, x0=None):
        """The training forward (no cache): logits [B, L, V]."""
        return self.model.apply(self.variables, tokens, t, x0=x0, train=False)

    def init_cache(self, batch: int, capacity: int) -> KVCache:
        return init_cache(self.model, batch, capacity)

    def step(self, cache, tokens, positions, attend, self_attend=None, t=None, write_index=None):
        """(logits [B, S, V], cache): `Transformer.decode` with these variables."""
        return self.model.apply(
            self.variables,
            tokens,
            positions,
            cache,
            attend,
            self_attend,
            t,
            write_index,
            method=Transformer.decode,
        )

    def prefill(self, tokens, capacity: int | None = None, t=None):
        """Keys/values of a whole sequence tokens [B, L], written at slots 0..L-1 of a new cache of `capacity`
        (default L). The slice attends itself with the network's own pattern: causal (AR), block-causal
        clean tokens at t = 0 (BD3-LM: what the xt half of the training input attends), or bidirectional
        (at time t). Returns (logits [B, L, V], cache)."""
        batch, length = tokens.shape
        capacity = length if capacity is None else capacity
        if capacity < length:
            raise ValueError(f"prefill: capacity={capacity} is smaller than the sequence length {length}")
        if self.attention == "causal":
            self_attend = causal_mask(length)
        elif self.attention == "block_causal":
            self_attend = block_causal_mask(length, self.block_size)
            if self.time_conditioning:
                t = jnp.zeros((batch,), jnp.float32) if t is None else t
        else:
            self_attend = jnp.ones((length, length), bool)
        attend = jnp.zeros((capacity,), bool)
        return self.step(
            self.init_cache(batch, capacity), tokens, jnp.arange(length), attend, self_attend, t, 0
        )


def make_decoder(model: Transformer, variables) -> Decoder:
    """The decode interface of `model` with `variables` ({'params': ...})."""
    if not isinstance(model, Transformer):
        raise TypeError(f"make_decoder needs a ddlm Transformer, got {type(model).__name__}")
    return Decoder(model, variables)
