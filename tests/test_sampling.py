"""Samplers against the exact toy oracle (tests/oracle.py): their samples must follow the distribution
they are supposed to, measured by total variation (TV) against a bound derived from the sample count.

TV bound: for n i.i.d. draws from p over N states, E[TV(p_hat, p)] <= 1/2 sum_x sqrt(p(x)(1 - p(x))/n)
(Jensen), and TV moves by at most 1/n per draw, so P(TV > E + eps) <= exp(-2 n eps^2) (McDiarmid).
`tv_bound` is that expectation plus eps for a failure probability of 1e-4.

"Exact for the step grid": a factorised reverse step moves every position independently given x_t, so
over all (V+1)^L states it is a matrix M_k[i, j] = prod_l P_l(x_s^l = state_j^l | x_t = state_i); the
sampler's output distribution is e_start M_1 ... M_T, computed here in float64 from
processes.AbsorbingProcess.posterior_probs and the oracle's exact p(x_0 | x_t).
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import oracle
from ddlm import losses, processes, schedules
from ddlm import sampling
from ddlm.sampling import categorical, conditioning, masked, score

V, L = 3, 4
MASK = V
TOY = oracle.ToyDistribution(num_tokens=V, length=L, seed=0)
N_SAMPLES = 8000
# Tiny programs compile 5x faster on CPU without LLVM's optimisations; the runs stay fast.
FAST = {"xla_backend_optimization_level": 0}
tjit = functools.partial(jax.jit, compiler_options=FAST)


# ------------------------------------------------------------------------------------------ helpers


def tv_bound(p, n, fail_prob=1e-4):
    p = np.asarray(p)
    return 0.5 * np.sum(np.sqrt(p * (1.0 - p) / n)) + math.sqrt(math.log(1.0 / fail_prob) / (2.0 * n))


def tv(p, q):
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def histogram(tokens):
    """Empirical distribution over the V^L clean sequences; asserts no mask is left."""
    tokens = np.asarray(tokens)
    assert tokens.min() >= 0 and tokens.max() < V, "samples must be clean tokens"
    idx = np.asarray(TOY.index(tokens))
    return np.bincount(idx, minlength=V**L) / len(idx)


def all_masked(n):
    return jnp.full((n, L), MASK, jnp.int32)


def cfg(**kw):
    c = sampling.default_config()
    c.noise_removal = False
    for k, v in kw.items():
        c[k] = v
    return c


def transition_matrix(per_position_probs, states):
    """per_position_probs [S, L, K] (S states, K values) -> M [S, S] of the factorised step."""
    m = np.ones((len(states), len(states)))
    for l in range(states.shape[1]):
        m *= per_position_probs[:, l][:, states[:, l]]
    return m


def to_clean_distribution(dist, states):
    """Distribution over absorbing states -> over the V^L clean sequences (all mass must be clean)."""
    clean = ~np.any(states == MASK, axis=1)
    assert dist[~clean].sum() < 1e-9, f"mass {dist[~clean].sum()} left on masked states"
    out = np.zeros(V**L)
    np.add.at(out, np.asarray(TOY.index(states[clean])), dist[clean])
    return out


def chain(step_probs, steps, states, start, t_min=0.0):
    """Distribution after `steps` factorised steps on the sampler's grid, from the distribution `start`.

    step_probs(states [S, L] int, t [], s []) -> [S, L, K] (jnp code; jitted once per step_probs)."""
    g = masked.time_grid(steps, t_min)
    step = step_probs if hasattr(step_probs, "lower") else tjit(step_probs)
    states_j = jnp.asarray(states)
    dist = np.asarray(start, np.float64)
    for k in range(steps):
        dist = dist @ transition_matrix(np.asarray(step(states_j, g[k], g[k + 1]), np.float64), states)
    return dist


@functools.lru_cache(maxsize=None)
def ancestral_step_probs(schedule):
    """The ancestral step: AbsorbingProcess.posterior_probs with the oracle's exact p(x_0 | x_t) (jitted)."""
    p0 = jnp.asarray(TOY.absorbing_posterior_table(), jnp.float32)
    proc = processes.AbsorbingProcess(V + 1, MASK)
    return tjit(lambda states, t, s: proc.posterior_probs(p0, states, schedule.alpha(s), schedule.alpha(t)))


def exact_absorbing_state_distribution(schedule, steps, *, step_probs=None, t_min=0.0):
    """Distribution over all (V+1)^L absorbing states of a factorised absorbing sampler started all-masked;
    step_probs defaults to the ancestral step."""
    states = TOY.abs_states
    start = np.zeros(len(states))
    start[int(TOY.index(np.full((L,), MASK), V + 1))] = 1.0
    return chain(step_probs or ancestral_step_probs(schedule), steps, states, start, t_min)


def exact_absorbing_distribution(schedule, steps, *, step_probs=None):
    """Output distribution over clean sequences of a factorised absorbing sampler started all-masked."""
    dist = exact_absorbing_state_distribution(schedule, steps, step_probs=step_probs)
    return to_clean_distribution(dist, TOY.abs_states)


def state_histogram(tokens):
    """Empirical distribution over the (V+1)^L absorbing states (masks included)."""
    idx = np.asarray(TOY.index(np.asarray(tokens), V + 1))
    return np.bincount(idx, minlength=(V + 1) ** L) / len(idx)


def uniform_score_fn(schedule):
    """Exact uniform-graph score for a batch sharing one time: computed for all V^L sequences, gathered."""
    seqs = jnp.asarray(TOY.seqs)

    def fn(xt, t):
        a = schedule.alpha(jnp.full((len(TOY.seqs),), t[0]))
        table = TOY.uniform_log_score(seqs, a)
        return table[TOY.index(xt)]

    return fn


# ------------------------------------------------------------------------------------------ ancestral


def test_exact_grid_distribution_approaches_truth_as_steps_grow():
    for name in ("loglinear", "linear", "cosine"):
        sched = schedules.get_schedule(name)
        dists = [tv(exact_absorbing_distribution(sched, T), TOY.probs) for T in (1, 2, 4, 16, 64)]
        assert all(b < a for a, b in zip(dists, dists[1:])), (name, dists)
        assert dists[0] > 0.2 and dists[-1] < 0.02, (name, dists)


