"""Schedules: derivatives equal jax.grad, boundary values, sigma/alpha agreement, inverses, bad params."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm import schedules

ALL = [
    schedules.LogLinearSchedule(),
    schedules.LogLinearSchedule(eps=0.0),
    schedules.LinearSchedule(),
    schedules.LinearSchedule(eps=1e-4),
    schedules.CosineSchedule(),
    schedules.CosineSchedule(eps=1e-4),
    schedules.PolynomialSchedule(power=3.0),
    schedules.PolynomialSchedule(power=0.5, eps=1e-2),
    schedules.GeometricSchedule(),
    schedules.GeometricSchedule(sigma_min=1e-3, sigma_max=5.0),
]
T = np.linspace(0.02, 0.98, 25)


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("sched", ALL, ids=repr)
def test_derivatives_match_autodiff(sched):
    t = jnp.asarray(T, jnp.float64)
    np.testing.assert_allclose(jax.vmap(jax.grad(sched.alpha))(t), sched.dalpha(t), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(jax.vmap(jax.grad(sched.sigma))(t), sched.dsigma(t), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sched", ALL, ids=repr)
def test_sigma_is_minus_log_alpha_and_inverse(sched):
    t = jnp.asarray(T, jnp.float64)
    np.testing.assert_allclose(sched.sigma(t), -np.log(sched.alpha(t)), rtol=1e-10)
    np.testing.assert_allclose(sched.t_from_alpha(sched.alpha(t)), t, rtol=1e-8, atol=1e-10)
    a = np.asarray(sched.alpha(t))
    assert np.all(np.diff(a) < 0), "alpha must decrease in t"
    w = np.asarray(sched.mdlm_weight(t))
    np.testing.assert_allclose(w, -np.asarray(sched.dalpha(t)) / (1 - a), rtol=1e-12)


def test_boundary_values():
    z, o = jnp.float64(0.0), jnp.float64(1.0)
    ll = schedules.LogLinearSchedule(eps=1e-3)
    assert float(ll.alpha(z)) == 1.0 and math.isclose(float(ll.alpha(o)), 1e-3, rel_tol=1e-12)
    # MDLM: sigma(t) = -log(1 - (1 - eps) t); the MDLM weight is exactly 1/t.
    t = jnp.asarray(T)
    np.testing.assert_allclose(ll.mdlm_weight(t), 1.0 / t, rtol=1e-12)
    for s in [
        schedules.LinearSchedule(),
        schedules.CosineSchedule(),
        schedules.PolynomialSchedule(power=2.0),
    ]:
        assert math.isclose(float(s.alpha(z)), 1.0, abs_tol=1e-15)
        assert math.isclose(float(s.alpha(o)), 0.0, abs_tol=1e-15)
    # md4's eps: alpha in [eps, 1 - eps].
    c = schedules.CosineSchedule(eps=1e-4)
    assert math.isclose(float(c.alpha(z)), 1 - 1e-4, rel_tol=1e-12)
    assert math.isclose(float(c.alpha(o)), 1e-4, rel_tol=1e-9)
    g = schedules.GeometricSchedule()
    assert math.isclose(float(g.sigma(z)), 1e-4, rel_tol=1e-12)
    assert math.isclose(float(g.sigma(o)), 20.0, rel_tol=1e-12)
    assert math.isclose(float(g.sigma(jnp.float64(0.5))), math.sqrt(1e-4 * 20.0), rel_tol=1e-12)


def test_specific_values():
    # Independent closed forms at t = 0.3.
    t = 0.3
    assert math.isclose(
        float(schedules.CosineSchedule().alpha(t)), 1 - math.cos(math.pi / 2 * 0.7), rel_tol=1e-12
    )
    assert math.isclose(float(schedules.PolynomialSchedule(power=3.0).alpha(t)), 1 - 0.027, rel_tol=1e-12)
    assert math.isclose(
        float(schedules.LogLinearSchedule(eps=0.1).sigma(t)), -math.log(1 - 0.9 * 0.3), rel_tol=1e-12
    )


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("loglinear", {"eps": 1.0}, "eps"),
        ("loglinear", {"eps": -0.1}, "eps"),
        ("cosine", {"eps": 0.5}, "eps"),
        ("polynomial", {"power": 0.0}, "power"),
        ("geometric", {"sigma_min": 5.0, "sigma_max": 1.0}, "sigma_min"),
        ("geometric", {"sigma_min": 0.0}, "sigma_min"),
        ("loglinear", {"power": 2.0}, "unknown parameters"),
        ("nope", {}, "unknown schedule"),
        # (after the original entries, so that their test ids stay) the messages name the class and range.
        ("loglinear", {"eps": 1.0}, r"^LogLinearSchedule: eps must be in \[0, 1.0\), got 1.0$"),
        ("loglinear", {"eps": -0.1}, r"^LogLinearSchedule: eps must be in \[0, 1.0\), got -0.1$"),
        ("cosine", {"eps": 0.5}, r"^CosineSchedule: eps must be in \[0, 0.5\), got 0.5$"),
        ("linear", {"eps": -1e-3}, r"^LinearSchedule: eps must be in \[0, 0.5\)"),
        ("polynomial", {"eps": 0.6}, r"^PolynomialSchedule: eps must be in \[0, 0.5\)"),
        ("polynomial", {"power": -1.0}, "power must be > 0, got -1.0"),
        ("geometric", {"sigma_min": 2.0, "sigma_max": 2.0}, "sigma_min"),
    ],
)
def test_invalid_parameters_raise(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedules.get_schedule(name, **kwargs)


def test_schedules_are_hashable_static_args():
    @jax.jit
    def f(t, s=schedules.CosineSchedule()):
        return s.alpha(t)

    g = jax.jit(lambda t, s: s.alpha(t), static_argnums=1)
    assert float(g(0.5, schedules.CosineSchedule())) == pytest.approx(float(f(0.5)))
