"""The trainer: one linear loop, read top to bottom.

    train_and_evaluate(config, workdir)   train (resuming from <workdir>/checkpoints), eval, checkpoint
    evaluate(config, workdir)             eval the latest checkpoint's EMA parameters on the validation split

Sections: setup (mesh, tokenizer, network, optimizer, sharded state) -> restore -> compile -> loop
(train step, NaN policy, metrics and progress, eval, checkpoints) -> samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from ddlm import checkpoints, compilation_cache, distributed, loading, paths, sharding, workdir_lock
from ddlm.sharding import ConfigError
from ddlm.train import console, optim
from ddlm.train import metrics as metrics_lib
from ddlm.train import state as state_lib
from ddlm.train import step as step_lib
from ddlm.train.validation import (  # noqa: F401 -- trainer.validate_config, as before the checks moved
    NAN_POLICIES,
    validate_config,
    validate_optim_config,
)

# Called as hook(step) once the checkpoint of `step` is complete on disk. While any is installed, the loop
# waits for each checkpoint it saves (with several processes, a barrier every process passes), then calls
# them. The seam of the tests that crash a run right after a checkpoint (tests/killable_main.py installs a
# SIGKILL there); production runs install none.
AFTER_CHECKPOINT_HOOKS: list[Callable[[int], None]] = []


class NonFiniteError(RuntimeError):
    """A non-finite loss, gradient or update under train.nan_policy='stop'."""


@dataclasses.dataclass
class Setup:
    """Everything the train and eval loops share, built once from the config."""

    config: Any
    mesh: Mesh
    tokenizer: Any
    model: nn.Module
    loss_fn: step_lib.LossFn
    tx: Any
    lr_schedule: Any
    init_state: Any  # () -> TrainState
    state_shardings: Any
    abstract_state: Any  # () -> TrainState of ShapeDtypeStructs with shardings
    batch_sharding: Any
    frozen: Any = None  # LoRA (ddlm/train/lora.py): the frozen base parameters, an argument of the steps
    eval_loss_fn: Any = None  # the eval step's loss where the train step's differs (distillation); None: loss_fn

    def context(self):
        """Mesh and logical-axis rules in scope while tracing (for the model's activation constraints)."""
        return sharding.mesh_context(self.mesh)


def warn_config(config) -> None:
    """Settings that train but are probably not meant (a warning, not an error)."""
    if config.optim.warmup_steps > config.train.steps:
        logging.warning(
            "config.optim.warmup_steps=%d exceeds config.train.steps=%d: the learning rate never reaches "
            "its peak config.optim.lr.",
            config.optim.warmup_steps,
            config.train.steps,
        )


def check_data_paths(data_config):
    """A missing local corpus or tokenizer file is a config error, reported before any work."""
    if data_config.corpus.startswith("local:"):
        directory = os.path.expanduser(data_config.corpus[len("local:") :])
        if not os.path.isdir(directory):
            raise ConfigError(f"config.data.corpus: data directory {directory!r} does not exist")
    if data_config.tokenizer_path and not os.path.exists(os.path.expanduser(data_config.tokenizer_path)):
        raise ConfigError(f"config.data.tokenizer_path: file {data_config.tokenizer_path!r} does not exist")


def build(config, devices=None) -> Setup:
    """Mesh, tokenizer, network, optimizer and the sharded state's initialiser, from the config."""
    from ddlm import models
    from ddlm.data import tokenizers
    from ddlm.train import distill, lora, rl

    devices = list(jax.devices() if devices is None else devices)
    validate_config(config, len(devices))
    mesh = sharding.make_mesh(config.mesh, devices)
    check_data_paths(config.data)
    tokenizer = tokenizers.get_tokenizer(config.data)
    model = models.get_model(config.model, tokenizer.vocab_size)
    init_inputs = state_lib.model_init_inputs(
        config.diffusion.loss, sharding.data_parallel_size(mesh), config.train.seq_len
    )
    frozen = None
    if lora.enabled(config):  # adapters on a frozen base: the state holds the adapter only
        model, frozen = lora.build(model, config, mesh, tokenizer, init_inputs)
    eval_loss_fn = None  # the eval step's is the train step's
    if rl.enabled(config):  # the RL mode's policy loss (ddlm/train/rl.py)
        loss_fn = rl.make_loss_fn(model, config, mask_id=tokenizer.mask_id)
    else:
        loss_fn = step_lib.make_loss_fn(
            model,
            config.diffusion,
            config.model,
            vocab_size=tokenizer.vocab_size,
            mask_id=tokenizer.mask_id,
            anneal_steps=config.adapt.anneal_steps,
        )
    if distill.enabled(config):  # the student-teacher loss (ddlm/train/distill.py); eval: the student's NELBO
        eval_loss_fn = loss_fn
        loss_fn = distill.make_loss_fn(model, config, vocab_size=tokenizer.vocab_size, mask_id=tokenizer.mask_id)
    lr_schedule = optim.learning_rate_schedule(config.optim, config.train.steps)
    tx = optim.make_optimizer(config.optim, config.train.steps)
    # Initialisation is traced without the mesh in scope: the parameters' shardings come from the jit's
    # out_shardings, and flax's DenseGeneral re-boxes a flattened kernel at init, which fails a rank check
    # under an active mesh. The activation constraints matter in the train step, traced under the mesh.
    init_state, shardings, abstract_state = state_lib.make_train_state(
        lora.AdapterInit(model, config.lora.train_also) if frozen is not None else model,
        tx,
        mesh,
        seed=config.train.seed,
        init_inputs=init_inputs,
    )
    if distill.enabled(config):  # the state carries the teacher's parameters, sharded as the student's
        init_state, shardings, abstract_state = distill.with_teacher(init_state, shardings, abstract_state, mesh)
    return Setup(
        config=config,
        mesh=mesh,
        tokenizer=tokenizer,
        model=model,
        loss_fn=loss_fn,
        tx=tx,
        lr_schedule=lr_schedule,
        init_state=init_state,
        state_shardings=shardings,
        abstract_state=abstract_state,
        batch_sharding=sharding.batch_sharding(mesh),
        frozen=frozen,
        eval_loss_fn=eval_loss_fn,
    )


def jit_train_step(setup: Setup):
    """The train step jitted once: state sharded as `state_shardings` and donated, batch over (data, fsdp).

    The step's randomness is fold_in(state.rng, state.step): a resumed run draws the same keys. With LoRA the
    jitted function takes a third argument, setup.frozen (the frozen base joined to the trainable part);
    compile_train_step binds it, so every compiled step is called as compiled(state, batch). Distillation:
    the teacher is refreshed (ddlm/train/distill.py) before the step's loss reads it."""
    cfg = setup.config
    from ddlm.train import distill, lora

    distilling = distill.enabled(cfg)

    def stepped(state, batch, frozen):
        rng = jax.random.fold_in(state.rng, state.step)
        loss_fn = setup.loss_fn if frozen is None else lora.bind(setup.loss_fn, frozen)
        if distilling:  # the student-teacher loss reads this round's teacher and the step
            state = distill.refresh_teacher(state, cfg.distill)
            loss_fn = functools.partial(loss_fn, step=state.step, teacher=state.teacher)
        # The annealed attention mask (ddlm/train/adapt.py) and DUO's curriculum depend on the step.
        elif cfg.adapt.anneal_steps or step_lib.duo_curriculum(cfg.diffusion, setup.tokenizer.vocab_size):
            loss_fn = functools.partial(loss_fn, step=state.step)
        new_state, metrics = step_lib.train_step(
            state,
            batch,
            rng,
            loss_fn=loss_fn,
            tx=setup.tx,
            lr_schedule=setup.lr_schedule,
            accum_steps=cfg.optim.grad_accum_steps,
            ema_decay=cfg.optim.ema_decay,
        )
        if distilling:
            metrics["teacher_refreshes"] = new_state.teacher_refreshes.astype(jnp.float32)
        return new_state, metrics

    batch_sh = {k: s.sharding for k, s in batch_abstract(setup, cfg.train.batch_size).items()}
    if setup.frozen is None:
        fn, in_shardings = (lambda state, batch: stepped(state, batch, None)), (setup.state_shardings, batch_sh)
    else:
        fn, in_shardings = stepped, (setup.state_shardings, batch_sh, _frozen_shardings(setup))
    return jax.jit(
        fn,
        in_shardings=in_shardings,
        out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
        donate_argnums=(0,),
    )


def batch_abstract(setup: Setup, batch_size: int) -> dict:
    """ShapeDtypeStructs (with shardings) of a training batch: tokens and loss_mask, or the RL mode's batch."""
    from ddlm.train import rl

    if rl.enabled(setup.config):
        return rl.batch_abstract(setup.config, setup.batch_sharding, sharding.replicated(setup.mesh))
    shape = (batch_size, setup.config.train.seq_len)
    return {
        k: jax.ShapeDtypeStruct(shape, dt, sharding=setup.batch_sharding)
        for k, dt in (("tokens", jnp.int32), ("loss_mask", jnp.float32))
    }


def _frozen_shardings(setup: Setup):
    return None if setup.frozen is None else jax.tree.map(lambda x: x.sharding, setup.frozen)


def _frozen_abstract(setup: Setup):
    if setup.frozen is None:
        return None
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), setup.frozen)