@pytest.mark.parametrize("name", ["loglinear", "linear", "cosine"])
def test_ancestral_coarse_grid_matches_its_exact_distribution(name):
    """Fewer steps (2) than tokens (4): the output is the product of per-step marginals, not p."""
    sched = schedules.get_schedule(name)
    exact = exact_absorbing_distribution(sched, 2)
    out = tjit(
        lambda r: masked.ancestral_sample(
            TOY.absorbing_denoiser(), r, all_masked(N_SAMPLES), mask_id=MASK, schedule=sched, steps=2
        )
    )(jax.random.key(1))
    emp = histogram(out.tokens)
    assert tv(emp, exact) < tv_bound(exact, N_SAMPLES), (tv(emp, exact), tv_bound(exact, N_SAMPLES))
    assert tv(exact, TOY.probs) > 3 * tv_bound(exact, N_SAMPLES)  # and it is measurably not p
    assert int(out.nfe) == 2
    assert out.trajectory is None  # not asked


def test_ancestral_many_steps_reproduces_the_data():
    sched = schedules.LogLinearSchedule()
    steps = 128
    exact = exact_absorbing_distribution(sched, steps)
    out = tjit(
        lambda r: masked.ancestral_sample(
            TOY.absorbing_denoiser(), r, all_masked(N_SAMPLES), mask_id=MASK, schedule=sched, steps=steps
        )
    )(jax.random.key(2))
    emp = histogram(out.tokens)
    bound = tv_bound(TOY.probs, N_SAMPLES)
    assert tv(exact, TOY.probs) < 0.01
    assert tv(emp, TOY.probs) < bound + tv(exact, TOY.probs), (tv(emp, TOY.probs), bound)
    assert int(out.nfe) == steps


def _broken_uniform_sample(rng, n, steps, sched):
    """A deliberately broken sampler: the uniform-graph ancestral step with the wrong posterior weight
    (Bayes' 1 / q(x_t | x_0) dropped: w = p(x_0 | x_t) instead of p(x_0 | x_t) / q(x_t | x_0))."""
    proc = processes.UniformProcess(V)
    grid = masked.time_grid(steps)

    def body(k, x):
        t, s = grid[k], grid[k + 1]
        a_t, a_s = sched.alpha(t), sched.alpha(s)
        seqs = jnp.asarray(TOY.seqs)
        p0 = TOY.uniform_x0_posterior(seqs, jnp.full((len(TOY.seqs),), a_t))[TOY.index(x)]  # exact, by table
        q_t_given_0 = proc.marginal_probs(x, a_t)
        wrong = proc.posterior_probs(p0 * q_t_given_0, x, a_s, a_t)  # posterior_probs divides by q: undo it
        return categorical.sample_categorical(jax.random.fold_in(rng, k), jnp.log(wrong))

    x0 = jax.random.randint(jax.random.fold_in(rng, steps), (n, L), 0, V)
    return jax.lax.fori_loop(0, steps, body, x0)


def test_broken_sampler_fails_the_same_test():
    sched = schedules.GeometricSchedule()
    tokens = tjit(lambda r: _broken_uniform_sample(r, N_SAMPLES, 32, sched))(jax.random.key(3))
    emp = histogram(tokens)
    assert tv(emp, TOY.probs) > 2 * tv_bound(TOY.probs, N_SAMPLES), tv(emp, TOY.probs)


def test_broken_reveal_weight_fails_the_coarse_grid_test():
    """Ancestral with the reveal weight (alpha_s - alpha_t) / (1 - alpha_s) (wrong denominator) against the
    correct sampler's exact 2-step distribution: the same test the correct sampler passes, failed."""
    sched, steps = schedules.LinearSchedule(), 2
    den = TOY.absorbing_denoiser()
    grid = masked.time_grid(steps)

    def broken(rng):
        def body(k, x):
            a_t, a_s = sched.alpha(grid[k]), sched.alpha(grid[k + 1])
            logp = masked.x0_log_probs(den, x, grid[k], MASK)
            tok_rng, u_rng = jax.random.split(jax.random.fold_in(rng, k))
            x0 = categorical.sample_categorical(tok_rng, logp)
            reveal = (a_s - a_t) / jnp.maximum(1.0 - a_s, 1e-6)  # should be / (1 - alpha_t)
            return jnp.where((x == MASK) & (jax.random.uniform(u_rng, x.shape) < reveal), x0, x)

        return jax.lax.fori_loop(0, steps, body, all_masked(N_SAMPLES))

    exact = exact_absorbing_distribution(sched, steps)
    emp = histogram(tjit(broken)(jax.random.key(16)))
    assert tv(emp, exact) > 2 * tv_bound(exact, N_SAMPLES), tv(emp, exact)


# ------------------------------------------------------------------------------------------ first hitting, cache, NFE


def test_first_hitting_reproduces_the_data_with_one_call_per_token():
    out = tjit(
        lambda r: masked.first_hitting_sample(
            TOY.absorbing_denoiser(),
            r,
            all_masked(N_SAMPLES),
            mask_id=MASK,
            schedule=schedules.CosineSchedule(),
        )
    )(jax.random.key(4))
    emp = histogram(out.tokens)
    assert tv(emp, TOY.probs) < tv_bound(TOY.probs, N_SAMPLES), tv(emp, TOY.probs)
    assert int(out.nfe) == L
    assert out.trajectory is None  # not asked


def test_nfe_cached_and_first_hitting_at_most_length_plus_one_when_steps_ge_4_length():
    """Counted per sequence (vmap over batches of one: the cache is batch-wide, the counts per sample)."""
    steps, n = 4 * L, 200
    sched = schedules.LogLinearSchedule()
    den = TOY.absorbing_denoiser()
    keys = jax.random.split(jax.random.key(5), n)
    one = all_masked(1)

    def run(sampler):
        return tjit(jax.vmap(lambda k: sampler(k)))(keys)

    plain = run(lambda k: masked.ancestral_sample(den, k, one, mask_id=MASK, schedule=sched, steps=steps))
    cached = run(
        lambda k: masked.ancestral_sample(den, k, one, mask_id=MASK, schedule=sched, steps=steps, cache=True)
    )
    first = run(lambda k: masked.first_hitting_sample(den, k, one, mask_id=MASK, schedule=sched))
    assert np.all(np.asarray(plain.nfe) == steps)
    assert np.asarray(cached.nfe).max() <= L + 1 and np.asarray(cached.nfe).min() >= 1
    assert np.asarray(cached.nfe).mean() < steps / 2
    assert np.all(np.asarray(first.nfe) == L)
    # The oracle is time-free, so the cached sampler IS the ancestral sampler: same key, same tokens.
    np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(plain.tokens))


