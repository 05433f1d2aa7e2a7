"""Self-conditioning end to end (issue 23, item 1): the network's `self_cond` input (model.self_conditioning),
the loss option wired from config.diffusion.self_conditioning, the samplers feeding the previous prediction
back, a tiny training run that resumes, and the one-line config errors."""

import importlib.util
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_utils import random_variables

from ddlm import checkpoints, losses, models, sampling, schedules
from ddlm.sampling import masked, score
from ddlm.train import config_lib, step, trainer
from ddlm.train.sharding import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 11  # ids 0..9 and the mask id 10
MASK = V - 1


def _model_config(name="dit", self_conditioning=True):
    c = models.default_config("tiny")
    c.name, c.self_conditioning = name, self_conditioning
    c.num_layers, c.d_model, c.num_heads, c.mlp_dim, c.cond_dim = 1, 32, 2, 64, 16
    return c


def _init_shapes(model, x, t, x0=None):
    return nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, x0=x0))["params"])


# ------------------------------------------------------------------------------------------------ network


@pytest.mark.parametrize("name", ["dit", "bd3lm"])
def test_network_without_signal_is_the_zero_signal_and_a_signal_changes_the_output(name):
    """self_cond=None gives exactly the logits of self_cond = 0 (the first pass); a probability vector
    changes them (random, nowhere-zero parameters: the real init's zero projection would hide it)."""
    model = models.get_model(_model_config(name), V)
    x = jnp.array([[1, 2, MASK, 4, MASK, 6, 7, MASK]], jnp.int32)
    t = jnp.array([0.5], jnp.float32)
    x0 = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]], jnp.int32) if name == "bd3lm" else None
    variables = random_variables(model, x, t, x0)
    none = model.apply(variables, x, t, x0=x0)
    zeros = model.apply(variables, x, t, x0=x0, self_cond=jnp.zeros((1, 8, V)))
    signal = jax.nn.softmax(jax.random.normal(jax.random.key(1), (1, 8, V)), axis=-1)
    fed = model.apply(variables, x, t, x0=x0, self_cond=signal)
    np.testing.assert_array_equal(np.asarray(none), np.asarray(zeros))
    assert float(jnp.min(jnp.max(jnp.abs(fed - none), axis=-1))) > 1e-3  # every position sees its signal


def test_parameter_tree_without_the_flag_is_unchanged_and_the_flag_adds_one_zero_table():
    """Off (the default, and a stored config written before the field): the tree every checkpoint holds. On:
    one more leaf, 'self_cond_embedding' [padded V, d], zero at init, so a new network's two passes agree.
    A checkpoint's compatibility record without the field reads as False; turning it on is a difference."""
    x, t = jnp.zeros((1, 8), jnp.int32), jnp.zeros((1,), jnp.float32)
    off = _model_config(self_conditioning=False)
    assert models.default_config("tiny").self_conditioning is False
    older = _model_config(self_conditioning=False)
    del older["self_conditioning"]
    plain = _init_shapes(models.get_model(off, V), x, t)
    assert jax.tree.structure(_init_shapes(models.get_model(older, V), x, t)) == jax.tree.structure(plain)
    assert "self_cond_embedding" not in plain

    model = models.get_model(_model_config(), V)
    on = _init_shapes(model, x, t)
    assert set(on) - set(plain) == {"self_cond_embedding"}
    assert on["self_cond_embedding"].shape == (model.padded_vocab_size, 32)
    rest = {k: v for k, v in on.items() if k != "self_cond_embedding"}
    assert jax.tree.map(lambda a: a.shape, rest) == jax.tree.map(lambda a: a.shape, plain)
    params = nn.unbox(model.init(jax.random.key(0), x, t)["params"])
    assert not np.any(np.asarray(params["self_cond_embedding"]))

    class Tok:
        vocab_size = V

    stored = {"compatibility": checkpoints.compatibility(config_lib.quickstart_config(
        model=off, diffusion=config_lib.diffusion_config("mdlm"), sampler=config_lib.sampler_config()), Tok)}
    del stored["compatibility"]["model.self_conditioning"]  # a checkpoint written before the field
    same = config_lib.quickstart_config(
        model=off, diffusion=config_lib.diffusion_config("mdlm"), sampler=config_lib.sampler_config()
    )
    assert checkpoints.compatibility_differences(stored, {"compatibility": checkpoints.compatibility(same, Tok)}) == []
    same.model.self_conditioning = True
    diff = checkpoints.compatibility_differences(stored, {"compatibility": checkpoints.compatibility(same, Tok)})
    assert diff == ["model.self_conditioning: False -> True"], diff


