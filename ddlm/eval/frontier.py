"""The speed-quality frontier: points (ddlm.eval.frontier_points) of (unigram entropy, generative perplexity,
tokens/s) over samplers, step counts, temperatures and noise precisions, against the autoregressive
baseline's own samples and the data itself.

The AR baseline (config.eval.ar_workdir) is also the scorer of every sample: it is needed with --ar=false
too, which leaves out only its own samples (KV cache, at the same temperatures and noise precisions, timed
in the same run). frontier_points says how the points are read (Pareto front, matches_ar).

A sampler is a spec `name[:field=value[:field=value]]` of config.sampler fields, e.g. `ancestral`,
`first_hitting`, `parallel:rule=low_confidence`, `parallel:rule=threshold:threshold=0.9`. Samplers that take
no step count (first_hitting, ar, bd3lm, parallel with an adaptive rule) give one point per temperature and
precision (steps 0; their network calls are in `nfe`). A spec is the user's text: its samples folder under
<workdir>/eval/frontier_samples is made of it with every other character than letters, digits and '._=,-'
replaced, and checked to stay there.

    grid = Grid(samplers=("ancestral", "parallel:rule=low_confidence"), steps=(32, 64))
    points = sweep(config, workdir, loaded, scorer, grid, num_samples=32)
    points += sweep(ar_config, ar_workdir, ar_loaded, scorer, Grid(samplers=("ar",)), num_samples=32,
                    samples_dir=...)
    save(os.path.join(workdir, "eval", "frontier.json"), points)

Command line (writes <workdir>/eval/frontier.json and frontier.png; `--draw` only redraws saved ones, several
workdirs together); a mistake in its flags is one line (ddlm.command) before anything is loaded; other
libraries' log lines show from --log_level (warning) up, and compiled programs come from JAX's persistent
compilation cache where an earlier sweep compiled them (--nocompilation_cache: off; ddlm.compilation_cache):

    python -m ddlm.eval.frontier --config=experiments/quickstart.py --workdir=runs/quickstart \\
        --config.eval.ar_workdir=runs/quickstart_ar \\
        --samplers=ancestral,first_hitting,parallel:rule=low_confidence,parallel:rule=threshold:threshold=0.9 \\
        --steps=32,64,128 --temperatures=1.0,0.8 --precisions=float64,float32 --num_samples=32 --batch_size=8
    python -m ddlm.eval.frontier --draw --workdirs=runs/quickstart,runs/other --out=frontier.png
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import os
from collections.abc import Sequence

from ddlm import command, paths
from ddlm.eval.frontier_points import FRONTIER_FILE, FrontierPoint, format_points, load, save


def data_point(config, loaded, scorer, num_samples: int) -> FrontierPoint:
    """The reference: `num_samples` validation rows of train.seq_len tokens scored like samples."""
    from ddlm.eval import cli, sample_quality

    rows = cli.validation_rows(config, loaded.tokenizer, num_samples)
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


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
# config.sampler fields a spec may not set: the grid and the sweep's flags set them.
SWEPT_FIELDS = ("name", "steps", "temperature", "precision", "num_samples", "output_dir")


def parse_sampler_spec(spec: str) -> tuple[str, dict]:
    """'parallel:rule=threshold:threshold=0.9' -> ('parallel', {'rule': 'threshold', 'threshold': 0.9}).

    Fields are config.sampler fields, cast to the type of their default; an unknown sampler or field, a field
    the sweep sets (SWEPT_FIELDS), or a value of the wrong type, is a FlagError (a ValueError) naming the
    spec."""
    from ddlm import sampling

    name, *items = spec.strip().split(":")
    if name not in sampling.SAMPLERS:
        raise command.FlagError(
            f"--samplers: {spec!r}: unknown sampler {name!r}; expected one of {sampling.SAMPLERS}"
        )
    defaults = sampling.default_config()
    fields = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or key not in defaults or key in SWEPT_FIELDS:
            raise command.FlagError(
                f"--samplers: {spec!r}: {item!r} is not field=value of a config.sampler field other than "
                f"{'/'.join(SWEPT_FIELDS)} (the sweep sets those)"
            )
        default = defaults[key]
        try:
            if isinstance(default, bool):
                if value.lower() not in _BOOLS:
                    raise ValueError(value)
                fields[key] = _BOOLS[value.lower()]
            else:
                fields[key] = type(default)(value)
        except ValueError:
            raise command.FlagError(
                f"--samplers: {spec!r}: {key}={value!r} is not a {type(default).__name__}"
            ) from None
    return name, fields


def uses_steps(sampler_config) -> bool:
    """Whether the sampler's network calls are set by config.sampler.steps (ddlm.sampling.cli.uses_steps: not
    for first_hitting, ar, bd3lm over such a block sampler, nor parallel's adaptive rules)."""
    from ddlm.sampling import cli as sampling_cli

    return sampling_cli.uses_steps(sampler_config)


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
    mauve=None,
) -> list[FrontierPoint]:
    """One point per setting of `grid` (sampler_settings), each from num_samples samples of the checkpoint
    `loaded` (cli.sample_and_score), timed one after another in this process. batch_size: sequences per
    sampling call (0 = config.sampler.batch_size); samples_dir: where the samples go (default
    <workdir>/eval/frontier_samples); mauve: (judge, reference texts, seeds), each point's MAUVE
    (cli.sample_and_score)."""
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
        q = cli.sample_and_score(
            cfg,
            workdir,
            loaded,
            scorer,
            num_samples=num_samples,
            output_dir=samples_folder(samples_dir, label, spec, steps, sc),
            **({"mauve": mauve} if mauve is not None else {}),
        )
        q.update(sampler=spec, steps=steps)
        points.append(FrontierPoint.from_quality(label, q))
    return points


