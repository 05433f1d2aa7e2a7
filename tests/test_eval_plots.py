"""ddlm.eval.frontier_points (the points, their Pareto front, the file), ddlm.eval.frontier's sampler specs and
ddlm.eval.plots (PNG files whose plotted data are the recorded values) on hand-made inputs."""

import json
import math
import os

import matplotlib.image
import pytest

from ddlm.eval import frontier, frontier_points, plots


def point(
    label, entropy, ppl, steps=8, precision="float64", tps=100.0, sampler=None, temperature=1.0, nfe=None
):
    return frontier_points.FrontierPoint(
        label=label,
        sampler=sampler if sampler is not None else ("ancestral" if label != "data" else ""),
        steps=steps,
        temperature=temperature,
        precision=precision,
        entropy=entropy,
        entropy_se=0.05,
        gen_ppl=ppl,
        gen_ppl_se=0.5,
        tokens_per_s=tps,
        nfe=steps if nfe is None else nfe,
        samples=16,
    )


def test_pareto_front_keeps_exactly_the_undominated_points():
    a, b, c, d = point("m", 5.0, 10.0), point("m", 4.0, 8.0), point("m", 4.0, 12.0), point("m", 6.0, 30.0)
    twin = point("m", 5.0, 10.0, steps=16)  # equal to a: neither dominates the other
    worse = point("m", 3.0, 50.0)
    nan = point("m", float("nan"), 5.0)
    front = frontier_points.pareto_front([a, b, c, d, twin, worse, nan])
    assert [(p.entropy, p.gen_ppl) for p in front] == [(4.0, 8.0), (5.0, 10.0), (5.0, 10.0), (6.0, 30.0)]
    assert c not in front and worse not in front


def test_frontier_file_round_trip_and_bad_file(tmp_path):
    pts = [point("m", 5.0, 10.0), point("data", 5.5, 9.0, steps=0, tps=float("nan"))]
    path = str(tmp_path / "eval" / "frontier.json")
    frontier_points.save(path, pts)
    back = frontier_points.load(path)
    assert json.dumps([vars(p) for p in back]) == json.dumps([vars(p) for p in pts])  # nan == nan here
    assert back[1].label == "data" and math.isnan(back[1].tokens_per_s)
    (tmp_path / "bad.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a frontier file"):
        frontier_points.load(str(tmp_path / "bad.json"))
    text = frontier_points.format_points(pts)
    assert text.splitlines()[1].startswith("* ")  # (5, 10) is on the front of the model points


def write_run(workdir):
    os.makedirs(workdir / "eval")
    records = [
        {"step": 10, "split": "train", "loss": 3.0},
        {"step": 20, "split": "train", "loss": 9.0},  # overwritten by the rerun of step 20 below
        {"step": 20, "split": "train", "loss": 2.5},
        {"step": 20, "split": "eval", "bits_per_token": 3.5, "bits_per_token_se": 0.1},
        {"step": 30, "split": "train", "loss": 2.0},
    ]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pts = [point("run", 4.0, 20.0, 4), point("run", 4.5, 15.0, 8), point("run", 3.5, 12.0, 8, "float32")]
    frontier_points.save(
        str(workdir / "eval" / "frontier.json"), pts + [point("data", 4.8, 10.0, 0, tps=float("nan"))]
    )


def test_plots_write_pngs_of_the_recorded_values(tmp_path):
    workdir = tmp_path / "run"
    write_run(workdir)
    records = plots.read_metrics(str(workdir))
    assert [r["loss"] for r in records if r["split"] == "train"] == [3.0, 2.5, 2.0]
    fig = plots.plot_loss_curves({"run": records})
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == [10, 20, 30] and list(line.get_ydata()) == [3.0, 2.5, 2.0]
    assert list(fig.axes[1].lines[0].get_ydata()) == [3.5]

    fig = plots.plot_frontier(frontier_points.load(str(workdir / "eval" / "frontier.json")))
    xy = {(tuple(ln.get_xdata()), tuple(ln.get_ydata())) for ln in fig.axes[0].lines}
    assert ((4.0, 4.5), (20.0, 15.0)) in xy  # the float64 line through its steps
    assert ((4.8,), (10.0,)) in xy  # the data star

    out = tmp_path / "plots"
    written = plots.make_plots([str(workdir)], str(out), tensorboard=True)
    assert sorted(os.path.basename(p) for p in written) == ["frontier.png", "loss_curves.png", "speed.png"]
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        h, w = matplotlib.image.imread(path).shape[:2]
        assert h > 200 and w > 300
    events = os.listdir(workdir / "tensorboard")
    with open(workdir / "tensorboard" / events[0], "rb") as f:
        assert b"plots/frontier" in f.read()
    with pytest.raises(ValueError, match="metrics.jsonl does not exist"):
        plots.read_metrics(str(tmp_path))