def test_cached_matches_ancestral_on_the_same_grid_batched():
    sched = schedules.LinearSchedule()
    den = TOY.absorbing_denoiser()
    x = all_masked(2000)
    f = lambda cache: tjit(
        lambda r: masked.ancestral_sample(den, r, x, mask_id=MASK, schedule=sched, steps=3, cache=cache)
    )(jax.random.key(6))
    a, c = f(False), f(True)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    assert int(c.nfe) <= int(a.nfe) == 3


def test_noise_removal_fills_what_is_left_greedily():
    sched = schedules.LinearSchedule()
    out = tjit(
        lambda r: masked.ancestral_sample(
            TOY.absorbing_denoiser(),
            r,
            all_masked(64),
            mask_id=MASK,
            schedule=sched,
            steps=2,
            t_min=0.5,
            noise_removal=True,
        )
    )(jax.random.key(7))
    assert not np.any(np.asarray(out.tokens) == MASK)
    assert int(out.nfe) == 3


def test_grid_sigma_and_bad_input_of_the_masked_samplers():
    np.testing.assert_allclose(masked.time_grid(4, 0.2), [1.0, 0.8, 0.6, 0.4, 0.2], atol=1e-7)
    np.testing.assert_allclose(masked.time_grid(1), [1.0, 0.0])
    for a_s, a_t in ((0.5, 0.0), (0.6, 0.3), (0.9, 0.8), (1.0, 0.75), (0.3, 0.2)):
        for strategy, eta in (("cap", 0.3), ("cap", 0.9), ("rescale", 0.5), ("confidence", 0.5)):
            want = remdm_sigma(strategy, eta, a_s, a_t)
            got = float(masked.remasking_sigma(strategy, eta, jnp.float32(a_s), jnp.float32(a_t)))
            np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"{strategy} {a_s} {a_t}")
    den, sched, x = TOY.absorbing_denoiser(), schedules.LinearSchedule(), all_masked(2)
    ancestral = lambda x, **kw: masked.ancestral_sample(
        den, None, x, mask_id=MASK, schedule=sched, steps=2, **kw
    )
    bad = [
        (lambda: masked.time_grid(0), "^steps must be >= 1, got 0$"),
        (lambda: masked.time_grid(4, 1.0), r"^t_min must be in \[0, 1\), got 1.0$"),
        (lambda: masked.time_grid(4, -0.1), r"^t_min must be in \[0, 1\), got -0.1$"),
        (lambda: masked.remasking_sigma("none", 0.5, 0.5, 0.2), "^unknown remasking strategy 'none';"),
        (lambda: ancestral(x[0]), r"^x_init must be int \[batch, length\], got int32 \(4,\)$"),
        (lambda: ancestral(x * 1.0), r"^x_init must be int \[batch, length\], got float32 \(2, 4\)$"),
        (lambda: masked.first_hitting_sample(den, None, x, mask_id=None, schedule=sched), "^masked-diffusion s"),
        (lambda: ancestral(x, remasking="up"), "^unknown remasking strategy 'up'; expected"),
        (lambda: ancestral(x, cache=True, remasking="cap"), r"^cache=True needs remasking='none' \("),
    ]
    for fn, msg in bad:
        with pytest.raises(ValueError, match=msg):
            fn()


# ------------------------------------------------------------------------------------------ SEDD score samplers


def score_step_probs(score_fn, graph, method, sched):
    """Per-position step probabilities of a score sampler on all states (for the exact grid)."""

    def step(states, t, s):
        n = states.shape[0]
        tt, ss = jnp.full((n,), t), jnp.full((n,), s)
        return score.step_probs(
            score_fn(states, tt), states, graph=graph, method=method, schedule=sched, t=tt, s=ss, mask_id=MASK
        )

    return step


def exact_uniform_distribution(method, sched, steps):
    step = score_step_probs(uniform_score_fn(sched), "uniform", method, sched)
    return chain(step, steps, TOY.seqs, np.full(len(TOY.seqs), 1.0 / len(TOY.seqs)))


