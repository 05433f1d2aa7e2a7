"""Losses, proven exact on a toy distribution with its exact (oracle) denoiser.

All sequences of length L = 4 over V = 3 tokens carry fixed random probabilities (tests/oracle.py). In
float64 we enumerate every (x_0, x_t) pair with its exact probability and integrate over t with
Gauss-Legendre quadrature, so the NELBO of each loss evaluated with the oracle is computed exactly
and compared with independent quantities: the data entropy H, the mutual information I(x_0; x_1) that
a schedule with alpha(1) > 0 leaves behind, the KL of a wrong denoiser, the sum of marginal entropies
(one-step bound). The Monte-Carlo estimators used for training must be unbiased for those values.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import oracle
from ddlm import losses, schedules

TOY = oracle.ToyDistribution(num_tokens=3, length=4, seed=0)
V, L, MASK = TOY.num_tokens, TOY.length, TOY.mask_id
H = TOY.entropy()
FULL_SCHEDULES = [
    schedules.LinearSchedule(),
    schedules.CosineSchedule(),
    schedules.PolynomialSchedule(power=2.0),
    schedules.LogLinearSchedule(eps=0.0),
]


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def gauss_legendre(n):
    x, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * (x + 1.0), 0.5 * w


# ------------------------------------------------------------------------------ enumeration helpers


@functools.lru_cache(maxsize=None)
def absorbing_pairs():
    """Every (x_0, mask pattern): x0, xt [N * 2^L, L], p(x0), number of masked positions."""
    patterns = np.array(list(itertools.product([0, 1], repeat=L)), dtype=bool)
    x0 = np.repeat(TOY.seqs, len(patterns), axis=0)
    pat = np.tile(patterns, (len(TOY.seqs), 1))
    xt = np.where(pat, MASK, x0).astype(np.int32)
    px0 = np.repeat(TOY.probs, len(patterns))
    return x0, xt, px0, pat.sum(1)


@functools.lru_cache(maxsize=None)
def oracle_logp():
    """log p(x_0^l | x_t) for every absorbing pair: [rows, L, V + 1] (mask column ~ -690)."""
    _, xt, _, _ = absorbing_pairs()
    return np.asarray(TOY.absorbing_denoiser()(jnp.asarray(xt)))


def absorbing_expectation(per_token_fn, t_nodes, schedule, logits=None):
    """E_{x0, x_t ~ q_t}[sum_l loss_l] at each t in t_nodes (alpha from `schedule`), exactly."""
    x0, xt, px0, m = absorbing_pairs()
    logits = jnp.asarray(oracle_logp() if logits is None else logits)
    x0, xt = jnp.asarray(x0), jnp.asarray(xt)

    @jax.jit
    def at(t):
        a = schedule.alpha(t)
        prob = jnp.asarray(px0) * a ** (L - jnp.asarray(m)) * (1 - a) ** jnp.asarray(m)
        per = per_token_fn(logits, x0, xt, jnp.full((x0.shape[0],), t))
        return jnp.sum(prob * jnp.sum(per, axis=1))

    return np.array([float(at(jnp.float64(t))) for t in t_nodes])


def integrate(per_token_fn, schedule, n=64, logits=None):
    t, w = gauss_legendre(n)
    return float(np.sum(w * absorbing_expectation(per_token_fn, t, schedule, logits)))


def mdlm(schedule):
    return lambda lg, x0, xt, t: losses.mdlm_loss(lg, x0, xt, t, schedule, MASK)


def oracle_sedd_absorbing_score(schedule):
    """The exact score p_t(x_t^{l<-y})/p_t(x_t) = alpha/(1-alpha) p(x_0^l = y | x_t), in logs."""

    def fn(lg, x0, xt, t):
        a = schedule.alpha(t)[:, None, None]
        return losses.score_entropy_absorbing_loss(lg + jnp.log(a / (1 - a)), x0, xt, t, schedule, MASK)

    return fn


# ------------------------------------------------------------------------------ oracle NELBO == entropy


@pytest.mark.parametrize("schedule", FULL_SCHEDULES, ids=repr)
def test_mdlm_oracle_nelbo_equals_entropy(schedule):
    nelbo = integrate(mdlm(schedule), schedule, n=96)
    assert abs(nelbo - H) < 1e-6, (nelbo, H)


@pytest.mark.parametrize("schedule", FULL_SCHEDULES[:2], ids=repr)
def test_sedd_absorbing_oracle_nelbo_equals_entropy(schedule):
    nelbo = integrate(oracle_sedd_absorbing_score(schedule), schedule, n=96)
    assert abs(nelbo - H) < 1e-6, (nelbo, H)


def test_sedd_absorbing_parameterisation_reaches_oracle_score():
    """SEDD's network parameterisation (shift by log(e^sigma - 1) + log(V - 1)) maps log p + log(V-1) to
    the exact score; its loss then equals the MDLM loss token by token (RADD Thm. 1)."""
    sched = schedules.LogLinearSchedule()
    x0, xt, _, _ = absorbing_pairs()
    x0, xt = jnp.asarray(x0), jnp.asarray(xt)
    t = jnp.full((x0.shape[0],), 0.37)
    logits = jnp.asarray(oracle_logp()) + math.log(V + 1 - 1)
    log_score = losses.sedd_absorbing_log_score(logits, t, sched)
    mdlm_per_token = losses.mdlm_loss(jnp.asarray(oracle_logp()), x0, xt, t, sched, MASK)
    np.testing.assert_allclose(
        losses.score_entropy_absorbing_loss(log_score, x0, xt, t, sched, MASK),
        mdlm_per_token,
        rtol=1e-9,
        atol=1e-9,
    )
    # Plain log p (without + log(V - 1)) is not the exact score: a larger loss, as the docstring warns.
    plain = losses.score_entropy_absorbing_loss(
        losses.sedd_absorbing_log_score(jnp.asarray(oracle_logp()), t, sched), x0, xt, t, sched, MASK
    )
    assert float(jnp.sum(plain)) > float(jnp.sum(mdlm_per_token)) + 1.0
    # The time-free form the samplers take: log c = log p for the same output.
    np.testing.assert_allclose(losses.sedd_absorbing_log_cond(logits), oracle_logp(), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("eps", [1e-3, 0.05])
def test_loglinear_eps_gap_is_the_boundary_term(eps):
    """With alpha(1) = eps > 0 the integral stops short: NELBO = H - I(x_0; x_1), x_1 ~ q(. | alpha = eps).
    A missing (1 - eps) factor in alpha' would scale the NELBO by 1/(1 - eps) and fail."""
    sched = schedules.LogLinearSchedule(eps=eps)
    boundary = TOY.mutual_information(TOY.absorbing_kernel(eps))
    assert boundary > 1e-4  # the term is material: the test can tell
    for fn in [mdlm(sched), oracle_sedd_absorbing_score(sched)]:
        nelbo = integrate(fn, sched, n=16)
        assert abs(nelbo - (H - boundary)) < 1e-6, (nelbo, H, boundary)
    wrong = integrate(mdlm(sched), sched, n=16) / (1 - eps)  # what a dropped (1 - eps) would give
    assert abs(wrong - (H - boundary)) > 1e-3


def test_radd_lambda_dce_oracle_equals_entropy():
    """RADD's loss integrates over the masking rate lambda = 1 - alpha directly (linear in lambda)."""
    fn = lambda lg, x0, xt, t: losses.radd_loss(lg, x0, xt, t, MASK)
    nelbo = integrate(fn, schedules.LinearSchedule(), n=8)  # mask prob at "t" is t: lambda = t
    assert abs(nelbo - H) < 1e-9, (nelbo, H)


def test_radd_any_order_oracle_equals_entropy():
    """E_{k ~ U{1..L}} E_{|mask| = k} [L/k sum CE] = H, by enumerating k and all masks of size k."""
    x0, xt, px0, m = absorbing_pairs()
    per = np.asarray(
        losses.radd_any_order_loss(jnp.asarray(oracle_logp()), jnp.asarray(x0), jnp.asarray(xt), MASK)
    )
    total = 0.0
    for k in range(1, L + 1):
        sel = m == k
        total += (1 / L) * np.sum(px0[sel] * per[sel].sum(1)) / math.comb(L, k)
    assert abs(total - H) < 1e-9, (total, H)


def test_sample_any_order_mask_counts_uniform():
    mask = losses.sample_any_order_mask(jax.random.PRNGKey(0), 40_000, L)
    counts = np.bincount(np.asarray(mask.sum(1)), minlength=L + 1)
    assert counts[0] == 0
    np.testing.assert_allclose(counts[1:] / 40_000, 1 / L, atol=0.015)
    # within a given k, every position equally likely
    np.testing.assert_allclose(np.asarray(mask.mean(0)), (L + 1) / (2 * L), atol=0.015)


