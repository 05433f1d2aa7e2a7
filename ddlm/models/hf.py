"""Hugging Face checkpoints (config.json + *.safetensors on local disk) as ddlm networks: the config.model of a
config.json, and its parameters loaded onto a mesh. `python -m ddlm.convert` (ddlm/convert.py) writes them as a
ddlm workdir.

Nothing is downloaded: the files are read with the `safetensors` library, one tensor at a time, each laid out
in ddlm's shapes on the host and placed on the mesh with its target NamedSharding
(`jax.make_array_from_callback`: every device receives only its shard), so the full model never sits on one
device; the host holds one tensor at a time.

Families (`detect_family`: --family, else config.json's model_type, else its architectures):

    family  network (ddlm)                          mask id                   read from
    llama   LLaMA, causal                           appended (the last id)    LlamaForCausalLM
    qwen2   LLaMA + q/k/v biases, causal            appended                  Qwen2ForCausalLM
    llada   LLaMA, bidirectional                    its own (126336)          LLaDA's modeling_llada.py
    dream   LLaMA + q/k/v biases, bidirectional,    its own (151666)          Dream's modeling_dream.py
            logit shift
    gpt2    DiT 'ar': learned positions, LayerNorm  appended (untied output,  GPT2LMHeadModel
            biases, attention biases, no rotary     new ids' bias -1e9)
    mdlm    DiT 'dit', adaLN on sigma               its own (the last row)    MDLM's HF DITBackbone
    bd3lm   DiT 'bd3lm' (2L block-causal)           its own (the last row)    BD3-LM's modeling_bd3lm.py
    duo     DiT 'dit', adaLN on sigma (uniform)     appended                  DUO's DIT (MDLM's layout)

LLaMA-family layouts (ddlm/models/llama.py); nn.Linear weights are [out, in], so kernels are W^T:
    Hugging Face (LLaMA / Qwen2 / Dream)      LLaDA (prefix model.transformer.)   ddlm
    model.embed_tokens.weight [V, d]          wte.weight                          token_embedding [V', d]
    model.layers.i.input_layernorm            blocks.i.attn_norm                  block_i/norm_attn/scale
    model.layers.i.self_attn.{q,k,v}_proj     blocks.i.{q,k,v}_proj               block_i/attn/{q,k,v}_kernel
                                                                                  [d, heads, head_dim] (+ bias)
    model.layers.i.self_attn.o_proj           blocks.i.attn_out                   block_i/attn/out_kernel
    model.layers.i.post_attention_layernorm   blocks.i.ff_norm                    block_i/norm_mlp/scale
    model.layers.i.mlp.{gate,up,down}_proj    blocks.i.{ff_proj,up_proj,ff_out}   block_i/mlp/{gate,up,down}_kernel
    model.norm.weight                         ln_f.weight                         norm_final/scale
    lm_head.weight [V, d] (untied)            ff_out.weight                       output_kernel [d, V']
Hugging Face's LLaMA, LLaDA's and MDLM's rotary all use the rotate-half convention of
`layers.rotary_embedding` (LLaDA's `rotate_half` views the head as [2, head_dim / 2]), so no permutation.

GPT-2 (prefix `transformer.` or none; Conv1D weights are [in, out], so no transpose):
    wte.weight [V, d] -> token_embedding and output_kernel (= wte^T: the output is untied so that the ids ddlm
    appends get an output bias of -1e9 and GPT-2's log-probabilities stay exact); wpe.weight -> position_embedding;
    h.i.ln_{1,2}.{weight,bias} -> block_i/norm_{attn,mlp}/{scale,bias}; h.i.attn.c_attn [d, 3d] ->
    block_i/attn/qkv_kernel [d, 3, heads, head_dim] (+ qkv_bias); h.i.attn.c_proj -> out_kernel (+ out_bias);
    h.i.mlp.c_fc / c_proj -> block_i/mlp/fc_in / fc_out; ln_f -> norm_final. The causal-mask buffers
    h.i.attn.bias / masked_bias of old exports are skipped.

MDLM / BD3-LM / DUO (prefix `backbone.` or none; their DDiT is ddlm's DiT, tensor for tensor):
    vocab_embed.embedding -> token_embedding; sigma_map.mlp.{0,2} -> time_embedding/dense_{0,1};
    blocks.i.norm{1,2} -> block_i/norm_{attn,mlp}; blocks.i.attn_qkv [3d, d] -> attn/qkv_kernel (rows ordered
    (three, head, dim)); blocks.i.attn_out -> attn/out_kernel; blocks.i.mlp.{0,2} -> mlp/fc_{in,out};
    blocks.i.adaLN_modulation [6d, cond] -> block_i/adaln (kernel [cond, 6, d]: shift, scale, gate of the
    attention, then of the MLP); output_layer.{norm_final, adaLN_modulation, linear} -> norm_final,
    adaln_final, output_kernel / output_bias. Their time embedding reads the noise level sigma, not t
    (config.model.time_input: 'sigma' = -log(1 - (1 - 1e-3) t); 'zero' for checkpoints trained with
    time_conditioning=False, MDLM's and BD3-LM's published ones, which feed sigma = 0 to their adaLN).

Vocabulary: ddlm's mask is the last id of the network's N ids (N = the tokenizer's vocab_size, >= the
checkpoint's V rows). A family with its own mask id m moves row m to N - 1 (LLaDA, Dream: m and V - 1 swap
places when N = V); a family without one gets it appended. Rows no checkpoint row fills (the appended mask,
a tokenizer's extra ids) start at the mean embedding with a zero output column (an output bias of -1e9 where
the network has one); rows padding the table to V' are zero.

A missing tensor, a tensor of another shape, or a tensor that is not part of the model is one ConversionError
naming it; so is a config.json field that is missing, malformed or describes what the networks cannot
express (named with the field), and a safetensors file that is empty, truncated or damaged (named with its
path). Rope scaling: 'linear' and LLaMA 3.1's 'llama3' are imported; 'dynamic', 'yarn' and the others
refuse. Not imported either: sliding-window attention, MLP or output-projection biases (LLaMA), activations
other than SiLU (LLaMA family) or GELU-tanh (GPT-2), LLaDA's q/k norms, ALiBi, logit scaling.
"""