def test_score_step_probabilities_against_the_formulas():
    """step_probs against SEDD's formulas (module docstring of ddlm.sampling.score), written out in numpy
    float64 from closed-form schedules: the absorbing reveal weight k at t = 1 (alpha(1) = 0), mid-way and
    near 0; the uniform graph's Euler and analytic steps with random ratios; an Euler step too large for the
    absorbing graph clipped and renormalised."""
    rng = np.random.default_rng(1)
    closed = {  # alpha(t), alpha'(t)
        "loglinear": (lambda t: 1 - (1 - 1e-3) * t, lambda t: -(1 - 1e-3) + 0 * t),
        "linear": (lambda t: 1 - t, lambda t: -1 + 0 * t),
        "cosine": (
            lambda t: 1 - np.cos(0.5 * np.pi * (1 - t)),
            lambda t: -0.5 * np.pi * np.sin(0.5 * np.pi * (1 - t)),
        ),
    }
    t = np.array([1.0, 0.7, 0.3, 0.05])
    s = np.array([0.6, 0.5, 0.28, 0.01])
    c = rng.dirichlet(np.ones(3), size=(4, 2))  # c_y over the 3 real tokens, [B, L, 3]
    log_c = np.concatenate([np.log(c), np.full((4, 2, 1), 5.0)], -1)  # the mask column is ignored
    xt = np.array([[MASK, 1]] * 4)  # position 0 masked, position 1 decoded
    for name, (alpha, dalpha) in closed.items():
        sched = schedules.get_schedule(name)
        for method in ("euler", "analytic"):
            if method == "euler":
                k = (t - s) * -dalpha(t) / (1 - alpha(t))
            else:
                k = (alpha(s) - alpha(t)) / (1 - alpha(t))
            t32, s32 = jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32)
            got = np.asarray(score.absorbing_reveal_weight(sched, t32, s32, method))
            np.testing.assert_allclose(got, k, rtol=2e-4, err_msg=f"{name} {method}")
            probs = np.asarray(
                score.step_probs(
                    jnp.asarray(log_c, jnp.float32), jnp.asarray(xt), graph="absorbing", method=method,
                    schedule=sched, t=t32, s=s32, mask_id=MASK,
                )
            )
            want = np.concatenate([k[:, None] * c[:, 0], 1 - k[:, None] * c[:, 0].sum(-1, keepdims=True)], -1)
            np.testing.assert_allclose(probs[:, 0], want, rtol=2e-4, atol=1e-6, err_msg=f"{name} {method}")
            np.testing.assert_array_equal(probs[:, 1], np.eye(V + 1)[[1] * 4])  # a decoded token stays
    # A too-large Euler step (linear, t = 0.9 -> 0: k = 1, sum_y k c_y = 1.8): the negative stay is clipped.
    big = np.asarray(
        score.step_probs(
            jnp.log(jnp.asarray([[[0.6, 0.6, 0.6, 1.0]]])), jnp.asarray([[MASK]]), graph="absorbing",
            method="euler", schedule=schedules.LinearSchedule(), t=0.9, s=0.0, mask_id=MASK,
        )
    )
    np.testing.assert_allclose(big[0, 0], [1 / 3, 1 / 3, 1 / 3, 0.0], rtol=1e-5, atol=1e-7)
    # The uniform graph, geometric schedule: sigma(t) = sigma_min^(1-t) sigma_max^t.
    geo = schedules.GeometricSchedule()
    sig = lambda u: 1e-4 ** (1 - u) * 20.0**u
    nv = 3
    ratios = np.exp(rng.normal(size=(4, 2, nv)))
    xu = rng.integers(0, nv, (4, 2))
    onehot = np.eye(nv)[xu]
    ratios_self = np.where(onehot > 0, 1.0, ratios)
    tau = sig(t) - sig(s)
    euler_moves = ((t - s) * sig(t) * math.log(20.0 / 1e-4))[:, None, None] / nv * ratios_self * (1 - onehot)
    euler = np.clip(euler_moves + onehot * (1 - euler_moves.sum(-1, keepdims=True)), 0, None)
    e = np.exp(tau)[:, None, None]
    analytic = (e * ratios_self + (1 - e) / nv * ratios_self.sum(-1, keepdims=True)) * (
        onehot / e + (1 - 1 / e) / nv
    )
    for method, want in (("euler", euler), ("analytic", analytic)):
        want = np.clip(want, 0, None)
        want = want / want.sum(-1, keepdims=True)
        got = score.step_probs(
            jnp.asarray(np.log(ratios), jnp.float32), jnp.asarray(xu), graph="uniform", method=method,
            schedule=geo, t=jnp.asarray(t, jnp.float32), s=jnp.asarray(s, jnp.float32),
        )
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=1e-6, err_msg=method)
    for kw, msg in (
        (dict(graph="absorbing", method="euler"), "graph 'absorbing' needs mask_id"),
        (dict(graph="tree", method="euler"), "unknown graph 'tree'"),
        (dict(graph="uniform", method="leap"), "unknown method 'leap'"),
    ):
        with pytest.raises(ValueError, match=msg):
            score.step_probs(jnp.zeros((1, 1, 3)), jnp.zeros((1, 1), jnp.int32), schedule=geo, t=0.5, s=0.4,
                             **kw)


@pytest.mark.parametrize(
    "graph,method",
    [("absorbing", "euler"), ("absorbing", "analytic"), ("uniform", "euler"), ("uniform", "analytic")],
)
def test_score_samplers_match_their_exact_distribution_and_the_data(graph, method):
    steps = 64
    if graph == "absorbing":
        sched = schedules.LogLinearSchedule()
        sfn = score.absorbing_score_fn(TOY.absorbing_denoiser(), mask_id=MASK)
        x_init = all_masked(N_SAMPLES)
        exact = exact_absorbing_distribution(
            sched, steps, step_probs=score_step_probs(sfn, graph, method, sched)
        )
    else:
        sched = schedules.GeometricSchedule()
        sfn = uniform_score_fn(sched)
        x_init = jnp.zeros((N_SAMPLES, L), jnp.int32)
        exact = exact_uniform_distribution(method, sched, steps)
    out = tjit(
        lambda r: score.score_sample(
            sfn,
            r,
            x_init,
            graph=graph,
            schedule=sched,
            steps=steps,
            method=method,
            mask_id=MASK,
            noise_removal=False,
        )
    )(jax.random.key(8))
    emp = histogram(out.tokens)
    assert tv(emp, exact) < tv_bound(exact, N_SAMPLES), (tv(emp, exact), tv_bound(exact, N_SAMPLES))
    assert tv(exact, TOY.probs) < 0.03, tv(exact, TOY.probs)
    assert int(out.nfe) == steps


def marginal_table():
    """[L, V]: p(x_0^l = v), the oracle's prediction at an all-masked state."""
    return np.stack([np.bincount(TOY.seqs[:, l], weights=TOY.probs, minlength=V) for l in range(L)])


@pytest.mark.parametrize(
    "schedule,method", [("linear", "euler"), ("linear", "analytic"), ("cosine", "analytic")]
)
def test_sedd_first_step_on_a_schedule_with_alpha_one_zero(schedule, method):
    """alpha(1) = 0 (linear, cosine): sigma(1) = inf and the ratios alpha/(1-alpha) p are 0, so the first step
    from t = 1 used to compute inf * 0 = NaN and reveal nothing. One step from t = 1 to s = 0.6 must reveal
    each position independently with probability k, as a draw from p(x_0^l) (the oracle's all-masked
    prediction): analytic k = alpha(s); Euler k = (t - s) (-alpha'(1)) / (1 - alpha(1)) = 0.4 on linear.
    The exact distribution over the (V+1)^L states is this product, computed here without the sampler."""
    sched = schedules.get_schedule(schedule)
    assert float(sched.alpha(jnp.float32(1.0))) == 0.0
    k = float(sched.alpha(jnp.float32(0.6))) if method == "analytic" else 0.4
    per_pos = np.concatenate([k * marginal_table(), np.full((L, 1), 1.0 - k)], axis=1)  # [L, V + 1]
    exact = np.prod(per_pos[np.arange(L), TOY.abs_states], axis=1)
    c = cfg(name=f"sedd_{method}", steps=1, t_min=0.6)
    out = tjit(
        lambda r: sampling.make_sampler(c, denoise_fn=TOY.absorbing_denoiser(), schedule=sched, mask_id=MASK)(
            r, all_masked(N_SAMPLES)
        )
    )(jax.random.key(17))
    emp = state_histogram(out.tokens)
    assert tv(emp, exact) < tv_bound(exact, N_SAMPLES), (tv(emp, exact), tv_bound(exact, N_SAMPLES))
    assert abs(np.mean(np.asarray(out.tokens) != MASK) - k) < 0.02