# ------------------------------------------------------------------------------ wrong denoiser, discrete time


def test_wrong_denoiser_costs_exactly_the_kl():
    """Mixing the oracle with uniform noise raises the NELBO by int w(t) E[sum_masked KL(p || q')] dt,
    computed here from the KL directly."""
    sched = schedules.CosineSchedule()
    p = np.exp(oracle_logp())[..., :V]
    q = 0.7 * p + 0.3 / V
    wrong_logits = np.concatenate([np.log(q), np.full(q.shape[:-1] + (1,), -1e30)], axis=-1)
    x0, xt, px0, m = absorbing_pairs()
    kl = np.sum(p * (np.log(np.maximum(p, 1e-300)) - np.log(q)), axis=-1)  # [rows, L]
    kl = np.where(xt == MASK, kl, 0.0).sum(1)
    t, w = gauss_legendre(96)
    a = np.asarray(sched.alpha(jnp.asarray(t)))
    wt = np.asarray(sched.mdlm_weight(jnp.asarray(t)))
    expected_gap = sum(
        wk * wtk * np.sum(px0 * ak ** (L - m) * (1 - ak) ** m * kl) for wk, wtk, ak in zip(w, wt, a)
    )
    gap = integrate(mdlm(sched), sched, n=96, logits=wrong_logits) - H
    assert expected_gap > 0.05
    assert abs(gap - expected_gap) < 1e-6, (gap, expected_gap)


def discrete_bound(num_steps, sched):
    fn = lambda lg, x0, xt, t: losses.d3pm_absorbing_loss(lg, x0, xt, t, sched, MASK, num_steps)
    grid = np.arange(1, num_steps + 1) / num_steps
    return float(np.mean(absorbing_expectation(fn, grid, sched)))


def test_discrete_time_bound_decreases_to_continuous():
    sched = schedules.LinearSchedule()
    bounds = [discrete_bound(T, sched) for T in (1, 2, 4, 8, 32, 256)]
    # One step from all-mask: each position predicted from nothing: sum of marginal entropies.
    assert abs(bounds[0] - TOY.marginal_entropies().sum()) < 1e-9
    assert all(b1 > b2 for b1, b2 in zip(bounds, bounds[1:])), bounds
    assert bounds[-1] > H - 1e-9
    assert bounds[-1] - H < 0.01 * (bounds[0] - H), bounds


# ------------------------------------------------------------------------------ uniform graph (SEDD)


def uniform_diffusion_term(sched, n):
    """int_0^1 E[sum_l DSE_l] dt with the exact uniform-graph scores, by enumerating (x_0, x_t)."""
    seqs = jnp.asarray(TOY.seqs)
    nx = len(TOY.seqs)
    x0 = jnp.repeat(seqs, nx, axis=0)
    xt = jnp.tile(seqs, (nx, 1))

    @jax.jit
    def at(t):
        a = sched.alpha(t)
        scores = TOY.uniform_log_score(seqs, jnp.full((nx,), a))  # [nx (x_t), L, V]
        log_score = jnp.tile(scores, (nx, 1, 1))
        per = losses.score_entropy_uniform_loss(log_score, x0, xt, jnp.full((nx * nx,), t), sched)
        per_tok = jnp.where(xt == x0, a + (1 - a) / V, (1 - a) / V)
        prob = jnp.repeat(jnp.asarray(TOY.probs), nx) * jnp.prod(per_tok, axis=1)
        return jnp.sum(prob * per.sum(1))

    t, w = gauss_legendre(n)
    return float(sum(wk * at(jnp.float64(tk)) for tk, wk in zip(t, w)))


def test_sedd_uniform_oracle_nelbo():
    """Geometric schedule (sigma from 1e-4 to 20): the diffusion term equals I(x0; x_0') - I(x0; x_1)
    (mutual information lost along the path); adding the reconstruction and prior terms gives the NELBO
    H + KL(q(x_1) || uniform)."""
    sched = schedules.GeometricSchedule(sigma_min=1e-4, sigma_max=20.0)
    k0 = TOY.uniform_kernel(math.exp(-1e-4))
    k1 = TOY.uniform_kernel(math.exp(-20.0))
    i0, i1 = TOY.mutual_information(k0), TOY.mutual_information(k1)
    diff = uniform_diffusion_term(sched, n=160)
    assert abs(diff - (i0 - i1)) < 1e-6, (diff, i0 - i1)
    recon = H - i0  # E[-log p(x0 | x_0')] with the exact posterior = H(x0 | x_0')
    joint1 = TOY.probs[:, None] * k1
    prior = float(np.sum(joint1 * np.log(k1 * len(TOY.seqs))))  # E_x0 KL(q(x_1|x_0) || uniform)
    q1 = joint1.sum(0)
    kl_marginal = float(np.sum(q1 * np.log(q1 * len(TOY.seqs))))
    assert abs(diff + recon + prior - (H + kl_marginal)) < 1e-6


# ------------------------------------------------------------------------------ boundary terms (alpha(0) < 1, alpha(1) > 0)

ABSORBING_LOSSES = ("mdlm", "d3pm", "sedd_absorb", "bd3lm", "sft")


def _kl_rows(p, q):
    """sum_j p_j log(p_j / q_j) over the last axis (0 log 0 = 0)."""
    p, q = np.broadcast_arrays(p, q)
    pos = p > 0
    return np.sum(np.where(pos, p * np.log(np.where(pos, p, 1.0) / np.where(pos, q, 1.0)), 0.0), axis=-1)


def _absorbing_decoder_and_prior(a1):
    """The fixed decoder and prior the absorbing boundary terms assume, over whole sequences: dec [x_0, x_t] =
    prod_l (1/V if x_t^l is the mask, else 1[x_t^l = x_0^l]) (a token still masked at t = 0 is decoded uniformly,
    md4's recon_loss) and prior [x_1] = prod_l (1 - a1 if x_1^l is the mask, else a1 / V)."""
    x0, xt = TOY.seqs[:, None, :], TOY.abs_states[None, :, :]
    dec = np.prod(np.where(xt == MASK, 1.0 / V, (xt == x0).astype(float)), axis=-1)
    prior = np.prod(np.where(TOY.abs_states == MASK, 1.0 - a1, a1 / V), axis=-1)
    return dec, prior


@pytest.mark.parametrize(
    "sched", [schedules.CosineSchedule(eps=0.05), schedules.LinearSchedule(eps=0.1)], ids=repr
)
def test_absorbing_boundary_terms_when_alpha0_is_below_one(sched):
    """alpha(0) = 1 - eps < 1 and alpha(1) = eps > 0: both boundary terms are material. By enumeration over every
    (x_0, x_t) of the toy, the reconstruction term E[-log dec(x_0 | x_{t=0})] and the prior term
    E KL(q(x_1 | x_0) || prior) are L times the per-token values `boundary_terms` gives every absorbing loss
    (log V, not log(V + 1): the mask is no data id). With the exact denoiser the diffusion term (quadrature) is
    I(x_0; x_{t=0}) - I(x_0; x_1), and the whole bound is the entropy plus the two gaps a fixed decoder and a
    fixed prior leave: H + E_{x_0'} KL(q(x_0 | x_0') || dec(. | x_0')) + KL(q(x_1) || prior)."""
    a0, a1 = float(sched.alpha(0.0)), float(sched.alpha(1.0))
    assert a0 < 0.96 and a1 > 0.04
    p = TOY.probs
    k0, k1 = TOY.absorbing_kernel(a0), TOY.absorbing_kernel(a1)  # q(x_t | x_0): [N, M]
    dec, prior = _absorbing_decoder_and_prior(a1)
    recon = -np.sum(p[:, None] * k0 * np.log(np.where(k0 > 0, dec, 1.0)))
    prior_term = float(np.sum(p * _kl_rows(k1, prior[None])))
    for name in ABSORBING_LOSSES:
        got_prior, got_recon = losses.boundary_terms(name, sched, V + 1)
        np.testing.assert_allclose(L * float(got_recon), recon, rtol=1e-9, err_msg=name)
        np.testing.assert_allclose(L * float(got_prior), prior_term, rtol=1e-9, err_msg=name)

    diffusion = integrate(mdlm(sched), sched, n=64)
    i0, i1 = TOY.mutual_information(k0), TOY.mutual_information(k1)
    assert abs(diffusion - (i0 - i1)) < 1e-8, (diffusion, i0 - i1)
    assert abs(integrate(oracle_sedd_absorbing_score(sched), sched, n=64) - diffusion) < 1e-8
    q0, q1 = p @ k0, p @ k1  # the marginals of x_{t=0} and x_1
    posterior = p[:, None] * k0 / np.where(q0 > 0, q0, 1.0)  # q(x_0 | x_{t=0}): [N, M]
    decoder_gap = float(np.sum(q0 * _kl_rows(posterior.T, dec.T)))
    prior_gap = float(_kl_rows(q1, prior))
    assert decoder_gap > 1e-3 and prior_gap > 1e-3  # both gaps are material: the test can tell
    assert abs(diffusion + recon + prior_term - (H + decoder_gap + prior_gap)) < 1e-8