def _has_sub_byte(tree) -> bool:
    """Whether a tree holds arrays of fewer than 8 bits a value (QLoRA's int4 base kernels)."""
    return tree is not None and any(
        jnp.issubdtype(x.dtype, jnp.integer) and jnp.iinfo(x.dtype).bits < 8 for x in jax.tree.leaves(tree)
    )


class _WithFrozen:
    """A LoRA step (compiled or _Dispatched) with setup.frozen bound as its last argument, and the compiled
    step's analyses (memory_analysis, ...)."""

    def __init__(self, step, frozen):
        self.step, self.frozen = step, frozen

    def __call__(self, *args):
        return self.step(*args, self.frozen)

    def __getattr__(self, name):
        return getattr(self.step, name)


class _Dispatched:
    """A step called through jit's dispatch, with the AOT-compiled one's analyses (memory_analysis, ...).
    XLA:CPU compiles an int4 argument for the packed layout, which the host's int4 arrays (one value a byte)
    never have: the AOT executable refuses them, while jit's dispatch compiles for the arrays it is given
    (a second compile, QLoRA int4 only)."""

    def __init__(self, setup: Setup, jitted, compiled):
        self.setup, self.jitted, self.compiled = setup, jitted, compiled

    def __call__(self, *args):
        with self.setup.context():
            return self.jitted(*args)

    def __getattr__(self, name):
        return getattr(self.compiled, name)


