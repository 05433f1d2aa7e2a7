"""`python -m ddlm.main --mode=sample --config=... --workdir=...`: samples from the latest checkpoint.

    run_sampling(config, workdir, load_fn=None) -> list of per-sample records

The steps, in order:
  validate  every config.sampler field (ddlm.sampling.config.validate), the sampler against the network and
            the sample length against the network's context (`check_config`), and that the output folder
            can be written (`check_output_dir`): each mistake is one line, before anything is loaded;
  load      the latest checkpoint's (EMA) parameters (ddlm.loading.load_for_inference);
  build     the initial tokens (conditioning) and sample(params, rng, x, clamp): the sampler named by
            config.sampler.name (ddlm.sampling.make_sampler) over denoise_fn(xt, t) = model.apply(...)
            (t = None for time-free networks, loss 'radd');
  run       compiled once (a sampler that would not fit in a device's memory is one line, not an
            out-of-memory traceback), in batches of config.sampler.batch_size sharded over the mesh's data
            axes;
  write     the files below, from process 0.

Length: config.sampler.seq_len (0 = config.train.seq_len) may not exceed the training context
config.train.seq_len, whose positions are the only ones the network was trained on, except with
name='bd3lm', which goes past it with a sliding window of clean blocks (config.sampler.window, at most
train.seq_len - block_size; 0 = that).

Each run writes to its own folder, <config.sampler.output_dir or <workdir>/samples>/<date>-<time>-step
<checkpoint>-<sampler>-<settings>/ (`run_folder_name`: e.g. ...-step2500-parallel-rule=threshold-threshold=0.9-
blocks=4-cache=dual, the settings that tell runs apart, steps only for samplers that take a step count), so
that no run overwrites another and a trajectory never sits beside another run's samples:

    samples.txt          the decoded samples, separated by lines of '='
    samples.jsonl        one JSON object per sample: text, tokens, nfe, time_s (batch time / batch size,
                         compilation excluded), entropy (nats, unigram entropy of its tokens), ...
    config.json          the sampler config of the run and the checkpoint step
    trajectory.html      with config.sampler.visualize: every sample's denoising trajectory (the rows where
                         a token changed), masked positions grey; on a terminal, sample 0's trajectory is
                         also played as an animation redrawn in place

Randomness: config.sampler.seed (default 0) fixes every draw, so the same command gives the same samples
(reproducible by default); pass another --config.sampler.seed for new ones.

Conditioning from the config: sampler.prompt (a prefix), sampler.infill (a template such as
'The [MASK:20] sat on the mat.'), sampler.constraints ('pos:id,...'), sampler.end (length control),
sampler.guidance_scale (classifier-free guidance with the known tokens masked as the unconditional input).

load_fn(config, workdir) -> (model, params, tokenizer, mesh or None, step) replaces the checkpoint loading
(tests; other checkpoint formats).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ddlm import checkpoints, compilation_cache, distributed, loading, losses, models, paths, schedules
from ddlm.data import sft
from ddlm.sampling import categorical, conditioning, make_sampler, score, stats, visualize
from ddlm.sampling import config as config_lib

resolve_config = config_lib.resolve  # default_config() with the given fields set (unknown field: error)


def _load_checkpoint(config, workdir):
    step = config.sampler.get("checkpoint_step", 0) or None
    loaded = loading.load_for_inference(workdir, config, ema=bool(config.sampler.use_ema), step=step)
    return loaded.model, loaded.params, loaded.tokenizer, loaded, loaded.step


def per_step_progress(sc, stream=None) -> bool:
    """Whether the sampler reports every step to the progress line (a host callback in its jitted loop):
    with config.sampler.progress, on a terminal (a log gets one line per batch either way), and with the
    persistent compilation cache off, since jax (0.10) never caches a program holding a host callback: a
    rerun would compile the sampler again (ddlm.compilation_cache)."""
    stream = stream or sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    return bool(sc.progress) and tty and compilation_cache.directory() is None


class _Progress:
    """One status line on stderr: samples done, the batch, and with per_step (from the jitted loop's host
    callback) the step within the batch."""

    def __init__(self, num_samples: int, num_batches: int, steps: int, stream=None, per_step: bool = True):
        self.num_samples, self.num_batches, self.steps = num_samples, num_batches, steps
        self.stream = stream or sys.stderr
        self.per_step = per_step
        self.start = time.time()
        self.done, self.batch, self.step, self._last = 0, 0, 0, 0.0

    def _draw(self, force=False):
        now = time.time()
        if not force and now - self._last < 0.1:
            return
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        if not tty:  # a log file gets one line per batch, not a carriage-return stream per step
            if force:
                self.stream.write(
                    f"sampling: {self.done}/{self.num_samples} samples, {now - self.start:.1f}s\n"
                )
                self.stream.flush()
            return
        self._last = now
        width = 24
        filled = int(width * self.step / max(self.steps, 1))
        bar = f" [{'#' * filled}{'.' * (width - filled)}] step {self.step}/{self.steps}," if self.per_step else ","
        self.stream.write(
            f"\rsampling: {self.done}/{self.num_samples} samples, batch {min(self.batch + 1, self.num_batches)}/"
            f"{self.num_batches}{bar} {now - self.start:.1f}s "
        )
        self.stream.flush()

    def on_batch_start(self, batch: int):
        """Batch `batch` starts: a terminal's line names it at once (without per-step updates it would
        otherwise show the previous batch until this one is done)."""
        self.batch, self.step = batch, 0
        if hasattr(self.stream, "isatty") and self.stream.isatty():
            self._draw(force=True)

    def on_step(self, k):  # called from inside the jitted loop
        self.step = int(k)
        self._draw()

    def on_batch(self, batch: int, done: int):
        self.batch, self.done, self.step = batch, done, self.steps
        self._draw(force=True)
        if done >= self.num_samples and hasattr(self.stream, "isatty") and self.stream.isatty():
            self.stream.write("\n")
            self.stream.flush()


def run_sampling(config, workdir: str, load_fn: Callable[..., Any] | None = None) -> list[dict]:
    """Samples per config.sampler from the latest checkpoint in workdir and writes them (see module doc)."""
    sc, seq_len = check_config(config)  # every field, before the (slow) checkpoint restore
    out_base = sc.output_dir or os.path.join(workdir, "samples")
    check_output_dir(out_base, "the samples folder (config.sampler.output_dir)")  # before any work
    model, params, tok, setup, ckpt_step = (load_fn or _load_checkpoint)(config, workdir)
    x_init, clamp = initial_tokens(config, sc, tok, seq_len)
    num_batches = -(-sc.num_samples // sc.batch_size)
    progress = _Progress(
        sc.num_samples,
        num_batches,
        _progress_steps(config, sc, x_init, tok.mask_id),
        per_step=per_step_progress(sc),
    )
    sample = sample_fn(config, sc, model, tok, progress)
    records, trajectories = _sample_batches(
        sample, params, x_init, clamp, sc, tok, setup=setup, ckpt_step=ckpt_step, progress=progress
    )
    if jax.process_index() != 0:  # every process sampled its shard of the batch; process 0 writes
        return records
    out_dir = _new_run_dir(out_base, run_folder_name(sc, seq_len, ckpt_step))
    _write_outputs(out_dir, config, workdir, sc, seq_len, tok, records, trajectories, ckpt_step)
    _print_summary(records, out_dir, trajectories)
    return records


# ------------------------------------------------------------------------------------------------ validate


def check_config(config) -> tuple[ml_collections.ConfigDict, int]:
    """(the resolved sampler config, the sample length) after every check that needs no checkpoint: the
    sampler fields (ddlm.sampling.config.validate), the sampler against the network (KV-cache samplers need
    their attention, Fast-dLLM caches a bidirectional one) and against its context (`_check_context`).
    Raises ValueError naming the field. The caller's config is not modified (bd3lm's window is set on the
    copy)."""
    sc = resolve_config(config.sampler)
    seq_len = sc.seq_len or config.train.seq_len
    sc = config_lib.validate(sc, diffusion=config.diffusion, seq_len=seq_len)
    # ar / bd3lm decode with the network's KV cache: only exact for a causal / block-causal network.
    needed = {"ar": "causal", "bd3lm": "block_causal"}.get(sc.name)
    if needed and models.attention_of(config.model) != needed:
        raise ValueError(
            f"config.sampler.name={sc.name!r} decodes with a KV cache and needs config.model.name="
            f"{sc.name!r}, got {config.model.name!r} (or name 'llama' with config.model.attention={needed!r}, "
            f"got {models.attention_of(config.model)!r})"
        )
    # Fast-dLLM's prefix / dual caches approximate a bidirectional network's keys/values.
    if sc.cache != "none" and config.model.name != "dit":
        raise ValueError(
            f"config.sampler.cache={sc.cache!r} caches a bidirectional network (config.model.name='dit'), got "
            f"config.model.name={config.model.name!r}: use cache='none'"
        )
    if sc.name == "bd3lm" and seq_len % config.model.block_size:
        raise ValueError(
            f"config.model.block_size={config.model.block_size} must divide the sample length "
            f"{seq_len} (config.sampler.seq_len, or config.train.seq_len when 0)"
        )
    _check_context(sc, seq_len, context=int(config.train.seq_len), block_size=int(config.model.block_size))
    return sc, seq_len


def _check_context(sc, seq_len: int, *, context: int, block_size: int) -> None:
    """No position attends further than the network was trained to (config.train.seq_len): its rotary
    positions past that are untrained, and attention memory grows with the square of the length (a typo'd
    100000 asked for 320 GB). Only bd3lm samples past the context, with its sliding window over the clean
    blocks (README, KV-cache decoding): a block then attends to `window` clean tokens and itself; a window
    of 0 becomes context - block_size there (on `sc`)."""
    if sc.name != "bd3lm":
        if seq_len > context:
            raise ValueError(
                f"config.sampler.seq_len={seq_len} is longer than the network's context, "
                f"config.train.seq_len={context} (positions past it were never trained; only name='bd3lm' "
                f"samples past it, with a sliding window): use at most {context} (0 = {context})"
            )
        return
    if seq_len <= context:
        return
    if sc.window == 0:
        sc.window = context - block_size
    if sc.window < seq_len:  # sliding (a window >= seq_len keeps every block)
        if sc.window + block_size > context:
            raise ValueError(
                f"config.sampler.window={sc.window}: a block would attend to {sc.window} clean tokens and "
                f"its own {block_size}, past the network's context config.train.seq_len={context}: use a "
                f"window of at most {context - block_size} (0 = {context - block_size})"
            )
        if not sc.kv_cache:
            raise ValueError(
                f"config.sampler.kv_cache must be True for seq_len={seq_len} past the network's context "
                f"config.train.seq_len={context}: the sliding window lives in the cache"
            )
    else:
        raise ValueError(
            f"config.sampler.window={sc.window} keeps all {seq_len} tokens, past the network's context "
            f"config.train.seq_len={context}: use a window of at most {context - block_size} "
            f"(0 = {context - block_size})"
        )


def check_output_dir(directory: str, what: str) -> None:
    """Fails with one line (checkpoints.check_writable, the trainer's probe) if `directory` cannot be
    written, before any work, so that a read-only workdir is not found out after sampling / evaluating.
    A folder not there yet is probed through its nearest existing parent: the probe creates nothing, so a
    mistyped --workdir is not left behind as an empty folder (the load then says there is no checkpoint)."""
    target = paths.path(directory)
    if not paths.is_remote(directory):  # a bucket's folders are prefixes: nothing to create
        while not target.exists() and target.parent != target:
            target = target.parent
    checkpoints.check_writable(str(target), what)


# ------------------------------------------------------------------------------------------------ build


def initial_tokens(config, sc, tok, seq_len: int, prompt_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """(x_init int [batch_size, seq_len], clamp bool [batch_size, seq_len]): the canvas every batch starts
    from (masks, with the prompt / infill template / constraints / end filled in) and the known positions.
    prompt_ids: the prefix's ids in place of sc.prompt's, bos and template included (the server's chats)."""
    mask_id, vocab = tok.mask_id, tok.vocab_size
    if prompt_ids is None:
        prompt_ids = tok.encode(sc.prompt) if sc.prompt else []
        if sft.is_sft(config.data):  # an SFT model: rows start with bos and the templated prompt
            prompt_ids = sft.encode_prompt(tok, sc.prompt, config.data.sft_template)
        elif sc.name in ("ar", "bd3lm"):  # trained on bos doc eos: the first token is predicted from bos
            prompt_ids = [tok.bos_id] + prompt_ids
    if len(prompt_ids) > seq_len:
        raise ValueError(
            f"config.sampler.prompt is {len(prompt_ids)} tokens, longer than the sample length {seq_len} "
            f"(config.sampler.seq_len, or config.train.seq_len when 0)"
        )
    template_ids = conditioning.parse_infill_template(sc.infill, tok.encode, mask_id) if sc.infill else None
    x_init = conditioning.initial_tokens(
        sc.batch_size,
        seq_len,
        mask_id,
        prompt_ids=prompt_ids,
        template_ids=template_ids,
        constraints=conditioning.parse_constraints(
            sc.constraints, vocab_size=vocab, mask_id=mask_id, length=seq_len
        ),
        end=sc.end,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
    )
    clamp = x_init != mask_id
    if config.diffusion.process == "uniform":
        x_init = np.where(clamp, x_init, 0)
    return x_init, clamp


def _progress_steps(config, sc, x_init: np.ndarray, mask_id: int) -> int:
    """The steps the progress bar counts in one batch: network steps, positions (ar) or blocks (bd3lm)."""
    if sc.name == "ar":
        return x_init.shape[1] - 1
    if sc.name == "bd3lm":
        return x_init.shape[1] // config.model.block_size
    if sc.name == "first_hitting":  # one step per masked position
        return int(np.sum(x_init == mask_id, axis=1).max())
    return sc.steps


def sample_fn(
    config, sc, model, tok, progress: _Progress | None, *, logits_hook=None, make_decoder=models.make_decoder
) -> Callable[..., Any]:
    """sample(params, rng, x [B, L], clamp [B, L]) -> SampleOutput: the sampler of config.sampler.name
    (ddlm.sampling.make_sampler) over the network, its score (SEDD) or its decoder (KV caches).
    logits_hook(logits [B, L, V], xt [B, L]) -> logits sees every network call and make_decoder(model,
    variables) makes the KV-cache samplers' decoder (the server's live canvases and per-row temperature)."""
    loss, graph = config.diffusion.loss, config.diffusion.process
    diffusion_schedule = schedules.get_schedule(
        config.diffusion.schedule, **dict(config.diffusion.schedule_kwargs)
    )
    schedule = (
        diffusion_schedule if sc.grid in ("", config.diffusion.schedule) else schedules.get_schedule(sc.grid)
    )
    time_free = loss == "radd"
    # A self-conditioned network (model.self_conditioning) is fed its previous prediction by the samplers
    # that call it step by step (sampling.SELF_CONDITIONED_SAMPLERS).
    self_conditioning = bool(getattr(model, "self_conditioning", False))

    def network(params, xt, t, self_cond=None):
        kwargs = {} if self_cond is None else {"self_cond": self_cond}
        logits = model.apply({"params": params}, xt, None if time_free else t, x0=None, train=False, **kwargs)
        logits = logits.astype(jnp.float32)
        return logits if logits_hook is None else logits_hook(logits, xt)

    def sample(params, rng, x, clamp):
        denoise_fn = lambda xt, t, self_cond=None: network(params, xt, t, self_cond)
        to_score = None
        if loss == "sedd_absorb":  # the absorbing samplers take the ratios without alpha/(1-alpha)
            to_score = lambda out, xt, t: losses.sedd_absorbing_log_cond(out)
        elif loss == "sedd_uniform":
            to_score = lambda out, xt, t: out  # a uniform-graph SEDD network outputs log ratios
        elif loss == "duo":  # a mean-parameterised network implies the log ratios (losses.duo_log_ratios);
            # temperature / top-k / top-p act on its x_0 prediction, as on a masked denoiser's
            to_score = lambda out, xt, t: losses.duo_log_ratios(
                categorical.filter_logits(out, sc.temperature, sc.top_k, sc.top_p),
                xt,
                diffusion_schedule.alpha(jnp.broadcast_to(t, xt.shape[:1])),
            )
        score_fn = None
        if to_score is not None:
            score_fn = score.network_score_fn(denoise_fn, to_score, self_conditioning=self_conditioning)
        if not sc.name.startswith("sedd_"):
            score_fn = None
        cached = sc.name in ("ar", "bd3lm") or sc.cache != "none"
        # canvas: a block-causal network is decoded with the KV cache of its committed canvases
        cached = cached or (sc.name == "canvas" and models.attention_of(config.model) == "block_causal")
        sampler = make_sampler(
            sc,
            denoise_fn=denoise_fn,
            score_fn=score_fn,
            schedule=schedule,
            mask_id=tok.mask_id,
            graph=graph,
            return_trajectory=bool(sc.visualize),
            progress_fn=progress.on_step if progress is not None and progress.per_step else None,
            decoder=make_decoder(model, {"params": params}) if cached else None,
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
            self_conditioning=self_conditioning,
        )
        return sampler(rng, x, clamp if graph == "uniform" else None)

    return sample


def _batch_sharding(setup, batch_size: int):
    """The batch split over the mesh's data axes (None: one device, or a batch they do not divide)."""
    mesh = getattr(setup, "mesh", None)
    if mesh is None:
        return None
    from jax.sharding import NamedSharding, PartitionSpec

    data_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    size = math.prod(mesh.shape[a] for a in data_axes)
    return NamedSharding(mesh, PartitionSpec(data_axes)) if batch_size % size == 0 else None


def _memory_limit_bytes(device) -> int | None:
    """What one device can hold: its allocator's limit (GPU, TPU), or for CPU devices the host's physical
    memory shared by the local devices; None when unknown."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 -- not every backend reports it
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # not POSIX
            return None
        return total // max(1, jax.local_device_count())
    return None


def _check_memory(compiled, sc, seq_len: int) -> None:
    """One line instead of an out-of-memory traceback: the compiled sampler's memory per device (XLA's
    memory_analysis: arguments, outputs and temporaries) against what a device holds."""
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 -- not every backend reports it
        mem = None
    limit = _memory_limit_bytes(jax.local_devices()[0])
    if mem is None or limit is None:
        return
    need = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    need -= getattr(mem, "alias_size_in_bytes", 0)
    if need > limit:
        raise ValueError(
            f"config.sampler.batch_size={sc.batch_size} x seq_len={seq_len}: the compiled sampler needs "
            f"{_size(need)} per device, more than the {_size(limit)} one holds; lower "
            "config.sampler.batch_size or config.sampler.seq_len"
        )


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------------ names


def uses_steps(sc) -> bool:
    """Whether config.sampler.steps sets the sampler's network calls: not for first_hitting (one call per
    masked token), ar (one per token), bd3lm over such a block sampler, nor parallel's adaptive rules
    (threshold, factor, entropy_bounded: as many steps as they need)."""
    from ddlm.sampling import rules

    name = sc.block_sampler if sc.name == "bd3lm" else sc.name  # bd3lm: the steps of its in-block sampler
    if name in ("first_hitting", "ar"):
        return False
    if name == "parallel":
        return rules.get_rule(sc.rule).fixed_count
    return True


# Sampler fields shared by every sampler, named when they differ from their defaults.
_SHARED_FIELDS = ("temperature", "top_k", "top_p", "grid", "t_min", "precision", "guidance_scale", "noise_removal")
_RULE_OPTIONS = {"threshold": "threshold", "factor": "factor", "entropy_bounded": "gamma"}


def settings(sc, seq_len: int) -> list[tuple[str, Any]]:
    """The settings that tell one sampling run from another, as (name, value) in a fixed order: the
    sampler's own (parallel: rule and its option, blocks, cache; remdm: remasking, eta; bd3lm: its block
    sampler; ar / bd3lm: a KV cache turned off), `steps` where the sampler takes a step count (uses_steps),
    then the shared fields that differ from their defaults (temperature, top_k, ...). Names are config.sampler
    fields, except blocks = seq_len / block_length."""
    out: list[tuple[str, Any]] = []
    if sc.name == "bd3lm":
        out.append(("block_sampler", sc.block_sampler))
    if sc.name == "parallel" or (sc.name == "bd3lm" and sc.block_sampler == "parallel"):
        out.append(("rule", sc.rule))
        if sc.rule in _RULE_OPTIONS:
            out.append((_RULE_OPTIONS[sc.rule], sc[_RULE_OPTIONS[sc.rule]]))
    if sc.name == "parallel":
        out.append(("blocks", seq_len // sc.block_length if sc.block_length else 1))
        out.append(("cache", sc.cache))
        if sc.cache != "none" and sc.refresh_every:
            out.append(("refresh_every", sc.refresh_every))
        if sc.parallel_remasking != "none":
            out += [("remasking", sc.parallel_remasking), ("eta", sc.eta)]
    if sc.name == "remdm":
        out += [("remasking", sc.remasking), ("eta", sc.eta)]
    if sc.name == "canvas" and sc.stop_when_stable:
        out.append(("stable_patience", sc.stable_patience))
    if sc.name == "canvas" and sc.stop_entropy:
        out += [("stop_entropy", sc.stop_entropy), ("stop_entropy_reduce", sc.stop_entropy_reduce)]
    if sc.name in ("ar", "bd3lm") and not sc.kv_cache:
        out.append(("kv_cache", False))
    if sc.name == "ar" and sc.greedy:
        out.append(("greedy", True))
    if sc.name == "bd3lm" and sc.window:
        out.append(("window", sc.window))
    if uses_steps(sc):
        out.append(("steps", sc.steps))
    defaults = config_lib.default_config()
    out += [(key, sc[key]) for key in _SHARED_FIELDS if sc[key] != defaults[key]]
    return out


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe(sc, seq_len: int) -> str:
    """'parallel (rule=threshold, threshold=0.9, blocks=4, cache=dual)', 'ancestral (steps=128)',
    'first_hitting': the sampler and its settings (`settings`), for log lines and titles."""
    items = ", ".join(f"{k}={_text(v)}" for k, v in settings(sc, seq_len))
    return f"{sc.name} ({items})" if items else sc.name


def run_folder_name(sc, seq_len: int, ckpt_step) -> str:
    """'<date>-<time>-step<N>-parallel-rule=threshold-threshold=0.9-blocks=4-cache=dual': a run's samples
    folder, named by its settings (`settings`) and made a safe folder name (ddlm.paths.folder_name: only
    letters, digits and '._=,-'; a name past _MAX_FOLDER_NAME characters keeps its start and gains a hash).
    _new_run_dir adds -2, -3, ... to a name already taken."""
    parts = [sc.name, *(f"{k}={_text(v)}" for k, v in settings(sc, seq_len))]
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-step{ckpt_step}-" + "-".join(parts)
    return paths.folder_name(name, max_len=_MAX_FOLDER_NAME)


# Below the 255 bytes most file systems allow in a name, with room for _new_run_dir's suffix.
_MAX_FOLDER_NAME = 200


# ------------------------------------------------------------------------------------------------ run


def _sample_batches(sample, params, x_init, clamp, sc, tok, *, setup, ckpt_step, progress):
    """Compiles `sample` once (every batch has one shape) and runs it for ceil(num_samples / batch_size)
    batches with keys fold_in(key(seed), batch). Returns (records: one dict per sample, see the module doc;
    trajectories: [steps, batch, L] arrays, one per batch, with config.sampler.visualize, else empty)."""
    x_sharding = _batch_sharding(setup, sc.batch_size)
    jitted = jax.jit(sample)
    context = setup.context() if hasattr(setup, "context") else _null_context()
    base_rng = jax.random.key(sc.seed)
    records, trajectories = [], []
    x_dev = jnp.asarray(x_init) if x_sharding is None else jax.device_put(x_init, x_sharding)
    clamp_dev = jnp.asarray(clamp) if x_sharding is None else jax.device_put(clamp, x_sharding)
    logging.info(
        "Sampling %d sequences of %d tokens with %s, checkpoint step %s.",
        sc.num_samples,
        x_init.shape[1],
        describe(sc, x_init.shape[1]),
        ckpt_step,
    )
    with context:
        t0, before = time.time(), compilation_cache.stats()
        compiled = jitted.lower(params, base_rng, x_dev, clamp_dev).compile()
        compile_s = time.time() - t0
        after = compilation_cache.stats()
        if after.loaded > before.loaded and after.compiled == before.compiled:
            logging.info("Loaded the compiled sampler from the compilation cache in %.1fs.", compile_s)
        else:
            logging.info("Compiled the sampler in %.1fs.", compile_s)
        _check_memory(compiled, sc, x_init.shape[1])
        # Multi-process: the processes meet once compiled, as the trainer's do (a first collective's Gloo
        # connection set-up gives up after a fixed 30 s; see ddlm.distributed).
        distributed.wait_for_all("the first sampling batch")
        progress.start = time.time()
        for b in range(progress.num_batches):
            progress.on_batch_start(b)
            t0 = time.time()
            out = compiled(params, jax.random.fold_in(base_rng, b), x_dev, clamp_dev)
            tokens = np.asarray(jax.device_get(out.tokens))
            batch_time = time.time() - t0
            if sc.truncate_at_eos:
                tokens = _truncate_at_eos(tokens, sc, tok)
            if out.trajectory is not None:
                keep = min(len(tokens), sc.num_samples - len(records))
                trajectories.append(np.asarray(jax.device_get(out.trajectory))[:, :keep])
            timing = {"time_s": batch_time / len(tokens), "batch_time_s": batch_time, "compile_s": compile_s}
            for row in tokens[: sc.num_samples - len(records)]:
                record = _record(len(records), row, sc, tok, nfe=int(out.nfe), ckpt_step=ckpt_step, **timing)
                records.append(record)
            progress.on_batch(b, len(records))
    return records, trajectories


def _truncate_at_eos(tokens: np.ndarray, sc, tok) -> np.ndarray:
    """tokens int [B, L] with everything after each row's first eos made padding."""
    # ar / bd3lm start with bos, which is the eos of some tokenizers (GPT-2): truncate after it.
    first = 1 if sc.name in ("ar", "bd3lm") else 0
    rest = conditioning.truncate_after_eos(tokens[:, first:], tok.eos_id, tok.pad_id)
    return np.concatenate([tokens[:, :first], rest], axis=1)


