"""The few-step objectives, proven on the exact toy distribution (tests/oracle.py, L = 4, V = 3, float64):
DUO's uniform-state NELBO and the Gaussian duality behind its curriculum, self-conditioning, and the
distillation losses (SDTT, DCD).

Exact values come from enumerating every (x_0, x_t) with its probability and integrating over t with
Gauss-Legendre quadrature (as tests/test_losses.py does for the other objectives):

* DUO's loss with its optimal network, the leave-one-out posterior pi^l(v) = p(x_0^l = v | x_t^{-l}), integrates
  to I(x_0; x_{t=0}) - I(x_0; x_{t=1}); with the prior term the bound is H + KL(q(x_1) || uniform), the bound
  the DUO paper states for its log-linear schedule (alpha(1) = 1e-3);
* the Gaussian relaxation's argmax is the uniform process with DUO eq. 10's alpha (quadrature against scipy,
  and by sampling), so the curriculum's loss at tau -> 0 is the same bound over the relaxation's noise range;
* a perfect distillation student costs 0, a perturbed one exactly its KL; SDTT's several-step target has the
  mean the enumeration of the teacher's steps gives.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

import oracle
from ddlm import losses, processes, schedules

TOY = oracle.ToyDistribution(num_tokens=3, length=4, seed=0)
V, L, MASK = TOY.num_tokens, TOY.length, TOY.mask_id
H = TOY.entropy()
SEQS = TOY.seqs  # [N, L]


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def gauss_legendre(n, lo=0.0, hi=1.0):
    x, w = np.polynomial.legendre.leggauss(n)
    return lo + (hi - lo) * 0.5 * (x + 1.0), (hi - lo) * 0.5 * w


# ------------------------------------------------------------------------------ the exact DUO network


def per_token_kernel(xt, x0, alpha):
    """q(x_t^k | x_0^k) [..., L] for the uniform process."""
    return np.where(xt == x0, alpha + (1.0 - alpha) / V, (1.0 - alpha) / V)


def leave_one_out_posterior(xt, alpha):
    """pi [L, V]: pi^l(v) = p(x_0^l = v | x_t^{-l}) for one state xt [L], by enumerating x_0 (numpy)."""
    q = per_token_kernel(xt[None, :], SEQS, alpha)  # [N, L]
    out = np.zeros((L, V))
    for l in range(L):
        w = TOY.probs * np.prod(np.delete(q, l, axis=1), axis=1)
        out[l] = np.bincount(SEQS[:, l], weights=w, minlength=V) / w.sum()
    return out


def full_posterior(xt, alpha):
    """p(x_0^l = v | x_t) [L, V] (sees x_t^l)."""
    w = TOY.probs * np.prod(per_token_kernel(xt[None, :], SEQS, alpha), axis=1)
    return np.stack([np.bincount(SEQS[:, l], weights=w, minlength=V) for l in range(L)]) / w.sum()


@functools.lru_cache(maxsize=None)
def pairs():
    """Every (x_0, x_t) pair of sequences: x0, xt [N*N, L] and p(x_0) [N*N]."""
    n = len(SEQS)
    return np.repeat(SEQS, n, axis=0), np.tile(SEQS, (n, 1)), np.repeat(TOY.probs, n)


def uniform_expectation(loss_at, schedule, t, network):
    """E_{x_0, x_t ~ q_t}[sum_l loss_l] at time t, exactly. network(xt [L], alpha) -> probabilities [L, V]."""
    x0, xt, px0 = pairs()
    a = float(schedule.alpha(jnp.float64(t)))
    tables = {i: network(s, a) for i, s in enumerate(SEQS)}
    probs = np.stack([tables[i] for i in range(len(SEQS))] * len(SEQS))  # tiled over x_0 like pairs()
    logits = np.log(np.maximum(probs, 1e-300))
    weight = px0 * np.prod(per_token_kernel(xt, x0, a), axis=1)
    per = loss_at(jnp.asarray(logits), jnp.asarray(x0), jnp.asarray(xt), jnp.full((len(x0),), t))
    return float(np.sum(weight * np.asarray(per).sum(1)))


class AtOneTime:
    """`schedule` evaluated once at the time all rows share (uniform_expectation's): the relaxation's alpha is a
    1,601-point quadrature per element, too slow over 6,561 rows at 64 nodes."""

    def __init__(self, schedule):
        self.schedule = schedule

    def alpha(self, t):
        return jnp.full(jnp.shape(t), self.schedule.alpha(jnp.ravel(t)[0]))

    def dalpha(self, t):
        return jnp.full(jnp.shape(t), self.schedule.dalpha(jnp.ravel(t)[0]))


def duo_diffusion_term(schedule, network=leave_one_out_posterior, n=64):
    """int_0^1 E[sum_l duo_loss_l] dt. The integrand grows like -log t at t = 0 (the rate of leaving the
    clean state), so t = u^3 (Gauss-Legendre in u) makes it smooth: 64 nodes reach 1e-9."""
    fn = lambda lg, x0, xt, t: losses.duo_loss(lg, x0, xt, t, AtOneTime(schedule))
    u, w = gauss_legendre(n)
    return sum(3 * uk**2 * wk * uniform_expectation(fn, schedule, uk**3, network) for uk, wk in zip(u, w))


def mutual_info(alpha):
    return TOY.mutual_information(TOY.uniform_kernel(alpha))


# ------------------------------------------------------------------------------ DUO's NELBO on the oracle


@pytest.mark.parametrize("eps", [1e-3, 3e-2])
def test_duo_oracle_nelbo_is_entropy_plus_the_prior_gap(eps):
    """DUO's log-linear schedule (alpha = 1 - (1 - eps) t): with the exact network the diffusion term is the
    mutual information lost from t = 0 (alpha = 1: I = H) to t = 1, and adding the prior term DUO adds
    (`_prior_loss`, boundary_terms('duo')) gives H + KL(q(x_1) || uniform^L): the bound is the data entropy
    plus the gap the prior leaves, which vanishes as eps -> 0."""
    sched = schedules.LogLinearSchedule(eps=eps)
    diff = duo_diffusion_term(sched, n=64)
    i1 = mutual_info(eps)
    assert abs(diff - (H - i1)) < 1e-7, (diff, H - i1)
    prior, recon = losses.boundary_terms("duo", sched, V)
    assert float(recon) == 0.0
    joint1 = TOY.probs[:, None] * TOY.uniform_kernel(eps)
    q1 = joint1.sum(0)
    kl_marginal = float(np.sum(q1 * np.log(q1 * len(SEQS))))
    assert abs(diff + L * float(prior) - (H + kl_marginal)) < 1e-7
    assert kl_marginal > 0


def reverse_rate_divergence(rates_true, rates_model, xt):
    """sum_{y != x_t} [R* log(R*/R) - R* + R] over the last axis [..., V] (the generalised KL of two rate
    vectors out of state xt [...]; the y = x_t entry, the exit rate, is left out)."""
    d = rates_true * np.log(rates_true / rates_model) - rates_true + rates_model
    return np.sum(np.where(np.arange(d.shape[-1]) == xt[..., None], 0.0, d), axis=-1)


def test_duo_per_token_loss_is_the_divergence_of_the_reverse_rates():
    """duo_loss(x_theta; x_0, x_t) = sum_{y != x_t} D(R_q(y | x_t, x_0), R_theta(y | x_t)) with the reverse rates
    R(y) = -alpha'/(V alpha) xbar[y] / xbar[x_t] of xbar = V alpha x + (1 - alpha) 1 (x = one-hot x_0 for q,
    x_theta for the model): the continuous-time limit of KL(q(x_s | x_t, x_0) || q(x_s | x_t, x_theta)) / (t - s)
    (UDLM's derivation), computed in numpy on random networks, tokens and times (V = 5)."""
    n, vocab = 400, 5
    sched = schedules.LogLinearSchedule(eps=1e-3)
    k = jax.random.split(jax.random.PRNGKey(7), 4)
    logits = jax.random.normal(k[0], (n, 1, vocab)) * 2
    x0 = jax.random.randint(k[1], (n, 1), 0, vocab)
    xt = jnp.where(jnp.arange(n)[:, None] % 3 == 0, x0, jax.random.randint(k[2], (n, 1), 0, vocab))
    t = jax.random.uniform(k[3], (n,))
    got = np.asarray(losses.duo_loss(logits, x0, xt, t, sched))[:, 0]
    a, da = np.asarray(sched.alpha(t))[:, None], np.asarray(sched.dalpha(t))[:, None]
    x0n, xtn = np.asarray(x0)[:, 0], np.asarray(xt)[:, 0]
    rows = np.arange(n)

    def rates(x):
        xbar = vocab * a * x + (1 - a)
        return -da / (vocab * a) * xbar / xbar[rows, xtn][:, None]

    r_true = rates(np.eye(vocab)[x0n])
    r_model = rates(np.asarray(jax.nn.softmax(logits, -1))[:, 0])
    want = reverse_rate_divergence(r_true, r_model, xtn)
    assert np.sum(xtn == x0n) > 100 and np.sum(xtn != x0n) > 100
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_duo_excess_loss_is_the_divergence_from_the_true_reverse_rates():
    """Averaged over p(x_0, x_t), a network's loss exceeds the leave-one-out posterior's by exactly
    E_{x_t ~ p_t} sum_l sum_{y != x_t^l} D(R*, R_theta), the true reverse rates R*(y) = -alpha'/(V alpha)
    p_t(x_t^{l <- y}) / p_t(x_t) enumerated from the toy marginal: the leave-one-out posterior pi^l =
    p(x_0^l | x_t^{-l}) (excess 0) is the optimum. The posterior that also sees x_t^l (what a cross-entropy
    denoiser learns) and pi mixed with noise pay that excess; at t = 0.9 the mixed one's is only 2.4e-4 nats
    (alpha = 0.1 leaves little to tell them apart), so the test compares with the exact excess, not a margin."""
    sched = schedules.LogLinearSchedule(eps=1e-3)
    fn = lambda lg, x0, xt, t: losses.duo_loss(lg, x0, xt, t, sched)
    mixed = lambda xt, a: 0.8 * leave_one_out_posterior(xt, a) + 0.2 / V
    index = {tuple(s): i for i, s in enumerate(SEQS)}
    for t in (0.2, 0.5, 0.9):
        a, da = float(sched.alpha(t)), float(sched.dalpha(t))
        p_t = TOY.probs @ TOY.uniform_kernel(a)  # [N]: the marginal of x_t
        best = uniform_expectation(fn, sched, t, leave_one_out_posterior)
        for network in (full_posterior, mixed):
            excess = 0.0
            for i, xt in enumerate(SEQS):
                for l in range(L):
                    flips = [index[tuple(np.where(np.arange(L) == l, y, xt))] for y in range(V)]
                    r_true = -da / (V * a) * p_t[flips] / p_t[i]
                    xbar = V * a * network(xt, a)[l] + 1 - a
                    r_model = -da / (V * a) * xbar / xbar[xt[l]]
                    excess += p_t[i] * reverse_rate_divergence(r_true, r_model, np.array(xt[l]))
            got = uniform_expectation(fn, sched, t, network) - best
            assert excess > 1e-5 and abs(got - excess) < 1e-10 * max(1.0, excess), (t, got, excess)


def test_duo_log_ratios_of_the_leave_one_out_posterior_are_the_exact_ratios():
    """losses.duo_log_ratios of the loss's minimiser are the uniform graph's exact log ratios (TOY's, from the
    marginal p_t), what the SEDD samplers take: so a DUO network samples through them exactly where it is exact;
    the full posterior's are not."""
    for alpha in (0.15, 0.6, 0.95):
        xt = jnp.asarray(SEQS)
        want = np.asarray(TOY.uniform_log_score(xt, jnp.full((len(SEQS),), alpha)))
        pi = np.stack([leave_one_out_posterior(s, alpha) for s in SEQS])
        got = np.asarray(losses.duo_log_ratios(jnp.log(pi), xt, jnp.full((len(SEQS),), alpha)))
        np.testing.assert_allclose(got, want, atol=1e-10)
        full = np.stack([full_posterior(s, alpha) for s in SEQS])
        assert np.max(np.abs(np.asarray(losses.duo_log_ratios(jnp.log(full), xt, alpha * jnp.ones(len(SEQS)))) - want)) > 1e-2


def test_duo_per_token_loss_is_nonnegative_and_zero_at_the_truth_when_alpha_is_one():
    """Each per-token term is a Bregman-type divergence of rates: >= 0 for any network, and at alpha -> 1 the
    clean token x_t = x_0 predicted one-hot costs 0 (no NaN from the x_t != x_0 branch's infinite factor)."""
    sched = schedules.LogLinearSchedule(eps=1e-3)
    key = jax.random.PRNGKey(0)
    logits = jax.random.normal(key, (64, L, V)) * 3
    x0 = jax.random.randint(jax.random.PRNGKey(1), (64, L), 0, V)
    xt = jax.random.randint(jax.random.PRNGKey(2), (64, L), 0, V)
    t = jax.random.uniform(jax.random.PRNGKey(3), (64,))
    per = losses.duo_loss(logits, x0, xt, t, sched)
    assert per.shape == (64, L) and bool(jnp.all(per >= -1e-9))
    onehot = jnp.where(jax.nn.one_hot(x0, V) > 0, 0.0, -1e4)
    zero = losses.duo_loss(onehot, x0, x0, jnp.zeros(64), sched)
    assert bool(jnp.all(jnp.isfinite(zero))) and float(jnp.max(jnp.abs(zero))) < 1e-9
    g = jax.grad(lambda lg: jnp.sum(losses.duo_loss(lg, x0, x0, jnp.zeros(64), sched)))(logits)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_mean_posterior_of_the_leave_one_out_posterior_is_the_exact_per_token_reverse_step():
    """processes.UniformProcess.mean_posterior_probs(pi) (DUO's reverse step) equals the exact per-token reverse
    marginal p(x_s^l | x_t) = sum_{x_0} p(x_0 | x_t) q(x_s^l | x_t^l, x_0^l), computed by enumeration, and
    posterior_probs of the full posterior."""
    proc = processes.UniformProcess(V)
    a_s, a_t = 0.7, 0.3
    for xt in SEQS[::7]:
        pi = leave_one_out_posterior(xt, a_t)
        got = np.asarray(proc.mean_posterior_probs(jnp.asarray(pi)[None], jnp.asarray(xt)[None], a_s, a_t))[0]
        w = TOY.probs * np.prod(per_token_kernel(xt[None, :], SEQS, a_t), axis=1)
        w = w / w.sum()
        want = np.zeros((L, V))
        for l in range(L):
            for v in range(V):  # q(x_s = v | x_t, x_0) = q(x_t | x_s = v) q(x_s = v | x_0) / q(x_t | x_0)
                a_ts = a_t / a_s
                fwd = np.where(xt[l] == v, a_ts + (1 - a_ts) / V, (1 - a_ts) / V)
                prior = np.where(SEQS[:, l] == v, a_s + (1 - a_s) / V, (1 - a_s) / V)
                want[l, v] = np.sum(w * fwd * prior / per_token_kernel(xt[l], SEQS[:, l], a_t))
        np.testing.assert_allclose(got, want, atol=1e-12)
        full = proc.posterior_probs(jnp.asarray(full_posterior(xt, a_t))[None], jnp.asarray(xt)[None], a_s, a_t)
        np.testing.assert_allclose(np.asarray(full)[0], want, atol=1e-12)


def test_monte_carlo_duo_training_loss_is_unbiased():
    """training_loss('duo') with the exact network: its mean over batches is the exact diffusion term per token."""
    sched = schedules.LogLinearSchedule(eps=1e-3)

    def apply(xt, t, ctx):
        a = sched.alpha(t)
        pi = jax.pure_callback(
            lambda x, al: np.stack([leave_one_out_posterior(r, float(b)) for r, b in zip(x, al)]),
            jax.ShapeDtypeStruct(xt.shape + (V,), jnp.float64),
            xt,
            a,
        )
        return jnp.log(jnp.maximum(pi, 1e-300))

    vals = []
    for key in jax.random.split(jax.random.PRNGKey(5), 24):
        k1, k2 = jax.random.split(key)
        loss, _ = losses.training_loss(
            "duo", apply, TOY.sample(k1, 128), None, k2, schedule=sched, vocab_size=V, mask_id=None
        )
        vals.append(float(loss))
    mean, se = np.mean(vals), np.std(vals, ddof=1) / math.sqrt(len(vals))
    exact = (H - mutual_info(1e-3)) / L
    assert abs(mean - exact) < 4 * se, (mean, exact, se)


# ------------------------------------------------------------------------------ the Gaussian duality


@pytest.mark.parametrize("vocab", [3, 4096, 50257])
@pytest.mark.parametrize("gamma", [-3.5, -1.75, 1.0])
def test_duality_alpha_matches_eq10_by_scipy_quad(vocab, gamma):
    """alpha = V/(V-1) (int phi(z - mu) Phi(z)^(V-1) dz - 1/V), mu = e^(-gamma/2) (DUO eq. 10, utils.py's
    integrand), against scipy's adaptive quadrature."""
    relax = processes.GaussianRelaxation(vocab, gamma_min=-4.0, gamma_max=2.0)
    mu = math.exp(-gamma / 2)
    p, _ = integrate.quad(
        lambda z: stats.norm.pdf(z - mu) * stats.norm.cdf(z) ** (vocab - 1), -np.inf, np.inf, epsabs=1e-13, limit=200
    )
    t = (gamma + 4.0) / 6.0
    got = float(relax.alpha(jnp.float64(t)))
    assert abs(got - (vocab * p - 1) / (vocab - 1)) < 1e-10


def test_duality_dalpha_is_the_derivative_of_alpha():
    relax = processes.GaussianRelaxation(50257)
    t = jnp.array([0.1, 0.5, 0.9], jnp.float64)
    h = 1e-5
    fd = (relax.alpha(t + h) - relax.alpha(t - h)) / (2 * h)
    np.testing.assert_allclose(np.asarray(relax.dalpha(t)), np.asarray(fd), rtol=1e-6)
    assert bool(jnp.all(relax.dalpha(t) < 0))


def test_argmax_of_the_gaussian_latent_is_the_uniform_process():
    """Sampling w_t = a x_0 + s eps and taking argmax gives x_t = x_0 with probability alpha + (1 - alpha)/V and
    each other token with (1 - alpha)/V, alpha from the duality (within 4 standard errors of 400k draws)."""
    relax = processes.GaussianRelaxation(5, gamma_min=-2.0, gamma_max=3.0)
    n = 400_000
    x0 = jnp.zeros((n, 1), jnp.int32) + 2
    for t in (0.2, 0.6):
        w = relax.sample_latent(jax.random.PRNGKey(int(t * 10)), x0, jnp.full((n,), t))
        counts = np.bincount(np.asarray(jnp.argmax(w, -1)).ravel(), minlength=5) / n
        a = float(relax.alpha(t))
        want = np.full(5, (1 - a) / 5)
        want[2] += a
        se = np.sqrt(want * (1 - want) / n)
        assert np.all(np.abs(counts - want) < 4 * se), (counts, want)


def test_curriculum_loss_at_vanishing_temperature_is_the_bound_over_its_noise_range():
    """The curriculum scores argmax(w_t) with duo_loss under the relaxation's own alpha(t): with the exact
    network the diffusion term over t in [0, 1] is I(x_0; x_{alpha(0)}) - I(x_0; x_{alpha(1)}) (the relaxation
    spans a range of noise, not all of it)."""
    relax = processes.GaussianRelaxation(V, gamma_min=-3.0, gamma_max=3.0)
    a0, a1 = float(relax.alpha(0.0)), float(relax.alpha(1.0))
    assert 0.05 < a1 < a0 < 0.999
    diff = duo_diffusion_term(relax, n=48)
    assert abs(diff - (mutual_info(a0) - mutual_info(a1))) < 1e-7


def test_curriculum_inputs_temperature_schedule_and_switch_off():
    """The network sees softmax(w_t / tau) (rows summing to 1) whose argmax is the x_t the loss scores, at the
    time of the main schedule with the relaxation's alpha; tau follows log10 tau from start to end; from
    `end` on the plain loss runs (int inputs at the schedule's own time)."""
    sched = schedules.LogLinearSchedule(eps=1e-3)
    relax = processes.GaussianRelaxation(V, gamma_min=-3.0, gamma_max=3.0)
    cur = losses.DuoCurriculum(relax, tau_log10_start=-1.0, tau_log10_end=-2.0, start=10, end=20)
    np.testing.assert_allclose(
        [float(cur.inverse_temperature(s)) for s in (0, 10, 15, 20, 99)], [10, 10, 10**1.5, 100, 100], rtol=1e-6
    )
    seen = {}

    def apply(x, t, ctx):
        # lax.cond traces both branches: record what the branch that runs is given, when it runs.
        jax.debug.callback(lambda x, t: seen.update(x=np.asarray(x), t=np.asarray(t)), x, t)
        return jnp.zeros(x.shape[:2] + (V,))

    x0 = TOY.sample(jax.random.PRNGKey(0), 16)
    key = jax.random.PRNGKey(3)
    loss, metrics = losses.training_loss(
        "duo", apply, x0, None, key, schedule=sched, vocab_size=V, mask_id=None, step=12, curriculum=cur
    )
    assert float(metrics["curriculum"]) == 1.0
    x, t_net = seen["x"], seen["t"]
    assert x.shape == (16, L, V) and np.issubdtype(x.dtype, np.floating)
    np.testing.assert_allclose(x.sum(-1), 1.0, atol=1e-6)
    # Rebuild the draws: the times and the latent from the same keys.
    t_rng, x_rng = jax.random.split(key)
    t = losses.sample_times(t_rng, 16, True)
    np.testing.assert_allclose(np.asarray(t_net), np.asarray(sched.t_from_alpha(relax.alpha(t))), rtol=1e-5)  # float32 t
    w = relax.sample_latent(x_rng, x0, t)
    np.testing.assert_allclose(x, np.asarray(jax.nn.softmax(w * 10**1.2, -1)), atol=1e-6)
    want = losses.masked_mean(losses.duo_loss(jnp.zeros((16, L, V)), x0, jnp.argmax(w, -1), t, relax))
    assert abs(float(loss) - float(want)) < 1e-6 * float(want)  # the quadrature in float32 (t is), fused or not
    # Past the curriculum: the plain loss on int x_t ~ q_t at the schedule's own t.
    loss2, metrics2 = losses.training_loss(
        "duo", apply, x0, None, key, schedule=sched, vocab_size=V, mask_id=None, step=20, curriculum=cur
    )
    assert float(metrics2["curriculum"]) == 0.0
    assert seen["x"].shape == (16, L) and np.issubdtype(seen["x"].dtype, np.integer)
    np.testing.assert_allclose(np.asarray(seen["t"]), np.asarray(t))
    xt = processes.UniformProcess(V).sample_xt(x_rng, x0, sched.alpha(t))
    want2 = losses.masked_mean(losses.duo_loss(jnp.zeros((16, L, V)), x0, xt, t, sched))
    assert abs(float(loss2) - float(want2)) < 1e-6 * float(want2)


# ------------------------------------------------------------------------------ self-conditioning


def test_self_conditioning_second_pass_sees_the_stopped_first_prediction():
    """With probability 1 the returned logits come from a second pass given softmax(first logits) as a constant:
    the gradient is that of the second pass alone (checked against a hand-written one); with probability 0
    the second pass sees zeros."""
    w = jnp.array([[0.3, -0.2, 0.5], [0.1, 0.4, -0.3], [-0.6, 0.2, 0.2]])
    b = jnp.array([0.2, -0.1, 0.05])
    xt = jnp.array([[0, 1, 2, 1]])
    calls = []

    def apply(params, xt, t, ctx, self_cond=None):
        wp, bp = params
        sc = jnp.zeros(xt.shape + (V,)) if self_cond is None else self_cond
        calls.append(self_cond is None)
        return jax.nn.one_hot(xt, V) @ wp + sc @ wp.T + bp

    def loss(params, prob):
        fn = losses.self_conditioned_apply(lambda *a, **k: apply(params, *a, **k), jax.random.PRNGKey(0), prob)
        return jnp.sum(jnp.sin(fn(xt, None, None)))

    params = (w, b)
    first = jax.nn.one_hot(xt, V) @ w + b
    sc = jax.nn.softmax(first, -1)
    second = lambda p: jnp.sum(jnp.sin(jax.nn.one_hot(xt, V) @ p[0] + sc @ p[0].T + p[1]))
    np.testing.assert_allclose(float(loss(params, 1.0)), float(second(params)), atol=1e-12)
    g, g_want = jax.grad(loss)(params, 1.0), jax.grad(second)(params)
    for a, e in zip(g, g_want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=1e-12)
    assert calls[:2] == [True, False]
    plain = jnp.sum(jnp.sin(first))
    np.testing.assert_allclose(float(loss(params, 0.0)), float(plain), atol=1e-12)


def test_training_loss_with_self_conditioning_keeps_the_other_draws():
    """self_conditioning draws from its own stream: with a network that ignores the signal the loss equals the
    plain one (same t, same x_t); the network is called twice."""
    sched = schedules.LinearSchedule()
    den = TOY.absorbing_denoiser()
    count = []

    def apply(xt, t, ctx, self_cond=None):
        count.append(1)
        return den(xt)

    x0 = TOY.sample(jax.random.PRNGKey(0), 64)
    kw = dict(schedule=sched, vocab_size=V + 1, mask_id=MASK)
    plain, _ = losses.training_loss("mdlm", lambda xt, t, c: den(xt), x0, None, jax.random.PRNGKey(1), **kw)
    sc, _ = losses.training_loss("mdlm", apply, x0, None, jax.random.PRNGKey(1), self_conditioning=0.5, **kw)
    assert float(sc) == float(plain) and len(count) == 2


# ------------------------------------------------------------------------------ distillation


def _kl(p, q):
    return np.sum(np.where(p > 0, p * (np.log(np.maximum(p, 1e-300)) - np.log(q)), 0.0), -1)


@pytest.mark.parametrize("divergence", losses.DIVERGENCES)
def test_divergences_are_zero_for_a_perfect_student_and_the_kl_for_a_perturbed_one(divergence):
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), size=(2, 3))
    q = 0.6 * p + 0.4 * rng.dirichlet(np.ones(5), size=(2, 3))
    same = losses.distillation_divergence(jnp.log(p) + 1.7, jnp.log(p), divergence)  # logits up to a shift
    assert float(jnp.max(jnp.abs(same))) < 1e-12
    got = np.asarray(losses.distillation_divergence(jnp.log(q), jnp.log(p), divergence))
    want = _kl(q, p) if divergence == "kl_reverse" else _kl(p, q)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert np.all(want > 0)


