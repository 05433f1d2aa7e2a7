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
step on block_size tokens. kv_cache=False recomputes the full 2L-input forward at every call (the same
logits: the same tokens for the same key; the tests compare the two).

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
      progress_fn(blocks_done): called after every block, if given.

    Returns:
      SampleOutput(tokens int32 [B, L], nfe = denoiser calls + cache writes, None).
    """
    check_decoding_inputs(decoder, "block_causal", "bd3lm", x_init, mask_id, stop_at_eos, eos_id)
    x_init = x_init.astype(jnp.int32)
    batch, length = x_init.shape
    block = decoder.block_size
    if length % block:
        raise ValueError(f"block_size={block} (config.model.block_size) must divide the length {length}")
    if window < 0 or window % block:
        raise ValueError(f"window={window} must be 0 or a positive multiple of block_size={block}")
    sliding = 0 < window < length
    if sliding and not kv_cache:
        raise ValueError("a sliding window (0 < window < length) needs kv_cache=True")
    num_blocks = length // block
    window_blocks = window // block if sliding else num_blocks
    capacity = window_blocks * block
    time_conditioning = decoder.time_conditioning
    in_block = jnp.arange(block)
    shift = kv_cache and decoder.logit_shift  # without the cache, the training forward shifts by itself

    def body(carry):
        b, x, cache, slot_block, nfe, done, last_logits = carry
        start = b * block
        positions = start + in_block
        x_block = jax.lax.dynamic_slice_in_dim(x, start, block, axis=1)
        # Cache slots holding a clean block (the ring keeps only the last window_blocks blocks).
        attend = jnp.repeat(slot_block >= 0, block) if kv_cache else None

        def denoise_fn(xt_block, t):
            t = t if time_conditioning else None
            if kv_cache:
                logits = decoder.step(cache, xt_block, positions, attend, None, t, None)[0]
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
        if kv_cache:
            slot = b % window_blocks

            def write():
                # The clean block at t = 0 attends the cached blocks and itself (block-causal), as the x0 half
                # of the training input; its keys/values replace the oldest block in the ring.
                t0 = jnp.zeros((batch,), jnp.float32) if time_conditioning else None
                logits, new_cache = decoder.step(cache, tokens, positions, attend, None, t0, slot * block)
                last = logits[:, -1].astype(last_logits.dtype) if shift else last_logits
                return new_cache, slot_block.at[slot].set(b), nfe + 1, last

            # The last block's keys are never read: skip its write.
            cache, slot_block, nfe, last_logits = jax.lax.cond(
                b < num_blocks - 1, write, lambda: (cache, slot_block, nfe, last_logits)
            )
        if stop_at_eos:
            generated = jax.lax.dynamic_slice_in_dim(x_init, start, block, axis=1) == mask_id
            done = done | jnp.any((tokens == eos_id) & generated, axis=1)
        if progress_fn is not None:
            jax.debug.callback(progress_fn, b + 1)
        return b + 1, x, cache, slot_block, nfe, done, last_logits

    def cond(carry):
        b, *_, done, _ = carry
        return (b < num_blocks) & ~jnp.all(done)

    cache = decoder.init_cache(batch, capacity) if kv_cache else None
    slot_block = jnp.full((window_blocks,), -1, jnp.int32)
    carry = (
        jnp.zeros((), jnp.int32),
        x_init,
        cache,
        slot_block,
        jnp.zeros((), jnp.int32),
        jnp.zeros((batch,), bool),
        # The previous clean block's last output (logit shift); a scalar placeholder otherwise.
        jnp.zeros((batch, decoder.vocab_size) if shift else (), layers.stream_dtype(decoder.model.dtype)),
    )
    _, x, _, _, nfe, _, _ = jax.lax.while_loop(cond, body, carry)
    return SampleOutput(finish_tokens(x, x_init, mask_id, eos_id if stop_at_eos else None, pad_id), nfe, None)
