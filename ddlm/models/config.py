"""Model configs: `default_config(size)` -> the `config.model` ConfigDict that `get_model` reads.

Presets; parameters with vocab_size=50,258 (GPT-2 + mask; rows padded to 50,304), untied embeddings, time
conditioning on (off: minus the adaLN and timestep MLP), see benchmarks/model_flops.py:
  tiny    2 layers,  128 wide,  4 heads, cond 64:  tests and the quickstart.
  small  12 layers,  768 wide, 12 heads, cond 128: MDLM/SEDD "small", 92.4M non-embedding (85.0M time-free),
                                                   169.7M in total.
  medium 24 layers, 1024 wide, 16 heads, cond 128: MDLM/SEDD "medium", 321.5M non-embedding (302.2M), 424.6M.
  1b     24 layers, 2048 wide, 16 heads, cond 256: 1.285B non-embedding (1.208B), 1.491B in total.
"""

import ml_collections

# name -> (num_layers, d_model, num_heads, cond_dim)
_SIZES = {
    "tiny": (2, 128, 4, 64),
    "small": (12, 768, 12, 128),
    "medium": (24, 1024, 16, 128),
    "1b": (24, 2048, 16, 256),
}

MODEL_NAMES = ("dit", "ar", "bd3lm")


def default_config(size: str = "tiny") -> ml_collections.ConfigDict:
    """The model fields for a preset size ('tiny' | 'small' | 'medium' | '1b'); a bidirectional DiT by default."""
    if size not in _SIZES:
        raise ValueError(f"size must be one of {tuple(_SIZES)}, got {size!r}")
    num_layers, d_model, num_heads, cond_dim = _SIZES[size]
    c = ml_collections.ConfigDict()
    c.name = "dit"  # 'dit' (bidirectional DiT) | 'ar' (causal) | 'bd3lm' (block-causal, 2L-input trick)
    c.num_layers = num_layers  # transformer blocks
    c.d_model = d_model  # residual stream width
    c.num_heads = num_heads  # attention heads; head_dim = d_model // num_heads
    c.mlp_dim = 4 * d_model  # MLP hidden width
    c.cond_dim = cond_dim  # width of the time-conditioning vector (adaLN input)
    c.dropout = 0.0 if size == "tiny" else 0.1  # dropout after attention and MLP (MDLM: 0.1)
    c.time_conditioning = True  # adaLN-zero on t; False: time-free (RADD, MD4, BD3-LM's default, and 'ar')
    c.block_size = 4 if size == "tiny" else 16  # tokens per block for 'bd3lm' (must divide seq_len)
    c.dtype = (
        "auto"  # matmul compute dtype: 'auto' (bfloat16 on GPU/TPU, float32 on CPU) | 'float32' | 'bfloat16'
    )
    c.param_dtype = "float32"  # parameter dtype
    c.tie_embeddings = False  # output projection = input embedding^T (MDLM: untied)
    c.remat = False  # recompute each block in the backward pass (less activation memory, ~1/3 more compute)
    c.remat_policy = (
        "full"  # with remat: 'full' (recompute whole blocks) | 'dots_saveable' (keep matmul outputs)
    )
    c.scan_layers = (
        False  # one nn.scan over the blocks: compile time flat in depth (params stacked under 'blocks')
    )
    c.vocab_multiple = (
        128  # pad embedding/output rows to a multiple (even 'tensor' sharding); logits stay [.., V]
    )
    c.attention_impl = "xla"  # 'xla' (any backend) | 'cudnn' (fused, NVIDIA GPUs, dtype bfloat16)
    return c
