"""Checks of an experiment config before any work: every field a training run reads, one ConfigError each.

    validate_config(config, num_devices)   every section: model, diffusion, data, optim, mesh, train, adapt,
                                           the optional modes (lora, rl, distill: its teacher's checkpoint too)
                                           (and sampler with train.sample_at_end)

Each mistake is one line 'config.<section>.<field> must be <expected>, got <value>', raised before the workdir
is touched, the data read or anything compiled: a value that the network, the loss or the data pipeline would
reject only once traced (a ZeroDivisionError deep in a layer, an unknown loss after metrics were written) or
would silently accept (a dropout rate of 1.5) fails here instead.
"""

from __future__ import annotations

from ddlm import sharding
from ddlm.sharding import ConfigError
from ddlm.train.checks import finite as _finite
from ddlm.train.checks import is_int as _is_int
from ddlm.train.checks import require as _require

NAN_POLICIES = ("stop", "skip")
# What the DiT family (ddlm.models.transformer) has where the LLaMA family reads these fields: a config of a
# 'dit' / 'ar' / 'bd3lm' network must leave them so (a GQA, a head width or a rotary base set on one of
# those would be ignored). 0 = num_heads / d_model // num_heads for the two shapes.
_DIT_FIXED = {"num_kv_heads": 0, "head_dim": 0, "rope_base": 10_000.0, "qkv_bias": False, "norm_eps": 1e-5}
# config.model.dtype / param_dtype names (ddlm.models.factory.compute_dtype's, without 'auto').
_DTYPES = ("float32", "bfloat16")
_PACKINGS = ("wrap", "pad")
_SPM_MODEL_TYPES = ("bpe", "unigram")
# Losses that train a network through the absorbing (mask) graph, and those that pass it no time.
_ABSORBING_LOSSES = ("mdlm", "d3pm", "sedd_absorb", "radd", "bd3lm", "sft")
_TIME_FREE_LOSSES = ("radd", "ar")
_UNIFORM_LOSSES = ("sedd_uniform", "duo")


def _int_at_least(section, prefix: str, names, low: int, note: str = "") -> None:
    for name in names:
        value = section[name]
        _require(_is_int(value) and value >= low, f"{prefix}.{name}", f"an integer >= {low}{note}", value)


def _bools(section, prefix: str, names) -> None:
    for name in names:
        _require(isinstance(section[name], bool), f"{prefix}.{name}", "True or False", section[name])


def _strings(section, prefix: str, names) -> None:
    for name in names:
        _require(isinstance(section[name], str), f"{prefix}.{name}", "a string", section[name])


def _one_of(section, prefix: str, name: str, choices) -> None:
    _require(section[name] in tuple(choices), f"{prefix}.{name}", f"one of {tuple(choices)}", section[name])


