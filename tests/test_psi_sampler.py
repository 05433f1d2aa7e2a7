"""The Psi predictor-corrector sampler (ddlm/sampling/psi.py, processes.UniformProcess.psi_posterior_probs) on
the exact toy oracle (L = 4, V = 3) with DUO's optimal x_theta (the leave-one-out posterior).

Exact checks by enumeration over the 81 sequences, float64: with the exact joint posterior of x_0, the Psi step
t -> s maps q_t to q_s and the corrector (s = t) leaves q_t invariant, for every kappa; the sampler's own
(factorised) kernels give its law exactly (as tests/test_sampling_canvas.py does for the canvas sampler), so
predictor-only and predictor-corrector are compared against the data without Monte-Carlo noise. Samples: strength
0 gives the tokens of 'sedd_analytic' for the same key, and a PC setting follows its exact law. Greedy tail, NFE,
one-line errors.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddlm import losses, processes, sampling, schedules
from ddlm.eval import oracle
from ddlm.sampling import masked, psi
from test_sampling import L, TOY, V, histogram, tv, tv_bound
from test_sampling_canvas import loo_posterior

SEQS = np.asarray(TOY.seqs)
SCHED = schedules.LogLinearSchedule()  # DUO's schedule; alpha(1) = 1e-3 > 0, so 'sedd_analytic' runs too
PROC = processes.UniformProcess(V)
N = 8000
FAST = {"xla_backend_optimization_level": 0}


def oracle_denoise(x, t):
    alpha = jnp.broadcast_to(SCHED.alpha(jnp.asarray(t))[..., None], x.shape)
    return jnp.log(jnp.maximum(loo_posterior(x, alpha), 1e-30))


def run(key, steps, x_init=None, denoise_fn=oracle_denoise, return_trajectory=False, progress_fn=None, **kw):
    c = sampling.default_config()
    c.name, c.steps = "psi", steps
    for k, v in kw.items():
        c[k] = v
    fn = sampling.make_sampler(
        c, denoise_fn=denoise_fn, schedule=SCHED, graph="uniform", return_trajectory=return_trajectory,
        progress_fn=progress_fn,
    )
    x = jnp.zeros((N, L), jnp.int32) if x_init is None else x_init
    return jax.jit(lambda r: fn(r, x), compiler_options=FAST)(jax.random.key(key))


# ------------------------------------------------------------------------------------------ exact kernels


def joint_kernel(a_s, a_t, kappa, toy=TOY):
    """K[i, j] = sum_x0 p(x_0 | x_t = i) prod_l psi(x_s^l = j_l | i_l, x_0^l): the Psi step with the exact
    joint posterior (one-hot x_0 in psi_posterior_probs), over all V^L sequences; and q_t."""
    seqs, v = np.asarray(toy.seqs), toy.num_tokens
    n = len(seqs)
    q_t = toy.probs @ toy.uniform_kernel(a_t)
    post = toy.probs[None, :] * toy.uniform_kernel(a_t).T / q_t[:, None]  # [i, x0]
    proc = processes.UniformProcess(v)
    xt = jnp.asarray(np.repeat(seqs, n, axis=0))  # row i * n + x0
    x0 = jax.nn.one_hot(jnp.asarray(np.tile(seqs, (n, 1))), v, dtype=jnp.float64)
    p = np.asarray(proc.psi_posterior_probs(x0, xt, a_s, a_t, kappa)).reshape(n, n, toy.length, v)
    step = np.prod(np.take_along_axis(p[:, :, None], seqs[None, None, :, :, None], axis=-1)[..., 0], axis=-1)
    return np.einsum("in,inj->ij", post, step), q_t  # step: [i, x0, j]


def factorised_kernel(a_s, a_t, kappa, x_theta):
    """The sampler's step as a matrix: M[i, j] = prod_l psi(x_s^l = j_l | x_t = i, x_0 ~ x_theta(i)^l)."""
    p = np.asarray(PROC.psi_posterior_probs(x_theta, jnp.asarray(SEQS), a_s, a_t, kappa))
    return np.prod(np.take_along_axis(p[:, None], SEQS[None, :, :, None], axis=-1)[..., 0], axis=-1)