from __future__ import annotations

import dataclasses
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

FAMILIES = ("llama", "qwen2", "llada", "dream", "gpt2", "mdlm", "bd3lm", "duo")
SUPPORTED = FAMILIES
# config.json's model_type (lower case) or architectures entry -> family.
_MODEL_TYPES = {f: f for f in FAMILIES}
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "LLaDAModelLM": "llada", "DreamModel": "dream",
    "GPT2LMHeadModel": "gpt2", "GPT2Model": "gpt2", "MDLM": "mdlm", "BD3LM": "bd3lm", "DUO": "duo",
}  # fmt: skip
# Tensors some checkpoints carry that are not parameters: the rotary frequencies (old LLaMA exports, MDLM),
# GPT-2's causal-mask buffers, BD3-LM's clipped noise range (var_min).
_BUFFER_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias", "sampling_eps_min", "sampling_eps_max")
# The output bias of the ids a network gains (never predicted: GPT-2's exact log-probabilities).
NEW_ID_BIAS = -1e9
# LLaDA's mask id where config.json does not name one (its generate.py's default).
LLADA_MASK_ID = 126336


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


def detect_family(hf: dict, family: str = "") -> str:
    """The family of a config.json: `family` if given (--family), else its model_type, else the first of its
    architectures that names one; a ConversionError listing the families otherwise."""
    if family:
        if family not in FAMILIES:
            raise ConversionError(f"--family={family}: expected one of {FAMILIES}")
        return family
    model_type = hf.get("model_type")
    if isinstance(model_type, str) and model_type.lower() in _MODEL_TYPES:
        return _MODEL_TYPES[model_type.lower()]
    architectures = hf.get("architectures") or []
    if model_type is None and isinstance(architectures, list):  # a config without model_type (MDLM's era)
        for name in architectures:
            if name in _ARCHITECTURES:
                return _ARCHITECTURES[name]
    raise ConversionError(
        f"config.json: model_type {model_type!r} (architectures {architectures!r}) is not supported; expected "
        f"one of {FAMILIES} (or pass --family=...)"
    )


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


def _flag(hf: dict, key: str, default: bool) -> bool:
    """config.json's boolean `key` (null or absent: default); a ConversionError naming a non-boolean."""
    value = default if hf.get(key) is None else hf[key]
    if not isinstance(value, bool):
        raise ConversionError(f"config.json: {key}={value!r}; expected true or false")
    return value


