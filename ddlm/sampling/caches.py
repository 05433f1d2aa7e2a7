"""Fast-dLLM's approximate KV caches for bidirectional masked-diffusion networks (Wu et al. 2025, "Fast-dLLM:
Training-free Acceleration of Diffusion LLM by Enabling KV Cache and Parallel Decoding", sec. 3.1), as logits
providers of the semi-autoregressive parallel decoder (ddlm.sampling.parallel).

    provider = cached_logits_provider(decoder, cache='dual', mask_id=m, schedule=s, block_length=32)
    out = parallel.parallel_sample(None, rng, x_init, mask_id=m, schedule=s, rule='threshold',
                                   block_length=32, logits_provider=provider)
    # or: config.sampler.name='parallel', config.sampler.cache='prefix' | 'dual' (make_sampler(decoder=...))

What is cached, and when (as Fast-dLLM's llada/generate.py, generate_with_prefix_cache / _dual_cache):

  refresh  one full forward of the whole sequence x [B, L] writes every position's keys/values (all layers)
           into the cache, and its logits serve the step. At step 0 of every block (Fast-dLLM's only
           refresh), and at any other step where the refresh policy says so.
  prefix   between refreshes a step recomputes the current block AND everything after it, x[:, s:] with
           s = block * block_length: its queries attend the cached keys/values of the prefix [0, s) and
           their own fresh ones. Cost per step: (L - s) queries over L keys (and the suffix's logits, which
           are discarded). The slice length must be static, so a prefix step compiles once per block.
  dual     between refreshes a step recomputes only the current block [s, s + block_length): it attends
           the cached prefix, its own fresh keys/values and the cached suffix (in semi-AR decoding the
           suffix is still masked). Cost per step: block_length queries over L keys.

Both write the recomputed slice's keys/values back into the cache (Fast-dLLM's dual cache does the same with
its replace_position): those slots are recomputed at every step anyway, and writing in place saves
concatenating the cache with the fresh keys at every layer.

Both are approximations: the cached keys/values are those of the sequence at the last refresh, and in a
bidirectional network the keys of every position depend on every token, so the tokens committed since then
reach the cached positions only at the next refresh. On the input of the refresh they are exact: a step right
after a refresh on the same x gives the full forward's logits (tests/test_caches.py, float64).

Time conditioning. LLaDA (Fast-dLLM's network) is time-free, as are RADD/MD4-style DiTs (model
time_conditioning=False), and there is nothing more to decide. A time-conditioned DiT is shown, at every call,
the time of the current sequence (parallel.sequence_time: alpha(t) = its unmasked fraction), as the uncached
provider does: the recomputed positions see the current time and the cached keys/values the time of their
refresh, stale in time just as in tokens, and exact again at the next refresh.

The refresh policy is one function, so dKV-Cache- or dLLM-Cache-style schedules are one function away:

    refresh(block int32 [], step int32 [], state: CacheState, x int32 [B, L]) -> bool []

`step` counts from 0 inside each block (step 0 always refreshes); `state.tokens` is the sequence at the last
refresh and `state.since` the cached steps since then. Examples: parallel.refresh_every(k) (every k steps of
a block, config.sampler.refresh_every=k) and `refresh_when_changed(n)` (adaptive: once some row has n tokens
committed since the last refresh, the keys that went stale with them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ddlm import schedules as schedules_lib
from ddlm.models.decoding import Decoder
from ddlm.models.layers import KVCache
from ddlm.sampling import parallel

CACHES = ("none", "prefix", "dual")


class CacheState(NamedTuple):
    """The provider's loop carry."""

    cache: KVCache  # per layer keys/values [B, L, heads, head_dim] (keys rotated)
    tokens: jax.Array  # int32 [B, L]: the sequence at the last refresh
    since: jax.Array  # int32 []: cached (non-refresh) steps since the last refresh


RefreshPolicy = Callable[[jax.Array, jax.Array, CacheState, jax.Array], jax.Array]


def refresh_when_changed(n: int) -> RefreshPolicy:
    """Refresh once some row has n or more tokens that differ from the last refresh's sequence (n >= 1)."""
    if n < 1:
        raise ValueError(f"refresh_when_changed: n must be >= 1, got {n}")
    return lambda block, step, state, x: jnp.max(jnp.sum(x != state.tokens, axis=-1)) >= n


def refresh_policy(refresh_every: int) -> RefreshPolicy | None:
    """config.sampler.refresh_every -> the policy: 0 = once per block (None: only the step-0 refresh),
    k >= 1 = also at steps k, 2k, ... of each block (1 = every step: the uncached logits)."""
    if refresh_every < 0:
        raise ValueError(
            f"config.sampler.refresh_every must be an integer >= 0 (0 = once per block), got {refresh_every}"
        )
    return parallel.refresh_every(refresh_every) if refresh_every else None


