"""DUEL's exact likelihood (ddlm/eval/exact.py) on the toy oracle: for the parallel sampler with a state-
determined rule, exp(log-likelihood) over all V^L sequences equals the sampler's output law computed by
enumerating every branch of the sampler (numpy, written here from the sampler's definition), and the
frequencies of ddlm's own parallel_sample; bad settings are one clear error."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm import schedules
from ddlm.eval import exact, oracle
from ddlm.sampling import parallel

SCHEDULE = schedules.LogLinearSchedule()


def perturbed_oracle(toy, scale=1.5, seed=4):
    """The exact absorbing denoiser plus fixed noise per (state, position, token): conditionals that no joint
    distribution shares, so the order of unmasking changes the law (with exact ones every order gives p)."""
    table = np.log(np.maximum(toy.absorbing_posterior_table(), 1e-300))
    noise = np.random.default_rng(seed).normal(size=table.shape) * scale
    table = np.where(table > -600, table + noise, -1e30)  # keep the impossible ids (and the mask) impossible
    table_j = jnp.asarray(table)
    fn = lambda xt, t=None: table_j[toy.index(xt, toy.num_tokens + 1)]
    return fn, table


def enumerate_law(toy, table, x_init, *, rule, steps, block_length, temperature):
    """{sequence tuple: probability} of the parallel sampler's output from x_init, by following every branch:
    at each step the rule's positions (from the canvas alone), every joint assignment of their tokens."""
    length, v, m = toy.length, toy.num_tokens, toy.mask_id
    bl = block_length or length
    spb = steps // (length // bl)
    law = {}

    def probs(state):
        logits = table[int(np.dot(state, (v + 1) ** np.arange(length - 1, -1, -1)))][:, :v] / temperature
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)  # [L, V] over the real tokens

    def score(pr):
        if rule == "margin":
            top = np.sort(pr, axis=-1)[:, ::-1]
            return top[:, 0] - top[:, 1]
        return np.sum(np.where(pr > 0, pr * np.log(np.maximum(pr, 1e-300)), 0.0), axis=-1)  # minus the entropy

    def walk(state, block, j, weight):
        if block * bl >= length:
            law[tuple(state)] = law.get(tuple(state), 0.0) + weight
            return
        lo, hi = block * bl, (block + 1) * bl
        editable = [l for l in range(lo, hi) if state[l] == m]
        if not editable or j >= min(spb, bl):
            return walk(state, block + 1, 0, weight)
        pr = probs(state)
        count = -(-len(editable) // max(spb - j, 1))
        s = score(pr).astype(np.float32)
        chosen = sorted(editable, key=lambda l: (-s[l], l))[:count]
        for tokens in itertools.product(range(v), repeat=len(chosen)):
            new = list(state)
            w = weight
            for l, tok in zip(chosen, tokens):
                new[l] = tok
                w *= pr[l, tok]
            walk(new, block, j + 1, w)

    walk(list(x_init), 0, 0, 1.0)
    return law


CASES = [
    ("margin", 2, 0, 1.0, [None, None, None, None]),  # two tokens a step, one block
    ("entropy", 4, 2, 0.7, [None, None, None, None]),  # one a step, blocks of 2, temperature 0.7
    ("margin", 2, 2, 1.3, [1, None, None, None]),  # a prompt token, two blocks of 1 step each
]


@pytest.mark.parametrize("rule,steps,block_length,temperature,init", CASES)
def test_duel_equals_the_enumerated_law_of_the_sampler(rule, steps, block_length, temperature, init):
    toy = oracle.ToyDistribution(num_tokens=3, length=4, seed=1)
    with jax.enable_x64(True):
        fn, table = perturbed_oracle(toy)
        x_init = [toy.mask_id if i is None else i for i in init]
        law = enumerate_law(toy, table, x_init, rule=rule, steps=steps, block_length=block_length, temperature=temperature)
        seqs = toy.seqs
        logp = exact.duel_log_likelihood(
            fn,
            seqs,
            np.tile(np.asarray(x_init, np.int32), (len(seqs), 1)),
            mask_id=toy.mask_id,
            schedule=SCHEDULE,
            rule=rule,
            steps=steps,
            block_length=block_length,
            temperature=temperature,
        )
        got = np.exp(np.asarray(logp, np.float64))
    expected = np.array([law.get(tuple(s), 0.0) for s in seqs])
    assert expected.sum() == pytest.approx(1.0) and got.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=1e-4)
    # a prompt the sequence contradicts is impossible
    if init[0] is not None:
        assert np.all(got[seqs[:, 0] != init[0]] == 0.0)
    # the order mattered: the law is not the toy distribution the oracle came from
    assert np.abs(expected - toy.probs).max() > 1e-2


def test_duel_matches_the_frequencies_of_ddlms_parallel_sampler():
    """The likelihood is of ddlm's own sampler: 40,000 draws of parallel_sample (rule margin, two tokens a
    step) land on each sequence at the rate exp(log-likelihood)."""
    toy = oracle.ToyDistribution(num_tokens=3, length=4, seed=1)
    n = 40_000
    with jax.enable_x64(True):
        fn, _ = perturbed_oracle(toy)
        x_init = jnp.full((n, 4), toy.mask_id, jnp.int32)
        out = jax.jit(
            lambda key: parallel.parallel_sample(
                fn, key, x_init, mask_id=toy.mask_id, schedule=SCHEDULE, rule="margin", steps=2, temperature=1.0
            ).tokens
        )(jax.random.key(7))
        counts = np.bincount(np.asarray(toy.index(out)), minlength=len(toy.seqs))
        logp = exact.duel_log_likelihood(
            fn, toy.seqs, jnp.full((len(toy.seqs), 4), toy.mask_id, jnp.int32), mask_id=toy.mask_id,
            schedule=SCHEDULE, rule="margin", steps=2,
        )
    p = np.exp(np.asarray(logp, np.float64))
    freq = counts / n
    assert np.all(np.abs(freq - p) <= 4.5 * np.sqrt(p * (1 - p) / n) + 1e-4)


def test_settings_without_an_exact_likelihood_are_refused():
    toy = oracle.ToyDistribution(num_tokens=3, length=4)
    fn, _ = perturbed_oracle(toy)
    x = jnp.zeros((1, 4), jnp.int32)
    init = jnp.full((1, 4), toy.mask_id, jnp.int32)
    common = dict(mask_id=toy.mask_id, schedule=SCHEDULE, steps=4)
    with pytest.raises(ValueError, match="rule='low_confidence'.*one of \\('margin', 'entropy'\\)"):
        exact.duel_log_likelihood(fn, x, init, rule="low_confidence", **common)
    with pytest.raises(ValueError, match="temperature=0"):
        exact.duel_log_likelihood(fn, x, init, rule="margin", temperature=0.0, **common)
    with pytest.raises(ValueError, match="parallel_remasking='cap'"):
        exact.check_deterministic("margin", 1.0, remasking="cap")
    with pytest.raises(ValueError, match="one shape"):
        exact.duel_log_likelihood(fn, jnp.zeros((1, 3), jnp.int32), init, rule="margin", **common)