def validate_model_config(m, *, seq_len: int, backend_known: bool = True) -> None:
    """config.model (ddlm.models.config.default_config's fields; both network families): shapes, rates,
    names. `seq_len`: the training length, which a block-causal network's block_size must divide."""
    from ddlm import models
    from ddlm.models import factory, layers, stack, transformer

    _one_of(m, "model", "name", models.MODEL_NAMES)
    # A zero width or head count is a ZeroDivisionError inside the network, a zero depth a network without
    # blocks.
    _int_at_least(m, "model", ("num_layers", "d_model", "num_heads", "mlp_dim", "cond_dim"), 1)
    _int_at_least(m, "model", ("block_size", "vocab_multiple"), 1)
    # Dropout 1 drops everything (and scales the rest by 1 / 0); a rate outside [0, 1) is not a rate.
    _require(_finite(m.dropout) and 0 <= m.dropout < 1, "model.dropout", "in [0, 1)", m.dropout)
    switches = ("time_conditioning", "tie_embeddings", "remat", "scan_layers", "logit_shift", "qkv_bias",
                "self_conditioning")  # fmt: skip
    _bools(m, "model", switches)
    _require(m.dtype in ("auto", *_DTYPES), "model.dtype", f"one of {('auto', *_DTYPES)}", m.dtype)
    _one_of(m, "model", "param_dtype", _DTYPES)
    _require(
        m.remat_policy in stack.REMAT_POLICIES[1:],
        "model.remat_policy",
        f"one of {stack.REMAT_POLICIES[1:]} (used with remat=True)",
        m.remat_policy,
    )
    _one_of(m, "model", "attention_impl", layers.ATTENTION_IMPLS)
    try:  # a kernel this backend cannot run (cudnn off a GPU or without bfloat16, pallas off an NVIDIA GPU)
        if backend_known:  # asking jax for its backend starts it (before jax.distributed.initialize: fatal)
            transformer.check_attention_impl(m.attention_impl, factory.compute_dtype(m.dtype))
    except ValueError as e:
        raise ConfigError(f"config.model.{e}") from None
    _int_at_least(m, "model", ("num_kv_heads", "head_dim"), 0, " (0 = implied by num_heads)")
    _require(_finite(m.rope_base) and m.rope_base > 0, "model.rope_base", "a finite number > 0", m.rope_base)
    _require(_finite(m.norm_eps) and m.norm_eps > 0, "model.norm_eps", "a finite number > 0", m.norm_eps)

    if m.name == "llama":
        _require(
            m.attention in transformer.ATTENTION_KINDS,
            "model.attention",
            f"one of {transformer.ATTENTION_KINDS} for name='llama'",
            m.attention,
        )
        if m.num_kv_heads and m.num_heads % m.num_kv_heads:
            raise ConfigError(
                f"config.model.num_kv_heads={m.num_kv_heads} must divide "
                f"config.model.num_heads={m.num_heads} (0 = num_heads)"
            )
    else:
        try:
            models.attention_of(m)  # an attention field that contradicts the name
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for name, value in _DIT_FIXED.items():
            _require(
                m[name] == value,
                f"model.{name}",
                f"{value!r} for name={m.name!r} (read by name='llama' only)",
                m[name],
            )
    head_width = m.head_dim if m.name == "llama" and m.head_dim else 0
    if not head_width:
        if m.d_model % m.num_heads:
            raise ConfigError(
                f"config.model.num_heads={m.num_heads} must divide config.model.d_model={m.d_model}"
                + (" (or set config.model.head_dim)" if m.name == "llama" else "")
            )
        head_width = m.d_model // m.num_heads
    if head_width % 2:  # the rotary embedding rotates pairs of features
        field = "head_dim" if m.name == "llama" and m.head_dim else "num_heads"
        raise ConfigError(
            f"config.model.{field}={m[field]} gives heads of width {head_width} (d_model={m.d_model}): the "
            "rotary embedding needs an even head width"
        )
    attention = models.attention_of(m)
    if m.time_conditioning and (attention == "causal" or m.name == "llama"):
        raise ConfigError(
            "config.model.time_conditioning must be False for a "
            f"{'LLaMA' if m.name == 'llama' else 'causal'} network (name={m.name!r}, attention "
            f"{attention!r}: time-free), got True"
        )
    if m.logit_shift and attention == "causal":
        raise ConfigError(
            "config.model.logit_shift must be False for a causal network (it already predicts the next "
            "token); the shift is for diffusion networks adapted from an AR one"
        )
    if m.self_conditioning and attention == "causal":
        raise ConfigError(
            "config.model.self_conditioning must be False for a causal network (its KV-cache decoding has no "
            "previous prediction to feed back), got True"
        )
    if attention == "block_causal" and seq_len % m.block_size:
        raise ConfigError(
            f"config.model.block_size={m.block_size} must divide config.train.seq_len={seq_len}"
        )


