"""Hugging Face LLaMA / Qwen2 causal LMs (config.json + *.safetensors on local disk) as ddlm's LLaMA network:
the config.model of a config.json, and its parameters loaded onto a mesh. `python -m ddlm.convert` (ddlm/convert.py)
writes them as a ddlm workdir.

Nothing is downloaded: the files are read with the `safetensors` library, one tensor at a time, each laid out
in ddlm's shapes on the host and placed on the mesh with its target NamedSharding
(`jax.make_array_from_callback`: every device receives only its shard), so the full model never sits on one
device; the host holds one tensor at a time.

Layout (Hugging Face -> ddlm, ddlm/models/llama.py); nn.Linear weights are [out, in]:
    model.embed_tokens.weight [V, d]              token_embedding [V', d]  (rows V.. padded; row V = mask)
    model.layers.i.input_layernorm.weight         block_i/norm_attn/scale
    model.layers.i.self_attn.{q,k,v}_proj.weight  block_i/attn/{q,k,v}_kernel [d, heads, head_dim] (= W^T)
    model.layers.i.self_attn.{q,k,v}_proj.bias    block_i/attn/{q,k,v}_bias [heads, head_dim] (Qwen2)
    model.layers.i.self_attn.o_proj.weight        block_i/attn/out_kernel [heads, head_dim, d] (= W^T)
    model.layers.i.post_attention_layernorm       block_i/norm_mlp/scale
    model.layers.i.mlp.{gate,up,down}_proj        block_i/mlp/{gate,up,down}_kernel (= W^T)
    model.norm.weight                             norm_final/scale
    lm_head.weight [V, d] (untied only)           output_kernel [d, V'] (= W^T, padded)
Hugging Face's LLaMA layout already uses the rotate-half rotary convention of `layers.rotary_embedding`, so
no permutation is needed. The converter appends one id, the mask of the diffusion losses and samplers
(ddlm's vocabulary convention: the mask is the last id): its embedding row is the mean of the others (a
common start for a new token), its output column zero.

A missing tensor, a tensor of another shape, or a tensor that is not part of the model is one ConversionError
naming it; so is a config.json field that is missing or malformed, and a safetensors file that is empty,
truncated or damaged (named with its path). Not supported (a clear error): rope_scaling (LLaMA 3.1's
frequency scaling), sliding-window attention, MLP or output-projection biases, activations other than SiLU.

"""

from __future__ import annotations

import glob
import json
import math
import os
import time

import flax
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from ddlm.sharding import ConfigError

SUPPORTED = ("llama", "qwen2")
# Tensors some checkpoints carry that are not parameters (old LLaMA exports store the rotary frequencies).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(ConfigError):
    """A checkpoint that cannot be imported; the message is one line naming the file, field or tensor."""


# ------------------------------------------------------------------------------------------------ config


def read_hf_config(hf_dir: str) -> dict:
    """config.json of hf_dir as a dict; a ConversionError naming the file if it is missing or not a JSON
    object."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"--hf_dir={hf_dir}: no config.json (expected a Hugging Face model folder)")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e}); expected a Hugging Face config.json") from None
    if not isinstance(hf, dict):
        raise ConversionError(f"{path}: expected a JSON object of model fields, got a {type(hf).__name__}")
    return hf


def _count(hf: dict, key: str, default: int | None = None) -> int:
    """config.json's `key`, a positive integer (null or absent: `default`); a ConversionError naming it."""
    value = default if hf.get(key) is None else hf[key]
    if value is None:
        raise ConversionError(f"config.json: {key} is missing (expected a positive integer)")
    if type(value) is not int or value < 1:
        raise ConversionError(f"config.json: {key}={value!r}; expected a positive integer")
    return value


def _number(hf: dict, key: str, default: float, *, positive: bool) -> float:
    """config.json's `key`, a finite number > 0 (positive) or >= 0; a ConversionError naming it."""
    value = default if hf.get(key) is None else hf[key]
    ok = type(value) in (int, float) and math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        raise ConversionError(f"config.json: {key}={value!r}; expected a number {'>' if positive else '>='} 0")
    return float(value)


def _rope_base(hf: dict) -> float:
    """rope_theta, top level (transformers 4) or in rope_parameters (transformers 5); only plain rotary."""
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    if not isinstance(rope, dict) or not isinstance(scaling or {}, dict):
        raise ConversionError("config.json: rope_parameters / rope_scaling must be JSON objects (or absent)")
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type")) or rope.get("rope_type", "default")
    if kind != "default":
        raise ConversionError(
            f"config.json: rope scaling {kind!r} is not supported (plain rotary only; rope_scaling / "
            "rope_parameters.rope_type must be absent or 'default')"
        )
    return _number(hf if "rope_theta" in hf else rope, "rope_theta", 10_000.0, positive=True)