def chain_law(steps, strength=0.0, corrector_steps=0, greedy_tail=0):
    """The exact law of psi_sample (noise removal on, t_min = 0) with the oracle's x_theta: uniform start, the
    factorised Psi step per grid step, corrector_steps s -> s kernels after every step but the last; greedy:
    the final call maps each state to argmax x_theta(state, 0)."""
    grid = np.asarray(masked.time_grid(steps), np.float64)
    law = np.full(len(SEQS), 1.0 / len(SEQS))
    x_theta = lambda t: loo_posterior(jnp.asarray(SEQS), jnp.full(SEQS.shape, float(SCHED.alpha(t))))
    for k in range(steps):
        a_t, a_s = float(SCHED.alpha(grid[k])), float(SCHED.alpha(grid[k + 1]))
        law = law @ factorised_kernel(a_s, a_t, 1.0 - strength, x_theta(grid[k]))
        if k < steps - 1:
            for _ in range(corrector_steps):
                law = law @ factorised_kernel(a_s, a_s, 1.0 - strength, x_theta(grid[k + 1]))
    if greedy_tail:  # alpha(0) = 1: the non-greedy noise removal keeps the state, the greedy one maps it
        target = np.asarray(TOY.index(np.argmax(np.asarray(x_theta(0.0)), axis=-1)))
        law = np.bincount(target, weights=law, minlength=len(SEQS))
    return law


@pytest.mark.parametrize("kappa", [0.0, 0.3, 1.0])
def test_psi_step_maps_q_t_to_q_s_and_the_corrector_leaves_q_t_invariant_exactly(kappa):
    """With the exact joint posterior of x_0 (enumerated), q_t K_{t->s} = q_s (any kappa: both parts of the
    Psi-posterior keep the marginals) and q_t K_{t->t} = q_t (the corrector), to float64 rounding."""
    with jax.enable_x64(True):
        a_t, a_s = 0.3, 0.55
        k_ts, q_t = joint_kernel(a_s, a_t, kappa)
        q_s = TOY.probs @ TOY.uniform_kernel(a_s)
        np.testing.assert_allclose(k_ts.sum(1), 1.0, atol=1e-12)
        np.testing.assert_allclose(q_t @ k_ts, q_s, rtol=0, atol=1e-12)
        k_tt, _ = joint_kernel(a_t, a_t, kappa)
        np.testing.assert_allclose(q_t @ k_tt, q_t, rtol=0, atol=1e-12)
        if kappa < 1:  # and it moves: not the identity
            assert np.abs(k_tt - np.eye(len(SEQS))).max() > 0.1


def test_the_samplers_own_corrector_kernel_is_exact_at_one_position_and_close_beyond():
    """The sampler factorises over positions with x_theta^l = p(x_0^l | x_t^{-l}): for one position that IS
    the joint posterior, so its corrector leaves q_t invariant exactly; for L = 4 the factorisation (the same
    approximation the predictor makes) leaves a small deviation, measured and stated."""
    with jax.enable_x64(True):
        one = oracle.ToyDistribution(num_tokens=5, length=1, seed=3)
        a_t = 0.4
        q_t = one.probs @ one.uniform_kernel(a_t)
        x = jnp.asarray(one.seqs)
        pi = one.uniform_x0_posterior(x, jnp.full((len(x),), a_t))  # L = 1: nothing to leave out but x_t itself
        loo = pi / (a_t * jax.nn.one_hot(x, 5) + (1 - a_t) / 5)  # divide out q(x_t | x_0): the prior p(x_0)
        loo = loo / loo.sum(-1, keepdims=True)
        k = np.asarray(processes.UniformProcess(5).psi_posterior_probs(loo, x, a_t, a_t, 0.2))[:, 0, :]
        np.testing.assert_allclose(q_t @ k, q_t, rtol=0, atol=1e-12)

        q_t4 = TOY.probs @ TOY.uniform_kernel(a_t)
        m = factorised_kernel(a_t, a_t, 0.2, loo_posterior(jnp.asarray(SEQS), jnp.full(SEQS.shape, a_t)))
        dev = tv(q_t4 @ m, q_t4)
        print(f"L = 4, kappa = 0.8: TV(q_t M, q_t) = {dev:.2e} (factorisation)")
        assert 1e-6 < dev < 0.025  # 0.0188: deterministic (an exact computation)


