"""The DiffusionGemma-style canvas sampler for uniform-state (DUO) networks.

    canvas_sample(denoise_fn, rng, x_init, schedule=..., steps=..., canvas_length=..., ...) -> SampleOutput

denoise_fn(x [B, L], t [B, L]) -> logits [B, L, V] of a mean-parameterised network (loss 'duo': softmax(logits)
= x_theta). The sequence is generated canvas after canvas, left to right (canvas_length tokens each, dividing
L): the canvas being generated starts as uniform noise at t = 1, the committed canvases before it are clean
(t = 0) and the ones after it are noise at t = 1, each position told its own time (the network takes t
[B, L]). On a canvas, each of `steps` steps from t to s (a uniform grid 1 -> 0):

  1. logits / T(t), the temperature annealed from temperature_max at t = 1 to temperature_min at t = 0 as
     T = T_min + (T_max - T_min)(1 - (1 - t)^exponent) (gemma `AnnealingTemperatureShaper`);
  2. a proposal x_s ~ q(x_s | x_t, x_0 ~ x_theta) per position: the mean parameterisation's exact reverse step
     (`processes.UniformProcess.mean_posterior_probs`, DUO's `_posterior_from_x0`);
  3. entropy-bounded acceptance (gemma `SampleFromPredictions`): positions sorted by the entropy of x_theta,
     ascending, are accepted while the entropy summed over the ones before stays <= entropy_bound; a
     rejected position is re-noised to a uniformly random token (renoise=True, DiffusionGemma), and is told
     t = 1 from then on (it steps from there to the next s), or keeps x_t and its time (renoise=False);
     the last step (s = 0) accepts every position, so the output holds no re-noised token;
  4. with stop_when_stable, the canvas ends when a step changed no token of any row (gemma's early stop).

entropy_bound = inf and renoise=False make every step the plain ancestral step of the mean parameterisation:
the exact sampler in the limit of many steps (tests/test_sampling_canvas.py measures the laws on the oracle).
Differences from gemma's sampler, by design: its step proposes x_0 itself (the denoiser's draw) and re-noises
everything else, ours proposes the reverse step x_s (to which it reduces when s = 0); no KV cache of the
committed canvases (the bidirectional network re-reads them); no self-conditioning (the network has no input
for it).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ddlm import processes
from ddlm.sampling.masked import SampleOutput, init_trajectory, time_grid


def annealed_temperature(t, t_max: float, t_min: float, exponent: float):
    """T(t) = t_min + (t_max - t_min)(1 - (1 - t)^exponent): t_max at t = 1 (all noise), t_min at t = 0."""
    return t_min + (t_max - t_min) * (1.0 - (1.0 - t) ** exponent)


def entropy_bounded_accept(entropy, editable, bound: float):
    """bool [B, L]: among `editable` positions sorted by entropy [B, L] ascending, those whose predecessors'
    entropies sum to <= bound (the lowest-entropy one is always accepted; bound = inf accepts all)."""
    e = jnp.where(editable, entropy, jnp.inf)
    order = jnp.argsort(e, axis=-1)
    sorted_e = jnp.take_along_axis(e, order, axis=-1)
    before = jnp.cumsum(jnp.where(jnp.isfinite(sorted_e), sorted_e, 0.0), axis=-1) - jnp.where(
        jnp.isfinite(sorted_e), sorted_e, 0.0
    )
    ok_sorted = before <= bound
    rows = jnp.arange(e.shape[0])[:, None]
    accept = jnp.zeros_like(editable).at[rows, order].set(ok_sorted)
    return accept & editable


def check_canvas(length: int, canvas_length: int) -> int:
    """The canvas length to use (0 = the whole sequence); a ValueError if it does not divide the length."""
    c = canvas_length or length
    if c < 1 or length % c:
        raise ValueError(f"config.sampler.canvas_length={canvas_length} must divide the length {length}")
    return c


def canvas_sample(
    denoise_fn,
    rng,
    x_init,
    *,
    schedule,
    steps: int,
    canvas_length: int = 0,
    entropy_bound: float = math.inf,
    renoise: bool = True,
    temperature_max: float = 1.0,
    temperature_min: float = 1.0,
    temperature_exponent: float = 1.0,
    stop_when_stable: bool = False,
    clamp=None,
    return_trajectory: bool = False,
    progress_fn=None,
) -> SampleOutput:
    """Samples [B, L] tokens canvas by canvas (module docstring). x_init int [B, L]: the clamped positions
    (clamp bool [B, L]; None = none) keep their tokens, the others are drawn. The trajectory holds x after the
    initial noise and after every step of every canvas ([1 + canvases * steps, B, L])."""
    if x_init.ndim != 2 or not jnp.issubdtype(x_init.dtype, jnp.integer):
        raise ValueError(f"x_init must be int [batch, length], got {x_init.dtype} {tuple(x_init.shape)}")
    if not 0.0 < temperature_min <= temperature_max:
        raise ValueError(
            f"the canvas sampler needs 0 < temperature_min <= temperature_max, got {temperature_min}, "
            f"{temperature_max}"
        )
    if entropy_bound < 0:
        raise ValueError(f"entropy_bound must be >= 0, got {entropy_bound}")
    batch, length = x_init.shape
    size = check_canvas(length, canvas_length)
    n_canvases = length // size
    grid = time_grid(steps)
    clamp = jnp.zeros(x_init.shape, bool) if clamp is None else clamp
    pos = jnp.arange(length)

    init_rng, rng = jax.random.split(rng)
    # The initial noise needs the vocabulary: the network's width, from its output's shape (nothing computed).
    vocab = jax.eval_shape(denoise_fn, x_init, jnp.ones(x_init.shape, jnp.float32)).shape[-1]
    process = processes.UniformProcess(vocab)
    x = jnp.where(clamp, x_init, jax.random.randint(init_rng, x_init.shape, 0, vocab, x_init.dtype))
    traj = init_trajectory(1 + n_canvases * steps, x, return_trajectory)

    def canvas_body(c, carry):
        x, tau, traj, nfe, rng = carry
        current = (pos >= c * size) & (pos < (c + 1) * size)  # [L]
        editable = current[None, :] & ~clamp

        def step_body(state):
            k, x, tau, traj, nfe, rng, _ = state
            t, s = grid[k], grid[k + 1]
            step_rng, noise_rng, rng = jax.random.split(rng, 3)
            logits = denoise_fn(x, tau).astype(jnp.float32)
            temp = annealed_temperature(t, temperature_max, temperature_min, temperature_exponent)
            log_x = jax.nn.log_softmax(logits / temp, axis=-1)
            x_theta = jnp.exp(log_x)
            # Each editable position steps from its own time (t, or 1 if re-noised since) down to s.
            s_tok = jnp.where(editable, s, tau)
            probs = process.mean_posterior_probs(x_theta, x, schedule.alpha(s_tok), schedule.alpha(tau))
            proposal = jax.random.categorical(step_rng, jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
            entropy = -jnp.sum(jnp.where(x_theta > 0, x_theta * log_x, 0.0), axis=-1)
            # The last step (s = 0) commits the whole canvas: a rejected position re-noised there would be output.
            accept = entropy_bounded_accept(entropy, editable, jnp.where(k == steps - 1, jnp.inf, entropy_bound))
            renoised = editable & ~accept & renoise
            noise = jax.random.randint(noise_rng, x.shape, 0, vocab, x.dtype)
            new = jnp.where(accept, proposal.astype(x.dtype), jnp.where(renoised, noise, x))
            # A re-noised position is pure noise again (t = 1); a rejected one kept as it was keeps its time.
            tau = jnp.where(accept, s, jnp.where(renoised, 1.0, tau))
            changed = jnp.any(new != x)
            if return_trajectory:
                traj = traj.at[1 + c * steps + k].set(new)
            if progress_fn is not None:
                jax.debug.callback(progress_fn, c * steps + k + 1)
            return k + 1, new, tau, traj, nfe + 1, rng, changed

        def cond(state):
            k, *_, changed = state
            return (k < steps) & changed if stop_when_stable else k < steps

        k, x, tau, traj, nfe, rng, _ = jax.lax.while_loop(
            cond, step_body, (jnp.int32(0), x, tau, traj, nfe, rng, jnp.bool_(True))
        )
        tau = jnp.where(editable, 0.0, tau)  # the canvas is committed (an early stop included)
        if return_trajectory:  # a canvas that stopped early: its remaining rows repeat its final state
            rows = 1 + c * steps + jnp.arange(steps)
            traj = traj.at[rows].set(jnp.where((jnp.arange(steps) >= k)[:, None, None], x[None], traj[rows]))
        return x, tau, traj, nfe, rng

    tau0 = jnp.where(clamp, 0.0, 1.0).astype(jnp.float32)  # each position's time: known 0, noise 1
    x, _, traj, nfe, _ = jax.lax.fori_loop(0, n_canvases, canvas_body, (x, tau0, traj, jnp.int32(0), rng))
    return SampleOutput(x.astype(jnp.int32), nfe, traj if return_trajectory else None)