def model_config_from_hf(hf: dict) -> tuple[ml_collections.ConfigDict, int]:
    """(config.model for name 'llama' with causal attention, the checkpoint's vocabulary size V) of a
    Hugging Face config.json; ConversionError naming the field for what the LLaMA network cannot express."""
    from ddlm.models.config import default_config

    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise ConversionError(
            f"config.json: model_type {model_type!r} is not supported; expected one of {SUPPORTED}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(
            f"config.json: hidden_act={hf['hidden_act']!r}; the LLaMA network's SwiGLU uses 'silu'"
        )
    if model_type == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise ConversionError(
            "config.json: attention_bias / mlp_bias = true (biases on the output and MLP projections) are not "
            "supported; only Qwen2's q/k/v biases are"
        )
    if hf.get("use_sliding_window"):
        raise ConversionError("config.json: use_sliding_window=true is not supported (full attention only)")
    d_model, heads = _count(hf, "hidden_size"), _count(hf, "num_attention_heads")
    kv_heads = _count(hf, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ConversionError(
            f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    if hf.get("head_dim") is None and d_model % heads:
        raise ConversionError(
            f"config.json: hidden_size={d_model} is not a multiple of num_attention_heads={heads} (and no "
            "head_dim is given)"
        )
    head_dim = _count(hf, "head_dim", d_model // heads)
    c = default_config("tiny")
    c.name, c.attention = "llama", "causal"
    c.num_layers = _count(hf, "num_hidden_layers")
    c.d_model, c.num_heads = d_model, heads
    c.num_kv_heads = kv_heads
    c.head_dim = 0 if head_dim * heads == d_model else head_dim
    c.mlp_dim = _count(hf, "intermediate_size")
    c.rope_base = _rope_base(hf)
    c.norm_eps = _number(hf, "rms_norm_eps", 1e-6, positive=False)
    c.qkv_bias = model_type == "qwen2"
    c.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    c.time_conditioning, c.dropout, c.cond_dim = False, 0.0, 1
    c.dtype = "float32"
    return c, _count(hf, "vocab_size")


# ------------------------------------------------------------------------------------------------ tensors


def _heads_out(heads: int, head_dim: int):
    """[heads * head_dim, d] (nn.Linear) -> [d, heads, head_dim]."""
    return lambda w: w.T.reshape(w.shape[1], heads, head_dim)


def tensor_plan(model_config, vocab: int) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], object]]:
    """{Hugging Face tensor name: (ddlm parameter path, the tensor's expected shape, host transform)}."""
    c = model_config
    d, heads, kv = c.d_model, c.num_heads, c.num_kv_heads or c.num_heads
    head_dim = c.head_dim or d // heads
    plan = {"model.embed_tokens.weight": (("token_embedding",), (vocab, d), None)}
    for i in range(c.num_layers):
        pre, blk = f"model.layers.{i}.", f"block_{i}"
        plan[pre + "input_layernorm.weight"] = ((blk, "norm_attn", "scale"), (d,), None)
        plan[pre + "post_attention_layernorm.weight"] = ((blk, "norm_mlp", "scale"), (d,), None)
        for name, n in (("q", heads), ("k", kv), ("v", kv)):
            plan[pre + f"self_attn.{name}_proj.weight"] = (
                (blk, "attn", f"{name}_kernel"),
                (n * head_dim, d),
                _heads_out(n, head_dim),
            )
            if c.qkv_bias:
                plan[pre + f"self_attn.{name}_proj.bias"] = (
                    (blk, "attn", f"{name}_bias"),
                    (n * head_dim,),
                    lambda b, n=n: b.reshape(n, head_dim),
                )
        plan[pre + "self_attn.o_proj.weight"] = (
            (blk, "attn", "out_kernel"),
            (d, heads * head_dim),
            lambda w: w.T.reshape(heads, head_dim, d),
        )
        for name in ("gate", "up"):
            plan[pre + f"mlp.{name}_proj.weight"] = (
                (blk, "mlp", f"{name}_kernel"),
                (c.mlp_dim, d),
                np.transpose,
            )
        plan[pre + "mlp.down_proj.weight"] = ((blk, "mlp", "down_kernel"), (d, c.mlp_dim), np.transpose)
    plan["model.norm.weight"] = (("norm_final", "scale"), (d,), None)
    if not c.tie_embeddings:
        plan["lm_head.weight"] = (("output_kernel",), (vocab, d), np.transpose)
    return plan


