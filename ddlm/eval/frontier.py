"""The speed-quality frontier: points of (unigram entropy, generative perplexity, tokens/s) over samplers,
step counts, temperatures and noise precisions, against the autoregressive baseline's own samples and the
data itself.

Generative perplexity alone rewards collapsed samples (low temperature, float32 Gumbel noise): a point is
only better than another if it has lower perplexity at no lower entropy, so the frontier is the set of points
no other point beats on both (`pareto_front`), read against the data's own (entropy, perplexity). The AR
baseline (config.eval.ar_workdir, which is also the scorer) samples with its KV cache at the same
temperatures and noise precisions, timed in the same run; `matches_ar` names the cheapest diffusion setting
whose samples match each AR point (same entropy and generative perplexity within their error bars) and its
speed relative to AR. Scoring with the AR model itself favours its own samples: read the AR points as the
target the diffusion model must reach, not as an independent quality judgement.

A sampler is a spec `name[:field=value[:field=value]]` of config.sampler fields, e.g. `ancestral`,
`first_hitting`, `parallel:rule=low_confidence`, `parallel:rule=threshold:threshold=0.9`. Samplers that take
no step count (first_hitting, ar, bd3lm, parallel with an adaptive rule) give one point per temperature and
precision (steps 0; their network calls are in `nfe`).

    grid = Grid(samplers=("ancestral", "parallel:rule=low_confidence"), steps=(32, 64))
    points = sweep(config, workdir, loaded, scorer, grid, num_samples=32)
    points += sweep(ar_config, ar_workdir, ar_loaded, scorer, Grid(samplers=("ar",)), num_samples=32,
                    samples_dir=...)
    save(os.path.join(workdir, "eval", "frontier.json"), points)

Command line (writes <workdir>/eval/frontier.json and frontier.png; `--draw` only redraws saved ones, several
workdirs together):

    python -m ddlm.eval.frontier --config=experiments/quickstart.py --workdir=runs/quickstart \\
        --config.eval.ar_workdir=runs/quickstart_ar \\
        --samplers=ancestral,first_hitting,parallel:rule=low_confidence,parallel:rule=threshold:threshold=0.9 \\
        --steps=32,64,128 --temperatures=1.0,0.8 --precisions=float64,float32 --num_samples=32 --batch_size=8
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


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Grid:
    """The sampler settings swept: every combination of these (module doc for the sampler specs)."""

    samplers: Sequence[str] = ("ancestral",)
    steps: Sequence[int] = (8, 16, 32, 64)
    temperatures: Sequence[float] = (1.0,)
    precisions: Sequence[str] = ("float64", "float32")


def parse_sampler_spec(spec: str) -> tuple[str, dict]:
    """'parallel:rule=threshold:threshold=0.9' -> ('parallel', {'rule': 'threshold', 'threshold': 0.9}).

    Fields are config.sampler fields, cast to the type of their default; an unknown sampler or field, or a
    value of the wrong type, is a ValueError naming the spec."""
    from ddlm import sampling

    name, *items = spec.strip().split(":")
    if name not in sampling.SAMPLERS:
        raise ValueError(
            f"--samplers: {spec!r}: unknown sampler {name!r}; expected one of {sampling.SAMPLERS}"
        )
    defaults = sampling.default_config()
    fields = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or key not in defaults or key in ("name", "steps", "temperature", "precision"):
            raise ValueError(
                f"--samplers: {spec!r}: {item!r} is not field=value of a config.sampler field other than "
                f"name/steps/temperature/precision (the grid sets those)"
            )
        default = defaults[key]
        try:
            if isinstance(default, bool):
                fields[key] = value.lower() in ("1", "true", "yes")
            else:
                fields[key] = type(default)(value)
        except ValueError:
            raise ValueError(
                f"--samplers: {spec!r}: {key}={value!r} is not a {type(default).__name__}"
            ) from None
    return name, fields


def uses_steps(sampler_config) -> bool:
    """Whether the sampler's network calls are set by config.sampler.steps: not for first_hitting (one call per
    token), ar / bd3lm (one per token or block; bd3lm's block sampler aside) nor parallel's adaptive rules."""
    from ddlm.sampling import rules

    name = sampler_config.name
    if name in ("first_hitting", "ar"):
        return False
    if name == "bd3lm":  # steps are those of the sampler run inside each block
        return uses_steps(dict_config(sampler_config, name=sampler_config.block_sampler))
    if name == "parallel":
        return rules.get_rule(sampler_config.rule).fixed_count
    return True


def dict_config(sampler_config, **fields):
    """A copy of a sampler ConfigDict with `fields` set."""
    out = copy.deepcopy(sampler_config)
    with out.unlocked():
        for k, v in fields.items():
            out[k] = v
    return out


def sampler_settings(grid: Grid, base_sampler) -> list[tuple[str, object, int]]:
    """(spec, config.sampler, steps) for every point of the grid on top of `base_sampler`; samplers that take
    no step count appear once per temperature and precision, with steps 0."""
    from ddlm.sampling import config as sampling_config

    out, seen = [], set()
    for spec, steps, temperature, precision in itertools.product(
        grid.samplers, grid.steps, grid.temperatures, grid.precisions
    ):
        name, fields = parse_sampler_spec(spec)
        sc = dict_config(
            sampling_config.resolve(base_sampler),
            name=name,
            temperature=float(temperature),
            precision=precision,
            **fields,
        )
        steps = int(steps) if uses_steps(sc) else 0
        if steps:
            sc.steps = steps
        key = (spec, steps, float(temperature), precision)
        if key not in seen:
            seen.add(key)
            out.append((spec, sc, steps))
    return out


def sweep(
    config,
    workdir: str,
    loaded,
    scorer,
    grid: Grid,
    *,
    num_samples: int,
    label: str = "",
    batch_size: int = 0,
    samples_dir: str = "",
) -> list[FrontierPoint]:
    """One point per setting of `grid` (sampler_settings), each from num_samples samples of the checkpoint
    `loaded` (cli.sample_and_score), timed one after another in this process. batch_size: sequences per
    sampling call (0 = config.sampler.batch_size); samples_dir: where the samples go (default
    <workdir>/eval/frontier_samples)."""
    from ddlm.eval import cli

    label = label or os.path.basename(os.path.normpath(workdir))
    samples_dir = samples_dir or os.path.join(workdir, "eval", "frontier_samples")
    points = []
    for spec, sc, steps in sampler_settings(grid, config.sampler):
        cfg = copy.deepcopy(config)
        with cfg.unlocked():
            cfg.sampler = sc
            if batch_size:
                cfg.sampler.batch_size = batch_size
        tag = f"{label}_{spec.replace(':', '_').replace('=', '')}_{steps}_t{sc.temperature:g}_{sc.precision}"
        q = cli.sample_and_score(
            cfg, workdir, loaded, scorer, num_samples=num_samples, output_dir=os.path.join(samples_dir, tag)
        )
        q.update(sampler=spec, steps=steps)
        points.append(FrontierPoint.from_quality(label, q))
    return points


# --------------------------------------------------------------------------------------------
# Diffusion against the autoregressive baseline
# --------------------------------------------------------------------------------------------


def _close(a: float, b: float, se_a: float, se_b: float, z: float) -> bool:
    return abs(a - b) <= z * math.sqrt(se_a**2 + se_b**2)


def matches_ar(points: Sequence[FrontierPoint], ar_sampler: str = "ar", z: float = 2.0) -> list[dict]:
    """For each AR point (sampler `ar_sampler`): the diffusion points that match it, i.e. whose unigram
    entropy is within z combined standard errors of the AR point's and whose generative perplexity is not
    worse by more than z combined standard errors (lower is fine), and the cheapest of them (fewest network
    calls, then most tokens/s).

    Returns one dict per AR point: {'ar': point, 'matches': [points], 'best': point or None,
    'speed_ratio': best.tokens_per_s / ar.tokens_per_s or nan}."""
    ar_points = [p for p in points if p.sampler == ar_sampler]
    others = [p for p in points if p.sampler not in (ar_sampler, "") and p.label != "data"]
    out = []
    for a in ar_points:
        found = [
            d
            for d in others
            if _close(d.entropy, a.entropy, d.entropy_se, a.entropy_se, z)
            and d.gen_ppl - a.gen_ppl <= z * math.sqrt(d.gen_ppl_se**2 + a.gen_ppl_se**2)
        ]
        best = min(found, key=lambda d: (d.nfe, -d.tokens_per_s)) if found else None
        ratio = best.tokens_per_s / a.tokens_per_s if best is not None and a.tokens_per_s > 0 else math.nan
        out.append({"ar": a, "matches": found, "best": best, "speed_ratio": ratio})
    return out


# --------------------------------------------------------------------------------------------
# Text output
# --------------------------------------------------------------------------------------------


def short_name(spec: str) -> str:
    """'parallel:rule=threshold:threshold=0.9' -> 'parallel(threshold,0.9)'; a bare name stays as it is."""
    name, *items = spec.split(":")
    return f"{name}({','.join(i.partition('=')[2] for i in items)})" if items else name


def point_name(p: FrontierPoint) -> str:
    steps = f"{p.steps} steps" if p.steps else f"NFE {p.nfe:g}"
    return f"{p.label} {short_name(p.sampler)} {steps} T={p.temperature:g} {p.precision}"


def format_points(points: Sequence[FrontierPoint]) -> str:
    front = {id(p) for p in pareto_front([p for p in points if p.label != "data"])}
    header = (
        f"{'':2s}{'label':14s} {'sampler':28s} {'steps':>5s} {'NFE':>5s} {'temp':>5s} {'noise':>8s} "
        f"{'entropy':>15s} {'gen. ppl':>17s} {'tokens/s':>10s}"
    )
    lines = [header]
    for p in points:
        steps = f"{p.steps:5d}" if p.steps else f"{'-':>5s}"
        nfe = f"{'-':>5s}" if math.isnan(p.nfe) else f"{p.nfe:5.0f}"
        lines.append(
            f"{'*' if id(p) in front else ' ':2s}{p.label[:14]:14s} {short_name(p.sampler)[:28]:28s} {steps} "
            f"{nfe} {p.temperature:5.2f} {p.precision[:8]:>8s} {p.entropy:7.3f} ± {p.entropy_se:5.3f} "
            f"{p.gen_ppl:8.2f} ± {p.gen_ppl_se:6.2f} {p.tokens_per_s:10.0f}"
        )
    lines.append("* on the frontier: no other model point has higher entropy and lower generative perplexity")
    for m in matches_ar(points):
        a = m["ar"]
        if m["best"] is None:
            lines.append(f"{point_name(a)}: no diffusion point matches its entropy and generative perplexity")
        else:
            lines.append(
                f"{point_name(a)}: matched by {len(m['matches'])} point(s); cheapest {point_name(m['best'])} "
                f"at {m['speed_ratio']:.2f}x its tokens/s"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _csv(text: str, cast):
    return tuple(cast(x) for x in text.split(",") if x.strip())


def _draw(points, out: str, tensorboard_dir: str = "") -> None:
    from ddlm.eval import plots

    fig = plots.plot_frontier(points, out)
    if tensorboard_dir:
        plots.write_tensorboard(tensorboard_dir, {"frontier": fig})


def main(argv):
    from absl import flags

    from ddlm.eval import cli

    del argv
    f = flags.FLAGS
    if f.draw:
        workdirs = _csv(f.workdirs or f.workdir or "", str)
        if not workdirs:
            raise ValueError("--draw needs --workdirs=dir1,dir2 (each with eval/frontier.json)")
        points = [p for w in workdirs for p in load(os.path.join(w, "eval", FRONTIER_FILE))]
        out = f.out or os.path.join(workdirs[0], "eval", "frontier.png")
        _draw(points, out, os.path.join(workdirs[0], "tensorboard") if f.tensorboard else "")
        print(format_points(points))
        print(f"frontier plot: {out}")
        return
    config = f.config
    if config is None or not f.workdir:
        raise ValueError("--config and --workdir are required (or --draw --workdirs=...)")
    if f.batch_size < 0 or f.num_samples < 1:
        raise ValueError(
            f"--batch_size must be >= 0 and --num_samples >= 1, got {f.batch_size}, {f.num_samples}"
        )
    ec = cli.resolve_config(config.eval)
    if not ec.ar_workdir:
        raise ValueError("config.eval.ar_workdir: the frontier needs an AR scorer checkpoint")
    grid = Grid(
        samplers=_csv(f.samplers, str),
        steps=_csv(f.steps, int),
        temperatures=_csv(f.temperatures, float),
        precisions=_csv(f.precisions, str),
    )
    sampler_settings(grid, config.sampler)  # a bad --samplers spec fails before anything is loaded
    loaded = cli.load_checkpoint(config, f.workdir, ema=ec.use_ema)
    ar_config = cli.load_config_file(ec.ar_config) if ec.ar_config else None
    ar_loaded = cli.load_checkpoint(ar_config, ec.ar_workdir, ema=ec.use_ema)
    ar_config = ar_config or ar_loaded.config
    cli.check_ar_config(ar_config, ec)
    scorer = cli.make_scorer(ar_config, ar_loaded)
    samples_dir = os.path.join(f.workdir, "eval", "frontier_samples")
    common = {"num_samples": f.num_samples, "batch_size": f.batch_size, "samples_dir": samples_dir}
    points = sweep(config, f.workdir, loaded, scorer, grid, **common)
    if f.ar:  # the AR baseline's own samples, timed in this same run
        ar_grid = Grid(
            samplers=("ar",), steps=(0,), temperatures=grid.temperatures, precisions=grid.precisions
        )
        points += sweep(ar_config, ec.ar_workdir, ar_loaded, scorer, ar_grid, **common)
    points.append(data_point(config, loaded, scorer, f.num_samples))
    path = os.path.join(f.workdir, "eval", FRONTIER_FILE)
    save(path, points)
    out = f.out or os.path.join(f.workdir, "eval", "frontier.png")
    _draw(points, out, os.path.join(f.workdir, "tensorboard") if f.tensorboard else "")
    print(format_points(points))
    print(f"frontier: {path}, plot: {out}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/*.py[:arg]).")
    flags.DEFINE_string("workdir", None, "The diffusion model's workdir (its latest checkpoint is sampled).")
    flags.DEFINE_string(
        "samplers",
        "ancestral",
        "Comma-separated sampler specs name[:field=value...] (module doc), e.g. "
        "ancestral,first_hitting,parallel:rule=low_confidence,parallel:rule=threshold:threshold=0.9.",
    )
    flags.DEFINE_string("steps", "8,16,32,64", "Comma-separated step counts (for samplers that take steps).")
    flags.DEFINE_string("temperatures", "1.0", "Comma-separated softmax temperatures.")
    flags.DEFINE_string("precisions", "float64,float32", "Comma-separated Gumbel-noise precisions.")
    flags.DEFINE_integer("num_samples", 32, "Samples per point.")
    flags.DEFINE_integer("batch_size", 0, "Samples per sampling call, every point alike (0 = each config's).")
    flags.DEFINE_bool(
        "ar", True, "Also the AR baseline's own samples (ar sampler, KV cache) at each temperature."
    )
    flags.DEFINE_bool("draw", False, "Only draw the saved frontiers of --workdirs.")
    flags.DEFINE_string("workdirs", "", "With --draw: comma-separated workdirs with eval/frontier.json.")
    flags.DEFINE_string("out", "", "Plot file ('' = <workdir>/eval/frontier.png).")
    flags.DEFINE_bool("tensorboard", False, "Also write the plot as an image to <workdir>/tensorboard.")
    app.run(main)
