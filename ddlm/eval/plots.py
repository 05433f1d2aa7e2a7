"""Plots a researcher looks at instead of reading numbers (matplotlib, Agg backend, PNG):

    loss_curves.png   train loss and eval bits/token (with its standard error, where recorded) against step,
                      one line per workdir, from <workdir>/metrics.jsonl
    frontier.png      generative perplexity (log) against unigram entropy, one line per (run, sampler, noise
                      precision) through its step counts, the data as a star, the Pareto front dashed
    speed.png         tokens/s of each frontier point (or of a --speed_json table) as bars

    python -m ddlm.eval.plots --workdir=runs/quickstart,runs/quickstart_ar [--out_dir=...] [--tensorboard]

With --tensorboard the figures are also written as images to <workdir>/tensorboard (tag 'plots/<name>').
A missing workdir, a metrics.jsonl with no record (or a damaged line), a damaged frontier.json or
--speed_json, or nothing to plot is one line naming the file (ddlm.command), and no figure is written.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ddlm import command
from ddlm.eval import frontier_points


def read_metrics(workdir: str) -> list[dict]:
    """The records of <workdir>/metrics.jsonl ({'step', 'split', name: value}); a step written twice (a
    resumed run) keeps its last record. A ValueError naming the file (and the line) if it is missing, holds
    no record, or a line is not a JSON record with an integer 'step' and a 'split'."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: train first (--mode=train), or check --workdir")
    last = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                r = None
            if not _is_record(r):
                raise ValueError(
                    f"{path}:{number}: not a metrics record (expected a JSON object with an integer 'step' and "
                    f"a 'split'): {line.strip()[:80]!r}"
                )
            last[(r["split"], r["step"])] = r
    if not last:
        raise ValueError(f"{path} holds no records: train first (--mode=train), or check --workdir")
    return sorted(last.values(), key=lambda r: r["step"])


def _is_record(r) -> bool:
    step = r.get("step") if isinstance(r, dict) else None
    return isinstance(r, dict) and isinstance(r.get("split"), str) and type(step) is int


def _save(fig, path: str | None):
    """Writes fig to path as PNG (nothing when path is None); returns fig."""
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def _curves(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train records with a loss, eval records with bits/token): what the loss curves draw."""
    train = [r for r in records if r["split"] == "train" and "loss" in r]
    return train, [r for r in records if r["split"] == "eval" and "bits_per_token" in r]


def plot_loss_curves(runs: dict[str, list[dict]], path: str | None = None):
    """Train loss and eval bits/token against step, one line per run ({label: metrics records})."""
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    for label, records in runs.items():
        train, ev = _curves(records)
        if train:
            ax_train.plot([r["step"] for r in train], [r["loss"] for r in train], label=label)
        if ev:
            se = [r.get("bits_per_token_se", 0.0) for r in ev]
            ax_eval.errorbar(
                [r["step"] for r in ev],
                [r["bits_per_token"] for r in ev],
                yerr=[0.0 if s is None or math.isnan(s) else s for s in se],
                marker="o",
                capsize=3,
                label=label,
            )
    ax_train.set(xlabel="step", ylabel="train loss (nats/token)", title="training loss")
    ax_eval.set(xlabel="step", ylabel="bits/token", title="validation NELBO / NLL (± 1 SE)")
    for ax in (ax_train, ax_eval):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return _save(fig, path)


def _series_key(p: frontier_points.FrontierPoint) -> tuple:
    """Points joined by one line: a sampler with steps through its step counts (one line per temperature),
    a sampler without (first_hitting, ar, adaptive rules) through its temperatures."""
    return (p.label, p.sampler, p.precision) + ((p.temperature,) if p.steps else ())


def plot_frontier(points: Sequence[frontier_points.FrontierPoint], path: str | None = None):
    """Generative perplexity against unigram entropy (module doc); AR points as squares."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    groups: dict[tuple, list] = {}
    for p in points:
        if p.label != "data":
            groups.setdefault(_series_key(p), []).append(p)
    # One colour per (run, sampler, temperature), whatever the noise precision: a float32 line is drawn dashed
    # with open markers over its float64 twin, so identical samples show as one line.
    colours: dict[tuple, str] = {}
    for key, pts in groups.items():
        label, sampler, precision = key[:3]
        stepped = len(key) == 4
        colour = colours.setdefault(key[:2] + key[3:], f"C{len(colours) % 10}")
        pts = sorted(pts, key=lambda p: p.steps if stepped else p.temperature)
        name = f"{label} {frontier_points.short_name(sampler)} {precision}" + (
            f" T={key[3]:g}" if stepped else ""
        )
        ax.errorbar(
            [p.entropy for p in pts],
            [p.gen_ppl for p in pts],
            xerr=[p.entropy_se for p in pts],
            yerr=[p.gen_ppl_se for p in pts],
            marker="s" if sampler == "ar" else "o",
            markerfacecolor="none" if precision == "float32" else colour,
            color=colour,
            capsize=2,
            label=name,
            linestyle="--" if precision == "float32" else "-",
        )
        for p in pts:
            text = f"{p.steps}" if stepped else f"T={p.temperature:g}"
            ax.annotate(text, (p.entropy, p.gen_ppl), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for p in points:
        if p.label == "data":
            ax.plot(
                [p.entropy], [p.gen_ppl], marker="*", markersize=14, color="black", linestyle="", label="data"
            )
    front = frontier_points.pareto_front([p for p in points if p.label != "data"])
    if len(front) > 1:
        ax.plot(
            [p.entropy for p in front], [p.gen_ppl for p in front], color="gray", alpha=0.5, linestyle=":"
        )
    ax.set_yscale("log")
    ax.set(
        xlabel="unigram entropy per sample (nats)",
        ylabel="generative perplexity (AR scorer)",
        title="quality frontier (numbers: steps, or temperature)",
    )
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def plot_speed(rows: Sequence[tuple[str, float]], path: str | None = None):
    """Horizontal bars of tokens/s, one per (name, tokens_per_s), the value written on each."""
    rows = [(n, v) for n, v in rows if v is not None and not math.isnan(v)]
    fig, ax = plt.subplots(figsize=(7, 0.4 * max(len(rows), 2) + 1))
    names = [n for n, _ in rows]
    values = [v for _, v in rows]
    bars = ax.barh(range(len(rows)), values, color="tab:blue")
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()
    for bar, v in zip(bars, values):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:,.0f}", va="center", fontsize=8)
    ax.set(xlabel="tokens / s", title="sampling speed")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def speed_rows(points: Sequence[frontier_points.FrontierPoint]) -> list[tuple[str, float]]:
    return [(frontier_points.point_name(p), p.tokens_per_s) for p in points if p.label != "data"]