# ------------------------------------------------------------------------------------------------ loss


class _Recording:
    """The network with every call's self_cond recorded (None or the array) and its logits."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def apply(self, variables, xt, t, **kwargs):
        logits = self.model.apply(variables, xt, t, **kwargs)
        self.calls.append((kwargs.get("self_cond"), logits))
        return logits


def test_loss_with_probability_one_calls_twice_and_stops_the_gradient_of_the_first_pass():
    """config.diffusion.self_conditioning = 1 through the train step's loss: the network is called twice, the
    second time with softmax of the first call's logits; the gradient is the second pass's alone (the first's
    prediction a constant): equal to a hand-written loss whose first pass reads frozen parameters, and not to
    one that differentiates through both."""
    mc = _model_config()
    model = models.get_model(mc, V)
    x0 = jax.random.randint(jax.random.key(3), (4, 8), 0, MASK)
    params = random_variables(model, x0, jnp.zeros((4,)))["params"]
    batch = {"tokens": x0, "loss_mask": jnp.ones((4, 8), jnp.float32)}
    dc = config_lib.diffusion_config("mdlm")
    dc.self_conditioning = 1.0
    rng = jax.random.key(5)

    recording = _Recording(model)
    loss_fn = step.make_loss_fn(recording, dc, mc, vocab_size=V, mask_id=MASK)

    @jax.jit  # compiled: op by op the loss took 10 s
    def calls(p):
        loss_fn(p, batch, rng, True)
        (first, first_logits), (second, _) = recording.calls
        assert first is None and second is not None and len(recording.calls) == 2
        return second, first_logits

    second, first_logits = calls(params)
    np.testing.assert_allclose(np.asarray(second), np.asarray(jax.nn.softmax(first_logits, -1)), atol=1e-6)

    # The same draws (self-conditioning folds its own key) with the first pass written out by hand.
    plain = config_lib.diffusion_config("mdlm")

    def by_hand(p, first_params):
        class TwoPass:
            def apply(self, variables, xt, t, **kw):
                probs = jax.nn.softmax(model.apply({"params": first_params}, xt, t, **kw), -1)
                return model.apply(variables, xt, t, self_cond=probs, **kw)

        return step.make_loss_fn(TwoPass(), plain, mc, vocab_size=V, mask_id=MASK)(p, batch, rng, True)[0]

    @jax.jit  # the three gradients in one program (their kernels shared: one compile, not three)
    def gradients(p):
        got = jax.grad(lambda p: loss_fn(p, batch, rng, True)[0])(p)
        frozen = jax.grad(by_hand)(p, p)  # the first pass's parameters: an argument not differentiated
        return got, frozen, jax.grad(lambda p: by_hand(p, p))(p)

    got, frozen, through = gradients(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(frozen)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(through)))
    assert gap > 1e-4, gap  # the first pass's own gradient is not zero: the check can see it


# ------------------------------------------------------------------------------------------------ samplers


def _fake_network(calls):
    """denoise_fn(xt, t, self_cond) whose logits depend on all three, each call's (self_cond, logits)
    recorded in order from inside the compiled loop."""

    def denoise_fn(xt, t, self_cond=None):
        sc = jnp.zeros(xt.shape + (V,)) if self_cond is None else self_cond
        tt = t[:, None, None] if t.ndim == 1 else t[..., None]  # per-row or per-token times (canvas)
        logits = 2.0 * jax.nn.one_hot(xt, V) + tt * jnp.arange(V) / V + 3.0 * sc[..., ::-1]
        jax.debug.callback(lambda s, l: calls.append((np.asarray(s), np.asarray(l))), sc, logits, ordered=True)
        return logits

    return denoise_fn


def _check_fed_back(calls, expected_calls):
    assert len(calls) == expected_calls, len(calls)
    np.testing.assert_array_equal(calls[0][0], 0.0)
    for (_, previous), (fed, _) in zip(calls, calls[1:]):
        np.testing.assert_allclose(fed, jax.nn.softmax(previous, axis=-1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["ancestral", "remdm", "first_hitting", "sedd_analytic"])
def test_masked_samplers_feed_back_the_previous_prediction(name):
    """Through make_sampler: the first call sees zeros, every later one (noise removal included) softmax of the
    call before; the returned tokens are unchanged in shape and the jitted signature is (rng, x_init)."""
    calls = []
    cfg = sampling.default_config()
    cfg.name, cfg.steps, cfg.t_min, cfg.noise_removal = name, 4, 0.2, True
    cfg.remasking, cfg.eta = ("cap", 0.5) if name == "remdm" else ("none", 0.0)
    sample = sampling.make_sampler(
        cfg, denoise_fn=_fake_network(calls), schedule=schedules.get_schedule("linear"), mask_id=MASK,
        self_conditioning=True,
    )  # fmt: skip
    x_init = jnp.full((2, 6), MASK, jnp.int32).at[:, 0].set(3)
    out = jax.jit(sample)(jax.random.key(0), x_init)
    jax.effects_barrier()
    assert out.tokens.shape == (2, 6) and int(out.nfe) == len(calls)
    _check_fed_back(calls, int(out.nfe))
    assert len(calls) >= 4 if name != "first_hitting" else len(calls) == 5


def test_uniform_score_sampler_feeds_back_the_network_output():
    """A DUO network through `score.network_score_fn` (what the sampling CLI builds): the signal is softmax of
    the network's logits, not of the log ratios the step reads."""
    calls = []
    sched = schedules.get_schedule("loglinear")
    to_score = lambda out, xt, t: losses.duo_log_ratios(out, xt, sched.alpha(t))
    score_fn = score.network_score_fn(_fake_network(calls), to_score, self_conditioning=True)
    cfg = sampling.default_config()
    cfg.name, cfg.steps = "sedd_euler", 3
    sample = sampling.make_sampler(
        cfg, score_fn=score_fn, schedule=sched, graph="uniform", self_conditioning=True
    )
    out = jax.jit(sample)(jax.random.key(1), jnp.zeros((2, 5), jnp.int32))
    jax.effects_barrier()
    _check_fed_back(calls, int(out.nfe))
    assert int(out.nfe) == 4  # 3 steps and the final denoising step


