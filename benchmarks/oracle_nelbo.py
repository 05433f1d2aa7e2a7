"""Prints the oracle results behind tests/test_losses.py: each loss's exact NELBO with the exact
denoiser (Gauss-Legendre in t, enumeration over x_0 and x_t, float64) next to the data entropy H, and
the Monte-Carlo training estimators' means with standard errors.

    python benchmarks/oracle_nelbo.py
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

import test_losses as T  # noqa: E402  (the enumeration helpers of the exact tests)
from ddlm import schedules  # noqa: E402


def main():
    with jax.enable_x64(True):
        H, L = T.H, T.L
        print(f"toy: V={T.V} tokens, L={L}, H = {H:.9f} nats/sequence ({H / L:.9f} per token)\n")
        print(f"{'loss / schedule':44s} {'exact NELBO':>14s} {'target':>14s} {'|diff|':>9s}")
        rows = []
        for s in T.FULL_SCHEDULES:
            rows.append((f"mdlm / {s}", T.integrate(T.mdlm(s), s, n=96), H))
        for s in T.FULL_SCHEDULES[:2]:
            rows.append((f"sedd_absorb / {s}", T.integrate(T.oracle_sedd_absorbing_score(s), s, n=96), H))
        for eps in (1e-3, 0.05):
            s = schedules.LogLinearSchedule(eps=eps)
            target = H - T.TOY.mutual_information(T.TOY.absorbing_kernel(eps))
            rows.append(
                (f"mdlm / loglinear eps={eps} (H - I(x0;x1))", T.integrate(T.mdlm(s), s, n=16), target)
            )
        rows.append(
            (
                "radd lambda-DCE",
                T.integrate(
                    lambda lg, x0, xt, t: T.losses.radd_loss(lg, x0, xt, t, T.MASK),
                    schedules.LinearSchedule(),
                    n=8,
                ),
                H,
            )
        )
        s = schedules.CosineSchedule()
        bd = lambda lg, x0, xt, t: T.losses.block_diffusion_loss(
            lg, x0, xt, T.jnp.broadcast_to(t[:, None], (x0.shape[0], L // 2)), s, T.MASK, 2
        )
        rows.append(("bd3lm block 2 / cosine", T.integrate(bd, s, n=96, logits=T.block_oracle_logits(2)), H))
        g = schedules.GeometricSchedule()
        i0 = T.TOY.mutual_information(T.TOY.uniform_kernel(T.math.exp(-1e-4)))
        i1 = T.TOY.mutual_information(T.TOY.uniform_kernel(T.math.exp(-20.0)))
        rows.append(("sedd_uniform diffusion term (I0 - I1)", T.uniform_diffusion_term(g, n=160), i0 - i1))
        for name, val, target in rows:
            print(f"{name:44s} {val:14.9f} {target:14.9f} {abs(val - target):9.1e}")
        print("\ndiscrete-time bound L_T (linear schedule):")
        for steps in (1, 2, 4, 8, 32, 256):
            print(
                f"  T={steps:4d}  L_T = {T.discrete_bound(steps, schedules.LinearSchedule()):.6f}  (H = {H:.6f})"
            )
        print("\nMonte-Carlo training estimators (48 batches x 512, per token): mean +- SE vs exact")
        ll = schedules.LogLinearSchedule(eps=1e-3)
        cases = [
            ("mdlm loglinear", "mdlm", "absorbing", ll, {}, T._exact_mdlm_eps()),
            ("sedd_absorb loglinear", "sedd_absorb", "sedd_absorb", ll, {}, T._exact_mdlm_eps()),
            ("radd", "radd", "absorbing", None, {}, H / L),
            ("bd3lm B=2 linear", "bd3lm", "block2", schedules.LinearSchedule(), {"block_size": 2}, H / L),
        ]
        for label, name, kind, sched, kw, exact in cases:
            mean, se = T.mc_estimate(name, T.oracle_apply(kind, sched), sched, **kw)
            print(
                f"  {label:24s} {mean:.5f} +- {se:.5f}   exact {exact:.5f}   z = {(mean - exact) / se:+.2f}"
            )


if __name__ == "__main__":
    main()
