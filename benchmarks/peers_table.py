"""The peers comparison's table with each codebase's fraction of the machine's matmul rate.

`bash ../shared/peers/compare.sh` runs ddlm, md4 and MDLM interleaved and prints tokens/s and ratios; it writes
`runs.tsv` (one row per run: shape, round, codebase, the 1024^3 float32 matmul calibration in GFLOP/s measured
just before the run, load, warm-up steps, exit code, seconds, log) and each run's log into its OUT folder.
This script reads that folder and adds what travels between machines: the model FLOPs each step achieved
(`ddlm.models.flops_per_token` of the shape x batch x length, the formula MFU uses; md4's and MDLM's
networks do the same matmuls at these shapes) divided by the calibration measured before that run.

    python benchmarks/peers_table.py ~/.cache/ddlm-peers/compare/<timestamp> [<another run's folder> ...]

Printed per shape: each round's tokens/s, calibration and fraction per codebase, then a markdown row per
shape: median tokens/s over all rounds' steps, the medians of the per-round ratios ddlm/md4 and ddlm/MDLM
(compare.sh's figure), the median of each codebase's per-round fractions, and each codebase's fraction of the
median calibration of all the shape's runs (its median step over every round; the calibration measures the
machine, not the codebase, and one 1024^3 matmul before a run swings by +-15% on a shared host, more than the
codebases' steps do, so the pooled calibration is the steadier denominator). Several folders (runs of
compare.sh at different times) pool their rounds: folder k's round r is round (k, r).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import re
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"tiny": (4, 256, 4), "small": (12, 768, 12)}  # (layers, d_model, heads), as compare.sh's benches
CODEBASES = ("ddlm", "md4", "mdlm")
# The per-step lines of ddlm_bench.py / md4/bench.py ("step N | X ms") and of mdlm/bench.py, as compare.sh reads them.
STEP_LINES = (
    re.compile(r"^step\s+(\d+) \|\s+([\d.]+) ms"),
    re.compile(r"^step\s+(\d+) loss\s+\S+ time\s+([\d.]+) ms"),
)


@dataclasses.dataclass
class Run:
    size: str
    round: tuple  # (folder index, compare.sh's round)
    codebase: str
    calibration: float  # GFLOP/s of a 1024^3 float32 matmul just before the run (nan if not measured)
    load: float
    step_seconds: list  # the timed steps (the first `warmup` executed steps dropped)

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_seconds) if self.step_seconds else float("nan")


def step_flops(size: str, *, batch: int, seq: int, vocab: int) -> float:
    """Model FLOPs of one training step at a peers shape: ddlm's experiments/mdlm.py network resized as
    ddlm_bench.py does (MLP 4 d, vocabulary vocab + 1 with the mask id), `flops_per_token` x batch x seq."""
    sys.path.insert(0, ROOT)
    from ddlm import models
    from ddlm.train import config_lib

    config = config_lib.recipe("mdlm", os.path.join(ROOT, "experiments", "mdlm.py")).get_config("size=small")
    layers, dim, heads = SHAPES[size]
    m = config.model
    m.num_layers, m.d_model, m.num_heads, m.mlp_dim = layers, dim, heads, 4 * dim
    return models.flops_per_token(m, vocab + 1, seq) * batch * seq


def read_runs(out_dir: str, folder: int = 0) -> list[Run]:
    """compare.sh's runs.tsv and logs in out_dir -> one Run per row, its round (folder, round) (logs named
    relative to out_dir if the folder was moved)."""
    path = os.path.join(out_dir, "runs.tsv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no runs.tsv (expected compare.sh's OUT folder)")
    runs = []
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row:
                continue
            if len(row) != 9:
                raise ValueError(f"{path} line {n}: expected 9 tab-separated fields, got {len(row)}")
            size, rnd, cb, gf, load, warm, _rc, _wall, log = row
            if not os.path.isfile(log):
                log = os.path.join(out_dir, os.path.basename(log))
            times = []
            with open(log, errors="replace") as lines:
                for line in lines:
                    for rx in STEP_LINES:
                        m = rx.match(line)
                        if m and int(m.group(1)) >= int(warm):
                            times.append(float(m.group(2)) / 1e3)
            runs.append(Run(size, (folder, int(rnd)), cb, _float(gf), _float(load.split()[0] if load else ""), times))
    return runs


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _median(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def summarize(runs: list[Run], flops: dict, tokens_per_step: int) -> dict:
    """{size: {'rounds': [(round, {cb: (tok/s, calibration, fraction)})], 'tok': {cb: tok/s over all steps},
    'ratio_md4', 'ratio_mdlm': medians of per-round ratios, 'fraction': {cb: median of per-round fractions},
    'calibration': median of the shape's calibrations, 'fraction_pooled': {cb: the model FLOP/s of cb's median
    step over all rounds / that median calibration}}}."""
    table = {}
    for size in dict.fromkeys(r.size for r in runs):
        rounds = {}
        pooled = {cb: [] for cb in CODEBASES}
        calibration = _median([r.calibration for r in runs if r.size == size])
        for r in runs:
            if r.size != size:
                continue
            achieved = flops[size] / r.median_step / 1e9  # GFLOP/s
            rounds.setdefault(r.round, {})[r.codebase] = (
                tokens_per_step / r.median_step,
                r.calibration,
                achieved / r.calibration,
            )
            pooled.setdefault(r.codebase, []).extend(r.step_seconds)

        def ratio(cells, other):
            return cells["ddlm"][0] / cells[other][0] if "ddlm" in cells and other in cells else float("nan")

        ordered = sorted(rounds.items())
        table[size] = {
            "rounds": ordered,
            "tok": {cb: tokens_per_step / _median(t) if t else float("nan") for cb, t in pooled.items()},
            "ratio_md4": _median([ratio(c, "md4") for _, c in ordered]),
            "ratio_mdlm": _median([ratio(c, "mdlm") for _, c in ordered]),
            "fraction": {cb: _median([c[cb][2] for _, c in ordered if cb in c]) for cb in pooled},
            "calibration": calibration,
            "fraction_pooled": {
                cb: flops[size] / _median(t) / 1e9 / calibration if t else float("nan") for cb, t in pooled.items()
            },
            "gflop": flops[size] / 1e9,
        }
    return table


def render(table: dict) -> str:
    lines = []
    for size, t in table.items():
        lines.append(f"== {size} ({t['gflop']:.1f} GFLOP a step): tokens/s [calibration GFLOP/s, fraction of it]")
        for rnd, cells in t["rounds"]:
            parts = []
            for cb in CODEBASES:
                if cb in cells:
                    tok, gf, frac = cells[cb]
                    parts.append(f"{cb} {tok:7.0f} [{gf:5.1f}, {frac:.2f}]")
            lines.append(f"  folder {rnd[0]} round {rnd[1]}: " + " | ".join(parts))
    lines.append("")
    lines.append(
        "| shape | ddlm tok/s | md4 | MDLM | ddlm/md4 | ddlm/MDLM | achieved / calibrated matmul rate: ddlm, md4, MDLM "
        "(median of rounds) | the same over the median calibration |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for size, t in table.items():
        tok, frac = t["tok"], t["fraction"]
        lines.append(
            f"| {size} ({len(t['rounds'])} rounds) | {tok.get('ddlm', float('nan')):,.0f} | "
            f"{tok.get('md4', float('nan')):,.0f} | {tok.get('mdlm', float('nan')):,.0f} | "
            f"{t['ratio_md4']:.2f} | {t['ratio_mdlm']:.2f} | "
            + ", ".join(f"{frac.get(cb, float('nan')):.2f}" for cb in CODEBASES)
            + " | "
            + ", ".join(f"{t['fraction_pooled'].get(cb, float('nan')):.2f}" for cb in CODEBASES)
            + f" (of {t['calibration']:.0f} GFLOP/s) |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dirs", nargs="+", help="compare.sh's OUT folders (each holding runs.tsv and the runs' logs)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096, help="data ids; the model's vocabulary is vocab + 1")
    args = p.parse_args(argv)
    try:
        runs = [run for k, folder in enumerate(args.out_dirs) for run in read_runs(folder, k)]
    except (OSError, ValueError) as e:
        print(f"peers_table: {e}", file=sys.stderr)
        return 2
    unknown = sorted({r.size for r in runs} - set(SHAPES))
    if unknown:
        print(f"peers_table: runs.tsv names shapes {unknown}; expected {sorted(SHAPES)}", file=sys.stderr)
        return 2
    flops = {s: step_flops(s, batch=args.batch, seq=args.seq, vocab=args.vocab) for s in {r.size for r in runs}}
    print(render(summarize(runs, flops, args.batch * args.seq)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
