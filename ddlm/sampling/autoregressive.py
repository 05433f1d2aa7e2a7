"""The autoregressive baseline: left-to-right decoding of a causal network with a KV cache.

    out = ar_sample(decoder, rng, x_init, mask_id=tok.mask_id)      # decoder = models.make_decoder(model, vars)

x_init int32 [B, L]: known tokens (a prompt, which must include position 0: a bos token when there is no
prompt; hard constraints anywhere) and mask_id where tokens are generated. A masked position 0 is an error
when x_init is a concrete array (under jit its values are unknown: such a row would keep mask_id there). Position p is drawn from the
network's logits at position p - 1 (next-token prediction, the 'ar' loss), known positions are kept.

One compiled program per (B, L): the prompt is prefilled in chunks of `prefill_chunk` tokens by a lax loop
whose trip count is the prompt length (a runtime value, so any prompt length reuses the program); then a
lax.while_loop makes one single-token network step per position, writing that position's keys/values into the
cache in place (dynamic_update_slice on the loop carry), with no host round-trip. A step attends only the filled
part of the cache, to a segment: the positions are decoded in segments of `segment` slots (at most 8), and the
loop of a segment runs on the cache cut to the segment's end (a static shape per segment; the cut and its write
back cost two copies of the cache per segment), so position p reads at most p + segment slots instead of the
whole capacity (at L = 1024 a step reads 575 slots on average instead of 1024). kv_cache=False recomputes
the full causal forward at every position instead (same tokens for the same key: the comparison the tests make
and the benchmark's "no cache" row).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddlm import losses
from ddlm.models.decoding import Decoder, causal_mask
from ddlm.sampling import categorical, masked
from ddlm.sampling.masked import SampleOutput


def next_token(
    rng,
    logits,
    *,
    mask_id: int | None,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    precision: str = "float64",
):
    """A token per row from logits [B, V]: argmax (greedy) or a float64-Gumbel draw from the filtered softmax;
    the mask id is never drawn. Returns int32 [B]."""
    logits = logits.astype(jnp.float32)
    if mask_id is not None:
        logits = logits.at[..., mask_id].set(losses.NEG_INF)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = categorical.filter_logits(logits, temperature, top_k, top_p)
    return categorical.sample_categorical(rng, logits, precision)


def finish_tokens(x, x_init, mask_id: int, eos_id: int | None, pad_id: int | None):
    """Variable-length output: after the first generated eos of a row (not a known one: GPT-2's bos is its eos)
    and at positions never generated, pad_id (eos_id if pad_id is None). x, x_init: int32 [B, L]."""
    if eos_id is None:
        return x
    pad = eos_id if pad_id is None else pad_id
    generated_eos = (x == eos_id) & (x_init == mask_id)
    after = (jnp.cumsum(generated_eos, axis=-1) - generated_eos) > 0
    return jnp.where(after | (x == mask_id), pad, x)


def segment_ends(capacity: int, segment: int, max_segments: int = 8) -> list[int]:
    """The cache capacities of the decoding segments (ar_sample's module doc): multiples of the segment length
    (`segment`, raised to ceil(capacity / max_segments)), ending with `capacity`; [capacity] for segment 0."""
    if segment <= 0 or segment >= capacity:
        return [capacity]
    step = max(segment, -(-capacity // max_segments))
    return list(range(step, capacity, step)) + [capacity]


def check_prompted(x_init, mask_id: int, sampler: str) -> None:
    """A row whose position 0 is mask_id is a ValueError (nothing precedes position 0, so a left-to-right
    sampler never generates it); checked only where x_init's values are known (outside jit)."""
    if isinstance(x_init, jax.core.Tracer):
        return
    unprompted = np.flatnonzero(np.asarray(x_init)[:, 0] == mask_id)
    if unprompted.size:
        raise ValueError(
            f"{sampler}: x_init[:, 0] is mask_id in row(s) {unprompted[:8].tolist()}: position 0 is never "
            "generated (nothing precedes it); start every row with a known token (bos when there is no prompt)"
        )


def check_decoding_inputs(decoder, attention: str, model_name: str, x_init, mask_id, stop_at_eos, eos_id):
    """One clear error for a network whose keys/values this sampler cannot cache (attention other than
    `attention`), a malformed x_init, or stop_at_eos without an eos id."""
    if decoder.attention != attention:
        raise ValueError(
            f"this sampler decodes {attention} networks with a KV cache (config.model.name={model_name!r}); "
            f"this network's attention is {decoder.attention!r}: its keys/values cannot be cached exactly"
        )
    masked._check_init(x_init, mask_id)
    if stop_at_eos and eos_id is None:
        raise ValueError("stop_at_eos=True needs eos_id")


def ar_sample(
    decoder: Decoder,
    rng,
    x_init,
    *,
    mask_id: int,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    precision: str = "float64",
    kv_cache: bool = True,
    eos_id: int | None = None,
    pad_id: int | None = None,
    stop_at_eos: bool = False,
    prefill_chunk: int = 64,
    segment: int = 128,
    progress_fn: Callable[[jax.Array], None] | None = None,
) -> SampleOutput:
    """Autoregressive sampling (greedy, or temperature/top-k/top-p with float64 Gumbel noise) with a KV cache.

    The draw at position p uses the key fold_in(rng, p), with or without the cache, so both give the same
    tokens. stop_at_eos: the loop ends once every row has generated eos_id (variable length); the output is
    padded after each row's first generated eos (see `finish_tokens`). nfe counts network calls: prefill
    chunks plus one single-token step per generated position (without the cache: one full forward per
    position). segment: cache slots a segment adds (module doc; 0 = one segment, the whole cache; raised to
    capacity / 8 so that a long sequence compiles at most 8 loops). progress_fn(position) is called after
    every position, if given.
    Returns SampleOutput(tokens int32 [B, L], nfe, None).
    """
    check_decoding_inputs(decoder, "causal", "ar", x_init, mask_id, stop_at_eos, eos_id)
    check_prompted(x_init, mask_id, "ar_sample")
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    if segment < 0:
        raise ValueError(f"segment must be >= 0 (0 = the whole cache), got {segment}")
    x_init = x_init.astype(jnp.int32)
    batch, length = x_init.shape
    known = x_init != mask_id
    # The first position to generate: the shortest prompt (rows with longer prompts keep theirs as forced
    # tokens). Position 0 is never generated: there is nothing to predict it from.
    first_masked = jnp.where(jnp.any(~known, axis=1), jnp.argmax(~known, axis=1), length)
    start = jnp.maximum(jnp.min(first_masked), 1).astype(jnp.int32)
    choose = lambda key, logits: next_token(
        key,
        logits,
        mask_id=mask_id,
        greedy=greedy,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        precision=precision,
    )

    chunk = min(prefill_chunk, length)
    capacity = -(-length // chunk) * chunk  # prefill writes whole chunks: room for the last one
    slots = jnp.arange(capacity)

    def logits_at(x, cache, p):
        """Logits [B, V] at position p - 1 (predicting p), and the cache (of any capacity > p - 1) with
        position p - 1 written."""
        if kv_cache:
            token = jax.lax.dynamic_slice_in_dim(x, p - 1, 1, axis=1)  # [B, 1]
            filled = jnp.arange(cache.keys[0].shape[1]) < p - 1
            logits, cache = decoder.step(cache, token, (p - 1)[None], filled, jnp.ones((1, 1), bool), None, p - 1)
            return logits[:, 0], cache
        logits = decoder.forward(x)
        return jax.lax.dynamic_index_in_dim(logits, p - 1, axis=1, keepdims=False), cache

    # ---- prefill: positions [0, start - 1) in chunks (the last prompt token goes through the first step) ----
    # Chunk i covers [i*chunk, (i+1)*chunk); its slots past start - 2 get masks or later prompt tokens, which
    # the token loop overwrites (slot p - 1 is written before any query can see it: keys at slots >= p - 1 are
    # masked out of step p).
    cache = decoder.init_cache(batch, capacity) if kv_cache else None
    num_chunks = (start - 1 + chunk - 1) // chunk if kv_cache else jnp.zeros((), jnp.int32)
    if kv_cache:
        x_padded = jnp.pad(x_init, ((0, 0), (0, capacity - length)), constant_values=mask_id)

        def prefill_body(i, cache):
            s = i * chunk
            tokens = jax.lax.dynamic_slice_in_dim(x_padded, s, chunk, axis=1)
            _, cache = decoder.step(
                cache, tokens, s + jnp.arange(chunk), slots < s, causal_mask(chunk), None, s
            )
            return cache

        cache = jax.lax.fori_loop(0, num_chunks, prefill_body, cache)

    # ---- one position per step, segment by segment -----------------------------------------------------------
    # Position p writes slot p - 1, so the segment ending at slot `end` decodes positions p <= end.
    def cond_until(end):
        def cond(carry):
            p, _, _, _, done = carry
            return (p < length) & (p <= end) & ~jnp.all(done)

        return cond

    def body(carry):
        p, x, cache, nfe, done = carry
        logits, cache = logits_at(x, cache, p)
        token = choose(jax.random.fold_in(rng, p), logits)
        forced = jax.lax.dynamic_index_in_dim(known, p, axis=1, keepdims=False)
        token = jnp.where(forced, jax.lax.dynamic_index_in_dim(x_init, p, axis=1, keepdims=False), token)
        x = jax.lax.dynamic_update_slice_in_dim(x, token[:, None], p, axis=1)
        if stop_at_eos:
            done = done | ((token == eos_id) & ~forced)
        if progress_fn is not None:
            jax.debug.callback(progress_fn, p)
        return p + 1, x, cache, nfe + 1, done

    done0 = jnp.zeros((batch,), bool)
    carry = (start, x_init, cache, num_chunks.astype(jnp.int32), done0)
    for end in segment_ends(capacity, segment) if kv_cache else [capacity]:
        if end == capacity:
            carry = jax.lax.while_loop(cond_until(end), body, carry)
            continue
        p, x, full, nfe, done = carry
        part = jax.tree.map(lambda c: c[:, :end], full)  # the filled part and the segment to come
        p, x, part, nfe, done = jax.lax.while_loop(cond_until(end), body, (p, x, part, nfe, done))
        full = jax.tree.map(lambda c, s: jax.lax.dynamic_update_slice_in_dim(c, s, 0, axis=1), full, part)
        carry = (p, x, full, nfe, done)
    _, x, _, nfe, _ = carry
    return SampleOutput(finish_tokens(x, x_init, mask_id, eos_id if stop_at_eos else None, pad_id), nfe, None)
