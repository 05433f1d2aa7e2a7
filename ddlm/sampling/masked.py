"""Samplers of masked (absorbing) diffusion: ancestral (MDLM / MD4), cached ancestral (MDLM's
ddpm_cache), ReMDM remasking, and the first-hitting sampler (Zheng et al. 2024).

Every sampler is a pure function

    sampler(denoise_fn, rng, x_init, *, mask_id, schedule, ...) -> SampleOutput(tokens, nfe, trajectory)

    denoise_fn(xt int32 [B, L], t float32 [B]) -> logits [B, L, V]   (V includes mask_id; its logit is ignored)
    x_init: int32 [B, L], mask_id where tokens are to be generated, known tokens elsewhere (a prompt,
            an infilling template, hard constraints: see ddlm.sampling.conditioning). Known tokens are
            never changed.

A self-conditioned network (model.self_conditioning; `self_conditioning=True` below) is called as
denoise_fn(xt, t, self_cond float32 [B, L, V]) -> logits, with self_cond the softmax of its previous call's
logits (zeros at the first step: the network's first pass), carried in the loop state (Analog Bits sec. 3.2).

The whole loop is inside one `lax.fori_loop` / `lax.while_loop`, so `jax.jit` compiles it once per
(shape, static arguments). `nfe` counts denoise_fn calls inside the loop. The reverse step draws from
q(x_s | x_t, x_0 ~ p_theta(x_0 | x_t)) of ddlm.processes.AbsorbingProcess.posterior_probs (MDLM eq. 4):
a masked token is revealed with probability (alpha_s - alpha_t) / (1 - alpha_t), as a draw from the
denoiser, and kept masked otherwise. The time grid is t_k = 1 - (1 - t_min) k / steps, k = 0..steps,
with alpha(t) from any ddlm.schedules schedule ('loglinear', 'linear', 'cosine', ...).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from ddlm import losses
from ddlm import schedules as schedules_lib
from ddlm.sampling import categorical

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]

REMASKING = ("none", "cap", "rescale", "confidence")


class SampleOutput(NamedTuple):
    tokens: jax.Array  # int32 [B, L]
    nfe: jax.Array  # int32 []: denoise_fn calls made (each on the whole batch)
    trajectory: jax.Array | None  # int32 [S, B, L]: x_init then the state after each step; None if not asked
    # Samplers that stop rows independently (canvas): per row, the network calls it took part in and its
    # denoising steps, int32 [B]; None elsewhere.
    row_nfe: jax.Array | None = None
    row_steps: jax.Array | None = None


def _check_init(x_init, mask_id):
    if x_init.ndim != 2 or not jnp.issubdtype(x_init.dtype, jnp.integer):
        raise ValueError(f"x_init must be int [batch, length], got {x_init.dtype} {tuple(x_init.shape)}")
    if mask_id is None:
        raise ValueError("masked-diffusion samplers need mask_id")


def init_trajectory(rows: int, x_init, return_trajectory: bool):
    """int32 [rows, B, L] with x_init in row 0 (the loops write row k after step k); a scalar if unused."""
    if not return_trajectory:
        return jnp.zeros((), jnp.int32)
    return jnp.zeros((rows,) + x_init.shape, jnp.int32).at[0].set(x_init)


def hold_final_state(traj, steps_done):
    """Rows after `steps_done` (a loop that stopped early) repeat the final state. traj: [S, B, L]."""
    return traj[jnp.minimum(jnp.arange(traj.shape[0]), steps_done)]


def time_grid(steps: int, t_min: float = 0.0):
    """[steps + 1] times from 1 down to t_min, uniform in t (the schedule shapes alpha along it)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 <= t_min < 1.0:
        raise ValueError(f"t_min must be in [0, 1), got {t_min}")
    return 1.0 - (1.0 - t_min) * jnp.arange(steps + 1, dtype=jnp.float32) / steps


def x0_log_probs(denoise_fn, xt, t, mask_id, temperature=1.0, top_k=0, top_p=1.0):
    """log p_theta(x_0 | x_t) [B, L, V] with the mask id removed (SUBS) and the filters applied."""
    b = xt.shape[0]
    logits = denoise_fn(xt, jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,)))
    return logits_to_log_probs(logits, mask_id, temperature, top_k, top_p)