def test_uniform_boundary_terms_against_enumeration():
    """The uniform graph with sigma(0) = 0.05 and sigma(1) = 1 (alpha(0) < 1, alpha(1) = e^-1 > 0): the decoder is
    the kernel itself, dec(x_0 | x_0') = q(x_0' | x_0) (symmetric); by enumeration the reconstruction and prior
    terms are L times `boundary_terms('sedd_uniform')`, and with the exact scores the bound is
    H + E KL(q(x_0 | x_0') || dec) + KL(q(x_1) || uniform)."""
    sched = schedules.GeometricSchedule(sigma_min=0.05, sigma_max=1.0)
    p, n = TOY.probs, len(TOY.seqs)
    k0 = TOY.uniform_kernel(float(sched.alpha(0.0)))  # [N, N]
    k1 = TOY.uniform_kernel(float(sched.alpha(1.0)))
    recon = -np.sum(p[:, None] * k0 * np.log(k0))
    prior_term = float(np.sum(p * _kl_rows(k1, np.full(n, 1.0 / n))))
    got_prior, got_recon = losses.boundary_terms("sedd_uniform", sched, V)
    np.testing.assert_allclose(L * float(got_recon), recon, rtol=1e-9)
    np.testing.assert_allclose(L * float(got_prior), prior_term, rtol=1e-9)

    diffusion = uniform_diffusion_term(sched, n=96)
    q0, q1 = p @ k0, p @ k1
    posterior = p[:, None] * k0 / q0
    decoder_gap = float(np.sum(q0 * _kl_rows(posterior.T, k0.T)))
    prior_gap = float(_kl_rows(q1, np.full(n, 1.0 / n)))
    assert decoder_gap > 1e-3 and prior_gap > 1e-3
    assert abs(diffusion + recon + prior_term - (H + decoder_gap + prior_gap)) < 1e-7


def test_boundary_terms_vanish_exactly_where_the_schedule_spans_zero_to_one():
    """alpha(0) = 1 and alpha(1) = 0: no boundary term for any loss; 'radd' and 'ar' never have one; an unknown
    loss name is an error."""
    for name in ABSORBING_LOSSES:
        assert [float(x) for x in losses.boundary_terms(name, schedules.LinearSchedule(), V + 1)] == [0.0, 0.0]
    loglinear = schedules.LogLinearSchedule(eps=0.01)  # alpha(0) = 1 exactly: a prior term only
    prior, recon = losses.boundary_terms("mdlm", loglinear, V + 1)
    assert float(recon) == 0.0 and float(prior) == pytest.approx(0.01 * math.log(V), rel=1e-12)
    for name in ("radd", "ar"):
        assert losses.boundary_terms(name, schedules.CosineSchedule(eps=0.05), V + 1) == (0.0, 0.0)
    with pytest.raises(ValueError, match="unknown loss 'vlb'"):
        losses.boundary_terms("vlb", schedules.LinearSchedule(), V + 1)


# ------------------------------------------------------------------------------ block diffusion


def test_block_size_one_equals_autoregressive_nll_for_any_denoiser():
    """With block_size = 1, a block-causal denoiser sees the clean prefix and one masked token: its
    NELBO is exactly the AR NLL of the same conditionals r(x_l | x_<l) (int -alpha' dt = 1)."""
    rng = np.random.default_rng(3)
    tables = [rng.dirichlet(np.ones(V), size=V**l) for l in range(L)]  # r(. | prefix) per prefix index

    def cond_logits(x0):  # [rows, L, V + 1]: log r(. | x0_<l) at every l
        out = []
        for l in range(L):
            idx = np.zeros(len(x0), dtype=int)
            for j in range(l):
                idx = idx * V + x0[:, j]
            out.append(np.log(tables[l][idx]))
        lg = np.stack(out, axis=1)
        return np.concatenate([lg, np.full(lg.shape[:-1] + (1,), -1e30)], axis=-1)

    x0, xt, px0, _ = absorbing_pairs()
    sched = schedules.LinearSchedule()
    fn = lambda lg, x0_, xt_, t: losses.block_diffusion_loss(
        lg, x0_, xt_, jnp.broadcast_to(t[:, None], x0_.shape), sched, MASK, 1
    )
    nelbo = integrate(fn, sched, n=4, logits=cond_logits(x0))
    # AR: prepend a BOS (the mask id), logits at j predict token j + 1.
    seqs = TOY.seqs
    ar_logits = np.concatenate([cond_logits(seqs), np.zeros((len(seqs), 1, V + 1))], axis=1)
    tokens = np.concatenate([np.full((len(seqs), 1), MASK), seqs], axis=1).astype(np.int32)
    ar = np.asarray(losses.autoregressive_loss(jnp.asarray(ar_logits), jnp.asarray(tokens))).sum(1)
    ar_nll = float(np.sum(TOY.probs * ar))
    assert abs(nelbo - ar_nll) < 1e-9, (nelbo, ar_nll)
    assert ar_nll > H + 0.1  # a random denoiser, far from the data


def test_block_size_length_equals_mdlm():
    rng = jax.random.PRNGKey(0)
    lg = jax.random.normal(rng, (5, 8, 7))
    x0 = jax.random.randint(jax.random.PRNGKey(1), (5, 8), 0, 6)
    xt = jnp.where(jax.random.bernoulli(jax.random.PRNGKey(2), 0.5, (5, 8)), 6, x0)
    t = jax.random.uniform(jax.random.PRNGKey(3), (5,))
    sched = schedules.LogLinearSchedule()
    np.testing.assert_array_equal(
        losses.block_diffusion_loss(lg, x0, xt, t[:, None], sched, 6, 8),
        losses.mdlm_loss(lg, x0, xt, t, sched, 6),
    )


