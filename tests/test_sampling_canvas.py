"""The canvas sampler (ddlm/sampling/canvas.py) on the exact toy oracle (L = 4, V = 3): with acceptance of
everything and no re-noising it is the mean parameterisation's ancestral chain, whose law is computed exactly
here by transition matrices over the 81 sequences (the samples' TV to it is at the noise floor); the laws of
the DiffusionGemma settings are measured and stated; one-line errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm import processes, sampling, schedules
from ddlm.sampling import canvas
from test_sampling import L, TOY, V, histogram, tv, tv_bound  # the same toy oracle and TV helpers

SEQS = jnp.asarray(TOY.seqs)
N = 8000
SCHED = schedules.LinearSchedule()  # alpha(1) = 0: the initial uniform noise is exactly x_1
FAST = {"xla_backend_optimization_level": 0}


def loo_posterior(x, alpha):
    """pi [B, L, V]: p(x_0^l = v | x^{-l}) with each position k noised at its own keep-probability alpha [B, L]
    (alpha = 1: known exactly): DUO's optimal x_theta, computed by enumerating x_0 (jittable)."""
    a = alpha[:, None, :]
    per = jnp.where(x[:, None, :] == SEQS[None], a + (1 - a) / V, (1 - a) / V)  # [B, N, L]
    probs = jnp.asarray(TOY.probs)
    out = []
    for l in range(L):
        w = probs[None] * jnp.prod(jnp.where(jnp.arange(L) == l, 1.0, per), axis=-1)  # [B, N]
        w = w / jnp.sum(w, axis=1, keepdims=True)
        out.append(w @ jax.nn.one_hot(SEQS[:, l], V))
    return jnp.stack(out, axis=1)


def oracle_denoise(x, t):
    return jnp.log(jnp.maximum(loo_posterior(x, SCHED.alpha(t)), 1e-30))