def _absorbing_enumeration(t, sched):
    """Every (x_0, mask pattern) with its probability at time t: x0, xt [R, L], weight [R]."""
    pats = np.array(np.meshgrid(*[[0, 1]] * L, indexing="ij")).reshape(L, -1).T.astype(bool)
    x0 = np.repeat(SEQS, len(pats), axis=0)
    pat = np.tile(pats, (len(SEQS), 1))
    a = float(sched.alpha(t))
    w = np.repeat(TOY.probs, len(pats)) * a ** (L - pat.sum(1)) * (1 - a) ** pat.sum(1)
    return x0, np.where(pat, MASK, x0).astype(np.int32), w


def test_sdtt_one_teacher_step_perfect_student_zero_perturbed_exactly_its_kl():
    """With one teacher step the target is the teacher's prediction at x_t: the exact denoiser as student costs
    0 at every x_t, and a student mixed with noise costs exactly E_{x_t}[sum_masked KL(student || teacher)],
    enumerated over every x_t at three times."""
    sched = schedules.LinearSchedule()
    den = TOY.absorbing_denoiser()
    teacher = lambda x, t: den(x)
    for t in (0.3, 0.6, 0.95):
        x0, xt, w = _absorbing_enumeration(t, sched)
        xt = jnp.asarray(xt)
        tt = jnp.full((len(xt),), t)
        target, _ = losses.sdtt_target(teacher, jax.random.PRNGKey(0), xt, tt, dt=0.01, num_steps=1, schedule=sched, mask_id=MASK)
        perfect = losses.sdtt_loss(den(xt), target, xt, MASK)
        assert float(jnp.max(jnp.abs(perfect))) < 1e-9
        p = np.exp(np.asarray(den(xt)))[..., :V]
        q = 0.7 * p + 0.3 / V
        bad_logits = jnp.asarray(np.concatenate([np.log(q), np.full(q.shape[:-1] + (1,), -1e30)], -1))
        got = float(np.sum(w * np.asarray(losses.sdtt_loss(bad_logits, target, xt, MASK)).sum(1)))
        kl = np.where(np.asarray(xt) == MASK, _kl(q, p), 0.0).sum(1)
        want = float(np.sum(w * kl))
        assert want > 1e-3 and abs(got - want) < 1e-9, (got, want)


