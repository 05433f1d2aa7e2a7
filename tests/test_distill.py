"""Distillation as a training mode (ddlm/train/distill.py, config.distill): one-line errors for bad settings and
teachers that do not fit; the plumbing of the student-teacher loss through the trainer's step (a student equal
to its teacher costs nothing, the teacher's output is the one that reaches the loss); and the mode end to end —
SDTT from a trained masked teacher with a teacher refresh, checkpoints that hold the teacher, and a resume that
continues bit for bit; DCD from a DUO teacher on the 8-device mesh. The losses' math is checked on the exact
oracle in tests/test_losses_fewstep.py."""

import json
import os
import shutil

import flax
import jax
import jax.numpy as jnp
import model_utils
import numpy as np
import pytest

from ddlm import checkpoints, losses, processes, schedules
from ddlm.sharding import ConfigError
from ddlm.train import adapt, distill, trainer


def _config(name, arg="smoke"):
    return model_utils.experiment_config(name, arg)


def _noisy(params, seed=7):
    """params plus normal noise of scale 0.3 on every entry (ShapeDtypeStructs: the noise alone)."""
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params))))
    noise = lambda p: 0.3 * jax.random.normal(next(keys), p.shape, p.dtype)
    return jax.tree.map(lambda p: noise(p) if isinstance(p, jax.ShapeDtypeStruct) else p + noise(p), params)


