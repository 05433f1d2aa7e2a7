"""AR-to-diffusion adaptation vs training the same diffusion model from scratch, by optimizer steps.

    python benchmarks/adapt_vs_scratch.py [--route=diffullama|fastdllm_v2|both] [--steps=600] [--out=/tmp/x]
    python benchmarks/adapt_vs_scratch.py --dry-run        # 4 steps each at the smoke size (a check of the script)

1. trains the AR quickstart (experiments/quickstart_ar.py, 600 steps; reused if its workdir is finished);
2. for each route, trains experiments/adapt_<route>.py from that checkpoint (config.train.init_from) and the
   same config with `scratch` (random initialisation, no annealing), --steps steps each, the validation NELBO
   (EMA parameters, the same 8 batches and noise) every --eval_every steps;
3. prints both curves and, for a target NELBO (the scratch run's final value, or --target), the first
   evaluated step at which each run reaches it; writes adapt_vs_scratch.png and appends a table to
   benchmarks/RESULTS.md (with --append).

Runs are subprocesses of `python -m ddlm.main` on one CPU device (or whatever JAX_PLATFORMS gives). Curves are
by steps, so the machine's load changes only the wall time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(config: str, workdir: str, overrides: list[str], env: dict) -> float:
    cmd = [sys.executable, "-m", "ddlm.main", f"--config={config}", f"--workdir={workdir}", *overrides]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.time() - t0


def eval_curve(workdir: str) -> list[tuple[int, float]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r["nelbo"]) for r in rows if r["split"] == "eval"]


def first_step_at(curve, target: float):
    return next((step for step, nelbo in curve if nelbo <= target), None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--route", default="both", choices=["diffullama", "fastdllm_v2", "both"])
    p.add_argument("--steps", type=int, default=600, help="optimizer steps of each diffusion run")
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument(
        "--target", type=float, default=0.0, help="NELBO to reach (0 = the scratch run's final one)"
    )
    p.add_argument("--out", default="/tmp/ddlm_adapt_vs_scratch")
    p.add_argument(
        "--ar_workdir", default="", help="a finished quickstart_ar run to start from (default: train one)"
    )
    p.add_argument("--dry-run", action="store_true", help="4 steps each at the smoke size")
    p.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = p.parse_args()

    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("JAX_PLATFORMS", "cpu")
    steps, eval_every, arg = (4, 2, ":smoke") if args.dry_run else (args.steps, args.eval_every, "")
    common = [
        f"--config.train.steps={steps}",
        f"--config.train.eval_every={eval_every}",
        "--config.train.sample_at_end=False",
    ]
    if args.dry_run:
        common += ["--config.train.eval_batches=1"]
    os.makedirs(args.out, exist_ok=True)

    ar_dir = args.ar_workdir or os.path.join(args.out, "quickstart_ar")
    ar_steps = ["--config.train.steps=4"] if args.dry_run else []
    seconds = (
        {} if args.ar_workdir else {"ar": run(f"experiments/quickstart_ar.py{arg}", ar_dir, ar_steps, env)}
    )
    routes = ["diffullama", "fastdllm_v2"] if args.route == "both" else [args.route]
    results = {}
    for route in routes:
        config = f"experiments/adapt_{route}.py"
        adapted, scratch = (
            os.path.join(args.out, f"{route}_adapted"),
            os.path.join(args.out, f"{route}_scratch"),
        )
        sep = "," if arg else ":"
        seconds[f"{route} adapted"] = run(
            config + arg, adapted, common + [f"--config.train.init_from={ar_dir}"], env
        )
        seconds[f"{route} scratch"] = run(config + arg + sep + "scratch", scratch, common, env)
        curves = {"adapted": eval_curve(adapted), "scratch": eval_curve(scratch)}
        target = args.target or curves["scratch"][-1][1]
        results[route] = (curves, target)

    lines = []
    for route, (curves, target) in results.items():
        reach = {k: first_step_at(c, target) for k, c in curves.items()}
        lines.append(f"\n{route}: validation NELBO (nats/token, EMA params) by step; target {target:.4f}")
        lines.append("| step | adapted | scratch |")
        lines.append("|---|---|---|")
        for (step, a), (_, s) in zip(curves["adapted"], curves["scratch"]):
            lines.append(f"| {step} | {a:.4f} | {s:.4f} |")
        ratio = (
            f"{reach['scratch'] / reach['adapted']:.1f}x fewer steps"
            if reach["adapted"] and reach["scratch"]
            else "n/a"
        )
        lines.append(
            f"steps to reach {target:.4f}: adapted {reach['adapted']}, scratch {reach['scratch']} ({ratio})"
        )
    lines.append(
        "wall time (s, includes compilation): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
    )
    text = "\n".join(lines)
    print(text)

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5), squeeze=False)
        for ax, (route, (curves, target)) in zip(axes[0], results.items()):
            for label, curve in curves.items():
                ax.plot([s for s, _ in curve], [n for _, n in curve], marker="o", ms=3, label=label)
            ax.axhline(target, color="grey", ls=":", lw=1)
            ax.set(title=route, xlabel="optimizer step", ylabel="validation NELBO (nats/token)")
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "adapt_vs_scratch.png"), dpi=120)
        print(f"plot: {os.path.join(args.out, 'adapt_vs_scratch.png')}")
    except ImportError:
        pass
    if args.append and not args.dry_run:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()
        with open(os.path.join(REPO, "benchmarks", "RESULTS.md"), "a") as f:
            f.write(
                f"\n## AR-to-diffusion adaptation vs scratch (`python benchmarks/adapt_vs_scratch.py`, "
                f"{datetime.date.today()}, CPU, rev {rev})\n{text}\n"
            )


if __name__ == "__main__":
    main()