def _refuse(hf: dict, key: str, ok, why: str) -> None:
    """A ConversionError naming config.json's `key` unless ok(its value)."""
    if not ok(hf.get(key)):
        raise ConversionError(f"config.json: {key}={hf.get(key)!r} is not supported ({why})")


def _rope(hf: dict, c: ml_collections.ConfigDict) -> None:
    """c.rope_base and c.rope_scaling from rope_theta and rope_scaling (transformers 4) or rope_parameters
    (transformers 5). Plain, 'linear' and LLaMA 3.1's 'llama3' rotary; the other kinds are refused."""
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    if not isinstance(rope, dict) or not isinstance(scaling or {}, dict):
        raise ConversionError("config.json: rope_parameters / rope_scaling must be JSON objects (or absent)")
    params = {**rope, **(scaling or {})}
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ConversionError(
            f"config.json: rope scaling {kind!r} is not supported (plain rotary, 'linear' or 'llama3'; "
            "rope_scaling / rope_parameters.rope_type)"
        )
    c.rope_base = _number(hf if "rope_theta" in hf else rope, "rope_theta", 10_000.0, positive=True)
    if kind == "default":
        return
    r = c.rope_scaling
    r.type, r.factor = kind, _number(params, "factor", None, positive=True)
    if kind == "llama3":
        r.low_freq_factor = _number(params, "low_freq_factor", None, positive=True)
        r.high_freq_factor = _number(params, "high_freq_factor", None, positive=True)
        r.original_max_positions = _count(params, "original_max_position_embeddings")
        if not r.low_freq_factor < r.high_freq_factor:
            raise ConversionError(
                f"config.json: rope scaling low_freq_factor={r.low_freq_factor} must be < high_freq_factor="
                f"{r.high_freq_factor}"
            )


def _base_model(name: str, attention: str = ""):
    from ddlm.models.config import default_config

    c = default_config("tiny")
    c.name, c.attention = name, attention
    c.time_conditioning, c.dropout, c.cond_dim = False, 0.0, 1
    c.dtype = "float32"
    return c


def _llama_model(hf: dict, family: str) -> tuple[ml_collections.ConfigDict, int]:
    """config.model (name 'llama') and V of a LLaMA / Qwen2 / Dream config.json."""
    _refuse(hf, "hidden_act", lambda v: v in (None, "silu"), "the LLaMA network's SwiGLU uses 'silu'")
    if family == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
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
    c = _base_model("llama", "bidirectional" if family == "dream" else "causal")
    c.num_layers = _count(hf, "num_hidden_layers")
    c.d_model, c.num_heads, c.num_kv_heads = d_model, heads, kv_heads
    c.head_dim = 0 if head_dim * heads == d_model else head_dim
    c.mlp_dim = _count(hf, "intermediate_size")
    _rope(hf, c)
    c.norm_eps = _number(hf, "rms_norm_eps", 1e-6, positive=False)
    c.qkv_bias = family in ("qwen2", "dream")  # Dream's attention has Qwen2's q/k/v biases, always
    c.tie_embeddings = _flag(hf, "tie_word_embeddings", False)
    c.logit_shift = family == "dream"  # Dream's logits[:, i] come from position i - 1 (cat(l[:, :1], l[:, :-1]))
    return c, _count(hf, "vocab_size")


def model_config_from_hf(hf: dict) -> tuple[ml_collections.ConfigDict, int]:
    """(config.model, the checkpoint's vocabulary size V) of a LLaMA / Qwen2 config.json (the causal families;
    `read_layout` for every family)."""
    family = detect_family(hf)
    if family not in ("llama", "qwen2"):
        raise ConversionError(f"config.json: model_type {hf.get('model_type')!r} is not a causal LLaMA / Qwen2")
    return _llama_model(hf, family)