def expected_sdtt_target(den, x, ts, sched):
    """E[target] [L, V] over the teacher's draws, by enumerating each step's outcomes (numpy): at the steps
    starting at ts[0] > ts[1] > ... (each ending at the next, the last at ts[-1] - (ts[0] - ts[1])), every masked
    position independently stays masked or is revealed with probability (alpha(s) - alpha(t)) / (1 - alpha(t))
    as a draw from the teacher's prediction; its target is the prediction of the step that reveals it, else of
    the last step."""
    p = np.exp(np.asarray(den(jnp.asarray(x)[None]))[0, :, :V])
    masked = [l for l in range(L) if x[l] == MASK]
    if len(ts) == 1:
        return p
    dt = ts[0] - ts[1]
    a_t, a_s = float(sched.alpha(ts[0])), float(sched.alpha(ts[0] - dt))
    c = (a_s - a_t) / (1 - a_t)
    out = np.zeros((L, V))
    for outcome in np.ndindex(*[V + 1] * len(masked)):  # V = stays masked, else the revealed token
        prob, nxt = 1.0, np.array(x)
        for l, o in zip(masked, outcome):
            prob *= (1 - c) if o == V else c * p[l, o]
            nxt[l] = MASK if o == V else o
        if prob == 0:
            continue
        later = expected_sdtt_target(den, nxt, ts[1:], sched)
        out += prob * np.where((nxt != MASK)[:, None], p, later)
    return out


