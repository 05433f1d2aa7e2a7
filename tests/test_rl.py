"""RL with verifiable rewards (ddlm.losses' policy-optimisation section, ddlm/train/rl.py, ddlm/data/tasks.py).

The likelihood estimators are checked on the exact toy oracle (ddlm.eval.oracle): their expectation and
variance, computed independently by enumerating every mask they can draw, against Monte-Carlo draws and
against the exact conditional log-probability log p(response | prompt) of the toy distribution. GRPO's
advantages and losses are checked against direct numpy computations on hand-made groups, and one policy-
gradient step on a table policy (the oracle's log-posteriors as trainable parameters) must raise the exact
probability, under the one-token-per-step random-order sampler, of the rewarded completion."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm import losses
from ddlm.eval import oracle

TOY = oracle.ToyDistribution(num_tokens=3, length=4, seed=0)
V, L, MASK = TOY.num_tokens, TOY.length, TOY.mask_id
PROMPT = 2  # positions 0..1 are the prompt, 2..3 the response
RESPONSE_MASK = np.array([0, 0, 1, 1], np.float32)
N = 4096


def _table():
    return np.log(np.maximum(TOY.absorbing_posterior_table(), 1e-300))


def _table_apply(table):
    """apply_fn(xt, t, ctx) -> table[state of xt]: a network given as its table of log-posteriors."""
    return lambda xt, t, ctx: jnp.asarray(table)[TOY.index(xt, V + 1)]


def _exact_conditional(x):
    """log p(x[PROMPT:] | x[:PROMPT]) of the toy distribution, by enumeration (no network involved)."""
    same_prompt = np.all(TOY.seqs[:, :PROMPT] == x[:PROMPT], axis=1)
    idx = int(TOY.index(np.asarray(x)))
    return float(np.log(TOY.probs[idx]) - np.log(TOY.probs[same_prompt].sum()))


def _state_log_prob(table, state, pos, token):
    """log p(token at pos | state) from a table: softmax over the ids other than the mask (SUBS)."""
    row = table[int(TOY.index(np.asarray(state), V + 1)), pos, :V]
    return float(row[token] - np.logaddexp.reduce(row))


def _nelbo_law(table, x):
    """The exact law of one draw of losses.nelbo_log_prob (K = 1): [(probability, value)] over l ~ U{1..R}
    and every response subset M of size l: value = R/l sum_{i in M} log p(x_i | x with M masked)."""
    resp = list(range(PROMPT, L))
    r = len(resp)
    out = []
    for l in range(1, r + 1):
        subsets = list(itertools.combinations(resp, l))
        for m in subsets:
            state = np.array(x)
            state[list(m)] = MASK
            value = r / l * sum(_state_log_prob(table, state, i, x[i]) for i in m)
            out.append((1.0 / r / len(subsets), value))
    return out


def _mean_field_law(table, x, p_mask):
    """The exact law of losses.mean_field_log_prob: every prompt-mask pattern with its probability."""
    out = []
    for hidden in itertools.product([0, 1], repeat=PROMPT):
        prob = math.prod(p_mask if h else 1.0 - p_mask for h in hidden)
        state = np.array(x)
        state[PROMPT:] = MASK
        state[:PROMPT] = np.where(np.array(hidden, bool), MASK, state[:PROMPT])
        value = sum(_state_log_prob(table, state, i, x[i]) for i in range(PROMPT, L))
        out.append((prob, value))
    return out


def _moments(law):
    p = np.array([w for w, _ in law])
    v = np.array([y for _, y in law])
    assert abs(p.sum() - 1.0) < 1e-12
    mean = float(np.sum(p * v))
    return mean, float(np.sum(p * (v - mean) ** 2))


def _variance_tolerance(law, n):
    """4 standard errors of the sample variance of n draws from `law`: sqrt((mu4 - var^2) / n)."""
    mean, var = _moments(law)
    mu4 = sum(w * (y - mean) ** 4 for w, y in law)
    return 4 * math.sqrt((mu4 - var**2) / n)


def _rows(x, n):
    return jnp.asarray(np.tile(np.asarray(x, np.int32), (n, 1))), jnp.asarray(np.tile(RESPONSE_MASK, (n, 1)))


X = TOY.seqs[int(np.argsort(TOY.probs)[len(TOY.probs) // 2])]  # a sequence of middling probability


def test_nelbo_estimator_expectation_and_variance_on_the_oracle():
    """With the exact denoiser the any-order bound is tight: its expectation is exactly log p(r | p), and
    its variance is that of the enumerated law; K stratified samples per row have less than 1/K of it."""
    table = _table()
    law = _nelbo_law(table, X)
    mean, var = _moments(law)
    exact = _exact_conditional(X)
    assert abs(mean - exact) < 1e-9  # the enumerated law's mean is the exact log-probability
    assert var > 1e-3  # a real estimator: nonzero variance to measure
    with jax.enable_x64(True):
        x0, resp = _rows(X, N)
        samples, est = losses.nelbo_log_prob(
            _table_apply(table), x0, resp, jax.random.key(0), mask_id=MASK, num_samples=1
        )
        samples = np.asarray(samples[:, 0])
        assert abs(samples.mean() - exact) < 4 * math.sqrt(var / N)
        assert abs(samples.var() - var) < _variance_tolerance(law, N)
        np.testing.assert_allclose(np.asarray(est), samples)
        k = 2  # R = 2 levels: each row draws l = 1 and l = 2 once
        _, est_k = losses.nelbo_log_prob(
            _table_apply(table), x0, resp, jax.random.key(1), mask_id=MASK, num_samples=k
        )
        est_k = np.asarray(est_k)
        assert abs(est_k.mean() - exact) < 4 * math.sqrt(var / k / N)
        assert est_k.var() < 0.9 * var / k  # stratified over l: below the i.i.d. K-sample variance


def test_mean_field_estimator_expectation_and_variance_on_the_oracle():
    """diffu-GRPO's one-step estimate: its Monte-Carlo mean and variance match the law enumerated over the
    prompt masks; without prompt masking it is the sum of the exact per-token marginals log p(r_i | p)
    (computed from the distribution, not the denoiser), which differs from log p(r | p): the mean-field gap."""
    table = _table()
    law = _mean_field_law(table, X, 0.15)
    mean, var = _moments(law)
    assert var > 1e-3
    with jax.enable_x64(True):
        x0, resp = _rows(X, N)
        per_token, est = losses.mean_field_log_prob(
            _table_apply(table), x0, resp, jax.random.key(2), mask_id=MASK, p_mask=0.15
        )
        est = np.asarray(est)
        assert abs(est.mean() - mean) < 4 * math.sqrt(var / N)
        assert abs(est.var() - var) < _variance_tolerance(law, N)
        np.testing.assert_allclose(np.asarray(per_token).sum(axis=1), est)
        assert np.all(np.asarray(per_token)[:, :PROMPT] == 0.0)
        _, est0 = losses.mean_field_log_prob(
            _table_apply(table), x0[:4], resp[:4], jax.random.key(3), mask_id=MASK, p_mask=0.0
        )
    same_prompt = np.all(TOY.seqs[:, :PROMPT] == X[:PROMPT], axis=1)
    marginals = []
    for i in range(PROMPT, L):
        hit = same_prompt & (TOY.seqs[:, i] == X[i])
        marginals.append(np.log(TOY.probs[hit].sum() / TOY.probs[same_prompt].sum()))
    np.testing.assert_allclose(np.asarray(est0), sum(marginals), rtol=1e-9)
    assert abs(sum(marginals) - _exact_conditional(X)) > 1e-3  # the mean-field gap exists on this toy


@pytest.mark.parametrize("estimator", ["nelbo", "mean_field"])
def test_shared_noise_cancels_in_the_policy_reference_difference(estimator):
    """Scored with one rng, a policy (a perturbed oracle) and its reference (the oracle) see the same masks:
    the variance of their difference is far below that with independent noise (VRPO's antithetic pairing)."""
    table = _table()
    rng = np.random.default_rng(0)
    policy = table + 0.2 * rng.standard_normal(table.shape)
    with jax.enable_x64(True):
        x0, resp = _rows(X, 2048)

        def estimate(t, key):
            if estimator == "nelbo":
                return losses.nelbo_log_prob(_table_apply(t), x0, resp, key, mask_id=MASK, num_samples=1)[1]
            return losses.mean_field_log_prob(_table_apply(t), x0, resp, key, mask_id=MASK, p_mask=0.5)[1]

        shared = np.asarray(estimate(policy, jax.random.key(4)) - estimate(table, jax.random.key(4)))
        independent = np.asarray(estimate(policy, jax.random.key(4)) - estimate(table, jax.random.key(5)))
    assert shared.var() < 0.1 * independent.var()


# ------------------------------------------------------------------------------------------------ GRPO math

GROUPS = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0], [0.5, 2.0, -1.0, 0.0]])


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_numpy(scale):
    adv = np.asarray(losses.group_advantages(jnp.asarray(GROUPS.reshape(-1)), 4, scale=scale))
    expected = []
    for g in GROUPS:
        a = g - g.mean()
        if scale:
            a = a / (np.std(g, ddof=1) + 1e-4)
        expected.append(a)
    np.testing.assert_allclose(adv, np.concatenate(expected), rtol=1e-5, atol=1e-6)
    assert np.all(adv[4:8] == 0.0)  # equal rewards: no signal
    with pytest.raises(ValueError, match="group_size=3"):
        losses.group_advantages(jnp.zeros(8), 3)