def _llada_model(hf: dict) -> tuple[ml_collections.ConfigDict, int]:
    """config.model (name 'llama', bidirectional) and V (embedding_size or vocab_size) of LLaDA's config.json
    (OLMo's field names: modeling_llada.py's ModelConfig)."""
    _refuse(hf, "block_type", lambda v: v in (None, "llama"), "LLaDA's 'llama' block only")
    _refuse(hf, "activation_type", lambda v: v in (None, "silu"), "SwiGLU's 'silu' only")
    _refuse(hf, "layer_norm_type", lambda v: v in (None, "rms"), "RMSNorm only")
    _refuse(hf, "layer_norm_with_affine", lambda v: v in (None, True), "RMSNorm with a scale only")
    for key, why in (
        ("include_bias", "biases beyond q/k/v"), ("bias_for_layer_norm", "norm biases"), ("alibi", "ALiBi"),
        ("attention_layer_norm", "q/k norms"), ("scale_logits", "logit scaling"),
        ("input_emb_norm", "embedding scaling"),
    ):  # fmt: skip
        _refuse(hf, key, lambda v: not v, why)
    _refuse(hf, "rope", lambda v: v in (None, True), "rotary positions only")
    _refuse(hf, "clip_qkv", lambda v: v is None, "q/k/v clipping")
    _refuse(hf, "block_group_size", lambda v: v in (None, 1), "block groups")
    d_model, heads = _count(hf, "d_model"), _count(hf, "n_heads")
    kv_heads = 1 if hf.get("multi_query_attention") else _count(hf, "n_kv_heads", heads)
    if d_model % heads or heads % kv_heads:
        raise ConversionError(
            f"config.json: d_model={d_model}, n_heads={heads}, n_kv_heads={kv_heads}: heads must divide d_model "
            "and kv heads the heads"
        )
    c = _base_model("llama", "bidirectional")
    c.num_layers, c.d_model, c.num_heads, c.num_kv_heads = _count(hf, "n_layers"), d_model, heads, kv_heads
    c.mlp_dim = _count(hf, "mlp_hidden_size", (hf.get("mlp_ratio") or 4) * d_model)
    c.rope_base = _number(hf, "rope_theta", 10_000.0, positive=True)
    c.norm_eps = _number(hf, "rms_norm_eps", 1e-5, positive=False)
    c.qkv_bias = _flag(hf, "include_qkv_bias", False)
    c.tie_embeddings = _flag(hf, "weight_tying", False)
    return c, _count(hf, "embedding_size", _count(hf, "vocab_size"))