@functools.lru_cache(maxsize=None)
def block_oracle_logits(block_size):
    """p(x_0^l | clean blocks < b, x_t^b) for each absorbing pair: condition on a state whose earlier
    blocks are clean, block b is x_t and later blocks are masked (so they are marginalised out)."""
    x0, xt, _, _ = absorbing_pairs()
    den = TOY.absorbing_denoiser()
    out = np.zeros(x0.shape + (V + 1,))
    for b in range(L // block_size):
        lo, hi = b * block_size, (b + 1) * block_size
        state = np.full_like(x0, MASK)
        state[:, :lo] = x0[:, :lo]
        state[:, lo:hi] = xt[:, lo:hi]
        out[:, lo:hi] = np.asarray(den(jnp.asarray(state)))[:, lo:hi]
    return out


def test_block_diffusion_oracle_equals_entropy():
    sched = schedules.CosineSchedule()
    fn = lambda lg, x0, xt, t: losses.block_diffusion_loss(
        lg, x0, xt, jnp.broadcast_to(t[:, None], (x0.shape[0], L // 2)), sched, MASK, 2
    )
    nelbo = integrate(fn, sched, n=96, logits=block_oracle_logits(2))
    assert abs(nelbo - H) < 1e-6, (nelbo, H)


def test_block_diffusion_rejects_bad_block_size():
    lg = jnp.zeros((2, 6, 5))
    x = jnp.zeros((2, 6), jnp.int32)
    with pytest.raises(ValueError, match="block_size must divide seq_len=6"):
        losses.block_diffusion_loss(lg, x, x, jnp.zeros((2, 2)), schedules.LinearSchedule(), 4, 4)


# ------------------------------------------------------------------------------ Monte-Carlo estimators


def oracle_apply(kind, sched=None):
    if kind == "absorbing":
        den = TOY.absorbing_denoiser()
        return lambda xt, t, ctx: den(xt)
    if kind == "sedd_absorb":  # the network output SEDD's parameterisation turns into the exact score
        den = TOY.absorbing_denoiser()
        return lambda xt, t, ctx: den(xt) + math.log(V)
    if kind == "uniform":
        return lambda xt, t, ctx: TOY.uniform_log_score(xt, sched.alpha(t))
    if kind == "block2":
        den = TOY.absorbing_denoiser()

        def apply(xt, t, x0):
            b0 = jnp.concatenate([xt[:, :2], jnp.full_like(xt[:, 2:], MASK)], axis=1)
            b1 = jnp.concatenate([x0[:, :2], xt[:, 2:]], axis=1)
            return jnp.concatenate([den(b0)[:, :2], den(b1)[:, 2:]], axis=1)

        return apply
    if kind == "ar":  # exact conditionals p(x_{l+1} | x_<=l)
        table = np.zeros((L, V**L, V + 1)) - 1e30
        for l in range(L - 1):
            for idx, s in enumerate(TOY.seqs):
                prefix = s[: l + 1]
                sel = np.all(TOY.seqs[:, : l + 1] == prefix, axis=1)
                cond = np.bincount(TOY.seqs[sel, l + 1], weights=TOY.probs[sel], minlength=V)
                table[l, idx, :V] = np.log(cond / cond.sum())
        table = jnp.asarray(table)
        return lambda xt, t, ctx: table[jnp.arange(L)[None, :], TOY.index(xt)[:, None]]
    raise ValueError(kind)


def mc_estimate(name, apply_fn, sched, num_batches=48, batch=512, vocab_size=V + 1, **kw):
    """Mean and standard error of `num_batches` training_loss estimates on exact samples of the toy."""

    @jax.jit
    def one(key):
        k1, k2 = jax.random.split(key)
        x0 = TOY.sample(k1, batch)
        loss, _ = losses.training_loss(
            name, apply_fn, x0, None, k2, schedule=sched, vocab_size=vocab_size, mask_id=MASK, **kw
        )
        return loss

    vals = np.array([float(one(k)) for k in jax.random.split(jax.random.PRNGKey(7), num_batches)])
    return vals.mean(), vals.std(ddof=1) / math.sqrt(num_batches)


def _exact_mdlm_eps():
    eps = 1e-3
    return (H - TOY.mutual_information(TOY.absorbing_kernel(eps))) / L


@pytest.mark.parametrize(
    "name,kind,sched,kw,exact",
    [
        ("mdlm", "absorbing", schedules.LogLinearSchedule(eps=1e-3), {}, _exact_mdlm_eps),
        ("mdlm", "absorbing", schedules.CosineSchedule(), {"antithetic": False}, lambda: H / L),
        ("sedd_absorb", "sedd_absorb", schedules.LogLinearSchedule(eps=1e-3), {}, _exact_mdlm_eps),
        ("radd", "absorbing", None, {}, lambda: H / L),
        (
            "d3pm",
            "absorbing",
            schedules.LinearSchedule(),
            {"num_steps": 4},
            lambda: discrete_bound(4, schedules.LinearSchedule()) / L,
        ),
        ("bd3lm", "block2", schedules.LinearSchedule(), {"block_size": 2}, lambda: H / L),
        ("ar", "ar", None, {}, lambda: (H - TOY.marginal_entropies()[0]) / (L - 1)),
    ],
    ids=["mdlm-loglinear", "mdlm-cosine-iid", "sedd_absorb", "radd", "d3pm-T4", "bd3lm-B2", "ar"],
)
def test_monte_carlo_estimators_are_unbiased(name, kind, sched, kw, exact):
    mean, se = mc_estimate(name, oracle_apply(kind, sched), sched, **kw)
    target = exact()
    assert se > 0
    assert abs(mean - target) < 4 * se, (name, mean, target, se)


def test_monte_carlo_sedd_uniform_is_unbiased():
    """The uniform graph has V = 3 real tokens and no mask: the network scores exactly V columns. (With
    vocab_size = V + 1 the forward process drew an id the score cannot hold: biased by ~0.08 nats/token,
    which this test's 4 SE window of ~0.04 now catches; training_loss rejects that shape anyway.)"""
    sched = schedules.GeometricSchedule()
    mean, se = mc_estimate(
        "sedd_uniform", oracle_apply("uniform", sched), sched, num_batches=64, batch=512, vocab_size=V
    )
    target = uniform_diffusion_term(sched, n=160) / L
    assert 4 * se < 0.05, se  # tight enough to see a 0.08 nats/token bias
    assert abs(mean - target) < 4 * se, (mean, target, se)


class _LogLinearWeightOnCosine(schedules.CosineSchedule):
    """A plausible bug: the log-linear schedule's NELBO weight 1/t paired with the cosine alpha(t) (the right
    weight is -alpha'/(1 - alpha) = pi/2 tan(pi/2 (1 - t)), ~1/t only near t = 0)."""

    def mdlm_weight(self, t):
        return 1.0 / t


class _ScaledWeight(schedules.CosineSchedule):
    """The cosine schedule with its NELBO weight 10% too large (a wrong constant)."""

    def mdlm_weight(self, t):
        return 1.1 * super().mdlm_weight(t)


@pytest.mark.parametrize("wrong", [_LogLinearWeightOnCosine(), _ScaledWeight()], ids=["1/t", "1.1x"])
def test_estimator_detects_a_wrong_weight(wrong):
    """The unbiasedness test above (|mean - exact| < 4 SE), run on training_loss with a wrong weight, fails:
    the estimate lands more than 6 SE from the exact H / L, which the right cosine weight meets
    (test_monte_carlo_estimators_are_unbiased[mdlm-cosine-iid])."""
    den = TOY.absorbing_denoiser()
    mean, se = mc_estimate("mdlm", lambda xt, t, c: den(xt), wrong)
    assert abs(mean - H / L) > 6 * se, (mean, H / L, se)


# ------------------------------------------------------------------------------ time draws and the auxiliary metrics


def test_sample_times_antithetic_grid_and_uniform_marginals():
    """Antithetic times are one uniform offset plus i/B (sorted, they are B apart by exactly 1/B), and every t_i
    is still U[0, 1) (mean 1/2, variance 1/12: the estimators stay unbiased); i.i.d. times are not on a grid."""
    keys = jax.random.split(jax.random.key(0), 4000)
    for antithetic in (True, False):
        t = np.asarray(jax.jit(jax.vmap(lambda k, a=antithetic: losses.sample_times(k, 8, a)))(keys))
        assert t.shape == (4000, 8) and t.dtype == np.float32 and (t >= 0).all() and (t < 1).all()
        se = math.sqrt(1 / 12 / len(t))
        assert np.all(np.abs(t.mean(0) - 0.5) < 4 * se), t.mean(0)
        assert np.all(np.abs(t.var(0) - 1 / 12) < 4 * math.sqrt(1 / 180 / len(t))), t.var(0)
        gaps = np.diff(np.sort(t, axis=1), axis=1)
        if antithetic:
            np.testing.assert_allclose(gaps, 1 / 8, atol=1e-6)
            np.testing.assert_allclose(np.mod(t - t[:, :1] - np.arange(8) / 8 + 0.5, 1.0), 0.5, atol=1e-6)
        else:
            assert np.abs(gaps - 1 / 8).max() > 0.1
            assert abs(np.corrcoef(t[:, 0], t[:, 1])[0, 1]) < 4 / math.sqrt(len(t))


def test_discretize_times_maps_onto_the_grid():
    t = jnp.array([0.0, 0.1, 0.2499, 0.25, 0.5, 0.74, 0.9999])
    np.testing.assert_allclose(losses.discretize_times(t, 4), [0.25, 0.25, 0.25, 0.5, 0.75, 0.75, 1.0])


def _seen_by_network(name, x0, loss_mask, *, sched, vocab_size, network=None, **kw):
    """training_loss(name) jitted once, with `network` (zero logits by default): key -> (loss, aux, and the x_t, t
    and logits the network saw and gave)."""
    network = network or (lambda xt, t: jnp.zeros(xt.shape + (vocab_size,), jnp.float32))

    @jax.jit
    def run(key):
        seen = {}

        def apply_fn(xt, t, ctx):
            seen.update(xt=xt, t=t, logits=network(xt, t), ctx=ctx)
            return seen["logits"]

        loss, aux = losses.training_loss(
            name, apply_fn, x0, loss_mask, key, schedule=sched, vocab_size=vocab_size, mask_id=MASK, **kw
        )
        return loss, aux, seen["xt"], seen["t"], seen["logits"], seen["ctx"]

    def call(key):
        loss, aux, xt, t, logits, ctx = run(key)
        return aux, np.asarray(xt), None if t is None else np.asarray(t), (loss, logits, ctx)

    return call


AUX_KW = {"mdlm": {}, "d3pm": {"num_steps": 4}, "sedd_absorb": {}, "radd": {}, "bd3lm": {"block_size": 8}, "sft": {}}


@pytest.mark.parametrize("name", [*AUX_KW, "ar", "sedd_uniform"])
def test_mask_rate_is_the_masked_fraction_of_the_batch_the_network_saw(name):
    """The auxiliary metrics (logged by the trainer): 'mask_rate' is exactly the fraction of mask ids in the x_t
    the network was shown, over every position for the pretraining losses (padding is noised like the rest),
    over the response for 'sft' (whose prompt is never masked); 'ar' and the uniform graph (no mask id) return
    none. x_t differs from x_0 only by masks."""
    b, n = 8, 32
    x0 = jnp.asarray(np.random.default_rng(0).integers(0, V, (b, n)), jnp.int32)
    loss_mask = np.ones((b, n), np.float32)
    loss_mask[:, :12 if name == "sft" else 0] = 0.0  # the prompt
    loss_mask[:, 24:] = 0.0 if name != "sft" else 1.0  # padding
    vocab = V if name == "sedd_uniform" else V + 1
    told_apart = False
    run = _seen_by_network(
        name, x0, jnp.asarray(loss_mask), sched=schedules.LinearSchedule(), vocab_size=vocab, **AUX_KW.get(name, {})
    )
    for seed in range(3):
        aux, xt, _, _ = run(jax.random.key(seed))
        if name in ("ar", "sedd_uniform"):
            assert aux == {}
            continue
        assert set(aux) == {"mask_rate"} and aux["mask_rate"].shape == ()
        masked = xt == MASK
        np.testing.assert_array_equal(np.where(masked, 0, xt), np.where(masked, 0, x0))
        if name == "sft":
            assert not masked[loss_mask == 0].any()
            want = masked[loss_mask > 0].mean()
        else:
            want = masked.mean()
            told_apart |= want != masked[loss_mask > 0].mean()
        assert 0.0 < want < 1.0
        assert float(aux["mask_rate"]) == pytest.approx(want, rel=1e-6)
    assert told_apart or name in ("ar", "sedd_uniform", "sft")  # padding counted or not: the test can tell


GLUE_SCHED = schedules.CosineSchedule(eps=0.01)


def _per_token(name, logits, x0, xt, t, key, loss_mask):
    """The loss `name` from its public per-token function, given what the network saw (independent of the glue)."""
    s, m = GLUE_SCHED, MASK
    if name == "mdlm":
        return losses.masked_mean(losses.mdlm_loss(logits, x0, xt, t, s, m), loss_mask)
    if name == "sft":
        return losses.sft_mean(losses.mdlm_loss(logits, x0, xt, t, s, m), loss_mask)
    if name == "d3pm":
        return losses.masked_mean(losses.d3pm_absorbing_loss(logits, x0, xt, t, s, m, 4), loss_mask)
    if name == "sedd_absorb":
        log_score = losses.sedd_absorbing_log_score(logits, t, s)
        return losses.masked_mean(losses.score_entropy_absorbing_loss(log_score, x0, xt, t, s, m), loss_mask)
    if name == "sedd_uniform":
        return losses.masked_mean(losses.score_entropy_uniform_loss(logits, x0, xt, t, s), loss_mask)
    if name == "bd3lm":
        return losses.masked_mean(losses.block_diffusion_loss(logits, x0, xt, t[:, ::8], s, m, 8), loss_mask)
    if name == "radd":  # the network is shown no time: the masking rates are the first half of the key's split
        lam = losses.sample_times(jax.random.split(key)[0], x0.shape[0])
        return losses.masked_mean(losses.radd_loss(logits, x0, xt, lam, m), loss_mask)
    assert name == "ar"
    return losses.masked_mean(losses.autoregressive_loss(logits, x0, m), loss_mask[:, 1:])


@pytest.mark.parametrize("name", [*AUX_KW, "ar", "sedd_uniform"])
def test_training_loss_is_its_per_token_loss_on_what_the_network_saw(name):
    """The glue: for every loss, the value training_loss returns is the public per-token loss of the logits the
    network gave, for the x_t and t it was shown, averaged over loss_mask (padding left out; 'ar' scores tokens
    1..L-1; 'sft' per example), with a network whose output depends on both x_t and t. The network gets x_0 as
    context for bd3lm only, and nothing but x_0 itself for 'ar'."""
    b, n = 8, 32
    vocab = V if name == "sedd_uniform" else V + 1
    x0 = jnp.asarray(np.random.default_rng(0).integers(0, V, (b, n)), jnp.int32)
    loss_mask = np.ones((b, n), np.float32)
    loss_mask[:, 20:] = 0.0  # padding (for 'sft': the prompt is 0..7)
    if name == "sft":
        loss_mask[:, :8], loss_mask[:, 20:] = 0.0, 1.0
    table = jnp.asarray(np.random.default_rng(1).normal(size=(vocab, vocab)), jnp.float32)

    def network(xt, t):
        if t is None:
            return table[xt]
        t = t if t.ndim == 2 else t[:, None]
        return table[xt] * (1.0 + t[..., None])

    kw = dict(AUX_KW.get(name, {}), **({"block_size": 8} if name == "bd3lm" else {}))
    run = _seen_by_network(name, x0, jnp.asarray(loss_mask), sched=GLUE_SCHED, vocab_size=vocab, network=network, **kw)
    key = jax.random.key(4)
    _, xt, t, (loss, logits, ctx) = run(key)
    if name == "ar":
        np.testing.assert_array_equal(xt, x0)
        assert t is None
    if name == "bd3lm":
        np.testing.assert_array_equal(ctx, x0)
    else:
        assert ctx is None
    want = _per_token(name, logits, x0, jnp.asarray(xt), None if t is None else jnp.asarray(t), key, jnp.asarray(loss_mask))
    assert float(want) > 0
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    # The loss mask matters: without it the value differs (the test can tell).
    assert abs(float(want) - float(_per_token(name, logits, x0, jnp.asarray(xt), None if t is None else jnp.asarray(t), key, jnp.ones((b, n))))) > 1e-4


def test_checked_ids_refuse_the_mask_id_only_on_the_absorbing_graph():
    """check_ids: 'ar' and 'sedd_uniform' have no absorbing state, so their data may hold the id passed as mask_id
    (e.g. a BOS that reuses it); the absorbing losses refuse it."""
    x0 = jnp.array([[0, MASK, 1, 2]], jnp.int32)
    for name, vocab, ok in (("ar", V + 1, True), ("sedd_uniform", V + 1, True), ("mdlm", V + 1, False)):

        def f(x0, name=name, vocab=vocab):
            return losses.training_loss(
                name, lambda xt, t, c: jnp.zeros(xt.shape + (vocab,)), x0, None, jax.random.key(0),
                schedule=schedules.LinearSchedule(), vocab_size=vocab, mask_id=MASK, check_ids=True,
            )[0]

        err, _ = jax.jit(checkify.checkify(f))(x0)
        if ok:
            err.throw()
        else:
            with pytest.raises(checkify.JaxRuntimeError, match=f"x0: clean data contains the mask id {MASK}"):
                err.throw()


@pytest.mark.parametrize("name", ["mdlm", "d3pm", "sedd_absorb", "bd3lm", "sft"])
def test_each_row_is_masked_at_the_rate_of_the_time_the_network_is_shown(name):
    """Per row (per block for bd3lm), the masked fraction of x_t is 1 - alpha(t) for the t the network is shown
    (within 5 binomial standard errors; cosine schedule), and mask_rate is within 5 of their mean: a corruption
    drawn at another time than the one the network is told would show here. d3pm's t lies on the grid k/T."""
    b, n = 16, 256
    sched = schedules.CosineSchedule()
    x0 = jnp.zeros((b, n), jnp.int32)
    loss_mask = np.ones((b, n), np.float32)
    if name == "sft":
        loss_mask[:, :64] = 0.0
    kw = {"d3pm": {"num_steps": 8}, "bd3lm": {"block_size": 64}}.get(name, {})
    aux, xt, t, _ = _seen_by_network(name, x0, jnp.asarray(loss_mask), sched=sched, vocab_size=V + 1, **kw)(
        jax.random.key(3)
    )
    assert t.shape == ((b, n) if name == "bd3lm" else (b,))
    if name == "d3pm":
        np.testing.assert_allclose(t * 8, np.round(t * 8), atol=1e-5)
        assert t.min() >= 1 / 8 - 1e-6 and t.max() <= 1.0 + 1e-6
    group = 64 if name == "bd3lm" else n  # positions sharing one time
    t_tok = np.broadcast_to(t if t.ndim == 2 else t[:, None], (b, n))
    np.testing.assert_array_equal(t_tok.reshape(b, -1, group), t_tok.reshape(b, -1, group)[..., :1].repeat(group, -1))
    p = 1.0 - np.asarray(sched.alpha(jnp.asarray(t_tok, jnp.float64)))
    p = np.where(loss_mask > 0, p, 0.0)  # the sft prompt is never masked
    masked = (xt == MASK).astype(float)
    count = lambda x: x.reshape(b, -1, group).sum(-1)
    z = (count(masked) - count(p)) / np.sqrt(count(p * (1 - p)) + 1e-12)
    assert np.abs(z).max() < 5, z
    region = loss_mask > 0
    se = math.sqrt(np.sum(p * (1 - p))) / region.sum()
    assert abs(float(aux["mask_rate"]) - p[region].mean()) < 5 * se + 1e-7


def test_radd_masks_rows_at_rates_spread_over_the_antithetic_grid():
    """RADD's network is not shown a time: its masking rates lambda_i = (u + i/B) mod 1 show in x_t. Sorted, the
    rows' masked fractions are one offset in [0, 1/B) plus i/B (within the binomial noise, sd <= 0.008)."""
    b, n = 8, 4096
    x0 = jnp.zeros((b, n), jnp.int32)
    run = _seen_by_network("radd", x0, None, sched=None, vocab_size=V + 1)
    for seed in range(2):
        aux, xt, t, _ = run(jax.random.key(seed))
        assert t is None
        frac = (xt == MASK).mean(1)
        offset = np.sort(frac) - np.arange(b) / b
        assert offset.max() - offset.min() < 0.05 and -0.03 < offset.mean() < 1 / b + 0.03, offset
        assert float(aux["mask_rate"]) == pytest.approx(frac.mean(), rel=1e-6)


@pytest.mark.parametrize("antithetic", [True, False])
def test_mask_rate_expectation_is_the_mean_of_one_minus_alpha(antithetic):
    """E[mask_rate] = E_t[1 - alpha(t)] = int_0^1 cos(pi/2 (1 - t)) dt = 2/pi for the cosine schedule, with either
    time draw (each t_i is U[0, 1)); antithetic times make the batch's rate far less variable."""
    sched = schedules.CosineSchedule()
    x0 = jnp.zeros((16, 32), jnp.int32)
    zeros = lambda xt, t, c: jnp.zeros(xt.shape + (V + 1,))
    rate = jax.jit(
        jax.vmap(
            lambda key: losses.training_loss(
                "mdlm", zeros, x0, None, key, schedule=sched, vocab_size=V + 1, mask_id=MASK, antithetic=antithetic
            )[1]["mask_rate"]
        )
    )
    r = np.asarray(rate(jax.random.split(jax.random.key(0), 400)))
    se = r.std(ddof=1) / math.sqrt(len(r))
    assert abs(r.mean() - 2 / math.pi) < 4 * se, (r.mean(), se)
    assert r.std() < (0.1 if antithetic else 0.2)


# ------------------------------------------------------------------------------ count-sampled NELBO (evaluation)


def test_sample_masks_by_count_strata_counts_and_beta_rates():
    """Per block of n positions: exactly k positions masked, k stratified over the R rows (R = 2n copies hold each
    count 1..n twice), the masked positions uniform given k, and lam | k ~ Beta(k, n - k + 1) (mean k / (n + 1),
    variance k (n - k + 1) / ((n + 1)^2 (n + 2))), independently per block."""
    rows, n, nb, draws = 8, 4, 3, 3000
    mask, lam, k = jax.jit(jax.vmap(lambda key: losses.sample_masks_by_count(key, rows, n * nb, n)))(
        jax.random.split(jax.random.key(0), draws)
    )
    mask, lam, k = np.asarray(mask), np.asarray(lam), np.asarray(k)
    assert mask.shape == (draws, rows, n * nb) and lam.shape == k.shape == (draws, rows, nb)
    blocks = mask.reshape(draws, rows, nb, n)
    np.testing.assert_array_equal(blocks.sum(-1), k)
    strata = np.repeat(np.arange(1, n + 1), rows // n)[:, None]
    np.testing.assert_array_equal(np.sort(k, axis=1), np.broadcast_to(strata, k.shape))
    assert abs(np.corrcoef(k[:, 0, 0], k[:, 0, 1])[0, 1]) < 4 / math.sqrt(draws)  # one offset per block
    for kk in range(1, n + 1):
        sel = k == kk
        lam_k = lam[sel]
        mean, var = kk / (n + 1), kk * (n - kk + 1) / ((n + 1) ** 2 * (n + 2))
        assert abs(lam_k.mean() - mean) < 4 * math.sqrt(var / sel.sum()), (kk, lam_k.mean(), mean)
        assert abs(lam_k.var() - var) < 0.15 * var, (kk, lam_k.var(), var)
        at = blocks[sel]  # [count, n]: every position equally likely to be one of the k
        np.testing.assert_allclose(at.mean(0), kk / n, atol=4 * math.sqrt(0.25 / sel.sum()))
    with pytest.raises(ValueError, match="block_size must divide seq_len=6"):
        losses.sample_masks_by_count(jax.random.key(0), 2, 6, 4)


def _time_scaled(apply_fn):
    """The network's logits scaled by (1 + t): a network whose output depends on the time it is shown."""

    def f(xt, t, ctx):
        out = apply_fn(xt, t, ctx)
        if t is None:
            return out
        t = t if t.ndim == 2 else t[:, None]
        return out * (1.0 + t[..., None])

    return f


COUNT_CASES = {  # name: (schedule, oracle kind, block size); the schedules leave lam ranges outside [0, 1] uncovered
    "mdlm": (schedules.LogLinearSchedule(eps=0.3), "absorbing", L),
    "sedd_absorb": (schedules.CosineSchedule(), "sedd_absorb", L),
    "radd": (None, "absorbing", L),
    "bd3lm": (schedules.LinearSchedule(eps=0.1), "block", 2),
}


@pytest.mark.parametrize("name", list(COUNT_CASES))
def test_count_sampled_nelbo_is_the_weighted_sum_over_its_masks(name):
    """Each row's estimate against the formula with the draws of `sample_masks_by_count` (the same key): the
    network sees x_0 with the drawn mask and the time t with 1 - alpha(t) = lam (per block and token for bd3lm;
    none for radd); the estimate is sum_blocks (n / k) sum_{l masked, counted} loss_l / w(t), which is
    -log p(x_0^l | x_t) for the masked losses and, for SEDD's parameterisation,
    sum_{y != mask} e^{logit_y} / (V - 1) - logit_{x_0} + log(V - 1) - 1; a lam outside the schedule's range
    [1 - alpha(0), 1 - alpha(1)] counts 0, and loss_mask selects the positions that count."""
    sched, kind, bs = COUNT_CASES[name]
    rows = 64
    x0 = TOY.sample(jax.random.key(1), rows)
    loss_mask = jnp.ones((rows, L)).at[::3, 1].set(0.0)
    apply_fn = _time_scaled(TOY.apply_fn(kind, sched, block_size=2))
    key = jax.random.key(2)

    @jax.jit
    def run(key):  # the estimate, what the network saw, and the formula's inputs from the same draws
        seen = {}

        def recording(xt, t, ctx):
            seen.update(xt=xt, t=t)
            return apply_fn(xt, t, ctx)

        y = losses.count_sampled_nelbo(
            name, recording, x0, loss_mask, key, schedule=sched, mask_id=MASK, block_size=2 if bs == 2 else None
        )
        mask, lam, k = losses.sample_masks_by_count(key, rows, L, bs)
        t_blocks = (sched or schedules.LinearSchedule()).t_from_alpha(1.0 - lam)
        valid = (t_blocks >= 0) & (t_blocks <= 1)
        t_blocks = jnp.clip(t_blocks, 0.0, 1.0)
        xt = jnp.where(mask, MASK, x0)
        t_show = None if name == "radd" else (jnp.repeat(t_blocks, bs, axis=1) if name == "bd3lm" else t_blocks[:, 0])
        logits = apply_fn(xt, t_show, x0)[..., :V]  # the data columns
        return (y, seen["xt"], seen["t"]), (mask, k, valid, xt, t_show, logits)

    (got, xt_seen, t_seen), reference = run(key)
    mask, k, valid, xt, t_show, logits = jax.tree.map(np.asarray, reference)
    np.testing.assert_array_equal(xt_seen, xt)
    if t_show is None:
        assert t_seen is None
    else:
        np.testing.assert_allclose(t_seen, t_show, rtol=1e-12)
    x0n = np.asarray(x0)
    at_x0 = np.take_along_axis(logits, x0n[..., None], -1)[..., 0]
    if name == "sedd_absorb":
        per = np.exp(logits).sum(-1) / V - at_x0 + math.log(V) - 1.0
    else:
        per = np.log(np.exp(logits).sum(-1)) - at_x0
    counted = mask & np.repeat(valid, bs, axis=1) & (np.asarray(loss_mask) > 0)
    weight = np.repeat(bs / k, bs, axis=1)
    want = np.sum(np.where(counted, weight * per, 0.0), axis=1)
    assert 0 < (~valid).mean() < 0.5 or name in ("sedd_absorb", "radd")  # some draws fall outside the range
    assert counted.any() and not counted.all()
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_count_sampled_nelbo_rejects_other_losses_and_a_missing_block_size():
    x = jnp.zeros((2, 4), jnp.int32)
    apply_fn = lambda xt, t, c: jnp.zeros(xt.shape + (V + 1,))
    for name in ("d3pm", "sedd_uniform", "ar", "sft"):
        with pytest.raises(ValueError, match="count_sampled_nelbo is for"):
            losses.count_sampled_nelbo(
                name, apply_fn, x, None, jax.random.key(0), schedule=schedules.LinearSchedule(), mask_id=MASK
            )
    with pytest.raises(ValueError, match="'bd3lm' needs block_size"):
        losses.count_sampled_nelbo(
            "bd3lm", apply_fn, x, None, jax.random.key(0), schedule=schedules.LinearSchedule(), mask_id=MASK
        )


# ------------------------------------------------------------------------------ sharding, vmap, contracts


SHARD_V, SHARD_N = 7, 8
_SCHED = schedules.LogLinearSchedule()
# Every per-token loss as f(logits, x0, xt, t) on a vocabulary of 7 with mask id 6.
PER_TOKEN_LOSSES = {
    "mdlm": lambda lg, x0, xt, t: losses.mdlm_loss(lg, x0, xt, t, _SCHED, SHARD_V - 1),
    "d3pm": lambda lg, x0, xt, t: losses.d3pm_absorbing_loss(lg, x0, xt, t, _SCHED, SHARD_V - 1, 16),
    "sedd_absorb": lambda lg, x0, xt, t: losses.score_entropy_absorbing_loss(
        lg, x0, xt, t, _SCHED, SHARD_V - 1
    ),
    "sedd_uniform": lambda lg, x0, xt, t: losses.score_entropy_uniform_loss(
        lg, x0, x0.at[:, 0].set(1), t, _SCHED
    ),
    "radd": lambda lg, x0, xt, t: losses.radd_loss(lg, x0, xt, t, SHARD_V - 1),
    "radd_any_order": lambda lg, x0, xt, t: losses.radd_any_order_loss(lg, x0, xt, SHARD_V - 1),
    "bd3lm": lambda lg, x0, xt, t: losses.block_diffusion_loss(
        lg, x0, xt, jnp.stack([t, t[::-1]], 1), _SCHED, SHARD_V - 1, SHARD_N // 2
    ),
    "ar": lambda lg, x0, xt, t: losses.autoregressive_loss(lg, x0),
}


def random_loss_inputs(batch, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    lg = jax.random.normal(keys[0], (batch, SHARD_N, SHARD_V), jnp.float32)
    x0 = jax.random.randint(keys[1], (batch, SHARD_N), 0, SHARD_V - 1)
    xt = jnp.where(jax.random.bernoulli(keys[2], 0.5, (batch, SHARD_N)), SHARD_V - 1, x0)
    t = jax.random.uniform(keys[3], (batch,), jnp.float32, 0.05, 0.95)
    return lg, x0, xt, t


def test_losses_sharded_over_8_devices_equal_unsharded():
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
    lg, x0, xt, t = random_loss_inputs(16)
    row = NamedSharding(mesh, P("data"))
    args = [jax.device_put(a, row) for a in (lg, x0, xt, t)]
    for name, fn in PER_TOKEN_LOSSES.items():
        plain = jax.jit(fn)(lg, x0, xt, t)
        sharded = jax.jit(fn, in_shardings=(row,) * 4, out_shardings=row)(*args)
        assert sharded.sharding.spec == P("data")
        np.testing.assert_allclose(sharded, plain, rtol=1e-6, err_msg=name)

    # The full training loss, rng and all: the same value whether the batch is sharded or not.
    f = lambda x0, key: losses.training_loss(
        "mdlm", lambda xt, t, c: lg, x0, None, key, schedule=_SCHED, vocab_size=SHARD_V, mask_id=SHARD_V - 1
    )[0]
    plain = jax.jit(f)(x0, jax.random.PRNGKey(5))
    sharded = jax.jit(f, in_shardings=(row, None))(jax.device_put(x0, row), jax.random.PRNGKey(5))
    np.testing.assert_allclose(sharded, plain, rtol=1e-6)


def test_losses_vmap_over_a_leading_axis():
    stacked = [jnp.stack(z) for z in zip(*(random_loss_inputs(2, seed) for seed in range(3)))]
    for name, fn in PER_TOKEN_LOSSES.items():
        batched = jax.jit(jax.vmap(fn))(*stacked)
        for i in range(3):
            # float32: the jitted (fused) and op-by-op logsumexp differ in the last bits (~1e-6 relative)
            np.testing.assert_allclose(batched[i], fn(*(a[i] for a in stacked)), rtol=5e-6, err_msg=name)


@pytest.mark.parametrize("dtype,want", [("float32", "float32"), ("float64", "float64"), ("bfloat16", "float32")])
def test_per_token_losses_come_out_in_the_documented_dtype(dtype, want):
    """With x64 on (this file's fixture): float32 network outputs give float32 losses (float64 would double the
    loss's memory and time), float64 ones float64, bf16 ones are upcast to float32; the time is float32 except
    with float64 outputs."""
    lg, x0, xt, t = random_loss_inputs(4)
    lg = lg.astype(dtype)
    t = t.astype("float64" if dtype == "float64" else "float32")
    for name, fn in PER_TOKEN_LOSSES.items():
        assert jax.eval_shape(fn, lg, x0, xt, t).dtype == want, name  # traced only: dtypes need no compiling
    per_token = jnp.ones(x0.shape, dtype)
    for name, reduce in (("masked_mean", losses.masked_mean), ("sft_mean", losses.sft_mean)):
        assert jax.eval_shape(reduce, per_token, jnp.ones(x0.shape, jnp.int32)).dtype == want, name
    response = jnp.ones(x0.shape, jnp.int32)
    conditional = functools.partial(losses.any_order_conditional_loss, mask_id=SHARD_V - 1, response_mask=response)
    assert jax.eval_shape(conditional, lg, x0, xt).dtype == want


def test_shape_errors_say_what_was_expected():
    sched = schedules.LinearSchedule()
    x = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"logits must be \[batch, length, vocab\]"):
        losses.mdlm_loss(jnp.zeros((2, 4, 7)), x, x, jnp.zeros(2), sched, 6)
    with pytest.raises(ValueError, match=r"x0 must be int \[batch, length\]"):
        losses.mdlm_loss(jnp.zeros((2, 5, 7)), x.astype(jnp.float32), x, jnp.zeros(2), sched, 6)
    with pytest.raises(ValueError, match=r"t must be \[batch\]"):
        losses.mdlm_loss(jnp.zeros((2, 5, 7)), x, x, jnp.zeros(3), sched, 6)
    with pytest.raises(ValueError, match=r"^mask_rate must be \[batch\] = \(2,\) or \[batch, length\] = \(2, 5\)"):
        losses.radd_loss(jnp.zeros((2, 5, 7)), x, x, jnp.zeros(3), 6)
    with pytest.raises(ValueError, match="unknown loss"):
        losses.training_loss(
            "vlb", None, x, None, jax.random.PRNGKey(0), schedule=sched, vocab_size=7, mask_id=6
        )


@pytest.mark.parametrize("name", ["mdlm", "sedd_absorb", "sedd_uniform", "radd", "ar", "bd3lm"])
def test_training_loss_rejects_a_network_with_the_wrong_vocabulary(name):
    """A network with 6 columns for a vocabulary of 7 (or 8): one clear error naming vocab_size, raised
    while tracing (jax.eval_shape: nothing is computed); 6 columns for a vocabulary of 6 are accepted."""
    x = jnp.zeros((2, 4), jnp.int32)
    apply_fn = lambda xt, t, c: jnp.zeros((*xt.shape, 6))

    def loss(vocab_size):
        return jax.eval_shape(
            lambda key: losses.training_loss(
                name,
                apply_fn,
                x,
                None,
                key,
                schedule=schedules.LinearSchedule(),
                vocab_size=vocab_size,
                mask_id=vocab_size - 1,
                block_size=2,
            )[0],
            jax.random.PRNGKey(0),
        )

    for vocab_size in (7, 8):
        with pytest.raises(ValueError, match=rf"vocab_size\] = \(2, 4, {vocab_size}\).*got \(2, 4, 6\)"):
            loss(vocab_size)
    assert loss(6).shape == ()


def test_checked_mode_catches_bad_token_ids():
    sched = schedules.LinearSchedule()
    apply_fn = lambda xt, t, c: jnp.zeros(xt.shape + (7,))

    def f(x0):
        return losses.training_loss(
            "mdlm",
            apply_fn,
            x0,
            None,
            jax.random.PRNGKey(0),
            schedule=sched,
            vocab_size=7,
            mask_id=6,
            check_ids=True,
        )[0]

    checked = jax.jit(checkify.checkify(f))
    err, _ = checked(jnp.array([[1, 2, 3]], jnp.int32))
    err.throw()  # valid ids: no error
    err, _ = checked(jnp.array([[1, 9, 3]], jnp.int32))
    with pytest.raises(checkify.JaxRuntimeError, match=r"token ids must be in \[0, 7\)"):
        err.throw()
    err, _ = checked(jnp.array([[1, 6, 3]], jnp.int32))
    with pytest.raises(checkify.JaxRuntimeError, match="mask id 6"):
        err.throw()


def test_subs_log_probs_zero_masking_and_carry_over():
    """MDLM's SUBS parameterisation: at a masked position the log-softmax of the logits over the ids other than the
    mask (which gets ~zero probability); at an unmasked position log-probability exactly 0 at x_t and NEG_INF
    elsewhere, whatever the logits. SEDD's time-free log c = logits - log(V - 1) with V the vocabulary (columns),
    not the length."""
    from ddlm.losses import subs_log_probs

    rng = np.random.default_rng(1)
    vocab, mask_id = 6, 5
    logits = jnp.asarray(rng.normal(0, 3, (2, 7, vocab)))
    xt = jnp.asarray([[5, 0, 5, 4, 1, 5, 5], [2, 5, 5, 3, 0, 0, 5]], jnp.int32)
    got = np.asarray(subs_log_probs(logits, xt, mask_id))
    masked = np.asarray(xt) == mask_id
    lg = np.asarray(logits)[..., :mask_id]
    want_masked = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    np.testing.assert_allclose(got[masked][:, :mask_id], want_masked[masked], rtol=1e-12, atol=1e-12)
    assert np.all(got[masked][:, mask_id] < -1e5)
    carried = np.where(np.eye(vocab)[np.asarray(xt)] > 0, 0.0, losses.NEG_INF)
    np.testing.assert_array_equal(got[~masked], carried[~masked])
    np.testing.assert_allclose(
        losses.sedd_absorbing_log_cond(logits), np.asarray(logits) - math.log(vocab - 1), rtol=1e-12
    )


def test_masked_mean_weights_and_guards():
    """masked_mean: the plain mean without a mask, the mean over the nonzero mask positions with one (an all-zero
    mask gives 0, not NaN), a mask of the wrong shape is an error."""
    x = jnp.asarray(np.arange(12.0).reshape(3, 4))
    mask = jnp.asarray([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 0, 0]])
    assert float(losses.masked_mean(x)) == 5.5
    assert float(losses.masked_mean(x, mask)) == pytest.approx((0 + 3 + 8 + 9) / 4)
    assert float(losses.masked_mean(x, jnp.zeros((3, 4)))) == 0.0
    with pytest.raises(ValueError, match=r"mask must have shape \(3, 4\), got \(3, 3\)"):
        losses.masked_mean(x, jnp.ones((3, 3)))


def test_sample_response_mask_is_stratified_by_default():
    """Stratified (the default): the numbers of masked response positions of a batch are floor(u_b R) + 1 with
    u = (u_0 + b / B) mod 1, so B = 2R copies of one response hold each count 1..R exactly twice; i.i.d. draws do
    not, for most keys."""
    response = jnp.asarray(np.array([[0, 1, 1, 1, 1, 0]] * 8, bool))  # R = 4, B = 8
    keys = jax.random.split(jax.random.key(3), 200)
    counts = {
        s: np.sort(np.asarray(jax.jit(jax.vmap(lambda k, s=s: losses.sample_response_mask(k, response, s)))(keys)).sum(-1), axis=1)
        for s in (True, False)
    }
    default = np.asarray(jax.jit(jax.vmap(lambda k: losses.sample_response_mask(k, response)))(keys)).sum(-1)
    np.testing.assert_array_equal(counts[True], np.broadcast_to(np.repeat(np.arange(1, 5), 2), (200, 8)))
    np.testing.assert_array_equal(np.sort(default, axis=1), counts[True])
    assert np.mean(np.all(counts[False] == np.repeat(np.arange(1, 5), 2), axis=1)) < 0.1


def test_check_token_ids_bounds_and_names():
    """0 and vocab_size - 1 are valid ids, -1 and vocab_size are not; the mask id is refused only when given; the
    message names the array ('tokens' unless told)."""
    plain = jax.jit(checkify.checkify(lambda x: losses.check_token_ids(x, 7)))
    no_mask = jax.jit(checkify.checkify(lambda x: losses.check_token_ids(x, 7, "x0", 6)))
    for fn in (plain, no_mask):
        err, _ = fn(jnp.array([[0, 5, 1]], jnp.int32))
        err.throw()
    err, _ = plain(jnp.array([[0, 6, 1]], jnp.int32))
    err.throw()
    for bad in (-1, 7):
        err, _ = plain(jnp.array([[0, bad, 1]], jnp.int32))
        with pytest.raises(checkify.JaxRuntimeError, match=r"^tokens: token ids must be in \[0, 7\)"):
            err.throw()
    err, _ = no_mask(jnp.array([[0, 6, 1]], jnp.int32))
    with pytest.raises(checkify.JaxRuntimeError, match="^x0: clean data contains the mask id 6"):
        err.throw()


def test_masked_nll_equals_the_subs_log_probs_form_with_its_gradient():
    """The logsumexp form of -log p(x0 | xt) (ddlm/losses.py `_masked_nll`) equals -log of MDLM's SUBS
    probabilities gathered at x0, and so does its gradient, at logits up to +-60 (float32 overflow range of
    a naive softmax) and at every masking pattern; unmasked positions contribute exactly 0."""
    from ddlm.losses import _masked_nll, subs_log_probs

    rng = np.random.default_rng(0)
    vocab, mask_id = 11, 10
    logits = jnp.asarray(rng.normal(0, 20, (3, 7, vocab)), jnp.float32)
    x0 = jnp.asarray(rng.integers(0, mask_id, (3, 7)), jnp.int32)
    xt = jnp.where(jnp.asarray(rng.uniform(size=(3, 7)) < 0.5), mask_id, x0)

    def reference(logits):
        lp = subs_log_probs(logits, xt, mask_id)
        nll = -jnp.take_along_axis(lp, x0[..., None], axis=-1)[..., 0]
        return jnp.where(xt == mask_id, nll, 0.0)

    np.testing.assert_allclose(_masked_nll(logits, x0, xt, mask_id), reference(logits), rtol=1e-6, atol=1e-5)
    assert np.all(np.asarray(_masked_nll(logits, x0, xt, mask_id))[np.asarray(xt != mask_id)] == 0.0)
    w = jnp.asarray(rng.normal(size=(3, 7)), jnp.float32)
    g = jax.grad(lambda l: jnp.sum(w * _masked_nll(l, x0, xt, mask_id)))(logits)
    g_ref = jax.grad(lambda l: jnp.sum(w * reference(l)))(logits)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(g)[..., mask_id] == 0.0)  # the mask id is never predicted


def test_autoregressive_loss_leaves_the_mask_column_out_of_the_softmax():
    """With mask_id, the next-token NLL is the cross-entropy over the other ids (numpy), i.e. exp(-loss) is the
    probability ar_sample draws with (it never draws the mask id); without it, the mask column is counted."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 6, V + 1)).astype(np.float32)
    logits[..., MASK] = 2.0  # a mask column that would take a visible share of every normaliser
    tokens = rng.integers(0, V, (3, 6)).astype(np.int32)
    got = np.asarray(losses.autoregressive_loss(jnp.asarray(logits), jnp.asarray(tokens), MASK))
    kept = np.delete(logits[:, :-1].astype(np.float64), MASK, axis=-1)  # MASK is the last id
    log_z = np.log(np.exp(kept).sum(-1))
    want = log_z - np.take_along_axis(kept, tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with_mask = np.asarray(losses.autoregressive_loss(jnp.asarray(logits), jnp.asarray(tokens)))
    assert np.all(with_mask > got + 1e-3)  # the column counts without mask_id: the test can tell