def compile_train_step(setup: Setup):
    """jit_train_step lowered (under the mesh, see lower_with_mesh) and compiled for the config's batch; call
    it as compiled(state, batch) (with LoRA the frozen base is bound to it)."""
    batch = batch_abstract(setup, setup.config.train.batch_size)
    jitted = jit_train_step(setup)
    if setup.frozen is None:
        return lower_with_mesh(setup, jitted, setup.abstract_state(), batch).compile()
    compiled = lower_with_mesh(setup, jitted, setup.abstract_state(), batch, _frozen_abstract(setup)).compile()
    if _has_sub_byte(setup.frozen):
        compiled = _Dispatched(setup, jitted, compiled)
    return _WithFrozen(compiled, setup.frozen)


def compile_eval_step(setup: Setup):
    """The eval step jitted and compiled for (params, validation batch, rng)."""
    from ddlm.train import lora

    batch_sh = {"tokens": setup.batch_sharding, "loss_mask": setup.batch_sharding}
    rep = sharding.replicated(setup.mesh)

    eval_loss_fn = setup.eval_loss_fn or setup.loss_fn

    def evaluated(params, batch, rng, frozen):
        loss_fn = eval_loss_fn if frozen is None else lora.bind(eval_loss_fn, frozen)
        return step_lib.eval_step(params, batch, rng, loss_fn=loss_fn)

    jitted = jax.jit(
        evaluated,
        in_shardings=(setup.state_shardings.params, batch_sh, rep, _frozen_shardings(setup)),
        out_shardings=rep,
    )
    shape = (setup.config.train.eval_batch_size, setup.config.train.seq_len)
    batch_abstract = {
        "tokens": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=setup.batch_sharding),
        "loss_mask": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=setup.batch_sharding),
    }
    rng_abstract = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)
    compiled = lower_with_mesh(
        setup, jitted, setup.abstract_state().params, batch_abstract, rng_abstract, _frozen_abstract(setup)
    ).compile()
    if _has_sub_byte(setup.frozen):
        compiled = _Dispatched(setup, jitted, compiled)
    return lambda params, batch, rng: compiled(params, batch, rng, setup.frozen)


def lower_with_mesh(setup: Setup, jitted, *args):
    """Traces `jitted` with the mesh and the rules in scope, so the network's logical activation
    constraints become sharding constraints. If the network cannot be traced under a mesh (a
    constraint of the wrong rank, say), falls back, with a warning, to tracing without: the in/out
    shardings alone then drive XLA's sharding propagation."""
    try:
        with setup.context():
            return jitted.lower(*args)
    except ValueError as e:
        if "with_sharding_constraint" not in str(e):
            raise
        logging.warning(
            "The network's activation sharding constraints fail under the mesh (%s); tracing without "
            "them: in/out shardings only.",
            str(e).splitlines()[0][:300],
        )
        return jitted.lower(*args)


