"""ddlm.eval.likelihood and the NELBO's boundary terms (ddlm.losses), against the exact toy oracle.

With the exact denoiser the per-sequence estimator must reproduce, within its own standard error, the exact
NELBO computed independently by enumeration: the entropy H for schedules with alpha(0) = 1, alpha(1) = 0 (masked,
block), H - I(x_0; x_1) + L alpha(1) log V for the log-linear schedule (its prior term), and
H(x_0 | x_0') [kernel decoder] + I(x_0; x_0') - I(x_0; x_1) + KL(q(x_1 | x_0) || uniform) on the uniform graph.
The masked continuous-time losses are estimated by sampling the number of masked tokens
(losses.count_sampled_nelbo), the others through losses.training_loss; both must hit the exact values. The
standard error shrinks as 1/sqrt(n)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm import losses, schedules
from ddlm.eval import likelihood, oracle

TOY = oracle.ToyDistribution(num_tokens=3, length=4, seed=0)
V, L, MASK = TOY.num_tokens, TOY.length, TOY.mask_id
H = TOY.entropy()
N = 4096


def _entropy_rows(kernel):
    return -np.sum(np.where(kernel > 0, kernel * np.log(np.maximum(kernel, 1e-300)), 0.0), axis=1)


def exact_uniform_nelbo(sched):
    """recon + diffusion + prior per sequence on the uniform graph, from the toy's [V^L, V^L] kernels."""
    k0 = TOY.uniform_kernel(float(sched.alpha(0.0)))
    k1 = TOY.uniform_kernel(float(sched.alpha(1.0)))
    # Decoder p(x_0 | x_0') = k0[x_0, x_0'] (symmetric kernel): E[-log p] = sum_x0 p(x0) H(k0[x0, :]).
    recon = float(np.sum(TOY.probs * _entropy_rows(k0)))
    diffusion = TOY.mutual_information(k0) - TOY.mutual_information(k1)
    prior = float(np.sum(TOY.probs * np.sum(k1 * np.log(k1 * len(TOY.seqs)), axis=1)))
    return recon + diffusion + prior


def exact_masked_nelbo(sched):
    """H - I(x_0; x_1) + L alpha(1) log V for a schedule with alpha(0) = 1."""
    a1 = float(sched.alpha(1.0))
    return H - TOY.mutual_information(TOY.absorbing_kernel(a1)) + L * a1 * math.log(V)


CASES = {
    "mdlm-linear": ("mdlm", "absorbing", schedules.LinearSchedule(), {}, lambda s: H),
    "mdlm-loglinear-eps0.1": (
        "mdlm",
        "absorbing",
        schedules.LogLinearSchedule(eps=0.1),
        {},
        exact_masked_nelbo,
    ),
    # Not the cosine schedule: in float32 its alpha(t) rounds to 0 for t > ~0.9997 and the SEDD loss is NaN there.
    "sedd_absorb-loglinear": (
        "sedd_absorb",
        "sedd_absorb",
        schedules.LogLinearSchedule(eps=1e-3),
        {},
        exact_masked_nelbo,
    ),
    "bd3lm-B2-linear": ("bd3lm", "block", schedules.LinearSchedule(), {"block_size": 2}, lambda s: H),
    "radd": ("radd", "absorbing", None, {}, lambda s: H),
    "sedd_uniform-geometric": (
        "sedd_uniform",
        "uniform",
        schedules.GeometricSchedule(sigma_min=0.05, sigma_max=5.0),
        {},
        exact_uniform_nelbo,
    ),
    "ar": ("ar", "ar", None, {}, lambda s: H - TOY.marginal_entropies()[0]),
}


@functools.cache
def estimates(case):
    name, kind, sched, kw, _ = CASES[case]
    vocab = V if kind == "uniform" else V + 1
    with jax.enable_x64(True):
        fn = jax.jit(
            functools.partial(
                likelihood.nelbo_per_sequence,
                name,
                TOY.apply_fn(kind, sched, block_size=2),
                schedule=sched,
                vocab_size=vocab,
                mask_id=MASK,
                time_samples=4,
                **kw,
            )
        )
        x0 = TOY.sample(jax.random.key(0), N)
        est = fn(x0, None, jax.random.key(1))
        return np.asarray(est.nats), np.asarray(est.tokens)


@pytest.mark.parametrize("case", list(CASES))
def test_oracle_nelbo_estimate_equals_exact_value_within_its_error_bar(case):
    *_, exact_fn = CASES[case]
    nats, tokens = estimates(case)
    s = likelihood.ratio_summary(nats, tokens)
    per_seq = s["mean"] * tokens.mean()  # every sequence scores the same number of tokens here
    exact = exact_fn(CASES[case][2])
    se = s["se"] * tokens.mean()
    assert 0 < se < 0.05
    assert abs(per_seq - exact) < 3 * se, (case, per_seq, exact, se)
    if case.startswith(("mdlm-linear", "bd3lm", "radd")):
        assert exact == H


