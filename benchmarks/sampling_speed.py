"""Wall time per batch of each sampler with a real (tiny, randomly initialised, time-free) DiT, when the
number of steps exceeds the length: the cached and first-hitting samplers skip the calls that change
nothing, so their time follows their NFE (less so for tiny networks, where drawing the categorical over
V at every position dominates a step).

    python benchmarks/sampling_speed.py [--length=64] [--steps=256] [--batch=4] [--size=tiny] [--base=ancestral]

Also the parallel decoders (sampler 'parallel', ddlm.sampling.parallel): random order at one token per
step, LLaDA low-confidence at L/2, L/4, L/8 steps in blocks of --block_length, and the adaptive rules
(threshold 0.9, factor 1, EB gamma 0.1). A randomly initialised network is nearly uniform over V, so the
adaptive rules commit about one token per step here; their NFE means something with a trained model.

Prints NFE, seconds per batch (compilation excluded, best of --repeats) and the speed-up over --base.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from ddlm import models, schedules
from ddlm import sampling

SAMPLERS = ("ancestral", "cached", "first_hitting", "remdm", "sedd_analytic")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--block_length", type=int, default=32)
    parser.add_argument("--base", default="ancestral", help="the row the speed-ups are relative to")
    args = parser.parse_args()

    mc = models.default_config(args.size)
    mc.time_conditioning = False  # time-free (RADD / MD4-style): the cache is exact
    mc.dropout = 0.0
    model = models.get_model(mc, args.vocab)
    mask_id = args.vocab - 1
    x = jnp.full((args.batch, args.length), mask_id, jnp.int32)
    params = model.init({"params": jax.random.key(0)}, x, None, x0=None, train=False)["params"]
    sched = schedules.LogLinearSchedule()

    n, bl = args.length, args.block_length
    parallel = {
        "parallel random, 1/step": dict(rule="random", steps=n, block_length=0),
        **{
            f"parallel low_confidence, L/{d} steps": dict(
                rule="low_confidence", steps=n // d, block_length=bl
            )
            for d in (2, 4, 8)
        },
        "parallel threshold 0.9": dict(rule="threshold", threshold=0.9, block_length=bl),
        "parallel factor 1": dict(rule="factor", factor=1.0, block_length=bl),
        "parallel EB gamma 0.1": dict(rule="entropy_bounded", gamma=0.1, block_length=bl),
    }
    runs = {name: dict(name=name, steps=args.steps) for name in SAMPLERS}
    runs.update({label: dict(name="parallel", **kw) for label, kw in parallel.items()})

    def run(label, params, rng):
        c = sampling.default_config()
        c.update(runs[label])
        denoise_fn = lambda xt, t: model.apply({"params": params}, xt, None, x0=None, train=False)
        return sampling.make_sampler(c, denoise_fn=denoise_fn, schedule=sched, mask_id=mask_id)(rng, x)

    print(
        f"L={args.length}, steps={args.steps}, batch={args.batch}, {args.size} DiT, V={args.vocab}, "
        f"{jax.devices()[0].platform}"
    )
    results = {}
    for label in runs:
        fn = jax.jit(lambda p, r, label=label: run(label, p, r)).lower(params, jax.random.key(0)).compile()
        best = float("inf")
        for i in range(args.repeats):
            t0 = time.time()
            out = fn(params, jax.random.key(i))
            out.tokens.block_until_ready()
            best = min(best, time.time() - t0)
        results[label] = (int(out.nfe), best)
    base = results[args.base][1]
    print(f"| sampler | NFE | s / batch | speed-up vs {args.base} |")
    print("|---|---|---|---|")
    for label, (nfe, best) in results.items():
        print(f"| {label} | {nfe} | {best:.3f} | {base / best:.2f}x |")


if __name__ == "__main__":
    main()