def _record(index: int, row: np.ndarray, sc, tok, *, nfe: int, ckpt_step, **timing) -> dict:
    """The samples.jsonl line of one sample (row int [L])."""
    content = row[(row != tok.pad_id) & (row != tok.mask_id)]
    return {
        "index": index,
        "text": tok.decode(row.tolist()),
        "tokens": row.tolist(),
        "nfe": nfe,
        **timing,  # time_s, batch_time_s, compile_s
        "entropy": stats.unigram_entropy(content),
        "sampler": sc.name,
        "steps": sc.steps if uses_steps(sc) else None,  # None: the sampler takes no step count
        "checkpoint_step": None if ckpt_step is None else int(ckpt_step),
    }


# ------------------------------------------------------------------------------------------------ write


def _write_outputs(out_dir, config, workdir, sc, seq_len, tok, records, trajectories, ckpt_step) -> None:
    """Writes samples.txt, samples.jsonl, config.json (and trajectory.html) into the run folder out_dir."""
    with paths.path(out_dir, "samples.txt").open("w") as f:
        for r in records:
            f.write(r["text"] + "\n" + "=" * 80 + "\n")
    with paths.path(out_dir, "samples.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    with paths.path(out_dir, "config.json").open("w") as f:
        run_info = {
            "sampler": sc.to_dict(),
            "checkpoint_step": None if ckpt_step is None else int(ckpt_step),
            "workdir": workdir,
            "seq_len": seq_len,
            "loss": config.diffusion.loss,
            "process": config.diffusion.process,
            "schedule": config.diffusion.schedule,
        }
        json.dump(run_info, f, indent=2, default=str)
    if trajectories:
        trajectory = np.concatenate(trajectories, axis=1)  # [S, num_samples, L]
        if sc.truncate_at_eos:  # the last row then equals the sample as written to samples.txt
            trajectory = np.asarray(conditioning.truncate_after_eos(trajectory, tok.eos_id, tok.pad_id))
        token_text = lambda i: tok.decode([i]) if i not in (tok.pad_id, tok.eos_id, tok.bos_id) else ""
        with paths.path(out_dir, "trajectory.html").open("w") as f:
            f.write(
                visualize.trajectory_html(
                    trajectory,
                    token_text,
                    tok.mask_id,
                    title=_trajectory_title(sc, records, ckpt_step, seq_len),
                    labels=[f"sample {r['index']} (NFE {r['nfe']})" for r in records],
                )
            )
        visualize.animate_terminal(trajectory[:, 0], token_text, tok.mask_id)


def _print_summary(records, out_dir: str, trajectories) -> None:
    for r in records[:8]:
        print(f"--- sample {r['index']} (NFE {r['nfe']}, entropy {r['entropy']:.2f}) ---\n{r['text']}")
    print(
        f"{len(records)} samples written to {out_dir}/: samples.txt, samples.jsonl, config.json"
        + (", trajectory.html" if trajectories else "")
    )
    mean_entropy = float(np.mean([r["entropy"] for r in records])) if records else float("nan")
    logging.info(
        "Wrote %d samples to %s (NFE %d, mean token entropy %.3f nats).",
        len(records),
        out_dir,
        records[0]["nfe"] if records else 0,
        mean_entropy,
    )


def _new_run_dir(base: str, name: str) -> str:
    """Creates and returns base/name, or base/name-2, -3, ... if it exists: a run never writes into another's.
    `base` may be a bucket (ddlm.paths)."""
    base = paths.resolve(base)
    paths.path(base).mkdir(parents=True, exist_ok=True)
    path, n = f"{base}/{name}", 1
    while True:
        try:
            paths.path(path).mkdir()
            return path
        except FileExistsError:
            n += 1
            path = f"{base}/{name}-{n}"


def _trajectory_title(sc, records, ckpt_step, seq_len: int) -> str:
    """'ancestral (steps=64): NFE 64 (network calls), checkpoint step 5' / 'first_hitting (one network call
    per unmasked token): NFE 122 ...'"""
    nfes = sorted({r["nfe"] for r in records})
    nfe = f"NFE {nfes[0]}" if len(nfes) == 1 else f"NFE {nfes[0]}-{nfes[-1]}"
    how = describe(sc, seq_len)
    if sc.name == "first_hitting":
        how = how.replace("first_hitting", "first_hitting (one network call per unmasked token)", 1)
    return f"{how}: {nfe} (network calls), checkpoint step {ckpt_step}"


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
