"""python -m ddlm.eval.frontier's hardening: a sampler spec (a user's text) never leads a samples folder out
of the workdir, and every mistake in its flags or files is one line, found before a checkpoint is loaded
(here: with no checkpoint anywhere, so a check that came after loading would fail on the checkpoint
instead). The sweep itself runs end to end in tests/test_eval_cli.py."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest

from ddlm import command, paths
from ddlm.eval import frontier, frontier_points

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quickstart_config():
    spec = importlib.util.spec_from_file_location("_quickstart", os.path.join(REPO, "experiments", "quickstart.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


HOSTILE_SPECS = (
    "ancestral:prompt=/../../../../X",
    "ancestral:prompt=..",
    "ancestral:prompt=/etc/passwd",
    "ancestral:prompt=" + "../" * 200,  # longer than a file name may be
)


def test_a_hostile_sampler_spec_keeps_its_samples_inside_the_workdir(tmp_path, monkeypatch):
    """Each point's samples go to one folder directly under <workdir>/eval/frontier_samples, one per spec,
    whatever '/' or '..' the spec's prompt holds."""
    from ddlm.eval import cli

    folders = []

    def sample_and_score(cfg, workdir, loaded, scorer, *, num_samples, output_dir):
        folders.append(output_dir)
        assert cfg.sampler.prompt in [s.partition("prompt=")[2] for s in HOSTILE_SPECS]
        return {"entropy": 1.0, "entropy_se": 0.1, "samples": num_samples, "temperature": 1.0}

    monkeypatch.setattr(cli, "sample_and_score", sample_and_score)
    workdir = tmp_path / "run"
    samples_dir = str(workdir / "eval" / "frontier_samples")
    grid = frontier.Grid(samplers=HOSTILE_SPECS, steps=(8,), precisions=("float64",))
    points = frontier.sweep(quickstart_config(), str(workdir), None, None, grid, num_samples=2, samples_dir=samples_dir)
    assert [p.sampler for p in points] == list(HOSTILE_SPECS)
    assert len(set(folders)) == len(HOSTILE_SPECS)
    for folder in folders:
        assert os.path.dirname(folder) == samples_dir and os.path.basename(folder) not in ("", ".", "..")
        assert len(os.path.basename(folder)) <= 120
    assert os.path.basename(folders[0]) == "run_ancestral_prompt_.._.._.._.._X_8_t1_float64"


def test_a_samples_folder_name_cannot_lead_out_of_its_folder(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "link").symlink_to(tmp_path)  # a folder that exists, leading out
    assert paths.inside(str(base), "ok_name") == str(base / "ok_name")
    for name in ("..", "../x", "/etc", "a/../../b", "", ".", "link"):
        with pytest.raises(ValueError, match="leads out of"):
            paths.inside(str(base), name)
    for text in ("../../x", "..", "/", "a/b", "a\nb", "x" * 300):
        name = paths.folder_name(text)
        assert paths.inside(str(base), name) == str(base / name) and len(name) <= 120


def flags(**overrides):
    """The frontier's flags (their defaults) as the parsed-flags object `frontier.run` reads."""
    values = {
        "config": None, "workdir": None, "samplers": "ancestral", "steps": "8,16,32,64", "temperatures": "1.0",
        "precisions": "float64,float32", "num_samples": 32, "batch_size": 0, "ar": True, "draw": False,
        "workdirs": "", "out": "", "tensorboard": False,
    }  # fmt: skip
    values.update(overrides)
    return types.SimpleNamespace(**values)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(an mdlm workdir, an AR workdir): existing folders with no checkpoint in either."""
    root = tmp_path_factory.mktemp("frontier_dirs")
    (root / "mdlm").mkdir()
    (root / "ar").mkdir()
    return str(root / "mdlm"), str(root / "ar")


def sweep_flags(dirs, ar_workdir=None, **overrides):
    config = quickstart_config()
    config.eval.ar_workdir = dirs[1] if ar_workdir is None else ar_workdir
    return flags(**{"config": config, "workdir": dirs[0], **overrides})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"samplers": "nope"}, r"--samplers: 'nope': unknown sampler 'nope'"),
        ({"samplers": "ancestral:output_dir=/tmp/x"}, r"'output_dir=/tmp/x' is not field=value of a config.sampler "
         r"field other than name/steps/temperature/precision/num_samples/output_dir"),
        ({"samplers": "parallel:threshold=high"}, r"threshold='high' is not a float"),
        ({"samplers": "ancestral:noise_removal=maybe"}, r"noise_removal='maybe' is not a bool"),
        ({"samplers": ","}, r"--samplers is empty: expected comma-separated sampler specs"),
        ({"steps": "0"}, r"--steps=0: every step count must be >= 1"),
        ({"steps": "8,-4"}, r"--steps=8,-4: every step count must be >= 1"),
        ({"steps": ""}, r"--steps is empty: expected comma-separated integers"),
        ({"steps": "8,many"}, r"--steps='8,many': expected comma-separated integers"),
        ({"temperatures": "hot"}, r"--temperatures='hot': expected comma-separated numbers"),
        ({"temperatures": "0"}, r"--samplers=ancestral with --steps=8, --temperatures=0, --precisions=float64: "
         r"config.sampler.temperature must be a number > 0"),
        ({"samplers": "parallel", "temperatures": "0"}, r"the AR baseline \(--ar\) with --steps=0, --temperatures=0"),
        ({"precisions": "float16"}, r"--precisions=float16: config.sampler.precision must be one of"),
        ({"samplers": "parallel:block_length=5"}, r"--samplers=parallel:block_length=5 with --steps=8"),
        ({"num_samples": 0}, r"--num_samples >= 1, got 0, 0"),
        ({"batch_size": -1}, r"--batch_size must be >= 0 and --num_samples >= 1, got -1, 32"),
        ({"out": "frontier.txt"}, r"--out=frontier.txt: expected an image file named \*.png"),
        ({"workdir": "/no/such/run"}, r"--workdir=/no/such/run is not a directory"),
        ({"config": None}, r"--config and --workdir are required"),
    ],
)  # fmt: skip
def test_every_flag_mistake_is_a_flag_error_before_anything_is_loaded(dirs, overrides, message):
    with pytest.raises(command.FlagError, match=message) as e:
        frontier.run(sweep_flags(dirs, **overrides))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("ar", [True, False])
def test_the_ar_scorer_is_needed_with_or_without_the_ar_baseline(dirs, ar):
    """--ar=false leaves out the AR model's own samples; the AR model still scores every sample."""
    with pytest.raises(command.FlagError, match=r"--config.eval.ar_workdir is not set: the frontier scores"):
        frontier.run(sweep_flags(dirs, ar_workdir="", ar=ar))
    with pytest.raises(command.FlagError, match=r"--config.eval.ar_workdir=/no/ar is not a directory"):
        frontier.run(sweep_flags(dirs, ar_workdir="/no/ar", ar=ar))