def test_sdtt_target_mean_is_the_enumerated_several_step_teacher_output():
    """Over the teacher's draws the mean target at each masked position is the enumerated expectation of the
    teacher's several-step output (expected_sdtt_target), for 2 and 3 steps. It is not p(x_0 | x_t): a step
    reveals several tokens independently from their marginals, so the exact denoiser's several-step target is
    biased (here by 1.1e-3 and 2.0e-3 in probability at 2 and 3 steps): the factorisation error SDTT's student learns to absorb."""
    sched = schedules.LinearSchedule()
    den = TOY.absorbing_denoiser()
    n = 20000
    x = np.array([MASK, 1, MASK, MASK])
    xt = jnp.asarray(np.tile(x, (n, 1)))
    t, dt = 0.8, 0.15
    posterior = np.exp(np.asarray(den(xt[:1])))[0, :, :V]
    for k in (2, 3):
        target, x_end = losses.sdtt_target(
            lambda x, tt: den(x), jax.random.PRNGKey(k), xt, jnp.full((n,), t), dt=dt, num_steps=k,
            schedule=sched, mask_id=MASK,
        )
        assert np.all(np.asarray(x_end)[:, 1] == 1)  # known tokens stay
        # Each of the 3 masked positions is still masked with prob. prod_k (1 - c_k) = (1 - alpha(t - k dt)) /
        # (1 - alpha(t)): the reveal probabilities of the steps (linear schedule: alpha = 1 - t).
        still = np.asarray(x_end)[:, [0, 2, 3]] == MASK
        p_still = (t - k * dt) / t
        assert abs(still.mean() - p_still) < 4 * math.sqrt(p_still * (1 - p_still) / still.size), (k, still.mean())
        want = expected_sdtt_target(den, x, [t - j * dt for j in range(k)], sched)
        probs = np.exp(np.asarray(target))[:, :, :V]
        for l in (0, 2, 3):
            se = np.sqrt(np.var(probs[:, l], axis=0) / n) + 1e-12
            assert np.all(np.abs(probs[:, l].mean(0) - want[l]) < 4.5 * se), (k, l, probs[:, l].mean(0), want[l])
        assert np.max(np.abs(want - posterior)[[0, 2, 3]]) > 5e-4  # the bias the claim of unbiasedness missed