def _numpy_grpo(logp, old, ref, adv, mask, eps, beta):
    ratio = np.exp(logp - old)
    per = -np.minimum(ratio * adv[:, None], np.clip(ratio, 1 - eps, 1 + eps) * adv[:, None])
    d = ref - logp
    per = per + beta * (np.exp(d) - d - 1)
    return np.mean([(per[i] * mask[i]).sum() / max(mask[i].sum(), 1) for i in range(len(adv))])


def test_grpo_loss_matches_numpy_and_its_on_policy_gradient_is_the_policy_gradient():
    rng = np.random.default_rng(1)
    b, u = 8, 5
    logp = rng.normal(-1.0, 0.5, (b, u))
    old = logp + rng.normal(0.0, 0.3, (b, u))  # ratios well outside [0.8, 1.2]: clipping active
    ref = logp + rng.normal(0.0, 0.3, (b, u))
    adv = np.asarray(losses.group_advantages(jnp.asarray(rng.integers(0, 2, b).astype(float)), 4))
    mask = (rng.random((b, u)) < 0.7).astype(float)
    mask[0] = 0.0  # a row without units counts as 0
    loss, metrics = losses.grpo_loss(
        jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), clip_eps=0.2, beta=0.04,
        ref_logp=jnp.asarray(ref),
    )
    np.testing.assert_allclose(float(loss), _numpy_grpo(logp, old, ref, adv, mask, 0.2, 0.04), rtol=1e-5)
    ratio = np.exp(logp - old)
    assert 0 < float(metrics["clip_fraction"]) < 1
    np.testing.assert_allclose(float(metrics["clip_fraction"]), (np.abs(ratio - 1) > 0.2)[mask > 0].mean(), rtol=1e-5)
    d = ref - logp
    np.testing.assert_allclose(float(metrics["kl"]), (np.exp(d) - d - 1)[mask > 0].mean(), rtol=1e-5)
    # On policy (old = stop_gradient(logp), no KL): d loss / d logp = -A mask / units / B.
    grad = jax.grad(
        lambda lp: losses.grpo_loss(lp, jax.lax.stop_gradient(lp), jnp.asarray(adv), jnp.asarray(mask), clip_eps=0.2)[0]
    )(jnp.asarray(logp))
    units = np.maximum(mask.sum(axis=1, keepdims=True), 1)
    np.testing.assert_allclose(np.asarray(grad), -adv[:, None] * mask / units / b, rtol=1e-5, atol=1e-7)


