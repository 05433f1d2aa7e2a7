"""LoRA and QLoRA adapters through qwix (Google's JAX quantization library, the one Tunix uses for LoRA).

    model = lora.wrap(models.get_model(config.model, vocab), config.lora)   # qwix intercepts the projections
    full = lora.combine(frozen_base, adapter)                             # model.apply({'params': full}, ...)
    plain = lora.merge(base, adapter, config.lora)                        # W + alpha/r A B: the plain network

qwix (`qwix.LoraProvider`) intercepts `jax.lax.dot_general` inside the wrapped network's `__call__` and
`decode` and, where the right-hand side is a parameter of a module whose path matches config.lora.targets, adds
alpha/rank * x A B with A [in, r] (he-uniform) and B [r, out] (zeros: the adapted network starts as the base
one) stored beside the kernel as '<kernel>_lora_a' / '<kernel>_lora_b'. ddlm's projections (layers.project)
compute on CPU through a custom-JVP matmul that qwix cannot see; the provider below switches them to the
plain `lax.dot_general` while the network runs (the same values; only the CPU weight-gradient layout
differs). What is adapted, for the DiT and the LLaMA family: the attention's qkv and output kernels and the
MLP's two kernels of every block (targets '.*/(attn|mlp)(/.*)?'). One caveat of the interception: the DiT's
fused qkv kernel [d, 3, H, Dh] is used as three slices, which share one adapter (Delta q = Delta k = Delta v
= x A B), a constrained but valid low-rank update; `merge` adds it to each slice. qwix finds such a sliced
kernel by tracing the slice back to the parameter, which only a traced call allows: run the wrapped network
under jit (ddlm always does; an eager call skips the qkv adapter).

The trainer (config.lora.rank > 0) keeps only the adapter in the TrainState (so its optimizer state, EMA
and checkpoints hold the adapter alone) and the base, read from config.train.init_from, frozen beside it and
passed to the compiled step as an argument. QLoRA (config.lora.quantize='int8' | 'int4'): the base MLP
kernels are stored quantized (qwix PTQ, per-channel absmax) and dequantized inside the product; the
attention kernels stay in their dtype (ddlm's attention slices and reshapes its kernels, which qwix's PTQ
cannot quantize in place).
"""

from __future__ import annotations

import math
import re

import flax
import jax
import jax.numpy as jnp
import ml_collections
import qwix

from ddlm.sharding import ConfigError

ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
QUANTIZE = ("none", "int8", "int4")
DEFAULT_TARGETS = ".*/(attn|mlp)(/.*)?"
# The MLP's kernels (nn.Dense), the ones qwix's PTQ quantizes (see the module doc).
QUANTIZED_TARGETS = ".*/mlp(/.*)?"


def default_config() -> ml_collections.ConfigDict:
    """config.lora (add it to a recipe to fine-tune with adapters; rank 0 = full fine-tuning)."""
    c = ml_collections.ConfigDict()
    c.rank = 0  # adapter rank r; 0 = off (every parameter trains)
    c.alpha = 16.0  # the update is alpha / r * x A B
    c.targets = DEFAULT_TARGETS  # regex over module paths ('block_0/attn', 'block_1/mlp/fc_in', ...)
    c.quantize = "none"  # QLoRA: the frozen base MLP kernels as 'int8' | 'int4' | 'none'
    # Base parameters trained in full beside the adapters (PEFT's modules_to_save): a regex over parameter
    # paths ('output_kernel', 'token_embedding', 'block_0/attn/out_kernel'), '' = none. A fine-tune that
    # teaches the network a token its pretraining never predicted (eos padding in SFT) needs the output layer.
    c.train_also = ""
    return c


def enabled(config) -> bool:
    """Whether the config trains adapters (a config.lora section with rank > 0)."""
    return "lora" in config and int(config.lora.rank) > 0


def validate(config) -> None:
    """One-line ConfigErrors for config.lora; LoRA needs a base to adapt (config.train.init_from)."""
    if "lora" not in config:
        return
    from ddlm.train.checks import is_int as _is_int
    from ddlm.train.checks import require as _require

    c = config.lora
    _require(_is_int(c.rank) and c.rank >= 0, "lora.rank", "an integer >= 0 (0 = full fine-tuning)", c.rank)
    if isinstance(c.alpha, bool) or not isinstance(c.alpha, (int, float)) or not math.isfinite(c.alpha) or c.alpha <= 0:
        raise ConfigError(f"config.lora.alpha must be a finite number > 0, got {c.alpha!r}")
    if c.quantize not in QUANTIZE:
        raise ConfigError(f"config.lora.quantize must be one of {QUANTIZE}, got {c.quantize!r}")
    if not isinstance(c.targets, str) or not c.targets:
        raise ConfigError(f"config.lora.targets must be a non-empty regex over module paths, got {c.targets!r}")
    try:
        re.compile(c.targets)
    except re.error as e:
        raise ConfigError(f"config.lora.targets is not a regex ({e}), got {c.targets!r}") from None
    if not isinstance(c.train_also, str):
        raise ConfigError(f"config.lora.train_also must be a regex over parameter paths or '', got {c.train_also!r}")
    try:
        re.compile(c.train_also)
    except re.error as e:
        raise ConfigError(f"config.lora.train_also is not a regex ({e}), got {c.train_also!r}") from None
    if c.rank == 0:
        if c.quantize != "none":
            raise ConfigError(
                f"config.lora.quantize={c.quantize!r} quantizes the frozen base of LoRA: set config.lora.rank > 0"
            )
        return
    if not config.train.init_from:
        raise ConfigError(
            "config.train.init_from must name the workdir of the base model to adapt when config.lora.rank > 0 "
            "(LoRA trains adapters on frozen pretrained weights), got ''"
        )
    if config.model.scan_layers:
        raise ConfigError(
            "config.model.scan_layers must be False with config.lora.rank > 0 (qwix's adapters are created "
            "per module, not inside nn.scan), got True"
        )


