"""SEDD score samplers (Lou et al. 2024, sec. 4.1-4.2): Euler and analytic ("Tweedie tau-leaping") reverse
steps on the absorbing and the uniform graph.

    score_sample(score_fn, rng, x_init, *, graph, schedule, steps, method) -> SampleOutput

    score_fn(xt int32 [B, L], t float32 [B]) -> [B, L, V]:
      uniform graph:   log ratios log p_t(x_t^{l <- y}) / p_t(x_t)  (the entry at y = x_t^l is ignored)
      absorbing graph: log c, the ratios at a masked position without their time factor:
                       log p_t(x_t^{l <- y}) / p_t(x_t) = log(alpha_t / (1 - alpha_t)) + log c_y   (RADD Thm. 1)
                       c = p_theta(x_0 = y | x_t) for a denoiser (`absorbing_score_fn`); a SEDD network's
                       output gives c through ddlm.losses.sedd_absorbing_log_cond. A uniform-graph SEDD
                       network outputs log ratios directly.

Self-conditioned networks (model.self_conditioning; score_sample(self_conditioning=True)): score_fn(xt, t,
self_cond) -> (the [B, L, V] above, the next signal softmax(network output) float32 [B, L, V]), fed back at
the next step (zeros at the first); `network_score_fn` and `absorbing_score_fn` build both kinds.

Why c and not the ratios on the absorbing graph: the factor alpha/(1 - alpha) is 0 at t = 1 on schedules
with alpha(1) = 0 (linear, cosine) and +inf at t = 0, so there the ratios hold no usable number (every
column 0, or every column +inf: an argmax then returns id 0), while both steps are finite functions of c
at every t, endpoints included.

Per position (SEDD `graph_lib`, `sampling.py`), with tau = sigma(t) - sigma(s):
  absorbing, x_t masked (a decoded token stays):  p(y) = k c_y for y != mask, p(mask) = 1 - k sum_y c_y,
      Euler:     k = (t - s) sigma'(t) alpha_t / (1 - alpha_t) = (t - s) (-alpha'(t)) / (1 - alpha(t))
      Analytic:  k = (e^tau - 1) alpha_t / (1 - alpha_t) = (alpha_s - alpha_t) / (1 - alpha_t)
                 (SEDD Thm. 4.2, exact for one position; k = alpha_s at alpha_t = 0)
  uniform, with s_y the ratios (SEDD Thm. 4.2 for the analytic step):
      Euler:     p(y) = (t - s) sigma'(t) s_y / V for y != x_t, p(x_t) = 1 - sum
      Analytic:  p(y) ~ [e^tau s_y + (1 - e^tau)/V sum_z s_z] [e^-tau 1(y = x_t) + (1 - e^-tau)/V]
Negative entries (a too-large Euler step) are clipped to 0 and the rest renormalised.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from ddlm import schedules as schedules_lib
from ddlm.sampling import categorical
from ddlm.sampling.masked import (
    SampleOutput,
    greedy_fill,
    self_conditioned_log_probs,
    time_grid,
    x0_log_probs,
)

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]

GRAPHS = ("absorbing", "uniform")
METHODS = ("euler", "analytic")


def absorbing_score_fn(
    denoise_fn,
    *,
    mask_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    self_conditioning: bool = False,
) -> ScoreFn:
    """The absorbing-graph score_fn of a denoiser (RADD Thm. 1): log c = log p_theta(x_0 = y | x_t), the
    mask id removed and the filters applied; the ratios are alpha/(1 - alpha) c (see module docstring).
    self_conditioning: denoise_fn(xt, t, self_cond), and score_fn(xt, t, self_cond) -> (log c, signal)."""

    def score_fn(xt, t):
        return x0_log_probs(denoise_fn, xt, t, mask_id, temperature, top_k, top_p)

    def self_conditioned(xt, t, self_cond):
        return self_conditioned_log_probs(denoise_fn, xt, t, self_cond, mask_id, temperature, top_k, top_p)

    return self_conditioned if self_conditioning else score_fn


def network_score_fn(network, to_score, *, self_conditioning: bool = False) -> ScoreFn:
    """score_fn(xt, t) = to_score(network(xt, t), xt, t): the score of a network whose output is not itself
    the score (a SEDD absorbing network's log c, a DUO network's log ratios: losses.sedd_absorbing_log_cond,
    losses.duo_log_ratios). self_conditioning: network(xt, t, self_cond), and score_fn(xt, t, self_cond) ->
    (that score, softmax(network output)): the signal score_sample feeds back, the softmax of the raw
    output as in training (losses.self_conditioned_apply)."""
    if not self_conditioning:
        return lambda xt, t: to_score(network(xt, t), xt, t)

    def score_fn(xt, t, self_cond):
        out = network(xt, t, self_cond).astype(jnp.float32)
        return to_score(out, xt, t), jax.nn.softmax(out, axis=-1)

    return score_fn


def _exp_clipped(log_values):
    """exp of float32 log values, capped at e^80 so that a wild network output cannot make inf * 0."""
    return jnp.exp(jnp.minimum(log_values.astype(jnp.float32), 80.0))


def _normalise(probs, fallback):
    """Clip negatives, renormalise; rows with no positive finite mass (float32 cancellation in the analytic
    step at very large tau) fall back to `fallback` (staying put)."""
    probs = jnp.where(jnp.isfinite(probs), jnp.maximum(probs, 0.0), 0.0)
    total = jnp.sum(probs, axis=-1, keepdims=True)
    return jnp.where(total > 0, probs / jnp.where(total > 0, total, 1.0), fallback)


def _column(a):
    """A scalar or [B] array as float32 broadcastable to [B, L, V]."""
    a = jnp.asarray(a, jnp.float32)
    return a.reshape((-1, 1, 1)) if a.ndim else a


def absorbing_reveal_weight(schedule: schedules_lib.Schedule, t, s, method: str):
    """k of the absorbing step (module docstring): p(x_s = y) = k c_y at a masked position. t, s: [B] or
    scalars with s < t. Finite at t = 1 with alpha(1) = 0, where sigma(1) = inf."""
    if method == "euler":
        # sigma'(t) alpha/(1-alpha) = sigma'(t) / (e^sigma - 1) is accurate near t = 0 (expm1) but inf/inf at
        # sigma(1) = inf; there its equal -alpha'/(1 - alpha) is finite.
        sigma_t = schedule.sigma(t)
        at_one = jnp.isinf(sigma_t)
        weight = jnp.where(
            at_one, schedule.mdlm_weight(t), schedule.dsigma(t) / jnp.expm1(jnp.where(at_one, 1.0, sigma_t))
        )
        return (t - s) * weight
    if method == "analytic":
        # (alpha_s - alpha_t) / (1 - alpha_t) = e^-sigma_s (1 - e^-tau) / (1 - e^-sigma_t), via expm1 so that
        # it stays accurate near t = 0 (alpha ~ 1) and equals alpha_s at sigma_t = inf.
        sigma_t, sigma_s = schedule.sigma(t), schedule.sigma(s)
        return jnp.exp(-sigma_s) * jnp.expm1(-(sigma_t - sigma_s)) / jnp.expm1(-sigma_t)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def _absorbing_probs(log_cond, xt, weight, mask_id):
    """[B, L, V] probabilities of the absorbing step: k c_y off the mask, the rest stays masked."""
    c = _exp_clipped(log_cond)
    v = c.shape[-1]
    current = jax.nn.one_hot(xt, v, dtype=jnp.float32)
    is_mask_col = jnp.arange(v) == mask_id
    moves = jnp.where(is_mask_col, 0.0, _column(weight) * c)
    stay = 1.0 - jnp.sum(moves, axis=-1, keepdims=True)
    masked_probs = jnp.where(is_mask_col, stay, moves)
    probs = jnp.where((xt == mask_id)[..., None], masked_probs, current)
    return _normalise(probs, current)


def _uniform_probs(log_score, xt, method, *, tau, rate_dt=None):
    """[B, L, V] probabilities of the uniform step: tau = sigma_t - sigma_s, rate_dt = (t - s) sigma'(t)."""
    current = jax.nn.one_hot(xt, log_score.shape[-1], dtype=bool)
    s = jnp.where(current, 1.0, _exp_clipped(log_score))  # the ratio to itself is 1
    current = current.astype(jnp.float32)
    v = s.shape[-1]
    if method == "euler":
        moves = _column(rate_dt) / v * s * (1.0 - current)
        probs = moves + current * (1.0 - jnp.sum(moves, axis=-1, keepdims=True))
        return _normalise(probs, current)
    if method == "analytic":
        tau = _column(tau)
        stag = jnp.exp(tau) * s - jnp.expm1(tau) / v * jnp.sum(s, axis=-1, keepdims=True)
        trans = jnp.exp(-tau) * current - jnp.expm1(-tau) / v
        return _normalise(stag * trans, current)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def step_probs(
    log_score, xt, *, graph: str, method: str, schedule: schedules_lib.Schedule, t, s, mask_id=None
):
    """Per-position probabilities [B, L, V] of x_s given x_t for one reverse step from t to s < t.

    log_score [B, L, V]: score_fn's output (log c on the absorbing graph, log ratios on the uniform one,
    see the module docstring); xt int [B, L]; t, s: [B] or scalars."""
    if graph == "absorbing":
        if mask_id is None:
            raise ValueError("graph 'absorbing' needs mask_id")
        return _absorbing_probs(log_score, xt, absorbing_reveal_weight(schedule, t, s, method), mask_id)
    if graph == "uniform":
        tau = schedule.sigma(t) - schedule.sigma(s)
        return _uniform_probs(log_score, xt, method, tau=tau, rate_dt=(t - s) * schedule.dsigma(t))
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
    self_conditioning: bool = False,
) -> SampleOutput:
    """SEDD sampling from t = 1 to t_min in `steps` Euler or analytic steps, then (noise_removal) SEDD's
    final denoising step taken greedily.

    x_init int32 [B, L]: absorbing graph: mask_id where to generate, known tokens elsewhere. Uniform graph:
    positions with clamp [B, L] True keep x_init, the others start uniformly random (clamp None: all free).
    Noise removal: absorbing graph: the positions still masked become argmax_y c_y at t_min, the denoiser's
    most likely token (one more call, made only if some are masked); uniform graph: the analytic step to
    sigma = 0 taken greedily (one more call). nfe counts the calls made. progress_fn(steps_done) is called
    after every step, if given. trajectory (return_trajectory) [steps + 1, B, L]: the starting state (the
    uniform graph: its noise) then the state after each step; the last row is the result (noise removed).
    self_conditioning: score_fn(xt, t, self_cond) -> (score, signal), the signal of each call fed to the
    next (zeros to the first; module docstring).
    """
    if graph not in GRAPHS:
        raise ValueError(f"unknown graph {graph!r}; expected one of {GRAPHS}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if graph == "uniform":
        with jax.ensure_compile_time_eval():
            sigma_1 = float(schedule.sigma(jnp.float32(1.0)))
        if not math.isfinite(sigma_1):
            # The analytic step from t = 1 would be an infinite jump whose limit the ratios cannot give.
            raise ValueError(
                f"the uniform graph needs a schedule with alpha(1) > 0 (finite sigma(1)); {schedule} has "
                "alpha(1) = 0: use 'geometric' or a schedule with eps > 0"
            )
    x_init = x_init.astype(jnp.int32)
    batch, length = x_init.shape
    probe = (lambda xt, t: score_fn(xt, t, None)[0]) if self_conditioning else score_fn
    vocab = jax.eval_shape(probe, x_init, jnp.zeros((batch,), jnp.float32)).shape[-1]
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
        x, sc, traj = carry
        t, s = grid[k] * ones, grid[k + 1] * ones
        if self_conditioning:
            log_score, sc = score_fn(x, t, sc)
        else:
            log_score = score_fn(x, t)
        probs = step_probs(log_score, x, graph=graph, method=method, schedule=schedule, t=t, s=s, mask_id=mask_id)
        x_new = categorical.sample_categorical(jax.random.fold_in(rng, k), jnp.log(probs), precision)
        x_new = jnp.where(clamp, x, x_new)
        if return_trajectory:
            traj = traj.at[k + 1].set(x_new)
        if progress_fn is not None:
            jax.debug.callback(progress_fn, k + 1)
        return x_new, sc, traj

    traj0 = (
        jnp.zeros((steps + 1, batch, length), jnp.int32).at[0].set(x_init)
        if return_trajectory
        else jnp.zeros((), jnp.int32)
    )
    sc0 = jnp.zeros((batch, length, vocab) if self_conditioning else (), jnp.float32)
    x, sc, traj = jax.lax.fori_loop(0, steps, body, (x_init, sc0, traj0))
    nfe = jnp.asarray(steps, jnp.int32)
    if self_conditioning:  # the final call (noise removal) sees the last step's signal
        conditioned_fn = score_fn
        score_fn = lambda xt, t: conditioned_fn(xt, t, sc)[0]
    if noise_removal:
        t = grid[-1] * ones
        if graph == "absorbing":
            # p(y) ~ c_y for y != mask: the greedy choice is argmax c, finite at t = 0 where the ratios
            # alpha/(1 - alpha) c are +inf in every column.
            x_den, nfe = greedy_fill(score_fn, x, t, nfe, mask_id)
        else:
            probs = _uniform_probs(score_fn(x, t), x, "analytic", tau=schedule.sigma(t))
            x_den, nfe = jnp.argmax(probs, axis=-1).astype(jnp.int32), nfe + 1
        x = jnp.where(clamp, x, x_den)
        if return_trajectory:
            traj = traj.at[-1].set(x)
    return SampleOutput(x, nfe, traj if return_trajectory else None)