def test_strength_zero_gives_the_tokens_of_sedd_analytic_and_the_exact_chain_law():
    """strength 0 is the plain predictor: the same noise and Gumbel draws as 'sedd_analytic' on
    losses.duo_log_ratios, whose analytic step is the mean parameterisation's reverse step, so the tokens agree
    for a fixed key (float32 steps: a draw could flip at a rounding tie; none do here), with the same NFE;
    and the samples follow the exact chain law."""
    steps = 8
    out = run(0, steps)
    c = sampling.default_config()
    c.name, c.steps = "sedd_analytic", steps
    score_fn = lambda x, t: losses.duo_log_ratios(oracle_denoise(x, t), x, SCHED.alpha(t))
    ref_fn = sampling.make_sampler(c, score_fn=score_fn, schedule=SCHED, graph="uniform")
    ref = jax.jit(lambda r: ref_fn(r, jnp.zeros((N, L), jnp.int32)), compiler_options=FAST)(jax.random.key(0))
    differ = float(np.mean(np.asarray(out.tokens) != np.asarray(ref.tokens)))
    print(f"tokens differing from sedd_analytic: {differ:.2e}")
    assert differ <= 1e-3, differ
    assert int(out.nfe) == int(ref.nfe) == steps + 1
    with jax.enable_x64(True):
        law = chain_law(steps)
    emp = histogram(out.tokens)
    assert tv(emp, law) < tv_bound(law, N), (tv(emp, law), tv_bound(law, N))


def test_a_pc_setting_follows_its_exact_law_and_counts_its_calls():
    """strength 0.5 with one corrector call per step: samples at the noise floor of the exactly computed law;
    NFE = steps + corrector_steps * (steps - 1) + noise removal."""
    steps = 4
    out = run(1, steps, psi_strength=0.5, psi_corrector_steps=1)
    assert int(out.nfe) == steps + (steps - 1) + 1
    with jax.enable_x64(True):
        law = chain_law(steps, strength=0.5, corrector_steps=1)
    emp = histogram(out.tokens)
    assert tv(emp, law) < tv_bound(law, N), (tv(emp, law), tv_bound(law, N))


PRIOR = np.array([0.6, 0.3, 0.1])  # a constant x_theta: every position is its own Markov chain on V states


def per_position_joints(steps, strength, corrector_steps, alt_kappa=None):
    """[steps - 1] exact joint laws [V, V] of (x_k^l, x_{k+1}^l), trajectory rows k and k + 1 (a step and the
    correctors after it), of psi_sample with the constant x_theta PRIOR; alt_kappa overrides the correctors'
    kappa (a wrong sampler, to show the test can tell)."""
    grid = np.asarray(masked.time_grid(steps), np.float64)
    y = jnp.arange(V)[None]
    x_theta = jnp.broadcast_to(jnp.asarray(PRIOR), (1, V, V))
    kernel = lambda a_s, a_t, kappa: np.asarray(PROC.psi_posterior_probs(x_theta, y, a_s, a_t, kappa))[0]
    m, joints = np.full(V, 1.0 / V), []
    for k in range(steps - 1):
        a_t, a_s = float(SCHED.alpha(grid[k])), float(SCHED.alpha(grid[k + 1]))
        step = kernel(a_s, a_t, 1.0 - strength)
        for _ in range(corrector_steps):
            step = step @ kernel(a_s, a_s, 1.0 - strength if alt_kappa is None else alt_kappa)
        joints.append(m[:, None] * step)
        m = m @ step
    return joints