def index_safetensors(hf_dir: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (file, shape)} from the headers of every *.safetensors file in hf_dir (nothing read)."""
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        raise ConversionError(
            f"--hf_dir={hf_dir}: no *.safetensors files (PyTorch .bin checkpoints are not read)"
        )
    index = {}
    for path in files:
        with _open_safetensors(path) as f:
            for name in f.keys():  # noqa: SIM118 -- a safetensors file handle, not a dict
                if name in index:
                    raise ConversionError(f"tensor {name!r} is in both {index[name][0]} and {path}")
                index[name] = (path, tuple(f.get_slice(name).get_shape()))
    return index


def _open_safetensors(path: str):
    """safe_open(path) (numpy arrays), a ConversionError naming the file if its header cannot be read: an
    empty, truncated or damaged file (safetensors checks the header and that the data fills the file)."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise ConversionError(
            f"{path}: not a readable safetensors file ({' '.join(str(e).split())}): a truncated or damaged "
            "download? expected the files of save_pretrained"
        ) from None


def check_tensors(plan: dict, index: dict, tied: bool) -> None:
    """ConversionError naming the first missing, mis-shaped or unexpected tensor."""
    for name, (_, shape, _) in plan.items():
        if name not in index:
            raise ConversionError(f"tensor {name!r} (shape {shape}) is missing from the safetensors files")
        if index[name][1] != shape:
            raise ConversionError(
                f"tensor {name!r} in {os.path.basename(index[name][0])} has shape {index[name][1]}, expected "
                f"{shape} from config.json"
            )
    for name in index:
        if name in plan or name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        raise ConversionError(
            f"tensor {name!r} in {os.path.basename(index[name][0])} is not a parameter of the model config.json "
            "describes (a config / weights mismatch?)"
        )


# ------------------------------------------------------------------------------------------------ loading


def load_params(hf_dir: str, model, mesh, *, vocab: int, log_every: int = 0):
    """The parameter tree of `model` (a ddlm Llama with vocab_size = vocab + 1) from the safetensors files of
    hf_dir, each leaf a jax.Array sharded over `mesh` per the logical axis rules. The host holds one tensor
    (in its ddlm layout) at a time; each device receives only its shard."""
    from ddlm import sharding

    hf = read_hf_config(hf_dir)
    model_config, hf_vocab = model_config_from_hf(hf)
    if hf_vocab != vocab or model.vocab_size != vocab + 1:
        raise ConversionError(
            f"the network's vocab_size={model.vocab_size} must be config.json's vocab_size={hf_vocab} + 1 (mask)"
        )
    plan = tensor_plan(model_config, vocab)
    index = index_safetensors(hf_dir)
    check_tensors(plan, index, model_config.tie_embeddings)

    boxed, _ = sharding.abstract_params(model, sharding.model_init_inputs("ar", 1, 8))
    targets = flax.traverse_util.flatten_dict(sharding.sharded_abstract_params(boxed, mesh))
    planned = {path: name for name, (path, _, _) in plan.items()}
    missing = sorted("/".join(p) for p in targets if p not in planned)
    if missing:  # a network / plan disagreement: a bug here, not in the checkpoint
        raise ConversionError(f"no Hugging Face tensor is mapped to the parameters {missing}")
    handles = {}
    out = {}
    t0 = time.time()
    try:
        for k, (path, target) in enumerate(targets.items()):
            name = planned[path]
            file = index[name][0]
            if file not in handles:
                handles[file] = _open_safetensors(file).__enter__()
            value = _read_tensor(handles[file], file, name)
            transform = plan[name][2]
            value = np.asarray(transform(value) if transform is not None else value)
            value = _pad_vocab(path, value, target.shape, vocab)
            out[path] = _place(value.astype(target.dtype), target.sharding)
            if log_every and (k + 1) % log_every == 0:
                print(f"convert: {k + 1}/{len(targets)} tensors, {time.time() - t0:.1f}s", flush=True)
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    return flax.traverse_util.unflatten_dict(out)


def _read_tensor(handle, file: str, name: str) -> np.ndarray:
    """Tensor `name` of an open safetensors file as numpy (bfloat16 too: jax's ml_dtypes registers it); a
    ConversionError naming the file and tensor if it cannot be read (an I/O error, a dtype numpy lacks)."""
    from safetensors import SafetensorError

    try:
        return handle.get_tensor(name)
    except (SafetensorError, OSError, TypeError) as e:
        raise ConversionError(
            f"{file}: tensor {name!r} cannot be read ({type(e).__name__}: {' '.join(str(e).split())})"
        ) from None


def _pad_vocab(path, value: np.ndarray, shape, vocab: int) -> np.ndarray:
    """The embedding [V, d] / output kernel [d, V] into the padded [V', d] / [d, V'] with the mask id V: its
    embedding row the mean of the others, its output column zero; padding rows zero."""
    if path not in (("token_embedding",), ("output_kernel",)):
        return value
    out = np.zeros(shape, value.dtype)
    if path == ("token_embedding",):
        out[:vocab] = value
        out[vocab] = value.astype(np.float64).mean(axis=0)
    else:
        out[:, :vocab] = value
    return out


def _place(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """value on sharding's devices, each device sent only its shard (multi-process safe)."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
