"""The LLaMA-family network: RMSNorm, SwiGLU MLP, grouped-query attention with rotary positions, optional QKV
biases (Qwen2), tied or untied embeddings; no time conditioning (LLaDA, Dream and the adapted AR models are
time-free, as RADD showed suffices for masked diffusion).

    model = get_model(config.model, vocab_size)    # config.model.name = 'llama', config.model.attention = ...
    logits = model.apply(variables, tokens, None, x0=None, train=False)              # float32 [B, L, V]

`Llama` is a `Transformer` (ddlm/models/transformer.py) with another block (`LlamaBlock`), final norm and output
layer: attention masks ('causal' for LLaMA/Qwen2 checkpoints, 'bidirectional' for LLaDA/Dream,
'block_causal' for BD3-LM / Fast-dLLM v2), rotary, the KV-cache decode path (the cache holds the key/value
heads only) and the logit shift are the shared ones. Parameter names follow the DiT's where the role is the
same (token_embedding, output_kernel, block_i/norm_attn, block_i/attn/out_kernel), so that the logical axis
rules, the checkpoints and the importer (ddlm/models/hf.py) see one layout:

    block_i/norm_attn/scale [d]            block_i/attn/{q,k,v}_kernel [d, heads | kv_heads, head_dim]
    block_i/norm_mlp/scale [d]             block_i/attn/{q,k,v}_bias [heads | kv_heads, head_dim] (qkv_bias)
    norm_final/scale [d]                   block_i/attn/out_kernel [heads, head_dim, d]
    token_embedding [V', d]                block_i/mlp/{gate,up}_kernel [d, mlp], block_i/mlp/down_kernel [mlp, d]
    output_kernel [d, V'] (untied)

Numerics as the DiT (ddlm/models/layers.py): parameters in param_dtype, matmuls in dtype, residual stream,
norms, rotary and logits in float32 (float64 for a float64 network).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddlm.models import layers
from ddlm.models.transformer import Transformer

Dtype = Any


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale (Zhang & Sennrich 2019; LLaMA's and Hugging Face's LlamaRMSNorm)."""

    epsilon: float = 1e-5
    param_dtype: Dtype = jnp.float32
    dtype: Dtype = jnp.float32  # statistics and output: float32 (float64 for a float64 network)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., d] -> [..., d] in `dtype`."""
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x = x.astype(self.dtype)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.epsilon)
        return x * scale.astype(self.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) without biases (Shazeer 2020, "GLU Variants Improve Transformer"; LLaMA)."""

    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, L, d] -> [B, L, d] in `dtype`."""
        d_model = x.shape[-1]

        def kernel(name, shape, axes):
            init = nn.with_logical_partitioning(layers._lecun_normal(), axes)
            return self.param(name, init, shape, self.param_dtype).astype(self.dtype)

        x = x.astype(self.dtype)
        gate = kernel("gate_kernel", (d_model, self.mlp_dim), ("embed", "mlp"))
        up = kernel("up_kernel", (d_model, self.mlp_dim), ("embed", "mlp"))
        down = kernel("down_kernel", (self.mlp_dim, d_model), ("mlp", "embed"))
        h = nn.silu(layers.project(x, gate)) * layers.project(x, up)
        h = nn.with_logical_constraint(h, layers.BLM)
        return layers.project(h, down)