def test_the_sampled_steps_and_correctors_follow_the_psi_kernels():
    """The sampler's draws, step by step: with a constant x_theta each position is a Markov chain whose kernels
    (the Psi step, then the correctors) are known exactly; the empirical joint of consecutive trajectory rows
    (N L = 32,000 pairs) is at the noise floor of it, and far from the joint of a sampler whose correctors do
    nothing (kappa = 1) -- the whole-sequence law of the oracle cannot tell those apart (TV 0.02 at N = 8,000)."""
    steps, strength, correctors = 4, 0.7, 2
    logits = jnp.log(jnp.asarray(PRIOR, jnp.float32))
    den = lambda x, t: logits + 0.0 * x[..., None]  # (depends on x: nothing for XLA to constant-fold)
    out = run(5, steps, denoise_fn=den, return_trajectory=True, psi_strength=strength, psi_corrector_steps=correctors)
    traj = np.asarray(out.trajectory)
    with jax.enable_x64(True):
        exact = per_position_joints(steps, strength, correctors)
        wrong = per_position_joints(steps, strength, correctors, alt_kappa=1.0)
    for k in range(steps - 1):
        emp = np.bincount((traj[k] * V + traj[k + 1]).ravel(), minlength=V * V) / traj[k].size
        bound = tv_bound(exact[k].ravel(), traj[k].size)
        print(f"rows {k}->{k + 1}: TV(empirical, exact) = {tv(emp, exact[k].ravel()):.4f}, bound {bound:.4f}, "
              f"TV(exact, no-op correctors) = {tv(exact[k], wrong[k]):.4f}")
        assert tv(emp, exact[k].ravel()) < bound, (k, tv(emp, exact[k].ravel()), bound)
    assert tv(exact[-1], wrong[-1]) > 3 * bound, (tv(exact[-1], wrong[-1]), bound)  # late steps: x_t informs


def test_predictor_only_versus_predictor_corrector_tv_to_the_data():
    """Exact TV(law, data) (no sampling noise) of the predictor (strength 0), the Psi mixing alone (strength 0.3,
    the same NFE), PC with one corrector call after each step (strength 0.3, NFE 2 steps) and the predictor at
    twice the steps (that NFE), printed. Measured on this toy (the exact x_theta, so the predictor's only error
    is its factorised steps):

        steps   predictor   psi mix 0.3   PC 0.3 + 1 corrector   predictor at 2x steps
          4      0.1896       0.1934          0.1797                  0.1028
          8      0.1028       0.1120          0.0972                  0.0521
         16      0.0521       0.0639          0.0521                  0.0258

    The corrector calls help at 4 and 8 steps (asserted) and no longer at 16; the mixing alone is worse at every
    step count and strength tried (0.05 .. 1), and spending the corrector's calls on more predictor steps is
    better still (asserted: that is the honest comparison at equal NFE on an exact denoiser; the paper's gains
    are for trained networks, at matched entropy)."""
    rows = {}
    with jax.enable_x64(True):
        for steps in (4, 8, 16):
            rows[steps] = (
                tv(chain_law(steps), TOY.probs),
                tv(chain_law(steps, strength=0.3), TOY.probs),
                tv(chain_law(steps, strength=0.3, corrector_steps=1), TOY.probs),
                tv(chain_law(2 * steps), TOY.probs),
            )
    for steps, (p, mix, pc, p2) in rows.items():
        print(f"steps={steps}: predictor {p:.4f}  psi mix 0.3 {mix:.4f}  PC 0.3 + 1 corrector {pc:.4f}  "
              f"predictor at 2x steps {p2:.4f}")
        assert mix > p and p2 < pc, (steps, rows[steps])
    for steps in (4, 8):
        p, _, pc, _ = rows[steps]
        assert pc < p - 0.003, (steps, pc, p)


