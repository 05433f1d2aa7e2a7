"""Compile time and step time of the train step with and without the layer scan, at several depths.

    python benchmarks/scan_compile.py                                  # 2, 12, 24 layers of the peers' tiny width
    python benchmarks/scan_compile.py --size=small --layers=12,24 --steps=2

For each depth: the train step (benchmarks/step_ab.py's builder: experiments/mdlm.py at the peers' shape,
float32, one device) compiled unrolled and scanned (config.model.scan_layers), its compile seconds and the
median of --steps executed steps. Printed: a table and the ratios compile(deepest)/compile(shallowest) per
layout, the figure the issue asks for (scanned: within 1.5x). Absolute seconds depend on the machine's load.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=("tiny", "small"))
    p.add_argument("--layers", default="2,12,24")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--remat", default="none", choices=("none", "full", "dots_saveable"))
    args = p.parse_args()
    import step_ab

    depths = [int(x) for x in args.layers.split(",")]
    rows = {}
    for scan in (True, False):
        for depth in depths:
            sets = [f"model.scan_layers={scan}"]
            if args.remat != "none":
                sets += ["model.remat=True", f"model.remat_policy={args.remat}"]
            a = step_ab.parse_args(
                [f"--size={args.size}", f"--layers={depth}", f"--steps={args.steps}"]
                + [f"--b_set={s}" for s in sets]
            )
            compiled, state, get_batch, _, compile_s, _ = step_ab.load_step(a.b, a.b_set, a)
            _, step_s, cpu_s, _ = step_ab.run_block(compiled, state, get_batch, args.steps)
            rows[scan, depth] = (compile_s, step_s)
            print(
                f"{'scan' if scan else 'unrolled':8s} {depth:3d} layers: compile {compile_s:6.1f} s, "
                f"step {step_s * 1e3:8.1f} ms (load {open('/proc/loadavg').read().split()[0]})",
                flush=True,
            )
    lo, hi = depths[0], depths[-1]
    print("\n| layers | compile unrolled (s) | compile scan (s) | step unrolled (ms) | step scan (ms) |")
    print("|---|---|---|---|---|")
    for depth in depths:
        (cu, su), (cs, ss) = rows[False, depth], rows[True, depth]
        print(f"| {depth} | {cu:.1f} | {cs:.1f} | {su * 1e3:.0f} | {ss * 1e3:.0f} |")
    for scan in (False, True):
        ratio = rows[scan, hi][0] / rows[scan, lo][0]
        print(f"compile({hi} layers) / compile({lo} layers), {'scan' if scan else 'unrolled'}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
