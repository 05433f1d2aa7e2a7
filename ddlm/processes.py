"""Forward corruption processes of discrete diffusion: the absorbing (mask) and the uniform graph.

Both act on each token independently. With keep-probability alpha_t = alpha(t) from a schedule:

    absorbing:  q(x_t | x_0) = alpha_t 1[x_t = x_0] + (1 - alpha_t) 1[x_t = mask]      (MDLM, MD4)
    uniform:    q(x_t | x_0) = alpha_t 1[x_t = x_0] + (1 - alpha_t) / V                (SEDD "Uniform" graph)

The uniform graph is the continuous-time chain with rate sigma'(t) (1/V 11^T - I), whose transition
over [0, t] is exactly the formula above with alpha_t = exp(-sigma(t)) (SEDD `graph_lib.Uniform`).

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