def test_greedy_tail_outputs_the_argmax_of_the_last_clean_prediction():
    """A denoiser whose prediction depends on its input: the output is argmax of the prediction made in the
    last call (noise removal at t_min, or the last step without it); greedy_tail = 2 also makes the last step
    greedy; clamped positions keep x_init (clamp given as 0/1 integers: cast to bool); NFE unchanged."""
    table = jax.random.normal(jax.random.key(7), (N, L, V)) * 2.0

    def den(x, t):
        return table + 3.0 * jax.nn.one_hot((x + 1) % V, V) + t[:, None, None]

    grid = np.asarray(masked.time_grid(4))
    best = lambda x, t: np.argmax(np.asarray(den(jnp.asarray(x), jnp.full((N,), t))), axis=-1)
    # The state after the last step: the same key without noise removal (it draws no randomness).
    last = np.asarray(run(2, 4, denoise_fn=den, noise_removal=False).tokens)
    out = run(2, 4, denoise_fn=den, greedy_tail=1)
    np.testing.assert_array_equal(np.asarray(out.tokens), best(last, grid[-1]))
    assert int(out.nfe) == 5
    plain = run(2, 4, denoise_fn=den)  # the non-greedy noise removal weighs x_t too: another output
    assert np.mean(np.asarray(plain.tokens) != best(last, grid[-1])) > 0.1

    # Trajectory row -2: the state before the last step (the last row is the output).
    out = run(3, 4, denoise_fn=den, return_trajectory=True, greedy_tail=1, noise_removal=False)
    np.testing.assert_array_equal(np.asarray(out.tokens), best(np.asarray(out.trajectory)[-2], grid[-2]))
    assert int(out.nfe) == 4

    # No corrector follows a greedy step: greedy_tail = 3 without noise removal, a corrector of strength 1 (it
    # would redraw every token) after the one non-greedy step only.
    out = run(6, 4, denoise_fn=den, return_trajectory=True, greedy_tail=3, noise_removal=False,
              psi_strength=1.0, psi_corrector_steps=1)
    traj = np.asarray(out.trajectory)
    np.testing.assert_array_equal(traj[2], best(traj[1], grid[1]))
    np.testing.assert_array_equal(traj[3], best(traj[2], grid[2]))
    np.testing.assert_array_equal(np.asarray(out.tokens), best(traj[3], grid[3]))
    assert int(out.nfe) == 4 + 1

    x_init = jnp.zeros((N, L), jnp.int32).at[:, 0].set(2)
    clamp = np.zeros((N, L), bool)
    clamp[:, 0] = True
    c = sampling.default_config()
    c.name, c.steps, c.greedy_tail = "psi", 4, 2
    fn = sampling.make_sampler(c, denoise_fn=den, schedule=SCHED, graph="uniform", return_trajectory=True)
    out = jax.jit(lambda r: fn(r, x_init, jnp.asarray(clamp, jnp.int32)), compiler_options=FAST)(jax.random.key(4))
    last = np.where(clamp, 2, best(np.asarray(out.trajectory)[-2], grid[-2]))  # the greedy last step
    np.testing.assert_array_equal(np.asarray(out.tokens), np.where(clamp, 2, best(last, grid[-1])))
    assert int(out.nfe) == 5


def test_one_line_errors():
    c = sampling.default_config()
    c.name = "psi"
    with pytest.raises(ValueError, match=r"sampler 'psi' needs a uniform-state model \(diffusion.process='uniform'\), got 'absorbing'"):
        sampling.make_sampler(c, denoise_fn=oracle_denoise, schedule=SCHED, graph="absorbing", mask_id=V)
    for key, value, field in (
        ("psi_strength", 1.5, "psi_strength"),
        ("psi_strength", -0.1, "psi_strength"),
        ("psi_corrector_steps", -1, "psi_corrector_steps"),
        ("greedy_tail", 200, "greedy_tail"),
    ):
        bad = ml_collections.ConfigDict(c.to_dict())
        bad[key] = value
        with pytest.raises(ValueError, match=f"config.sampler.{field} must be"):
            sampling.make_sampler(bad, denoise_fn=oracle_denoise, schedule=SCHED, graph="uniform")
        with pytest.raises(ValueError, match=f"config.sampler.{field} must be"):
            sampling.config.validate(bad)
    edge = ml_collections.ConfigDict(c.to_dict())  # greedy_tail may cover every call: steps + noise removal
    edge.greedy_tail = edge.steps + 1
    sampling.make_sampler(edge, denoise_fn=oracle_denoise, schedule=SCHED, graph="uniform")
    edge.greedy_tail, edge.noise_removal = edge.steps + 1, False
    with pytest.raises(ValueError, match="config.sampler.greedy_tail must be"):
        sampling.make_sampler(edge, denoise_fn=oracle_denoise, schedule=SCHED, graph="uniform")
    duo = ml_collections.ConfigDict(dict(loss="duo", process="uniform", schedule="loglinear", schedule_kwargs={}))
    sampling.config.validate(c, diffusion=duo)
    masked_model = ml_collections.ConfigDict(dict(loss="mdlm", process="absorbing", schedule="loglinear", schedule_kwargs={}))
    with pytest.raises(ValueError, match=r"config.sampler.name='psi' needs a uniform-state model .*got 'absorbing'"):
        sampling.config.validate(c, diffusion=masked_model)
    anc = sampling.default_config()
    anc.greedy_tail = 1
    with pytest.raises(ValueError, match="config.sampler.greedy_tail must be 0 for sampler 'ancestral'"):
        sampling.config.validate(anc)