def test_sampler_specs_and_the_settings_they_expand_to():
    """A spec sets config.sampler fields (typed); samplers without a step count give one setting per
    temperature and precision; a bad spec is one ValueError naming it."""
    from ddlm.sampling import config as sampling_config

    assert frontier.parse_sampler_spec("parallel:rule=threshold:threshold=0.85") == (
        "parallel",
        {"rule": "threshold", "threshold": 0.85},
    )
    assert frontier.parse_sampler_spec("ancestral") == ("ancestral", {})
    for bad, match in (
        ("nope", "unknown sampler"),
        ("parallel:rule", "field=value"),
        ("parallel:colour=red", "field=value"),
        ("parallel:steps=4", "field=value"),  # the grid sets steps
        ("parallel:threshold=high", "not a float"),
    ):
        with pytest.raises(ValueError, match=match):
            frontier.parse_sampler_spec(bad)

    grid = frontier.Grid(
        samplers=("ancestral", "first_hitting", "parallel:rule=low_confidence", "parallel:rule=threshold"),
        steps=(32, 64),
        temperatures=(1.0, 0.8),
        precisions=("float64",),
    )
    base = sampling_config.default_config()
    base.batch_size = 3  # kept from the experiment's own sampler config
    got = [
        (spec, sc.name, steps, sc.temperature) for spec, sc, steps in frontier.sampler_settings(grid, base)
    ]
    assert got == [
        ("ancestral", "ancestral", 32, 1.0),
        ("ancestral", "ancestral", 32, 0.8),
        ("ancestral", "ancestral", 64, 1.0),
        ("ancestral", "ancestral", 64, 0.8),
        ("first_hitting", "first_hitting", 0, 1.0),
        ("first_hitting", "first_hitting", 0, 0.8),
        ("parallel:rule=low_confidence", "parallel", 32, 1.0),
        ("parallel:rule=low_confidence", "parallel", 32, 0.8),
        ("parallel:rule=low_confidence", "parallel", 64, 1.0),
        ("parallel:rule=low_confidence", "parallel", 64, 0.8),
        ("parallel:rule=threshold", "parallel", 0, 1.0),
        ("parallel:rule=threshold", "parallel", 0, 0.8),
    ]
    settings = frontier.sampler_settings(grid, base)
    assert all(sc.batch_size == 3 for _, sc, _ in settings)
    assert [sc.steps for _, sc, _ in settings[6:10]] == [32, 32, 64, 64]
    assert {sc.rule for _, sc, _ in settings[10:]} == {"threshold"}
    ar = frontier.sampler_settings(frontier.Grid(samplers=("ar",), steps=(0,)), base)
    assert [(s, steps, sc.precision) for s, sc, steps in ar] == [("ar", 0, "float64"), ("ar", 0, "float32")]
    assert not frontier.uses_steps(frontier.dict_config(base, name="bd3lm", block_sampler="first_hitting"))
    assert frontier.uses_steps(frontier.dict_config(base, name="bd3lm", block_sampler="ancestral"))


def test_matches_ar_finds_the_cheapest_diffusion_point_within_the_error_bars():
    """SEs are 0.05 (entropy) and 0.5 (gen. ppl) everywhere, so the tolerances at z = 2 are 2 * sqrt(2) times
    those: 0.141 nats and 1.41 in perplexity (a lower perplexity always passes)."""
    ar = point("ar", 3.00, 7.0, steps=0, sampler="ar", tps=1000.0, nfe=127)
    cheap = point("mdlm", 3.10, 8.3, steps=32, tps=400.0)  # within both tolerances, 32 calls
    costly = point("mdlm", 2.95, 5.0, steps=128, tps=100.0)  # much better perplexity, 128 calls
    # More tokens/s than `cheap` (a noisy timing) but 64 calls: the cheapest is the one with fewest calls.
    fast = point("mdlm", 3.05, 7.5, steps=0, sampler="first_hitting", tps=600.0, nfe=64)
    too_high_ppl = point("mdlm", 3.00, 8.5, steps=16, tps=800.0)  # 1.5 worse: out
    too_low_entropy = point("mdlm", 2.85, 5.0, steps=8, tps=900.0)  # 0.15 nats away: out
    data = point("data", 3.0, 7.0, steps=0, sampler="", tps=float("nan"))
    (m,) = frontier_points.matches_ar([ar, fast, cheap, costly, too_high_ppl, too_low_entropy, data])
    assert m["ar"] is ar and m["matches"] == [fast, cheap, costly] and m["best"] is cheap
    assert m["speed_ratio"] == pytest.approx(0.4)
    ar_cold = point("ar", 2.0, 3.0, steps=0, sampler="ar", temperature=0.5, nfe=127)
    assert frontier_points.matches_ar([ar_cold, cheap, costly])[0]["best"] is None
    text = frontier_points.format_points([ar, cheap, costly, ar_cold, data])
    assert "cheapest mdlm ancestral 32 steps T=1 float64 at 0.40x its tokens/s" in text
    assert "ar ar NFE 127 T=0.5 float64: no diffusion point matches" in text