@pytest.mark.parametrize("name", ["psi", "canvas"])
def test_uniform_state_denoiser_samplers_feed_back_the_previous_prediction(name):
    """psi (with a corrector call per step and the noise removal) and canvas (two canvases: the second's first
    call reads the first's last prediction) feed every call softmax of the call before, zeros first; NFE counts
    them all."""
    calls = []
    cfg = sampling.default_config()
    cfg.name, cfg.steps = name, 3
    if name == "psi":
        cfg.psi_strength, cfg.psi_corrector_steps = 0.3, 1
    else:
        cfg.canvas_length = 3
    sample = sampling.make_sampler(
        cfg, denoise_fn=_fake_network(calls), schedule=schedules.get_schedule("loglinear"), graph="uniform",
        self_conditioning=True,
    )  # fmt: skip
    out = jax.jit(sample)(jax.random.key(2), jnp.zeros((2, 6), jnp.int32))
    jax.effects_barrier()
    assert out.tokens.shape == (2, 6)
    _check_fed_back(calls, int(out.nfe))
    assert int(out.nfe) == (3 + 2 + 1 if name == "psi" else 2 * 3)  # psi: 3 steps, 2 correctors, noise removal
    assert all(c[0].shape == (2, 6, V) for c in calls)


def test_samplers_without_feedback_call_the_network_as_before():
    """self_conditioning=False: denoise_fn(xt, t) only (the 2-argument networks every other test passes)."""
    calls = []
    cfg = sampling.default_config()
    cfg.name, cfg.steps = "ancestral", 3
    fake = _fake_network(calls)
    sample = sampling.make_sampler(
        cfg, denoise_fn=lambda xt, t: fake(xt, t), schedule=schedules.get_schedule("linear"), mask_id=MASK
    )
    jax.jit(sample)(jax.random.key(0), jnp.full((1, 4), MASK, jnp.int32))
    jax.effects_barrier()
    assert len(calls) == 3 and all(not np.any(s) for s, _ in calls)


# ------------------------------------------------------------------------------------------------ errors


