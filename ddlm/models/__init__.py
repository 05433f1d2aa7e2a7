"""Flax networks: tokens (, t) (, x0) -> float32 logits [batch, length, vocab].

    model = get_model(config.model, vocab_size)
    variables = model.init(rngs, tokens, t, x0=None, train=False)
    logits = model.apply(variables, tokens, t, x0=None, train=False, rngs={'dropout': key})

Decoding with a KV cache (ddlm/models/decoding.py, `Transformer.decode`):

    decoder = make_decoder(model, variables)
    logits, cache = decoder.prefill(tokens, capacity)
    logits, cache = decoder.step(cache, tokens_slice, positions, attend, self_attend, t, write_index)

LLaMA family (ddlm/models/llama.py): config.model.name='llama' with config.model.attention; presets
`llama_config(size)`; Hugging Face checkpoints import with `python -m ddlm.convert`.

Logical axis names on parameters and activations: 'batch', 'length', 'embed', 'mlp', 'heads', 'kv', 'vocab'
(see ddlm/models/layers.py); the trainer maps them to mesh axes.
"""

from ddlm.models.config import MODEL_NAMES, default_config, llama_config
from ddlm.models.decoding import Decoder, block_causal_mask, causal_mask, init_cache, make_decoder
from ddlm.models.flops import count_params, flops_per_token
from ddlm.models.layers import KVCache, block_diffusion_mask, rotary_embedding
from ddlm.models.llama import Llama
from ddlm.models.factory import attention_of, get_model
from ddlm.models.transformer import Transformer, logit_shift_sources

__all__ = [
    "MODEL_NAMES",
    "Decoder",
    "KVCache",
    "Llama",
    "Transformer",
    "attention_of",
    "block_causal_mask",
    "block_diffusion_mask",
    "causal_mask",
    "count_params",
    "default_config",
    "flops_per_token",
    "get_model",
    "init_cache",
    "llama_config",
    "logit_shift_sources",
    "make_decoder",
    "rotary_embedding",
]