def test_weighted_likelihood_loss_matches_numpy():
    rng = np.random.default_rng(2)
    logp = rng.normal(-3.0, 1.0, 12)
    adv = np.asarray(losses.group_advantages(jnp.asarray(GROUPS[[0, 2, 3]].reshape(-1)), 4))
    loss = float(losses.weighted_likelihood_loss(jnp.asarray(logp), jnp.asarray(adv), 4, psi=0.7))
    expected = []
    for lp, a in zip(logp.reshape(3, 4), adv.reshape(3, 4)):
        wp = np.exp(0.7 * a) / np.exp(0.7 * a).sum()
        wn = np.exp(-0.7 * a) / np.exp(-0.7 * a).sum()
        expected.append(((wn - wp) * lp).sum())
    np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)


# ------------------------------------------------------------------------------------------------ policy gradient


def _sampler_log_prob(table, x):
    """Exact log-probability of response x[PROMPT:] given the prompt under the sampler that unmasks one
    uniformly chosen position per step (ddlm's first_hitting): the average over orders of the chain rule."""
    resp = list(range(PROMPT, L))
    total = 0.0
    for order in itertools.permutations(resp):
        state = np.array(x)
        state[PROMPT:] = MASK
        lp = 0.0
        for i in order:
            lp += _state_log_prob(table, state, i, x[i])
            state[i] = x[i]
        total += math.exp(lp)
    return math.log(total / math.factorial(len(resp)))