def test_psi_sample_defaults_are_the_default_config():
    """psi.psi_sample called with only its required arguments is the sampler of sampling.default_config() (the
    plain predictor, no correctors, noise removal, t_min 0, no filters, float64 draws): the same tokens and NFE for
    the same key, and no trajectory."""
    x = jnp.zeros((256, L), jnp.int32)
    fast = lambda f: jax.jit(f, compiler_options=FAST)(jax.random.key(9))
    direct = fast(lambda r: psi.psi_sample(oracle_denoise, r, x, schedule=SCHED, steps=4))
    ref = run(9, 4, x_init=x)
    np.testing.assert_array_equal(np.asarray(direct.tokens), np.asarray(ref.tokens))
    assert int(direct.nfe) == int(ref.nfe) == 5
    assert direct.trajectory is None


@pytest.mark.parametrize(
    "steps, corrector_steps, greedy_tail, noise_removal, nfe",
    [
        (4, 1, 3, True, 4 + 2 + 1),  # greedy: the noise removal and the last two steps; correctors after steps 1, 2
        (4, 1, 2, True, 4 + 3 + 1),  # greedy noise removal and last step: correctors after all but the last step
        (4, 1, 4, False, 4),  # every step greedy: no corrector at all
        (1, 2, 0, True, 1 + 1),  # one step: it is the last, no corrector
        (3, 2, 0, False, 3 + 2 * 2),
    ],
)
def test_nfe_is_the_number_of_network_calls(steps, corrector_steps, greedy_tail, noise_removal, nfe):
    """The reported NFE counts the calls the sampler makes (counted at run time: a corrector skipped by the
    lax.cond is not called), for greedy tails inside and outside the loop and a single step; and the times of
    the calls follow the grid down to t_min."""
    calls = []
    logits = jnp.log(jnp.asarray(PRIOR, jnp.float32))

    def den(x, t):
        jax.debug.callback(lambda t: calls.append(float(t[0])), t, ordered=True)
        return logits + 0.0 * x[..., None]

    t_min = 0.25 if steps in (1, 3) else 0.0
    progress = []
    out = run(8, steps, x_init=jnp.zeros((4, L), jnp.int32), denoise_fn=den, psi_strength=0.5, t_min=t_min,
              psi_corrector_steps=corrector_steps, greedy_tail=greedy_tail, noise_removal=noise_removal,
              progress_fn=lambda k: progress.append(int(k)))
    jax.block_until_ready(out.tokens)
    jax.effects_barrier()
    assert int(out.nfe) == len(calls) == nfe, (int(out.nfe), len(calls), nfe)
    assert sorted(progress) == list(range(1, steps + 1)), progress  # progress_fn: the steps done
    if steps == 3:  # the calls' times: each step at its t, its correctors at s, down to t_min = 0.25
        np.testing.assert_allclose(calls, [1.0, 0.75, 0.75, 0.75, 0.5, 0.5, 0.5], atol=1e-6)
    if steps == 1:  # the step at t = 1, the noise removal at t_min
        np.testing.assert_allclose(calls, [1.0, 0.25], atol=1e-6)
    assert psi.corrector_followed(steps, greedy_tail, noise_removal) * corrector_steps == nfe - steps - noise_removal


