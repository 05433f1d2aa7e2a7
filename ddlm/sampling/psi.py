"""The Psi predictor-corrector sampler for uniform-state (DUO) networks (Deschenaux, Gulcehre & Sahoo 2026, "The
Diffusion Duality, Chapter II: Psi-Samplers", arXiv 2602.21185; s-sahoo/duo `trainer_base.py` `_psi_update`).

    psi_sample(denoise_fn, rng, x_init, schedule=..., steps=..., strength=..., ...) -> SampleOutput

denoise_fn(x [B, L], t [B]) -> logits [B, L, V] of a mean-parameterised network (loss 'duo': x_theta =
softmax(logits), after temperature / top-k / top-p). From uniform noise at t = 1, each of `steps` steps from t
to s (a uniform grid 1 -> t_min) draws every position from the Psi-posterior
(`processes.UniformProcess.psi_posterior_probs`, with kappa = 1 - strength):

    (1 - strength) q(x_s | x_t, x_0 ~ x_theta)  +  strength q(x_s | x_0),  x_0 ~ q(x_0 | x_t, x_theta),

the exact reverse step of the uniform graph (the predictor; DUO's ancestral step, the same law as the SEDD
analytic step on `losses.duo_log_ratios`) mixed with "denoise to 0, noise forward to s" (the corrector part). Both
parts keep the forward marginals for the exact joint posterior; strength = 0 is the plain predictor (the same
tokens as sampler 'sedd_analytic' for a fixed key), strength = 1 DUO's 'pure-pc' mode. corrector_steps > 0 adds
that many pure corrector calls at s after each step but the last (the Psi-posterior from s to s: stay with
probability 1 - strength, else re-draw from q_s(. | x_0 ~ q(x_0 | x_s, x_theta)); it leaves q_s invariant).

Noise removal (noise_removal=True): one more call at t_min, whose output is the most likely clean token given
x_theta and x_t (argmax of the reverse step to alpha = 1, as 'sedd_analytic' does). greedy_tail = k > 0: the last
k calls (the noise removal, then the last steps) output argmax x_theta instead, the network's clean-token
prediction (DUO's `noise_removal='greedy'`: `forward(x, t0).argmax(-1)`); no corrector follows a greedy step.
nfe counts the calls: steps + corrector_steps * (corrector-followed steps) + noise_removal.

Not in DUO's sampler (by design or not yet): its time profiles (corrector only for t in a window, constant-t
stretches) and its schedule-dependent ReMDM-like kappa modes; here kappa is one constant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ddlm import processes
from ddlm import schedules as schedules_lib
from ddlm.sampling import categorical
from ddlm.sampling.masked import SampleOutput, init_trajectory, time_grid


def check_options(*, steps: int, strength: float, corrector_steps: int, greedy_tail: int, noise_removal: bool):
    """One-line ValueErrors naming the config.sampler field of an invalid Psi setting."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"config.sampler.psi_strength must be in [0, 1] (0 = plain predictor), got {strength}")
    if corrector_steps < 0:
        raise ValueError(f"config.sampler.psi_corrector_steps must be >= 0, got {corrector_steps}")
    calls = steps + int(noise_removal)
    if not 0 <= greedy_tail <= calls:
        raise ValueError(
            f"config.sampler.greedy_tail must be in [0, {calls}] (steps + noise_removal), got {greedy_tail}"
        )


def corrector_followed(steps: int, greedy_tail: int, noise_removal: bool) -> int:
    """How many steps a corrector follows: all but the last and the greedy ones."""
    greedy_in_loop = max(greedy_tail - int(noise_removal), 0)
    return max(steps - max(greedy_in_loop, 1), 0)


