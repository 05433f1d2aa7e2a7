"""Distillation: a training mode of ddlm/train/trainer.py (config.distill.method set).

    python -m ddlm.main --config=experiments/distill_sdtt.py --workdir=runs/distill_sdtt   # teacher runs/quickstart

A trained teacher run (config.distill.teacher, its EMA parameters, read only) is loaded beside the student
and sharded like it on the mesh; the student starts from the teacher's parameters (config.train.init_from,
if set, names another start). One step of the trainer's loop in this mode (`jit_train_step`, one jitted
pure function):

  refresh   `refresh_teacher`: at the first step of rounds 1 .. rounds - 1 (every refresh_every steps) the
            teacher becomes the current student (its parameters, not the EMA: SDTT's and DUO's runs)
  loss      `make_loss_fn`, the teacher's forward under stop_gradient, the loss in float32:
              sdtt  (Deschenaux & Gulcehre 2025) x_t of the masked process; the target is the teacher's
                    output after teacher_steps ancestral steps of size dt = teacher_steps^round / base_steps
                    (`losses.sdtt_target`); the student's one prediction at x_t matches it (`losses.sdtt_loss`,
                    the mean over the masked tokens)
              dcd   (DUO's discrete consistency distillation, Sahoo et al. 2025) a pair (x_t', x_s) on one
                    trajectory of the Gaussian relaxation, s = t' - dt, dt = 2^round / base_steps
                    (`losses.dcd_pair`); the student at x_t' matches the teacher at x_s
                    (`losses.distillation_divergence`), each network told its time through `network_time`
  update    the trainer's train step (ddlm/train/step.py, unchanged) on the student's parameters

The state is a `DistillState`: the TrainState plus the teacher's parameters and the number of refreshes so far,
so a checkpoint holds the teacher a resumed run continues with (bit for bit). Metrics besides the trainer's:
'round', 'dt' and 'teacher_refreshes'. The eval step scores the student's NELBO under config.diffusion.loss
(the teacher's objective), as for any run. The math is in ddlm/losses.py; here only the plumbing.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp

from ddlm import losses, sharding
from ddlm.sharding import ConfigError
from ddlm.train import state as state_lib

METHODS = ("none", "sdtt", "dcd")
# The teacher's (and the student's) config.diffusion.loss for each method.
TEACHER_LOSS = {"sdtt": "mdlm", "dcd": "duo"}
_KIND = {"sdtt": "masked (MDLM)", "dcd": "uniform-state (DUO)"}


def enabled(config) -> bool:
    return "distill" in config and config.distill.method != "none"


# ------------------------------------------------------------------------------------------------ checks


def validate(config) -> None:
    """One-line ConfigErrors for config.distill's fields and what the mode needs from the rest of the config
    (no files read: `check_teacher` reads the teacher's checkpoint)."""
    if "distill" not in config:
        return
    from ddlm.train.checks import finite, is_int
    from ddlm.train.checks import require as req

    c = config.distill
    req(c.method in METHODS, "distill.method", f"one of {METHODS}", c.method)
    if not enabled(config):
        return
    req(isinstance(c.teacher, str) and bool(c.teacher), "distill.teacher", "a workdir of a trained run", c.teacher)
    req(c.divergence in losses.DIVERGENCES, "distill.divergence", f"one of {losses.DIVERGENCES}", c.divergence)
    req(is_int(c.teacher_steps) and c.teacher_steps >= 1, "distill.teacher_steps", "an integer >= 1", c.teacher_steps)
    req(is_int(c.base_steps) and c.base_steps >= 1, "distill.base_steps", "an integer >= 1", c.base_steps)
    req(is_int(c.rounds) and c.rounds >= 1, "distill.rounds", "an integer >= 1", c.rounds)
    req(is_int(c.refresh_every) and c.refresh_every >= 1, "distill.refresh_every", "an integer >= 1", c.refresh_every)
    req(finite(c.gamma_min), "distill.gamma_min", "a finite number", c.gamma_min)
    gamma_ok = finite(c.gamma_max) and c.gamma_max > c.gamma_min
    req(gamma_ok, "distill.gamma_max", f"a finite number > gamma_min={c.gamma_min}", c.gamma_max)
    loss = TEACHER_LOSS[c.method]
    if config.diffusion.loss != loss:
        raise ConfigError(
            f"config.distill.method={c.method!r} distils a {_KIND[c.method]} model: config.diffusion.loss must "
            f"be {loss!r}, got {config.diffusion.loss!r}"
        )
    if config.diffusion.curriculum.end:
        raise ConfigError(
            "config.diffusion.curriculum.end must be 0 in the distillation mode (DCD draws its own pairs of the "
            f"Gaussian relaxation), got {config.diffusion.curriculum.end}"
        )
    from ddlm.train import lora, rl

    if rl.enabled(config) or lora.enabled(config):
        raise ConfigError(
            "config.distill does not combine with config.rl or config.lora (the teacher is refreshed from the "
            "student's full parameters): train one mode at a time"
        )


def check_teacher(config, tokenizer=None) -> None:
    """ConfigError (one line) unless config.distill.teacher is a workdir with a checkpoint of a run whose loss
    fits the method and whose network and tokenizer are the student's. Reads the teacher's checkpoint metadata
    only (creates nothing); `tokenizer`: the student's (built from config.data if None)."""
    if not enabled(config):
        return
    from ddlm import checkpoints

    c = config.distill
    path = os.path.expanduser(c.teacher)
    what = f"config.distill.teacher={c.teacher!r}"
    directory = os.path.join(path, checkpoints.CHECKPOINTS_DIR)
    if not checkpoints.committed_steps(directory):
        raise ConfigError(f"{what} has no checkpoint (expected a workdir with checkpoints/<step> of a trained run)")
    with checkpoints.Checkpointer(directory, read_only=True) as checkpointer:
        step, stored = checkpointer.newest_metadata()
    if not stored or "compatibility" not in stored:
        raise ConfigError(f"{what}: its checkpoint at step {step} stores no config (written by an older ddlm)")
    got = stored["compatibility"].get("diffusion.loss")
    if got != TEACHER_LOSS[c.method]:
        other = [m for m, loss in TEACHER_LOSS.items() if loss == got]
        raise ConfigError(
            f"config.distill.method={c.method!r} distils a {_KIND[c.method]} teacher (loss "
            f"{TEACHER_LOSS[c.method]!r}), but {what} was trained with loss {got!r}"
            + (f": use method {other[0]!r}" if other else "")
        )
    if tokenizer is None:
        from ddlm.data import tokenizers

        tokenizer = tokenizers.get_tokenizer(config.data)
    current = {
        "compatibility": checkpoints.compatibility(config, tokenizer),
        "data": {"tokenizer_fingerprint": tokenizer.fingerprint},
    }
    # The length is not a shape (rotary positions): a student may be distilled at another one.
    diffs = [d for d in checkpoints.compatibility_differences(stored, current) if not d.startswith("train.seq_len")]
    diffs += checkpoints.data_differences(stored, current, fields=("tokenizer_fingerprint",))
    if diffs:
        raise ConfigError(
            f"{what} does not fit the student (its network and tokenizer must be the teacher's): "
            f"{'; '.join(diffs)} (teacher -> student)"
        )


# ------------------------------------------------------------------------------------------------ the state


@flax.struct.dataclass
class DistillState(state_lib.TrainState):
    teacher: Any  # the teacher's parameters, sharded as `params`: the teacher run's EMA, then refreshed students
    teacher_refreshes: jax.Array  # int32 []: refreshes so far (= the round the step's teacher belongs to)


def _fields(state) -> dict:
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state_lib.TrainState)}