def samples_folder(samples_dir: str, label: str, spec: str, steps: int, sampler_config) -> str:
    """<samples_dir>/<label>_<spec>_<steps>_t<temperature>_<precision>, a spec's characters other than
    letters, digits and '._=,-' replaced (a prompt in a spec is the user's text: '/' or '..' in it must
    not lead out of samples_dir; ddlm.paths.inside checks that too)."""
    sc = sampler_config
    tag = f"{label}_{spec.replace(':', '_').replace('=', '')}_{steps}_t{sc.temperature:g}_{sc.precision}"
    return paths.inside(samples_dir, paths.folder_name(tag))


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _csv(flag: str, text: str, cast, what: str) -> tuple:
    """The comma-separated values of --flag, each cast; a FlagError naming the flag for an empty list or a
    value that is not `what`."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    try:
        values = tuple(cast(x) for x in items)
    except ValueError:
        raise command.FlagError(f"--{flag}={text!r}: expected comma-separated {what}") from None
    if not values:
        raise command.FlagError(f"--{flag} is empty: expected comma-separated {what}")
    return values


def grid_from_flags(samplers: str, steps: str, temperatures: str, precisions: str) -> Grid:
    """The Grid of the command line's comma-separated lists; a FlagError naming the flag for an empty list,
    a value of the wrong type or a step count < 1 (config.sampler.validate checks the rest, check_grid)."""
    grid = Grid(
        samplers=_csv("samplers", samplers, str, "sampler specs (module doc)"),
        steps=_csv("steps", steps, int, "integers"),
        temperatures=_csv("temperatures", temperatures, float, "numbers"),
        precisions=_csv("precisions", precisions, str, "Gumbel-noise precisions"),
    )
    if min(grid.steps) < 1:
        raise command.FlagError(
            f"--steps={steps}: every step count must be >= 1 (samplers that take none ignore it)"
        )
    return grid


def check_grid(
    grid: Grid, base_sampler, *, diffusion=None, seq_len: int | None = None, what: str = ""
) -> None:
    """config.sampler.validate of every setting of `grid` over base_sampler (and, given, against the loss and
    the length), before anything is loaded: a FlagError naming the setting (`what`, default its spec) and
    the field (e.g. a temperature of 0 for a sampler that cannot be greedy)."""
    from ddlm.sampling import config as sampling_config

    for spec, sc, steps in sampler_settings(grid, base_sampler):
        try:
            sampling_config.validate(sc, diffusion=diffusion, seq_len=seq_len)
        except ValueError as e:
            raise command.FlagError(
                f"{what or '--samplers=' + spec} with --steps={steps}, --temperatures={sc.temperature:g}, "
                f"--precisions={sc.precision}: {e}"
            ) from None


def _draw(points, out: str, tensorboard_dir: str = "") -> None:
    from ddlm.eval import plots

    fig = plots.plot_frontier(points, out)
    if tensorboard_dir:
        plots.write_tensorboard(tensorboard_dir, {"frontier": fig})


def _check_out(out: str) -> None:
    """A FlagError unless --out names an image file matplotlib writes (checked before the sweep)."""
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = FigureCanvasBase.get_supported_filetypes()
    if out and (os.path.isdir(out) or os.path.splitext(out)[1][1:].lower() not in kinds):
        raise command.FlagError(f"--out={out}: expected an image file named *.png (or {', '.join(kinds)})")


def _check_workdir(flag: str, workdir: str) -> None:
    if not paths.is_remote(workdir) and not os.path.isdir(workdir):
        raise command.FlagError(f"{flag}={workdir} is not a directory (expected a workdir with a checkpoint)")


def draw_saved(workdirs: Sequence[str], out: str, tensorboard: bool) -> None:
    """--draw: the saved frontiers of `workdirs` in one plot, and their table."""
    if not workdirs:
        raise command.FlagError("--draw needs --workdirs=dir1,dir2 (each with eval/frontier.json)")
    points = [p for w in workdirs for p in load(os.path.join(w, "eval", FRONTIER_FILE))]
    if not points:
        raise ValueError(f"no frontier points in the eval/{FRONTIER_FILE} of {', '.join(workdirs)}")
    out = out or os.path.join(workdirs[0], "eval", "frontier.png")
    _draw(points, out, os.path.join(workdirs[0], "tensorboard") if tensorboard else "")
    print(format_points(points))
    print(f"frontier plot: {out}")


def run(f) -> None:
    """The command line (module doc) with the parsed flags `f`; every mistake in them is a FlagError raised
    before a checkpoint is loaded."""
    from ddlm.eval import cli
    from ddlm.sampling import config as sampling_config

    _check_out(f.out)
    if f.draw:
        return draw_saved([w for w in (f.workdirs or f.workdir or "").split(",") if w], f.out, f.tensorboard)
    config = f.config
    if config is None or not f.workdir:
        raise command.FlagError("--config and --workdir are required (or --draw --workdirs=...)")
    mauve_seeds = getattr(f, "mauve_seeds", 0)  # a flags object made without it (tests): off
    if mauve_seeds < 0 or (mauve_seeds and f.num_samples < 2):
        raise command.FlagError(f"--mauve_seeds={mauve_seeds}: expected >= 0 (0 = off), with --num_samples >= 2")
    if f.batch_size < 0 or f.num_samples < 1:
        raise command.FlagError(
            f"--batch_size must be >= 0 and --num_samples >= 1, got {f.batch_size}, {f.num_samples}"
        )
    ec = cli.resolve_config(config.eval)
    if not ec.ar_workdir:
        raise command.FlagError(
            "--config.eval.ar_workdir is not set: the frontier scores every sample with that AR checkpoint "
            "(generative perplexity), with --ar=false too (which leaves out only the AR model's own samples)"
        )
    _check_workdir("--workdir", f.workdir)
    _check_workdir("--config.eval.ar_workdir", ec.ar_workdir)
    grid = grid_from_flags(f.samplers, f.steps, f.temperatures, f.precisions)
    # Every setting is checked before anything is loaded; the AR baseline's against its own loss later.
    seq_len = config.sampler.seq_len or config.train.seq_len
    check_grid(grid, config.sampler, diffusion=config.diffusion, seq_len=seq_len)
    ar_grid = Grid(samplers=("ar",), steps=(0,), temperatures=grid.temperatures, precisions=grid.precisions)
    if f.ar:  # its temperatures and precisions (the rest of its sampler config is the AR checkpoint's)
        check_grid(ar_grid, sampling_config.default_config(), what="the AR baseline (--ar)")
    loaded = cli.load_checkpoint(config, f.workdir, ema=ec.use_ema)
    ar_config = cli.load_config_file(ec.ar_config) if ec.ar_config else None
    ar_loaded = cli.load_checkpoint(ar_config, ec.ar_workdir, ema=ec.use_ema)
    ar_config = ar_config or ar_loaded.config
    cli.check_ar_config(ar_config, ec)
    scorer = cli.make_scorer(ar_config, ar_loaded)
    samples_dir = os.path.join(f.workdir, "eval", "frontier_samples")
    common = {"num_samples": f.num_samples, "batch_size": f.batch_size, "samples_dir": samples_dir}
    if mauve_seeds:  # MAUVE of every point against as many validation rows, judged by the AR checkpoint
        from ddlm.eval import mauve as mauve_lib

        references = cli.reference_texts(config, loaded.tokenizer, f.num_samples)
        common["mauve"] = (mauve_lib.Judge.from_loaded(ar_loaded), references, mauve_seeds)
    points = sweep(config, f.workdir, loaded, scorer, grid, **common)
    if f.ar:  # the AR baseline's own samples, timed in this same run
        points += sweep(ar_config, ec.ar_workdir, ar_loaded, scorer, ar_grid, **common)
    points.append(data_point(config, loaded, scorer, f.num_samples))
    path = os.path.join(f.workdir, "eval", FRONTIER_FILE)
    save(path, points)
    out = f.out or os.path.join(f.workdir, "eval", "frontier.png")
    _draw(points, out, os.path.join(f.workdir, "tensorboard") if f.tensorboard else "")
    print(format_points(points))
    print(f"frontier: {path}, plot: {out}")


def main(argv):
    from absl import flags, logging

    from ddlm import compilation_cache, logs

    del argv  # command.parse_flags refused positional arguments
    logs.quiet_other_loggers(flags.FLAGS.log_level)  # orbax's ~95 INFO lines per sweep stay out
    if not flags.FLAGS.draw:  # drawing compiles nothing
        compilation_cache.enable(flags.FLAGS.compilation_cache)
    with command.one_line_errors():
        run(flags.FLAGS)
    if not flags.FLAGS.draw:
        logging.info(compilation_cache.summary())


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Experiment config file (experiments/*.py[:arg])."
    )
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
    flags.DEFINE_integer("mauve_seeds", 0, "MAUVE of every point against the data, over this many k-means seeds (0 = off).")
    command.define_log_level_flag()
    command.define_compilation_cache_flag()
    app.run(main, flags_parser=functools.partial(command.parse_flags, config=_CONFIG))