def test_sedd_noise_removal_at_t_zero_takes_the_denoisers_argmax():
    """Noise removal at the default t_min = 0 with a score that leaves positions masked (c = p / e, the
    ratios scaled down by e). Each position still masked must become argmax_y p(x_0 = y | x) of the
    state x it sees; the bug: at t = 0 every column's ratio alpha/(1-alpha) c is +inf, argmax -> id 0.
    Checked draw by draw (same key without and with noise removal) and against the exact distribution
    (the exact 4-step chain, then the greedy fill of each state)."""
    sched, steps, n = schedules.LogLinearSchedule(), 4, N_SAMPLES
    den = TOY.absorbing_denoiser()
    sfn = lambda xt, t: score.absorbing_score_fn(den, mask_id=MASK)(xt, t) - 1.0
    run = tjit(
        lambda r, removal: score.score_sample(
            sfn,
            r,
            all_masked(n),
            graph="absorbing",
            schedule=sched,
            steps=steps,
            method="euler",
            mask_id=MASK,
            noise_removal=removal,
        ),
        static_argnums=1,
    )
    before, after = run(jax.random.key(18), False), run(jax.random.key(18), True)
    before, tokens = np.asarray(before.tokens), np.asarray(after.tokens)
    left = before == MASK
    assert left.mean() > 0.05  # the scaled score leaves material work for the final step
    best = np.argmax(np.asarray(den(jnp.asarray(before)))[..., :V], axis=-1)
    np.testing.assert_array_equal(tokens, np.where(left, best, before))
    assert int(after.nfe) == steps + 1
    # Exact: the chain of the scaled score's steps, then each state mapped to its greedy fill.
    states = TOY.abs_states
    dist = exact_absorbing_state_distribution(
        sched, steps, step_probs=score_step_probs(sfn, "absorbing", "euler", sched)
    )
    fill = np.argmax(np.asarray(den(jnp.asarray(states)))[..., :V], axis=-1)
    filled = np.where(states == MASK, fill, states)
    exact = np.zeros(V**L)
    np.add.at(exact, np.asarray(TOY.index(filled)), dist)
    emp = histogram(tokens)
    assert tv(emp, exact) < tv_bound(exact, n), (tv(emp, exact), tv_bound(exact, n))
    assert np.mean(tokens[left] == 0) < 0.9  # not id 0 everywhere


def test_uniform_analytic_converges_as_steps_grow():
    sched = schedules.GeometricSchedule()
    dists = [tv(exact_uniform_distribution("analytic", sched, T), TOY.probs) for T in (8, 16, 32)]
    assert dists[0] > dists[1] > dists[2], dists


# ------------------------------------------------------------------------------------------ ReMDM and guidance


@pytest.mark.parametrize("strategy", ["cap", "rescale", "confidence"])
def test_remdm_with_zero_strength_is_ancestral(strategy):
    sched = schedules.CosineSchedule()
    den = TOY.absorbing_denoiser()
    x = all_masked(512)
    run = lambda **kw: tjit(
        lambda r: masked.ancestral_sample(den, r, x, mask_id=MASK, schedule=sched, steps=8, **kw)
    )(jax.random.key(9))
    np.testing.assert_array_equal(
        np.asarray(run(remasking=strategy, eta=0.0).tokens), np.asarray(run().tokens)
    )


def test_remdm_rescale_matches_its_exact_distribution():
    """ReMDM keeps the forward marginals; with the exact denoiser its factorised step is enumerable too."""
    sched, steps, eta = schedules.CosineSchedule(), 32, 0.5
    p0 = jnp.asarray(TOY.absorbing_posterior_table(), jnp.float32)

    def remdm_step(states, t, s):
        a_t, a_s = sched.alpha(t), sched.alpha(s)
        sigma = eta * jnp.where(a_t > 0, jnp.minimum(1.0, (1.0 - a_s) / a_t), 1.0)
        reveal = (a_s - (1.0 - sigma) * a_t) / (1.0 - a_t)
        mask_row = jax.nn.one_hot(MASK, V + 1)
        masked_probs = reveal * p0 + (1.0 - reveal) * mask_row
        decoded_probs = (1.0 - sigma) * jax.nn.one_hot(states, V + 1) + sigma * mask_row
        return jnp.where((states == MASK)[..., None], masked_probs, decoded_probs)

    exact = exact_absorbing_distribution(sched, steps, step_probs=remdm_step)
    out = tjit(
        lambda r: masked.ancestral_sample(
            TOY.absorbing_denoiser(),
            r,
            all_masked(N_SAMPLES),
            mask_id=MASK,
            schedule=sched,
            steps=steps,
            remasking="rescale",
            eta=eta,
        )
    )(jax.random.key(10))
    emp = histogram(out.tokens)
    assert tv(emp, exact) < tv_bound(exact, N_SAMPLES), (tv(emp, exact), tv_bound(exact, N_SAMPLES))
    assert tv(exact, TOY.probs) < 0.08


# A time- and state-free network over 2 tokens (mask id 2) at 3 positions: p(x_0^l) fixed per position, so the
# confidence of a decoded token (ReMDM 'confidence') is known from its value alone.
REMASK_PROBS = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])


def fixed_denoiser(xt, t):
    del t
    logits = np.concatenate([np.log(REMASK_PROBS), np.zeros((3, 1))], axis=1)  # the mask column is ignored
    return jnp.broadcast_to(jnp.asarray(logits, jnp.float32), xt.shape + (3,))


def remdm_sigma(strategy, eta, a_s, a_t):
    """ReMDM's sigma_t (Wang et al. 2025, sec. 4.1), independent of the sampler's code; 0 for 'none'."""
    sigma_max = 1.0 if a_t == 0 else min(1.0, (1.0 - a_s) / a_t)
    return {"none": 0.0, "cap": min(eta, sigma_max)}.get(strategy, eta * sigma_max)