def _gpt2_model(hf: dict) -> tuple[ml_collections.ConfigDict, int]:
    """config.model (name 'ar': the DiT with learned positions, LayerNorm and attention biases, no rotary) and
    V of GPT-2's config.json."""
    _refuse(hf, "activation_function", lambda v: v in (None, "gelu_new", "gelu_pytorch_tanh"),
            "GELU's tanh approximation only")  # fmt: skip
    _refuse(hf, "layer_norm_epsilon", lambda v: v in (None, 1e-5), "the DiT's LayerNorm epsilon is 1e-5")
    _refuse(hf, "scale_attn_weights", lambda v: v in (None, True), "attention scaled by 1/sqrt(head_dim) only")
    _refuse(hf, "scale_attn_by_inverse_layer_idx", lambda v: not v, "per-layer attention scaling")
    _refuse(hf, "tie_word_embeddings", lambda v: v in (None, True), "GPT-2's output is its embedding")
    d_model, heads = _count(hf, "n_embd"), _count(hf, "n_head")
    if d_model % heads or (d_model // heads) % 2:
        raise ConversionError(f"config.json: n_embd={d_model} is not an even multiple of n_head={heads}")
    c = _base_model("ar")
    c.num_layers, c.d_model, c.num_heads = _count(hf, "n_layer"), d_model, heads
    c.mlp_dim = _count(hf, "n_inner", 4 * d_model)
    c.max_positions = _count(hf, "n_positions", 1024)
    c.norm_bias = c.attention_bias = True
    return c, _count(hf, "vocab_size")


def _dit_model(hf: dict, family: str) -> tuple[ml_collections.ConfigDict, int]:
    """config.model (name 'dit', or 'bd3lm' for BD3-LM's 2L block-causal network) and V of MDLM's / BD3-LM's /
    DUO's Hugging Face config (BD3LMConfig's fields, which are MDLM's)."""
    adaln = _flag(hf, "adaln", True)
    time_conditioning = _flag(hf, "time_conditioning", family == "duo")
    if family == "bd3lm":
        _refuse(hf, "causal", lambda v: not v, "BD3-LM's causal variant")
        if time_conditioning and adaln and _flag(hf, "cross_attn", True):
            raise ConversionError(
                "config.json: time_conditioning=true is not supported for BD3-LM (its clean half reads the noisy "
                "half's sigma; ddlm's reads t = 0)"
            )
    d_model, heads = _count(hf, "hidden_dim"), _count(hf, "n_heads")
    if d_model % heads or (d_model // heads) % 2:
        raise ConversionError(f"config.json: hidden_dim={d_model} is not an even multiple of n_heads={heads}")
    block_causal = family == "bd3lm" and _flag(hf, "cross_attn", True)
    c = _base_model("bd3lm" if block_causal else "dit")
    c.num_layers, c.d_model, c.num_heads = _count(hf, "n_blocks"), d_model, heads
    c.mlp_dim, c.cond_dim = 4 * d_model, _count(hf, "cond_dim")
    c.time_conditioning = adaln
    c.time_input = "sigma" if time_conditioning else "zero"
    if block_causal:
        c.block_size = _count(hf, "block_size")
    return c, _count(hf, "vocab_size")


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one ddlm parameter comes from: a Hugging Face tensor (name, its shape, a host transform into
    ddlm's layout), or nothing (name None: zeros of the parameter's shape, GPT-2's output bias)."""

    name: str | None
    shape: tuple[int, ...] = ()
    transform: object = None


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the importer reads from a checkpoint folder: its family, the network (config.model), its rows V,
    its own mask id (None: ddlm appends one), and {ddlm parameter path: Source}; `optional` tensors may be
    present without being read (a tied lm_head)."""

    family: str
    model: ml_collections.ConfigDict
    vocab: int
    mask_id: int | None
    sources: dict
    optional: tuple = ()

    def min_network_vocab(self) -> int:
        """The fewest ids the network (and its tokenizer) may have: V, plus the mask if it is appended."""
        return self.vocab + (self.mask_id is None)


def read_layout(hf_dir: str, family: str = "", index: dict | None = None) -> Layout:
    """The Layout of the checkpoint in hf_dir (config.json and the safetensors headers; nothing else read)."""
    hf = read_hf_config(hf_dir)
    family = detect_family(hf, family)
    index = index_safetensors(hf_dir) if index is None else index
    if family in ("llama", "qwen2", "dream"):
        c, vocab = _llama_model(hf, family)
        mask_id = _count(hf, "mask_token_id") if family == "dream" else None
        sources, optional = _llama_sources(c, vocab, _HF_NAMES), ("lm_head.weight",) if c.tie_embeddings else ()
    elif family == "llada":
        c, vocab = _llada_model(hf)
        mask_id = _count(hf, "mask_token_id", LLADA_MASK_ID)
        sources, optional = _llama_sources(c, vocab, _LLADA_NAMES), ()
    elif family == "gpt2":
        c, vocab = _gpt2_model(hf)
        prefix = "transformer." if "transformer.wte.weight" in index else ""
        sources, optional, mask_id = _gpt2_sources(c, vocab, prefix), (prefix + "lm_head.weight", "lm_head.weight"), None
    else:
        c, vocab = _dit_model(hf, family)
        prefix = "backbone." if "backbone.vocab_embed.embedding" in index else ""
        # MDLM / BD3-LM append their mask to the tokenizer's ids (MDLM's diffusion.py: mask_index = vocab_size);
        # DUO's uniform-state network has no mask.
        mask_id = None if family == "duo" else vocab - 1
        sources, optional = _dit_sources(c, vocab, prefix), ()
    if mask_id is not None and not 0 <= mask_id < vocab:
        raise ConversionError(f"config.json: mask_token_id={mask_id} is not one of the {vocab} rows")
    return Layout(family, c, vocab, mask_id, sources, optional)


# ------------------------------------------------------------------------------------------------ tensors


def _heads_out(heads: int, head_dim: int):
    """[heads * head_dim, d] (nn.Linear) -> [d, heads, head_dim]."""
    return lambda w: w.T.reshape(w.shape[1], heads, head_dim)


# Role -> tensor name ({i}: the layer) of the LLaMA-family layouts.
_HF_NAMES = {
    "embed": "model.embed_tokens.weight", "norm_attn": "model.layers.{i}.input_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj", "k": "model.layers.{i}.self_attn.k_proj",
    "v": "model.layers.{i}.self_attn.v_proj", "out": "model.layers.{i}.self_attn.o_proj.weight",
    "norm_mlp": "model.layers.{i}.post_attention_layernorm.weight", "gate": "model.layers.{i}.mlp.gate_proj.weight",
    "up": "model.layers.{i}.mlp.up_proj.weight", "down": "model.layers.{i}.mlp.down_proj.weight",
    "norm_final": "model.norm.weight", "lm_head": "lm_head.weight",
}  # fmt: skip
_LLADA_NAMES = {
    role: "model.transformer." + name
    for role, name in {
        "embed": "wte.weight", "norm_attn": "blocks.{i}.attn_norm.weight", "q": "blocks.{i}.q_proj",
        "k": "blocks.{i}.k_proj", "v": "blocks.{i}.v_proj", "out": "blocks.{i}.attn_out.weight",
        "norm_mlp": "blocks.{i}.ff_norm.weight", "gate": "blocks.{i}.ff_proj.weight", "up": "blocks.{i}.up_proj.weight",
        "down": "blocks.{i}.ff_out.weight", "norm_final": "ln_f.weight", "lm_head": "ff_out.weight",
    }.items()
}  # fmt: skip


def tensor_plan(model_config, vocab: int) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], object]]:
    """{Hugging Face tensor name: (ddlm parameter path, the tensor's expected shape, host transform)} of a
    LLaMA / Qwen2 checkpoint (the benchmarks write random ones from it)."""
    sources = _llama_sources(model_config, vocab, _HF_NAMES)
    return {s.name: (path, s.shape, s.transform) for path, s in sources.items()}


def _llama_sources(c, vocab: int, names: dict) -> dict:
    d, heads, kv = c.d_model, c.num_heads, c.num_kv_heads or c.num_heads
    head_dim = c.head_dim or d // heads
    out = {("token_embedding",): Source(names["embed"], (vocab, d))}
    for i in range(c.num_layers):
        blk = f"block_{i}"

        def name(role, i=i):
            return names[role].format(i=i)

        out[(blk, "norm_attn", "scale")] = Source(name("norm_attn"), (d,))
        out[(blk, "norm_mlp", "scale")] = Source(name("norm_mlp"), (d,))
        for role, n in (("q", heads), ("k", kv), ("v", kv)):
            out[(blk, "attn", f"{role}_kernel")] = Source(
                name(role) + ".weight", (n * head_dim, d), _heads_out(n, head_dim)
            )
            if c.qkv_bias:
                out[(blk, "attn", f"{role}_bias")] = Source(
                    name(role) + ".bias", (n * head_dim,), lambda b, n=n: b.reshape(n, head_dim)
                )
        out[(blk, "attn", "out_kernel")] = Source(
            name("out"), (d, heads * head_dim), lambda w: w.T.reshape(heads, head_dim, d)
        )
        out[(blk, "mlp", "gate_kernel")] = Source(name("gate"), (c.mlp_dim, d), np.transpose)
        out[(blk, "mlp", "up_kernel")] = Source(name("up"), (c.mlp_dim, d), np.transpose)
        out[(blk, "mlp", "down_kernel")] = Source(name("down"), (d, c.mlp_dim), np.transpose)
    out[("norm_final", "scale")] = Source(names["norm_final"], (d,))
    if not c.tie_embeddings:
        out[("output_kernel",)] = Source(names["lm_head"], (vocab, d), np.transpose)
    return out


def _gpt2_sources(c, vocab: int, prefix: str) -> dict:
    d, heads, m = c.d_model, c.num_heads, c.mlp_dim
    head_dim = d // heads
    p = prefix
    out = {
        ("token_embedding",): Source(p + "wte.weight", (vocab, d)),
        ("output_kernel",): Source(p + "wte.weight", (vocab, d), np.transpose),  # tied in GPT-2
        ("output_bias",): Source(None),
        ("position_embedding",): Source(p + "wpe.weight", (c.max_positions, d)),
        ("norm_final", "scale"): Source(p + "ln_f.weight", (d,)),
        ("norm_final", "bias"): Source(p + "ln_f.bias", (d,)),
    }
    for i in range(c.num_layers):
        h, blk = f"{p}h.{i}.", f"block_{i}"
        for ln, norm in (("ln_1", "norm_attn"), ("ln_2", "norm_mlp")):
            out[(blk, norm, "scale")] = Source(f"{h}{ln}.weight", (d,))
            out[(blk, norm, "bias")] = Source(f"{h}{ln}.bias", (d,))
        out[(blk, "attn", "qkv_kernel")] = Source(
            h + "attn.c_attn.weight", (d, 3 * d), lambda w: w.reshape(d, 3, heads, head_dim)
        )
        out[(blk, "attn", "qkv_bias")] = Source(
            h + "attn.c_attn.bias", (3 * d,), lambda b: b.reshape(3, heads, head_dim)
        )
        out[(blk, "attn", "out_kernel")] = Source(
            h + "attn.c_proj.weight", (d, d), lambda w: w.reshape(heads, head_dim, d)
        )
        out[(blk, "attn", "out_bias")] = Source(h + "attn.c_proj.bias", (d,))
        out[(blk, "mlp", "fc_in", "kernel")] = Source(h + "mlp.c_fc.weight", (d, m))
        out[(blk, "mlp", "fc_in", "bias")] = Source(h + "mlp.c_fc.bias", (m,))
        out[(blk, "mlp", "fc_out", "kernel")] = Source(h + "mlp.c_proj.weight", (m, d))
        out[(blk, "mlp", "fc_out", "bias")] = Source(h + "mlp.c_proj.bias", (d,))
    return out


def _dit_sources(c, vocab: int, prefix: str) -> dict:
    d, heads, m, cond = c.d_model, c.num_heads, c.mlp_dim, c.cond_dim
    head_dim = d // heads
    p = prefix

    def adaln(name, num):  # nn.Linear(cond, num * d): rows ordered (num, d)
        return {
            "kernel": Source(name + ".weight", (num * d, cond), lambda w: w.T.reshape(cond, num, d)),
            "bias": Source(name + ".bias", (num * d,), lambda b: b.reshape(num, d)),
        }

    out = {
        ("token_embedding",): Source(p + "vocab_embed.embedding", (vocab, d)),
        ("norm_final", "scale"): Source(p + "output_layer.norm_final.weight", (d,)),
        ("output_kernel",): Source(p + "output_layer.linear.weight", (vocab, d), np.transpose),
        ("output_bias",): Source(p + "output_layer.linear.bias", (vocab,)),
    }
    if c.time_conditioning:
        for k, (name, fan_in) in enumerate((("mlp.0", 256), ("mlp.2", cond))):
            out[("time_embedding", f"dense_{k}", "kernel")] = Source(
                f"{p}sigma_map.{name}.weight", (cond, fan_in), np.transpose
            )
            out[("time_embedding", f"dense_{k}", "bias")] = Source(f"{p}sigma_map.{name}.bias", (cond,))
        for leaf, s in adaln(p + "output_layer.adaLN_modulation", 2).items():
            out[("adaln_final", leaf)] = s
    for i in range(c.num_layers):
        b, blk = f"{p}blocks.{i}.", f"block_{i}"
        out[(blk, "norm_attn", "scale")] = Source(b + "norm1.weight", (d,))
        out[(blk, "norm_mlp", "scale")] = Source(b + "norm2.weight", (d,))
        out[(blk, "attn", "qkv_kernel")] = Source(
            b + "attn_qkv.weight", (3 * d, d), lambda w: w.T.reshape(d, 3, heads, head_dim)
        )
        out[(blk, "attn", "out_kernel")] = Source(
            b + "attn_out.weight", (d, d), lambda w: w.T.reshape(heads, head_dim, d)
        )
        out[(blk, "mlp", "fc_in", "kernel")] = Source(b + "mlp.0.weight", (m, d), np.transpose)
        out[(blk, "mlp", "fc_in", "bias")] = Source(b + "mlp.0.bias", (m,))
        out[(blk, "mlp", "fc_out", "kernel")] = Source(b + "mlp.2.weight", (d, m), np.transpose)
        out[(blk, "mlp", "fc_out", "bias")] = Source(b + "mlp.2.bias", (d,))
        if c.time_conditioning:
            for leaf, s in adaln(b + "adaLN_modulation", 6).items():
                out[(blk, "adaln", leaf)] = s
    return out


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


def check_tensors(layout: Layout, index: dict) -> None:
    """ConversionError naming the first missing, mis-shaped or unexpected tensor."""
    read = {}
    for s in layout.sources.values():
        if s.name is not None:
            read[s.name] = s.shape
    for name, shape in read.items():
        if name not in index:
            raise ConversionError(f"tensor {name!r} (shape {shape}) is missing from the safetensors files")
        if index[name][1] != shape:
            raise ConversionError(
                f"tensor {name!r} in {os.path.basename(index[name][0])} has shape {index[name][1]}, expected "
                f"{shape} from config.json"
            )
    for name in index:
        if name in read or name in layout.optional or name.endswith(_BUFFER_SUFFIXES):
            continue
        raise ConversionError(
            f"tensor {name!r} in {os.path.basename(index[name][0])} is not a parameter of the "
            f"{layout.family} model config.json describes (a config / weights mismatch, or another --family?)"
        )


def vocab_rows(vocab: int, mask_id: int | None, network_vocab: int) -> np.ndarray:
    """int [N]: the checkpoint row each of the network's N ids reads (-1: a new id). The checkpoint's ids keep
    their numbers except its mask m, which goes to ddlm's mask id N - 1 (when N = V, the row V - 1 takes m's
    place: the two swap); without a mask the new id N - 1 is the mask."""
    if network_vocab < vocab + (mask_id is None):
        raise ConversionError(
            f"the network's vocab_size={network_vocab} is too small for the checkpoint's {vocab} rows"
            + (" plus the mask id ddlm appends" if mask_id is None else "")
        )
    rows = np.full(network_vocab, -1, np.int64)
    rows[:vocab] = np.arange(vocab)
    if mask_id is not None and mask_id != network_vocab - 1:
        rows[mask_id] = vocab - 1 if network_vocab == vocab else -1
        rows[network_vocab - 1] = mask_id
    return rows


# ------------------------------------------------------------------------------------------------ loading


def load_params(hf_dir: str, model, mesh, *, family: str = "", log_every: int = 0):
    """The parameter tree of `model` (a ddlm network with vocab_size N = its tokenizer's, at least the
    checkpoint's rows plus an appended mask) from the safetensors files of hf_dir, each leaf a jax.Array
    sharded over `mesh` per the logical axis rules. The host holds one tensor (in its ddlm layout) at a time;
    each device receives only its shard."""
    from ddlm import sharding

    index = index_safetensors(hf_dir)
    layout = read_layout(hf_dir, family, index)
    rows = vocab_rows(layout.vocab, layout.mask_id, model.vocab_size)
    check_tensors(layout, index)

    loss = "bd3lm" if model.attention == "block_causal" else "ar"
    seq_len = max(8, model.block_size if loss == "bd3lm" else 1)
    boxed, _ = sharding.abstract_params(model, sharding.model_init_inputs(loss, 1, seq_len))
    targets = flax.traverse_util.flatten_dict(sharding.sharded_abstract_params(boxed, mesh))
    missing = sorted("/".join(p) for p in targets if p not in layout.sources)
    extra = sorted("/".join(p) for p in layout.sources if p not in targets)
    if missing or extra:  # a network / layout disagreement: a bug here, not in the checkpoint
        raise ConversionError(f"the {layout.family} layout misses parameters {missing} and has extra {extra}")
    handles = {}
    out = {}
    t0 = time.time()
    try:
        for k, (path, target) in enumerate(targets.items()):
            source = layout.sources[path]
            if source.name is None:
                value = np.zeros(target.shape, np.float32)
            else:
                file = index[source.name][0]
                if file not in handles:
                    handles[file] = _open_safetensors(file).__enter__()
                value = _read_tensor(handles[file], file, source.name)
                value = np.asarray(source.transform(value) if source.transform is not None else value)
            value = _place_vocab(path, value, target.shape, rows)
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


_VOCAB_AXIS = {("token_embedding",): 0, ("output_kernel",): 1, ("output_bias",): 0}


def _place_vocab(path, value: np.ndarray, shape, rows: np.ndarray) -> np.ndarray:
    """A vocabulary-indexed tensor (embedding [V, d], output kernel [d, V], output bias [V]) in the padded
    network's [V', ...] layout: id j holds checkpoint row rows[j]; a new id (rows[j] = -1) gets the mean
    embedding, a zero output column and the output bias NEW_ID_BIAS; padding rows are zero."""
    if path not in _VOCAB_AXIS:
        return value
    axis = _VOCAB_AXIS[path]
    value = np.moveaxis(value, axis, 0)
    out = np.zeros((shape[axis],) + value.shape[1:], value.dtype)
    n = len(rows)
    out[:n] = value[np.maximum(rows, 0)]
    new = rows < 0
    if path == ("token_embedding",):
        out[:n][new] = value.astype(np.float64).mean(axis=0)
    else:
        out[:n][new] = NEW_ID_BIAS if path == ("output_bias",) else 0
    return np.moveaxis(out, 0, axis)


def _place(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """value on sharding's devices, each device sent only its shard (multi-process safe)."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
