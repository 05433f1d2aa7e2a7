"""An exactly solvable toy problem: a fixed distribution over all sequences of length L over V tokens,
with its exact optimal denoisers (by enumeration) for the absorbing and the uniform graph, the block-causal
(BD3-LM) and the autoregressive factorisations.

A public tool to check a new loss, estimator or sampler against exact values in a few lines: the NELBO of
every objective with the exact denoiser is a known number (the entropy H, or H plus the boundary terms a
schedule leaves), and a sampler driven by the exact denoiser must reproduce `probs`:

    from ddlm import losses, schedules
    from ddlm.eval import likelihood, oracle

    toy = oracle.ToyDistribution(num_tokens=3, length=4)
    with jax.enable_x64(True):
        x0 = toy.sample(jax.random.key(0), 4096)
        est = likelihood.nelbo_per_sequence(
            "mdlm", toy.apply_fn("absorbing"), x0, None, jax.random.key(1),
            schedule=schedules.LinearSchedule(), vocab_size=toy.absorbing_vocab_size, mask_id=toy.mask_id)
        print(likelihood.ratio_summary(est.nats, est.tokens), toy.entropy() / toy.length)

Everything is plain jax.numpy, usable inside jit; run it under `jax.enable_x64(True)` for float64 accuracy.

Conventions match ddlm: real tokens are 0..V-1; the absorbing graph adds mask_id = V, so the network's
vocabulary is V + 1 there; the uniform graph uses the V real tokens only.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np


class ToyDistribution:
    """p(x) over all V^L sequences, drawn once from a Dirichlet with a fixed seed (full support)."""

    def __init__(self, num_tokens: int = 3, length: int = 4, seed: int = 0, concentration: float = 1.0):
        self.num_tokens = num_tokens
        self.length = length
        self.mask_id = num_tokens
        self.absorbing_vocab_size = num_tokens + 1
        rng = np.random.default_rng(seed)
        self.seqs = np.array(list(itertools.product(range(num_tokens), repeat=length)), dtype=np.int32)
        self.probs = rng.dirichlet(np.full(len(self.seqs), concentration))
        # All absorbing-graph states x_t in {0..V}^L (V is the mask).
        self.abs_states = np.array(
            list(itertools.product(range(num_tokens + 1), repeat=length)), dtype=np.int32
        )

    # ---------------------------------------------------------------- exact quantities (numpy, float64)

    def entropy(self) -> float:
        """H(x_0) in nats per sequence."""
        p = self.probs
        return float(-np.sum(p * np.log(p)))

    def marginal_entropies(self) -> np.ndarray:
        """[L]: H(x_0^l) of each position's marginal."""
        out = []
        for l in range(self.length):
            m = np.bincount(self.seqs[:, l], weights=self.probs, minlength=self.num_tokens)
            out.append(-np.sum(m * np.log(m)))
        return np.array(out)

    def index(self, x, base=None):
        """Row index of sequences x [..., L] in `seqs` (base V) or `abs_states` (base V + 1)."""
        base = self.num_tokens if base is None else base
        powers = base ** np.arange(self.length - 1, -1, -1)
        return jnp.sum(jnp.asarray(x) * jnp.asarray(powers), axis=-1)

    def absorbing_kernel(self, alpha: float) -> np.ndarray:
        """q(x_t | x_0) as a matrix [V^L, (V+1)^L] (float64)."""
        x0 = self.seqs[:, None, :]
        xt = self.abs_states[None, :, :]
        per = np.where(xt == self.mask_id, 1.0 - alpha, np.where(xt == x0, alpha, 0.0))
        return np.prod(per, axis=-1)

    def uniform_kernel(self, alpha: float) -> np.ndarray:
        """q(x_t | x_0) as a matrix [V^L, V^L] (float64)."""
        x0 = self.seqs[:, None, :]
        xt = self.seqs[None, :, :]
        v = self.num_tokens
        per = np.where(xt == x0, alpha + (1.0 - alpha) / v, (1.0 - alpha) / v)
        return np.prod(per, axis=-1)

    def mutual_information(self, kernel: np.ndarray) -> float:
        """I(x_0; x_t) for the channel q(x_t | x_0) = kernel [N0, Nt]."""
        joint = self.probs[:, None] * kernel
        pt = joint.sum(0)
        ratio = np.where(joint > 0, joint / (self.probs[:, None] * pt[None, :] + 1e-300), 1.0)
        return float(np.sum(np.where(joint > 0, joint * np.log(ratio), 0.0)))

    # ---------------------------------------------------------------- oracle denoisers (jax, jittable)

    def absorbing_posterior_table(self) -> np.ndarray:
        """[(V+1)^L, L, V+1]: p(x_0^l = v | x_t) for every absorbing state x_t (exact, float64).

        Masked positions hold the data posterior given the unmasked tokens; unmasked positions are one-hot
        at x_t^l; the mask column is 0. States with zero probability (none, full support) would be uniform.
        """
        v = self.num_tokens
        consistent = np.all(
            (self.abs_states[:, None, :] == self.mask_id) | (self.abs_states[:, None, :] == self.seqs[None]),
            axis=-1,
        )  # [M, N]
        w = consistent * self.probs[None, :]
        w = w / w.sum(1, keepdims=True)
        onehot = np.eye(v + 1)[self.seqs]  # [N, L, V+1]
        return np.einsum("mn,nlv->mlv", w, onehot)

    def absorbing_denoiser(self):
        """denoise_fn(xt [B, L], t) -> log p(x_0 | x_t) [B, L, V+1] (mask column = -inf replaced by -1e30)."""
        table = jnp.asarray(np.log(np.maximum(self.absorbing_posterior_table(), 1e-300)))

        def denoise_fn(xt, t=None):
            del t  # the absorbing posterior of x_0 does not depend on t
            return table[self.index(xt, self.num_tokens + 1)]

        return denoise_fn

    def uniform_x0_posterior(self, xt, alpha):
        """p(x_0^l = v | x_t) [B, L, V] on the uniform graph with keep-probability alpha [B] (jittable)."""
        v = self.num_tokens
        seqs = jnp.asarray(self.seqs)
        probs = jnp.asarray(self.probs)
        a = jnp.asarray(alpha)[:, None, None]
        match = xt[:, None, :] == seqs[None]  # [B, N, L]
        per = jnp.where(match, a + (1.0 - a) / v, (1.0 - a) / v)
        w = probs[None] * jnp.prod(per, axis=-1)  # [B, N]
        w = w / jnp.sum(w, axis=1, keepdims=True)
        onehot = jax.nn.one_hot(seqs, v, dtype=w.dtype)  # [N, L, V]
        return jnp.einsum("bn,nlv->blv", w, onehot)

    def uniform_log_score(self, xt, alpha):
        """Exact log ratios log p_t(x_t^{l<-y}) / p_t(x_t) on the uniform graph: [B, L, V] (jittable)."""
        v = self.num_tokens
        seqs = jnp.asarray(self.seqs)
        probs = jnp.asarray(self.probs)
        a = jnp.asarray(alpha)[:, None, None]

        def marginal(y):  # y [B, L] -> p_t(y) [B]
            per = jnp.where(y[:, None, :] == seqs[None], a + (1.0 - a) / v, (1.0 - a) / v)
            return jnp.sum(probs[None] * jnp.prod(per, axis=-1), axis=1)

        base = marginal(xt)
        cols = []
        for l in range(self.length):
            row = []
            for y in range(v):
                row.append(marginal(xt.at[:, l].set(y)))
            cols.append(jnp.stack(row, axis=-1))
        return jnp.log(jnp.stack(cols, axis=1)) - jnp.log(base)[:, None, None]

    # ---------------------------------------------------------------- networks for losses.training_loss

    def block_denoiser(self, block_size: int):
        """apply(xt, t, x0) -> log p(x_0^l | x_0^{<b}, x_t^b) [B, L, V+1] for l in block b: the exact
        block-causal (BD3-LM) denoiser; earlier blocks are clean, later blocks marginalised out."""
        if self.length % block_size:
            raise ValueError(f"block_size must divide length={self.length}, got {block_size}")
        den = self.absorbing_denoiser()

        def apply(xt, t, x0):
            del t
            out = []
            for lo in range(0, self.length, block_size):
                hi = lo + block_size
                state = jnp.concatenate(
                    [x0[:, :lo], xt[:, lo:hi], jnp.full_like(xt[:, hi:], self.mask_id)], axis=1
                )
                out.append(den(state)[:, lo:hi])
            return jnp.concatenate(out, axis=1)

        return apply

    def autoregressive_log_probs(self):
        """apply(tokens) -> [B, L, V+1]: position l holds log p(x^{l+1} | x^{<=l}) (the last position and the
        mask column are -1e30): the exact next-token conditionals."""
        v, n = self.num_tokens, self.length
        table = np.full((n, len(self.seqs), v + 1), -1e30)
        for l in range(n - 1):
            for idx, s in enumerate(self.seqs):
                sel = np.all(self.seqs[:, : l + 1] == s[: l + 1], axis=1)
                cond = np.bincount(self.seqs[sel, l + 1], weights=self.probs[sel], minlength=v)
                table[l, idx, :v] = np.log(cond / cond.sum())
        table = jnp.asarray(table)
        return lambda tokens: table[jnp.arange(n)[None, :], self.index(tokens)[:, None]]

    def apply_fn(self, kind: str, schedule=None, block_size: int = 2):
        """The exact network in the form `losses.training_loss` calls it, apply(xt, t, x0_context) -> [B, L, V(+1)]:

        'absorbing'    log p(x_0 | x_t) (losses mdlm, d3pm, radd)
        'sedd_absorb'  log p(x_0 | x_t) + log V, which SEDD's parameterisation turns into the exact score
        'uniform'      the exact log ratios of the uniform graph at alpha = schedule.alpha(t) (sedd_uniform)
        'block'        the block-causal denoiser with `block_size` (bd3lm)
        'ar'           the exact next-token conditionals (ar)
        """
        if kind in ("absorbing", "sedd_absorb"):
            den = self.absorbing_denoiser()
            shift = float(np.log(self.num_tokens)) if kind == "sedd_absorb" else 0.0
            return lambda xt, t, ctx: den(xt) + shift
        if kind == "uniform":
            if schedule is None:
                raise ValueError("apply_fn('uniform') needs the schedule (the scores depend on alpha(t))")
            return lambda xt, t, ctx: self.uniform_log_score(xt, schedule.alpha(t))
        if kind == "block":
            return self.block_denoiser(block_size)
        if kind == "ar":
            ar = self.autoregressive_log_probs()
            return lambda xt, t, ctx: ar(xt)
        raise ValueError(f"unknown kind {kind!r}; expected absorbing | sedd_absorb | uniform | block | ar")

    def sample(self, rng, n):
        """n exact samples x_0 [n, L] (for Monte-Carlo tests)."""
        idx = jax.random.choice(rng, len(self.seqs), (n,), p=jnp.asarray(self.probs))
        return jnp.asarray(self.seqs)[idx]