def remask_weights(x, decoded, sigma, strategy):
    """Per-position remasking probability [B, 3] of the decoded positions: sigma, or for 'confidence' sigma
    times softmax(-confidence) over the row's decoded positions (confidence = p of the decoded token)."""
    if strategy != "confidence":
        return np.where(decoded, sigma, 0.0)
    conf = REMASK_PROBS[np.arange(3), np.where(decoded, x, 0)]
    w = np.where(decoded, np.exp(-conf), 0.0)
    return sigma * w / np.maximum(w.sum(-1, keepdims=True), 1e-300)


def assert_bernoulli_sums(events, probs, what, sds=5.0):
    """The count of `events` (bool) against the sum of their probabilities, within `sds` standard
    deviations."""
    events, probs = np.asarray(events, np.float64), np.asarray(probs, np.float64)
    mean, sd = probs.sum(), math.sqrt(np.sum(probs * (1.0 - probs)))
    assert abs(events.sum() - mean) <= sds * sd + 1e-9, (what, events.sum(), mean, sd)


@pytest.mark.parametrize("strategy,eta", [("none", 0.0), ("cap", 0.6), ("rescale", 0.6), ("confidence", 0.9)])
def test_remdm_steps_reveal_and_remask_at_the_rates_of_the_step_formula(strategy, eta):
    """Every step of the trajectory against ReMDM's step (Wang et al. 2025, eq. 6) on the cosine grid: a
    masked position is revealed with probability (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t), as a draw
    from p(x_0^l); a decoded one is remasked with probability sigma (times softmax(-confidence) for
    'confidence'). Counts per step and position against the sums of these probabilities (5 standard
    deviations)."""
    steps, n = 4, 4000
    sched = schedules.CosineSchedule()
    out = tjit(
        lambda r: masked.ancestral_sample(
            fixed_denoiser, r, jnp.full((n, 3), 2, jnp.int32), mask_id=2, schedule=sched, steps=steps,
            remasking=strategy, eta=eta, return_trajectory=True,
        )
    )(jax.random.key(19))
    traj = np.asarray(out.trajectory)
    t = 1.0 - np.arange(steps + 1) / steps
    alpha = 1.0 - np.cos(0.5 * np.pi * (1.0 - t))  # cosine, written out
    remasked_any = 0
    for k in range(steps):
        x, y = traj[k], traj[k + 1]
        sigma = remdm_sigma(strategy, eta, alpha[k + 1], alpha[k])
        reveal = (alpha[k + 1] - (1.0 - sigma) * alpha[k]) / (1.0 - alpha[k])
        hidden, decoded = x == 2, x != 2
        remask_p = remask_weights(x, decoded, sigma, strategy)
        for l in range(3):
            assert_bernoulli_sums((y[:, l] != 2)[hidden[:, l]], np.full(hidden[:, l].sum(), reveal), (k, l))
            assert_bernoulli_sums((y[:, l] == 2)[decoded[:, l]], remask_p[decoded[:, l], l], (k, l, "remask"))
        remasked_any += np.sum(decoded & (y == 2))
    assert (remasked_any > 0) == (strategy != "none")
    # Revealed tokens are draws from p(x_0^l).
    new = (traj[:-1] == 2) & (traj[1:] != 2)
    for l in range(3):
        drawn = traj[1:][..., l][new[..., l]]
        assert_bernoulli_sums(drawn == 1, np.full(drawn.size, REMASK_PROBS[l, 1]), ("token", l))
    assert not np.any(traj[-1] == 2)


def test_guidance_scale_zero_is_conditional_sampling():
    """The guided denoiser (two inputs, prompt masked in the second) with w = 0 gives the same tokens as
    plain conditional sampling for the same key; w > 0 changes them."""
    sched = schedules.LogLinearSchedule()
    den = TOY.absorbing_denoiser()
    x = jnp.asarray(conditioning.initial_tokens(512, L, MASK, prompt_ids=[2]))
    run = lambda fn: tjit(lambda r: masked.ancestral_sample(fn, r, x, mask_id=MASK, schedule=sched, steps=8))(
        jax.random.key(11)
    )
    plain = run(den)
    guided = run(conditioning.guided_denoise_fn(den, x != MASK, MASK, 0.0))
    np.testing.assert_array_equal(np.asarray(guided.tokens), np.asarray(plain.tokens))
    strong = tjit(
        lambda r: sampling.make_sampler(
            cfg(name="ancestral", steps=8, guidance_scale=3.0), denoise_fn=den, schedule=sched, mask_id=MASK
        )(r, x)
    )(jax.random.key(11))
    assert np.all(np.asarray(strong.tokens)[:, 0] == 2)
    assert np.any(np.asarray(strong.tokens) != np.asarray(plain.tokens))


# ------------------------------------------------------------------------------------------ conditioning