def psi_sample(
    denoise_fn,
    rng,
    x_init,
    *,
    schedule: schedules_lib.Schedule,
    steps: int,
    strength: float = 0.0,
    corrector_steps: int = 0,
    greedy_tail: int = 0,
    t_min: float = 0.0,
    noise_removal: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    clamp=None,
    precision: str = "float64",
    return_trajectory: bool = False,
    progress_fn=None,
    self_conditioning: bool = False,
) -> SampleOutput:
    """Psi predictor-corrector sampling (module docstring). x_init int [B, L]: positions with clamp [B, L] True
    keep it, the others start uniformly random (clamp None: all free; the draws are those of
    score.score_sample, so strength 0 reproduces 'sedd_analytic'). trajectory [steps + 1, B, L]: the noise, then
    the state after each step (and its correctors); the last row is the result. self_conditioning: a
    self-conditioned network, denoise_fn(x, t, self_cond); every call (predictor, corrector, noise removal) is
    fed softmax of the previous call's raw logits (zeros first), as in training (losses.self_conditioned_apply)."""
    check_options(
        steps=steps,
        strength=strength,
        corrector_steps=corrector_steps,
        greedy_tail=greedy_tail,
        noise_removal=noise_removal,
    )
    x_init = x_init.astype(jnp.int32)
    batch, length = x_init.shape
    vocab = jax.eval_shape(denoise_fn, x_init, jnp.zeros((batch,), jnp.float32)).shape[-1]
    proc = processes.UniformProcess(vocab)
    kappa = 1.0 - strength
    greedy_in_loop = max(greedy_tail - int(noise_removal), 0)
    init_rng, rng = jax.random.split(rng)
    clamp = jnp.zeros(x_init.shape, bool) if clamp is None else jnp.asarray(clamp, bool)
    x_init = jnp.where(clamp, x_init, jax.random.randint(init_rng, x_init.shape, 0, vocab, jnp.int32))
    grid = time_grid(steps, t_min)
    ones = jnp.ones((batch,), jnp.float32)

    def x_theta(x, t, sc):
        """(the filtered prediction x_theta [B, L, V], the next self-conditioning signal)."""
        raw = (denoise_fn(x, t, sc) if self_conditioning else denoise_fn(x, t)).astype(jnp.float32)
        logits = categorical.filter_logits(raw, temperature, top_k, top_p)
        return jax.nn.softmax(logits, axis=-1), (jax.nn.softmax(raw, axis=-1) if self_conditioning else sc)

    def draw(key, probs, x):
        x_new = categorical.sample_categorical(key, jnp.log(probs), precision)
        return jnp.where(clamp, x, x_new)

    def corrector(k, x, s, sc):
        a_s = schedule.alpha(s)
        for j in range(corrector_steps):
            pred, sc = x_theta(x, s, sc)
            probs = proc.psi_posterior_probs(pred, x, a_s, a_s, kappa)
            x = draw(jax.random.fold_in(jax.random.fold_in(rng, steps + k), j), probs, x)
        return x, sc

    def body(k, carry):
        x, traj, sc = carry
        t, s = grid[k] * ones, grid[k + 1] * ones
        pred, sc = x_theta(x, t, sc)
        probs = proc.psi_posterior_probs(pred, x, schedule.alpha(s), schedule.alpha(t), kappa)
        greedy = k >= steps - greedy_in_loop
        x_new = jnp.where(
            greedy & ~clamp,
            jnp.argmax(pred, axis=-1).astype(jnp.int32),
            draw(jax.random.fold_in(rng, k), probs, x),
        )
        if corrector_steps:
            x_new, sc = jax.lax.cond(
                greedy | (k == steps - 1), lambda: (x_new, sc), lambda: corrector(k, x_new, s, sc)
            )
        if return_trajectory:
            traj = traj.at[k + 1].set(x_new)
        if progress_fn is not None:
            jax.debug.callback(progress_fn, k + 1)
        return x_new, traj, sc

    traj0 = init_trajectory(steps + 1, x_init, return_trajectory)
    sc0 = jnp.zeros((batch, length, vocab) if self_conditioning else (), jnp.float32)
    x, traj, sc = jax.lax.fori_loop(0, steps, body, (x_init, traj0, sc0))
    nfe = steps + corrector_steps * corrector_followed(steps, greedy_tail, noise_removal)
    if noise_removal:
        t = grid[-1] * ones
        pred, _ = x_theta(x, t, sc)
        if greedy_tail:
            x_den = jnp.argmax(pred, axis=-1)
        else:  # the most likely x_0 given x_t: argmax of x_theta(v) q(x_t | v), the reverse step to alpha = 1
            x_den = jnp.argmax(proc.mean_posterior_probs(pred, x, jnp.ones_like(t), schedule.alpha(t)), axis=-1)
        x = jnp.where(clamp, x, x_den.astype(jnp.int32))
        nfe += 1
        if return_trajectory:
            traj = traj.at[-1].set(x)
    return SampleOutput(x, jnp.asarray(nfe, jnp.int32), traj if return_trajectory else None)
