"""Network calls (NFE) of each sampler for 1024-token sequences at 8 / 32 / 128 / 1024 steps.

    python benchmarks/sampling_nfe.py [--length=1024] [--batch=1]

The network is a stand-in with the shape of a real one (time-free logits from the input tokens, V = 64 + mask),
so the counts are those a real network would incur; the NFE is counted inside the jitted loops. The cache
is batch-wide, so the cached count is given for batch 1 (per-sequence) and for --batch. Also prints the
expected cached count for the log-linear grid, sum_k P(some token unmasks at step k) = T (1 - (1 - 1/T)^L)
(each token's unmasking step is uniform on the grid when alpha is linear in t).
"""

import argparse
import time

import jax
import jax.numpy as jnp

from ddlm import schedules
from ddlm import sampling

VOCAB = 65
MASK = 64


def denoise_fn(xt, t):
    del t  # time-free
    pos = jnp.arange(xt.shape[1])[None, :, None]
    ids = jnp.arange(VOCAB)[None, None, :]
    return jnp.sin(0.37 * pos * ids + 0.11 * xt[..., None]) * 2.0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", default="8,32,128,1024")
    args = parser.parse_args()
    sched = schedules.LogLinearSchedule()
    length = args.length
    rows = []
    for steps in [int(s) for s in args.steps.split(",")]:
        row = {"steps": steps}
        for name in ("ancestral", "cached", "remdm", "first_hitting", "sedd_analytic"):
            c = sampling.default_config()
            c.name, c.steps = name, steps
            for batch, key in ((1, name), (args.batch, f"{name}@B{args.batch}")):
                if batch != 1 and name != "cached":
                    continue
                fn = sampling.jit_sampler(c, denoise_fn=denoise_fn, schedule=sched, mask_id=MASK)
                t0 = time.time()
                out = fn(jax.random.key(0), jnp.full((batch, length), MASK, jnp.int32))
                row[key] = int(out.nfe)
                row[key + "_s"] = time.time() - t0
        row["cached_expected"] = steps * (1 - (1 - 1 / steps) ** length)
        rows.append(row)
    print(f"NFE for L={length} (log-linear grid; seconds incl. compile on {jax.devices()[0].platform})")
    header = [
        "steps",
        "ancestral",
        "remdm",
        "cached",
        f"cached@B{args.batch}",
        "cached_expected",
        "first_hitting",
        "sedd_analytic",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [f"{r[h]:.1f}" if isinstance(r[h], float) else str(r[h]) for h in header]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
