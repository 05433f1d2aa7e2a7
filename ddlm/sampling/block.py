"""Block diffusion decoding (BD3-LM, Arriola et al. 2025, sec. 3/4): blocks left to right, each denoised by a
masked-diffusion sampler, with the exact KV cache of the finished clean blocks.

    denoise_block = functools.partial(masked.ancestral_sample, mask_id=..., schedule=..., steps=...)
    out = block_sample(decoder, rng, x_init, denoise_block=denoise_block, mask_id=tok.mask_id)

The block denoiser is any sampler `denoise_block(denoise_fn, rng, x_block) -> SampleOutput` over a
[B, block_size] slice (ancestral, cached, first-hitting, or a commit-rule sampler): it sees
denoise_fn(xt_block [B, block], t [B]) -> logits [B, block, V], the network restricted to this block with the
clean blocks before it as context, exactly what the block-causal network computes for that block in training
(the noised block attends the clean blocks before it and itself).

With kv_cache=True the clean blocks live in the network's KV cache: after block b is denoised, one step on its
clean tokens (t = 0, attending the cache and itself) writes its keys/values; each denoising call is then a
step on block_size tokens. Two calls are saved (no ring buffer, see below): the leading blocks known in every
row (a prompt) are written together, prefill_chunk tokens per call, block-causal inside; and for a time-free
network the write of block b is one call on [clean block b | block b + 1 as it starts], whose second half is
block b + 1's first denoising call (its logits are kept and served when the block sampler asks for the block
as it starts), so a generated block costs its denoising calls only. kv_cache=False recomputes the full
2L-input forward at every call (the same logits: the same tokens for the same key; the tests compare the two).

Past the training context: `window` tokens of clean blocks are kept (a ring buffer of window / block_size
block slots); the oldest block's slot is overwritten by the newest. Keys are stored rotated at their
absolute positions and scores depend on position differences only, so nothing is re-rotated; each block sees at
most window + block_size positions, so a window of the training length minus one block keeps every relative
distance inside what the network was trained on.

Logit shift (a network adapted from an AR one, Fast-dLLM v2: decoder.logit_shift): the prediction for position
i is the output at i - 1. Inside a block that is the step's own output one slot to the left; for a block's first
position it is the output at the last position of the previous clean block, which the cache write of that block
computes and the loop keeps (the first block's first position keeps its own output, as the training forward).

Variable length (BD3-LM's variable-length generation): with stop_at_eos the loop ends once every row has
generated eos_id, and the output is padded after each row's first generated eos.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ddlm.models import layers
from ddlm.models.decoding import Decoder
from ddlm.sampling.autoregressive import check_decoding_inputs, finish_tokens
from ddlm.sampling.masked import SampleOutput

# denoise_block(denoise_fn, rng, x_block int32 [B, block]) -> SampleOutput(tokens [B, block], nfe, None)
BlockDenoiser = Callable[..., SampleOutput]


def block_sample(
    decoder: Decoder,
    rng,
    x_init,
    *,
    denoise_block: BlockDenoiser,
    mask_id: int,
    kv_cache: bool = True,
    window: int = 0,
    eos_id: int | None = None,
    pad_id: int | None = None,
    stop_at_eos: bool = False,
    progress_fn: Callable[[jax.Array], None] | None = None,
    prefill_chunk: int = 64,
) -> SampleOutput:
    """BD3-LM sampling, block by block (see the module docstring).

    Args:
      decoder: a block-causal network (models.make_decoder of a 'bd3lm' model).
      rng: key; block b is denoised with fold_in(rng, b), with or without the cache.
      x_init: int32 [B, L] known tokens (a prompt, constraints) and mask_id where generated; L a multiple of
        the network's block_size. Blocks with nothing masked are not denoised (a prompt costs its cache writes).
      denoise_block: the sampler run inside each block.
      kv_cache: reuse the clean blocks' keys/values (False: a full forward per denoising call).
      window: clean tokens kept in the cache (a multiple of block_size); 0 or >= L keeps all.
      eos_id, pad_id, stop_at_eos: variable-length generation (see `finish_tokens`).
      progress_fn(blocks_done): called after every block, if given (once for the prefilled prompt blocks).
      prefill_chunk: with the cache and no sliding window, the leading blocks known in every row (the
        prompt) are written in calls of this many tokens (rounded down to whole blocks, at least one).

    Returns:
      SampleOutput(tokens int32 [B, L], nfe = network calls: prefill chunks + denoiser calls + the cache
      writes not fused with a denoiser call, None).
    """
    check_decoding_inputs(decoder, "block_causal", "bd3lm", x_init, mask_id, stop_at_eos, eos_id)
    x_init = x_init.astype(jnp.int32)
    batch, length = x_init.shape
    block = decoder.block_size
    if length % block:
        raise ValueError(f"block_size={block} (config.model.block_size) must divide the length {length}")
    if window < 0 or window % block:
        raise ValueError(f"window={window} must be 0 or a positive multiple of block_size={block}")
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    sliding = 0 < window < length
    if sliding and not kv_cache:
        raise ValueError("a sliding window (0 < window < length) needs kv_cache=True")
    num_blocks = length // block
    window_blocks = window // block if sliding else num_blocks
    time_conditioning = decoder.time_conditioning
    in_block = jnp.arange(block)
    shift = kv_cache and decoder.logit_shift  # without the cache, the training forward shifts by itself
    # Prompt prefill and fused writes need every block at its own slots (no ring); fusing also needs the
    # denoiser's first call to be independent of its time (a time-free network).
    prefill = kv_cache and not sliding
    fuse = prefill and not time_conditioning
    chunk = max(1, prefill_chunk // block) * block
    # Prefill writes whole chunks: the cache has room for the last one (slots past L are never attended).
    capacity = -(-length // chunk) * chunk if prefill else window_blocks * block
    stream = layers.stream_dtype(decoder.model.dtype)

    def body(carry):
        b, x, cache, slot_block, nfe, done, last_logits, pending, has_pending = carry
        start = b * block
        positions = start + in_block
        x_block = jax.lax.dynamic_slice_in_dim(x, start, block, axis=1)
        # Cache slots holding a clean block (the ring keeps only the last window_blocks blocks).
        attend = _slots(slot_block, block, capacity) if kv_cache else None

        def network(xt_block, t):
            return decoder.step(cache, xt_block, positions, attend, None, t, None)[0].astype(stream)

        def denoise_fn(xt_block, t):
            t = t if time_conditioning else None
            if kv_cache:
                if fuse:  # the previous block's write computed this call's logits (the block as it starts)
                    reuse = has_pending & jnp.all(xt_block == x_block)
                    logits = jax.lax.cond(reuse, lambda: pending, lambda: network(xt_block, t))
                else:
                    logits = network(xt_block, t)
                if shift:  # position i from the output at i - 1 (see the module docstring)
                    first = jnp.where(b == 0, logits[:, 0], last_logits.astype(logits.dtype))
                    logits = jnp.concatenate([first[:, None], logits[:, :-1]], axis=1)
                return logits
            # No cache: the training forward on [xt | x0]; only block b of xt and the clean blocks < b of x
            # reach block b's logits (block_diffusion_mask), so the other positions may hold anything.
            xt = jax.lax.dynamic_update_slice_in_dim(jnp.full_like(x, mask_id), xt_block, start, axis=1)
            logits = decoder.forward(xt, t, x)
            return jax.lax.dynamic_slice_in_dim(logits, start, block, axis=1)

        def denoise():
            out = denoise_block(denoise_fn, jax.random.fold_in(rng, b), x_block)
            return out.tokens.astype(jnp.int32), jnp.asarray(out.nfe, jnp.int32)

        tokens, calls = jax.lax.cond(
            jnp.any(x_block == mask_id), denoise, lambda: (x_block, jnp.zeros((), jnp.int32))
        )
        x = jax.lax.dynamic_update_slice_in_dim(x, tokens, start, axis=1)
        nfe = nfe + calls
        pending_ok = has_pending
        if kv_cache:
            slot = b % window_blocks

            def write():
                # The clean block at t = 0 attends the cached blocks and itself (block-causal), as the x0 half
                # of the training input; its keys/values replace the oldest block in the ring.
                t0 = jnp.zeros((batch,), jnp.float32) if time_conditioning else None
                if not fuse:
                    logits, new_cache = decoder.step(cache, tokens, positions, attend, None, t0, slot * block)
                    last = logits[:, -1].astype(stream) if shift else last_logits
                    return new_cache, slot_block.at[slot].set(b), nfe + 1, last, pending, jnp.zeros((), bool)
                # Fused: one call on [clean block b | block b + 1 as it starts] (block-causal), which writes
                # block b and is block b + 1's first denoising call (its keys, written at b + 1's slots, are
                # never attended: block b + 1's own write replaces them). Counted there, by the denoiser,
                # unless block b + 1 has nothing to denoise.
                following = jax.lax.dynamic_slice_in_dim(x, start + block, block, axis=1)
                pair = jnp.concatenate([tokens, following], axis=1)
                logits, new_cache = decoder.step(
                    cache, pair, start + jnp.arange(2 * block), attend, _block_causal(2, block), t0, start
                )
                logits = logits.astype(stream)
                last = logits[:, block - 1] if shift else last_logits
                calls = nfe + 1 - jnp.any(following == mask_id).astype(jnp.int32)
                return new_cache, slot_block.at[slot].set(b), calls, last, logits[:, block:], jnp.ones((), bool)

            # The last block's keys are never read: skip its write.
            cache, slot_block, nfe, last_logits, pending, pending_ok = jax.lax.cond(
                b < num_blocks - 1,
                write,
                lambda: (cache, slot_block, nfe, last_logits, pending, jnp.zeros((), bool)),
            )
        if stop_at_eos:
            generated = jax.lax.dynamic_slice_in_dim(x_init, start, block, axis=1) == mask_id
            done = done | jnp.any((tokens == eos_id) & generated, axis=1)
        if progress_fn is not None:
            jax.debug.callback(progress_fn, b + 1)
        return b + 1, x, cache, slot_block, nfe, done, last_logits, pending, pending_ok

    def cond(carry):
        b, *_, done, _, _, _ = carry
        return (b < num_blocks) & ~jnp.all(done)

    cache = decoder.init_cache(batch, capacity) if kv_cache else None
    slot_block = jnp.full((window_blocks,), -1, jnp.int32)
    # The previous clean block's last output (logit shift); a scalar placeholder otherwise.
    last_logits = jnp.zeros((batch, decoder.vocab_size) if shift else (), stream)
    first, nfe = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
    if prefill:
        first, cache, last_logits, nfe = _prefill_prompt(decoder, x_init, cache, last_logits, mask_id, chunk, shift)
        slot_block = jnp.where(jnp.arange(num_blocks) < first, jnp.arange(num_blocks), -1).astype(jnp.int32)
        if progress_fn is not None:  # the prefilled blocks are done
            jax.lax.cond(first > 0, lambda: jax.debug.callback(progress_fn, first), lambda: None)
    carry = (
        first,
        x_init,
        cache,
        slot_block,
        nfe,
        jnp.zeros((batch,), bool),
        last_logits,
        # Block b's first denoising logits, computed by block b - 1's fused write (fuse only).
        jnp.zeros((batch, block, decoder.vocab_size) if fuse else (), stream),
        jnp.zeros((), bool),
    )
    _, x, _, _, nfe, _, _, _, _ = jax.lax.while_loop(cond, body, carry)
    return SampleOutput(finish_tokens(x, x_init, mask_id, eos_id if stop_at_eos else None, pad_id), nfe, None)


def _slots(slot_block, block: int, capacity: int):
    """bool [capacity]: the cache slots of clean blocks (slots past the blocks' are never attended)."""
    attend = jnp.repeat(slot_block >= 0, block)
    return jnp.pad(attend, (0, capacity - attend.shape[0]))


def _block_causal(blocks: int, block: int):
    """bool [blocks * block, blocks * block]: query i sees key j iff block(j) <= block(i)."""
    ids = jnp.arange(blocks * block) // block
    return ids[None, :] <= ids[:, None]


def _prefill_prompt(decoder, x_init, cache, last_logits, mask_id: int, chunk: int, shift: bool, known=None):
    """Writes the leading blocks that are known in every row (a prompt; never the last block, whose keys are
    never read) in calls of `chunk` tokens, each block-causal inside and attending the chunks before it, as
    the clean half of the training input. Returns (blocks written, cache, the output at the last written
    position when shifting, calls made). The last chunk may reach past them: those slots stay unattended
    until their blocks' own writes replace them. known: bool [B, L], the known positions (default x_init !=
    mask_id; the canvas sampler passes its clamp, and any token id as mask_id: it only pads the last chunk)."""
    batch, length = x_init.shape
    block = decoder.block_size
    num_blocks = length // block
    known = (x_init != mask_id) if known is None else known
    known = jnp.all(known.reshape(batch, num_blocks, block), axis=(0, 2))
    prompt_blocks = jnp.where(jnp.all(known), num_blocks, jnp.argmin(known))
    prompt_blocks = jnp.minimum(prompt_blocks, num_blocks - 1).astype(jnp.int32)
    calls = (prompt_blocks * block + chunk - 1) // chunk
    padded = jnp.pad(x_init, ((0, 0), (0, cache.keys[0].shape[1] - length)), constant_values=mask_id)
    t0 = jnp.zeros((batch,), jnp.float32) if decoder.time_conditioning else None
    self_attend = _block_causal(chunk // block, block)
    end = prompt_blocks * block  # the output at end - 1 predicts the first position after the prompt

    def body(i, carry):
        cache, last = carry
        start = i * chunk
        tokens = jax.lax.dynamic_slice_in_dim(padded, start, chunk, axis=1)
        attend = jnp.arange(padded.shape[1]) < start
        logits, cache = decoder.step(cache, tokens, start + jnp.arange(chunk), attend, self_attend, t0, start)
        if shift:
            at = jnp.clip(end - 1 - start, 0, chunk - 1)
            last = jnp.where(i == calls - 1, jax.lax.dynamic_index_in_dim(logits, at, 1, False).astype(last.dtype), last)
        return cache, last

    cache, last_logits = jax.lax.fori_loop(0, calls, body, (cache, last_logits))
    return prompt_blocks, cache, last_logits, calls
