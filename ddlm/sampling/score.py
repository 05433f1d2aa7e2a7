"""SEDD score samplers (Lou et al. 2024, sec. 4.1-4.2): Euler and analytic ("Tweedie tau-leaping") reverse
steps on the absorbing and the uniform graph.

    score_sample(score_fn, rng, x_init, *, graph, schedule, steps, method) -> SampleOutput

    score_fn(xt int32 [B, L], t float32 [B]) -> log ratios [B, L, V]: log p_t(x_t^{l <- y}) / p_t(x_t)
                                                (the entry at y = x_t^l is ignored: the ratio is 1)

A denoiser gives a score on the absorbing graph (RADD Thm. 1): at a masked position the ratio to
y != mask is alpha_t / (1 - alpha_t) p(x_0 = y | x_t) (`absorbing_score_fn`); a SEDD network's output is
turned into log ratios by ddlm.losses.sedd_absorbing_log_score, and a uniform-graph SEDD network outputs
log ratios directly.

With tau = sigma(t) - sigma(s) and s_y the ratios, per position (SEDD `graph_lib`, `sampling.py`):
  Euler:     p(y) = (t - s) sigma'(t) R(x_t -> y) for y != x_t, p(x_t) = 1 - sum, with reverse rates
             R = s_y for a masked x_t (absorbing; 0 from a decoded token) and s_y / V (uniform).
  Analytic:  p(y) ~ [exp(-tau Q) s]_y exp(tau Q)(y -> x_t)   (SEDD Thm. 4.2, exact for one position)
             absorbing, x_t masked: p(y) = (e^tau - 1) s_y for y != mask, p(mask) = 1 - sum
             uniform: [e^tau s_y + (1 - e^tau)/V sum_z s_z] [e^-tau 1(y = x_t) + (1 - e^-tau)/V]
Negative entries (a too-large Euler step) are clipped to 0 and the rest renormalised.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ddlm import losses
from ddlm import schedules as schedules_lib
from ddlm.sampling import categorical
from ddlm.sampling.masked import SampleOutput, time_grid, x0_log_probs

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]

GRAPHS = ("absorbing", "uniform")
METHODS = ("euler", "analytic")


def absorbing_score_fn(
    denoise_fn,
    schedule: schedules_lib.Schedule,
    mask_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> ScoreFn:
    """The absorbing-graph score of a denoiser (RADD Thm. 1): log s_y = log(alpha/(1-alpha)) + log p(x_0 = y | x_t)."""

    def score_fn(xt, t):
        logp = x0_log_probs(denoise_fn, xt, t, mask_id, temperature, top_k, top_p)
        log_odds = -jnp.log(jnp.expm1(schedule.sigma(t)))  # log(alpha / (1 - alpha)), [B]
        return logp + log_odds[:, None, None]

    return score_fn


def _ratios(log_score, xt):
    """s [B, L, V] float32 with s = 1 at the current token."""
    log_score = log_score.astype(jnp.float32)
    current = jax.nn.one_hot(xt, log_score.shape[-1], dtype=bool)
    return jnp.exp(jnp.where(current, 0.0, jnp.minimum(log_score, 80.0)))


def _normalise(probs, fallback):
    """Clip negatives, renormalise; rows with no positive finite mass (float32 cancellation in the analytic
    step at very large tau) fall back to `fallback` (staying put)."""
    probs = jnp.where(jnp.isfinite(probs), jnp.maximum(probs, 0.0), 0.0)
    total = jnp.sum(probs, axis=-1, keepdims=True)
    return jnp.where(total > 0, probs / jnp.where(total > 0, total, 1.0), fallback)


def step_probs(log_score, xt, *, graph: str, method: str, sigma_t, sigma_s, dsigma_t, dt, mask_id=None):
    """Per-position probabilities [B, L, V] of x_s given x_t for one reverse step (see module docstring).

    log_score [B, L, V]; xt int [B, L]; sigma_t, sigma_s, dsigma_t, dt: [B] (or scalars)."""
    s = _ratios(log_score, xt)
    v = s.shape[-1]
    current = jax.nn.one_hot(xt, v, dtype=jnp.float32)
    col = lambda a: (
        jnp.asarray(a, jnp.float32).reshape((-1, 1, 1)) if jnp.ndim(a) else jnp.asarray(a, jnp.float32)
    )
    if graph == "absorbing":
        if mask_id is None:
            raise ValueError("graph 'absorbing' needs mask_id")
        is_mask_col = jnp.arange(v) == mask_id
        if method == "euler":
            weight = col(dt) * col(dsigma_t)
        elif method == "analytic":
            weight = jnp.expm1(col(sigma_t) - col(sigma_s))
        else:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        moves = jnp.where(is_mask_col, 0.0, weight * s)
        stay = 1.0 - jnp.sum(moves, axis=-1, keepdims=True)
        masked_probs = jnp.where(is_mask_col, stay, moves)
        probs = jnp.where((xt == mask_id)[..., None], masked_probs, current)
        return _normalise(probs, current)
    if graph == "uniform":
        if method == "euler":
            moves = col(dt) * col(dsigma_t) / v * s * (1.0 - current)
            probs = moves + current * (1.0 - jnp.sum(moves, axis=-1, keepdims=True))
            return _normalise(probs, current)
        if method == "analytic":
            tau = col(sigma_t) - col(sigma_s)
            stag = jnp.exp(tau) * s - jnp.expm1(tau) / v * jnp.sum(s, axis=-1, keepdims=True)
            trans = jnp.exp(-tau) * current - jnp.expm1(-tau) / v
            return _normalise(stag * trans, current)
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    raise ValueError(f"unknown graph {graph!r}; expected one of {GRAPHS}")


def score_sample(
    score_fn: ScoreFn,
    rng,
    x_init,
    *,
    graph: str,
    schedule: schedules_lib.Schedule,
    steps: int,
    method: str = "analytic",
    mask_id: int | None = None,
    clamp=None,
    t_min: float = 0.0,
    noise_removal: bool = True,
    precision: str = "float64",
    return_trajectory: bool = False,
    progress_fn=None,
) -> SampleOutput:
    """SEDD sampling from t = 1 to t_min in `steps` Euler or analytic steps, then (noise_removal) SEDD's
    final denoising step: the analytic step to sigma = 0 taken greedily (one more call).

    x_init int32 [B, L]: absorbing graph: mask_id where to generate, known tokens elsewhere. Uniform graph:
    positions with clamp [B, L] True keep x_init, the others start uniformly random (clamp None: all free).
    nfe = steps (+ 1 with noise_removal). progress_fn(steps_done) is called after every step, if given.
    """
    if graph not in GRAPHS:
        raise ValueError(f"unknown graph {graph!r}; expected one of {GRAPHS}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    x_init = x_init.astype(jnp.int32)
    batch, length = x_init.shape
    vocab = jax.eval_shape(score_fn, x_init, jnp.zeros((batch,), jnp.float32)).shape[-1]
    init_rng, rng = jax.random.split(rng)
    if graph == "absorbing":
        if mask_id is None:
            raise ValueError("graph 'absorbing' needs mask_id")
        clamp = x_init != mask_id if clamp is None else clamp
    else:
        clamp = jnp.zeros(x_init.shape, bool) if clamp is None else jnp.asarray(clamp, bool)
        noise = jax.random.randint(init_rng, x_init.shape, 0, vocab, jnp.int32)
        x_init = jnp.where(clamp, x_init, noise)
    grid = time_grid(steps, t_min)
    ones = jnp.ones((batch,), jnp.float32)

    def body(k, carry):
        x, traj = carry
        t, s = grid[k] * ones, grid[k + 1] * ones
        log_score = score_fn(x, t)
        probs = step_probs(
            log_score,
            x,
            graph=graph,
            method=method,
            sigma_t=schedule.sigma(t),
            sigma_s=schedule.sigma(s),
            dsigma_t=schedule.dsigma(t),
            dt=t - s,
            mask_id=mask_id,
        )
        x_new = categorical.sample_categorical(jax.random.fold_in(rng, k), jnp.log(probs), precision)
        x_new = jnp.where(clamp, x, x_new)
        if return_trajectory:
            traj = traj.at[k + 1].set(x_new)
        if progress_fn is not None:
            jax.debug.callback(progress_fn, k + 1)
        return x_new, traj

    traj0 = (
        jnp.zeros((steps + 1, batch, length), jnp.int32).at[0].set(x_init)
        if return_trajectory
        else jnp.zeros((), jnp.int32)
    )
    x, traj = jax.lax.fori_loop(0, steps, body, (x_init, traj0))
    nfe = jnp.asarray(steps, jnp.int32)
    if noise_removal:
        t = grid[-1] * ones
        log_score = score_fn(x, t)
        if graph == "absorbing":
            # p(y) ~ s_y for y != mask: the greedy choice is the largest ratio.
            scores = jnp.where(jnp.arange(vocab) == mask_id, losses.NEG_INF, log_score.astype(jnp.float32))
            x_den = jnp.where(x == mask_id, jnp.argmax(scores, axis=-1).astype(jnp.int32), x)
        else:
            zero = jnp.zeros_like(t)
            probs = step_probs(
                log_score,
                x,
                graph=graph,
                method="analytic",
                sigma_t=schedule.sigma(t),
                sigma_s=zero,
                dsigma_t=zero,
                dt=zero,
            )
            x_den = jnp.argmax(probs, axis=-1).astype(jnp.int32)
        x = jnp.where(clamp, x, x_den)
        nfe = nfe + 1
        if return_trajectory:
            traj = traj.at[-1].set(x)
    return SampleOutput(x, nfe, traj if return_trajectory else None)