def logits_to_log_probs(logits, mask_id, temperature=1.0, top_k=0, top_p=1.0):
    """Network logits [..., V] -> log p_theta(x_0 | x_t) [..., V]: mask id removed (SUBS), filters applied."""
    logits = logits.astype(jnp.float32).at[..., mask_id].set(losses.NEG_INF)
    logits = categorical.filter_logits(logits, temperature, top_k, top_p)
    return jax.nn.log_softmax(logits, axis=-1)


def initial_self_cond(denoise_fn, x_init):
    """zeros float32 [B, L, V]: a self-conditioned sampler's first signal (the network's first pass)."""
    t = jnp.zeros(x_init.shape[:1], jnp.float32)
    return jnp.zeros(jax.eval_shape(denoise_fn, x_init, t, None).shape, jnp.float32)


def self_conditioned_log_probs(denoise_fn, xt, t, self_cond, mask_id, temperature=1.0, top_k=0, top_p=1.0):
    """One call of a self-conditioned network denoise_fn(xt, t, self_cond) -> logits: (log p_theta(x_0 | x_t)
    [B, L, V] as `x0_log_probs`, the next signal softmax(logits) float32 [B, L, V]). The signal is the
    softmax of the raw logits (mask column included, no filters), as losses.self_conditioned_apply's first
    pass, so the network sees at sampling what it saw in training."""
    b = xt.shape[0]
    logits = denoise_fn(xt, jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,)), self_cond).astype(jnp.float32)
    return logits_to_log_probs(logits, mask_id, temperature, top_k, top_p), jax.nn.softmax(logits, axis=-1)


def remasking_sigma(strategy: str, eta: float, alpha_s, alpha_t):
    """ReMDM's remasking probability sigma_t (Wang et al. 2025, sec. 4.1): bounded by
    sigma_max = min(1, (1 - alpha_s) / alpha_t) so that the marginals q(x_s | x_0) are unchanged;
    'cap': min(eta, sigma_max); 'rescale' and 'confidence': eta * sigma_max."""
    sigma_max = jnp.where(alpha_t > 0, jnp.minimum(1.0, (1.0 - alpha_s) / jnp.maximum(alpha_t, 1e-30)), 1.0)
    if strategy == "cap":
        return jnp.minimum(eta, sigma_max)
    if strategy in ("rescale", "confidence"):
        return eta * sigma_max
    raise ValueError(f"unknown remasking strategy {strategy!r}; expected one of {REMASKING}")


