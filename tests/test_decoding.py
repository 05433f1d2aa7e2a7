"""The network's KV-cache decode path (ddlm/models/decoding.py, Transformer.decode) against the training
forward: causal prefill + single-token steps, the block-causal (BD3-LM) noised block over the clean cache,
and bidirectional slices over keys/values of a full pass (what Fast-dLLM's prefix and dual caches build on).

Exactness is checked on float64 networks (under jax.enable_x64), where a wrong mask, position or write shows as
an error of order 1e-2 and the right formula agrees to ~1e-14; tolerance 1e-9. Sharding on 8 fake devices in
float32."""

import functools

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from model_utils import decode_one_token_at_a_time, tiny_decoder

from ddlm import models
from ddlm.models.decoding import causal_mask

VOCAB, BATCH, LENGTH, BLOCK = 37, 2, 16, 4
TOL = 1e-9
# Tiny programs compile ~5x faster on CPU without LLVM's optimisations (and much faster than eager flax).
FAST = {"xla_backend_optimization_level": 0}
fast_jit = functools.partial(jax.jit, compiler_options=FAST)


def _inputs(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    xt = jax.random.randint(k1, (BATCH, LENGTH), 0, VOCAB)
    x0 = jax.random.randint(k2, (BATCH, LENGTH), 0, VOCAB)
    t = jax.random.uniform(k3, (BATCH,), jnp.float32)
    return xt, x0, t


class _Jitted:
    """forward, prefill and step of a decoder, each jitted once (capacity is static)."""

    def __init__(self, dec):
        self.model, self.variables = dec.model, dec.variables
        self.init_cache = dec.init_cache
        self.forward = fast_jit(dec.forward)
        self.prefill = fast_jit(dec.prefill, static_argnums=1)
        self.step = fast_jit(dec.step)


def _decoder(name, time_conditioning, dtype=jnp.float64, jit=True):
    """A decoder with random (nowhere zero) parameters, its functions jitted; float64 unless asked."""
    dec = tiny_decoder(name, VOCAB, time_conditioning, dtype, BLOCK)
    return _Jitted(dec) if jit else dec


def _err(a, b):
    return float(jnp.abs(jnp.asarray(a) - jnp.asarray(b)).max())


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def test_causal_prefill_and_single_token_steps_equal_the_full_forward():
    dec = _decoder("ar", False)
    xt, _, _ = _inputs()
    full = dec.forward(xt)
    assert full.dtype == jnp.float64
    capacity = LENGTH + 4  # slots past the sequence stay unused
    logits, cache = dec.prefill(xt, capacity)
    assert _err(logits, full) < TOL
    assert len(cache.keys) == 2 and cache.keys[0].shape == (BATCH, capacity, 2, 16)
    # Prefill 5 tokens, then one token per step, each attending the slots before it (written in place).
    logits, cache = decode_one_token_at_a_time(dec.prefill, dec.step, xt, 5, capacity)
    assert _err(logits, full) < TOL
    # The cache written token by token holds the prefill's keys and values.
    _, prefilled = dec.prefill(xt, capacity)
    for a, b in zip(cache.keys + cache.values, prefilled.keys + prefilled.values):
        assert _err(a[:, :LENGTH], b[:, :LENGTH]) < TOL


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_block_causal_noised_block_over_the_clean_cache_equals_the_training_forward(time_conditioning):
    dec = _decoder("bd3lm", time_conditioning)
    xt, x0, _ = _inputs()
    t_tokens = jax.random.uniform(jax.random.key(4), (BATCH, LENGTH)) if time_conditioning else None
    full = dec.forward(xt, t_tokens, x0)
    # Clean blocks are written one at a time as a sampler does (t = 0, attending the cache and themselves).
    cache = dec.init_cache(BATCH, LENGTH)
    slots = jnp.arange(LENGTH)
    zeros = jnp.zeros((BATCH,)) if time_conditioning else None
    step = dec.step
    for b in range(LENGTH // BLOCK):
        blk = slice(b * BLOCK, (b + 1) * BLOCK)
        positions = jnp.arange(b * BLOCK, (b + 1) * BLOCK)
        t_blk = t_tokens[:, blk] if time_conditioning else None  # [B, S] per-token times
        logits, _ = step(cache, xt[:, blk], positions, slots < b * BLOCK, None, t_blk, None)
        assert _err(logits, full[:, blk]) < TOL, f"block {b}"
        _, cache = step(cache, x0[:, blk], positions, slots < b * BLOCK, None, zeros, b * BLOCK)
    # ... and equals the prefill of the clean sequence (block-causal, t = 0).
    _, prefilled = dec.prefill(x0, LENGTH)
    for a, b in zip(cache.keys + cache.values, prefilled.keys + prefilled.values):
        assert _err(a, b) < TOL


def test_bidirectional_slices_over_the_keys_of_a_full_pass_equal_the_full_pass():
    """The property Fast-dLLM's caches build on: a block step on keys/values from a full pass on the same input
    reproduces that pass (dual cache: recompute the block, attend cached prefix and suffix; prefix cache:
    recompute block + suffix, attend the cached prefix), with and without writing the slice back."""
    dec = _decoder("dit", True)
    xt, _, t = _inputs()
    full = dec.forward(xt, t)
    logits, cache = dec.prefill(xt, LENGTH, t)
    assert _err(logits, full) < TOL
    slots = jnp.arange(LENGTH)
    lo, hi = 4, 8
    # Dual cache: the block [lo, hi) recomputed, the cached prefix and suffix attended; nothing written.
    dual = (slots < lo) | (slots >= hi)
    logits, same = dec.step(cache, xt[:, lo:hi], jnp.arange(lo, hi), dual, None, t, None)
    assert _err(logits, full[:, lo:hi]) < TOL
    for a, b in zip(same.keys + same.values, cache.keys + cache.values):
        np.testing.assert_array_equal(a, b)
    # The same step writing the block back leaves the cache as it was (same keys recomputed).
    logits, written = dec.step(cache, xt[:, lo:hi], jnp.arange(lo, hi), dual, None, t, lo)
    assert _err(logits, full[:, lo:hi]) < TOL
    for a, b in zip(written.keys + written.values, cache.keys + cache.values):
        assert _err(a, b) < TOL
    # Prefix cache: block + suffix recomputed together, only the prefix cached.
    logits, _ = dec.step(cache, xt[:, lo:], jnp.arange(lo, LENGTH), slots < lo, None, t, None)
    assert _err(logits, full[:, lo:]) < TOL
    # Per-row validity: row 1 attends no cached suffix, so it differs from the full pass; row 0 does not.
    attend = jnp.stack([dual, slots < lo])[:, None, :]  # [B, 1, C]
    logits, _ = dec.step(cache, xt[:, lo:hi], jnp.arange(lo, hi), attend, None, t, None)
    assert _err(logits[0], full[0, lo:hi]) < TOL and _err(logits[1], full[1, lo:hi]) > 1e-3
    # A different input at the slice (stale cache elsewhere) changes the logits: the fresh keys are used.
    other = (xt[:, lo:hi] + 1) % VOCAB
    logits, _ = dec.step(cache, other, jnp.arange(lo, hi), dual, None, t, None)
    assert _err(logits, full[:, lo:hi]) > 1e-3


def test_decode_errors_name_the_argument():
    dec = _decoder("ar", False, dtype=jnp.float32, jit=False)  # static checks: traced eagerly
    xt, _, _ = _inputs()
    cache = dec.init_cache(BATCH, LENGTH)
    slots = jnp.arange(LENGTH)
    with pytest.raises(ValueError, match="tokens must be int"):
        dec.step(cache, xt[0], jnp.arange(LENGTH), slots < 0)
    with pytest.raises(ValueError, match="positions must be"):
        dec.step(cache, xt[:, :2], jnp.arange(3), slots < 0)
    with pytest.raises(ValueError, match="attend must be bool"):
        dec.step(cache, xt[:, :2], jnp.arange(2), jnp.zeros((LENGTH + 1,), bool))
    with pytest.raises(ValueError, match="self_attend must be bool"):
        dec.step(cache, xt[:, :2], jnp.arange(2), slots < 0, jnp.ones((3, 3), bool))
    with pytest.raises(ValueError, match="must fit the cache"):
        dec.step(cache, xt[:, :2], jnp.arange(2), slots < 0, None, None, LENGTH - 1)
    with pytest.raises(ValueError, match="cache keys must be"):
        dec.step(dec.init_cache(BATCH + 1, LENGTH), xt[:, :2], jnp.arange(2), slots < 0)
    with pytest.raises(ValueError, match="t is required"):
        _decoder("dit", True, dtype=jnp.float32, jit=False).step(cache, xt[:, :2], jnp.arange(2), slots < 0)
    with pytest.raises(ValueError, match="capacity=4 is smaller"):
        dec.prefill(xt, 4)
    unknown = models.make_decoder(dec.model.clone(attention_impl="flash"), dec.variables)
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        unknown.step(cache, xt[:, :2], jnp.arange(2), slots < 0)
    # The decode path runs XLA's attention for every kernel, so one that cannot run here still decodes.
    pallas = models.make_decoder(dec.model.clone(attention_impl="pallas"), dec.variables)
    args = (cache, xt[:, :2], jnp.arange(2), slots < 0)
    np.testing.assert_array_equal(pallas.step(*args)[0], dec.step(*args)[0])


def test_sharded_decode_step_matches_unsharded_and_keeps_the_cache_sharded():
    """The cache carries ('batch', 'length', 'heads', 'kv'): under the trainer's rules on a (2, 2, 2) mesh it
    is split over the batch (data x fsdp) and the heads (tensor), and the values do not change."""
    from ddlm.train import sharding

    with jax.enable_x64(False):
        dec = _decoder("ar", False, dtype=jnp.float32)
        xt = jnp.concatenate([_inputs()[0]] * 2)  # batch 4 over data x fsdp
        slots = jnp.arange(LENGTH)

        def run(variables, xt):
            d = models.make_decoder(dec.model, variables)
            _, cache = d.prefill(xt[:, :8], LENGTH)
            return d.step(cache, xt[:, 8:9], jnp.array([8]), slots < 8, None, None, 8)

        expected, _ = fast_jit(run)(dec.variables, xt)
        mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
        rules = sharding.LOGICAL_AXIS_RULES
        specs = nn.get_partition_spec(dec.variables)
        variables = jax.device_put(dec.variables, nn.logical_to_mesh_sharding(specs, mesh, rules))
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            logits, cache = fast_jit(run)(variables, xt)
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
        spec = cache.keys[0].sharding.spec
        assert tuple(spec)[:3] == (("data", "fsdp"), None, "tensor"), spec


def test_attention_over_parts_equals_attention_over_the_concatenated_keys():
    """The no-write decode path's softmax over (cache, fresh keys) without concatenating them: equal to one
    attention over the concatenation, with grouped-query heads, a per-row mask and a query that sees nothing."""
    from ddlm.models import layers

    rng = np.random.default_rng(0)
    b, t, h, kv, dh, c = 2, 3, 4, 2, 8, 7
    q = jnp.asarray(rng.standard_normal((b, t, h, dh)))
    k1, v1 = (jnp.asarray(rng.standard_normal((b, c, kv, dh))) for _ in range(2))
    k2, v2 = (jnp.asarray(rng.standard_normal((b, t, kv, dh))) for _ in range(2))
    m1 = jnp.asarray(rng.random((b, t, c)) < 0.5)
    m2 = jnp.asarray(np.tril(np.ones((t, t), bool))[None].repeat(b, 0))
    m1, m2 = m1.at[1, 2].set(False), m2.at[1, 2].set(False)  # row 1, query 2: no key at all
    out = layers.attention_over_parts(q, ((k1, v1, m1), (k2, v2, m2)))
    keys, values = jnp.concatenate([k1, k2], 1), jnp.concatenate([v1, v2], 1)
    expected = layers.attention(q, keys, values, jnp.concatenate([m1, m2], -1)[:, None])
    assert out.dtype == jnp.float64 and _err(out, expected) < TOL
    # One part is plain attention.
    assert _err(layers.attention_over_parts(q, ((k1, v1, m1),)), layers.attention(q, k1, v1, m1[:, None])) < TOL


def test_a_step_without_write_never_concatenates_the_cache():
    """BD3-LM's denoising calls and Fast-dLLM's dual steps do not write: their attention reads the cache in
    place (no [B, C + S, ...] copy per layer), and equal the write path's result on the same slice."""
    dec = _decoder("bd3lm", False)
    xt, x0, _ = _inputs()
    _, cache = dec.prefill(x0[:, :8], LENGTH)
    slots = jnp.arange(LENGTH)
    args = (cache, xt[:, 8:12], jnp.arange(8, 12), slots < 8, None, None)
    raw = _decoder("bd3lm", False, jit=False)
    jaxpr = jax.make_jaxpr(lambda *a: raw.step(*a, None))(*args)

    def concatenations(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "concatenate":
                yield eqn
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from concatenations(sub)

    lengths = [e.outvars[0].aval.shape[1] for e in concatenations(jaxpr.jaxpr) if e.outvars[0].aval.ndim == 4]
    assert LENGTH + 4 not in lengths, lengths
    no_write, _ = dec.step(*args, None)
    written, _ = dec.step(*args, 8)
    assert _err(no_write, written) < TOL


def test_per_row_write_index_equals_each_row_decoded_alone():
    """Speculative decoding's rows advance by different amounts: a step with write_index [B] writes each row's
    slice at its own slots and attends each row's own filled slots, as that row decoded alone would."""
    dec = _decoder("ar", False)
    xt, _, _ = _inputs()
    _, cache = dec.prefill(xt, LENGTH + 3)
    starts = np.array([5, 9])  # row r re-decodes tokens [starts[r], starts[r] + 3) over the slots before them
    slots = jnp.arange(LENGTH + 3)
    tokens = jnp.stack([xt[r, s : s + 3] for r, s in enumerate(starts)])
    positions = jnp.asarray(starts[:, None] + np.arange(3))
    attend = (slots[None, None, :] < positions[:, :1, None]) & jnp.ones((1, 3, 1), bool)
    logits, written = dec.step(cache, tokens, positions, attend, causal_mask(3), None, jnp.asarray(starts))
    full = dec.forward(xt)
    for r, s in enumerate(starts):
        assert _err(logits[r], full[r, s : s + 3]) < TOL, f"row {r}"
    # Each row's slots hold its own keys again (the prefill's, recomputed at the rows' own slots).
    _, fresh = dec.prefill(xt, LENGTH + 3)
    for a, b in zip(written.keys, fresh.keys):
        assert _err(a[:, :LENGTH], b[:, :LENGTH]) < TOL
    # Garbage at row 1's slots [9, 12) before the step is overwritten, and the slots after them are not read.
    dirty = jax.tree.map(lambda c: c.at[1, 9:].set(7.0), cache)
    logits2, _ = dec.step(dirty, tokens, positions, attend, causal_mask(3), None, jnp.asarray(starts))
    assert _err(logits2, logits) < TOL
    with pytest.raises(ValueError, match="write_index must be int"):
        dec.step(cache, tokens, positions, attend, causal_mask(3), None, jnp.zeros((3,), jnp.int32))