def with_teacher(init_state, shardings, abstract_state, mesh):
    """make_train_state's (init_fn, shardings, abstract_fn) for a DistillState: the teacher sharded as the
    parameters, its refresh count replicated. The initial teacher is a copy of the initial parameters until
    `start` loads the teacher run's."""
    rep = sharding.replicated(mesh)

    def init():
        s = init_state()
        teacher = jax.tree.map(jnp.copy, s.params)  # its own buffers: the step donates the state
        return DistillState(**_fields(s), teacher=teacher, teacher_refreshes=jax.device_put(jnp.int32(0), rep))

    def abstract():
        s = abstract_state()
        count = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
        return DistillState(**_fields(s), teacher=s.params, teacher_refreshes=count)

    return init, DistillState(**_fields(shardings), teacher=shardings.params, teacher_refreshes=rep), abstract


def start(state: DistillState, setup) -> DistillState:
    """A new run's state: the teacher run's EMA parameters as the teacher and, unless config.train.init_from
    named another start (already in `state`), as the student's parameters and EMA."""
    from ddlm.train import adapt

    config = setup.config
    abstract = setup.abstract_state().params
    teacher = adapt.load_init_params(config.distill.teacher, abstract, setup.tokenizer, field="distill.teacher")
    if not config.train.init_from:
        state = state.replace(params=jax.tree.map(jnp.copy, teacher), ema_params=jax.tree.map(jnp.copy, teacher))
    return state.replace(teacher=teacher)