def ancestral_sample(
    denoise_fn: DenoiseFn,
    rng,
    x_init,
    *,
    mask_id: int,
    schedule: schedules_lib.Schedule,
    steps: int,
    t_min: float = 0.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    noise_removal: bool = False,
    cache: bool = False,
    remasking: str = "none",
    eta: float = 0.0,
    precision: str = "float64",
    return_trajectory: bool = False,
    progress_fn: Callable[[jax.Array], None] | None = None,
    self_conditioning: bool = False,
) -> SampleOutput:
    """Ancestral (DDPM-style) sampling of masked diffusion (MDLM sec. 3.3 / MD4 sec. 4).

    cache=True: MDLM's ddpm_cache. When no token changed since the last call the previous p_theta(x_0 | x_t)
    is reused, and no call is made once nothing is masked; valid only for time-free networks (RADD; the
    exact absorbing denoiser), whose prediction depends on x_t alone. For steps >> length this makes at
    most length + 1 calls. Caching is batch-wide: a call is made if any sequence changed.
    remasking != 'none': ReMDM (Wang et al. 2025, eq. 6): a decoded token is remasked with probability
    sigma_t and a masked token revealed with probability (alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t);
    with eta = 0 this is exactly the ancestral step (same random draws). 'confidence' spreads sigma_t over
    decoded tokens by softmax(-confidence), confidence = p_theta of the token when it was decoded.
    noise_removal: after the last step, positions still masked (t_min > 0) are set to argmax p_theta (one
    more call, made only if some are masked; MDLM's final greedy step).
    self_conditioning: denoise_fn(xt, t, self_cond) is fed its previous call's prediction (module docstring);
    not with cache=True (the cache assumes a prediction that depends on x_t alone).
    progress_fn(steps_done) is called from the loop (a host callback) after every step, if given.
    Returns SampleOutput; trajectory [steps + 1, B, L] if return_trajectory: x_init then the state after
    each step, the last row the result (after noise removal).
    """
    _check_init(x_init, mask_id)
    if remasking not in REMASKING:
        raise ValueError(f"unknown remasking strategy {remasking!r}; expected one of {REMASKING}")
    if cache and remasking != "none":
        raise ValueError("cache=True needs remasking='none' (remasking changes tokens every step)")
    if cache and self_conditioning:
        raise ValueError(
            "cache=True reuses predictions that depend on x_t alone; a self-conditioned network's depend on "
            "its previous one too: use cache=False"
        )
    x_init = x_init.astype(jnp.int32)
    batch, length = x_init.shape
    grid = time_grid(steps, t_min)
    clamped = x_init != mask_id
    vocab = jax.eval_shape(denoise_fn, x_init, jnp.zeros((batch,), jnp.float32)).shape[-1] if cache else 0

    def predict(x, t, sc):
        if self_conditioning:
            return self_conditioned_log_probs(denoise_fn, x, t, sc, mask_id, temperature, top_k, top_p)
        return x0_log_probs(denoise_fn, x, t, mask_id, temperature, top_k, top_p), sc

    def body(k, carry):
        x, logp, fresh, nfe, conf, sc, traj = carry
        t, s = grid[k], grid[k + 1]
        a_t, a_s = schedule.alpha(t), schedule.alpha(s)
        masked = x == mask_id
        if cache:
            need = jnp.logical_and(jnp.logical_not(fresh), jnp.any(masked))
            logp = jax.lax.cond(need, lambda: predict(x, t, sc)[0], lambda: logp)
            nfe = nfe + need.astype(jnp.int32)
        else:
            cached_logp, (logp, sc) = logp, predict(x, t, sc)
            nfe = nfe + 1
        step_rng = jax.random.fold_in(rng, k)
        tok_rng, reveal_rng, remask_rng = jax.random.split(step_rng, 3)
        x0 = categorical.sample_categorical(tok_rng, logp, precision)
        u = jax.random.uniform(reveal_rng, x.shape, jnp.float32)
        if remasking == "none":
            p_reveal = (a_s - a_t) / (1.0 - a_t)
            x_new = jnp.where(masked & (u < p_reveal), x0, x)
        else:
            sigma = remasking_sigma(remasking, eta, a_s, a_t)
            p_reveal = (a_s - (1.0 - sigma) * a_t) / (1.0 - a_t)
            decoded = jnp.logical_not(masked) & jnp.logical_not(clamped)
            if remasking == "confidence":
                weights = jax.nn.softmax(jnp.where(decoded, -conf, -jnp.inf), axis=-1)
                sigma_tok = jnp.where(jnp.any(decoded, axis=-1, keepdims=True), weights, 0.0) * sigma
            else:
                sigma_tok = jnp.broadcast_to(sigma, x.shape)
            u_remask = jax.random.uniform(remask_rng, x.shape, jnp.float32)
            x_new = jnp.where(masked & (u < p_reveal), x0, x)
            x_new = jnp.where(decoded & (u_remask < sigma_tok), mask_id, x_new)
        revealed = masked & (x_new != mask_id)
        if remasking == "confidence":
            p_tok = jnp.exp(jnp.take_along_axis(logp, x0[..., None], axis=-1)[..., 0])
            conf = jnp.where(revealed, p_tok, conf)
        if cache:
            # The cache matches x_new iff it matched x (it was valid or just computed) and nothing changed.
            fresh = jnp.logical_and(fresh | need, jnp.logical_not(jnp.any(revealed)))
        if return_trajectory:
            traj = traj.at[k + 1].set(x_new)
        if progress_fn is not None:
            jax.debug.callback(progress_fn, k + 1)
        return x_new, (logp if cache else cached_logp), fresh, nfe, conf, sc, traj

    # Only the cached sampler carries p_theta across steps, and only a self-conditioned one its previous
    # prediction ([B, L, V] can be large).
    logp0 = jnp.zeros((batch, length, vocab) if cache else (), jnp.float32)
    sc0 = initial_self_cond(denoise_fn, x_init) if self_conditioning else jnp.zeros((), jnp.float32)
    traj0 = init_trajectory(steps + 1, x_init, return_trajectory)
    carry = (
        x_init,
        logp0,
        jnp.array(False),
        jnp.zeros((), jnp.int32),
        jnp.zeros(x_init.shape, jnp.float32),
        sc0,
        traj0,
    )
    x, _, _, nfe, _, sc, traj = jax.lax.fori_loop(0, steps, body, carry)
    if noise_removal:
        fn = (lambda xt, t: denoise_fn(xt, t, sc)) if self_conditioning else denoise_fn
        x, nfe = greedy_fill(fn, x, grid[-1], nfe, mask_id, temperature, top_k, top_p)
        if return_trajectory:
            traj = traj.at[-1].set(x)
    return SampleOutput(x, nfe, traj if return_trajectory else None)