def make_iterator(setup: Setup, split: str, *, batch_size: int, num_epochs=None):
    from ddlm.data import pipeline

    cfg = setup.config
    return pipeline.make_iterator(
        cfg.data,
        setup.tokenizer,
        split=split,
        global_batch_size=batch_size,
        seq_len=cfg.train.seq_len,
        seed=cfg.train.seed,
        sharding=setup.batch_sharding,
        num_epochs=num_epochs,
    )


def _no_validation_batch(cfg, reason: str = "") -> ConfigError:
    return ConfigError(
        f"the validation split (config.data.eval_split={cfg.data.eval_split!r}) has no full batch of "
        f"config.train.eval_batch_size={cfg.train.eval_batch_size} x config.train.seq_len="
        f"{cfg.train.seq_len} tokens" + (f": {reason}" if reason else "")
    )


def check_validation_split(setup: Setup) -> None:
    """Raises ConfigError unless the validation split yields one full eval batch. Run before training
    (like the train split's checks in make_iterator), so a too-short split is not found only by the
    final eval, after all the training, with the final checkpoint unwritten."""
    cfg = setup.config
    iterator = make_iterator(setup, "validation", batch_size=cfg.train.eval_batch_size, num_epochs=1)
    try:
        next(iterator)
    except StopIteration:
        raise _no_validation_batch(cfg) from None
    except ValueError as e:
        # ddlm.data.pipeline's "ran out before one batch" / "larger than the whole split"; any other
        # data error (a bad document, say) keeps its own message.
        if "ran out" not in str(e) and "larger than the whole split" not in str(e):
            raise
        raise _no_validation_batch(cfg, str(e)) from None


def run_eval(setup: Setup, eval_step, params, characters: dict | None = None) -> dict:
    """The NELBO of `params` (the exact NLL for loss 'ar') on the first `train.eval_batches` validation
    batches (the same batches and the same noise every time): 'nelbo' (nats/token), 'bits_per_token',
    'bits_per_char', 'perplexity_bound' = exp(nelbo), 'tokens', and the standard errors 'nelbo_se',
    'bits_per_token_se', 'bits_per_char_se' where there are two batches or more.

    bits/char is total bits over the characters of the decoded batches (tokenizer.decode: bos/eos/pad
    count no character), comparable across tokenizers like --mode=eval's. The standard errors take each
    batch as one draw (ddlm.eval.likelihood.ratio_summary over batches: data and Monte-Carlo noise
    together); --mode=eval's, over sequences, are tighter. characters: {batch index: characters}, filled on
    the first call and reused (the batches are the same every time; decoding is host work)."""
    from ddlm.eval import likelihood

    cfg = setup.config
    characters = {} if characters is None else characters
    iterator = make_iterator(setup, "validation", batch_size=cfg.train.eval_batch_size, num_epochs=1)
    base_key = np.asarray(jax.random.key_data(jax.random.key(cfg.train.seed + 1)))
    rep = sharding.replicated(setup.mesh)
    sums = []
    for i in range(cfg.train.eval_batches):
        try:
            batch = next(iterator)
        except StopIteration:
            break
        rng = jax.device_put(np.asarray(jax.random.fold_in(base_key, i)), rep)
        sums.append(eval_step(params, batch, rng))
        if i not in characters:  # every process gathers the batch (a collective with several)
            tokens, mask = likelihood.host_array(batch["tokens"]), likelihood.host_array(batch["loss_mask"])
            characters[i] = float(likelihood.characters_per_row(tokens, mask, setup.tokenizer.decode).sum())
    if not sums:
        raise _no_validation_batch(cfg)
    sums = jax.device_get(sums)
    nats = [float(s["loss_sum"]) for s in sums]
    tokens = [float(s["tokens"]) for s in sums]
    per_token = likelihood.ratio_summary(nats, tokens)
    per_char = likelihood.ratio_summary(nats, [characters[i] for i in range(len(sums))])
    nelbo, ln2 = per_token["mean"], math.log(2)
    out = {
        "nelbo": nelbo,
        "bits_per_token": nelbo / ln2,
        "bits_per_char": per_char["mean"] / ln2,
        "perplexity_bound": math.exp(min(nelbo, 700.0)),
        "tokens": sum(tokens),
        "batches": len(sums),
    }
    if math.isfinite(per_token["se"]):  # one batch: no standard error
        out.update(
            nelbo_se=per_token["se"],
            bits_per_token_se=per_token["se"] / ln2,
            bits_per_char_se=per_char["se"] / ln2,
        )
    return out


