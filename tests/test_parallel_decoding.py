"""Commit rules (ddlm/sampling/rules.py) and the parallel decoder (ddlm/sampling/parallel.py).

Against the exact toy oracle: random order at one token per step samples the data exactly; so do the
entropy and margin orders (an order that depends on x_t alone, not on the drawn token, is still an
exact any-order factorisation); low_confidence does not (the order depends on the drawn token, which
favours likely tokens); its exact output distribution is enumerated here and the samples match it.
"""

import collections
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import oracle
from ddlm import losses, schedules, sampling
from ddlm.sampling import conditioning, parallel, rules
from test_sampling import (
    FAST,
    L,
    MASK,
    N_SAMPLES,
    TOY,
    V,
    all_masked,
    assert_bernoulli_sums,
    fixed_denoiser,
    histogram,
    remask_weights,
    remdm_sigma,
    tjit,
    to_clean_distribution,
    tv,
    tv_bound,
)

SCHED = schedules.LogLinearSchedule()
RULE_NAMES = tuple(rules.RULES)


def cfg(**kw):
    c = sampling.default_config()
    c.name = "parallel"
    for k, v in kw.items():
        c[k] = v
    return c


def run(x, key, denoise_fn=None, mask_id=MASK, return_trajectory=False, **kw):
    """make_sampler(cfg(**kw)) jitted on x; the SampleOutput as numpy. Default network: the toy oracle."""
    fn = sampling.make_sampler(
        cfg(**kw),
        denoise_fn=denoise_fn or TOY.absorbing_denoiser(),
        schedule=SCHED,
        mask_id=mask_id,
        return_trajectory=return_trajectory,
    )
    return jax.tree.map(np.asarray, tjit(lambda r: fn(r, jnp.asarray(x)))(jax.random.key(key)))


# A time-free stand-in network for longer sequences: fixed logits from (position, token, context).
STAND_IN_VOCAB, STAND_IN_MASK = 17, 16


def stand_in(xt, t):
    del t
    pos = jnp.arange(xt.shape[1])[None, :, None]
    ids = jnp.arange(STAND_IN_VOCAB)[None, None, :]
    context = jnp.sum(xt, axis=-1)[:, None, None]
    return 3.0 * jnp.sin(0.37 * pos * ids + 0.11 * context)


# ------------------------------------------------------------------------------------------ the rules


def _random_candidates(seed, batch=96, n=8, vocab=6, max_sharpness=10.0):
    """Candidates with confidences spread from flat to peaked (one-hot in float32 at the top of the
    sharpness range), random editable masks (some rows empty). numpy draws: no compilations."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, n, vocab)) * rng.uniform(0.0, max_sharpness, (batch, n, 1))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tokens = (np.cumsum(np.exp(logp), -1) < rng.uniform(size=(batch, n, 1))).sum(-1).clip(0, vocab - 1)
    editable = rng.uniform(size=(batch, n)) < 0.6
    editable[:4] = False  # rows with nothing to commit
    return rules.Candidates(
        jnp.asarray(tokens, jnp.int32), jnp.asarray(logp, jnp.float32), jnp.asarray(editable)
    )


def _np_reference_count(conf, h, editable, name, opts):
    """Tokens an adaptive rule commits in one row, from the papers' definitions (numpy, float64)."""
    c = np.sort(conf[editable])[::-1]
    hs = h[editable][np.argsort(-conf[editable], kind="stable")]
    if len(c) == 0:
        return 0
    if name == "threshold":
        k = int(np.sum(c > opts.threshold))
    elif name == "factor":  # Fast-dLLM: the n-th most confident must reach 1 - f / (n + 1)
        k = 0
        while k < len(c) and (k + 2) * (1.0 - c[k]) <= opts.factor + 1e-6:
            k += 1
    else:  # EB-sampler: the largest prefix with sum H - max H <= gamma
        k = 0
        while k < len(c) and hs[: k + 1].sum() - hs[: k + 1].max() <= opts.gamma + 1e-6:
            k += 1
    return max(k, 1)


