"""Forward processes: Monte-Carlo marginals match the closed form; posteriors are distributions and
match Bayes' rule computed by brute force over the joint of (x_0, x_s, x_t)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm import processes

V = 5
MASK = 4  # absorbing: ids 0..3 are data, 4 is the mask


def _mc_marginal(proc, x0, alpha, n=200_000, seed=0):
    xs = proc.sample_xt(jax.random.PRNGKey(seed), jnp.broadcast_to(x0, (n, x0.shape[-1])), alpha)
    return np.stack(
        [np.bincount(np.asarray(xs[:, l]), minlength=proc.vocab_size) / n for l in range(x0.shape[-1])]
    )


@pytest.mark.parametrize("proc", [processes.AbsorbingProcess(V, MASK), processes.UniformProcess(V)], ids=repr)
@pytest.mark.parametrize("alpha", [0.1, 0.55, 0.9])
def test_sampled_marginals_match_closed_form(proc, alpha):
    x0 = jnp.array([[0, 3, 1]], jnp.int32)
    emp = _mc_marginal(proc, x0, alpha)
    exact = np.asarray(proc.marginal_probs(x0, jnp.array([alpha])))[0]
    n = 200_000
    se = np.sqrt(exact * (1 - exact) / n) + 1e-12
    assert np.all(np.abs(emp - exact) <= 5 * se + 1e-9), (emp, exact)
    # closed forms, written independently
    if isinstance(proc, processes.AbsorbingProcess):
        assert exact[0, 0] == pytest.approx(alpha) and exact[0, MASK] == pytest.approx(1 - alpha)
    else:
        assert exact[0, 0] == pytest.approx(alpha + (1 - alpha) / V)
        assert exact[0, 1] == pytest.approx((1 - alpha) / V)


def test_per_token_alpha_broadcasts():
    proc = processes.AbsorbingProcess(V, MASK)
    x0 = jnp.zeros((2, 3), jnp.int32)
    xt = proc.sample_xt(jax.random.PRNGKey(0), x0, jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    np.testing.assert_array_equal(xt, [[0, MASK, 0], [MASK, 0, MASK]])


def _brute_force_posterior(proc, x0_probs, xt, a_s, a_t):
    """sum_x0 p(x0 | x_t) q(x_s | x_t, x0), one token, where q(x_s | x_t, x0) is the normalised joint
    q(x_s | x0) q(x_t | x_s) over x_s (Bayes' rule by enumeration)."""
    n = proc.vocab_size
    ids = jnp.arange(n)[:, None]

    def q(a, frm):  # q(x | frm) for all x: [n_from, n]
        return np.asarray(proc.marginal_probs(frm, jnp.array([a] * frm.shape[0])))[:, 0, :]

    q_s_given_0 = q(a_s, ids)  # [x0, xs]
    q_t_given_s = q(a_t / a_s, ids)  # [xs, xt]
    out = np.zeros(n)
    for x0 in range(n):
        if x0_probs[x0] == 0:
            continue
        joint = q_s_given_0[x0] * q_t_given_s[:, xt]
        out += x0_probs[x0] * joint / joint.sum()
    return out


@pytest.mark.parametrize("kind", ["absorbing", "uniform"])
def test_posterior_is_bayes_rule(kind):
    with jax.enable_x64(True):
        proc = processes.get_process(kind, V, MASK)
        rng = np.random.default_rng(1)
        for a_s, a_t in [(0.9, 0.3), (0.5, 0.45), (0.99, 0.01)]:
            for xt in range(V):
                x0_probs = rng.dirichlet(np.ones(V))
                if kind == "absorbing":
                    x0_probs[MASK] = 0.0
                    x0_probs /= x0_probs.sum()
                    if xt != MASK:  # an unmasked x_t pins x_0 = x_t
                        x0_probs = np.eye(V)[xt]
                expected = _brute_force_posterior(proc, x0_probs, xt, a_s, a_t)
                got = np.asarray(
                    proc.posterior_probs(
                        jnp.asarray(x0_probs)[None, None],
                        jnp.array([[xt]]),
                        jnp.array([a_s]),
                        jnp.array([a_t]),
                    )
                )[0, 0]
                np.testing.assert_allclose(got, expected, atol=1e-12)
                assert got.sum() == pytest.approx(1.0, abs=1e-12) and np.all(got >= 0)


def test_uniform_posterior_sums_to_one_for_any_prediction():
    proc = processes.UniformProcess(V)
    x0_probs = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(0), (3, 7, V)))
    xt = jax.random.randint(jax.random.PRNGKey(1), (3, 7), 0, V)
    post = proc.posterior_probs(x0_probs, xt, jnp.array([0.8, 0.5, 0.3]), jnp.array([0.2, 0.1, 0.05]))
    np.testing.assert_allclose(post.sum(-1), 1.0, rtol=1e-5)
    assert bool(jnp.all(post >= 0))