def eval_line(step: int, metrics: dict, loss: str, batches: int, seconds: float) -> str:
    """'eval at step 600 (EMA params, 8 batches): 3.4612 ± 0.0151 bits/char, NELBO 2.3991 ± 0.0105
    nats/token, perplexity <= 11.01 (0.6s)'; for loss 'ar' the exact 'NLL' and 'perplexity ='."""
    kind, bound = ("NLL", "=") if loss == "ar" else ("NELBO", "<=")

    def pm(key, digits=4):
        se = metrics.get(f"{key}_se")
        return f"{metrics[key]:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")

    return (
        f"eval at step {step} (EMA params, {batches} batch{'es' if batches != 1 else ''}): "
        f"{pm('bits_per_char')} bits/char, {kind} {pm('nelbo')} nats/token, perplexity {bound} "
        f"{metrics['perplexity_bound']:.3f} ({seconds:.1f}s)"
    )


def _log_memory(compiled):
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 -- not every backend reports it
        mem = None
    if mem is None:
        return
    fields = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "temp_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    parts = [
        f"{f.replace('_size_in_bytes', '')}={getattr(mem, f) / 2**20:.1f}MiB"
        for f in fields
        if hasattr(mem, f)
    ]
    logging.info("Compiled train step memory (per device): %s", ", ".join(parts))


def _check_finite(metrics_host: dict, step: int, policy: str, checkpointer, skipped: list):
    if metrics_host["finite"] >= 0.5:
        return
    detail = f"loss={metrics_host['loss']:.4g}, grad_norm={metrics_host['grad_norm']:.4g}"
    if policy == "skip":
        skipped.append(step)
        logging.warning(
            "Non-finite loss or gradients at step %d (%s): update skipped (%d so far).",
            step,
            detail,
            len(skipped),
        )
        return
    steps = checkpointer.all_steps()
    last = f"the last good checkpoint is step {steps[-1]}" if steps else "no checkpoint was written"
    raise NonFiniteError(
        f"non-finite loss or gradients at step {step} ({detail}); stopping, {last}. "
        f"Set --config.train.nan_policy=skip to skip such steps instead."
    )


