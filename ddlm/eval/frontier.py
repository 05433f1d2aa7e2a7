"""The speed-quality frontier: points of (unigram entropy, generative perplexity, tokens/s) over samplers,
step counts, temperatures and noise precisions, with the data itself as the reference point.

Generative perplexity alone rewards collapsed samples (low temperature, float32 Gumbel noise): a point is
only better than another if it has lower perplexity at no lower entropy, so the frontier is the set of points
no other point beats on both (`pareto_front`), read against the data's own (entropy, perplexity).

    points = sweep(config, workdir, loaded, scorer, grid=Grid(steps=(8, 32), precisions=("float64", "float32")))
    save(os.path.join(workdir, "eval", "frontier.json"), points)

Command line (writes <workdir>/eval/frontier.json and frontier.png; `--draw` only redraws saved ones, several
workdirs together):

    python -m ddlm.eval.frontier --config=experiments/quickstart.py --workdir=runs/quickstart \\
        --config.eval.ar_workdir=runs/quickstart_ar \\
        --steps=8,16,32,64 --temperatures=1.0 --precisions=float64,float32 --num_samples=32
    python -m ddlm.eval.frontier --draw --workdirs=runs/quickstart,runs/other --out=frontier.png
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
from collections.abc import Sequence

FRONTIER_FILE = "frontier.json"


@dataclasses.dataclass
class FrontierPoint:
    label: str  # the model (run) or 'data'
    sampler: str  # sampler name ('' for the data)
    steps: int  # sampler steps (0 for the data)
    temperature: float
    precision: str  # Gumbel-noise precision of the sampler
    entropy: float  # mean unigram entropy of a sample (nats)
    entropy_se: float
    gen_ppl: float  # generative perplexity under the AR scorer
    gen_ppl_se: float
    tokens_per_s: float  # generated tokens per second (compilation excluded); nan for the data
    nfe: float  # network calls per sample batch
    samples: int
    distinct_4: float = float("nan")

    @classmethod
    def from_quality(cls, label: str, q: dict) -> FrontierPoint:
        """From the dict of cli.sample_and_score (or sample_quality.sample_quality plus sampler fields)."""
        nan = float("nan")
        return cls(
            label=label,
            sampler=q.get("sampler", ""),
            steps=int(q.get("steps", 0)),
            temperature=float(q.get("temperature", nan)),
            precision=q.get("precision", ""),
            entropy=q["entropy"],
            entropy_se=q["entropy_se"],
            gen_ppl=q.get("gen_ppl", nan),
            gen_ppl_se=q.get("gen_ppl_se", nan),
            tokens_per_s=q.get("tokens_per_s", nan),
            nfe=q.get("nfe", nan),
            samples=int(q["samples"]),
            distinct_4=q.get("distinct_4", nan),
        )


def save(path: str, points: Sequence[FrontierPoint]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"points": [dataclasses.asdict(p) for p in points]}, f, indent=1)


def load(path: str) -> list[FrontierPoint]:
    with open(path) as f:
        data = json.load(f)
    try:
        return [FrontierPoint(**p) for p in data["points"]]
    except (KeyError, TypeError) as e:
        raise ValueError(
            f"{path}: not a frontier file (a 'points' list of FrontierPoint fields): {e}"
        ) from None


def pareto_front(points: Sequence[FrontierPoint]) -> list[FrontierPoint]:
    """The points no other point dominates (entropy >= and gen_ppl <=, one of them strictly), by entropy."""

    def dominates(a, b):
        return (
            a.entropy >= b.entropy
            and a.gen_ppl <= b.gen_ppl
            and (a.entropy > b.entropy or a.gen_ppl < b.gen_ppl)
        )

    valid = [p for p in points if not (math.isnan(p.entropy) or math.isnan(p.gen_ppl))]
    front = [p for p in valid if not any(dominates(q, p) for q in valid)]
    return sorted(front, key=lambda p: p.entropy)


@dataclasses.dataclass
class Grid:
    """The sampler settings swept: every combination of these."""

    samplers: Sequence[str] = ("ancestral",)
    steps: Sequence[int] = (8, 16, 32, 64)
    temperatures: Sequence[float] = (1.0,)
    precisions: Sequence[str] = ("float64", "float32")


def data_point(config, loaded, scorer, num_samples: int) -> FrontierPoint:
    """The reference: `num_samples` validation rows of train.seq_len tokens scored like samples."""
    from ddlm.data import pipeline
    from ddlm.eval import sample_quality

    it = pipeline.make_iterator(
        config.data,
        loaded.tokenizer,
        "validation",
        global_batch_size=num_samples,
        seq_len=config.train.seq_len,
        seed=config.train.seed,
        sharding=None,
        num_epochs=1,
    )
    rows = [row.tolist() for row in next(it)["tokens"]]
    return FrontierPoint.from_quality("data", sample_quality.sample_quality(scorer, rows, loaded.tokenizer))


def sweep(config, workdir: str, loaded, scorer, grid: Grid, *, num_samples: int, label: str = "") -> list:
    """One point per combination of `grid`, each from num_samples samples (cli.sample_and_score)."""
    from ddlm.eval import cli

    label = label or os.path.basename(os.path.normpath(workdir))
    points = []
    for name, steps, temperature, precision in itertools.product(
        grid.samplers, grid.steps, grid.temperatures, grid.precisions
    ):
        cfg = copy.deepcopy(config)
        with cfg.unlocked():
            cfg.sampler.name, cfg.sampler.steps = name, int(steps)
            cfg.sampler.temperature, cfg.sampler.precision = float(temperature), precision
        tag = f"{name}_{steps}_t{temperature:g}_{precision}"
        q = cli.sample_and_score(
            cfg,
            workdir,
            loaded,
            scorer,
            num_samples=num_samples,
            output_dir=os.path.join(workdir, "eval", "frontier_samples", tag),
        )
        points.append(FrontierPoint.from_quality(label, q))
    return points


def format_points(points: Sequence[FrontierPoint]) -> str:
    front = {id(p) for p in pareto_front([p for p in points if p.label != "data"])}
    header = (
        f"{'':2s}{'label':14s} {'sampler':12s} {'steps':>5s} {'temp':>5s} {'noise':>8s} "
        f"{'entropy':>15s} {'gen. ppl':>17s} {'tokens/s':>10s}"
    )
    lines = [header]
    for p in points:
        lines.append(
            f"{'*' if id(p) in front else ' ':2s}{p.label[:14]:14s} {p.sampler[:12]:12s} {p.steps:5d} "
            f"{p.temperature:5.2f} {p.precision[:8]:>8s} {p.entropy:7.3f} ± {p.entropy_se:5.3f} "
            f"{p.gen_ppl:8.2f} ± {p.gen_ppl_se:6.2f} {p.tokens_per_s:10.0f}"
        )
    lines.append("* on the frontier: no other model point has higher entropy and lower generative perplexity")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _csv(text: str, cast):
    return tuple(cast(x) for x in text.split(",") if x.strip())


def main(argv):
    from absl import flags

    from ddlm.eval import cli, plots

    del argv
    f = flags.FLAGS
    if f.draw:
        workdirs = _csv(f.workdirs or f.workdir or "", str)
        if not workdirs:
            raise ValueError("--draw needs --workdirs=dir1,dir2 (each with eval/frontier.json)")
        points = [p for w in workdirs for p in load(os.path.join(w, "eval", FRONTIER_FILE))]
        out = f.out or os.path.join(workdirs[0], "eval", "frontier.png")
        plots.plot_frontier(points, out)
        print(format_points(points))
        print(f"frontier plot: {out}")
        return
    config = f.config
    if config is None or not f.workdir:
        raise ValueError("--config and --workdir are required (or --draw --workdirs=...)")
    ec = cli.resolve_config(config.eval)
    if not ec.ar_workdir:
        raise ValueError("config.eval.ar_workdir: the frontier needs an AR scorer checkpoint")
    loaded = cli.load_checkpoint(config, f.workdir, ema=ec.use_ema)
    ar_config = cli.load_config_file(ec.ar_config) if ec.ar_config else None
    ar_loaded = cli.load_checkpoint(ar_config, ec.ar_workdir, ema=ec.use_ema)
    ar_config = ar_config or ar_loaded.config
    cli.check_ar_config(ar_config, ec)
    scorer = cli.make_scorer(ar_config, ar_loaded)
    grid = Grid(
        samplers=_csv(f.samplers, str),
        steps=_csv(f.steps, int),
        temperatures=_csv(f.temperatures, float),
        precisions=_csv(f.precisions, str),
    )
    points = sweep(config, f.workdir, loaded, scorer, grid, num_samples=f.num_samples)
    points.append(data_point(config, loaded, scorer, f.num_samples))
    path = os.path.join(f.workdir, "eval", FRONTIER_FILE)
    save(path, points)
    out = f.out or os.path.join(f.workdir, "eval", "frontier.png")
    plots.plot_frontier(points, out)
    print(format_points(points))
    print(f"frontier: {path}, plot: {out}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/*.py[:arg]).")
    flags.DEFINE_string("workdir", None, "The diffusion model's workdir (its latest checkpoint is sampled).")
    flags.DEFINE_string("samplers", "ancestral", "Comma-separated sampler names (ddlm.sampling.SAMPLERS).")
    flags.DEFINE_string("steps", "8,16,32,64", "Comma-separated step counts.")
    flags.DEFINE_string("temperatures", "1.0", "Comma-separated softmax temperatures.")
    flags.DEFINE_string("precisions", "float64,float32", "Comma-separated Gumbel-noise precisions.")
    flags.DEFINE_integer("num_samples", 32, "Samples per point.")
    flags.DEFINE_bool("draw", False, "Only draw the saved frontiers of --workdirs.")
    flags.DEFINE_string("workdirs", "", "With --draw: comma-separated workdirs with eval/frontier.json.")
    flags.DEFINE_string("out", "", "Plot file ('' = <workdir>/eval/frontier.png).")
    app.run(main)