def _quick(**overrides):
    path = os.path.join(REPO, "experiments", "quickstart.py")
    spec = importlib.util.spec_from_file_location("quickstart", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    config.update_from_flattened_dict(overrides)
    return config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.self_conditioning": True, "diffusion.self_conditioning": 1.5},
         r"config\.diffusion\.self_conditioning must be a probability in \(0, 1\], or 0 = off, got 1\.5"),
        ({"model.self_conditioning": True, "diffusion.self_conditioning": -0.5},
         r"config\.diffusion\.self_conditioning must be a probability in \(0, 1\], or 0 = off, got -0\.5"),
        ({"diffusion.self_conditioning": 0.5},
         r"config\.diffusion\.self_conditioning=0\.5 needs config\.model\.self_conditioning=True"),
    ],
    ids=["above_one", "negative", "model_flag_off"],
)
def test_config_errors_are_one_line_naming_the_fields(overrides, message):
    with pytest.raises(ConfigError, match="^" + message) as info:
        trainer.validate_config(_quick(**overrides), num_devices=1)
    assert "\n" not in str(info.value)


def test_causal_network_and_misuse_errors_are_one_line():
    config = _quick(**{"model.self_conditioning": True})
    config.model.name, config.model.time_conditioning, config.diffusion.loss = "ar", False, "ar"
    config.diffusion.process = "absorbing"
    with pytest.raises(ConfigError, match=r"^config\.model\.self_conditioning must be False for a causal"):
        trainer.validate_config(config, num_devices=1)
    x, t = jnp.zeros((1, 4), jnp.int32), jnp.zeros((1,))
    plain = models.get_model(_model_config(self_conditioning=False), V)
    variables = plain.init(jax.random.key(0), x, t)
    with pytest.raises(ValueError, match=r"^self_cond was given to a network without self-conditioning"):
        plain.apply(variables, x, t, self_cond=jnp.zeros((1, 4, V)))
    model = models.get_model(_model_config(), V)
    with pytest.raises(ValueError, match=r"^self_cond must be float \[batch, length, vocab_size\] = \[1, 4, 11\]"):
        model.init(jax.random.key(0), x, t, self_cond=jnp.zeros((1, 4, V - 1)))
    fake = _fake_network([])
    with pytest.raises(ValueError, match=r"^cache=True reuses predictions"):
        masked.ancestral_sample(fake, jax.random.key(0), x + MASK, mask_id=MASK, schedule=schedules.get_schedule("linear"),
                                steps=2, cache=True, self_conditioning=True)  # fmt: skip
    cfg = sampling.default_config()
    cfg.guidance_scale = 1.0
    with pytest.raises(ValueError, match=r"^sampler 'ancestral' feeds a self-conditioned network"):
        sampling.make_sampler(cfg, denoise_fn=fake, schedule=None, mask_id=MASK, self_conditioning=True)


# ------------------------------------------------------------------------------------------------ training


def test_tiny_training_run_with_self_conditioning_learns_resumes_and_samples(tmp_path):
    """experiments/quickstart.py:smoke with model.self_conditioning and diffusion.self_conditioning = 0.5:
    30 steps whose train loss is finite and falls, a checkpoint at 30 that a longer run resumes from (the
    restored tree holds 'self_cond_embedding', now trained away from zero), and the ancestral sampler at the
    end over the self-conditioned network."""
    overrides = {
        "model.self_conditioning": True, "diffusion.self_conditioning": 0.5, "data.tokenizer": "byte",
        "mesh.data": 1, "train.steps": 30, "train.ckpt_every": 30, "train.log_every": 1,
        "train.async_checkpoints": False, "optim.lr": 3e-3, "train.sample_at_end": True,
    }  # fmt: skip
    workdir = str(tmp_path / "run")
    trainer.train_and_evaluate(_quick(**overrides), workdir, devices=jax.devices()[:1])
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r["loss"] for r in rows if r.get("split") == "train" and "loss" in r]
    assert len(train) == 30 and np.all(np.isfinite(train)), train
    assert np.mean(train[-5:]) < np.mean(train[:5]) - 0.2, train
    assert checkpoints.committed_steps(os.path.join(workdir, "checkpoints")) == [30]
    assert any("sample" in f for f in os.listdir(workdir)), os.listdir(workdir)

    longer = _quick(**{**overrides, "train.steps": 34, "train.ckpt_every": 34, "train.sample_at_end": False})
    trainer.train_and_evaluate(longer, workdir, devices=jax.devices()[:1])
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [r["step"] for r in rows if r.get("split") == "train" and "loss" in r]
    assert steps[30:] == [31, 32, 33, 34], steps  # resumed at 30, not restarted
    _, params, _ = trainer.load_params(longer, workdir, ema=False, devices=jax.devices()[:1])
    assert np.any(np.asarray(params["self_cond_embedding"]))