def test_boundary_terms_are_needed_for_the_bound():
    """Without the prior term the log-linear (eps = 0.1) estimate lands on H - I(x_0; x_1) < H, far outside
    its error bar from the true bound; on the uniform graph without both terms it misses by many SEs too."""
    for case in ("mdlm-loglinear-eps0.1", "sedd_uniform-geometric"):
        name, kind, sched, _, exact_fn = CASES[case]
        nats, tokens = estimates(case)
        prior, recon = losses.boundary_terms(name, sched, V if kind == "uniform" else V + 1)
        assert float(prior + recon) > 0.01
        s = likelihood.ratio_summary(nats - tokens * float(prior + recon), tokens)
        gap = abs(s["mean"] * L - exact_fn(sched))
        assert gap > 5 * s["se"] * L, (case, gap, s)


@pytest.mark.parametrize("case", ["mdlm-linear", "ar"])
def test_standard_error_shrinks_as_one_over_sqrt_n(case):
    """The SE of n sequences, averaged over the disjoint chunks of n of the N estimates, halves when n is
    quadrupled (a single chunk's SE is itself too noisy with these heavy-tailed -log p(x))."""
    nats, tokens = estimates(case)
    se = [
        np.mean([likelihood.ratio_summary(nats[i : i + n], tokens[i : i + n])["se"] for i in range(0, N, n)])
        for n in (256, 1024, 4096)
    ]
    assert 1.8 < se[0] / se[1] < 2.2 and 1.8 < se[1] / se[2] < 2.2, se


def test_boundary_term_closed_forms():
    """Per-token terms against direct sums over one token's distribution."""
    g = schedules.GeometricSchedule(sigma_min=0.05, sigma_max=5.0)
    with jax.enable_x64(True):
        for n in (3, 50):
            a0, a1 = math.exp(-0.05), math.exp(-5.0)
            row1 = np.full(n, (1 - a1) / n)
            row1[0] += a1
            row0 = np.full(n, (1 - a0) / n)
            row0[0] += a0
            np.testing.assert_allclose(
                losses.uniform_prior_kl(g, n), np.sum(row1 * np.log(row1 * n)), rtol=1e-6
            )
            np.testing.assert_allclose(
                losses.uniform_reconstruction_nll(g, n), -np.sum(row0 * np.log(row0)), rtol=1e-6
            )
        ll = schedules.LogLinearSchedule(eps=1e-3)
        np.testing.assert_allclose(losses.absorbing_prior_kl(ll, 70), 1e-3 * math.log(70), rtol=1e-9)
        assert float(losses.absorbing_reconstruction_nll(ll, 70)) == 0.0
        md4 = schedules.CosineSchedule(eps=1e-4)  # alpha(0) = 1 - 1e-4: md4's recon_loss
        np.testing.assert_allclose(
            losses.absorbing_reconstruction_nll(md4, 70), 1e-4 * math.log(70), rtol=1e-6
        )
    assert losses.boundary_terms("radd", None, 7) == (0.0, 0.0)
    assert losses.boundary_terms("ar", None, 7) == (0.0, 0.0)


# ------------------------------------------------------------------------------------------------ summaries


def test_ratio_summary_hand_made():
    s = likelihood.ratio_summary([2.0, 4.0, 6.0], [1, 2, 3])
    assert s == {"mean": 2.0, "se": 0.0, "n": 3}
    vals = np.array([1.0, 2.0, 4.0, 7.0])
    s = likelihood.ratio_summary(vals * 8, np.full(4, 8))  # equal counts: the SE of the mean of vals
    assert math.isclose(s["mean"], vals.mean())
    assert math.isclose(s["se"], vals.std(ddof=1) / 2.0)
    s = likelihood.ratio_summary([3.0, 1.0], [0, 2])  # rows without scored tokens are ignored
    assert s["n"] == 1 and s["mean"] == 0.5 and math.isnan(s["se"])


def test_likelihood_summary_units():
    nats = np.array([10.0, 12.0, 11.0, 13.0])
    tokens = np.full(4, 8.0)
    chars = np.full(4, 16.0)
    s = likelihood.likelihood_summary(nats, tokens, chars)
    r = nats.sum() / tokens.sum()
    assert math.isclose(s["nats_per_token"], r)
    assert math.isclose(s["bits_per_token"], r / math.log(2))
    assert math.isclose(s["bits_per_char"], nats.sum() / chars.sum() / math.log(2))
    assert math.isclose(s["bits_per_char_se"], s["bits_per_token_se"] / 2)
    assert math.isclose(s["perplexity"], math.exp(r))
    assert math.isclose(s["perplexity_se"], math.exp(r) * s["nats_per_token_se"])
    assert s["perplexity_low"] < s["perplexity"] < s["perplexity_high"]
    assert s["kind"] == "NELBO (upper bound)" and s["characters"] == 64