def validate_diffusion_config(d, model) -> None:
    """config.diffusion: the loss, its schedule and process, and that the network `model` (config.model)
    is one the loss can train."""
    from ddlm import losses, models, processes, schedules

    _one_of(d, "diffusion", "loss", losses.LOSSES)
    _one_of(d, "diffusion", "schedule", sorted(schedules.SCHEDULES))
    try:
        schedules.get_schedule(d.schedule, **dict(d.schedule_kwargs))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.diffusion.schedule_kwargs={dict(d.schedule_kwargs)!r}: {e}") from None
    _one_of(d, "diffusion", "process", processes.PROCESSES)
    if d.loss in _UNIFORM_LOSSES and d.process != "uniform":
        raise ConfigError(
            f"config.diffusion.process must be 'uniform' for loss={d.loss!r}, got {d.process!r}"
        )
    validate_curriculum_config(d)
    if d.loss in _ABSORBING_LOSSES and d.process != "absorbing":
        raise ConfigError(
            f"config.diffusion.process must be 'absorbing' for loss={d.loss!r} (a masked-diffusion loss), "
            f"got {d.process!r}"
        )
    _require(_is_int(d.num_steps) and d.num_steps >= 0, "diffusion.num_steps", "an integer >= 0", d.num_steps)
    if d.loss == "d3pm" and not d.num_steps:
        raise ConfigError(
            "config.diffusion.num_steps must be >= 1 for loss='d3pm' (its T discrete steps), got 0"
        )
    if d.loss != "d3pm" and d.num_steps:
        raise ConfigError(
            f"config.diffusion.num_steps must be 0 for loss={d.loss!r} (discrete time is loss='d3pm'), "
            f"got {d.num_steps}"
        )
    _bools(d, "diffusion", ("antithetic",))
    p = d.self_conditioning
    _require(
        _finite(p) and 0 <= p <= 1, "diffusion.self_conditioning", "a probability in (0, 1], or 0 = off", p
    )
    if p and not model.self_conditioning:
        raise ConfigError(
            f"config.diffusion.self_conditioning={p} needs config.model.self_conditioning=True (a network that "
            "reads its previous prediction), got False"
        )

    # The loss and the network: 'bd3lm' feeds x0 beside xt to a block-causal network, 'ar' scores next tokens
    # (a network that sees the token it predicts learns to copy it), 'radd' and 'ar' pass no time.
    attention = models.attention_of(model)
    if (d.loss == "bd3lm") != (attention == "block_causal"):
        raise ConfigError(
            f"config.diffusion.loss={d.loss!r} and config.model.name={model.name!r} (attention "
            f"{attention!r}) do not go together: loss 'bd3lm' trains a block-causal network (name='bd3lm', "
            "or 'llama' with attention='block_causal'), and only it"
        )
    if d.loss == "ar" and attention != "causal":
        raise ConfigError(
            f"config.diffusion.loss='ar' needs a causal network (name='ar', or 'llama' with "
            f"attention='causal'), got name={model.name!r} with attention {attention!r}"
        )
    if d.loss in _TIME_FREE_LOSSES and model.time_conditioning:
        raise ConfigError(
            f"config.model.time_conditioning must be False for loss={d.loss!r} (the loss passes the network "
            "no time), got True"
        )


def validate_curriculum_config(d) -> None:
    """config.diffusion.curriculum (DUO's, ddlm.train.config_lib.duo_curriculum_config): used by loss 'duo'
    only, so end > 0 with another loss is a mistake; the relaxation's gamma range and the tau schedule."""
    c = d.curriculum
    _int_at_least(c, "diffusion.curriculum", ("start", "end"), 0, " (0 = no curriculum)")
    if c.end and d.loss != "duo":
        raise ConfigError(
            f"config.diffusion.curriculum.end must be 0 for loss={d.loss!r} (the curriculum is DUO's, loss='duo'), "
            f"got {c.end}"
        )
    if c.end and c.start >= c.end:
        raise ConfigError(
            f"config.diffusion.curriculum.start must be < curriculum.end={c.end}, got {c.start}"
        )
    for name in ("tau_log10_start", "tau_log10_end", "gamma_min", "gamma_max"):
        _require(_finite(c[name]), f"diffusion.curriculum.{name}", "a finite number", c[name])
    if not c.gamma_min < c.gamma_max:
        raise ConfigError(
            f"config.diffusion.curriculum.gamma_min must be < curriculum.gamma_max={c.gamma_max}, got {c.gamma_min}"
        )