def test_psi_posterior_takes_a_kappa_per_row_and_noised_probs_is_the_forward_process():
    """kappa [B] (and alpha [B]) act row by row: each row equals the call with that row's scalars; kappa 1 is the
    reverse step, and noised_probs of a one-hot x_0 is marginal_probs."""
    k1, k2 = jax.random.split(jax.random.key(11))
    x0_mean = jax.nn.softmax(jax.random.normal(k1, (3, L, V)), axis=-1)
    xt = jax.random.randint(k2, (3, L), 0, V)
    a_s, a_t, kappa = jnp.array([0.5, 0.6, 0.9]), jnp.array([0.2, 0.3, 0.4]), jnp.array([0.0, 0.3, 1.0])
    full = np.asarray(PROC.psi_posterior_probs(x0_mean, xt, a_s, a_t, kappa))
    np.testing.assert_allclose(full.sum(-1), 1.0, atol=1e-5)
    for b in range(3):
        row = PROC.psi_posterior_probs(x0_mean[b:b + 1], xt[b:b + 1], a_s[b], a_t[b], float(kappa[b]))
        np.testing.assert_allclose(full[b], np.asarray(row)[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(full[2], np.asarray(PROC.mean_posterior_probs(x0_mean, xt, a_s, a_t))[2], atol=1e-6)
    for alpha in (a_s, 0.3):
        np.testing.assert_allclose(PROC.noised_probs(jax.nn.one_hot(xt, V), alpha), PROC.marginal_probs(xt, alpha),
                                   atol=1e-7)


@pytest.mark.parametrize("option", [dict(top_p=0.5), dict(top_k=1)])
def test_the_filters_reach_x_theta(option):
    """top_p 0.5 / top_k 1 on the constant x_theta PRIOR (0.6, 0.3, 0.1) leave only token 0: the last step to
    alpha(0) = 1 then draws x_0 = 0 everywhere (unfiltered, about 40% of the tokens are others)."""
    logits = jnp.log(jnp.asarray(PRIOR, jnp.float32))
    den = lambda x, t: logits + 0.0 * x[..., None]
    x = jnp.zeros((64, L), jnp.int32)
    out = run(10, 4, x_init=x, denoise_fn=den, noise_removal=False, **option)
    np.testing.assert_array_equal(np.asarray(out.tokens), 0)
    assert np.mean(np.asarray(run(10, 4, x_init=x, denoise_fn=den, noise_removal=False).tokens) != 0) > 0.2


def test_every_draw_has_its_own_key_and_precision_reaches_the_draws(monkeypatch):
    """The steps' and the correctors' draws use distinct keys (a corrector reusing a later step's key would
    correlate those draws: a bias no law of consecutive rows shows), and precision='float32_64bit' draws other
    Gumbel noise than the default float64 for the same key."""
    from ddlm.sampling import categorical

    keys, original = [], categorical.sample_categorical

    def recording(key, log_probs, precision="float64"):
        jax.debug.callback(lambda k: keys.append(np.asarray(k).tobytes()), jax.random.key_data(key), ordered=True)
        return original(key, log_probs, precision)

    monkeypatch.setattr(categorical, "sample_categorical", recording)
    logits = jnp.log(jnp.asarray(PRIOR, jnp.float32))
    den = lambda x, t: logits + 0.0 * x[..., None]
    x = jnp.zeros((64, L), jnp.int32)
    out = run(12, 4, x_init=x, denoise_fn=den, psi_strength=0.5, psi_corrector_steps=2)
    jax.block_until_ready(out.tokens)
    jax.effects_barrier()
    assert len(keys) == 4 + 3 * 2 and len(set(keys)) == len(keys), len(set(keys))
    monkeypatch.setattr(categorical, "sample_categorical", original)
    f32 = run(12, 4, x_init=x, denoise_fn=den, psi_strength=0.5, psi_corrector_steps=2, precision="float32_64bit")
    assert np.mean(np.asarray(f32.tokens) != np.asarray(out.tokens)) > 0.2