def round_of(step, distill_config):
    """int32 []: the round of optimizer `step` (0-based), min(step // refresh_every, rounds - 1)."""
    c = distill_config
    return jnp.minimum(jnp.asarray(step) // c.refresh_every, c.rounds - 1).astype(jnp.int32)


def refresh_teacher(state: DistillState, distill_config) -> DistillState:
    """The state a step at state.step trains from: at the first step of rounds 1 .. rounds - 1 the teacher is
    the current student's parameters (SDTT's _student_to_teacher, DUO's _maybe_update_teacher_weights with
    teacher_ema off), counted in teacher_refreshes. Pure: a resumed run refreshes at the same steps."""
    c = distill_config
    if c.rounds <= 1:
        return state
    step = state.step
    now = (step > 0) & (step % c.refresh_every == 0) & (step // c.refresh_every < c.rounds)
    teacher = jax.lax.cond(now, lambda: state.params, lambda: state.teacher)
    return state.replace(teacher=teacher, teacher_refreshes=state.teacher_refreshes + now.astype(jnp.int32))


# ------------------------------------------------------------------------------------------------ the loss


def make_loss_fn(model, config, *, vocab_size: int, mask_id: int):
    """loss_fn(params, batch, rng, train, step, teacher) -> (loss, metrics) of the method, for the trainer's
    train step: the student's parameters `params` are trained, the `teacher`'s are constants (stop_gradient).
    metrics: 'round', 'dt' (the teacher's step size this round), and 'mask_rate' (sdtt)."""
    from ddlm import processes, schedules

    c, d = config.distill, config.diffusion
    schedule = schedules.get_schedule(d.schedule, **dict(d.schedule_kwargs))
    antithetic = bool(d.antithetic)
    relaxation = processes.GaussianRelaxation(vocab_size, gamma_min=c.gamma_min, gamma_max=c.gamma_max)

    def network(params, *, train: bool, dropout_rng=None):
        def apply(xt, t):
            rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
            return model.apply({"params": params}, xt, t, x0=None, train=train, rngs=rngs).astype(jnp.float32)

        return apply

    def loss_fn(params, batch, rng, train, step, teacher):
        dropout_rng, t_rng, x_rng, target_rng = jax.random.split(rng, 4)
        student = network(params, train=train, dropout_rng=dropout_rng)
        teacher_fn = network(jax.lax.stop_gradient(teacher), train=False)
        x0, loss_mask = batch["tokens"], batch["loss_mask"]
        round_ = round_of(step, c)
        t = losses.sample_times(t_rng, x0.shape[0], antithetic)
        if c.method == "sdtt":
            dt = losses.sdtt_dt(round_, base_steps=c.base_steps, grow_every=1, num_steps=c.teacher_steps)
            xt = processes.AbsorbingProcess(vocab_size, mask_id).sample_xt(x_rng, x0, schedule.alpha(t))
            target, _ = losses.sdtt_target(
                teacher_fn, target_rng, xt, t, dt=dt, num_steps=c.teacher_steps, schedule=schedule, mask_id=mask_id
            )
            per_token = losses.sdtt_loss(student(xt, t), jax.lax.stop_gradient(target), xt, mask_id, c.divergence)
            masked = (xt == mask_id).astype(jnp.float32) * loss_mask
            extra = {"mask_rate": losses.masked_mean(xt == mask_id, loss_mask)}
            loss = losses.masked_mean(per_token, masked)  # SDTT's mean over the masked tokens
        else:  # dcd
            dt = losses.dcd_dt(round_, base_steps=c.base_steps, update_teacher_every=1)
            xt, xs, t_hi, s = losses.dcd_pair(x_rng, x0, t, dt, relaxation)
            student_logits = student(xt, losses.network_time(schedule, relaxation.alpha(t_hi)))
            teacher_logits = teacher_fn(xs, losses.network_time(schedule, relaxation.alpha(s)))
            target = jax.lax.stop_gradient(jax.nn.log_softmax(teacher_logits, axis=-1))  # DUO's mean param.
            per_token = losses.distillation_divergence(student_logits, target, c.divergence)
            extra = {}
            loss = losses.masked_mean(per_token, loss_mask)
        return loss, {"round": round_.astype(jnp.float32), "dt": jnp.asarray(dt, jnp.float32), **extra}

    return loss_fn