def validate_data_config(data) -> None:
    """config.data (ddlm.data.pipeline.default_config's fields) that can be checked without reading data;
    the corpus, the tokenizer's files and the splits are checked when opened, before training."""
    from ddlm.data import sft

    _strings(data, "data", ("corpus", "data_dir", "tokenizer_path", "train_split", "eval_split", "sft_data"))
    for name in ("corpus", "text_field", "train_split", "eval_split", "tokenizer"):
        _require(isinstance(data[name], str) and data[name], f"data.{name}", "a non-empty string", data[name])
    # Every document's key hashes into [0, 1): a fraction of 1 leaves no training data.
    _require(
        _finite(data.validation_fraction) and 0 <= data.validation_fraction < 1,
        "data.validation_fraction",
        "in [0, 1)",
        data.validation_fraction,
    )
    _int_at_least(data, "data", ("vocab_size",), 0, " (0 = the tokenizer's)")
    _int_at_least(data, "data", ("num_workers",), 0, " (0 = in-process)")
    _int_at_least(data, "data", ("worker_buffer_size",), 1)
    _require(_is_int(data.shuffle_seed), "data.shuffle_seed", "an integer", data.shuffle_seed)
    _one_of(data, "data", "spm_model_type", _SPM_MODEL_TYPES)
    _one_of(data, "data", "packing", _PACKINGS)
    _one_of(data, "data", "sft_template", sft.TEMPLATES)
    _bools(data, "data", ("shard_by_process",))


def validate_optim_config(o) -> None:
    """The optimizer fields (config.optim): each bad value is one ConfigError naming the field."""
    positive, non_negative = "a finite number > 0", "a finite number >= 0"
    checks = (
        ("name", o.name == "adamw", "'adamw'"),
        # A zero, negative or non-finite peak learning rate trains nothing or diverges at once.
        ("lr", _finite(o.lr) and o.lr > 0, positive),
        ("warmup_steps", _is_int(o.warmup_steps) and o.warmup_steps >= 0, "an integer >= 0"),
        ("decay", o.decay in ("constant", "cosine"), "'constant' or 'cosine'"),
        ("min_lr_ratio", _finite(o.min_lr_ratio) and 0 <= o.min_lr_ratio <= 1, "in [0, 1]"),
        # Adam's moment decays (Kingma & Ba, Alg. 1): b = 1 makes the bias correction 1 - b^t zero (a
        # division by zero in every update); b < 0 is not a decay.
        ("b1", _finite(o.b1) and 0 <= o.b1 < 1, "in [0, 1)"),
        ("b2", _finite(o.b2) and 0 <= o.b2 < 1, "in [0, 1)"),
        ("eps", _finite(o.eps) and o.eps > 0, positive),
        ("weight_decay", _finite(o.weight_decay) and o.weight_decay >= 0, non_negative),
        ("grad_clip", _finite(o.grad_clip) and o.grad_clip >= 0, non_negative + " (0 = off)"),
        ("grad_accum_steps", _is_int(o.grad_accum_steps) and o.grad_accum_steps >= 1, "an integer >= 1"),
        # ema_decay = 1 would keep the random initialisation forever (eval and sampling use the EMA).
        ("ema_decay", _finite(o.ema_decay) and 0 <= o.ema_decay < 1, "in [0, 1)"),
    )
    for name, ok, expected in checks:
        _require(ok, f"optim.{name}", expected, o[name])
    fused = o.get("fused_update", False)  # absent from the configs of runs before it existed
    _require(isinstance(fused, bool), "optim.fused_update", "True or False", fused)


