"""The canvas sampler (ddlm/sampling/canvas.py) on the exact toy oracle (L = 4, V = 3): with acceptance of
everything and no re-noising it is the mean parameterisation's ancestral chain, whose law is computed exactly
here by transition matrices over the 81 sequences (the samples' TV to it is at the noise floor); the laws of
the DiffusionGemma settings are measured and stated; one-line errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm import models, processes, sampling, schedules
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
    ancestral chain's (computed exactly): TV at the noise floor (measured at N = 8,000: 0.035 for one canvas of
    4, 0.042 for two of 2, under the 4-sigma bound). The chain's own distance to the data shrinks with the steps
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
    uniform distribution's TV (0.368). Measured (two canvases of 2, 16 steps each, N = 8,000): TV 0.233
    (entropy bound 1 nat, re-noising), 0.243 (and temperature 0.8 -> 0.4), 0.292 (bound 0.3, early stop per
    row: some row is never quiet with re-noising, so the batch makes 32 calls), against 0.017 for the exact chain at the same steps."""
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
    for key, bad, expected in [
        ("stop_entropy", -0.5, "a number >= 0"),
        ("stable_patience", 0, "an integer >= 1"),
        ("stop_entropy_reduce", "median", "'mean' or 'max'"),
    ]:
        bad_cfg = cfg.copy_and_resolve_references()
        bad_cfg[key] = bad
        with pytest.raises(ValueError, match=rf"^config.sampler.{key} must be {expected}"):
            sampling_config.validate(bad_cfg, diffusion=diffusion, seq_len=4)
        with pytest.raises(ValueError, match=rf"^config.sampler.{key} must be"):  # make_sampler too
            sampling.make_sampler(bad_cfg, denoise_fn=oracle_denoise, schedule=SCHED, graph="uniform")
    from model_utils import tiny_decoder

    dec = tiny_decoder("bd3lm", V, False, block_size=2)
    with pytest.raises(ValueError, match=r"canvas_length=4 must equal the block-causal network's block_size=2"):
        canvas.canvas_sample(None, jax.random.key(0), jnp.zeros((1, 8), jnp.int32), schedule=SCHED, steps=2,
                             canvas_length=4, decoder=dec)  # fmt: skip
    with pytest.raises(ValueError, match=r"^the canvas sampler's KV-cache path .* has no self-conditioning input"):
        canvas.canvas_sample(None, jax.random.key(0), jnp.zeros((1, 8), jnp.int32), schedule=SCHED, steps=2,
                             canvas_length=2, decoder=dec, self_conditioning=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"caches block-causal networks"):
        canvas.check_canvas_decoder(tiny_decoder("dit", V, False), 4)


# ---------------------------------------------------------------- per-row stops, entropy stop, KV cache


def _canvas(fn, x, key, **kw):
    return jax.jit(lambda r, x: canvas.canvas_sample(fn, r, x, schedule=SCHED, **kw), compiler_options=FAST)(key, x)


def _self_conditioned_oracle(x, t, self_cond=None):
    """The oracle's logits moved by the previous prediction, strongly enough that a stale signal changes draws
    (None = zeros)."""
    logits = oracle_denoise(x, t)
    return logits if self_cond is None else logits + 30.0 * self_cond[..., ::-1]


@pytest.mark.parametrize("self_conditioning", [False, True], ids=["plain", "self_conditioned"])
def test_rows_stop_independently_each_as_if_run_alone_with_its_key(self_conditioning):
    """stop_when_stable per row (patience 2): rows stop at different steps; each row's tokens, steps and calls
    equal those of the row run alone with its key fold_in(key, row), so a stopped row's later steps are
    no-ops and no draw depends on the batch; the loop runs until every row stopped (the batch's calls). A
    self-conditioned network too: a stopped row keeps its own last signal for the next canvas."""
    kw = dict(steps=12, canvas_length=2, entropy_bound=math.inf, renoise=False, stop_when_stable=True,
              stable_patience=2, self_conditioning=self_conditioning)  # fmt: skip
    key, batch = jax.random.key(3), 8
    x = jnp.zeros((batch, L), jnp.int32)
    denoise = _self_conditioned_oracle if self_conditioning else oracle_denoise
    out = _canvas(denoise, x, key, **kw)
    steps, row_nfe = np.asarray(out.row_steps), np.asarray(out.row_nfe)
    assert len(set(steps.tolist())) > 2 and steps.max() < 2 * 12, steps  # measured: 5 distinct counts
    np.testing.assert_array_equal(row_nfe, steps)  # no cache: one call per step
    assert int(out.nfe) >= steps.max()
    alone = jax.jit(lambda r, x: canvas.canvas_sample(denoise, r, x, schedule=SCHED, **kw), compiler_options=FAST)
    for r in range(batch):
        one = alone(jax.random.fold_in(key, r)[None], x[r : r + 1])
        np.testing.assert_array_equal(one.tokens[0], out.tokens[r], err_msg=f"row {r}")
        assert int(one.row_steps[0]) == steps[r] == int(one.nfe), (r, int(one.row_steps[0]), steps[r])


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_entropy_stop_ends_each_rows_canvas_at_the_expected_step(reduce):
    """A denoiser whose predictive entropy is set (logits [a, 0, 0] with a = scale_row * w_l * (1 - t), t the
    position's time: every position steps down the grid, nothing re-noised): each row's canvas ends at the
    first step whose mean (max) entropy over its positions is below stop_entropy, computed here in numpy."""
    steps, thr = 10, 0.6
    scale = jnp.array([6.0, 12.0, 30.0])  # per row
    w = jnp.array([0.5, 1.5, 1.0, 3.0])  # per position: mean and max differ
    fn = lambda x, t: (scale[:, None] * w[None, :] * (1 - t))[..., None] * jax.nn.one_hot(0, V)
    out = _canvas(fn, jnp.zeros((3, L), jnp.int32), jax.random.key(0), steps=steps, canvas_length=2,
                  entropy_bound=math.inf, renoise=False, stop_entropy=thr, stop_entropy_reduce=reduce)  # fmt: skip
    grid = np.asarray(sampling.masked.time_grid(steps))

    def entropy(a):
        lse = np.logaddexp(a, np.log(2.0))  # log(e^a + 1 + 1)
        return -(np.exp(a - lse) * (a - lse) + 2 * np.exp(-lse) * -lse)

    expected = np.zeros(3, int)
    for r, s in enumerate(np.asarray(scale)):
        for c in range(2):
            h = np.array([entropy(s * np.asarray(w)[2 * c : 2 * c + 2] * (1 - t)) for t in grid[:steps]])
            stat = h.mean(axis=1) if reduce == "mean" else h.max(axis=1)
            below = np.flatnonzero(stat < thr)
            expected[r] += (below[0] if below.size else steps - 1) + 1
    np.testing.assert_array_equal(np.asarray(out.row_steps), expected)
    assert len(set(expected.tolist())) == 3 and expected.max() < 2 * steps, expected  # all stop, differently
    assert int(out.nfe) == int(np.max(expected))  # the rows' canvases run together: max per canvas here