def test_bad_arguments():
    with pytest.raises(ValueError, match="mask_id"):
        processes.AbsorbingProcess(4, 4)
    with pytest.raises(ValueError, match="mask_id"):
        processes.AbsorbingProcess(4, -1)
    processes.AbsorbingProcess(4, 0), processes.AbsorbingProcess(4, 3)  # the first and the last id are fine
    with pytest.raises(ValueError, match="vocab_size must be >= 2, got 1"):
        processes.UniformProcess(1)
    assert processes.get_process("uniform", 2) == processes.UniformProcess(2)  # two ids: the smallest graph
    with pytest.raises(ValueError, match="mask_id"):
        processes.get_process("absorbing", 4)
    with pytest.raises(ValueError, match="unknown process"):
        processes.get_process("gaussian", 4)


def test_absorbing_posterior_drops_mask_mass_and_renormalises_each_token():
    """x0_probs with mass on the mask id and rows of different totals (a raw prediction): each token's
    distribution loses its mask mass and is renormalised on its own, then the reverse step of MDLM (reveal with
    probability (a_s - a_t) / (1 - a_t), per row) applies; unmasked tokens are carried over."""
    proc = processes.AbsorbingProcess(V, MASK)
    rng = np.random.default_rng(2)
    x0_probs = rng.random((2, 3, V)) * np.array([1.0, 3.0, 0.2])[None, :, None]
    xt = np.array([[MASK, 2, MASK], [MASK, MASK, 0]], np.int32)
    a_s, a_t = np.array([0.9, 0.6]), np.array([0.3, 0.5])
    with jax.enable_x64(True):
        got = np.asarray(
            proc.posterior_probs(jnp.asarray(x0_probs), jnp.asarray(xt), jnp.asarray(a_s), jnp.asarray(a_t))
        )
    p = x0_probs.copy()
    p[..., MASK] = 0.0
    p /= p.sum(-1, keepdims=True)
    reveal = ((a_s - a_t) / (1 - a_t))[:, None, None]
    want = np.where((xt == MASK)[..., None], reveal * p + (1 - reveal) * np.eye(V)[MASK], np.eye(V)[xt])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("proc", [processes.AbsorbingProcess(V, MASK), processes.UniformProcess(V)], ids=repr)
def test_processes_compute_in_the_inputs_float_dtype(proc):
    """q(x_t | x_0) and the posterior come out in the dtype of alpha and of the prediction, at least float32:
    float32 inputs stay float32 even with x64 on (the samplers' arrays; float64 would double their memory),
    float64 stays float64, and bf16 alphas are computed in float32."""
    x = jnp.array([[0, 3, 1], [2, 2, 0]], jnp.int32)
    with jax.enable_x64(True):
        for dt in (jnp.float32, jnp.float64):  # traced only (jax.eval_shape): dtypes need no compiling
            a = jnp.array([0.3, 0.6], dt)
            assert jax.eval_shape(proc.marginal_probs, x, a).dtype == dt
            probs = jnp.full((2, 3, V), 1.0 / V, dt)
            assert jax.eval_shape(proc.posterior_probs, probs, x, a + 0.2, a).dtype == dt
        assert jax.eval_shape(proc.marginal_probs, x, jnp.array([0.3, 0.6], jnp.bfloat16)).dtype == jnp.float32
        for ids in (jnp.int32, jnp.int16):  # x_t in the ids' dtype
            key, x_ids = jax.random.key(0), x.astype(ids)
            assert jax.eval_shape(proc.sample_xt, key, x_ids, jnp.array([0.3, 0.6])).dtype == ids
