"""The samplers that decode with the network's KV cache: 'ar' (ddlm/sampling/autoregressive.py) and 'bd3lm'
(ddlm/sampling/block.py), against the same decoding without a cache, the network's exact distribution, a
banded-attention reference for the sliding window, and their registration in make_sampler and the CLI."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from model_utils import tiny_decoder, tiny_model

from ddlm import losses, models, sampling, schedules
from ddlm.data import tokenizers
from ddlm.sampling import autoregressive, block, cli, masked
from ddlm.sampling import config as sampler_config

VOCAB = 37
MASK = VOCAB - 1
FAST = {"xla_backend_optimization_level": 0}  # tiny programs compile ~5x faster on CPU
fast_jit = functools.partial(jax.jit, compiler_options=FAST)


@functools.cache
def _decoder(name, time_conditioning=False, vocab=VOCAB):
    return tiny_decoder(name, vocab, time_conditioning)


def _prompted(batch, length, prompt_lengths, seed=0):
    """x_init int32 [batch, length]: random prompts of the given lengths per row, mask_id after them."""
    tokens = np.random.default_rng(seed).integers(0, MASK, (batch, length))
    known = np.arange(length)[None] < np.asarray(prompt_lengths)[:, None]
    return jnp.asarray(np.where(known, tokens, MASK), jnp.int32)


def _ar(dec, kv_cache, **kw):
    return fast_jit(
        lambda rng, x: autoregressive.ar_sample(dec, rng, x, mask_id=MASK, kv_cache=kv_cache, **kw)
    )


# ------------------------------------------------------------------------------------------------ AR


def test_ar_with_the_cache_gives_the_tokens_of_ar_without_it():
    dec = _decoder("ar")
    length, chunk = 24, 4
    x = _prompted(4, length, [7, 9, 12, 7]).at[2, 20].set(5)  # row 2 also has a constraint at 20
    kw = {"temperature": 0.9, "top_k": 20, "top_p": 0.95, "prefill_chunk": chunk}
    cached = _ar(dec, True, **kw)(jax.random.key(1), x)
    uncached = _ar(dec, False, **kw)(jax.random.key(1), x)
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    known = np.asarray(x != MASK)
    np.testing.assert_array_equal(np.asarray(cached.tokens)[known], np.asarray(x)[known])
    assert not np.any(np.asarray(cached.tokens) == MASK)
    # Prefill of positions 0..5 in two chunks of 4 (the second's tail is overwritten), one step per position.
    start = 7
    assert int(uncached.nfe) == length - start
    assert int(cached.nfe) == math.ceil((start - 1) / chunk) + length - start
    # A different key gives different tokens (the draws are not degenerate).
    other = _ar(dec, True, **kw)(jax.random.key(2), x)
    assert not np.array_equal(other.tokens, cached.tokens)


def test_ar_draws_each_position_with_every_option_from_the_previous_logits():
    """A reference loop (the full forward, next_token at position p with key fold_in(rng, p), known tokens kept)
    with temperature, top-k, top-p and precision all set: every option must reach the sampler's draw (the
    cache comparison above cannot see a dropped one: both paths share the draw)."""
    dec = _decoder("ar")
    x = _prompted(4, 10, [3, 3, 5, 3]).at[1, 7].set(4)
    opts = {"temperature": 0.7, "top_k": 6, "top_p": 0.9, "precision": "float32_64bit"}
    key = jax.random.key(7)
    forward = fast_jit(dec.forward)
    draw = fast_jit(lambda r, logits: autoregressive.next_token(r, logits, mask_id=MASK, **opts))
    ref = np.asarray(x).copy()
    for p in range(3, 10):
        token = np.asarray(draw(jax.random.fold_in(key, p), forward(jnp.asarray(ref))[:, p - 1]))
        ref[:, p] = np.where(np.asarray(x)[:, p] != MASK, ref[:, p], token)
    for kv_cache in (True, False):
        out = _ar(dec, kv_cache, prefill_chunk=2, **opts)(key, x)
        np.testing.assert_array_equal(np.asarray(out.tokens), ref, err_msg=f"kv_cache={kv_cache}")


def test_ar_samples_the_networks_joint_distribution():
    """Position p is drawn from softmax(logits at p - 1): the samples' histogram over the 4^3 continuations of a
    bos token must match prod_p p(x_p | x_<p) computed from the full forward, within the TV bound."""
    vocab, length, n = 5, 4, 6000  # tokens 0..3, mask 4
    dec = _decoder("ar", vocab=vocab)
    seqs = np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)
    full = np.concatenate([np.zeros((len(seqs), 1), int), seqs], 1)  # bos = token 0
    logits = np.asarray(fast_jit(dec.forward)(jnp.asarray(full)), np.float64)
    logits[..., vocab - 1] = -np.inf
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    exact = np.exp(sum(logp[np.arange(len(seqs)), p - 1, full[:, p]] for p in (1, 2, 3)))
    x = jnp.full((n, length), vocab - 1, jnp.int32).at[:, 0].set(0)
    out = fast_jit(lambda r, x: autoregressive.ar_sample(dec, r, x, mask_id=vocab - 1))(jax.random.key(3), x)
    tokens = np.asarray(out.tokens)
    idx = tokens[:, 1] * 16 + tokens[:, 2] * 4 + tokens[:, 3]
    empirical = np.bincount(idx, minlength=64) / n
    # E[TV] <= 1/2 sum sqrt(p(1-p)/n), plus McDiarmid's deviation for a failure probability of 1e-4.
    bound = 0.5 * np.sum(np.sqrt(exact * (1 - exact) / n)) + math.sqrt(math.log(1e4) / (2 * n))
    tv = 0.5 * np.abs(empirical - exact).sum()
    print(f"AR sampler TV {tv:.4f} (bound {bound:.4f}); max p {exact.max():.3f}")
    assert tv < bound


def test_next_token_and_finish_tokens():
    """next_token: greedy is the argmax without the mask id, a draw follows softmax(logits / temperature)
    without it (counts within 5 standard deviations), top_k=1 is greedy for any key. finish_tokens: after a
    row's first GENERATED eos (a known one does not count) and at positions never generated: pad_id, or eos_id
    if None."""
    logits = jnp.asarray([[0.0, 1.0, 0.5, 3.0], [2.0, -1.0, 0.0, 9.0]])  # id 3 is the mask, the largest
    greedy = autoregressive.next_token(None, logits, mask_id=3, greedy=True)
    np.testing.assert_array_equal(np.asarray(greedy), [1, 0])
    top1 = fast_jit(lambda r: autoregressive.next_token(r, logits, mask_id=3, top_k=1))(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(top1), [1, 0])
    n = 20000
    row = jnp.tile(logits[:1], (n, 1))
    draw = fast_jit(lambda r: autoregressive.next_token(r, row, mask_id=3, temperature=0.5))
    draws = np.asarray(draw(jax.random.key(1)))
    p = np.exp(np.array([0.0, 1.0, 0.5]) / 0.5)
    p /= p.sum()
    freq = np.bincount(draws, minlength=4) / n
    assert freq[3] == 0
    np.testing.assert_array_less(np.abs(freq[:3] - p), 5 * np.sqrt(p * (1 - p) / n))
    m, eos = 9, 3
    x_init = jnp.asarray([[1, m, m, m, m], [1, eos, m, m, m], [1, m, m, m, m]])
    x = jnp.asarray([[1, 5, eos, 6, eos], [1, eos, 4, eos, m], [1, 4, 5, 6, 7]])
    padded = [[1, 5, eos, 0, 0], [1, eos, 4, eos, 0], [1, 4, 5, 6, 7]]
    np.testing.assert_array_equal(autoregressive.finish_tokens(x, x_init, m, eos, 0), padded)
    with_eos = [[1, 5, eos, eos, eos], [1, eos, 4, eos, eos]]
    np.testing.assert_array_equal(autoregressive.finish_tokens(x, x_init, m, eos, None)[:2], with_eos)
    np.testing.assert_array_equal(autoregressive.finish_tokens(x, x_init, m, None, 0), x)


def _first_generated(tokens, x_init, value):
    """[B] first position where `value` was generated (len if never)."""
    hit = (np.asarray(tokens) == value) & (np.asarray(x_init) == MASK)
    return np.where(hit.any(1), hit.argmax(1), hit.shape[1])


def _eos_case(run, x, eos, row):
    """x with eos also known at position 4 of `row` (inside its prompt: a known eos, as GPT-2's bos, must not
    stop a row), the full run on it, and each row's first generated eos; asserts that this row's generated
    eos comes last, so that stopping on the known one would cut it short."""
    x = x.at[row, 4].set(eos)
    full = run(x)
    first = _first_generated(full.tokens, x, eos)
    assert first.max() < x.shape[1] - 4 and first.argmax() == row and np.sort(first)[-2] < first[row], first
    return x, full, first


def _assert_stopped(stopped, full, first, pad):
    expected = np.asarray(full).copy()
    for row, f in enumerate(first):
        expected[row, f + 1 :] = pad
    np.testing.assert_array_equal(stopped, expected)


def test_ar_stops_once_every_row_has_generated_eos():
    dec = _decoder("ar")
    pad = MASK - 1
    run = lambda x, **kw: _ar(dec, True, greedy=True, **kw)(jax.random.key(0), x)
    # Token 3 is generated by every row of this seed's greedy run; row 2 generates it last.
    x, full, first = _eos_case(run, _prompted(4, 32, [4, 6, 8, 5], seed=5), eos=3, row=2)
    stop = run(x, eos_id=3, pad_id=pad, stop_at_eos=True)
    _assert_stopped(stop.tokens, full.tokens, first, pad)
    assert int(stop.nfe) == int(full.nfe) - (31 - first.max())  # no step after the last row's eos


# ------------------------------------------------------------------------------------------------ BD3-LM


def _block_denoiser(kind, steps=3):
    sched = schedules.LogLinearSchedule()
    if kind == "first_hitting":
        return functools.partial(masked.first_hitting_sample, mask_id=MASK, schedule=sched)
    return functools.partial(masked.ancestral_sample, mask_id=MASK, schedule=sched, steps=steps)


def _bd3(dec, denoise_block, kv_cache=True, **kw):
    return fast_jit(
        lambda rng, x: block.block_sample(
            dec, rng, x, denoise_block=denoise_block, mask_id=MASK, kv_cache=kv_cache, **kw
        )
    )


@pytest.mark.parametrize(
    "time_conditioning, inner",
    [(False, "ancestral"), (True, "first_hitting"), (False, "parallel")],
    ids=["time_free", "time", "commit_rule"],
)
def test_bd3lm_with_the_cache_gives_the_tokens_of_bd3lm_without_it(time_conditioning, inner):
    dec = _decoder("bd3lm", time_conditioning)
    x = _prompted(3, 24, [6, 6, 9])  # a block of prompt, a partly known block (and row 2 longer)
    if inner == "parallel":  # through make_sampler: config.sampler.block_sampler, a commit rule per block
        sched = schedules.LogLinearSchedule()
        run = lambda kv: fast_jit(
            sampling.make_sampler(
                _cfg(name="bd3lm", block_sampler="parallel", rule="threshold", kv_cache=kv, temperature=0.8),
                decoder=dec,
                schedule=sched,
                mask_id=MASK,
            )
        )
    else:
        run = lambda kv: _bd3(dec, _block_denoiser(inner), kv)
    cached = run(True)(jax.random.key(1), x)
    uncached = run(False)(jax.random.key(1), x)
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    known = np.asarray(x != MASK)
    np.testing.assert_array_equal(np.asarray(cached.tokens)[known], np.asarray(x)[known])
    assert not np.any(np.asarray(cached.tokens) == MASK)
    # The cache costs one prefill call for the prompt block (block 0, known in every row) and one write per
    # later finished block but the last (4); a time-free network's writes are fused with the next block's
    # first denoising call, which the block sampler counts: no extra call.
    assert int(cached.nfe) == int(uncached.nfe) + 1 + (4 if time_conditioning else 0)
    if inner == "first_hitting":  # one call per masked token (row 0 has the most in every block)
        assert int(uncached.nfe) == int(np.sum(np.asarray(x) == MASK, axis=1).max())


@pytest.mark.parametrize("time_conditioning", [False, True], ids=["fused", "time"])
@pytest.mark.parametrize("chunk", [4, 8, 64])
def test_bd3lm_prompt_prefill_in_chunks_gives_the_tokens_of_the_uncached_forward(chunk, time_conditioning):
    """A prompt of 3 whole blocks (and more in row 1) is written in ceil(12 / chunk) calls, each chunk
    block-causal inside; the tokens are those of the full forward without a cache, the NFE counts the
    prefill calls, the denoiser's calls and the writes a time-conditioned network cannot fuse."""
    dec = _decoder("bd3lm", time_conditioning)
    x = _prompted(2, 32, [12, 18], seed=3)  # 8 blocks of 4: blocks 0-2 known in both rows
    inner = _block_denoiser("first_hitting")
    run = lambda kv: _bd3(dec, inner, kv, prefill_chunk=chunk)
    cached, uncached = run(True)(jax.random.key(2), x), run(False)(jax.random.key(2), x)
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    prefill_calls = -(-12 // chunk)
    writes = 4 if time_conditioning else 0  # blocks 3..6 are written after denoising (not the last, 7)
    assert int(cached.nfe) == int(uncached.nfe) + prefill_calls + writes
    # first-hitting: one call per masked token of the row with the most, per block
    assert int(uncached.nfe) == int(np.sum(np.asarray(x) == MASK, axis=1).max())


def _two_calls(denoise_fn, rng, x_block):
    """Two calls: on the block as it starts, then with every masked position filled by the first call's
    argmax; masked positions take the argmax of (second logits - first logits), so logits reused for the
    second call would give id 0 everywhere."""
    t = jnp.ones((x_block.shape[0],), jnp.float32)
    first = denoise_fn(x_block, t)
    filled = jnp.where(x_block == MASK, jnp.argmax(first.at[..., MASK].set(losses.NEG_INF), -1), x_block)
    second = denoise_fn(filled.astype(jnp.int32), t)
    best = jnp.argmax((second - first).at[..., MASK].set(-1e30), axis=-1).astype(jnp.int32)
    return masked.SampleOutput(jnp.where(x_block == MASK, best, x_block), jnp.full((), 2, jnp.int32), None)


class _CountingDecoder(models.decoding.Decoder):
    """A decoder whose cached steps count themselves as they run (a host callback per executed call)."""

    calls = 0

    def step(self, *args, **kwargs):
        jax.debug.callback(self._count)
        return super().step(*args, **kwargs)

    @classmethod
    def _count(cls):
        cls.calls += 1


def test_bd3lm_fused_write_logits_serve_only_the_blocks_first_call():
    base = _decoder("bd3lm", False)
    dec = _CountingDecoder(base.model, base.variables)
    x = _prompted(2, 24, [5, 7], seed=6)
    _CountingDecoder.calls = 0
    cached = _bd3(dec, _two_calls, True)(jax.random.key(0), x)
    jax.effects_barrier()
    uncached = _bd3(base, _two_calls, False)(jax.random.key(0), x)
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    assert len(np.unique(np.asarray(cached.tokens)[np.asarray(x) == MASK])) > 3
    # prefill of block 0, two calls per later block of which the first is the previous block's fused write
    assert int(cached.nfe) == int(uncached.nfe) + 1 == 2 * 5 + 1 == _CountingDecoder.calls


def test_bd3lm_write_fused_with_a_block_without_masks_is_counted():
    """A block known in every row after a generated one (a constraint): the fused write's logits are not
    used by any denoiser, so the call counts itself; the tokens still equal the uncached forward's."""
    dec = _decoder("bd3lm", False)
    x = np.array(_prompted(2, 24, [4, 4], seed=4))
    x[:, 12:16] = np.arange(4)  # block 3 known in every row
    x = jnp.asarray(x)
    inner = _block_denoiser("first_hitting")
    cached, uncached = (_bd3(dec, inner, kv)(jax.random.key(5), x) for kv in (True, False))
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    # prefill (block 0) + the fused write of block 2 (before the known block 3), which no denoiser counts
    assert int(cached.nfe) == int(uncached.nfe) + 1 + 1


def _greedy_block(denoise_fn, rng, x_block):
    """One call: every masked position of the block gets its argmax (deterministic, for exact references)."""
    logits = denoise_fn(x_block, jnp.ones((x_block.shape[0],), jnp.float32))
    logits = logits.at[..., MASK].set(losses.NEG_INF)
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return masked.SampleOutput(jnp.where(x_block == MASK, best, x_block), jnp.ones((), jnp.int32), None)


def _banded_reference(dec, x_init, window_blocks, blk):
    """Greedy BD3-LM decoding past the context with a sliding window, recomputed without any cache: one pass
    over [all clean blocks | the noised block] with the banded mask (clean block j sees clean blocks
    j - window_blocks + 1 .. j; the noised block b sees clean blocks b - window_blocks .. b - 1 and itself)."""
    batch, length = x_init.shape
    n = length // blk
    size = length + blk
    key_block = np.concatenate([np.arange(length) // blk, np.full(blk, n)])  # the noised slice as block "n"

    @fast_jit
    def logits_of(x, b, mask):
        tokens = jnp.concatenate([x, jax.lax.dynamic_slice_in_dim(x_init, b * blk, blk, axis=1)], 1)
        positions = jnp.concatenate([jnp.arange(length), b * blk + jnp.arange(blk)])
        empty = dec.init_cache(batch, 0)
        return dec.step(empty, tokens, positions, jnp.zeros((size, 0), bool), mask)[0][:, length:]

    x = np.asarray(x_init).copy()
    for b in range(n):
        qb = np.where(key_block == n, b, key_block)  # the noised slice sits at block b
        kb = key_block
        clean_k = kb[None, :] < n
        mask = np.where(
            (key_block == n)[:, None],  # noised queries
            (clean_k & (kb[None, :] < b) & (kb[None, :] >= b - window_blocks)) | (kb[None, :] == n),
            clean_k & (kb[None, :] <= qb[:, None]) & (kb[None, :] > qb[:, None] - window_blocks),
        )
        logits = np.array(logits_of(jnp.asarray(x), b, jnp.asarray(mask)))
        logits[..., MASK] = -np.inf
        cur = x[:, b * blk : (b + 1) * blk]
        x[:, b * blk : (b + 1) * blk] = np.where(cur == MASK, logits.argmax(-1), cur)
    return x


def _greedy_block_at_a_random_time(denoise_fn, rng, x_block):
    """One call at a time t ~ U(0, 1) drawn from the block's key; every masked position takes its argmax."""
    t = jnp.full((x_block.shape[0],), jax.random.uniform(rng), jnp.float32)
    logits = denoise_fn(x_block, t).at[..., MASK].set(losses.NEG_INF)
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return masked.SampleOutput(jnp.where(x_block == MASK, best, x_block), jnp.ones((), jnp.int32), None)


def test_bd3lm_passes_the_block_samplers_time_to_a_time_conditioned_network():
    """The only randomness is the time the block sampler asks for: the same key gives the same tokens with and
    without the cache (so the cache path conditions on t as the training forward does), another key other
    tokens (so t reaches the network)."""
    dec = _decoder("bd3lm", True)
    x = _prompted(3, 16, [2, 5, 3])
    run = {kv: _bd3(dec, _greedy_block_at_a_random_time, kv) for kv in (True, False)}
    a, b = (np.asarray(run[True](jax.random.key(k), x).tokens) for k in (60, 61))
    np.testing.assert_array_equal(np.asarray(run[False](jax.random.key(60), x).tokens), a)
    assert not np.array_equal(a, b)


def test_bd3lm_sliding_window_past_the_context_equals_banded_attention_without_cache():
    """40 tokens from a network whose context is taken as 12 (window 8 = 2 blocks, + the block): the ring
    buffer of cached blocks gives the tokens of banded attention recomputed from scratch (float64, greedy),
    and a window that keeps everything gives other tokens (the test sees the window)."""
    blk, length, window = 4, 40, 8
    with jax.enable_x64(True):
        dec = tiny_decoder("bd3lm", VOCAB, False, dtype=jnp.float64, block_size=blk)
        x = _prompted(2, length, [3, 5])
        ring = _bd3(dec, _greedy_block, window=window)(jax.random.key(0), x)
        reference = _banded_reference(dec, x, window // blk, blk)
        np.testing.assert_array_equal(ring.tokens, reference)
        everything = _bd3(dec, _greedy_block)(jax.random.key(0), x)
    assert not np.array_equal(everything.tokens, ring.tokens)
    np.testing.assert_array_equal(everything.tokens[:, : window + blk], ring.tokens[:, : window + blk])


def test_bd3lm_stops_once_every_row_has_generated_eos():
    dec = _decoder("bd3lm")
    pad = MASK - 1
    run = lambda x, **kw: _bd3(dec, _block_denoiser("first_hitting"), **kw)(jax.random.key(0), x)
    x, full, first = _eos_case(run, _prompted(3, 32, [4, 6, 8], seed=0), eos=9, row=1)
    stop = run(x, eos_id=9, pad_id=pad, stop_at_eos=True)
    _assert_stopped(stop.tokens, full.tokens, first, pad)
    assert int(stop.nfe) < int(full.nfe)  # the blocks after the last row's eos are not decoded


# ------------------------------------------------------------------------------------------------ registration


def _cfg(**kw):
    c = sampler_config.default_config()
    for k, v in kw.items():
        c[k] = v
    return c


def test_cached_samplers_compile_once_and_run_sharded_over_8_devices():
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    batch = NamedSharding(mesh, P("data"))
    rules = (("batch", "data"), ("heads", None), ("kv", None), ("length", None), ("embed", None))
    rules += (("mlp", None), ("vocab", None))
    sched = schedules.LogLinearSchedule()
    for name, c in (
        ("ar", _cfg(name="ar", top_k=10)),
        ("bd3lm", _cfg(name="bd3lm", block_sampler="ancestral", steps=2)),
    ):
        dec = _decoder(name)
        fn = sampling.jit_sampler(c, compiler_options=FAST, decoder=dec, schedule=sched, mask_id=MASK)
        before = sampling.TRACE_COUNTS[name]
        x_host = _prompted(8, 16, [2] * 8)
        longer = _prompted(8, 16, [5] * 8, seed=1)  # another prompt length: the same program
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            x = jax.device_put(x_host, batch)
            a = fn(jax.random.key(0), x)
            b = fn(jax.random.key(1), x)
            fn(jax.random.key(0), jax.device_put(longer, batch))
        assert sampling.TRACE_COUNTS[name] - before == 1, name
        assert a.tokens.sharding.is_equivalent_to(batch, 2), (name, a.tokens.sharding)
        assert not np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens)), name
        single = fn(jax.random.key(0), jax.device_put(x_host, jax.devices()[0]))
        np.testing.assert_array_equal(np.asarray(single.tokens), np.asarray(a.tokens), err_msg=name)
        assert sampling.TRACE_COUNTS[name] - before <= 2, name  # at most one more for one device


def test_bad_input_is_one_clear_error():
    ar, bd3, dit = _decoder("ar"), _decoder("bd3lm"), tiny_decoder("dit", VOCAB, True)
    x = _prompted(2, 16, [2, 2])
    rng = jax.random.key(0)
    denoise = _block_denoiser("ancestral")
    with pytest.raises(ValueError, match="decodes causal networks with a KV cache .config.model.name=.ar.."):
        autoregressive.ar_sample(dit, rng, x, mask_id=MASK)
    with pytest.raises(ValueError, match="decodes block_causal networks with a KV cache"):
        block.block_sample(ar, rng, x, denoise_block=denoise, mask_id=MASK)
    with pytest.raises(
        ValueError, match=r"block_size=4 \(config.model.block_size\) must divide the length 14"
    ):
        block.block_sample(bd3, rng, x[:, :14], denoise_block=denoise, mask_id=MASK)
    with pytest.raises(ValueError, match="window=6 must be 0 or a positive multiple of block_size=4"):
        block.block_sample(bd3, rng, x, denoise_block=denoise, mask_id=MASK, window=6)
    with pytest.raises(ValueError, match="stop_at_eos=True needs eos_id"):
        autoregressive.ar_sample(ar, rng, x, mask_id=MASK, stop_at_eos=True)
    sched = schedules.LogLinearSchedule()
    with pytest.raises(ValueError, match="needs decoder="):
        sampling.make_sampler(_cfg(name="ar"), schedule=None, mask_id=MASK)
    with pytest.raises(ValueError, match="config.sampler.block_sampler must be one of"):
        sampling.make_sampler(
            _cfg(name="bd3lm", block_sampler="ar"), decoder=bd3, schedule=sched, mask_id=MASK
        )
    with pytest.raises(ValueError, match="config.sampler.guidance_scale"):
        sampling.make_sampler(_cfg(name="ar", guidance_scale=1.0), decoder=ar, schedule=None, mask_id=MASK)


# ------------------------------------------------------------------------------------------------ CLI

SEQ_LEN = 16


def _cli_config(model_name, loss, **sampler_fields):
    c = ml_collections.ConfigDict()
    c.model = models.default_config("tiny")
    c.model.name, c.model.block_size, c.model.time_conditioning = model_name, 4, model_name == "dit"
    c.data = ml_collections.ConfigDict({"tokenizer": "byte", "vocab_size": 0})
    c.diffusion = ml_collections.ConfigDict(
        {"loss": loss, "schedule": "loglinear", "schedule_kwargs": {"eps": 1e-3}, "process": "absorbing"}
    )
    c.train = ml_collections.ConfigDict({"seq_len": SEQ_LEN})
    c.sampler = _cfg(num_samples=2, batch_size=2, progress=False, **sampler_fields)
    return c


def _tiny_loader(config, workdir):
    tok = tokenizers.ByteTokenizer()
    name = config.model.name
    model = tiny_model(name, tok.vocab_size, config.model.time_conditioning)
    dec = tiny_decoder(name, tok.vocab_size, config.model.time_conditioning)
    return model, nn.unbox(dec.variables)["params"], tok, None, 0


@pytest.mark.parametrize("name", ["ar", "bd3lm"])
def test_sample_mode_on_ar_and_bd3lm_networks(name, tmp_path):
    # bd3lm past the training context: 24 tokens from a network trained on 16 (sliding window of 12).
    seq_len = 24 if name == "bd3lm" else SEQ_LEN
    c = _cli_config(name, name, name=name, prompt="ab", seq_len=seq_len, steps=2)
    records = cli.run_sampling(c, str(tmp_path), load_fn=_tiny_loader)
    tok = tokenizers.ByteTokenizer()
    assert len(records) == 2
    for r in records:
        assert r["tokens"][:3] == [tok.bos_id, ord("a"), ord("b")] and len(r["tokens"]) == seq_len
        assert r["sampler"] == name and r["nfe"] > 0
    assert c.sampler.window == 0  # the run's own copy got the window, not the caller's config


def test_sample_mode_errors_name_the_field(tmp_path):
    run = lambda c: cli.run_sampling(c, str(tmp_path), load_fn=_tiny_loader)
    with pytest.raises(
        ValueError,
        match="config.sampler.name='ar' decodes with a KV cache and needs config.model.name='ar', got 'dit'",
    ):
        run(_cli_config("dit", "mdlm", name="ar"))
    with pytest.raises(
        ValueError, match="config.diffusion.loss='bd3lm' is sampled with config.sampler.name='bd3lm'"
    ):
        run(_cli_config("bd3lm", "bd3lm", name="ancestral"))
    with pytest.raises(ValueError, match="config.model.block_size=4 must divide the sample length 18"):
        run(_cli_config("bd3lm", "bd3lm", name="bd3lm", seq_len=18))
    with pytest.raises(
        ValueError, match="config.sampler.prompt is 17 tokens, longer than the sample length 16"
    ):
        run(_cli_config("ar", "ar", name="ar", prompt="x" * 16))


def test_ar_steps_attend_only_the_filled_segment_of_the_cache():
    """AR decodes in segments: the loop of a segment runs on the cache cut to the segment's end, so a step at
    position p reads at most p + segment slots; the tokens stay those of decoding without a cache."""
    dec = _decoder("ar")
    seen = []

    class Recording(models.Decoder):
        def step(self, cache, tokens, *args):
            if tokens.shape[1] == 1:  # the single-token steps (not the prefill chunks)
                seen.append(cache.keys[0].shape[1])
            return super().step(cache, tokens, *args)

    rec = Recording(dec.model, dec.variables)
    length = 24
    x = _prompted(3, length, [7, 2, 12]).at[1, 20].set(5)
    kw = {"temperature": 0.9, "prefill_chunk": 4}
    cached = _ar(rec, True, segment=4, **kw)(jax.random.key(1), x)
    assert seen == [4, 8, 12, 16, 20, 24], seen
    uncached = _ar(dec, False, **kw)(jax.random.key(1), x)
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    assert int(cached.nfe) == 1 + length - 2  # one prefill chunk (position 0), a step per position from 2
    assert autoregressive.segment_ends(1024, 128) == [128 * i for i in range(1, 9)]
    assert autoregressive.segment_ends(4096, 128) == [512 * i for i in range(1, 9)]  # at most 8 segments
    assert autoregressive.segment_ends(100, 0) == autoregressive.segment_ends(100, 128) == [100]