def test_every_rule_commits_a_nonempty_subset_of_the_editable_positions():
    cand = _random_candidates(0)
    n = np.asarray(cand.editable.sum(-1))
    count = jnp.asarray(np.maximum(1, (np.arange(len(n)) % 4 + 1) * n // 4), jnp.int32)
    conf = np.asarray(rules.confidence(cand), np.float64)
    h = np.asarray(rules.entropy(cand), np.float64)
    editable = np.asarray(cand.editable)
    for opts in (rules.RuleOptions(0.9, 1.0, 0.5), rules.RuleOptions(0.5, 3.0, 2.0)):
        for name in RULE_NAMES:
            rule = rules.RULES[name]
            commit = np.asarray(tjit(rule.fn)(cand, count, jax.random.key(1), opts))
            assert not np.any(commit & ~editable), name
            assert np.all(commit.sum(-1)[n > 0] >= 1) and np.all(commit.sum(-1)[n == 0] == 0), name
            if rule.fixed_count:
                np.testing.assert_array_equal(commit.sum(-1), np.minimum(np.asarray(count), n), err_msg=name)
            else:
                want = [_np_reference_count(conf[b], h[b], editable[b], name, opts) for b in range(len(n))]
                np.testing.assert_array_equal(commit.sum(-1), want, err_msg=f"{name} {opts}")
            # What is committed is the best by the rule's score: no uncommitted editable one beats it.
            score = {"random": None, "margin": np.asarray(rules.margin(cand)), "entropy": -h}.get(name, conf)
            if score is not None:
                for b in np.nonzero(commit.any(-1) & (commit.sum(-1) < n))[0]:
                    assert score[b][commit[b]].min() >= score[b][editable[b] & ~commit[b]].max(), (name, b)


def test_scores_match_their_definitions_and_ties_go_to_the_earlier_position():
    """confidence = p(candidate), entropy = -sum p log p over the ids with mass (a filtered id, log p = NEG_INF,
    carries none), margin = top-1 minus top-2 probability: numpy float64 references."""
    cand = _random_candidates(3)
    logp = np.asarray(cand.log_probs, np.float64)
    logp[:8, :, -1] = float(losses.NEG_INF)  # a filtered-out id in some rows
    cand = cand._replace(log_probs=jnp.asarray(logp, jnp.float32))
    p = np.exp(logp)
    tokens = np.asarray(cand.tokens)
    np.testing.assert_allclose(rules.confidence(cand), np.take_along_axis(p, tokens[..., None], -1)[..., 0], rtol=1e-5)
    want_h = -np.sum(np.where(p > 0, p * logp, 0.0), -1)
    np.testing.assert_allclose(rules.entropy(cand), want_h, rtol=1e-4, atol=1e-6)
    top = np.sort(p, -1)[..., ::-1]
    np.testing.assert_allclose(rules.margin(cand), top[..., 0] - top[..., 1], rtol=1e-5, atol=1e-7)
    # commit_best: equal scores are taken left to right; non-editable positions never.
    scores = jnp.asarray([[0.5, 0.9, 0.5, 0.5, 0.9]])
    editable = jnp.asarray([[True, False, True, True, True]])
    for count, want in ((1, [0, 0, 0, 0, 1]), (2, [1, 0, 0, 0, 1]), (3, [1, 0, 1, 0, 1]), (9, [1, 0, 1, 1, 1])):
        got = rules.commit_best(scores, editable, jnp.asarray([count]))
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want, bool), err_msg=str(count))
    # No steps left (never asked by the decoder, which counts down to 1): commit everything.
    assert int(rules.num_transfer_tokens(jnp.int32(5), jnp.int32(0))) == 5


def test_threshold_above_one_factor_zero_and_gamma_zero_commit_one_token():
    """(With no candidate certain: a zero-entropy token costs EB nothing, so gamma = 0 takes it too.)"""
    cand = _random_candidates(2, max_sharpness=3.0)
    n = np.asarray(cand.editable.sum(-1))
    for name, opts in (
        ("threshold", rules.RuleOptions(threshold=1.5)),
        ("threshold", rules.RuleOptions(threshold=1.0)),
        ("factor", rules.RuleOptions(factor=0.0)),
        ("entropy_bounded", rules.RuleOptions(gamma=0.0)),
    ):
        commit = np.asarray(rules.RULES[name].fn(cand, None, None, opts))
        np.testing.assert_array_equal(commit.sum(-1), np.minimum(n, 1), err_msg=f"{name} {opts}")