def exact_chain_law(steps, canvas_length):
    """The law over the 81 sequences of the canvas sampler with entropy_bound = inf and renoise = False: per
    canvas and step, M[i, j] = prod over the canvas's positions of q(x_s^l = j_l | x_t = i, x_0 ~ pi^l) times
    1[j_l = i_l] elsewhere; the start is uniform (all noise)."""
    proc = processes.UniformProcess(V)
    grid = np.asarray(sampling.masked.time_grid(steps))
    law = np.full(len(SEQS), 1.0 / len(SEQS))
    seqs = np.asarray(SEQS)
    for c in range(L // canvas_length):
        cur = (np.arange(L) >= c * canvas_length) & (np.arange(L) < (c + 1) * canvas_length)
        for k in range(steps):
            t, s = grid[k], grid[k + 1]
            t_tok = np.where(np.arange(L) < c * canvas_length, 0.0, np.where(cur, t, 1.0))
            pi = loo_posterior(SEQS, jnp.asarray(np.broadcast_to(1.0 - t_tok, seqs.shape)))
            p = np.asarray(proc.mean_posterior_probs(pi, SEQS, float(SCHED.alpha(s)), float(SCHED.alpha(t))))
            keep = (seqs[:, None, :] == seqs[None, :, :]).astype(float)  # [i, j, L]
            step = np.take_along_axis(p[:, None, :, :], seqs[None, :, :, None], axis=-1)[..., 0]  # [i, j, L]
            m = np.prod(np.where(cur, step, keep), axis=-1)
            law = law @ m
    return law


def run(key, steps, **kw):
    cfg = sampling.default_config()
    cfg.name, cfg.steps = "canvas", steps
    for k, v in kw.items():
        cfg[k] = v
    fn = sampling.make_sampler(cfg, denoise_fn=oracle_denoise, schedule=SCHED, graph="uniform")
    out = jax.jit(lambda r: fn(r, jnp.zeros((N, L), jnp.int32)), compiler_options=FAST)(jax.random.key(key))
    return out


@pytest.mark.parametrize("canvas_length", [4, 2])
def test_accept_everything_without_renoising_is_the_exact_ancestral_chain(canvas_length):
    """entropy_bound = inf, renoise = False, temperature 1: the samples' law is the mean parameterisation's
    ancestral chain's (computed exactly): TV at the noise floor (measured at N = 8,000: 0.038 for one canvas of
    4, 0.035 for two of 2, under the 4-sigma bound). The chain's own distance to the data shrinks with the steps
    (factorised steps); at 16 steps TV(chain, data) = 0.052 (one canvas), 0.017 (two canvases)."""
    steps = 16
    law = exact_chain_law(steps, canvas_length)
    np.testing.assert_allclose(law.sum(), 1.0, atol=1e-6)  # float32 steps
    out = run(0, steps, canvas_length=canvas_length, entropy_bound=math.inf, renoise=False)
    emp = histogram(out.tokens)
    assert tv(emp, law) < tv_bound(law, N), (tv(emp, law), tv_bound(law, N))
    assert int(out.nfe) == steps * (L // canvas_length)
    print(f"canvas={canvas_length}: TV(samples, chain) = {tv(emp, law):.4f}, TV(chain, data) = {tv(law, TOY.probs):.4f}")
    assert tv(law, TOY.probs) < 0.1


def test_the_exact_chain_converges_to_the_data_as_steps_grow():
    d = [tv(exact_chain_law(s, L), TOY.probs) for s in (4, 16, 64)]
    assert d[0] > d[1] > d[2], d


@pytest.mark.parametrize(
    "settings",
    [
        dict(entropy_bound=1.0, renoise=True),
        dict(entropy_bound=1.0, renoise=True, anneal_max=0.8, anneal_min=0.4),
        dict(entropy_bound=0.3, renoise=True, stop_when_stable=True),
    ],
    ids=["eb1-renoise", "eb1-renoise-anneal", "eb0.3-renoise-stop"],
)
def test_diffusiongemma_settings_measured_law(settings, capsys):
    """The DiffusionGemma settings (re-noising the rejected positions, annealed temperature, early stop) are
    not exact samplers: their laws are measured against the data and stated (printed); each must beat the
    uniform distribution's TV (0.368). Measured (two canvases of 2, 16 steps each, N = 8,000): TV 0.238
    (entropy bound 1 nat, re-noising), 0.239 (and temperature 0.8 -> 0.4), 0.300 (bound 0.3, early stop: never
    stable with re-noising, 32 calls), against 0.017 for the exact chain at the same steps."""
    out = run(1, 16, canvas_length=2, **settings)
    emp = histogram(out.tokens)
    d = tv(emp, TOY.probs)
    uniform = tv(np.full(V**L, 1 / V**L), TOY.probs)
    print(f"{settings}: TV(samples, data) = {d:.4f} (uniform: {uniform:.4f}), nfe = {int(out.nfe)}")
    assert d < uniform


def test_acceptance_rule_and_temperature():
    e = jnp.array([[0.5, 0.1, 0.3, 2.0]])
    every = jnp.ones((1, 4), bool)
    # Sorted 0.1, 0.3, 0.5, 2.0; sums before: 0, 0.1, 0.4, 0.9.
    assert canvas.entropy_bounded_accept(e, every, 0.35).tolist() == [[False, True, True, False]]
    assert canvas.entropy_bounded_accept(e, every, 0.0).tolist() == [[False, True, False, False]]
    assert canvas.entropy_bounded_accept(e, every, math.inf).tolist() == [[True] * 4]
    assert canvas.entropy_bounded_accept(e, every.at[0, 1].set(False), 0.0).tolist() == [[False, False, True, False]]
    np.testing.assert_allclose(
        [float(canvas.annealed_temperature(t, 0.8, 0.4, 2.0)) for t in (1.0, 0.5, 0.0)], [0.8, 0.7, 0.4], atol=1e-7
    )


def test_one_line_errors():
    cfg = sampling.default_config()
    cfg.name = "canvas"
    with pytest.raises(ValueError, match="sampler 'canvas' is for uniform-state networks"):
        sampling.make_sampler(cfg, denoise_fn=oracle_denoise, schedule=SCHED, graph="absorbing", mask_id=V)
    cfg.canvas_length = 3
    fn = sampling.make_sampler(cfg, denoise_fn=oracle_denoise, schedule=SCHED, graph="uniform")
    with pytest.raises(ValueError, match=r"canvas_length=3 must divide the length 4"):
        fn(jax.random.key(0), jnp.zeros((2, L), jnp.int32))
    from ddlm.sampling import config as sampling_config
    from ddlm.train import config_lib

    diffusion = config_lib.diffusion_config("duo", process="uniform")
    with pytest.raises(ValueError, match=r"config.sampler.canvas_length must be a divisor of the generated length 4"):
        sampling_config.validate(cfg, diffusion=diffusion, seq_len=4)
    cfg.canvas_length = 2
    with pytest.raises(ValueError, match=r"'canvas' samples uniform-state networks trained with loss='duo'"):
        sampling_config.validate(cfg, diffusion=config_lib.diffusion_config("mdlm"), seq_len=4)