def train_and_evaluate(config, workdir: str, devices=None) -> dict:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final eval metrics.

    `devices` (default: all) are the mesh's devices. `workdir`: a local path, a file:// URI or a bucket
    (gs://...; see ddlm.paths)."""
    workdir = paths.resolve(workdir)
    # The config's own mistakes are found before the workdir is touched; a mistake found later, in the data
    # or the network (before the first metrics are written), leaves no workdir behind if there was none.
    validate_config(config, None if devices is None else len(devices))
    new_workdir = not paths.path(workdir).exists()
    try:
        # The checkpointer and the metric writer are closed however the run ends: a pending checkpoint is
        # committed (or its failure reported) and orbax's threads do not outlive the call.
        with contextlib.ExitStack() as resources:
            return _train_and_evaluate(config, workdir, devices, resources)
    except BaseException:
        if new_workdir:
            remove_empty_folders(workdir)
        raise


def remove_empty_folders(directory: str) -> None:
    """Removes `directory` and the folders under it, as long as they hold no file: what a run that fails
    before it writes anything leaves (the write probe's folder, an empty checkpoints/). A folder with a file
    anywhere below it stays, so nothing written is ever deleted. Buckets have no empty folders."""
    if paths.is_remote(directory):
        return
    for folder, _, _ in os.walk(directory, topdown=False):
        with contextlib.suppress(OSError):  # not empty (or gone): kept
            os.rmdir(folder)


def _train_and_evaluate(config, workdir: str, devices, resources: contextlib.ExitStack) -> dict:
    # ---------------------------------------------------------------- setup
    checkpoints.check_writable(workdir, "--workdir")
    # One training job per workdir: a second is refused here, before it reads or writes anything.
    resources.enter_context(workdir_lock.hold(workdir))
    from ddlm.train import adapt

    adapt.check_resumable(workdir)  # a converted (parameters-only) folder is a start, not a run to resume
    setup = build(config, devices)
    warn_config(config)
    check_validation_split(setup)
    cfg = config.train
    total = cfg.steps
    logging.info(
        "Mesh %s on %d devices (%s)", dict(setup.mesh.shape), setup.mesh.size, jax.devices()[0].device_kind
    )
    checkpointer = resources.enter_context(
        checkpoints.Checkpointer(
            os.path.join(workdir, checkpoints.CHECKPOINTS_DIR),
            keep=cfg.keep_checkpoints,
            async_save=cfg.async_checkpoints,
        )
    )
    from ddlm.train import distill, rl

    rl_mode = rl.enabled(config)
    if rl_mode:  # batches of rewarded rollouts of the current policy (`state`, bound below)
        train_iter = rl.RolloutIterator(
            setup,
            lambda: state,
            lambda: adapt.load_init_params(cfg.init_from, setup.abstract_state().params, setup.tokenizer),
        )
    else:
        train_iter = make_iterator(setup, "train", batch_size=cfg.batch_size)
    checkpoint_meta = checkpoints.checkpoint_metadata(config, setup.tokenizer)

    # ---------------------------------------------------------------- restore or initialise
    state, restored = checkpointer.restore_latest(
        setup.abstract_state(),
        train_iter,
        metadata=checkpoint_meta,
        allow_data_change=cfg.allow_data_change,
    )
    if state is None:
        state = setup.init_state()
        logging.info("No checkpoint in %s: initialised a new model.", checkpointer.directory)
        if cfg.init_from and setup.frozen is None:  # adaptation, fine-tuning (LoRA: the base is frozen)
            params = adapt.load_init_params(cfg.init_from, setup.abstract_state().params, setup.tokenizer)
            # Two buffers: the train step donates the state, and one buffer cannot be donated twice.
            state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
        elif setup.frozen is not None and config.lora.train_also:  # LoRA: trained base parameters start as the base's
            from ddlm.train import lora

            state = state.replace(
                params=lora.seed_trainable(state.params, setup.frozen),
                ema_params=lora.seed_trainable(state.ema_params, setup.frozen),
            )
        if distill.enabled(config):  # the teacher run's parameters: the teacher, and the student's start
            state = distill.start(state, setup)
    else:
        logging.info("Restored checkpoint from step %d (of %d).", restored, total)
    start = int(jax.device_get(state.step))
    if start >= total:
        # A rerun of a finished job: nothing to train, so nothing to compile (20 s and more).
        checkpointer.close()
        logging.info(
            "Already trained to step %d (config.train.steps=%d): nothing to do. --mode=eval evaluates "
            "and --mode=sample samples this checkpoint.",
            start,
            total,
        )
        if cfg.sample_at_end:
            if _samples_written(config, workdir, start):
                logging.info(
                    "Samples of step %d are already in %s: not sampling again (--mode=sample makes new ones).",
                    start,
                    _samples_dir(config, workdir),
                )
            else:  # the finished run was stopped before its samples were written
                run_sampling_if_available(config, workdir)
        return {}
    from ddlm.models import flops_per_token

    num_params = state_lib.count_params(state.params)
    flops_per_tok = flops_per_token(config.model, setup.tokenizer.vocab_size, cfg.seq_len)
    peak, peak_text = metrics_lib.mfu_peak(cfg.peak_flops_per_device)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    logging.info(
        "Model: %s, %s parameters, %.3g training FLOPs per token; %s.",
        config.model.name,
        f"{num_params:,}",
        flops_per_tok,
        f"MFU against {peak_text}" if math.isfinite(peak) else peak_text,
    )

    # ---------------------------------------------------------------- compile
    eval_step = None if rl_mode else compile_eval_step(setup)  # RL: held-out accuracy (rl.evaluate)
    t0, before = time.time(), compilation_cache.stats()
    compiled = compile_train_step(setup)
    after = compilation_cache.stats()
    if after.loaded > before.loaded and after.compiled == before.compiled:
        logging.info("Loaded the compiled train step from the compilation cache in %.1fs.", time.time() - t0)
    else:
        logging.info("Compiled the train step in %.1fs.", time.time() - t0)
    _log_memory(compiled)
    # The processes meet before the first step: one that compiled faster would otherwise wait in the step's
    # first collective, whose connection set-up gives up after a fixed 30 s (see ddlm.distributed).
    distributed.wait_for_all("the first train step")
    # Opened once the steps compiled (a network that cannot be traced leaves no metrics files). Metrics past
    # the restored step were written by the run that was interrupted: the resumed run writes them again, so
    # they are dropped (each step once in metrics.jsonl and TensorBoard).
    writer = resources.enter_context(metrics_lib.MetricWriter(workdir, resume_step=start))

    # ---------------------------------------------------------------- loop
    skipped: list[int] = []
    # Each step's finiteness is checked once, as soon as its metrics are on the host: one step late
    # (`pending`, so the host does not wait for the step it has just dispatched), or at once where the
    # step's metrics are fetched anyway (logging, checkpoints).
    pending = None  # (step, metrics on device) not yet checked
    window = []
    t_window, steps_window = time.time(), 0
    eval_metrics = {}
    eval_characters: dict[int, float] = {}  # run_eval's characters per validation batch, counted once
    t_train = time.time()
    progress = console.TrainProgress(
        start,
        total,
        tokens_per_step=tokens_per_step,
        flops_per_token=flops_per_tok,
        peak_flops=peak,
        log_every=cfg.log_every,
    )

    def check(step, host_metrics):
        _check_finite(host_metrics, step, cfg.nan_policy, checkpointer, skipped)
        progress.update(step, float(host_metrics["loss"]))

    def save(step, metrics):
        nonlocal pending
        if pending is not None:  # never checkpoint a state that has not been checked
            check(step, jax.device_get(metrics))
            pending = None
        writer.flush()  # the scalars up to this step are on disk before its checkpoint can commit
        checkpointer.save(step, state, train_iter, metadata=checkpoint_meta, force=True)

    # SIGTERM (preemption, scancel, the launcher) from here on: checkpoint at the next step boundary, exit
    # cleanly. Installed after compiling: a job stopped before its first step has nothing new to save.
    stop = resources.enter_context(distributed.StopRequest())
    stopped_at = None

    try:
        for step in range(start + 1, total + 1):
            batch = next(train_iter)
            state, metrics = compiled(state, batch)
            if pending is not None:
                check(pending[0], jax.device_get(pending[1]))
            pending = (step, metrics)
            window.append(metrics)
            steps_window += 1

            is_last = step == total
            if step % cfg.log_every == 0 or is_last:
                host = jax.device_get(window)
                check(step, host[-1])
                pending = None
                elapsed = time.time() - t_window
                steps_per_s = steps_window / max(elapsed, 1e-9)
                tokens_per_s = steps_per_s * tokens_per_step
                mean = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
                mean.update(steps_per_s=steps_per_s, tokens_per_s=tokens_per_s, skipped_steps=len(skipped))
                if rl_mode:  # where an RL step's time goes: its rollouts and the reference's estimate
                    mean.update(train_iter.window_timings(steps_window))
                if math.isfinite(peak):  # no MFU against an unknown peak (a CPU: metrics_lib.mfu_peak)
                    mean["mfu"] = flops_per_tok * tokens_per_s / peak
                writer.write(step, "train", mean)
                progress.report(step, mean)
                window, t_window, steps_window = [], time.time(), 0

            if (cfg.eval_every and step % cfg.eval_every == 0) or is_last:
                t_eval = time.time()
                if rl_mode:
                    eval_metrics = rl.evaluate(setup, train_iter.policy, state.ema_params)
                    writer.write(step, "eval", eval_metrics)
                    logging.info(rl.eval_line(step, eval_metrics, time.time() - t_eval))
                else:
                    eval_metrics = run_eval(setup, eval_step, state.ema_params, eval_characters)
                    writer.write(step, "eval", eval_metrics)
                    logging.info(
                        eval_line(
                            step,
                            eval_metrics,
                            config.diffusion.loss,
                            eval_metrics["batches"],
                            time.time() - t_eval,
                        )
                    )
                t_window += time.time() - t_eval  # eval time is not training throughput

            saved = (cfg.ckpt_every and step % cfg.ckpt_every == 0) or is_last
            if saved:
                save(step, metrics)
                if AFTER_CHECKPOINT_HOOKS:
                    checkpointer.wait()  # a barrier with several processes: every one waits
                    for hook in AFTER_CHECKPOINT_HOOKS:
                        hook(step)
            # Every process asks at every step (a collective agreement when there are several), so that
            # all stop after the same step with the same checkpoint.
            if not is_last and stop.reached(step):
                if not saved:
                    save(step, metrics)
                checkpointer.wait()
                stopped_at = step
                logging.warning(
                    "Stop requested (SIGTERM): saved the checkpoint of step %d of %d and stopped. Rerun the "
                    "same command to resume.",
                    step,
                    total,
                )
                break

    finally:  # also on errors and Ctrl-C: the terminal gets its log stream back
        progress.close()
    checkpointer.close()
    writer.close()
    if skipped:
        logging.warning("Skipped %d non-finite steps: %s", len(skipped), skipped[:20])
    if stopped_at is not None:
        return {}

    # ---------------------------------------------------------------- samples
    train_seconds = time.time() - t_train
    if cfg.sample_at_end:
        run_sampling_if_available(config, workdir)
    logging.info(
        closing_line(config, workdir, start=start, seconds=train_seconds, eval_metrics=eval_metrics)
    )
    return eval_metrics


def closing_line(config, workdir: str, *, start: int, seconds: float, eval_metrics: dict) -> str:
    """The last line of a finished run: what it trained, its final eval (eval_line's figures) and where the
    checkpoint, the samples and the metrics are."""
    cfg = config.train
    kind = "NLL" if config.diffusion.loss == "ar" else "NELBO"
    bpc, se = eval_metrics.get("bits_per_char"), eval_metrics.get("bits_per_char_se")
    final = "no eval" if bpc is None else f"{bpc:.4f}" + (f" ± {se:.4f}" if se is not None else "")
    if "accuracy" in eval_metrics:  # the RL mode's eval (ddlm/train/rl.py)
        kind, bpc = "held-out accuracy", None
        final = f"{eval_metrics['accuracy']:.4f} ± {eval_metrics['accuracy_se']:.4f}"
    if cfg.sample_at_end:
        samples = _latest_samples(config, workdir, cfg.steps) or "none written"
    else:
        samples = "none (config.train.sample_at_end=False)"
    checkpoint = os.path.join(workdir, checkpoints.CHECKPOINTS_DIR, str(cfg.steps))
    return (
        f"Done: trained steps {start + 1}-{cfg.steps} in {metrics_lib.format_duration(seconds)}; final "
        f"validation {final}{' bits/char' if kind != 'held-out accuracy' else ''} ({kind}, EMA params); "
        f"checkpoint {checkpoint}; samples {samples}; "
        f"metrics {os.path.join(workdir, 'metrics.jsonl')} and {os.path.join(workdir, 'tensorboard')}"
    )


# The split of --mode=eval's rows in metrics.jsonl / TensorBoard: a measurement of its own (config.eval's
# split and batches, standard errors over sequences), apart from the training run's periodic 'eval' rows, so
# that no step has two 'eval' rows; a rerun on the same checkpoint replaces its row.
EVAL_REPORT_SPLIT = "eval_report"


def evaluate(config, workdir: str, devices=None) -> dict:
    """--mode=eval: ddlm.eval.cli.run_eval (likelihood with standard errors over config.eval.split, report.json
    and a table), its headline figures also written to metrics.jsonl / TensorBoard as split 'eval_report'
    (one row per checkpoint step: a rerun replaces it)."""
    del devices  # the checkpoint is loaded on all devices
    from ddlm.eval import cli as eval_cli

    report = eval_cli.run_eval(config, workdir)
    try:
        checkpoints.check_writable(workdir, "--workdir")
    except checkpoints.CheckpointError as e:  # evaluating a run one may only read: report, don't fail
        logging.warning("%s: the eval metrics are logged, not saved.", e)
    else:
        with metrics_lib.MetricWriter(workdir) as writer:
            writer.write(report["step"], EVAL_REPORT_SPLIT, eval_cli.headline(report), replace=True)
    return report


def load_params(config, workdir: str, *, ema: bool = True, devices=None):
    """(setup, params, step) of the latest checkpoint in `workdir` (ddlm.loading.load_for_inference,
    plus the trainer's setup for callers that want the loss or the optimizer)."""
    loaded = loading.load_for_inference(workdir, config, ema=ema, devices=devices)
    return build(config, devices), loaded.params, loaded.step


def _samples_dir(config, workdir: str) -> str:
    return config.sampler.output_dir or os.path.join(workdir, "samples")


def _samples_written(config, workdir: str, step: int) -> bool:
    """Whether samples of checkpoint `step` exist: a folder <date>-<time>-step<step>-<sampler>[-n] (the
    run folders of ddlm.sampling.cli) in the samples directory. A finished job's rerun then does not
    sample again."""
    directory = paths.path(_samples_dir(config, workdir))
    if not directory.is_dir():
        return False
    return any(f"-step{step}-" in entry.name for entry in directory.iterdir() if entry.is_dir())


def _latest_samples(config, workdir: str, step: int) -> str | None:
    """The newest samples folder of checkpoint `step` (the run folders of ddlm.sampling.cli sort by their
    date-time prefix), or None."""
    directory = paths.path(_samples_dir(config, workdir))
    if not directory.is_dir():
        return None
    runs = sorted(e.name for e in directory.iterdir() if e.is_dir() and f"-step{step}-" in e.name)
    return str(directory / runs[-1]) if runs else None


def run_sampling_if_available(config, workdir: str):
    try:
        from ddlm.sampling import cli as sampling_cli
    except ImportError:
        logging.warning("ddlm.sampling.cli is not available: no samples written.")
        return None
    return sampling_cli.run_sampling(config, workdir)
