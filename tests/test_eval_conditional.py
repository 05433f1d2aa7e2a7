"""Conditional likelihood (ddlm/eval/conditional.py, losses.any_order_conditional_loss / sample_response_mask)
on the exact toy oracle, 5 tokens over 3 symbols, prompt = the first 2, response = the last 3: the estimator's
expectation is log p(response | prompt) exactly, its Monte-Carlo estimate matches within its standard error,
which shrinks as 1/sqrt(samples); multiple-choice scoring picks the most likely continuation."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm import losses
from ddlm.eval import conditional

try:  # the toy oracle is moving to ddlm/eval/oracle.py (with a re-export in tests/)
    from ddlm.eval import oracle
except ImportError:
    import oracle

TOY = oracle.ToyDistribution(num_tokens=3, length=5, seed=1, concentration=0.5)
V, L, MASK, P = TOY.num_tokens, TOY.length, TOY.mask_id, 2
R = L - P
RESPONSE = np.arange(L) >= P


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def exact_conditional_log_probs():
    """log p(x^{>=P} | x^{<P}) for every toy sequence [V^L], from the joint table."""
    prompt_index = TOY.seqs[:, 0] * V + TOY.seqs[:, 1]
    prompt_prob = np.bincount(prompt_index, weights=TOY.probs, minlength=V**P)
    return np.log(TOY.probs) - np.log(prompt_prob[prompt_index])


def oracle_denoise_fn():
    den = TOY.absorbing_denoiser()
    return lambda xt, t: den(xt)


def test_estimator_expectation_is_the_exact_conditional_log_likelihood():
    """Enumerate every l in 1..R and every set of l masked response positions with the estimator's
    probabilities (1/R) (1/C(R, l)): the expectation equals log p(r | p) for every (p, r) -- the chain rule
    in every order. A weight L/l (the whole row) instead of R/l would miss by a factor 5/3."""
    subsets = [s for l in range(1, R + 1) for s in itertools.combinations(range(P, L), l)]
    x0 = np.repeat(TOY.seqs, len(subsets), axis=0)
    masked = np.zeros((len(subsets), L), bool)
    for i, s in enumerate(subsets):
        masked[i, list(s)] = True
    masked = np.tile(masked, (len(TOY.seqs), 1))
    xt = np.where(masked, MASK, x0)
    logits = TOY.absorbing_denoiser()(jnp.asarray(xt))
    per = losses.any_order_conditional_loss(
        logits, jnp.asarray(x0), jnp.asarray(xt), MASK, jnp.broadcast_to(jnp.asarray(RESPONSE), x0.shape)
    )
    draw = -np.asarray(per).sum(1).reshape(len(TOY.seqs), len(subsets))
    prob = np.array([1 / R / math.comb(R, len(s)) for s in subsets])
    expectation = draw @ prob
    np.testing.assert_allclose(expectation, exact_conditional_log_probs(), rtol=0, atol=1e-9)
    assert np.ptp(draw, axis=1).max() > 0.5  # single draws do differ: the variance is real


def test_sample_response_mask_draws_l_and_positions_uniformly():
    response = jnp.asarray(np.array([[0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], bool))
    for stratified in (True, False):
        keys = jax.random.split(jax.random.key(0), 20_000)
        masks = np.asarray(
            jax.vmap(lambda k, s=stratified: losses.sample_response_mask(k, response, s))(keys)
        )
        assert not (masks & ~np.asarray(response)).any()  # nothing outside the response
        for row in range(3):
            r = int(response[row].sum())
            counts = np.bincount(masks[:, row].sum(1), minlength=r + 1)
            assert counts[0] == 0
            np.testing.assert_allclose(counts[1:] / len(keys), 1 / r, atol=0.015)  # l ~ U{1..R}
            # every response position equally likely: E[l] / R = (R + 1) / (2 R)
            freq = masks[:, row][:, np.asarray(response[row])].mean(0)
            np.testing.assert_allclose(freq, (r + 1) / (2 * r), atol=0.015)


@pytest.mark.parametrize("stratified", [True, False], ids=["stratified", "iid"])
def test_monte_carlo_estimate_matches_exact_and_its_se_shrinks(stratified):
    estimate = conditional.make_estimator(
        oracle_denoise_fn(), mask_id=MASK, batch_size=16, stratified=stratified
    )
    exact = exact_conditional_log_probs()
    seq = int(np.argsort(TOY.probs)[len(TOY.probs) // 2])  # a typical (not extreme) sequence
    tokens = TOY.seqs[seq]
    small = estimate(jax.random.key(1), tokens, RESPONSE, num_samples=256)
    large = estimate(jax.random.key(2), tokens, RESPONSE, num_samples=4096)
    for est in (small, large):
        assert est.se > 0 and abs(est.mean - exact[seq]) < 4 * est.se, (est, exact[seq])
    assert 0.15 < large.se / small.se < 0.4, (small.se, large.se)  # sqrt(256 / 4096) = 0.25


def test_multiple_choice_picks_the_most_likely_continuation():
    """All 27 responses to the prompt whose best response leads the second by the widest margin: the
    estimated scores pick it, and every estimate lies within 4.5 SE of the exact log-likelihood."""
    exact = exact_conditional_log_probs().reshape(V**P, V**R)  # [prompt index, response index]
    top2 = np.sort(exact, axis=1)[:, -2:]
    prompt_index = int(np.argmax(top2[:, 1] - top2[:, 0]))
    assert top2[prompt_index, 1] - top2[prompt_index, 0] > 0.5
    prompt = TOY.seqs[prompt_index * V**R, :P]
    choices = [list(c) for c in itertools.product(range(V), repeat=R)]
    estimate = conditional.make_estimator(oracle_denoise_fn(), mask_id=MASK, batch_size=16)
    result = conditional.multiple_choice(estimate, jax.random.key(3), prompt, choices, num_samples=256)
    assert result.best == int(np.argmax(exact[prompt_index]))
    for est, want in zip(result.estimates, exact[prompt_index]):
        assert abs(est.mean - want) < 4.5 * est.se, (est, want)


def test_length_normalisation_with_a_context_free_denoiser():
    """A denoiser that predicts the same q(.) everywhere: the log-likelihood is sum_i log q(r_i), and every
    draw equals it when a choice repeats one token (zero variance). 'none' prefers the short unlikely
    choice, 'tokens' and 'chars' the long likely one."""
    log_q = jnp.log(jnp.array([0.5, 0.3, 0.2, 1e-30]))
    estimate = conditional.make_estimator(
        lambda xt, t: jnp.broadcast_to(log_q, xt.shape + (4,)), mask_id=3, batch_size=4
    )
    choices, texts = [[0, 0, 0], [1]], ["aaa", "b"]
    for normalize, best in (("none", 1), ("tokens", 0), ("chars", 0)):
        result = conditional.multiple_choice(
            estimate, jax.random.key(0), [2], choices, normalize=normalize, choice_texts=texts, num_samples=8
        )
        assert result.best == best, (normalize, result)
        np.testing.assert_allclose([e.mean for e in result.estimates], [3 * math.log(0.5), math.log(0.3)])
        assert all(e.se == 0 for e in result.estimates)
    # Padded rows score the end tokens too: p(choice, then end | prompt).
    padded = conditional.multiple_choice(
        estimate, jax.random.key(0), [2], choices, num_samples=512, length=6, end_id=2
    )
    want = [3 * math.log(0.5) + 2 * math.log(0.2), math.log(0.3) + 4 * math.log(0.2)]
    for est, w in zip(padded.estimates, want):
        assert 0 < est.se and abs(est.mean - w) < 4 * est.se, (est, w)


def test_bad_arguments_are_one_clear_error():
    estimate = conditional.make_estimator(oracle_denoise_fn(), mask_id=MASK, batch_size=16)
    tokens = TOY.seqs[0]
    with pytest.raises(ValueError, match="num_samples=40 must be a multiple of batch_size=16"):
        estimate(jax.random.key(0), tokens, RESPONSE, num_samples=40)
    with pytest.raises(ValueError, match="stratified draws need at least 2 batches"):
        estimate(jax.random.key(0), tokens, RESPONSE, num_samples=16)
    with pytest.raises(ValueError, match="response_mask selects no position"):
        estimate(jax.random.key(0), tokens, np.zeros(L, bool), num_samples=32)
    with pytest.raises(ValueError, match="normalize must be one of"):
        conditional.multiple_choice(estimate, jax.random.key(0), [0, 1], [[0, 1, 2]], normalize="bytes")
    with pytest.raises(ValueError, match="normalize='chars' needs choice_texts"):
        conditional.multiple_choice(estimate, jax.random.key(0), [0, 1], [[0, 1, 2]], normalize="chars")
    with pytest.raises(ValueError, match="more than length=4"):
        conditional.choice_row([0, 1], [0, 1, 2], length=4, end_id=0)