class _Provider(qwix.LoraProvider):
    """qwix's LoRA provider that also makes ddlm's projections use `lax.dot_general` (which it intercepts)
    rather than the CPU custom-JVP matmul of ddlm.models.layers.project, while the wrapped network runs."""

    def get_intercept_map(self):
        out = dict(super().get_intercept_map())
        out["ddlm.models.layers.transposed_weight_grads"] = lambda: False
        return out


def provider(cfg) -> qwix.LoraProvider:
    """The qwix provider of config.lora: rank, alpha and targets; with quantize, a rule quantizing the MLP
    kernels first (rules match in order) and the plain LoRA rule for the other targets."""
    rules = []
    if cfg.quantize != "none":
        rules.append(
            qwix.LoraRule(
                module_path=f"(?=({cfg.targets})$){QUANTIZED_TARGETS}",
                rank=cfg.rank,
                alpha=float(cfg.alpha),
                weight_qtype=jnp.int8 if cfg.quantize == "int8" else jnp.int4,
            )
        )
    rules.append(qwix.LoraRule(module_path=cfg.targets, rank=cfg.rank, alpha=float(cfg.alpha)))
    return _Provider(rules)


def wrap(model, cfg):
    """The network with adapters: `model.apply` of the result reads '<kernel>_lora_a/_b' beside each
    targeted kernel (and creates them in `init`). Both the training forward and the KV-cache decode path
    (Transformer.decode) are intercepted."""
    methods = ("__call__", "decode") if hasattr(type(model), "decode") else ("__call__",)
    return qwix.apply_lora_to_model(model, provider(cfg), methods=methods)


# ------------------------------------------------------------------------------------------------ trees


def is_adapter_path(path) -> bool:
    name = path[-1] if isinstance(path, tuple) else path
    name = getattr(name, "key", name)
    return isinstance(name, str) and name.endswith(ADAPTER_SUFFIXES)


def is_trainable_path(path, train_also: str = "") -> bool:
    """Whether a parameter of the wrapped network trains: an adapter, or a base parameter whose path
    ('block_0/attn/out_kernel') matches config.lora.train_also in full."""
    if is_adapter_path(path):
        return True
    names = [getattr(k, "key", k) for k in (path if isinstance(path, tuple) else (path,))]
    return bool(train_also) and re.fullmatch(train_also, "/".join(map(str, names))) is not None