class _CountingDecoder(models.decoding.Decoder):
    """A decoder counting its executed calls, cached or not (a host callback per call)."""

    calls = 0

    def step(self, *args, **kwargs):
        jax.debug.callback(self._count)
        return super().step(*args, **kwargs)

    def forward(self, *args, **kwargs):
        jax.debug.callback(self._count)
        return super().forward(*args, **kwargs)

    @classmethod
    def _count(cls):
        cls.calls += 1


def test_the_kv_cache_of_committed_canvases_equals_the_uncached_forward():
    """A time-conditioned block-causal network (block_size = canvas length 4, L = 16; the time-free one takes
    the same path with t = None): the fused write's logits and a cached
    step's logits equal the training forward's for that canvas (1e-5), and the sampler with the cache gives
    the uncached one's tokens and steps for the same key, with the executed calls counted: a prompt canvas
    prefilled (1 call), 2 writes fused with the next canvas's first step (0 extra)."""
    from model_utils import tiny_decoder

    size, length, vocab = 4, 16, 11
    base = tiny_decoder("bd3lm", vocab, True, block_size=size, seed=2)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, vocab, (2, length)), jnp.int32)
    tau = jnp.asarray(rng.uniform(size=(2, length)), jnp.float32)

    @functools.partial(jax.jit, compiler_options=FAST)
    def compare(x, tau):
        cache, errs = base.init_cache(2, length), []
        for c in range(length // size - 1):
            committed = tau.at[:, : (c + 1) * size].set(0.0)
            pending, cache = canvas.write_canvas(base, cache, x, committed, c, size)
            errs.append(jnp.max(jnp.abs(pending - canvas.uncached_canvas_logits(base, x, committed, c + 1, size))))
            sl = slice((c + 1) * size, (c + 2) * size)
            y, t2 = x.at[:, sl].set((x[:, sl] + 1) % vocab), committed.at[:, sl].set(tau[:, sl][:, ::-1])
            step = canvas.cached_canvas_logits(base, cache, y[:, sl], t2[:, sl], c + 1, size)
            errs.append(jnp.max(jnp.abs(step - canvas.uncached_canvas_logits(base, y, t2, c + 1, size))))
        return jnp.stack(errs)

    errs = np.asarray(compare(x, tau))
    assert errs.max() < 1e-5, errs  # measured: max 1.1e-6 (float32)
    dec = _CountingDecoder(base.model, base.variables)
    clamp = jnp.zeros((2, length), bool).at[:, :size].set(True).at[1, 9].set(True)  # a prompt, a constraint
    kw = dict(steps=6, canvas_length=size, entropy_bound=1.0, renoise=True, stop_when_stable=True,
              clamp=clamp, decoder=dec)  # fmt: skip
    runs = {}
    for kv in (True, False):
        _CountingDecoder.calls = 0
        runs[kv] = _canvas(None, x, jax.random.key(7), kv_cache=kv, **kw)
        jax.effects_barrier()
        assert int(runs[kv].nfe) == _CountingDecoder.calls, (kv, int(runs[kv].nfe), _CountingDecoder.calls)
    cached, uncached = runs[True], runs[False]
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    np.testing.assert_array_equal(cached.tokens[:, :size], x[:, :size])
    np.testing.assert_array_equal(cached.row_steps, uncached.row_steps)
    assert int(cached.nfe) == int(uncached.nfe) + 1  # + prefill + 2 writes - 2 first steps served by them
    np.testing.assert_array_equal(cached.row_nfe, np.asarray(uncached.row_nfe) + 1)