def test_evaluate_split_counts_characters_of_the_scored_tokens():
    """'ar' scores tokens 1..L-1, the others every masked-in token; characters follow the same positions."""
    tokens = np.array([[5, 6, 7, 8], [5, 5, 0, 0]], np.int32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.float32)
    fake = lambda t, m, rng: likelihood.SequenceEstimates(
        jnp.sum(t * m, axis=1).astype(jnp.float32), jnp.sum(m, 1)
    )
    decode = lambda ids: "".join("x" * (i - 4) for i in ids)  # id i -> i - 4 characters
    out = likelihood.evaluate_split(
        {"diff": (fake, "mdlm"), "ar": (fake, "ar")},
        [{"tokens": tokens, "loss_mask": mask}] * 3,
        jax.random.key(0),
        decode=decode,
        max_batches=2,
    )
    np.testing.assert_array_equal(out["diff"]["chars"], [10, 2, 10, 2])
    np.testing.assert_array_equal(out["ar"]["chars"], [9, 1, 9, 1])
    np.testing.assert_array_equal(out["diff"]["nats"], [26, 10, 26, 10])


def test_the_network_is_shown_the_time_of_its_mask_rate():
    """Count sampling draws k masked tokens and then lam | k ~ Beta(k, n - k + 1), so E[k / n | lam] =
    (1 + (n - 1) lam) / n; the network must be shown t with 1 - alpha(t) = lam (here t = lam / (1 - eps)), not
    lam itself. Run eagerly (the network records what it is shown), 4 stratified copies per call."""
    seen = []

    def apply_fn(xt, t, ctx):
        seen.append((np.asarray(xt), np.asarray(t)))
        return jnp.zeros(xt.shape + (V + 1,))

    n, sched = 256, schedules.LogLinearSchedule(eps=0.2)
    x0 = jnp.zeros((4, n), jnp.int32)
    for i in range(64):
        losses.count_sampled_nelbo(
            "mdlm", apply_fn, x0, None, jax.random.key(i), schedule=sched, mask_id=MASK
        )
    xt = np.concatenate([x for x, _ in seen])
    t = np.concatenate([tt for _, tt in seen])
    frac = (xt == MASK).mean(1)
    # k is uniform on 1..n, stratified: the 4 copies of a call fall in the 4 quarters of 1..n.
    k = (xt == MASK).sum(1).reshape(-1, 4)
    assert np.all((np.sort(k, axis=1) - 1) // (n // 4) == np.arange(4)), k[:3]
    inside = t < 1.0  # lam > 1 - eps lies outside the schedule (t clipped to 1, counted 0)
    assert 0.1 < 1 - inside.mean() < 0.3  # about eps of the draws
    frac, t = frac[inside], t[inside]
    expected = lambda lam: (1 + (n - 1) * lam) / n
    gap = frac - expected(1 - np.asarray(sched.alpha(t)))
    se = gap.std() / math.sqrt(len(gap))
    assert abs(gap.mean()) < 4 * se, (gap.mean(), se)
    assert (frac - expected(t)).mean() < -10 * se  # shown lam itself, the network would see too many masks


def time_dependent_wrong(apply_fn):
    """The exact denoiser mixed with uniform noise by a t-dependent amount: not optimal, and its loss
    depends on the time it is shown."""

    def f(xt, t, ctx):
        p = jnp.exp(apply_fn(xt, t, ctx))[..., :V]
        tw = jnp.reshape(t, t.shape + (1,) * (p.ndim - t.ndim))
        q = (0.6 - 0.3 * tw) * p + (0.4 + 0.3 * tw) / V
        return jnp.concatenate([jnp.log(q), jnp.full(q.shape[:-1] + (1,), -1e30)], -1)

    return f


@pytest.mark.parametrize("case", ["mdlm-cosine", "bd3lm-B2-linear", "sedd_absorb-loglinear"])
def test_count_sampling_and_time_sampling_estimate_the_same_nelbo_of_a_wrong_network(case):
    """For a non-optimal, time-dependent network both estimators are unbiased for its NELBO (above H); the
    count-sampled one has a fraction of the per-sequence spread."""
    name, kind, sched, kw = {
        "mdlm-cosine": ("mdlm", "absorbing", schedules.CosineSchedule(), {}),
        "bd3lm-B2-linear": ("bd3lm", "block", schedules.LinearSchedule(), {"block_size": 2}),
        "sedd_absorb-loglinear": ("sedd_absorb", "sedd_absorb", schedules.LogLinearSchedule(), {}),
    }[case]
    apply_fn = time_dependent_wrong(TOY.apply_fn(kind, sched, block_size=2))
    out = {}
    with jax.enable_x64(True):
        x0 = TOY.sample(jax.random.key(0), N)
        for count in (True, False):
            fn = functools.partial(
                likelihood.nelbo_per_sequence,
                name,
                apply_fn,
                schedule=sched,
                vocab_size=V + 1,
                mask_id=MASK,
                time_samples=4,
                count_sampling=count,
                **kw,
            )
            out[count] = np.asarray(jax.jit(fn)(x0, None, jax.random.key(1 + count)).nats, np.float64)
    diff = out[True] - out[False]
    assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(N), (diff.mean(), diff.std() / math.sqrt(N))
    assert out[True].mean() > H + 0.05  # a wrong network: the bound is not tight, the test can tell
    assert out[True].std() < 0.4 * out[False].std(), (out[True].std(), out[False].std())