def split(params, train_also: str = "") -> tuple[dict, dict]:
    """(frozen, trainable): the parameter tree of a wrapped network cut into its two parts (nested dicts):
    the adapters and the base parameters matching `train_also` train, the rest is frozen."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    base = {k: v for k, v in flat.items() if not is_trainable_path(k, train_also)}
    adapter = {k: v for k, v in flat.items() if is_trainable_path(k, train_also)}
    return flax.traverse_util.unflatten_dict(base), flax.traverse_util.unflatten_dict(adapter)


def combine(base, adapter) -> dict:
    """The full parameter tree of the wrapped network from its base and trainable parts (a trainable base
    parameter, config.lora.train_also, replaces the base's value)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(base))
    flat.update(flax.traverse_util.flatten_dict(flax.core.unfreeze(adapter)))
    return flax.traverse_util.unflatten_dict(flat)


class AdapterInit:
    """A stand-in for the wrapped network whose `init` returns only the trainable parameters (adapters and
    config.lora.train_also): what ddlm.train.state.make_train_state initialises, shards and checkpoints (its
    TrainState then holds them alone; the base is frozen outside it). The train_also parameters it draws
    are placeholders: `seed_trainable` gives them the base's values."""

    def __init__(self, wrapped, train_also: str = ""):
        self.wrapped, self.train_also = wrapped, train_also

    def init(self, *args, **kwargs):
        variables = dict(self.wrapped.init(*args, **kwargs))
        variables["params"] = split(variables["params"], self.train_also)[1]
        return variables


def seed_trainable(trainable, frozen, *, zero_adapters: bool = False) -> dict:
    """The trainable tree with each base parameter it holds (config.lora.train_also) set to a copy of the
    frozen base's value (a new buffer: the train step donates the state); with zero_adapters, every adapter
    set to zeros (the base network itself, e.g. RL's reference)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(trainable))
    base = flax.traverse_util.flatten_dict(flax.core.unfreeze(frozen))
    out = {}
    for k, v in flat.items():
        if is_adapter_path(k):
            out[k] = jnp.zeros_like(v) if zero_adapters else v
            continue
        if not isinstance(base.get(k), jax.Array):
            raise ConfigError(
                f"config.lora.train_also matches {'/'.join(map(str, k))}, which the base stores "
                f"{'quantized' if k in base else 'nowhere'}: train_also must name float base parameters"
            )
        out[k] = jnp.copy(base[k])
    return flax.traverse_util.unflatten_dict(out)


def build(model, config, mesh, tokenizer, init_inputs):
    """(the wrapped network, the frozen base) for the trainer: the base parameters of config.train.init_from
    (EMA ones), sharded as the plain network's parameters, quantized if config.lora.quantize says so."""
    from ddlm import sharding
    from ddlm.train import adapt

    boxed, _ = sharding.abstract_params(model, init_inputs)
    base = adapt.load_init_params(config.train.init_from, sharding.sharded_abstract_params(boxed, mesh), tokenizer)
    wrapped = wrap(model, config.lora)
    return wrapped, quantize_base(base, wrapped, init_inputs, config.lora)


def bind(loss_fn, frozen):
    """loss_fn(trainable, ...) of a loss_fn(full params, ...): the frozen base joined to the trainable part
    (the gradient is the trainable part's alone)."""
    return lambda adapter, *args, **kwargs: loss_fn(combine(frozen, adapter), *args, **kwargs)


def quantize_base(base, wrapped, init_inputs, cfg):
    """The frozen base with the MLP kernels quantized (QLoRA), as qwix's PTQ lays them out
    (qwix.quantize_params against the wrapped network's abstract parameters); unchanged if quantize='none'."""
    if cfg.quantize == "none":
        return base
    tokens, t, x0 = init_inputs
    abstract = jax.eval_shape(
        lambda r: wrapped.init({"params": r, "dropout": r}, tokens, t, x0=x0, train=False)["params"],
        jax.random.key(0),
    )
    return qwix.quantize_params(flax.core.unfreeze(base), abstract, allow_extra_params=True)


def adapter_delta(kernel_shape, lora_a, lora_b, scale: float):
    """alpha/r * A B laid out as the kernel it adapts: A [prod(in), r], B [r, prod(out)] with the kernel
    [*in, *out] (the contraction axes lead, as layers.project and nn.Dense use them). A kernel used as
    slices along an axis after its inputs (the DiT's qkv kernel [d, 3, H, Dh]) gets the delta on every slice."""
    delta = (lora_a.astype(jnp.float32) @ lora_b.astype(jnp.float32)) * scale  # [in, out]
    n_in, n_out = delta.shape
    lead, size = 0, 1
    while size < n_in:
        size *= kernel_shape[lead]
        lead += 1
    rest = kernel_shape[lead:]
    if size == n_in and math.prod(rest) == n_out:
        return delta.reshape(kernel_shape)
    if size == n_in and len(rest) > 1 and math.prod(rest[1:]) == n_out:
        return jnp.broadcast_to(delta.reshape(kernel_shape[:lead] + (1,) + rest[1:]), kernel_shape)
    raise ValueError(f"an adapter A {lora_a.shape} B {lora_b.shape} does not fit a kernel of shape {kernel_shape}")


def merge(base, adapter, cfg) -> dict:
    """The base network's parameters with every adapter folded in, W + alpha/r A B (float base only), and the
    trained base parameters (config.lora.train_also) in place of the base's: the unwrapped network with them
    computes what the wrapped one computes with (base, adapter)."""
    scale = float(cfg.alpha) / int(cfg.rank)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(base))
    ad = flax.traverse_util.flatten_dict(flax.core.unfreeze(adapter))
    out = dict(flat)
    for path, value in ad.items():
        if not is_adapter_path(path):  # a trained base parameter (config.lora.train_also)
            out[path] = value
    for path, lora_a in ad.items():
        if not path[-1].endswith("_lora_a"):
            continue
        name = path[-1][: -len("_lora_a")]
        kernel_path = path[:-1] + (name,)
        lora_b = ad[path[:-1] + (name + "_lora_b",)]
        kernel = flat[kernel_path]
        if not isinstance(kernel, jax.Array):
            raise ValueError(f"merge needs a float base; {'/'.join(kernel_path)} is {type(kernel).__name__}")
        delta = adapter_delta(kernel.shape, lora_a, lora_b, scale)
        out[kernel_path] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return flax.traverse_util.unflatten_dict(out)


def count(tree) -> int:
    """Number of stored values in a tree (a quantized leaf counts its integer values)."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


def tree_bytes(tree) -> int:
    """Bytes of the arrays of a tree (int4 values count half a byte)."""
    total = 0
    for x in jax.tree.leaves(tree):
        if hasattr(x, "dtype") and hasattr(x, "shape"):
            bits = jnp.iinfo(x.dtype).bits if jnp.issubdtype(x.dtype, jnp.integer) else jnp.finfo(x.dtype).bits
            total += math.prod(x.shape) * bits // 8
    return int(total)