def test_num_transfer_tokens_is_lladas_schedule():
    def llada(n, steps):  # LLaDA's get_num_transfer_tokens, one row
        base, rem = divmod(n, steps)
        return [base + 1] * rem + [base] * (steps - rem)

    for n, steps in itertools.product(range(0, 20), range(1, 9)):
        left, got = n, []
        for j in range(steps):
            k = int(rules.num_transfer_tokens(jnp.int32(left), jnp.int32(steps - j)))
            got.append(k)
            left -= k
        assert got == llada(n, steps), (n, steps, got)


# ------------------------------------------------------------------------------------------ exact distributions


@pytest.mark.parametrize("rule,block_length", [("random", 0), ("random", 2), ("entropy", 0), ("margin", 2)])
def test_one_token_per_step_in_an_order_free_of_the_draw_reproduces_the_data(rule, block_length):
    out = run(all_masked(N_SAMPLES), 20, rule=rule, steps=L, block_length=block_length)
    emp = histogram(out.tokens)
    assert tv(emp, TOY.probs) < tv_bound(TOY.probs, N_SAMPLES), (rule, tv(emp, TOY.probs))
    assert int(out.nfe) == L


def test_infilling_with_random_order_samples_the_exact_conditional():
    known = {1: 2, 3: 0}
    x = jnp.asarray(conditioning.initial_tokens(N_SAMPLES // 2, L, MASK, constraints=known))
    consistent = np.all([TOY.seqs[:, p] == v for p, v in known.items()], axis=0)
    want = np.where(consistent, TOY.probs, 0.0) / TOY.probs[consistent].sum()
    out = run(x, 21, rule="random", steps=2)
    assert all(np.all(out.tokens[:, p] == v) for p, v in known.items())
    assert tv(histogram(out.tokens), want) < tv_bound(want[consistent], len(x)), tv(
        histogram(out.tokens), want
    )
    assert int(out.nfe) == 2


def exact_low_confidence_distribution():
    """Output distribution over clean sequences of rule=low_confidence at one token per step, one block,
    with the exact denoiser: every masked position draws a candidate, the most probable candidate
    (first position on ties) is committed. Enumerated over all states and candidate draws (float64)."""
    states = TOY.abs_states
    p0 = TOY.absorbing_posterior_table()
    index = {tuple(s): i for i, s in enumerate(states)}
    trans = np.zeros((len(states), len(states)))
    for i, s in enumerate(states):
        pos = [l for l in range(L) if s[l] == MASK]
        if not pos:
            trans[i, i] = 1.0
            continue
        for draw in itertools.product(range(V), repeat=len(pos)):
            conf = [p0[i, l, v] for l, v in zip(pos, draw)]
            w = int(np.argmax(conf))
            nxt = s.copy()
            nxt[pos[w]] = draw[w]
            trans[i, index[tuple(nxt)]] += np.prod(conf)
    dist = np.zeros(len(states))
    dist[index[(MASK,) * L]] = 1.0
    for _ in range(L):
        dist = dist @ trans
    return to_clean_distribution(dist, states)


def test_low_confidence_is_biased_and_matches_its_exact_distribution():
    exact = exact_low_confidence_distribution()
    out = run(all_masked(N_SAMPLES), 22, rule="low_confidence", steps=L)
    emp = histogram(out.tokens)
    bias = tv(exact, TOY.probs)
    print(f"low_confidence, one token per step: TV(exact output, data) = {bias:.3f}")
    assert tv(emp, exact) < tv_bound(exact, N_SAMPLES), (tv(emp, exact), tv_bound(exact, N_SAMPLES))
    assert bias > 3 * tv_bound(TOY.probs, N_SAMPLES), bias
    # Mode-seeking: the most likely sequences gain mass.
    top = np.argsort(-TOY.probs)[:5]
    assert exact[top].sum() > TOY.probs[top].sum()


def test_degenerate_adaptive_rules_are_low_confidence_one_per_step_and_loose_ones_commit_all_at_once():
    x = all_masked(2000)
    base = run(x, 23, rule="low_confidence", steps=L)
    for kw in (dict(threshold=1.0), dict(factor=0.0), dict(gamma=0.0)):
        name = {"threshold": "threshold", "factor": "factor", "gamma": "entropy_bounded"}[next(iter(kw))]
        out = run(x, 23, rule=name, **kw)
        np.testing.assert_array_equal(out.tokens, base.tokens, err_msg=name)
        assert int(out.nfe) == L, name
    for name, kw in (
        ("threshold", dict(threshold=1e-9)),
        ("factor", dict(factor=10.0)),
        ("entropy_bounded", dict(gamma=100.0)),
    ):
        out = run(x, 23, rule=name, **kw)
        assert int(out.nfe) == 1 and not np.any(out.tokens == MASK), name


# ------------------------------------------------------------------------------------------ the decoder


def test_blocks_decode_left_to_right_with_lladas_count_per_step_and_keep_known_tokens():
    """16 positions, blocks of 8, 6 steps (3 per block). Block 0 holds a 3-token prompt (5 masked: LLaDA
    commits 2, 2, 1), block 1 a constraint (7 masked: 3, 2, 2)."""
    x = conditioning.initial_tokens(4, 16, STAND_IN_MASK, prompt_ids=[1, 2, 3], constraints={12: 5})
    kw = dict(denoise_fn=stand_in, mask_id=STAND_IN_MASK, rule="low_confidence", steps=6, block_length=8)
    out = run(x, 30, return_trajectory=True, **kw)
    masked = out.trajectory == STAND_IN_MASK  # [7, B, 16]
    committed = masked[:-1] & ~masked[1:]
    np.testing.assert_array_equal(committed.sum(-1), np.repeat([[2], [2], [1], [3], [2], [2]], 4, axis=1))
    assert not np.any(committed[:3, :, 8:]), "block 1 changed before block 0 was done"
    assert not np.any(masked[-1]) and int(out.nfe) == 6
    assert np.all(out.trajectory[:, :, :3] == [1, 2, 3]) and np.all(out.trajectory[:, :, 12] == 5)
    # temperature 0 (LLaDA's default) is greedy: the same tokens for any key.
    a, b = (run(x, k, temperature=0.0, **kw).tokens for k in (31, 32))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(out.tokens, run(x, 31, **kw).tokens)


def test_remdm_remasking_inside_blocks():
    x = conditioning.initial_tokens(8, 16, STAND_IN_MASK, constraints={5: 4})
    kw = dict(denoise_fn=stand_in, mask_id=STAND_IN_MASK, rule="low_confidence", steps=8, block_length=8)
    plain = run(x, 33, **kw)
    np.testing.assert_array_equal(
        run(x, 33, parallel_remasking="rescale", eta=0.0, **kw).tokens, plain.tokens
    )
    for strategy in ("cap", "rescale", "confidence"):
        out = run(x, 33, parallel_remasking=strategy, eta=0.5, return_trajectory=True, **kw)
        masked = out.trajectory == STAND_IN_MASK
        assert np.sum(~masked[:-1] & masked[1:]) > 0, f"{strategy}: nothing was remasked"
        assert not np.any(masked[-1]) and int(out.nfe) == 8, strategy
        assert np.all(out.trajectory[:, :, 5] == 4), strategy


def exact_single_row_remasking_law(toy, steps, strategy, eta):
    """Output law over toy.seqs of rule='random' with ReMDM remasking, one block, for a batch of ONE
    all-masked row (float64, enumerated). At step j of `steps`: count = ceil(masked / (steps - j))
    uniformly random masked positions take a draw from the exact p(x_0 | x_t); every position decoded at an
    earlier step is remasked independently with probability sigma_j (times softmax(-confidence) over the
    decoded positions for 'confidence'), on the block's grid alpha_t = j / steps, alpha_s = (j + 1) / steps.
    A row with nothing masked is finished: it never changes again (a batch of one stops there)."""
    table = toy.absorbing_posterior_table()
    n_pos, mask = toy.length, toy.mask_id
    dist = {((mask,) * n_pos, (0.0,) * n_pos): 1.0}
    for j in range(steps):
        sigma = remdm_sigma(strategy, eta, (j + 1) / steps, j / steps)
        nxt = collections.defaultdict(float)
        for (x, conf), pr in dist.items():
            hidden = [l for l in range(n_pos) if x[l] == mask]
            if not hidden:
                nxt[(x, conf)] += pr
                continue
            decoded = [l for l in range(n_pos) if x[l] != mask]
            if strategy == "confidence" and decoded:
                w = np.exp(-np.array([conf[l] for l in decoded]))
                sig = dict(zip(decoded, sigma * w / w.sum()))
            else:
                sig = dict.fromkeys(decoded, sigma)
            post = table[int(toy.index(np.asarray(x), toy.num_tokens + 1))]
            count = min(-(-len(hidden) // (steps - j)), len(hidden))
            subsets = list(itertools.combinations(hidden, count))
            for chosen in subsets:
                for draw in itertools.product(range(toy.num_tokens), repeat=count):
                    p_draw = np.prod([post[l, v] for l, v in zip(chosen, draw)]) / len(subsets)
                    for remask in itertools.product((False, True), repeat=len(decoded)):
                        p_remask = np.prod([sig[l] if r else 1.0 - sig[l] for l, r in zip(decoded, remask)])
                        if p_remask == 0.0:
                            continue
                        y, c = list(x), list(conf)
                        for l, v in zip(chosen, draw):
                            y[l], c[l] = v, post[l, v]
                        for l, r in zip(decoded, remask):
                            if r:
                                y[l] = mask
                        nxt[(tuple(y), tuple(c))] += pr * p_draw * p_remask
        dist = nxt
    law = np.zeros(len(toy.seqs))
    for (x, _), pr in dist.items():
        assert mask not in x, "the last step of a block commits every masked position"
        law[int(toy.index(np.asarray(x)))] += pr
    return law


@pytest.mark.parametrize("strategy", ["cap", "rescale", "confidence"])
def test_remasking_a_rows_law_does_not_depend_on_the_rest_of_the_batch(strategy):
    """Issue 21 item 1: two tokens, p = [.45, .05, .05, .45] over {0, 1}^2, rule random, 4 steps, eta 0.5.
    A batch of one stops stepping once its block is decoded; in a big batch the finished rows used to be
    remasked and re-decoded while other rows still had masks (P(x0 != x1) 0.15 instead of 0.10 for 'cap').
    The batch's histogram must match the exact law of a batch of one."""
    toy = oracle.ToyDistribution(num_tokens=2, length=2)
    toy.probs = np.array([0.45, 0.05, 0.05, 0.45])
    steps, eta, n = 4, 0.5, 20000
    exact = exact_single_row_remasking_law(toy, steps, strategy, eta)
    x = jnp.full((n, 2), toy.mask_id, jnp.int32)
    kw = dict(mask_id=toy.mask_id, schedule=SCHED, rule="random", steps=steps, remasking=strategy, eta=eta)
    out = tjit(lambda r: parallel.parallel_sample(toy.absorbing_denoiser(), r, x, **kw))(jax.random.key(35))
    tokens = np.asarray(out.tokens)
    assert tokens.min() >= 0 and tokens.max() < 2
    emp = np.bincount(np.asarray(toy.index(tokens)), minlength=4) / n
    assert tv(emp, exact) < tv_bound(exact, n), (strategy, emp, exact)
    differ, want = np.mean(tokens[:, 0] != tokens[:, 1]), exact[1] + exact[2]
    assert abs(differ - want) < 5 * np.sqrt(want * (1 - want) / n), (strategy, differ, want)
    assert int(out.nfe) == steps


def test_remasking_freezes_a_row_once_its_block_is_decoded():
    """Even rows have one masked position: step 0 decodes it and the row is done. The odd rows keep the
    block going for 4 steps; with eta = 1, sigma_1 = min(1, (1 - 2/4) / (1/4)) = 1, so a finished row that
    was not frozen would have its decoded token remasked at step 1 with certainty (every strategy)."""
    x = np.full((8, L), MASK, np.int32)
    x[0::2, :3] = [2, 0, 1]
    kw = dict(mask_id=MASK, schedule=SCHED, rule="random", steps=4, eta=1.0, return_trajectory=True)
    for strategy in ("cap", "rescale", "confidence"):
        sample = lambda r: parallel.parallel_sample(
            TOY.absorbing_denoiser(), r, jnp.asarray(x), remasking=strategy, **kw
        )
        traj = np.asarray(tjit(sample)(jax.random.key(36)).trajectory)  # [5, B, L]
        assert traj.shape == (5, 8, L) and not np.any(traj[-1] == MASK), strategy
        np.testing.assert_array_equal(traj[1:, 0::2], np.broadcast_to(traj[1, 0::2], (4, 4, L)), strategy)
        assert np.all(traj[:, 0::2, :3] == [2, 0, 1]), strategy
        odd = traj[:, 1::2] == MASK
        assert np.any(~odd[:-1] & odd[1:]), f"{strategy}: the unfinished rows were never remasked"


@pytest.mark.parametrize("strategy,eta", [("cap", 0.6), ("rescale", 0.6), ("confidence", 0.9)])
def test_remasking_steps_commit_lladas_count_and_remask_at_the_step_formulas_rate(strategy, eta):
    """Each step of a trajectory (3 positions, one block, 6 steps, rule random) against the decoder's step:
    an unfinished row commits exactly ceil(masked / steps left) positions and remasks each position decoded
    before with probability sigma_j (times softmax(-confidence) for 'confidence') on the block's grid
    alpha = j / 6 (counts against the sums of the probabilities, 5 standard deviations); a finished row
    stays."""
    steps, n = 6, 4000
    out = tjit(
        lambda r: parallel.parallel_sample(
            fixed_denoiser, r, jnp.full((n, 3), 2, jnp.int32), mask_id=2, schedule=SCHED, rule="random",
            steps=steps, remasking=strategy, eta=eta, return_trajectory=True,
        )
    )(jax.random.key(37))
    traj = np.asarray(out.trajectory)
    assert traj.shape == (steps + 1, n, 3) and not np.any(traj[-1] == 2)
    remasked_any = 0
    for j in range(steps):
        x, y = traj[j], traj[j + 1]
        hidden = x == 2
        m = hidden.sum(-1)
        finished = m == 0
        np.testing.assert_array_equal(y[finished], x[finished], err_msg=f"step {j}: a finished row changed")
        committed = hidden & (y != 2)
        np.testing.assert_array_equal(committed.sum(-1), np.minimum(-(-m // (steps - j)), m), err_msg=str(j))
        sigma = remdm_sigma(strategy, eta, (j + 1) / steps, j / steps)
        decoded = ~hidden & ~finished[:, None]
        remask_p = remask_weights(x, decoded, sigma, strategy)
        for l in range(3):
            assert_bernoulli_sums((y[:, l] == 2)[decoded[:, l]], remask_p[decoded[:, l], l], (j, l))
        remasked_any += np.sum(decoded & (y == 2))
    assert remasked_any > 0


def test_logits_provider_hook_and_refresh_policy():
    x = jnp.full((4, 16), STAND_IN_MASK, jnp.int32)
    kw = dict(mask_id=STAND_IN_MASK, schedule=SCHED, rule="low_confidence", steps=8, block_length=8)

    def sample(provider=None):
        fn = lambda r: parallel.parallel_sample(stand_in, r, x, logits_provider=provider, **kw)
        return jax.tree.map(np.asarray, tjit(fn)(jax.random.key(34)))

    provider = lambda k: parallel.full_logits_provider(
        stand_in, mask_id=STAND_IN_MASK, schedule=SCHED, block_length=8, refresh=parallel.refresh_every(k)
    )
    plain, every1, every3 = sample(), sample(provider(1)), sample(provider(3))
    np.testing.assert_array_equal(every1.tokens, plain.tokens)
    assert int(plain.nfe) == int(every1.nfe) == 8
    assert int(every3.nfe) == 4  # steps 0 and 3 of each block's 4
    assert not np.any(every3.tokens == STAND_IN_MASK)
    # The default provider's time: alpha(t) = the unmasked fraction (alpha = 1 - t on the linear schedule).
    half = jnp.asarray([[0, STAND_IN_MASK, 1, STAND_IN_MASK], [0, 1, 2, 3]])
    np.testing.assert_allclose(
        parallel.sequence_time(half, STAND_IN_MASK, schedules.LinearSchedule()), [0.5, 0]
    )


def test_every_rule_compiles_once_runs_sharded_and_keeps_known_tokens():
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    batch = NamedSharding(mesh, P("data"))
    x = jax.device_put(conditioning.initial_tokens(16, L, MASK, constraints={1: 2}), batch)
    variants = [dict(rule=r) for r in RULE_NAMES] + [dict(rule="random", parallel_remasking="cap", eta=0.3)]
    for kw in variants:
        before = sampling.TRACE_COUNTS["parallel"]
        c = cfg(steps=4, block_length=2, **kw)
        fn = sampling.jit_sampler(
            c, compiler_options=FAST, denoise_fn=TOY.absorbing_denoiser(), schedule=SCHED, mask_id=MASK
        )
        a, b = fn(jax.random.key(0), x), fn(jax.random.key(1), x)
        assert sampling.TRACE_COUNTS["parallel"] - before == 1, kw
        assert a.tokens.sharding.is_equivalent_to(batch, 2) and len(a.tokens.sharding.device_set) == 8, kw
        tokens = np.asarray(a.tokens)
        assert np.all(tokens[:, 1] == 2) and not np.any(tokens == MASK), kw
        assert not np.array_equal(tokens, np.asarray(b.tokens)), kw
        if kw["rule"] == "threshold":
            single = fn(jax.random.key(0), jax.device_put(x, jax.devices()[0]))
            np.testing.assert_array_equal(np.asarray(single.tokens), tokens)
            assert sampling.TRACE_COUNTS["parallel"] - before <= 2


def test_bad_input_is_one_clear_error_naming_the_field():
    x = all_masked(2)  # length 4
    cases = [
        (dict(block_length=3), "config.sampler.block_length=3 must divide the sequence length 4"),
        (
            dict(steps=3, block_length=2),
            "config.sampler.steps=3 must be a positive multiple of the number of blocks 2",
        ),
        (dict(rule="nope"), "config.sampler.rule='nope' is not a commit rule"),
        (dict(rule="threshold", threshold=0.0), "config.sampler.threshold must be in (0, 1], got 0.0"),
        (dict(rule="threshold", threshold=1.5), "config.sampler.threshold must be in (0, 1], got 1.5"),
        (dict(rule="factor", factor=-1.0), "config.sampler.factor must be >= 0"),
        (dict(rule="entropy_bounded", gamma=-0.1), "config.sampler.gamma must be >= 0"),
        (
            dict(rule="threshold", parallel_remasking="cap"),
            "config.sampler.parallel_remasking='cap' needs a fixed-count rule",
        ),
        (dict(parallel_remasking="loop"), "config.sampler.parallel_remasking='loop': expected one of"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=re.escape(msg)):
            fn = sampling.make_sampler(
                cfg(**kw), denoise_fn=TOY.absorbing_denoiser(), schedule=SCHED, mask_id=MASK
            )
            jax.eval_shape(fn, jax.random.key(0), x)  # the length checks run at trace time; nothing compiles
    with pytest.raises(ValueError, match="prompt"):
        conditioning.initial_tokens(1, L, MASK, prompt_ids=[0] * (L + 1))
