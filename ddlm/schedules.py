"""Noise schedules for discrete diffusion.

A schedule maps time t in [0, 1] to the keep-probability alpha(t): the chance that a token is still
its clean value (absorbing graph) or has not been resampled (uniform graph) at time t. alpha decreases
from ~1 at t=0 (clean data) to ~0 at t=1 (pure noise). The total noise is sigma(t) = -log alpha(t), so
that the forward process has per-token rate sigma'(t) (SEDD's convention: Q_t = sigma'(t) Q).

Every schedule is a small frozen dataclass (hashable, so it can be a static argument of `jax.jit`)
with four pure methods of a float array t:

    alpha(t)   keep probability                      MDLM / MD4 alpha_t
    dalpha(t)  d alpha / d t                         (negative)
    sigma(t)   -log alpha(t)                         SEDD's "total noise"
    dsigma(t)  d sigma / d t = -alpha'(t) / alpha(t) SEDD's "rate noise"

plus `t_from_alpha(a)`, the inverse of alpha, used by samplers that draw unmasking times.

The masked-diffusion NELBO weight is -alpha'(t) / (1 - alpha(t)) (MDLM eq. 10, MD4).

Conventions checked against the public reference implementations:
  * LogLinearSchedule: kuleshov-group/mdlm `noise_schedule.LogLinearNoise` and
    louaaron/Score-Entropy-Discrete-Diffusion `noise_lib.LogLinearNoise`:
    sigma(t) = -log(1 - (1 - eps) t), eps = 1e-3, so alpha(t) = 1 - (1 - eps) t and alpha(1) = eps.
  * Linear / Cosine / Polynomial: google-deepmind/md4 `MaskingSchedule`: alpha = 1 - t,
    1 - cos(pi/2 (1 - t)), 1 - t^p, then rescaled to (1 - 2 eps) alpha + eps (md4 uses eps = 1e-4;
    our default eps = 0 gives alpha(0) = 1 and alpha(1) = 0 exactly).
  * GeometricSchedule: SEDD `noise_lib.GeometricNoise`: sigma(t) = sigma_min^(1-t) sigma_max^t,
    sigma_min = 1e-4 and sigma_max = 20 for the uniform graph.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp


class Schedule:
    """Base class: subclasses define `alpha`, `dalpha`, `t_from_alpha`; sigma and dsigma follow."""

    def alpha(self, t):
        raise NotImplementedError

    def dalpha(self, t):
        raise NotImplementedError

    def t_from_alpha(self, a):
        raise NotImplementedError

    def sigma(self, t):
        """Total noise sigma(t) = -log alpha(t)."""
        return -jnp.log(self.alpha(t))

    def dsigma(self, t):
        """Noise rate sigma'(t) = -alpha'(t) / alpha(t)."""
        return -self.dalpha(t) / self.alpha(t)

    def mdlm_weight(self, t):
        """The masked-diffusion NELBO weight -alpha'(t) / (1 - alpha(t)) (MDLM eq. 10)."""
        return -self.dalpha(t) / (1.0 - self.alpha(t))


def _check_eps(name: str, eps: float, upper: float):
    if not 0.0 <= eps < upper:
        raise ValueError(f"{name}: eps must be in [0, {upper}), got {eps}")


@dataclasses.dataclass(frozen=True)
class LogLinearSchedule(Schedule):
    """alpha(t) = 1 - (1 - eps) t; sigma(t) = -log(1 - (1 - eps) t). MDLM/SEDD default."""

    eps: float = 1e-3

    def __post_init__(self):
        _check_eps("LogLinearSchedule", self.eps, 1.0)

    def alpha(self, t):
        return 1.0 - (1.0 - self.eps) * t

    def dalpha(self, t):
        return -(1.0 - self.eps) * jnp.ones_like(t)

    def sigma(self, t):
        return -jnp.log1p(-(1.0 - self.eps) * t)

    def dsigma(self, t):
        return (1.0 - self.eps) / (1.0 - (1.0 - self.eps) * t)

    def t_from_alpha(self, a):
        return (1.0 - a) / (1.0 - self.eps)