def write_tensorboard(logdir: str, figures: dict) -> None:
    """Writes each figure as an image (tag 'plots/<name>') to the TensorBoard event files in logdir."""
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(logdir)
    for name, fig in figures.items():
        writer.add_figure(f"plots/{name}", fig, close=False)
    writer.close()


def read_speed_table(path: str) -> list[tuple[str, float]]:
    """(name, tokens_per_s) rows of a --speed_json file {'rows': [{'name', 'tokens_per_s'}]}; a ValueError
    naming the file if it is missing or not of that form."""
    if not os.path.isfile(path):
        raise ValueError(f"--speed_json={path} does not exist")
    try:
        with open(path) as f:
            rows = [(r["name"], float(r["tokens_per_s"])) for r in json.load(f)["rows"]]
    except (ValueError, KeyError, TypeError) as e:  # not JSON, a missing key, not a number
        raise ValueError(
            f"--speed_json={path}: expected {{'rows': [{{'name': ..., 'tokens_per_s': number}}, ...]}} "
            f"({type(e).__name__}: {e})"
        ) from None
    return rows


def make_plots(workdirs: Sequence[str], out_dir: str, *, speed_json: str = "", tensorboard: bool = False):
    """Writes loss_curves.png (always), frontier.png and speed.png (when the workdirs have eval/frontier.json,
    or speed.png from speed_json: {'rows': [{'name', 'tokens_per_s'}]}). Returns the paths written. A
    ValueError naming the file for a workdir without records, a damaged file, or nothing to plot: no
    figure is written then."""
    label = lambda w: os.path.basename(os.path.normpath(w))
    runs = {label(w): read_metrics(w) for w in workdirs}
    if not any(any(_curves(records)) for records in runs.values()):
        raise ValueError(
            "no train 'loss' or eval 'bits_per_token' in the metrics.jsonl of "
            f"{', '.join(workdirs)}: nothing to plot"
        )
    points = []
    for w in workdirs:
        path = os.path.join(w, "eval", frontier_points.FRONTIER_FILE)
        if os.path.exists(path):
            points += frontier_points.load(path)
    rows = speed_rows(points) + (read_speed_table(speed_json) if speed_json else [])
    figures = {"loss_curves": plot_loss_curves(runs)}
    if points:
        figures["frontier"] = plot_frontier(points)
    if rows:
        figures["speed"] = plot_speed(rows)
    written = []
    for name, fig in figures.items():
        written.append(os.path.join(out_dir, f"{name}.png"))
        _save(fig, written[-1])
    if tensorboard:
        write_tensorboard(os.path.join(workdirs[0], "tensorboard"), figures)
    for fig in figures.values():
        plt.close(fig)
    return written


def run(f) -> list[str]:
    """The command line (module doc) with the parsed flags `f`; returns the paths written."""
    workdirs = [w for w in f.workdir.split(",") if w]
    if not workdirs:
        raise command.FlagError("--workdir: give one or more workdirs, comma-separated")
    for w in workdirs:
        if not os.path.isdir(w):
            raise command.FlagError(f"--workdir: {w} is not a directory (expected a workdir with metrics.jsonl)")
    out_dir = f.out_dir or os.path.join(workdirs[0], "eval", "plots")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise command.FlagError(f"--out_dir={out_dir} is a file; expected a directory (created if missing)")
    return make_plots(workdirs, out_dir, speed_json=f.speed_json, tensorboard=f.tensorboard)


def main(argv):
    from absl import flags

    del argv  # command.parse_flags refused positional arguments
    with command.one_line_errors():
        for path in run(flags.FLAGS):
            print(path)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", "", "Workdir(s), comma-separated, each with metrics.jsonl.")
    flags.DEFINE_string("out_dir", "", "Where the PNGs go ('' = <first workdir>/eval/plots).")
    flags.DEFINE_string("speed_json", "", "Optional speed table {'rows': [{'name', 'tokens_per_s'}]}.")
    flags.DEFINE_bool("tensorboard", False, "Also write the figures as images to <workdir>/tensorboard.")
    app.run(main, flags_parser=command.parse_flags)