def _random_workdir(workdir, config) -> str:
    """A parameters-only checkpoint (as ddlm.convert writes one) of config's network with random parameters,
    nowhere zero (an adaLN-zero network's initial output is)."""
    from ddlm import models, sharding
    from ddlm.data import tokenizers

    tok = tokenizers.get_tokenizer(config.data)
    model = models.get_model(config.model, tok.vocab_size)
    inputs = sharding.model_init_inputs(config.diffusion.loss, 1, config.train.seq_len)
    params = _noisy(flax.linen.meta.unbox(sharding.abstract_params(model, inputs)[0]))
    meta = checkpoints.params_only_metadata(config, tok)
    directory = os.path.join(str(workdir), checkpoints.CHECKPOINTS_DIR)
    with checkpoints.Checkpointer(directory, keep=1, async_save=False) as checkpointer:
        checkpointer.save(0, {"params": params, "step": jnp.zeros((), jnp.int32)}, metadata=meta, force=True)
    return str(workdir)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A trained masked teacher (experiments/quickstart.py at smoke size, 10 steps at a large rate: its output
    no longer the initial network's uniform one) and a DUO one (the smoke network of experiments/duo.py with
    random parameters: a params-only checkpoint, nothing trained)."""
    root = tmp_path_factory.mktemp("teachers")
    mdlm = str(root / "mdlm")
    config = _config("quickstart")
    config.train.steps, config.optim.lr = 10, 2e-2
    trainer.train_and_evaluate(config, mdlm, jax.devices()[:1])
    return {"mdlm": mdlm, "duo": _random_workdir(root / "duo", _config("duo"))}


def _sdtt(teacher, arg="smoke", **fields):
    config = _config("distill_sdtt", arg)
    config.distill.teacher = teacher
    for k, v in fields.items():
        section, name = k.split(".")
        config[section][name] = v
    return config


# ------------------------------------------------------------------------------------------------ errors


def _one_line_error(config, match):
    with pytest.raises(ConfigError, match=match) as e:
        trainer.validate_config(config, 1)
    assert "\n" not in str(e.value)


def test_distillation_is_off_by_default_and_its_recipes_validate(teachers):
    config = _config("quickstart", "")
    assert config.distill.method == "none" and not distill.enabled(config)
    trainer.validate_config(config, 1)
    trainer.validate_config(_sdtt(teachers["mdlm"]), 1)
    dcd = _config("distill_dcd")
    dcd.distill.teacher = teachers["duo"]
    trainer.validate_config(dcd, 1)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("distill.teacher", "", "^config.distill.teacher must be a workdir of a trained run, got ''$"),
        ("distill.method", "progressive", "config.distill.method must be one of"),
        ("distill.divergence", "tvd", "config.distill.divergence must be one of"),
        ("distill.teacher_steps", 0, "config.distill.teacher_steps must be an integer >= 1"),
        ("distill.rounds", 0, "config.distill.rounds must be an integer >= 1"),
        ("distill.refresh_every", 0, "config.distill.refresh_every must be an integer >= 1"),
        ("diffusion.loss", "sedd_absorb", "method='sdtt' distils a masked .*diffusion.loss must be 'mdlm'"),
    ],
)
def test_distill_config_errors_are_one_line(teachers, field, value, match):
    section, name = field.split(".")
    config = _sdtt(teachers["mdlm"])
    config[section][name] = value
    _one_line_error(config, match)


def test_a_teacher_without_a_checkpoint_is_one_line(tmp_path):
    _one_line_error(_sdtt(str(tmp_path)), r"config.distill.teacher='.*' has no checkpoint")


def test_the_method_must_fit_the_teachers_loss(teachers):
    _one_line_error(
        _sdtt(teachers["duo"]),
        r"method='sdtt' distils a masked \(MDLM\) teacher \(loss 'mdlm'\), but .* loss 'duo': use method 'dcd'",
    )
    dcd = _config("distill_dcd")
    dcd.distill.teacher = teachers["mdlm"]
    _one_line_error(dcd, r"method='dcd' distils a uniform-state \(DUO\) teacher .* loss 'mdlm': use method 'sdtt'")


@pytest.mark.parametrize(
    "field,value,diff",
    [
        ("data.tokenizer", "byte", "data.tokenizer: 'char' -> 'byte'"),
        ("model.d_model", 64, "model.d_model: 32 -> 64"),
    ],
)
def test_a_teacher_of_another_vocabulary_or_shape_is_one_line(teachers, field, value, diff):
    section, name = field.split(".")
    config = _sdtt(teachers["mdlm"])
    config[section][name] = value
    _one_line_error(config, r"config.distill.teacher=.* does not fit the student .*" + diff.replace(".", r"\."))


# ------------------------------------------------------------------------------------------------ the step


def test_the_trainers_step_scores_the_student_against_the_teachers_output(teachers):
    """SDTT with one teacher step: the target is the teacher's prediction at x_t, so a student equal to its
    teacher costs ~0 through the trainer's jitted step, and one that differs costs exactly the masked mean of
    KL(student || teacher) at that step's x_t (recomputed here from the step's key)."""
    config = _sdtt(teachers["mdlm"], **{"distill.teacher_steps": 1, "distill.base_steps": 4, "train.seed": 1})
    setup = trainer.build(config, jax.devices()[:1])
    step = trainer.jit_train_step(setup)
    batch = next(trainer.make_iterator(setup, "train", batch_size=config.train.batch_size))
    fresh = setup.init_state()  # a random student (seed 1), its teacher a copy of it
    trained = adapt.load_init_params(config.distill.teacher, setup.abstract_state().params, setup.tokenizer)
    other = _noisy(trained)  # a teacher unlike the student (the 2-step teacher is still near its zero output)

    def loss(params, teacher):
        copy = lambda tree: jax.tree.map(jnp.copy, tree)  # the step donates its state
        state = copy(fresh).replace(params=copy(params), teacher=copy(teacher))
        with setup.context():
            return float(step(state, batch)[1]["loss"])

    assert abs(loss(fresh.params, fresh.params)) < 1e-5
    assert abs(loss(trained, trained)) < 1e-5
    got = loss(fresh.params, other)
    # The step's draws (distill.make_loss_fn): x_t of the masked process at the step's key.
    rng = jax.random.fold_in(fresh.rng, fresh.step)
    _, t_rng, x_rng, _ = jax.random.split(rng, 4)
    x0 = batch["tokens"]
    t = losses.sample_times(t_rng, x0.shape[0])
    schedule = schedules.get_schedule(config.diffusion.schedule, **dict(config.diffusion.schedule_kwargs))
    mask_id = setup.tokenizer.mask_id
    xt = processes.AbsorbingProcess(setup.tokenizer.vocab_size, mask_id).sample_xt(x_rng, x0, schedule.alpha(t))
    apply = lambda p: setup.model.apply({"params": p}, xt, t, x0=None, train=False).astype(jnp.float32)
    subs = lambda p: losses.subs_log_probs(apply(p), xt, mask_id)  # SUBS: no mass on the mask, SDTT's as MDLM's
    kl = losses.distillation_divergence(subs(fresh.params), subs(other))
    masked = (xt == mask_id) & (batch["loss_mask"] > 0)
    want = float(jnp.sum(jnp.where(masked, kl, 0.0)) / jnp.sum(masked))
    assert got > 0.1 and got == pytest.approx(want, rel=1e-4), (got, want)


# ------------------------------------------------------------------------------------------------ end to end


def _rows(workdir, split="train"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def _restore(config, workdir, step=None, devices=None):
    setup = trainer.build(config, devices or jax.devices()[:1])
    directory = os.path.join(workdir, checkpoints.CHECKPOINTS_DIR)
    if step is not None:  # an older checkpoint: the others set aside
        keep = os.path.join(workdir, "later")
        os.makedirs(keep)
        for s in checkpoints.committed_steps(directory):
            if s > step:
                shutil.move(os.path.join(directory, str(s)), keep)
    try:
        with checkpoints.Checkpointer(directory, read_only=True) as ck:
            return ck.restore_latest(setup.abstract_state())
    finally:
        if step is not None:
            for name in os.listdir(keep):
                shutil.move(os.path.join(keep, name), directory)
            os.rmdir(keep)


def _equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sdtt_refreshes_its_teacher_checkpoints_it_and_resumes_exactly(teachers, tmp_path):
    """4 steps of 2 rounds (a refresh at step 2), 2 teacher steps of dt = 1/4 (a target unlike the teacher's
    own one-step prediction: step 1's student, the teacher itself, costs > 0, where one step would cost < 1e-5):
    the student starts as the teacher run's EMA parameters, the loss is logged with the round, dt and the
    refresh count, the checkpoint after the refresh holds the student of step 2 as its teacher, and a run
    stopped after step 3 and resumed ends bit for bit where the uninterrupted one did."""
    config = _sdtt(
        teachers["mdlm"],
        **{"distill.base_steps": 4, "distill.refresh_every": 2, "train.steps": 4, "train.ckpt_every": 1},
    )
    config.train.keep_checkpoints = 5
    config.optim.lr = 3e-2  # a visible change in 4 steps of a smoke-size network
    straight = str(tmp_path / "straight")
    trainer.train_and_evaluate(config, straight, jax.devices()[:1])
    train = _rows(straight)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["round"] for r in train] == [0, 0, 1, 1] and [r["teacher_refreshes"] for r in train] == [0, 0, 1, 1]
    assert [r["dt"] for r in train] == pytest.approx([0.25 * (1 - 1e-3)] * 2 + [0.5 * (1 - 1e-3)] * 2)
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in train) and train[0]["loss"] > 1e-4
    assert "nelbo" in _rows(straight, "eval")[-1]  # the student's NELBO under the teacher's loss

    setup = trainer.build(config, jax.devices()[:1])
    teacher = adapt.load_init_params(teachers["mdlm"], setup.abstract_state().params, setup.tokenizer)
    first, _ = _restore(config, straight, step=1)
    _equal(first.params, teacher)  # step 1's rate is 0 (warmup): the student is still its start
    second, _ = _restore(config, straight, step=2)
    _equal(second.teacher, teacher)
    final, step = _restore(config, straight)
    assert step == 4 and int(final.teacher_refreshes) == 1
    _equal(final.teacher, second.params)  # refreshed at step 2 with the student's parameters
    assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
        jax.tree.leaves(final.teacher), jax.tree.leaves(teacher))) > 1e-3

    # Stopped after the checkpoint of step 3 (step 4's never written): its teacher is the refreshed one, which
    # the resumed run must take from the checkpoint (the teacher run's would give another step 4).
    resumed = str(tmp_path / "resumed")
    shutil.copytree(straight, resumed)
    shutil.rmtree(os.path.join(resumed, checkpoints.CHECKPOINTS_DIR, "4"))
    trainer.train_and_evaluate(config, resumed, jax.devices()[:1])
    again, step = _restore(config, resumed)
    assert step == 4
    _equal(again, final)  # params, optimizer, EMA, the teacher and its refresh count
    assert [r["loss"] for r in _rows(resumed)] == [r["loss"] for r in train]


def test_dcd_distils_a_duo_teacher_on_the_mesh(teachers, tmp_path):
    """DCD at smoke size on the 8-device mesh: 3 steps of 2 rounds of 1 step (one refresh, at step 1: the last
    round lasts to the end), dt = 2^round / T, a finite positive loss (the teacher sees the other end of the
    pair: at step 1 the student is the teacher), and the teacher sharded as the student's parameters."""
    config = _config("distill_dcd")
    config.distill.teacher = teachers["duo"]
    config.train.steps = 3
    workdir = str(tmp_path / "dcd")
    trainer.train_and_evaluate(config, workdir, jax.devices())
    train = _rows(workdir)
    assert [r["round"] for r in train] == [0, 1, 1] and [r["teacher_refreshes"] for r in train] == [0, 1, 1]
    assert [r["dt"] for r in train] == pytest.approx([1 / 512, 2 / 512, 2 / 512])
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in train)
    state, step = _restore(config, workdir, devices=jax.devices())
    assert step == 3
    for p, t in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.teacher), strict=True):
        assert t.sharding == p.sharding
