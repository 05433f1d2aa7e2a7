"""Parameter counts and the training FLOPs-per-token estimate used for MFU."""

import math
from typing import Any

import jax

from ddlm.models.config import MODEL_NAMES


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree (arrays, boxed arrays or jax.ShapeDtypeStructs from eval_shape)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def _block_matmul_params(config) -> int:
    d, m = config.d_model, config.mlp_dim
    if config.name == "llama":  # q, out: H * Dh wide; k, v: kv_heads * Dh; SwiGLU: gate, up, down
        heads = config.num_heads
        head_dim = config.head_dim or d // heads
        kv = config.num_kv_heads or heads
        return 2 * d * heads * head_dim + 2 * d * kv * head_dim + 3 * d * m
    return 4 * d * d + 2 * d * m  # qkv + attention out + MLP in/out


def flops_per_token(config, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per target token: 6 N + attention (Kaplan et al. 2020; PaLM App. B).

    N counts the parameters used in a matmul per token: the block kernels and the output projection (the
    embedding lookup is a gather; norms and biases are negligible). The attention term is 12 * num_layers *
    d_model * kv_len for the QK^T and AV matmuls at full (unmasked) cost, which is what dense attention kernels
    compute. Time conditioning: per-sequence adaLN is negligible; the block-causal model conditions per token,
    counted as matmuls. bd3lm runs the blocks on 2L tokens (xt and x0) with 2L keys, the output on L.

    Args:
      config: the config.model ConfigDict (name, num_layers, d_model, mlp_dim, cond_dim, time_conditioning, ...).
      vocab_size: V.
      seq_len: L, tokens per training sequence.

    Returns:
      FLOPs per token of the training step; MFU = flops_per_token * tokens_per_second / peak_flops.
    """
    if config.name not in MODEL_NAMES:
        raise ValueError(f"model name must be one of {MODEL_NAMES}, got {config.name!r}")
    block = config.num_layers * _block_matmul_params(config)
    attention = 12 * config.num_layers * config.d_model
    output = config.d_model * vocab_size
    if config.name == "bd3lm" or (config.name == "llama" and config.attention == "block_causal"):
        cond_2l = cond_l = 0  # per-token conditioning matmuls on the 2L input tokens, and on the L outputs
        if config.time_conditioning:
            c = config.cond_dim
            cond_2l = 256 * c + c * c + config.num_layers * c * 6 * config.d_model
            cond_l = c * 2 * config.d_model
        return 6 * (2 * (block + cond_2l) + output + cond_l) + attention * 2 * (2 * seq_len)
    return 6 * (block + output) + attention * seq_len