def test_dcd_pair_shares_its_noise_and_a_perfect_student_costs_nothing_at_dt_zero():
    relax = processes.GaussianRelaxation(V, gamma_min=-3.0, gamma_max=3.0)
    x0 = TOY.sample(jax.random.PRNGKey(0), 512)
    t = jax.random.uniform(jax.random.PRNGKey(1), (512,))
    xt, xs, t_hi, s = losses.dcd_pair(jax.random.PRNGKey(2), x0, t, 0.0, relax)
    assert bool(jnp.all(xt == xs)) and bool(jnp.all(t_hi == s))
    xt, xs, t_hi, s = losses.dcd_pair(jax.random.PRNGKey(2), x0, t, 0.25, relax)
    np.testing.assert_allclose(np.asarray(t_hi - s), 0.25, atol=1e-12)
    assert float(jnp.min(t_hi)) >= 0.25
    # Less noise at s: x_s agrees with x_0 at least as often, and where x_t is clean so is x_s far more often
    # than an independent draw would be (the shared eps).
    agree_t, agree_s = float(jnp.mean(xt == x0)), float(jnp.mean(xs == x0))
    assert agree_s > agree_t
    both = float(jnp.mean((xt == x0) & (xs == x0)))
    assert both > 0.99 * agree_t


def test_distillation_step_sizes_grow_by_round():
    """SDTT: 1024 -> 512 -> 256 teacher steps every 10k updates (dt = (1 - eps) k^r / 1024); DCD: dt = 2^r / T."""
    got = [float(losses.sdtt_dt(s)) for s in (0, 9_999, 10_000, 25_000)]
    np.testing.assert_allclose(got, np.array([1, 1, 2, 4]) * (1 - 1e-3) / 1024, rtol=1e-6)
    got = [float(losses.dcd_dt(s, base_steps=512, update_teacher_every=100)) for s in (0, 99, 100, 350)]
    np.testing.assert_allclose(got, np.array([1, 1, 2, 8]) / 512, rtol=1e-6)