class GroupedQueryAttention(nn.Module):
    """Grouped-query self-attention (Ainslie et al. 2023) with rotary positions of base `rope_base`.

    num_kv_heads = num_heads is multi-head attention, 1 is multi-query. Query head h reads key/value head
    h // (num_heads / num_kv_heads) (`layers.attention`). The decode path caches the num_kv_heads keys/values
    only: with `cache` it returns (out, updated LayerCache), see `layers.cached_attention`.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_base: float = 10_000.0
    qkv_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str = "xla"
    rope_scaling: tuple = ()  # `layers.rotary_inv_freq`'s scaling; () = plain rotary

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array | None = None,
        is_causal: bool = False,
        cache: layers.LayerCache | None = None,
        decode_masks: layers.DecodeMasks | None = None,
    ):
        """x: [B, L, d] -> [B, L, d] in `dtype` (and the updated LayerCache when `cache` is given).

        positions: [L] or [B, L] rotary positions; mask: bool [L, L] (True = attend) or None; is_causal:
        lower-triangular. cache, decode_masks: the decode path (mask and is_causal are then unused).
        """
        d_model = x.shape[-1]
        x = x.astype(self.dtype)

        def project(name, heads):
            kernel = self.param(
                f"{name}_kernel",
                nn.with_logical_partitioning(layers._lecun_normal(0, (1, 2)), ("embed", "heads", "kv")),
                (d_model, heads, self.head_dim),
                self.param_dtype,
            )
            out = layers.project(x, kernel.astype(self.dtype))
            if self.qkv_bias:
                bias = self.param(
                    f"{name}_bias",
                    nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")),
                    (heads, self.head_dim),
                    self.param_dtype,
                )
                out = out + bias.astype(self.dtype)
            return out

        q = project("q", self.num_heads)
        k = project("k", self.num_kv_heads)
        v = project("v", self.num_kv_heads)
        rope = (positions, self.rope_base, self.rope_scaling)
        q = nn.with_logical_constraint(layers.rotary_embedding(q, *rope), layers.BLHK)
        k = nn.with_logical_constraint(layers.rotary_embedding(k, *rope), layers.BLHK)
        v = nn.with_logical_constraint(v, layers.BLHK)
        if cache is None:
            out = layers.attention(
                q, k, v, None if mask is None else mask[None, None], is_causal, self.implementation
            )
        else:
            out, cache = layers.cached_attention(q, k, v, cache, decode_masks, self.implementation)
        out = nn.with_logical_constraint(out, layers.BLHK)  # [B, L, H, Dh]
        out_kernel = self.param(
            "out_kernel",
            nn.with_logical_partitioning(layers._lecun_normal((0, 1), 2), ("heads", "kv", "embed")),
            (self.num_heads, self.head_dim, d_model),
            self.param_dtype,
        )
        out = layers.project(out, out_kernel.astype(self.dtype), n_in=2)
        return out if cache is None else (out, cache)


class LlamaBlock(nn.Module):
    """Pre-norm LLaMA block: x += drop(attn(RMSNorm(x))); x += drop(swiglu(RMSNorm(x))).

    The call signature is the DiT block's (ddlm/models/layers.py `DiTBlock`), so `Transformer` runs either
    (and remat / a layer scan over them are the same code); `c` (time conditioning) is always None here.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_base: float = 10_000.0
    qkv_bias: bool = False
    norm_eps: float = 1e-5
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    rope_scaling: tuple = ()

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        c: jax.Array | None,
        positions: jax.Array,
        mask: jax.Array | None,
        is_causal: bool,
        train: bool,
        cache: layers.LayerCache | None = None,
        decode_masks: layers.DecodeMasks | None = None,
    ):
        """x: [B, L, d] float32 residual stream -> [B, L, d] float32 (and the LayerCache when decoding)."""
        del c  # time-free
        stream = layers.stream_dtype(self.dtype)
        h = RMSNorm(self.norm_eps, self.param_dtype, stream, name="norm_attn")(x)
        attn = GroupedQueryAttention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.rope_base,
            self.qkv_bias,
            self.dtype,
            self.param_dtype,
            self.attention_impl,
            self.rope_scaling,
            name="attn",
        )
        if cache is None:
            h = attn(h, positions, mask, is_causal)
        else:
            h, cache = attn(h, positions, cache=cache, decode_masks=decode_masks)
        x = x + nn.Dropout(self.dropout)(h, deterministic=not train).astype(stream)
        x = nn.with_logical_constraint(x, layers.BLE)
        h = RMSNorm(self.norm_eps, self.param_dtype, stream, name="norm_mlp")(x)
        h = SwiGLU(self.mlp_dim, self.dtype, self.param_dtype, name="mlp")(h)
        x = x + nn.Dropout(self.dropout)(h, deterministic=not train).astype(stream)
        x = nn.with_logical_constraint(x, layers.BLE)
        return x if cache is None else (x, cache)


class Llama(Transformer):
    """Token embedding -> num_layers LLaMA blocks -> RMSNorm -> output projection (no bias; fp32 logits).

    Attributes (besides Transformer's; time_conditioning must stay False, cond_dim is unused):
      num_kv_heads: key/value heads (grouped-query attention); 0 = num_heads.
      head_dim: per-head width; 0 = d_model // num_heads.
      rope_base: rotary frequency base (LLaMA 2: 1e4, LLaMA 3 and LLaDA: 5e5, Qwen2: 1e6).
      rope_scaling: () or (kind, factor, low_freq_factor, high_freq_factor, original_max_positions), the
        frequency scaling of `layers.rotary_inv_freq` (LLaMA 3.1: 'llama3', 8, 1, 4, 8192).
      qkv_bias: biases on the query/key/value projections (Qwen2).
      norm_eps: RMSNorm epsilon.
    """

    time_conditioning: bool = False
    num_kv_heads: int = 0
    head_dim: int = 0
    rope_base: float = 10_000.0
    qkv_bias: bool = False
    norm_eps: float = 1e-5
    rope_scaling: tuple = ()

    _output_bias = False

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def cache_layout(self) -> tuple[int, int]:
        return self.kv_heads, self.dim_per_head

    def _block_class(self):
        return LlamaBlock

    def _block_kwargs(self) -> dict:
        return {
            "num_heads": self.num_heads,
            "num_kv_heads": self.kv_heads,
            "head_dim": self.dim_per_head,
            "mlp_dim": self.mlp_dim,
            "rope_base": self.rope_base,
            "qkv_bias": self.qkv_bias,
            "norm_eps": self.norm_eps,
            "dropout": self.dropout,
            "dtype": self.dtype,
            "param_dtype": self.param_dtype,
            "attention_impl": self.attention_impl,
            "rope_scaling": self.rope_scaling,
        }

    def _final_norm(self, stream_dtype) -> nn.Module:
        return RMSNorm(self.norm_eps, self.param_dtype, stream_dtype, name="norm_final")

    def _check_inputs(self, tokens, t, x0, self_cond=None):
        if self.time_conditioning:
            raise ValueError("the LLaMA network has no time conditioning: set time_conditioning=False")
        check_shape(self.num_heads, self.kv_heads, self.d_model, self.head_dim)
        super()._check_inputs(tokens, t, x0, self_cond)


def check_shape(num_heads: int, num_kv_heads: int, d_model: int, head_dim: int) -> None:
    """ValueError naming config.model.<field> unless the heads fit (GQA groups, the head width)."""
    if num_heads < 1 or num_kv_heads < 0 or (num_kv_heads and num_heads % num_kv_heads):
        raise ValueError(
            f"config.model.num_kv_heads={num_kv_heads} must divide config.model.num_heads={num_heads} (0 = "
            "num_heads)"
        )
    if head_dim == 0 and d_model % num_heads:
        raise ValueError(
            f"config.model.num_heads={num_heads} must divide d_model={d_model} (or set config.model.head_dim)"
        )
    if (head_dim or d_model // num_heads) % 2:
        raise ValueError(
            f"the rotary embedding needs an even head width, got {head_dim or d_model // num_heads}"
        )
