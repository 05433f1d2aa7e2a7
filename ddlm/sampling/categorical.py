"""Categorical draws with an untruncated Gumbel tail, and the logit filters shared by every sampler.

Why float64 noise: Gumbel-max sampling draws argmax(log p + G) with G = -log(-log U). In float32, U has
at most 24 bits below 1, so -log U >= ~6e-8 and G <= ~16.6 (JAX's default float32 Gumbel stops at ~15.9).
A token with log p far below the rest can then only win when the others' noise happens to be small:
low-probability tokens are under-sampled, which lowers the effective temperature and fakes a low
generative perplexity (Zheng et al. 2024, "Masked diffusion models are secretly time-agnostic masked
models and exploit inaccurate categorical sampling", sec. 4).

`gumbel_noise(..., precision='float64')` builds U from 53 random bits and computes -log(-log U) in
float64 under a *local* `jax.enable_x64(True)` block (elementwise ops only, which is safe inside `jit`
without turning x64 on globally), then rounds G to float32. Rounding the finished G is harmless: its
relative error is 6e-8, while the tail it carries reaches G ~ 36.7 (U = 1 - 2^-53). If the local x64
block is unavailable, `precision='float32_64bit'` uses JAX's float32 'highest' mode (64 random bits in
fixed point, log1p near 1), which has the same tail; prefer it on TPUs, where float64 is emulated and
slow. 'float32' is the naive path, kept for the tests and benchmarks that show the bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ddlm import losses

PRECISIONS = ("float64", "float32_64bit", "float32")


def gumbel_from_bits(bits, precision: str = "float64"):
    """Gumbel noise from random bits uint32 [2, *shape] (two words per value); float32 [*shape].

    'float64': U = (53 of the 64 bits + 1/2) 2^-53, at most 1 - 2^-53, and -log(-log U) in float64 under a
    local `jax.enable_x64(True)` (elementwise only, so it works inside jit with x64 off globally); the largest
    value is -log(-log(1 - 2^-53)) ~ 36.7. 'float32': the naive path, U from 23 bits in float32 as in
    JAX's default `jax.random.gumbel`, whose largest value is -log(-log(1 - 2^-23)) ~ 15.9.
    """
    if precision == "float64":
        with jax.enable_x64(True):
            hi = bits[0].astype(jnp.uint64)
            lo = bits[1].astype(jnp.uint64)
            word = (hi << 21) | (lo >> 11)  # 53 bits
            # The largest word + 1/2 needs 54 bits and rounds up to 2^53: U = 1 would give G = +inf, which
            # beats every logit (NEG_INF too), so U is capped at the float64 just below 1.
            u = jnp.minimum((word.astype(jnp.float64) + 0.5) * (2.0**-53), 1.0 - 2.0**-53)
            return (-jnp.log(-jnp.log(u))).astype(jnp.float32)
    if precision == "float32":
        u = (bits[0] >> 9).astype(jnp.float32) * (2.0**-23)
        u = jnp.maximum(u, jnp.finfo(jnp.float32).tiny)
        return -jnp.log(-jnp.log(u))
    raise ValueError(f"gumbel_from_bits: precision must be 'float64' or 'float32', got {precision!r}")


def gumbel_noise(rng, shape, precision: str = "float64"):
    """Standard Gumbel noise, float32 [*shape]. precision: 'float64' (53-bit uniform, float64 math),
    'float32_64bit' (JAX's float32 'highest' mode: 64 bits in fixed point, log1p near 1; same tail), or
    'float32' (naive; tail truncated near 15.9)."""
    shape = tuple(shape)
    if precision in ("float64", "float32"):
        return gumbel_from_bits(jax.random.bits(rng, (2,) + shape, jnp.uint32), precision)
    if precision == "float32_64bit":
        return jax.random.gumbel(rng, shape, jnp.float32, mode="highest")
    raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")


def sample_categorical(rng, log_probs, precision: str = "float64"):
    """One draw per row from softmax(log_probs) [..., V] by Gumbel-max. Returns int32 [...].

    log_probs may be unnormalised and may hold large negative values (losses.NEG_INF) for impossible ids.
    """
    g = gumbel_noise(rng, log_probs.shape, precision)
    return jnp.argmax(log_probs.astype(jnp.float32) + g, axis=-1).astype(jnp.int32)


def filter_logits(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Temperature, top-k and top-p (nucleus) filtering of logits [..., V] (float32 out).

    temperature > 0 divides the logits; top_k > 0 keeps the k largest; top_p < 1 keeps the smallest set of
    largest-probability ids whose mass reaches top_p (always at least the top id). Removed ids get
    losses.NEG_INF. All arguments are static Python numbers (they change the compiled program).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use greedy decoding for 0), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.astype(jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    v = logits.shape[-1]
    if 0 < top_k < v:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, losses.NEG_INF, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each id
        keep_sorted = mass_before < top_p
        keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
        logits = jnp.where(keep, logits, losses.NEG_INF)
    return logits
