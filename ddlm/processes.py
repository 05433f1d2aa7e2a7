"""Forward corruption processes of discrete diffusion: the absorbing (mask) and the uniform graph.

Both act on each token independently. With keep-probability alpha_t = alpha(t) from a schedule:

    absorbing:  q(x_t | x_0) = alpha_t 1[x_t = x_0] + (1 - alpha_t) 1[x_t = mask]      (MDLM, MD4)
    uniform:    q(x_t | x_0) = alpha_t 1[x_t = x_0] + (1 - alpha_t) / V                (SEDD "Uniform" graph)

The uniform graph is the continuous-time chain with rate sigma'(t) (1/V 11^T - I), whose transition
over [0, t] is exactly the formula above with alpha_t = exp(-sigma(t)) (SEDD `graph_lib.Uniform`).

`GaussianRelaxation` is DUO's Gaussian diffusion on one-hot tokens (Sahoo et al. 2025, "The Diffusion
Duality"): the argmax of its latent is the uniform process above, with alpha_t given by the duality integral.

Each process gives:
    sample_xt(rng, x0, alpha_t)                       -> x_t ~ q(x_t | x_0)
    marginal_probs(x0, alpha_t)                       -> q(x_t | x_0)            [..., L, V]
    posterior_probs(x0_probs, xt, alpha_s, alpha_t)   -> q(x_s | x_t, x_0 ~ x0_probs)  [..., L, V]
The posterior is Bayes' rule q(x_s | x_t, x_0) = q(x_t | x_s) q(x_s | x_0) / q(x_t | x_0) for
s < t (alpha_s >= alpha_t), averaged over x_0 drawn from `x0_probs` (a one-hot x_0 gives the exact
posterior; a denoiser's prediction gives the reverse step p_theta(x_s | x_t) of ancestral samplers).

Vocabulary convention: `vocab_size` counts every id the network sees; for the absorbing graph one
of them, `mask_id`, is the absorbing state and never appears in data.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def _broadcast_alpha(alpha, x):
    """alpha: scalar, [B], [B, 1] or [B, L] -> broadcastable to x [B, L]."""
    alpha = jnp.asarray(alpha)
    if alpha.ndim == 1 and x.ndim == 2:
        alpha = alpha[:, None]
    return alpha


@dataclasses.dataclass(frozen=True)
class AbsorbingProcess:
    """Absorbing ("masking") graph: a token stays x_0 with probability alpha_t, else becomes mask_id."""

    vocab_size: int
    mask_id: int

    def __post_init__(self):
        if not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(
                f"AbsorbingProcess: mask_id must be in [0, vocab_size={self.vocab_size}), got {self.mask_id}"
            )

    def sample_xt(self, rng, x0, alpha_t):
        """x0: int [B, L]; alpha_t: [B], [B, L] or scalar. Returns x_t int [B, L]."""
        alpha_t = _broadcast_alpha(alpha_t, x0)
        keep = jax.random.uniform(rng, x0.shape, dtype=jnp.float32) < alpha_t
        return jnp.where(keep, x0, self.mask_id).astype(x0.dtype)

    def marginal_probs(self, x0, alpha_t):
        """q(x_t | x_0): [B, L, V]."""
        a = _broadcast_alpha(alpha_t, x0)[..., None]
        one_hot = jax.nn.one_hot(x0, self.vocab_size, dtype=jnp.result_type(a, jnp.float32))
        mask = jax.nn.one_hot(self.mask_id, self.vocab_size, dtype=one_hot.dtype)
        return a * one_hot + (1.0 - a) * mask

    def posterior_probs(self, x0_probs, xt, alpha_s, alpha_t):
        """q(x_s | x_t, x_0) averaged over x_0 ~ x0_probs (MDLM's reverse step with the SUBS parameterisation).

        x0_probs: [B, L, V] (any mass on mask_id is removed and the rest renormalised);
        xt: int [B, L]. A masked token is revealed as x_0 with probability (alpha_s - alpha_t) / (1 - alpha_t)
        and stays masked with probability (1 - alpha_s) / (1 - alpha_t); an unmasked token is carried over.
        Returns [B, L, V].
        """
        a_s = _broadcast_alpha(alpha_s, xt)[..., None]
        a_t = _broadcast_alpha(alpha_t, xt)[..., None]
        not_mask = jnp.arange(self.vocab_size) != self.mask_id
        p0 = jnp.where(not_mask, x0_probs, 0.0)
        p0 = p0 / jnp.sum(p0, axis=-1, keepdims=True)
        mask = jax.nn.one_hot(self.mask_id, self.vocab_size, dtype=p0.dtype)
        reveal = (a_s - a_t) / (1.0 - a_t)
        masked_post = reveal * p0 + (1.0 - reveal) * mask
        carried = jax.nn.one_hot(xt, self.vocab_size, dtype=p0.dtype)
        return jnp.where((xt == self.mask_id)[..., None], masked_post, carried)


@dataclasses.dataclass(frozen=True)
class UniformProcess:
    """Uniform graph: a token stays x_0 with probability alpha_t, else is redrawn uniformly from V ids."""

    vocab_size: int

    def __post_init__(self):
        if self.vocab_size < 2:
            raise ValueError(f"UniformProcess: vocab_size must be >= 2, got {self.vocab_size}")

    def sample_xt(self, rng, x0, alpha_t):
        """x0: int [B, L]; alpha_t: [B], [B, L] or scalar. Returns x_t int [B, L]."""
        alpha_t = _broadcast_alpha(alpha_t, x0)
        keep_rng, draw_rng = jax.random.split(rng)
        keep = jax.random.uniform(keep_rng, x0.shape, dtype=jnp.float32) < alpha_t
        noise = jax.random.randint(draw_rng, x0.shape, 0, self.vocab_size, dtype=x0.dtype)
        return jnp.where(keep, x0, noise)

    def marginal_probs(self, x0, alpha_t):
        """q(x_t | x_0): [B, L, V]."""
        a = _broadcast_alpha(alpha_t, x0)[..., None]
        one_hot = jax.nn.one_hot(x0, self.vocab_size, dtype=jnp.result_type(a, jnp.float32))
        return a * one_hot + (1.0 - a) / self.vocab_size

    def posterior_probs(self, x0_probs, xt, alpha_s, alpha_t):
        """q(x_s | x_t, x_0) averaged over x_0 ~ x0_probs, by Bayes' rule in O(V) per token.

        sum_{x0} p(x0) q(x_t | x_s) q(x_s | x0) / q(x_t | x0), with q(x_s = j | x0) = a_s 1[j = x0] + (1 - a_s)/V
        and q(x_t | x_s = j) = a_{t|s} 1[x_t = j] + (1 - a_{t|s})/V, a_{t|s} = a_t / a_s. With w(x0) =
        p(x0) / q(x_t | x0) the sum over x0 is a_s w(j) + (1 - a_s)/V sum(w). The result sums to 1 for any
        x0_probs. x0_probs: [B, L, V]; xt: int [B, L]; returns [B, L, V].
        """
        n = self.vocab_size
        a_s = _broadcast_alpha(alpha_s, xt)[..., None]
        a_t = _broadcast_alpha(alpha_t, xt)[..., None]
        xt_one_hot = jax.nn.one_hot(xt, n, dtype=x0_probs.dtype)
        q_t_given_0 = a_t * xt_one_hot + (1.0 - a_t) / n
        w = x0_probs / q_t_given_0
        s_given_0 = a_s * w + (1.0 - a_s) / n * jnp.sum(w, axis=-1, keepdims=True)
        a_ts = a_t / a_s
        t_given_s = a_ts * xt_one_hot + (1.0 - a_ts) / n
        return t_given_s * s_given_0


    def mean_posterior_probs(self, x0_mean, xt, alpha_s, alpha_t):
        """The reverse step of the mean parameterisation (UDLM; DUO `DUO_BASE._posterior_from_x0`): the posterior
        q(x_s | x_t, x_0) with the one-hot x_0 replaced by a distribution x0_mean [B, L, V],

            (V a_t x x_t + (a_{t|s} - a_t) x_t + (a_s - a_t) x + (1 - a_{t|s})(1 - a_s)/V 1) / (V a_t x[x_t] + 1 - a_t),

        with x = x0_mean and x_t one-hot. It equals q(x_t | x_s) q(x_s | x_0 ~ x) / q(x_t | x_0 ~ x): x0_mean is a
        *prior* on x_0 here, not a posterior; for the leave-one-out posterior pi(v) = p(x_0^l = v | x_t^{-l}) it is
        the exact per-token reverse step (= `posterior_probs` of the posterior pi(v) q(x_t^l | v) / Z). This is
        the x_theta that the DUO loss (`ddlm.losses.duo_loss`) is minimised by. Returns [B, L, V]."""
        n = self.vocab_size
        a_s = _broadcast_alpha(alpha_s, xt)[..., None]
        a_t = _broadcast_alpha(alpha_t, xt)[..., None]
        x = x0_mean
        xt_one_hot = jax.nn.one_hot(xt, n, dtype=x.dtype)
        a_ts = a_t / a_s
        x_at_xt = jnp.sum(x * xt_one_hot, axis=-1, keepdims=True)
        num = n * a_t * x * xt_one_hot + (a_ts - a_t) * xt_one_hot + (a_s - a_t) * x + (1 - a_ts) * (1 - a_s) / n
        return num / (n * a_t * x_at_xt + 1.0 - a_t)

    def noised_probs(self, x0_probs, alpha):
        """The forward process applied to a distribution over x_0: alpha x0_probs + (1 - alpha)/V, [B, L, V]
        (s-sahoo/duo `trainer_base.py` UniformState._forward_process); a one-hot x0_probs gives marginal_probs."""
        a = _broadcast_alpha(alpha, x0_probs[..., 0])[..., None]
        return a * x0_probs + (1.0 - a) / self.vocab_size

    def psi_posterior_probs(self, x0_mean, xt, alpha_s, alpha_t, kappa):
        """The Psi-posterior of a step from t to s <= t (Deschenaux, Gulcehre & Sahoo 2026, "The Diffusion Duality,
        Chapter II: Psi-Samplers", arXiv 2602.21185; s-sahoo/duo `trainer_base.py` `_psi_update`), [B, L, V]:

            kappa q(x_s | x_t, x_0) + (1 - kappa) q(x_s | x_0),   x_0 ~ q(x_0 | x_t, x0_mean),

        the reverse step (`mean_posterior_probs`, the predictor) mixed with "denoise to t = 0, then noise forward
        to s": x_0 drawn from the posterior of x_0 given x_t (`mean_posterior_probs` at alpha_s = 1, i.e.
        x0_mean(v) q(x_t | v) / Z) and re-noised by `noised_probs` at alpha_s. For a one-hot (or the exact joint
        posterior over) x_0 both terms have marginal q(x_s) when x_t ~ q(x_t), so any kappa in [0, 1] keeps the
        forward marginals: kappa = 1 is the plain ancestral step; s = t (alpha_s = alpha_t) is a pure corrector,
        kappa 1[x_s = x_t] + (1 - kappa) q_t(x_s | x_0), which leaves q_t invariant (tests/test_psi_sampler.py
        checks both by enumeration). kappa: a scalar or [B] in [0, 1]."""
        k = jnp.asarray(kappa)
        if k.ndim == 1:
            k = k[:, None, None]
        predictor = self.mean_posterior_probs(x0_mean, xt, alpha_s, alpha_t)
        clean = self.mean_posterior_probs(x0_mean, xt, jnp.ones_like(jnp.asarray(alpha_t)), alpha_t)
        return k * predictor + (1.0 - k) * self.noised_probs(clean, alpha_s)


@dataclasses.dataclass(frozen=True)
class GaussianRelaxation:
    """DUO's Gaussian diffusion on one-hot tokens and its duality with the uniform process (Sahoo et al. 2025,
    "The Diffusion Duality", sec. 3-4; s-sahoo/duo `algo.py` DUO._q_xt_gaussian, `utils.py` _discrete_prob_map):

        w_t = a_t e_{x_0} + s_t eps,  eps ~ N(0, I_V),  a_t^2 = sigmoid(-gamma_t),  s_t^2 = sigmoid(gamma_t),
        gamma_t = gamma_min + t (gamma_max - gamma_min)                            (variance preserving)

    argmax(w_t) is distributed as the uniform process q(x_t | x_0) with keep-probability (DUO eq. 10)

        alpha_t = T(gamma_t) = V/(V - 1) [ int phi(u) Phi(u + mu_t)^(V-1) du - 1/V ],  mu_t = a_t/s_t = e^(-gamma_t/2)

    (the integral is P(argmax = x_0): the x_0 coordinate, u + mu_t after dividing by s_t, beats V - 1
    independent normals). The curriculum shows the network softmax(w_t / tau) instead of one-hot(argmax w_t):
    as tau -> 0 the two coincide, and the loss is the uniform-state NELBO of argmax(w_t).

    alpha / dalpha make it a schedule of the uniform process over t in [0, 1] (only over its gamma range:
    alpha(0) < 1 and alpha(1) > 0), computed by a fixed trapezoid rule over u in [-10, 10] (error < 1e-9 for
    V <= 50k, tests/test_losses_fewstep.py against scipy's quad); dalpha by forward-mode differentiation.
    """

    vocab_size: int
    gamma_min: float = -3.5
    gamma_max: float = -1.75
    quadrature_points: int = 1601

    def __post_init__(self):
        if self.vocab_size < 2:
            raise ValueError(f"GaussianRelaxation: vocab_size must be >= 2, got {self.vocab_size}")
        if not self.gamma_min < self.gamma_max:
            raise ValueError(
                f"GaussianRelaxation: need gamma_min < gamma_max, got {self.gamma_min} and {self.gamma_max}"
            )

    def gamma(self, t):
        return self.gamma_min + jnp.asarray(t) * (self.gamma_max - self.gamma_min)

    def gaussian(self, t):
        """(a_t, s_t): the signal and noise scales of w_t (a^2 + s^2 = 1)."""
        g = self.gamma(t)
        return jnp.sqrt(jax.nn.sigmoid(-g)), jnp.sqrt(jax.nn.sigmoid(g))

    def alpha(self, t):
        """The uniform process's keep-probability of argmax(w_t): T(gamma_t) (DUO eq. 10), float t of any shape."""
        t = jnp.asarray(t)
        dtype = jnp.promote_types(t.dtype, jnp.float32)
        mu = jnp.exp(-0.5 * self.gamma(t.astype(dtype)))
        u = jnp.linspace(-10.0, 10.0, self.quadrature_points, dtype=dtype)
        n = self.vocab_size
        # P(argmax != x_0) = int phi(u) (1 - Phi(u + mu)^(V-1)) du, with expm1: alpha near 1 keeps its digits
        # in float32 (the integral of P(argmax = x_0) itself would lose 1e-4 to rounding there).
        log_cdf = jax.scipy.special.log_ndtr(u + mu[..., None])
        f = jnp.exp(-0.5 * u**2) / jnp.sqrt(2.0 * jnp.pi).astype(dtype) * -jnp.expm1((n - 1) * log_cdf)
        h = 20.0 / (self.quadrature_points - 1)  # not u[1] - u[0]: a float32 difference of two ~10s
        p_miss = h * (jnp.sum(f, axis=-1) - 0.5 * (f[..., 0] + f[..., -1]))
        return 1.0 - n / (n - 1.0) * p_miss

    def dalpha(self, t):
        """d alpha / d t (negative), by forward-mode differentiation of the quadrature."""
        t = jnp.asarray(t, jnp.promote_types(jnp.asarray(t).dtype, jnp.float32))
        return jax.jvp(self.alpha, (t,), (jnp.ones_like(t),))[1]

    def sigma(self, t):
        return -jnp.log(self.alpha(t))

    def dsigma(self, t):
        return -self.dalpha(t) / self.alpha(t)

    def sample_latent(self, rng, x0, t, noise=None):
        """w_t [B, L, V] float32 for x0 int [B, L] and t [B] or [B, L]; `noise` (eps, [B, L, V]) if given, so
        that two times can share one eps (DUO's consistency distillation, `Distillation._sample_trajectory`)."""
        a, s = self.gaussian(t)
        a = _broadcast_alpha(a, x0)[..., None]
        s = _broadcast_alpha(s, x0)[..., None]
        if noise is None:
            noise = jax.random.normal(rng, x0.shape + (self.vocab_size,), jnp.float32)
        return (a * jax.nn.one_hot(x0, self.vocab_size, dtype=noise.dtype) + s * noise).astype(jnp.float32)


PROCESSES = ("absorbing", "uniform")


def get_process(name: str, vocab_size: int, mask_id: int | None = None):
    """'absorbing' (needs mask_id) or 'uniform'."""
    if name == "absorbing":
        if mask_id is None:
            raise ValueError("the absorbing process needs a mask_id (the tokenizer's reserved mask id)")
        return AbsorbingProcess(vocab_size, mask_id)
    if name == "uniform":
        return UniformProcess(vocab_size)
    raise ValueError(f"unknown process {name!r}; expected one of {PROCESSES}")