def test_infilling_samples_the_exact_conditional():
    known = {0: 1, 2: 0}
    x = jnp.asarray(conditioning.initial_tokens(N_SAMPLES // 2, L, MASK, constraints=known))
    consistent = np.all([TOY.seqs[:, p] == v for p, v in known.items()], axis=0)
    cond = np.where(consistent, TOY.probs, 0.0)
    cond /= cond.sum()
    for sampler in (
        lambda r: masked.first_hitting_sample(
            TOY.absorbing_denoiser(), r, x, mask_id=MASK, schedule=schedules.LogLinearSchedule()
        ),
        lambda r: masked.ancestral_sample(
            TOY.absorbing_denoiser(),
            r,
            x,
            mask_id=MASK,
            schedule=schedules.LogLinearSchedule(),
            steps=64,
            cache=True,
        ),
    ):
        out = tjit(sampler)(jax.random.key(12))
        tokens = np.asarray(out.tokens)
        assert all(np.all(tokens[:, p] == v) for p, v in known.items())
        emp = histogram(tokens)
        n = len(tokens)
        assert tv(emp, cond) < tv_bound(cond[consistent], n) + 0.01, tv(emp, cond)


def test_infill_template_constraints_and_length_control():
    encode = lambda s: [ord(c) for c in s]
    ids = conditioning.parse_infill_template("ab[MASK:3]c[MASK]d", encode, mask_id=-1)
    assert ids == [97, 98, -1, -1, -1, 99, -1, 100]
    assert conditioning.parse_infill_template("[MASK:2]", encode, 7) == [7, 7]
    assert conditioning.parse_constraints("0:5,3:9") == {0: 5, 3: 9}
    x = conditioning.initial_tokens(2, 8, 9, prompt_ids=[1, 2], constraints={5: 4}, end=6, eos_id=3, pad_id=0)
    np.testing.assert_array_equal(x[0], [1, 2, 9, 9, 9, 4, 3, 0])
    t = conditioning.truncate_after_eos(jnp.asarray([[5, 3, 6, 3, 7], [1, 2, 4, 4, 4]]), eos_id=3, pad_id=0)
    np.testing.assert_array_equal(np.asarray(t), [[5, 3, 0, 0, 0], [1, 2, 4, 4, 4]])
    with pytest.raises(ValueError):
        conditioning.initial_tokens(1, 2, 9, prompt_ids=[1, 2, 3])


def test_filters_temperature_top_k_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda f: np.asarray(f > -1e5)[0].tolist()
    assert keep(categorical.filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert keep(categorical.filter_logits(logits, top_p=0.7)) == [True, True, False, False]
    assert keep(categorical.filter_logits(logits, top_p=0.5)) == [True, False, False, False]
    assert keep(categorical.filter_logits(logits, top_p=0.81)) == [True, True, True, False]
    np.testing.assert_allclose(categorical.filter_logits(logits, temperature=0.5), logits * 2, rtol=1e-6)
    # Row by row: a second row in another order (and a third with a tie at the k-th value, kept).
    rows = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5], [0.1, 0.4, 0.1, 0.4]]))
    keep_rows = lambda f: np.asarray(f > -1e5).tolist()
    assert keep_rows(categorical.filter_logits(rows, top_p=0.7)) == [
        [True, True, False, False], [False, False, True, True], [False, True, False, True]
    ]
    assert keep_rows(categorical.filter_logits(rows, top_k=3)) == [
        [True, True, True, False], [False, True, True, True], [True, True, True, True]
    ]
    np.testing.assert_allclose(categorical.filter_logits(rows, temperature=2.0), rows / 2, rtol=1e-6)
    for kw, msg in (
        (dict(temperature=0.0), r"^temperature must be > 0 \(use greedy decoding for 0\), got 0.0$"),
        (dict(temperature=-1.0), r"^temperature must be > 0 \(use greedy decoding for 0\), got -1.0$"),
        (dict(top_p=0.0), r"^top_p must be in \(0, 1\], got 0.0$"),
        (dict(top_p=1.5), r"^top_p must be in \(0, 1\], got 1.5$"),
    ):
        with pytest.raises(ValueError, match=msg):
            categorical.filter_logits(rows, **kw)
    with pytest.raises(ValueError, match="^unknown precision 'float16'; expected one of"):
        categorical.gumbel_noise(jax.random.key(0), (2,), "float16")


# ------------------------------------------------------------------------------------------ precision


