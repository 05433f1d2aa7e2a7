"""Wall time per batch of each sampler with a real (tiny, randomly initialised, time-free) DiT, when the
number of steps exceeds the length: the cached and first-hitting samplers skip the calls that change
nothing, so their time follows their NFE (less so for tiny networks, where drawing the categorical over
V at every position dominates a step).

    python benchmarks/sampling_speed.py [--length=64] [--steps=256] [--batch=4] [--size=tiny]

Prints NFE, seconds per batch (compilation excluded, best of --repeats) and the speed-up over ancestral.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from ddlm import models, schedules
from ddlm import sampling


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    mc = models.default_config(args.size)
    mc.time_conditioning = False  # time-free (RADD / MD4-style): the cache is exact
    mc.dropout = 0.0
    model = models.get_model(mc, args.vocab)
    mask_id = args.vocab - 1
    x = jnp.full((args.batch, args.length), mask_id, jnp.int32)
    params = model.init({"params": jax.random.key(0)}, x, None, x0=None, train=False)["params"]
    sched = schedules.LogLinearSchedule()

    def run(name, params, rng):
        c = sampling.default_config()
        c.name, c.steps = name, args.steps
        denoise_fn = lambda xt, t: model.apply({"params": params}, xt, None, x0=None, train=False)
        return sampling.make_sampler(c, denoise_fn=denoise_fn, schedule=sched, mask_id=mask_id)(rng, x)

    print(
        f"L={args.length}, steps={args.steps}, batch={args.batch}, {args.size} DiT, V={args.vocab}, "
        f"{jax.devices()[0].platform}"
    )
    print("| sampler | NFE | s / batch | speed-up vs ancestral |")
    print("|---|---|---|---|")
    base = None
    for name in ("ancestral", "cached", "first_hitting", "remdm", "sedd_analytic"):
        fn = jax.jit(lambda p, r, name=name: run(name, p, r)).lower(params, jax.random.key(0)).compile()
        best = float("inf")
        for i in range(args.repeats):
            t0 = time.time()
            out = fn(params, jax.random.key(i))
            out.tokens.block_until_ready()
            best = min(best, time.time() - t0)
        base = base or best
        print(f"| {name} | {int(out.nfe)} | {best:.3f} | {base / best:.2f}x |")


if __name__ == "__main__":
    main()