@pytest.mark.parametrize("objective", ["grpo_nelbo", "grpo_mean_field", "wd1"])
def test_a_policy_gradient_step_raises_the_probability_of_the_rewarded_completion(objective):
    """One gradient step on a group of four completions of one prompt, rewards [1, 0, 0, 0]: the exact
    sampler probability of the rewarded completion goes up and that of the three others, together, down."""
    table = _table()
    prompt = list(X[:PROMPT])
    completions = [prompt + list(r) for r in [(0, 1), (1, 1), (2, 0), (1, 2)]]
    rewards = jnp.asarray([1.0, 0.0, 0.0, 0.0])
    adv = losses.group_advantages(rewards, 4)
    reps = 64  # copies of each completion: the estimators' noise averages out
    x0 = jnp.asarray(np.repeat(np.array(completions, np.int32), reps, axis=0))
    resp = jnp.asarray(np.tile(RESPONSE_MASK, (4 * reps, 1)))
    adv_rows = jnp.repeat(adv, reps)

    def loss(params):
        apply = lambda xt, t, ctx: params[TOY.index(xt, V + 1)]
        key = jax.random.key(6)
        if objective == "grpo_mean_field":
            per_token, _ = losses.mean_field_log_prob(apply, x0, resp, key, mask_id=MASK, p_mask=0.15)
            return losses.grpo_loss(
                per_token, jax.lax.stop_gradient(per_token), adv_rows, resp, clip_eps=0.2
            )[0]
        _, seq = losses.nelbo_log_prob(apply, x0, resp, key, mask_id=MASK, num_samples=2)
        if objective == "wd1":
            per_completion = seq.reshape(4, reps).mean(axis=1)
            return losses.weighted_likelihood_loss(per_completion, adv, 4)
        return losses.grpo_loss(
            seq[:, None], jax.lax.stop_gradient(seq[:, None]), adv_rows, jnp.ones((4 * reps, 1)), clip_eps=0.2
        )[0]

    with jax.enable_x64(True):
        params = jnp.asarray(table)
        grad = jax.grad(loss)(params)
        new = np.asarray(params - 0.5 * grad)
    before = [math.exp(_sampler_log_prob(table, np.array(c))) for c in completions]
    after = [math.exp(_sampler_log_prob(new, np.array(c))) for c in completions]
    assert after[0] > before[0] * 1.01
    assert sum(after[1:]) < sum(before[1:]) * 0.99