def test_a_correct_command_line_gets_as_far_as_the_checkpoint(dirs):
    """The flag checks above pass a good command line through (the first thing it meets is the missing
    checkpoint), specs with every kind of field included."""
    good = sweep_flags(
        dirs,
        samplers="ancestral:prompt=/../x,parallel:rule=threshold:threshold=0.9,first_hitting",
        steps="4",
        temperatures="1.0,0.8",
        out=os.path.join(dirs[0], "f.pdf"),
    )
    with pytest.raises(ValueError, match=dirs[0]) as e:  # ddlm.checkpoints' error for the empty workdir
        frontier.run(good)
    assert not isinstance(e.value, command.FlagError)


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_draw_names_the_missing_or_damaged_frontier_file(tmp_path):
    point = dataclasses.asdict(
        frontier_points.FrontierPoint("m", "ancestral", 8, 1.0, "float64", 4.0, 0.1, 20.0, 1.0, 100.0, 8.0, 4)
    )
    with pytest.raises(command.FlagError, match="--draw needs --workdirs"):
        frontier.run(flags(draw=True))
    cases = {
        "missing": (None, r"eval/frontier.json does not exist: sweep that workdir first"),
        "empty": ("", r"eval/frontier.json: not a frontier file \(not JSON: Expecting value"),
        "garbage": ("{points", r"eval/frontier.json: not a frontier file \(not JSON"),
        "no_points": ('{"rows": []}', r"eval/frontier.json: not a frontier file \(a 'points' list"),
        "bad_field": (json.dumps({"points": [{**point, "colour": 1}]}), r"unexpected keyword argument 'colour'"),
        "bad_type": (json.dumps({"points": [{**point, "entropy": "high"}]}), r"point 0: entropy='high' is not a float"),
        "zero": ('{"points": []}', r"no frontier points in the eval/frontier.json of"),
    }  # fmt: skip
    for name, (text, message) in cases.items():
        workdir = str(tmp_path / name)
        os.makedirs(workdir)
        if text is not None:
            write(os.path.join(workdir, "eval", "frontier.json"), text)
        with pytest.raises(ValueError, match=message):
            frontier.run(flags(draw=True, workdirs=workdir))
    assert not list(tmp_path.glob("*/eval/*.png"))


def run_module(module, *args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_the_command_line_prints_one_line_and_exits_2(dirs, tmp_path):
    """Through absl: the flag checks and the flag parser (an unknown flag, a config file with a syntax
    error, a positional argument)."""
    config = os.path.join(REPO, "experiments", "quickstart.py")
    (tmp_path / "broken.py").write_text("def get_config(:\n    pass\n")
    for args, line in (
        ([f"--config={config}", f"--workdir={dirs[0]}", "--ar=false"], "--config.eval.ar_workdir is not set"),
        (["--samplerz=ancestral"], "Unknown command line flag 'samplerz'"),
        ([f"--config={tmp_path / 'broken.py'}"], "broken.py line 1: SyntaxError: invalid syntax"),
        (["--draw", "frontier.png"], "unexpected arguments ['frontier.png']"),
    ):  # fmt: skip
        proc = run_module("ddlm.eval.frontier", *args, cwd=tmp_path)
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert lines[0].startswith("ddlm: error: ") and line in lines[0], lines[0]
