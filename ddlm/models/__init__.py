"""Flax networks: tokens (, t) (, x0) -> float32 logits [batch, length, vocab].

    model = get_model(config.model, vocab_size)
    variables = model.init(rngs, tokens, t, x0=None, train=False)
    logits = model.apply(variables, tokens, t, x0=None, train=False, rngs={'dropout': key})

Logical axis names on parameters and activations: 'batch', 'length', 'embed', 'mlp', 'heads', 'kv', 'vocab'
(see ddlm/models/layers.py); the trainer maps them to mesh axes.
"""

from ddlm.models.config import MODEL_NAMES, default_config
from ddlm.models.flops import count_params, flops_per_token
from ddlm.models.layers import block_diffusion_mask, rotary_embedding
from ddlm.models.transformer import Transformer, get_model

__all__ = [
    "MODEL_NAMES",
    "Transformer",
    "block_diffusion_mask",
    "count_params",
    "default_config",
    "flops_per_token",
    "get_model",
    "rotary_embedding",
]
