"""Model configs: `default_config(size)` -> the `config.model` ConfigDict that `get_model` reads.

Presets; parameters with vocab_size=50,258 (GPT-2 + mask; rows padded to 50,304), untied embeddings, time
conditioning on (off: minus the adaLN and timestep MLP), see benchmarks/model_flops.py:
  tiny    2 layers,  128 wide,  4 heads, cond 64:  tests and the quickstart.
  small  12 layers,  768 wide, 12 heads, cond 128: MDLM/SEDD "small", 92.4M non-embedding (85.0M time-free),
                                                   169.7M in total.
  medium 24 layers, 1024 wide, 16 heads, cond 128: MDLM/SEDD "medium", 321.5M non-embedding (302.2M), 424.6M.
  1b     24 layers, 2048 wide, 16 heads, cond 256: 1.285B non-embedding (1.208B), 1.491B in total.

LLaMA-family presets (`llama_config(size)`, name 'llama', ddlm/models/llama.py), parameters as published:
  tiny      2 layers,  128 wide, 4 heads (2 kv), SwiGLU 256:      tests and quickstarts.
  1b       22 layers, 2048 wide, 32 heads (4 kv), SwiGLU 5632, vocab 32,000, untied, rope 1e4: the
           TinyLlama-1.1B shape, 1,100,048,384 parameters.
  llada_8b 32 layers, 4096 wide, 32 heads (32 kv), SwiGLU 12,288, vocab 126,464, untied, rope 5e5,
           bidirectional: LLaDA-8B (Nie et al. 2025), 8,015,581,184 parameters (6.98B non-embedding).
"""

import ml_collections

# name -> (num_layers, d_model, num_heads, cond_dim)
_SIZES = {
    "tiny": (2, 128, 4, 64),
    "small": (12, 768, 12, 128),
    "medium": (24, 1024, 16, 128),
    "1b": (24, 2048, 16, 256),
}

MODEL_NAMES = ("dit", "ar", "bd3lm", "llama")

# name -> (num_layers, d_model, num_heads, num_kv_heads, mlp_dim, rope_base, vocab_size, tie, attention)
_LLAMA_SIZES = {
    "tiny": (2, 128, 4, 2, 256, 10_000.0, 0, False, "bidirectional"),
    "1b": (22, 2048, 32, 4, 5632, 10_000.0, 32_000, False, "causal"),
    "llada_8b": (32, 4096, 32, 32, 12_288, 500_000.0, 126_464, False, "bidirectional"),
}


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
    c.attention_impl = "xla"  # 'xla' (any backend) | 'cudnn' (fused, GPU, bf16) | 'pallas' (block-sparse, GPU)
    c.logit_shift = False  # output i = output layer at i - 1 (AR-to-diffusion adaptation, DiffuLLaMA)
    c.self_conditioning = False  # also read the previous prediction (self_cond [B, L, V]; one more parameter)
    # Imported architectures (ddlm.convert; off for every network trained here):
    c.time_input = "scaled_t"  # the time embedding reads 'scaled_t' (1000 t) | 'sigma' (MDLM/DUO) | 'zero'
    c.max_positions = 0  # > 0: learned absolute positions of this many rows instead of rotary (GPT-2)
    c.norm_bias = False  # LayerNorms with a bias (GPT-2)
    c.attention_bias = False  # biases on the q/k/v and output projections of the DiT attention (GPT-2)
    # name='llama' only (ddlm/models/llama.py):
    c.attention = ""  # 'causal' | 'bidirectional' | 'block_causal'; '' = implied by the name (dit/ar/bd3lm)
    c.num_kv_heads = 0  # key/value heads of grouped-query attention; 0 = num_heads
    c.head_dim = 0  # per-head width; 0 = d_model // num_heads
    c.rope_base = 10_000.0  # rotary frequency base (LLaMA 3 / LLaDA: 5e5, Qwen2: 1e6)
    c.qkv_bias = False  # biases on the q/k/v projections (Qwen2)
    c.norm_eps = 1e-5  # RMSNorm epsilon
    c.rope_scaling = ml_collections.ConfigDict(  # rotary frequency scaling (layers.rotary_inv_freq)
        {
            "type": "",  # '' (none) | 'linear' | 'llama3' (LLaMA 3.1)
            "factor": 1.0,  # frequencies / factor ('linear'; 'llama3': the low-frequency band)
            "low_freq_factor": 1.0,  # 'llama3': wavelengths > original / low_freq_factor are scaled
            "high_freq_factor": 4.0,  # 'llama3': wavelengths < original / high_freq_factor are kept
            "original_max_positions": 0,  # 'llama3': the context length the network was pre-trained at
        }
    )
    return c


def llama_config(size: str = "tiny") -> tuple[ml_collections.ConfigDict, int]:
    """(config.model, vocab_size) of a LLaMA-family preset ('tiny' | '1b' | 'llada_8b'); vocab_size 0 = the
    tokenizer's. See the module docstring for the shapes and their published parameter counts."""
    if size not in _LLAMA_SIZES:
        raise ValueError(f"llama size must be one of {tuple(_LLAMA_SIZES)}, got {size!r}")
    layers, d_model, heads, kv_heads, mlp_dim, rope_base, vocab, tie, attention = _LLAMA_SIZES[size]
    c = default_config("tiny" if size == "tiny" else "1b")
    c.name, c.attention = "llama", attention
    c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.mlp_dim = (
        layers,
        d_model,
        heads,
        kv_heads,
        mlp_dim,
    )
    c.rope_base, c.tie_embeddings, c.time_conditioning = rope_base, tie, False
    c.dropout = 0.0  # LLaMA / LLaDA train without dropout
    return c, vocab
