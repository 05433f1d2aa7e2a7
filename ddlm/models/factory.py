"""config.model -> a network: `get_model` picks the family (the DiT `Transformer`, or `Llama`) and checks the
fields it reads; `attention_of`, `compute_dtype` and `network_kwargs` are the shared readings of those fields.

    model = get_model(config.model, vocab_size)

It sits above both families (ddlm/models/transformer.py, ddlm/models/llama.py), which import nothing from it.
"""

import jax
import jax.numpy as jnp

from ddlm.models import layers, llama, stack
from ddlm.models.transformer import ATTENTION_KINDS, TIME_INPUTS, Transformer

_ATTENTION_OF_NAME = {"dit": "bidirectional", "ar": "causal", "bd3lm": "block_causal"}
_REQUIRED_FIELDS = (
    "name", "num_layers", "d_model", "num_heads", "mlp_dim", "cond_dim", "dropout", "time_conditioning",
    "block_size", "dtype", "param_dtype", "tie_embeddings", "remat", "attention_impl", "vocab_multiple",
)  # fmt: skip
# Fields added after checkpoints began storing their config: a stored config without them means these values
# (the layout those checkpoints were written with), so older checkpoints stay loadable.
_LATER_FIELDS = {
    "remat_policy": "full", "scan_layers": False, "logit_shift": False, "attention": "", "time_input": "scaled_t",
    "max_positions": 0, "norm_bias": False, "attention_bias": False, "rope_scaling": None,
    "self_conditioning": False,
}  # fmt: skip
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str, backend: str | None = None):
    """config.model.dtype -> a jnp dtype. 'auto' picks by backend: bfloat16 on accelerators (their matmul
    units' native type), float32 on CPU, where XLA's bfloat16 matmuls are slower than float32 ones (6% on
    the peers' benchmark shape, and no memory pressure worth the precision)."""
    if name == "auto":
        return jnp.float32 if (backend or jax.default_backend()) == "cpu" else jnp.bfloat16
    if name not in _DTYPES:
        raise ValueError(f"config.model.dtype must be 'auto' or one of {tuple(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def _later(config, field: str):
    """A model field of _LATER_FIELDS: its value, or its default for a stored config written before it."""
    return config[field] if field in config else _LATER_FIELDS[field]


def attention_of(config) -> str:
    """'bidirectional' | 'causal' | 'block_causal': the attention of the network config.model describes
    (implied by the name, or config.model.attention for 'llama')."""
    if config.name == "llama":
        return config.attention
    if config.name not in _ATTENTION_OF_NAME:
        raise ValueError(
            f"config.model.name must be one of {(*_ATTENTION_OF_NAME, 'llama')}, got {config.name!r}"
        )
    attention = _later(config, "attention")
    if attention not in ("", _ATTENTION_OF_NAME[config.name]):
        raise ValueError(
            f"config.model.attention={attention!r} contradicts config.model.name={config.name!r} (whose "
            f"attention is {_ATTENTION_OF_NAME[config.name]!r}); set it to '' or use name='llama'"
        )
    return _ATTENTION_OF_NAME[config.name]


def get_model(config, vocab_size: int) -> Transformer:
    """The network of `config` (a config.model ConfigDict, see ddlm.models.config.default_config).

    name 'dit' -> bidirectional DiT; 'ar' -> causal transformer; 'bd3lm' -> block-causal 2L-input transformer;
    'llama' -> the LLaMA family (ddlm.models.llama) with config.model.attention.
    """
    missing = [f for f in _REQUIRED_FIELDS if f not in config]
    if missing:
        raise ValueError(f"config.model lacks fields {missing}; start from ddlm.models.default_config(size)")
    attention_of(config)  # a known name, and an attention field that agrees with it
    if config.param_dtype not in _DTYPES:
        raise ValueError(
            f"config.model.param_dtype must be one of {tuple(_DTYPES)}, got {config.param_dtype!r}"
        )
    compute_dtype(config.dtype)
    if _later(config, "remat_policy") not in stack.REMAT_POLICIES[1:]:
        raise ValueError(
            f"config.model.remat_policy must be one of {stack.REMAT_POLICIES[1:]} (used when remat=True), "
            f"got {_later(config, 'remat_policy')!r}"
        )
    if config.vocab_multiple < 1:
        raise ValueError(f"config.model.vocab_multiple must be >= 1, got {config.vocab_multiple}")
    if _later(config, "logit_shift") and attention_of(config) == "causal":
        raise ValueError(
            "config.model.logit_shift=True is for diffusion networks adapted from an AR one (bidirectional or "
            "block_causal attention); a causal network already predicts the next token"
        )
    if config.name == "llama":
        return _llama(config, vocab_size)
    if config.d_model % config.num_heads:
        raise ValueError(f"num_heads={config.num_heads} must divide d_model={config.d_model}")
    if _later(config, "time_input") not in TIME_INPUTS:
        raise ValueError(f"config.model.time_input must be one of {TIME_INPUTS}, got {config.time_input!r}")
    if int(_later(config, "max_positions")) < 0:
        raise ValueError(f"config.model.max_positions must be >= 0 (0 = rotary), got {config.max_positions}")
    return Transformer(**network_kwargs(config, vocab_size))


def network_kwargs(config, vocab_size: int) -> dict:
    """The Transformer fields every network family reads from config.model (checked by `get_model`)."""
    return dict(  # noqa: C408 -- the constructor's keyword arguments
        vocab_size=vocab_size,
        attention=attention_of(config),
        num_layers=config.num_layers,
        d_model=config.d_model,
        num_heads=config.num_heads,
        mlp_dim=config.mlp_dim,
        cond_dim=config.cond_dim,
        dropout=config.dropout,
        time_conditioning=config.time_conditioning,
        block_size=config.block_size,
        dtype=compute_dtype(config.dtype),
        param_dtype=_DTYPES[config.param_dtype],
        tie_embeddings=config.tie_embeddings,
        remat=config.remat,
        remat_policy=_later(config, "remat_policy"),
        scan_layers=_later(config, "scan_layers"),
        attention_impl=config.attention_impl,
        vocab_multiple=config.vocab_multiple,
        logit_shift=bool(_later(config, "logit_shift")),
        time_input=_later(config, "time_input"),
        max_positions=int(_later(config, "max_positions")),
        norm_bias=bool(_later(config, "norm_bias")),
        attention_bias=bool(_later(config, "attention_bias")),
        self_conditioning=bool(_later(config, "self_conditioning")),
    )


def rope_scaling_of(config) -> tuple:
    """config.model.rope_scaling as `layers.rotary_inv_freq`'s tuple (() = none); ValueError naming the field
    for a kind or number it cannot use."""
    r = _later(config, "rope_scaling")
    if r is None or not r.type:
        return ()
    if r.type not in layers.ROPE_SCALINGS:
        raise ValueError(f"config.model.rope_scaling.type must be one of {layers.ROPE_SCALINGS}, got {r.type!r}")
    if not r.factor > 0 or (r.type == "llama3" and not (0 < r.low_freq_factor < r.high_freq_factor)):
        raise ValueError(
            "config.model.rope_scaling: factor must be > 0 and ('llama3') 0 < low_freq_factor < "
            f"high_freq_factor, got {r.factor}, {r.low_freq_factor}, {r.high_freq_factor}"
        )
    if r.type == "llama3" and not r.original_max_positions > 0:
        raise ValueError(
            f"config.model.rope_scaling.original_max_positions must be > 0 for 'llama3', got {r.original_max_positions}"
        )
    return (r.type, float(r.factor), float(r.low_freq_factor), float(r.high_freq_factor),
            float(r.original_max_positions))  # fmt: skip


def _llama(config, vocab_size: int) -> llama.Llama:
    """The LLaMA network of config.model (name 'llama'; fields of ddlm.models.config.default_config)."""
    if config.attention not in ATTENTION_KINDS:
        raise ValueError(f"config.model.attention must be one of {ATTENTION_KINDS}, got {config.attention!r}")
    if config.time_conditioning:
        raise ValueError(
            "config.model.time_conditioning must be False for name='llama' (a time-free network)"
        )
    llama.check_shape(config.num_heads, config.num_kv_heads, config.d_model, config.head_dim)
    if not config.rope_base > 0:
        raise ValueError(f"config.model.rope_base must be > 0, got {config.rope_base!r}")
    if not config.norm_eps > 0:
        raise ValueError(f"config.model.norm_eps must be > 0, got {config.norm_eps!r}")
    return llama.Llama(
        **network_kwargs(config, vocab_size),
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rope_base=float(config.rope_base),
        qkv_bias=bool(config.qkv_bias),
        norm_eps=float(config.norm_eps),
        rope_scaling=rope_scaling_of(config),
    )