def greedy_fill(denoise_fn, x, t, nfe, mask_id, temperature=1.0, top_k=0, top_p=1.0):
    """Noise removal: masked positions of x become argmax p_theta(x_0 | x); one call, only if any is masked."""

    def fill():
        logp = x0_log_probs(denoise_fn, x, t, mask_id, temperature, top_k, top_p)
        best = jnp.argmax(logp, axis=-1).astype(jnp.int32)
        return jnp.where(x == mask_id, best, x), nfe + 1

    return jax.lax.cond(jnp.any(x == mask_id), fill, lambda: (x, nfe))


def first_hitting_sample(
    denoise_fn: DenoiseFn,
    rng,
    x_init,
    *,
    mask_id: int,
    schedule: schedules_lib.Schedule,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    precision: str = "float64",
    return_trajectory: bool = False,
    progress_fn: Callable[[jax.Array], None] | None = None,
    self_conditioning: bool = False,
) -> SampleOutput:
    """First-hitting sampler (Zheng et al. 2024, alg. 1): the continuous-time reverse process simulated
    one unmasking event at a time, so it is the infinite-step limit of ancestral sampling, with exactly
    one network call per masked token.

    With n masked tokens at time t, each is still masked at s < t with probability
    (1 - alpha_s) / (1 - alpha_t), so the time of the next unmasking solves
    1 - alpha_s = (1 - alpha_t) u^(1/n), u ~ U(0, 1); a uniformly chosen masked position is then drawn
    from p_theta(x_0 | x_t) evaluated at that time. Sequences of a batch keep their own times (t [B]).
    nfe = the largest number of masked positions in the batch. trajectory: [L + 1, B, L] (rows after the
    last event repeat the final state). progress_fn(events_done) is called after every event, if given.
    self_conditioning: denoise_fn(xt, t, self_cond) is fed its previous call's prediction (module docstring).
    """
    _check_init(x_init, mask_id)
    x_init = x_init.astype(jnp.int32)
    batch, length = x_init.shape
    rows = jnp.arange(batch)

    def cond(carry):
        x, _, it, _, _ = carry
        return jnp.logical_and(jnp.any(x == mask_id), it < length)

    def body(carry):
        x, t, it, sc, traj = carry
        masked = x == mask_id
        n = jnp.sum(masked, axis=-1)
        active = n > 0
        step_rng = jax.random.fold_in(rng, it)
        time_rng, pos_rng, tok_rng = jax.random.split(step_rng, 3)
        u = jax.random.uniform(time_rng, (batch,), jnp.float32, minval=1e-12, maxval=1.0)
        a_t = schedule.alpha(t)
        a_s = 1.0 - (1.0 - a_t) * u ** (1.0 / jnp.maximum(n, 1).astype(jnp.float32))
        s = jnp.where(active, jnp.clip(schedule.t_from_alpha(a_s), 0.0, 1.0), t)
        if self_conditioning:
            logp, sc = self_conditioned_log_probs(denoise_fn, x, s, sc, mask_id, temperature, top_k, top_p)
        else:
            logp = x0_log_probs(denoise_fn, x, s, mask_id, temperature, top_k, top_p)
        pos_scores = jnp.where(masked, jax.random.uniform(pos_rng, x.shape, jnp.float32), -1.0)
        pos = jnp.argmax(pos_scores, axis=-1)
        tok = categorical.sample_categorical(tok_rng, logp[rows, pos], precision)
        x = x.at[rows, pos].set(jnp.where(active, tok, x[rows, pos]))
        if return_trajectory:
            traj = traj.at[it + 1].set(x)
        if progress_fn is not None:
            jax.debug.callback(progress_fn, it + 1)
        return x, s, it + 1, sc, traj

    traj0 = init_trajectory(length + 1, x_init, return_trajectory)
    t0 = jnp.ones((batch,), jnp.float32)
    sc0 = initial_self_cond(denoise_fn, x_init) if self_conditioning else jnp.zeros((), jnp.float32)
    x, _, it, _, traj = jax.lax.while_loop(cond, body, (x_init, t0, jnp.zeros((), jnp.int32), sc0, traj0))
    if return_trajectory:
        traj = hold_final_state(traj, it)
    return SampleOutput(x, it, traj if return_trajectory else None)
