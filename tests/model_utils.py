"""Helpers shared by the model and decoding tests."""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(model, xt, t, x0=None, seed=1):
    """Random parameters of the right shapes (with their logical-axis boxes), drawn with numpy: no init compile.

    Unlike the real init, nothing is zero (adaLN-zero and the zero output layer would hide every dependency).
    Leaves get the model's param_dtype (float64 for a float64 network, under jax.enable_x64).
    """
    abstract = jax.eval_shape(functools.partial(model.init, jax.random.key(0)), xt, t, x0=x0)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if leaf.ndim == 1 or "bias" in name:
            value = (1.0 if "scale" in name else 0.0) + 0.3 * rng.standard_normal(leaf.shape)
        else:  # fan-in scaled; the attention output kernel [heads, head_dim, d] has fan-in heads * head_dim
            fan_in = leaf.shape[0] * (leaf.shape[1] if "out_kernel" in name else 1)
            value = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def tiny_model(name, vocab, time_conditioning, dtype=jnp.float32, block_size=4):
    """A 2-layer, 32-wide network of ddlm.models ('dit' | 'ar' | 'bd3lm'); dtype float64 needs jax.enable_x64."""
    from ddlm import models

    c = models.default_config("tiny")
    c.name = name
    c.num_layers, c.d_model, c.num_heads, c.mlp_dim, c.cond_dim = 2, 32, 2, 64, 16
    c.block_size, c.time_conditioning = block_size, time_conditioning
    return models.get_model(c, vocab).clone(dtype=dtype, param_dtype=dtype)


def tiny_decoder(name, vocab, time_conditioning, dtype=jnp.float32, block_size=4, seed=1):
    """models.make_decoder of `tiny_model` with random (nowhere zero) parameters."""
    from ddlm import models

    model = tiny_model(name, vocab, time_conditioning, dtype, block_size)
    tokens = jnp.zeros((1, 4 * block_size), jnp.int32)
    t = jnp.zeros((1,), jnp.float32) if time_conditioning else None
    variables = random_variables(model, tokens, t, tokens if name == "bd3lm" else None, seed=seed)
    return models.make_decoder(model, variables)


def tiny_llama(attention, vocab, dtype=jnp.float32, block_size=4, logit_shift=False, name="llama"):
    """A 2-layer, 32-wide LLaMA network (4 query heads, 2 key/value heads, q/k/v biases, rotary base 500) or,
    with name='dit' / 'bd3lm', the time-free DiT of that attention; dtype float64 needs jax.enable_x64."""
    from ddlm import models

    c, _ = models.llama_config("tiny")
    c.name, c.attention = name, attention if name == "llama" else ""
    c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.mlp_dim = 2, 32, 4, 2, 48
    c.qkv_bias, c.rope_base, c.block_size, c.logit_shift = True, 500.0, block_size, logit_shift
    return models.get_model(c, vocab).clone(dtype=dtype, param_dtype=dtype)


def tiny_llama_decoder(
    attention, vocab, dtype=jnp.float32, block_size=4, logit_shift=False, seed=1, name="llama"
):
    """models.make_decoder of `tiny_llama` with random (nowhere zero) parameters."""
    from ddlm import models

    model = tiny_llama(attention, vocab, dtype, block_size, logit_shift, name)
    tokens = jnp.zeros((1, 4 * block_size), jnp.int32)
    variables = random_variables(
        model, tokens, None, tokens if attention == "block_causal" else None, seed=seed
    )
    return models.make_decoder(model, variables)


def decode_one_token_at_a_time(prefill, step, tokens, start, capacity):
    """Causal decoding of `tokens` [B, L] through a decoder's (prefill, step): prefill tokens[:, :start], then
    one token per step attending the cache slots before it (written in place). Returns the logits of every
    position [B, L, V] and the final cache."""
    logits, cache = prefill(tokens[:, :start], capacity)
    out = [logits]
    slots = jnp.arange(capacity)
    for p in range(start, tokens.shape[1]):
        logits, cache = step(
            cache, tokens[:, p : p + 1], jnp.array([p]), slots < p, jnp.ones((1, 1), bool), None, p
        )
        out.append(logits)
    return jnp.concatenate(out, axis=1), cache


def broken_copy(src, dst, edit_tensors=None, edit_config=None):
    """A copy of the Hugging Face folder src at dst with model.safetensors' tensors (a dict) and config.json (a
    dict) passed through the edit functions, for the importers' one-line error tests. Returns dst."""
    import json
    import os
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    if edit_tensors:
        path = os.path.join(dst, "model.safetensors")
        tensors = load_file(path)
        edit_tensors(tensors)
        save_file(tensors, path)
    if edit_config:
        with open(os.path.join(dst, "config.json")) as f:
            config = json.load(f)
        edit_config(config)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(config, f)
    return dst


def experiment_config(name, arg="smoke"):
    """experiments/<name>.py's get_config(arg) (the recipe files are not a package)."""
    import importlib.util
    import os

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(repo, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
