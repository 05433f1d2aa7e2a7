"""The LLaMA-family network (ddlm/models/llama.py) and the logit shift of adapted networks: the KV-cache decode
path against the full forward in float64 (causal with grouped-query attention and Qwen2 biases; block-causal
with the logit shift, as the block sampler assembles it), the block sampler with and without the cache on a
shifted network, the shift itself, the presets' parameter counts (eval_shape only) and config errors.
(Logits against PyTorch's LLaMA / Qwen2: tests/test_convert.py.)"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_utils import decode_one_token_at_a_time, tiny_llama, tiny_llama_decoder

from ddlm import models, schedules
from ddlm.models import stack
from ddlm.sampling import block, masked

VOCAB, BATCH, LENGTH, BLOCK = 37, 2, 16, 4
MASK = VOCAB - 1
TOL = 1e-9
FAST = {"xla_backend_optimization_level": 0}  # tiny programs compile ~5x faster on CPU
fast_jit = functools.partial(jax.jit, compiler_options=FAST)


def _tokens(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.randint(k1, (BATCH, LENGTH), 0, MASK), jax.random.randint(k2, (BATCH, LENGTH), 0, MASK)


def _err(a, b):
    return float(jnp.abs(jnp.asarray(a) - jnp.asarray(b)).max())


def test_causal_llama_decode_equals_the_full_forward_float64():
    """GQA (4 query, 2 key/value heads), q/k/v biases, rotary base 500: prefill + one token per step."""
    with jax.enable_x64(True):
        dec = tiny_llama_decoder("causal", VOCAB, jnp.float64)
        xt, _ = _tokens()
        full = fast_jit(dec.forward)(xt)
        assert full.dtype == jnp.float64 and full.shape == (BATCH, LENGTH, VOCAB)
        capacity = LENGTH + 4
        logits, cache = decode_one_token_at_a_time(
            fast_jit(dec.prefill, static_argnums=1), fast_jit(dec.step), xt, 5, capacity
        )
        assert cache.keys[0].shape == (BATCH, capacity, 2, 8)  # the key/value heads only
        assert _err(logits, full) < TOL
        # The network is causal: a later token does not change earlier logits.
        changed = fast_jit(dec.forward)(xt.at[:, 9].set((xt[:, 9] + 1) % MASK))
        assert _err(changed[:, :9], full[:, :9]) < TOL and _err(changed[:, 9:], full[:, 9:]) > 1e-3


@pytest.mark.parametrize("name", ["llama", "bd3lm"])
def test_block_causal_decode_with_the_logit_shift_equals_the_shifted_forward_float64(name):
    """Block by block as ddlm.sampling.block assembles it: a noised block's step output moved one slot right,
    its first slot the last output of the previous clean block's cache write (the first block keeps its own):
    equal to the shifted training forward on [xt | x0], for the LLaMA network and the DiT."""
    with jax.enable_x64(True):
        dec = tiny_llama_decoder("block_causal", VOCAB, jnp.float64, BLOCK, logit_shift=True, name=name)
        assert dec.logit_shift
        xt, x0 = _tokens(1)
        full = fast_jit(dec.forward)(xt, None, x0)
        step = fast_jit(dec.step)
        cache = dec.init_cache(BATCH, LENGTH)
        slots = jnp.arange(LENGTH)
        last = None
        for b in range(LENGTH // BLOCK):
            blk = slice(b * BLOCK, (b + 1) * BLOCK)
            positions = jnp.arange(b * BLOCK, (b + 1) * BLOCK)
            raw, _ = step(cache, xt[:, blk], positions, slots < b * BLOCK, None, None, None)
            first = raw[:, 0] if b == 0 else last
            shifted = jnp.concatenate([first[:, None], raw[:, :-1]], axis=1)
            assert _err(shifted, full[:, blk]) < TOL, f"block {b}"
            written, cache = step(cache, x0[:, blk], positions, slots < b * BLOCK, None, None, b * BLOCK)
            last = written[:, -1]
        # The first position of block 1 depends on the clean tokens before it only, not on the noised block.
        other = fast_jit(dec.forward)(xt.at[:, BLOCK:].set(MASK), None, x0)
        assert (
            _err(other[:, BLOCK], full[:, BLOCK]) < TOL
            and _err(other[:, BLOCK + 1], full[:, BLOCK + 1]) > 1e-3
        )


def _first_hitting(denoise_fn, rng, x_block):
    return masked.first_hitting_sample(
        denoise_fn, rng, x_block, mask_id=MASK, schedule=schedules.LogLinearSchedule(), temperature=0.8
    )


def test_block_sampler_on_a_shifted_network_gives_the_tokens_of_the_uncached_forward():
    dec = tiny_llama_decoder("block_causal", VOCAB, jnp.float32, BLOCK, logit_shift=True)
    prompt = np.random.default_rng(0).integers(0, MASK, (3, 24))
    known = np.arange(24)[None] < np.array([[6], [6], [9]])
    x = jnp.asarray(np.where(known, prompt, MASK), jnp.int32)
    run = lambda kv: fast_jit(
        lambda rng, x: block.block_sample(
            dec, rng, x, denoise_block=_first_hitting, mask_id=MASK, kv_cache=kv
        )
    )
    cached, uncached = run(True)(jax.random.key(1), x), run(False)(jax.random.key(1), x)
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    np.testing.assert_array_equal(np.asarray(cached.tokens)[known], np.asarray(x)[known])
    assert not np.any(np.asarray(cached.tokens) == MASK)


@pytest.mark.parametrize("name", ["llama", "dit"])
def test_shifted_forward_is_the_unshifted_forward_moved_one_position(name):
    """The logit shift adds no parameter: output i of the shifted network is output i - 1 of the same
    parameters unshifted (output 0 stays), bidirectional (DiffuLLaMA) networks of both families."""
    dec = tiny_llama_decoder("bidirectional", VOCAB, logit_shift=True, name=name)
    plain = models.make_decoder(dec.model.clone(logit_shift=False), dec.variables)
    xt, _ = _tokens(2)
    shifted, unshifted = fast_jit(dec.forward)(xt), fast_jit(plain.forward)(xt)
    np.testing.assert_allclose(shifted[:, 1:], unshifted[:, :-1], atol=1e-6)
    np.testing.assert_allclose(shifted[:, 0], unshifted[:, 0], atol=1e-6)
    assert _err(shifted[:, 1:], unshifted[:, 1:]) > 1e-2
    np.testing.assert_array_equal(
        models.logit_shift_sources(8, 4), [0, 0, 1, 2, 11, 4, 5, 6]
    )  # block-causal: block 1 starts from the clean position 3 (index 8 + 3 of [xt | x0])


def test_scanned_llama_matches_the_unrolled_one():
    """The LLaMA block runs in ddlm/models/stack.py's layer scan too: same parameters (stacked), same logits,
    and the scanned decode step equals the unrolled one."""
    dec = tiny_llama_decoder("causal", VOCAB)
    params = nn.meta.unbox(dec.variables)["params"]
    scanned = models.make_decoder(
        dec.model.clone(scan_layers=True), {"params": stack.stack_layers(params, 2)}
    )
    xt, _ = _tokens(3)
    np.testing.assert_allclose(fast_jit(scanned.forward)(xt), fast_jit(dec.forward)(xt), atol=1e-5)
    prefill = lambda d: fast_jit(d.prefill, static_argnums=1)(xt, LENGTH)[0]
    np.testing.assert_allclose(prefill(scanned), prefill(dec), atol=1e-5)


@pytest.mark.parametrize(
    "size, params, non_embedding",
    [("1b", 1_100_048_384, 968_976_384), ("llada_8b", 8_015_581_184, 6_979_588_096)],
)
def test_llama_presets_have_the_published_parameter_counts(size, params, non_embedding):
    """TinyLlama-1.1B and LLaDA-8B (8.02B, 6.98B without the embedding and output layers: Nie et al. 2025,
    Table 5), checked with eval_shape only; every parameter carries logical axis names."""
    config, vocab = models.llama_config(size)
    model = models.get_model(config, vocab)
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    assert models.count_params(boxed) == params
    assert models.count_params(boxed) - 2 * vocab * config.d_model == non_embedding
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )[0]:
        assert isinstance(leaf, nn.LogicallyPartitioned) and len(leaf.names) == leaf.value.ndim, path
    assert models.flops_per_token(config, vocab, 4096) > 6 * params  # matmul params + attention


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_kv_heads", 3, "config.model.num_kv_heads=3 must divide config.model.num_heads=4"),
        ("attention", "sideways", "config.model.attention must be one of"),
        ("time_conditioning", True, "config.model.time_conditioning must be False"),
        ("rope_base", 0.0, "config.model.rope_base must be > 0"),
        ("logit_shift", True, "config.model.logit_shift=True is for diffusion networks"),
    ],
)
def test_llama_config_errors_name_the_field(field, value, message):
    config, _ = models.llama_config("tiny")
    config.attention = "causal" if field == "logit_shift" else config.attention
    config[field] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        models.get_model(config, VOCAB)
    assert tiny_llama("causal", VOCAB).cache_layout == (2, 8)