def test_float64_gumbel_matches_zipf_tail_and_float32_undersamples_it():
    """50,000-way Zipf (p_i ~ i^-1.2, whose tail sits where float32's cut bites). Both paths see the same random bits (coupled), so the float32
    truncation shows as draws that land in the tail with float64 noise and not with float32 noise."""
    k, n, chunk = 50_000, 2000, 200
    logp = -1.2 * np.log(np.arange(1, k + 1))
    logp -= np.log(np.exp(logp).sum())
    lp = jnp.asarray(logp, jnp.float32)

    def draw(key):
        bits = jax.random.bits(key, (2, chunk, k), jnp.uint32)
        g64 = categorical.gumbel_from_bits(bits, "float64")
        g32 = categorical.gumbel_from_bits(bits, "float32")
        return jnp.argmax(lp + g64, -1), jnp.argmax(lp + g32, -1), jnp.max(g64), jnp.max(g32)

    # unsafe_rbg: a faster source of the same uniform bits (the test is about turning bits into noise).
    w64, w32, max64, max32 = jax.jit(lambda key: jax.lax.map(draw, jax.random.split(key, n // chunk)))(
        jax.random.key(13, impl="unsafe_rbg")
    )
    w64, w32 = np.asarray(w64).ravel(), np.asarray(w32).ravel()
    assert float(np.max(max32)) < 16.0 < float(np.max(max64))  # the float32 tail is cut near 15.9
    for rank in (100, 1000):
        mass = np.exp(logp[rank:]).sum()
        sd = math.sqrt(mass * (1 - mass) / n)
        assert abs((w64 >= rank).mean() - mass) < 4.5 * sd, (rank, (w64 >= rank).mean(), mass)
    tail = 1000
    lost = int(np.sum((w64 >= tail) & (w32 < tail)))
    gained = int(np.sum((w32 >= tail) & (w64 < tail)))
    print(f"float32 lost {lost} of {int(np.sum(w64 >= tail))} tail draws")
    assert gained == 0 and lost >= 1, (lost, gained)
    # The samplers draw through the float64 path by default.
    key = jax.random.key(14)
    expected = jnp.argmax(lp[None] + categorical.gumbel_noise(key, (3, k), "float64"), -1)
    np.testing.assert_array_equal(
        np.asarray(categorical.sample_categorical(key, jnp.broadcast_to(lp, (3, k)))), np.asarray(expected)
    )
    assert sampling.default_config().precision == "float64"


def test_gumbel_from_bits_is_the_documented_transform_and_stays_finite():
    """'float64': U = (the top 53 of the 64 bits + 1/2) 2^-53, G = -log(-log U); 'float32': U = (the top 23 bits
    of the first word) 2^-23, at least the smallest normal float. numpy float64 references. All-ones bits used
    to give U = 1 (2^53 - 1/2 rounds up to 2^53 in float64) and G = +inf, which beats any logit, NEG_INF too."""
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**32, (2, 200), dtype=np.uint64)
    words[:, :4] = [[0, 0xFFFFFFFF, 0x80000000, 0xFFFFFFFF], [0, 0xFFFFFFFF, 0, 0xFFFFF7FF]]
    g64 = np.asarray(categorical.gumbel_from_bits(jnp.asarray(words, jnp.uint32), "float64"))
    word53 = words[0] * 2**21 + words[1] // 2**11
    u = np.minimum((word53.astype(np.float64) + 0.5) * 2.0**-53, 1.0 - 2.0**-53)
    np.testing.assert_allclose(g64, -np.log(-np.log(u)), rtol=1e-6)
    assert np.all(np.isfinite(g64)) and g64[1] == g64.max() and 36.7 < g64[1] < 36.8
    g32 = np.asarray(categorical.gumbel_from_bits(jnp.asarray(words, jnp.uint32), "float32"))
    u32 = np.maximum((words[0] // 2**9).astype(np.float64) * 2.0**-23, np.finfo(np.float32).tiny)
    np.testing.assert_allclose(g32, -np.log(-np.log(u32)), rtol=1e-5, atol=1e-6)  # float32 math
    # A filtered id (NEG_INF) is never drawn, even with the largest noise the bits can give.
    logits = jnp.asarray([[0.0, losses.NEG_INF]])
    all_ones = jnp.full((2, 1, 2), 0xFFFFFFFF, jnp.uint32).at[:, 0, 0].set(0)
    assert int(jnp.argmax(logits + categorical.gumbel_from_bits(all_ones, "float64"), -1)[0]) == 0
    with pytest.raises(ValueError, match="^gumbel_from_bits: precision must be 'float64' or 'float32', got"):
        categorical.gumbel_from_bits(jnp.asarray(words, jnp.uint32), "float32_64bit")


def test_every_precision_samples_a_small_categorical():
    probs = np.array([0.6, 0.3, 0.08, 0.02])
    n = 20000
    for precision in categorical.PRECISIONS:
        draws = np.asarray(
            tjit(
                lambda r: categorical.sample_categorical(
                    r, jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (n, 4)), precision
                )
            )(jax.random.key(15))
        )
        freq = np.bincount(draws, minlength=4) / n
        np.testing.assert_array_less(np.abs(freq - probs), 4.5 * np.sqrt(probs * (1 - probs) / n) + 1e-9)


# ------------------------------------------------------------------------------------------ compilation and sharding


def _all_samplers(steps=4):
    sched = schedules.LogLinearSchedule()
    den = TOY.absorbing_denoiser()
    out = []
    for name in sampling.SAMPLERS:
        if name in sampling.CACHED_SAMPLERS:  # they decode a network's KV cache: tests/test_cached_samplers.py
            continue
        if name in ("canvas", "psi"):  # uniform-state networks only (added below)
            continue
        c = cfg(name=name, steps=steps)
        if name == "remdm":
            c.remasking, c.eta = "cap", 0.1
        out.append((name, c, dict(denoise_fn=den, schedule=sched, mask_id=MASK)))
    geo = schedules.GeometricSchedule()
    out.append(
        (
            "sedd_analytic",
            cfg(name="sedd_analytic", steps=steps),
            dict(score_fn=uniform_score_fn(geo), schedule=geo, graph="uniform"),
        )
    )
    uniform_x_theta = lambda x, t: jnp.zeros(x.shape + (V,))  # a mean-parameterised network (its law: tests/test_sampling_canvas.py)
    out.append(("canvas", cfg(name="canvas", steps=steps), dict(denoise_fn=uniform_x_theta, schedule=sched, graph="uniform")))
    out.append(("psi", cfg(name="psi", steps=steps, psi_strength=0.3), dict(denoise_fn=uniform_x_theta, schedule=sched, graph="uniform")))
    return out


def test_each_sampler_compiles_once_per_shape_and_steps_and_runs_sharded_over_8_devices():
    devices = np.array(jax.devices()[:8])
    assert len(devices) == 8
    mesh = Mesh(devices, ("data",))
    batch = NamedSharding(mesh, P("data"))
    x_host = all_masked(16)
    for name, c, kwargs in _all_samplers():
        before = sampling.TRACE_COUNTS[name]
        fn = sampling.jit_sampler(c, compiler_options=FAST, **kwargs)
        x = jax.device_put(
            x_host if kwargs.get("graph") != "uniform" else jnp.zeros((16, L), jnp.int32), batch
        )
        a = fn(jax.random.key(0), x)
        b = fn(jax.random.key(1), x)
        assert sampling.TRACE_COUNTS[name] - before == 1, name
        assert a.tokens.sharding.is_equivalent_to(batch, 2), (name, a.tokens.sharding)
        assert len(a.tokens.sharding.device_set) == 8
        assert not np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens)) or name == "first_hitting"
        if name in ("ancestral", "first_hitting", "sedd_analytic"):
            # Sharding does not change the result: the same key on one device gives the same tokens.
            single = fn(jax.random.key(0), jax.device_put(x, jax.devices()[0]))
            np.testing.assert_array_equal(np.asarray(single.tokens), np.asarray(a.tokens), err_msg=name)
            # A new number of steps is one new compilation.
            c2 = ml_collections.ConfigDict(c.to_dict())
            c2.steps = 5
            sampling.jit_sampler(c2, compiler_options=FAST, **kwargs)(jax.random.key(0), x)
            assert sampling.TRACE_COUNTS[name] - before <= 3, name


def test_make_sampler_rejects_bad_configs():
    den = TOY.absorbing_denoiser()
    sched = schedules.LogLinearSchedule()
    with pytest.raises(ValueError, match="unknown sampler"):
        sampling.make_sampler(cfg(name="nope"), denoise_fn=den, schedule=sched, mask_id=MASK)
    with pytest.raises(ValueError, match="uniform graph"):
        sampling.make_sampler(
            cfg(name="ancestral"), denoise_fn=den, schedule=sched, mask_id=MASK, graph="uniform"
        )
    with pytest.raises(ValueError, match="score_fn"):
        sampling.make_sampler(cfg(name="sedd_euler"), denoise_fn=den, schedule=sched, graph="uniform")
    # The uniform graph from t = 1 with alpha(1) = 0 would be an infinite jump: a clear error, not NaNs.
    with pytest.raises(ValueError, match=r"uniform graph needs a schedule with alpha\(1\) > 0"):
        sampling.make_sampler(
            cfg(name="sedd_analytic"),
            score_fn=uniform_score_fn(sched),
            schedule=schedules.LinearSchedule(),
            graph="uniform",
        )(jax.random.key(0), jnp.zeros((2, L), jnp.int32))