def test_frontier_plot_joins_steps_and_temperatures():
    """A stepped sampler is one line per temperature through its steps; AR (no steps) one line through its
    temperatures, drawn with squares."""
    pts = [
        point("m", 4.0, 20.0, 16),
        point("m", 4.2, 15.0, 32),
        point("m", 3.5, 12.0, 16, temperature=0.8),
        point("ar", 4.1, 9.0, 0, sampler="ar", nfe=127),
        point("ar", 3.6, 6.0, 0, sampler="ar", temperature=0.8, nfe=127),
    ]
    fig = plots.plot_frontier(pts)
    lines = {(tuple(ln.get_xdata()), tuple(ln.get_ydata())): ln.get_marker() for ln in fig.axes[0].lines}
    assert lines[((4.0, 4.2), (20.0, 15.0))] == "o" and lines[((3.5,), (12.0,))] == "o"
    assert lines[((3.6, 4.1), (6.0, 9.0))] == "s"  # sorted by temperature: 0.8, then 1.0


def test_a_metrics_file_without_records_or_with_a_damaged_line_is_one_error_naming_it(tmp_path):
    cases = {
        "empty": ("", r"metrics.jsonl holds no records"),
        "blank": ("\n\n", r"metrics.jsonl holds no records"),
        "garbage": ('{"step": 1, "split": "train", "loss": 2}\n{"step": 2, "spl', r"metrics.jsonl:2: not a metrics record"),
        "no_step": ('{"split": "train", "loss": 2}\n', r"metrics.jsonl:1: not a metrics record .*integer 'step'"),
        "float_step": ('{"step": 1.5, "split": "train"}\n', r"metrics.jsonl:1: not a metrics record"),
        "not_object": ("[1, 2]\n", r"metrics.jsonl:1: not a metrics record"),
    }  # fmt: skip
    for name, (text, message) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(text)
        with pytest.raises(ValueError, match=message) as e:
            plots.read_metrics(str(tmp_path / name))
        assert str(tmp_path / name / "metrics.jsonl") in str(e.value)


def test_nothing_to_plot_or_a_bad_speed_table_writes_no_figure(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train", "lr": 0.1}) + "\n")
    out = tmp_path / "plots"
    with pytest.raises(ValueError, match=r"no train 'loss' or eval 'bits_per_token' in the metrics.jsonl of"):
        plots.make_plots([str(workdir)], str(out))
    (workdir / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train", "loss": 2.0}) + "\n")
    for text, message in (
        (None, r"--speed_json=.*speed.json does not exist"),
        ("not json", r"--speed_json=.*speed.json: expected \{'rows'"),
        ('{"rows": [{"name": "a"}]}', r"expected \{'rows'.*KeyError: 'tokens_per_s'"),
        ('{"rows": [{"name": "a", "tokens_per_s": "fast"}]}', r"expected \{'rows'.*ValueError"),
    ):
        speed = tmp_path / "speed.json"
        if text is not None:
            speed.write_text(text)
        with pytest.raises(ValueError, match=message):
            plots.make_plots([str(workdir)], str(out), speed_json=str(speed))
    assert not out.exists()
    assert [os.path.basename(p) for p in plots.make_plots([str(workdir)], str(out))] == ["loss_curves.png"]


def test_plots_flag_mistakes(tmp_path):
    import types

    from ddlm import command

    (tmp_path / "a_file").write_text("")
    for workdir, out_dir, message in (
        (",", "", r"--workdir: give one or more workdirs"),
        (str(tmp_path / "nope"), "", r"--workdir: .*nope is not a directory"),
        (str(tmp_path), str(tmp_path / "a_file"), r"--out_dir=.*a_file is a file; expected a directory"),
    ):
        f = types.SimpleNamespace(workdir=workdir, out_dir=out_dir, speed_json="", tensorboard=False)
        with pytest.raises(command.FlagError, match=message):
            plots.run(f)


def test_plots_on_an_empty_metrics_file_print_one_line_and_write_no_png(tmp_path):
    """The command line: one line naming the file, exit code 1, no empty PNG."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "ddlm.eval.plots", f"--workdir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"ddlm: error: ValueError: {tmp_path / 'run' / 'metrics.jsonl'} holds no records: train first "
        "(--mode=train), or check --workdir"
    ], proc.stderr
    assert not list(tmp_path.rglob("*.png"))
