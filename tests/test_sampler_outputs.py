"""What the samplers return besides tokens, against each sampler's documented contract: trajectories (row 0 the
initial state, row k the state after step k, the last row the result, rows after an early stop holding the
final state), progress callbacks (the values they receive, in order), NFE (the network calls actually made,
counted here by the network itself), and the times passed to a time-conditioned network (ancestral and SEDD:
their time grid; first-hitting: event times with the exact law of the continuous-time process; parallel:
alpha(t) = the unmasked fraction).

The network is the toy oracle wrapped in `recording`, which logs every call's (x_t, t) through an ordered host
callback: the calls the sampler made, in order, with their exact inputs.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sampling import (
    L,
    MASK,
    N_SAMPLES,
    TOY,
    V,
    all_masked,
    ancestral_step_probs,
    score_step_probs,
    state_histogram,
    tjit,
    transition_matrix,
    tv,
    tv_bound,
)

from ddlm import schedules
from ddlm.sampling import conditioning, masked, parallel, score

COSINE = schedules.CosineSchedule()


def cosine_one_minus_alpha(t):
    """1 - alpha(t) of the cosine schedule (eps = 0), written out: cos(pi/2 (1 - t)), float64."""
    return np.cos(0.5 * np.pi * (1.0 - np.asarray(t, np.float64)))


def recording(fn=None):
    """(network, calls): the oracle (or fn) logging (x_t [B, L], t [B]) of every call, in call order."""
    fn = fn or TOY.absorbing_denoiser()
    calls = []

    def network(xt, t):
        jax.debug.callback(lambda x, s: calls.append((np.asarray(x), np.asarray(s))), xt, t, ordered=True)
        return fn(xt, t)

    return network, calls


def progress_log():
    values = []
    return values, lambda k: values.append(int(k))


def grid(steps, t_min=0.0):
    """The documented time grid t_k = 1 - (1 - t_min) k / steps, k = 0..steps (float64)."""
    return 1.0 - (1.0 - t_min) * np.arange(steps + 1) / steps


def exact_rows(step_probs, steps, t_min=0.0):
    """Distributions over the (V+1)^L absorbing states after k = 0..steps steps, from all-masked."""
    states = TOY.abs_states
    dist = np.zeros(len(states))
    dist[int(TOY.index(np.full((L,), MASK), V + 1))] = 1.0
    g = masked.time_grid(steps, t_min)
    step = step_probs if hasattr(step_probs, "lower") else tjit(step_probs)
    out = [dist]
    for k in range(steps):
        probs = np.asarray(step(jnp.asarray(states), g[k], g[k + 1]), np.float64)
        out.append(out[-1] @ transition_matrix(probs, states))
    return out


def assert_absorbing_path(traj):
    """Along an absorbing path a decoded token never changes and a mask only turns into a token."""
    before, after = traj[:-1], traj[1:]
    assert np.all((before == MASK) | (after == before))


# ------------------------------------------------------------------------------------------ ancestral


def test_ancestral_trajectory_times_progress_and_nfe():
    """Cosine schedule, 4 steps down to t_min = 0.2, then noise removal: the network is called at t_0..t_3 of
    the grid and once more at t_min; row k of the trajectory is the state after step k (the input of call k,
    with the exact law of k steps of the chain); the last row is the result after noise removal."""
    steps, t_min, n = 4, 0.2, N_SAMPLES
    network, calls = recording()
    seen, progress = progress_log()
    x = all_masked(n)
    out = tjit(
        lambda r: masked.ancestral_sample(
            network, r, x, mask_id=MASK, schedule=COSINE, steps=steps, t_min=t_min, noise_removal=True,
            return_trajectory=True, progress_fn=progress,
        )
    )(jax.random.key(40))
    traj, tokens = np.asarray(out.trajectory), np.asarray(out.tokens)
    assert traj.shape == (steps + 1, n, L)
    np.testing.assert_array_equal(traj[0], x)
    np.testing.assert_array_equal(traj[-1], tokens)
    assert not np.any(tokens == MASK)
    assert_absorbing_path(traj)
    assert seen == [1, 2, 3, 4]
    # Calls: one per step on the grid, then the fill at t_min (positions are still masked at t_min = 0.2).
    assert int(out.nfe) == len(calls) == steps + 1
    want = np.append(grid(steps, t_min)[:steps], t_min)
    np.testing.assert_allclose([c[1] for c in calls], np.repeat(want[:, None], n, 1), atol=1e-6)
    for k in range(steps):
        np.testing.assert_array_equal(calls[k][0], traj[k], err_msg=f"call {k} did not see row {k}")
    after_last = calls[steps][0]  # the state after the last step, which noise removal fills
    assert np.any(after_last == MASK)
    np.testing.assert_array_equal(np.where(after_last == MASK, tokens, after_last), tokens)
    # Row k has the law of k steps of the chain (k = 1..3; row 4 is the filled result).
    exact = exact_rows(ancestral_step_probs(COSINE), steps, t_min)
    for k in range(1, steps):
        emp = state_histogram(traj[k])
        assert tv(emp, exact[k]) < tv_bound(exact[k], n), (k, tv(emp, exact[k]))


def test_cached_ancestral_calls_only_when_the_state_changed():
    """cache=True: a call at step k only when a token changed since the last call (at that step's grid time),
    none once nothing is masked; nfe is the calls made. Batch of one, 32 steps over 4 tokens."""
    steps = 32
    network, calls = recording()
    out = tjit(
        lambda r: masked.ancestral_sample(
            network, r, all_masked(1), mask_id=MASK, schedule=COSINE, steps=steps, cache=True,
            return_trajectory=True,
        )
    )(jax.random.key(41))
    traj = np.asarray(out.trajectory)
    assert int(out.nfe) == len(calls) <= L + 1
    times = np.array([c[1][0] for c in calls])
    ks = np.rint((1.0 - times) * steps).astype(int)  # the step of each call
    np.testing.assert_allclose(times, grid(steps)[ks], atol=1e-6)
    assert ks[0] == 0 and np.all(np.diff(ks) > 0)
    changed = np.any(traj[1:] != traj[:-1], axis=(1, 2))  # [steps]: step k changed the state
    for i, k in enumerate(ks):
        np.testing.assert_array_equal(calls[i][0], traj[k])
        if i + 1 < len(ks):  # the state is unchanged from call i to the step that triggers call i + 1
            assert not np.any(changed[k : ks[i + 1] - 1]) and changed[ks[i + 1] - 1], (i, ks)
    # After the last call the state changes once (its reveal) and nothing is left masked: no more calls.
    assert np.sum(changed[ks[-1] :]) == 1 and not np.any(traj[-1] == MASK)


# ------------------------------------------------------------------------------------------ first hitting


def _kth_largest_cdf(y, n, k):
    """P(k-th largest of n i.i.d. U(0, 1) <= y) = P(at most k - 1 of them exceed y)."""
    y = np.asarray(y, np.float64)
    return sum(math.comb(n, i) * (1.0 - y) ** i * y ** (n - i) for i in range(k))


def _dkw_distance(samples, cdf):
    """sup |empirical CDF - cdf| of 1-D samples."""
    s = np.sort(samples)
    f = cdf(s)
    i = np.arange(1, len(s) + 1)
    return max(np.max(i / len(s) - f), np.max(f - (i - 1) / len(s)))


def test_first_hitting_event_times_have_the_law_of_the_continuous_process():
    """In continuous time each masked token is unmasked at its own time tau with 1 - alpha(tau) ~ U(0, 1), so
    the k-th event of a row with n masked tokens has 1 - alpha(s_k) = the k-th largest of n uniforms: the
    sampler's 1 - alpha_s = (1 - alpha_t) u^(1/n). Checked per k (DKW bound, failure probability 1e-5 each)
    on the times the network receives, for rows with 4 and with 2 masked tokens (cosine schedule), along with:
    times in (0, 1] decreasing along a row, a finished row's time left as it was (and an all-known row's at 1),
    call k seeing row k of the trajectory, rows after a row's last event holding it, nfe = the most masked
    positions of a row, progress 1..nfe."""
    n = 4000
    x = np.full((n, L), MASK, np.int32)
    x[n // 2 :, :2] = [1, 0]  # half the rows: 2 masked tokens
    x[-1] = [0, 1, 2, 0]  # and one row with nothing masked
    network, calls = recording()
    seen, progress = progress_log()
    out = tjit(
        lambda r: masked.first_hitting_sample(
            network, r, jnp.asarray(x), mask_id=MASK, schedule=COSINE, return_trajectory=True,
            progress_fn=progress,
        )
    )(jax.random.key(42))
    traj, tokens = np.asarray(out.trajectory), np.asarray(out.tokens)
    assert int(out.nfe) == len(calls) == L and seen == [1, 2, 3, 4]
    assert traj.shape == (L + 1, n, L)
    np.testing.assert_array_equal(traj[0], x)
    np.testing.assert_array_equal(traj[-1], tokens)
    assert not np.any(tokens == MASK)
    assert_absorbing_path(traj)
    masks = np.sum(traj == MASK, axis=-1)  # [L + 1, n]
    left = np.sum(x == MASK, -1)[None] - np.arange(L + 1)[:, None]
    np.testing.assert_array_equal(masks, np.maximum(left, 0))  # one event per step while a row has masks
    for k in range(L):
        np.testing.assert_array_equal(calls[k][0], traj[k])
    times = np.stack([c[1] for c in calls])  # [L calls, n]
    assert np.all((times > 0) & (times <= 1)) and np.all(np.diff(times, axis=0) <= 0)
    np.testing.assert_array_equal(times[:, -1], 1.0)  # nothing masked: no event, t stays at 1
    half = n // 2  # rows 0..half-1: 4 masked; half..n-2: 2 masked (the last row: none)
    np.testing.assert_array_equal(times[2:, half:-1], np.broadcast_to(times[1, half:-1], (2, n - half - 1)))
    eps = math.sqrt(math.log(2.0 / 1e-5) / (2.0 * (half - 1)))
    for rows, masked_count in ((slice(0, half), 4), (slice(half, -1), 2)):
        y = cosine_one_minus_alpha(times[:, rows])
        for k in range(1, masked_count + 1):
            d = _dkw_distance(y[k - 1], lambda v: _kth_largest_cdf(v, masked_count, k))
            assert d < eps, (masked_count, k, d, eps)


def test_first_hitting_with_nothing_masked_makes_no_call():
    network, calls = recording()
    seen, progress = progress_log()
    x = jnp.asarray([[0, 1, 2, 0], [2, 2, 1, 0]], jnp.int32)
    out = tjit(
        lambda r: masked.first_hitting_sample(
            network, r, x, mask_id=MASK, schedule=COSINE, return_trajectory=True, progress_fn=progress
        )
    )(jax.random.key(43))
    assert int(out.nfe) == 0 and calls == [] and seen == []
    np.testing.assert_array_equal(np.asarray(out.trajectory), np.broadcast_to(x, (L + 1, 2, L)))


# ------------------------------------------------------------------------------------------ SEDD


@pytest.mark.parametrize("method", ["euler", "analytic"])
def test_sedd_absorbing_trajectory_times_progress_and_nfe(method):
    """4 steps to t_min = 0.3 on the cosine schedule, then noise removal: score_fn called at t_0..t_3 and at
    t_min; row k = the input of call k with the exact law of k steps; the last row = the result."""
    steps, t_min, n = 4, 0.3, N_SAMPLES
    network, calls = recording()
    sfn = score.absorbing_score_fn(network, mask_id=MASK)
    seen, progress = progress_log()
    run = lambda removal: tjit(
        lambda r: score.score_sample(
            sfn, r, all_masked(n), graph="absorbing", schedule=COSINE, steps=steps, method=method,
            mask_id=MASK, t_min=t_min, noise_removal=removal, return_trajectory=True, progress_fn=progress,
        )
    )(jax.random.key(44))
    out = run(True)
    traj, tokens = np.asarray(out.trajectory), np.asarray(out.tokens)
    assert traj.shape == (steps + 1, n, L) and seen == [1, 2, 3, 4]
    np.testing.assert_array_equal(traj[0], np.full((n, L), MASK))
    np.testing.assert_array_equal(traj[-1], tokens)
    assert not np.any(tokens == MASK)
    assert_absorbing_path(traj)
    assert int(out.nfe) == len(calls) == steps + 1
    want = np.append(grid(steps, t_min)[:steps], t_min)
    np.testing.assert_allclose([c[1] for c in calls], np.repeat(want[:, None], n, 1), atol=1e-6)
    for k in range(steps):
        np.testing.assert_array_equal(calls[k][0], traj[k])
    after_last = calls[steps][0]
    np.testing.assert_array_equal(np.where(after_last == MASK, tokens, after_last), tokens)
    exact = exact_rows(score_step_probs(sfn, "absorbing", method, COSINE), steps, t_min)
    for k in range(1, steps):
        emp = state_histogram(traj[k])
        assert tv(emp, exact[k]) < tv_bound(exact[k], n), (k, tv(emp, exact[k]))
    # Without noise removal the last row is the state after the last step, and no fifth call is made.
    calls.clear()
    seen.clear()
    plain = run(False)
    assert int(plain.nfe) == len(calls) == steps and seen == [1, 2, 3, 4]
    np.testing.assert_array_equal(np.asarray(plain.trajectory)[-1], np.asarray(plain.tokens))
    np.testing.assert_array_equal(np.asarray(plain.tokens), after_last)  # same key, same path


def test_sedd_noise_removal_makes_no_call_when_nothing_is_left_masked():
    """Absorbing graph: the final greedy call is made only if some position is still masked (t_min = 0 and
    the analytic step to t = 0 reveals everything)."""
    network, calls = recording()
    sfn = score.absorbing_score_fn(network, mask_id=MASK)
    out = tjit(
        lambda r: score.score_sample(
            sfn, r, all_masked(64), graph="absorbing", schedule=COSINE, steps=3, method="analytic",
            mask_id=MASK, noise_removal=True,
        )
    )(jax.random.key(45))
    assert not np.any(np.asarray(out.tokens) == MASK)
    assert int(out.nfe) == len(calls) == 3
    assert out.trajectory is None  # not asked


def test_sedd_uniform_trajectory_starts_from_the_noise_and_keeps_clamped_positions():
    from test_sampling import uniform_score_fn

    sched, steps, n = schedules.GeometricSchedule(), 3, 256
    network, calls = recording(uniform_score_fn(sched))
    seen, progress = progress_log()
    x = jnp.zeros((n, L), jnp.int32).at[:, 1].set(2)
    clamp = jnp.zeros((n, L), bool).at[:, 1].set(True)
    out = tjit(
        lambda r: score.score_sample(
            network, r, x, graph="uniform", schedule=sched, steps=steps, method="analytic", clamp=clamp,
            return_trajectory=True, progress_fn=progress,
        )
    )(jax.random.key(46))
    traj, tokens = np.asarray(out.trajectory), np.asarray(out.tokens)
    assert traj.shape == (steps + 1, n, L) and seen == [1, 2, 3]
    assert np.all(traj[:, :, 1] == 2)
    free = np.delete(traj[0], 1, axis=1)
    # Row 0 is the uniform noise the run starts from (not x_init's zeros): every token, each about 1/V.
    np.testing.assert_allclose(np.bincount(free.ravel(), minlength=V) / free.size, 1.0 / V, atol=0.05)
    np.testing.assert_array_equal(traj[-1], tokens)
    # Uniform noise removal is always one more call, at t_min = 0.
    assert int(out.nfe) == len(calls) == steps + 1
    np.testing.assert_allclose([c[1][0] for c in calls], np.append(grid(steps)[:steps], 0.0), atol=1e-6)
    for k in range(steps):
        np.testing.assert_array_equal(calls[k][0], traj[k])
    # Noise removal: the analytic step to sigma = 0 taken greedily, from the state after the last step (the
    # input of the last call): argmax_y [e^tau s_y + (1 - e^tau)/V sum_z s_z] [e^-tau 1(y = x) + (1 - e^-tau)/V]
    # with tau = sigma(0) = sigma_min, s the exact ratios at t = 0 (1 at y = x).
    x_last = calls[steps][0]
    ratios = np.exp(np.asarray(uniform_score_fn(sched)(jnp.asarray(x_last), jnp.zeros((n,)))), dtype=np.float64)
    onehot = np.eye(V)[x_last]
    ratios = np.where(onehot > 0, 1.0, ratios)
    e = math.exp(sched.sigma_min)
    stag = e * ratios + (1 - e) / V * ratios.sum(-1, keepdims=True)
    want = np.argmax(stag * (onehot / e + (1 - 1 / e) / V), -1)
    np.testing.assert_array_equal(tokens, np.where(np.asarray(clamp), np.asarray(x), want))


# ------------------------------------------------------------------------------------------ parallel


def test_parallel_sequence_time_trajectory_progress_and_nfe():
    """An adaptive rule ends a block early: the trajectory has num_blocks * block_length + 1 rows and the
    ones after the last step repeat the result; call k sees row k at the time t with alpha(t) = its unmasked
    fraction (cosine schedule); nfe = calls = steps taken; progress 1..steps taken."""
    network, calls = recording()
    seen, progress = progress_log()
    x = jnp.asarray(conditioning.initial_tokens(64, L, MASK, prompt_ids=[1]))
    out = tjit(
        lambda r: parallel.parallel_sample(
            network, r, x, mask_id=MASK, schedule=COSINE, rule="threshold", threshold=0.5, block_length=2,
            return_trajectory=True, progress_fn=progress,
        )
    )(jax.random.key(47))
    traj, tokens = np.asarray(out.trajectory), np.asarray(out.tokens)
    taken = int(out.nfe)
    assert taken == len(calls) and seen == list(range(1, taken + 1))
    assert 2 <= taken < L  # block 0: one masked token, one step; block 1: at most two steps
    assert traj.shape == (L + 1, 64, L)
    np.testing.assert_array_equal(traj[0], x)
    np.testing.assert_array_equal(traj[taken:], np.broadcast_to(tokens, (L + 1 - taken, 64, L)))
    assert not np.any(tokens == MASK)
    assert_absorbing_path(traj)
    for k, (xt, t) in enumerate(calls):
        np.testing.assert_array_equal(xt, traj[k])
        np.testing.assert_allclose(1.0 - cosine_one_minus_alpha(t), np.mean(xt != MASK, axis=-1), atol=1e-5)
    assert len({tuple(np.round(c[1], 4)) for c in calls}) > 1  # the time moves


def test_parallel_fixed_count_progress_covers_every_block():
    seen, progress = progress_log()
    network, calls = recording()
    out = tjit(
        lambda r: parallel.parallel_sample(
            network, r, all_masked(8), mask_id=MASK, schedule=COSINE, rule="random", steps=4, block_length=2,
            progress_fn=progress,
        )
    )(jax.random.key(48))
    assert seen == [1, 2, 3, 4] and int(out.nfe) == len(calls) == 4
    assert out.trajectory is None  # not asked


# ------------------------------------------------------------------------------------------ ar and bd3lm


def test_ar_nfe_and_progress_at_the_prefill_chunk_boundaries():
    """nfe = prefill chunks + one step per generated position (no cache: one forward per position), for a
    bos-only prompt (no prefill), prompts of one and two whole chunks, and one token past a chunk; the
    progress callback gets each generated position in order. The tokens do not depend on the cache."""
    from test_cached_samplers import MASK as AR_MASK, _ar, _decoder, _prompted

    dec, length, chunk = _decoder("ar"), 12, 4
    seen, progress = progress_log()
    # One program per cache setting: the prompt length is a runtime value.
    runs = {kv: _ar(dec, kv, prefill_chunk=chunk, progress_fn=progress) for kv in (True, False)}
    for prompt in (1, chunk, chunk + 1, 2 * chunk):
        x = _prompted(3, length, [prompt] * 3, seed=prompt)
        tokens = {}
        for kv_cache, run in runs.items():
            seen.clear()
            out = run(jax.random.key(49), x)
            prefill = math.ceil((prompt - 1) / chunk) if kv_cache else 0
            assert int(out.nfe) == prefill + length - prompt, (prompt, kv_cache, int(out.nfe))
            assert seen == list(range(prompt, length)), (prompt, kv_cache, seen)
            tokens[kv_cache] = np.asarray(out.tokens)
        np.testing.assert_array_equal(tokens[True], tokens[False], err_msg=f"prompt {prompt}")
        np.testing.assert_array_equal(tokens[True][:, :prompt], np.asarray(x)[:, :prompt])
        assert not np.any(tokens[True] == AR_MASK)


def test_ar_without_a_prompt_is_one_clear_error():
    """Position 0 is never generated (nothing precedes it): an all-masked x_init used to come back with
    mask_id at position 0. A bos-only prompt is the way to sample without one."""
    from test_cached_samplers import MASK as AR_MASK, _decoder

    from ddlm.sampling import autoregressive

    x = jnp.full((2, 8), AR_MASK, jnp.int32).at[0, 0].set(5)
    with pytest.raises(ValueError, match=r"x_init\[:, 0\] is mask_id in row\(s\) \[1\]: position 0 is never"):
        autoregressive.ar_sample(_decoder("ar"), jax.random.key(0), x, mask_id=AR_MASK)


def test_bd3lm_progress_and_nfe_with_a_prompt_block():
    """16 tokens in blocks of 4, the first block all prompt: with the cache it is prefilled (one call), blocks
    1..3 are denoised (one call each with a one-call block sampler), and the writes of blocks 1..2 are the next
    blocks' first calls (fused: no extra call; the last block's write is skipped); progress gets blocks_done
    1..4 in order (1 once the prompt block is prefilled)."""
    from test_cached_samplers import MASK as BD_MASK, _bd3, _decoder, _greedy_block, _prompted

    dec = _decoder("bd3lm")
    x = _prompted(2, 16, [4, 6])
    for kv_cache, want in ((True, 1 + 3), (False, 3)):
        seen, progress = progress_log()
        out = _bd3(dec, _greedy_block, kv_cache, progress_fn=progress)(jax.random.key(50), x)
        assert int(out.nfe) == want, (kv_cache, int(out.nfe))
        assert seen == [1, 2, 3, 4], (kv_cache, seen)
        assert not np.any(np.asarray(out.tokens) == BD_MASK)


# ------------------------------------------------------------------------------------------ options


def test_the_precision_option_reaches_every_draw():
    """config.sampler.precision='float32_64bit' draws its Gumbel noise from other bits than the default
    'float64' (whose 'float32' sibling shares its top bits, so those two are coupled): the same key must give
    other tokens, in every sampler that draws."""
    from ddlm import sampling

    x = all_masked(64)
    for name in ("ancestral", "first_hitting", "sedd_analytic", "parallel"):
        tokens = []
        for precision in ("float64", "float32_64bit"):
            c = sampling.default_config()
            c.name, c.steps, c.precision, c.rule = name, 4, precision, "random"
            fn = sampling.make_sampler(c, denoise_fn=TOY.absorbing_denoiser(), schedule=COSINE, mask_id=MASK)
            tokens.append(np.asarray(tjit(fn)(jax.random.key(51), x).tokens))
        assert not np.array_equal(*tokens), name