def validate_train_config(t) -> None:
    """config.train: counts, intervals, the NaN policy and the switches."""
    _one_of(t, "train", "nan_policy", NAN_POLICIES)
    counts = ("steps", "batch_size", "seq_len", "eval_batch_size", "eval_batches", "log_every")
    _int_at_least(t, "train", (*counts, "keep_checkpoints"), 1)
    _int_at_least(t, "train", ("eval_every", "ckpt_every"), 0, " (0 = only at the end)")
    _require(_is_int(t.seed) and 0 <= t.seed < 2**32, "train.seed", "an integer in [0, 2^32)", t.seed)
    _require(
        _finite(t.peak_flops_per_device) and t.peak_flops_per_device >= 0,
        "train.peak_flops_per_device",
        "a finite number >= 0 (0 = look up the device kind)",
        t.peak_flops_per_device,
    )
    _bools(t, "train", ("allow_data_change", "async_checkpoints", "sample_at_end"))
    _strings(t, "train", ("init_from",))


def validate_config(config, num_devices: int | None = None, *, devices_known: bool = True) -> None:
    """Config errors that can be caught before any work; each raises ConfigError naming the field.
    `num_devices` (default: all of jax's) is the mesh's size. devices_known=False: before jax may start
    its devices (ddlm.main, ahead of jax.distributed.initialize, which must come first): the mesh's
    fields are checked, their product against the device count later (the trainer)."""
    import jax

    t = config.train
    validate_train_config(t)
    validate_optim_config(config.optim)
    validate_model_config(config.model, seq_len=t.seq_len, backend_known=devices_known)
    validate_diffusion_config(config.diffusion, config.model)
    validate_data_config(config.data)
    if not devices_known:  # the fields only: asking jax for its devices would start its backend
        sharding.mesh_sizes(config.mesh)
        _validate_rest(config)
        return  # the distillation's teacher is checked by the trainer's build (it reads the teacher's files)
    data, fsdp, _ = sharding.mesh_shape(config.mesh, num_devices or jax.device_count())
    accum = config.optim.grad_accum_steps
    if t.batch_size % (data * fsdp * accum):
        raise ConfigError(
            f"config.train.batch_size={t.batch_size} must be divisible by mesh data*fsdp={data * fsdp} "
            f"times optim.grad_accum_steps={accum}"
        )
    if t.eval_batch_size % (data * fsdp):
        raise ConfigError(
            f"config.train.eval_batch_size={t.eval_batch_size} must be divisible by mesh "
            f"data*fsdp={data * fsdp}"
        )
    _validate_rest(config)
    from ddlm.train import distill

    distill.check_teacher(config)  # config.distill: the teacher run's checkpoint fits the method and the student


def _validate_rest(config) -> None:
    """validate_config's sections that do not depend on the device count."""
    from ddlm.data import sft
    from ddlm.train import adapt

    t = config.train
    adapt.validate(config)
    from ddlm.train import lora, rl

    lora.validate(config)  # config.lora: adapters (optional section)
    rl.validate(config)  # config.rl: the RL mode (optional section)
    from ddlm.train import distill

    distill.validate(config)  # config.distill: the distillation mode (method 'none': off)
    if config.diffusion.self_conditioning and (rl.enabled(config) or distill.enabled(config)):
        raise ConfigError(
            f"config.diffusion.self_conditioning={config.diffusion.self_conditioning} is for the diffusion "
            "losses; the RL and distillation modes' losses call the network once: set it to 0"
        )
    if (config.diffusion.loss == "sft") != sft.is_sft(config.data):
        raise ConfigError(
            "config.diffusion.loss='sft' and config.data.sft_data go together (the SFT loss reads the "
            f"prompt/response rows of ddlm.data.sft); got loss={config.diffusion.loss!r} with sft_data "
            + ("set" if sft.is_sft(config.data) else "unset")
        )
    if t.sample_at_end:  # a bad sampler field fails now, not after training
        from ddlm.sampling import config as sampler_config

        seq_len = config.sampler.seq_len if "seq_len" in config.sampler else 0
        sampler_config.validate(config.sampler, diffusion=config.diffusion, seq_len=seq_len or t.seq_len)