@dataclasses.dataclass(frozen=True)
class _RescaledSchedule(Schedule):
    """md4's form alpha = (1 - 2 eps) f(t) + eps around a base f with f(0) = 1, f(1) = 0."""

    eps: float = 0.0

    def __post_init__(self):
        _check_eps(type(self).__name__, self.eps, 0.5)

    def _f(self, t):
        raise NotImplementedError

    def _df(self, t):
        raise NotImplementedError

    def _f_inverse(self, f):
        raise NotImplementedError

    def alpha(self, t):
        return (1.0 - 2.0 * self.eps) * self._f(t) + self.eps

    def dalpha(self, t):
        return (1.0 - 2.0 * self.eps) * self._df(t)

    def t_from_alpha(self, a):
        return self._f_inverse((a - self.eps) / (1.0 - 2.0 * self.eps))


@dataclasses.dataclass(frozen=True)
class LinearSchedule(_RescaledSchedule):
    """alpha(t) = 1 - t (md4 'linear')."""

    def _f(self, t):
        return 1.0 - t

    def _df(self, t):
        return -jnp.ones_like(t)

    def _f_inverse(self, f):
        return 1.0 - f


@dataclasses.dataclass(frozen=True)
class CosineSchedule(_RescaledSchedule):
    """alpha(t) = 1 - cos(pi/2 (1 - t)) (md4 'cosine', md4's default)."""

    def _f(self, t):
        return 1.0 - jnp.cos(0.5 * math.pi * (1.0 - t))

    def _df(self, t):
        return -0.5 * math.pi * jnp.sin(0.5 * math.pi * (1.0 - t))

    def _f_inverse(self, f):
        return 1.0 - jnp.arccos(1.0 - f) / (0.5 * math.pi)


@dataclasses.dataclass(frozen=True)
class PolynomialSchedule(_RescaledSchedule):
    """alpha(t) = 1 - t^power (md4 'poly<power>')."""

    power: float = 2.0

    def __post_init__(self):
        super().__post_init__()
        if not self.power > 0:
            raise ValueError(f"PolynomialSchedule: power must be > 0, got {self.power}")

    def _f(self, t):
        return 1.0 - t**self.power

    def _df(self, t):
        return -self.power * t ** (self.power - 1.0)

    def _f_inverse(self, f):
        return (1.0 - f) ** (1.0 / self.power)


@dataclasses.dataclass(frozen=True)
class GeometricSchedule(Schedule):
    """sigma(t) = sigma_min^(1-t) sigma_max^t, alpha = exp(-sigma) (SEDD, uniform graph)."""

    sigma_min: float = 1e-4
    sigma_max: float = 20.0

    def __post_init__(self):
        if not 0.0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                "GeometricSchedule: need 0 < sigma_min < sigma_max, got "
                f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"
            )

    @property
    def _log_ratio(self):
        return math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t):
        return self.sigma_min ** (1.0 - t) * self.sigma_max**t

    def dsigma(self, t):
        return self.sigma(t) * self._log_ratio

    def alpha(self, t):
        return jnp.exp(-self.sigma(t))

    def dalpha(self, t):
        return -self.dsigma(t) * self.alpha(t)

    def t_from_alpha(self, a):
        return jnp.log(-jnp.log(a) / self.sigma_min) / self._log_ratio


SCHEDULES = {
    "loglinear": LogLinearSchedule,
    "linear": LinearSchedule,
    "cosine": CosineSchedule,
    "polynomial": PolynomialSchedule,
    "geometric": GeometricSchedule,
}


def get_schedule(name: str, **kwargs) -> Schedule:
    """Builds a schedule by name: 'loglinear' (eps), 'linear' / 'cosine' (eps), 'polynomial' (power, eps),
    'geometric' (sigma_min, sigma_max)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}")
    cls = SCHEDULES[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(kwargs) - fields
    if unknown:
        raise ValueError(
            f"schedule {name!r} got unknown parameters {sorted(unknown)}; it takes {sorted(fields)}"
        )
    return cls(**kwargs)