def check_cache(cache: str, decoder: Decoder | None) -> None:
    """One ValueError naming config.sampler.cache for an unknown cache or a network that cannot use it."""
    if cache not in CACHES:
        raise ValueError(f"config.sampler.cache={cache!r}: expected one of {CACHES}")
    if cache == "none":
        return
    if decoder is None:
        raise ValueError(
            f"config.sampler.cache={cache!r} needs the network's decode path: pass "
            "decoder=models.make_decoder(model, variables) to make_sampler"
        )
    if decoder.attention != "bidirectional":
        raise ValueError(
            f"config.sampler.cache={cache!r} is Fast-dLLM's cache for bidirectional networks "
            f"(config.model.name='dit'); this network's attention is {decoder.attention!r}: use cache='none' "
            "(its exact KV cache is sampler 'ar' or 'bd3lm')"
        )


def refresh_step(decoder: Decoder, state: CacheState, x, t=None):
    """A refresh: the full forward of x [B, L], every position's keys/values written into the cache.

    t: float [B] for a time-conditioned network (else None). Returns (logits [B, L, V] in the network's
    stream dtype, the new CacheState)."""
    length = x.shape[1]
    everything = jnp.ones((length,), bool)  # every slot is written: the mask is self-attention
    logits, kv = decoder.step(state.cache, x, jnp.arange(length), everything, None, t, 0)
    return logits, CacheState(kv, x, jnp.zeros((), jnp.int32))


def cached_step(decoder: Decoder, cache: str, state: CacheState, x, block, block_length: int, t=None):
    """A step between refreshes: 'dual' recomputes block `block` (int32 []) of x [B, L], 'prefix' that block
    and everything after it, attending the cached keys/values elsewhere (module doc).

    Returns (logits [B, block_length, V] of the block, the CacheState with the recomputed slots written)."""
    length = x.shape[1]
    # The slice is written at its slots, so `attend` (every slot) means: the cached keys/values outside the
    # slice, the slice's own fresh ones inside it.
    everything = jnp.ones((length,), bool)
    if cache == "dual":
        start = block * block_length
        x_block = jax.lax.dynamic_slice_in_dim(x, start, block_length, axis=1)
        positions = start + jnp.arange(block_length)
        logits, kv = decoder.step(state.cache, x_block, positions, everything, None, t, start)
    elif cache == "prefix":
        # The suffix's length must be static: one branch per block (num_blocks copies of the step).
        def branch(start):
            def run(kv, x):
                positions = jnp.arange(start, length)
                out, kv = decoder.step(kv, x[:, start:], positions, everything, None, t, start)
                return out[:, :block_length], kv

            return run

        branches = [branch(b * block_length) for b in range(length // block_length)]
        logits, kv = jax.lax.switch(block, branches, state.cache, x)
    else:
        raise ValueError(f"cached_step: cache must be 'prefix' or 'dual', got {cache!r}")
    return logits, CacheState(kv, state.tokens, state.since + 1)


def cached_logits_provider(
    decoder: Decoder,
    *,
    cache: str,
    mask_id: int,
    schedule: schedules_lib.Schedule,
    block_length: int,
    refresh: RefreshPolicy | None = None,
) -> parallel.LogitsProvider:
    """The prefix or dual cache (module doc) as a parallel.LogitsProvider over `decoder`.

    block_length: the decoder's block (0 = the whole sequence; then prefix and dual recompute everything).
    refresh: extra refreshes inside a block (None: once per block, at its step 0). Every call, refresh or
    not, counts as one network call (NFE), as in Fast-dLLM. Logits are returned in float32.
    """
    check_cache(cache, decoder)
    if cache == "none":
        raise ValueError("cached_logits_provider: cache='none' is parallel.full_logits_provider")
    if block_length < 0:
        raise ValueError(f"config.sampler.block_length must be >= 0, got {block_length}")

    def time_of(x):
        return parallel.sequence_time(x, mask_id, schedule) if decoder.time_conditioning else None

    def init(x):
        batch, length = x.shape
        return CacheState(decoder.init_cache(batch, length), x, jnp.zeros((), jnp.int32))

    def full(state, x, block):
        bl = block_length or x.shape[1]
        logits, state = refresh_step(decoder, state, x, time_of(x))
        return jax.lax.dynamic_slice_in_dim(logits, block * bl, bl, axis=1).astype(jnp.float32), state

    def partial(state, x, block):
        bl = block_length or x.shape[1]
        logits, state = cached_step(decoder, cache, state, x, block, bl, time_of(x))
        return logits.astype(jnp.float32), state

    def logits(state, x, block, step):
        do_refresh = step == 0
        if refresh is not None:
            do_refresh = jnp.logical_or(do_refresh, refresh(block, step, state, x))
        out, state = jax.lax.cond(do_refresh, full, partial, state, x, block)
        return out, state, jnp.ones((), jnp.int32)

    return parallel.LogitsProvider(init, logits)
