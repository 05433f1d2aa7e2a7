"""The few-step benchmark's pure pieces (benchmarks/few_step.py: the issue's half-the-gap criterion, its error, the
settings grid, a run's wall time) and its recipe family (experiments/few_step.py: teachers and students)."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from ddlm.eval import cli as eval_cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fs():
    spec = importlib.util.spec_from_file_location("few_step", ROOT / "benchmarks" / "few_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(ppl, se, ent=3.0, ent_se=0.01):
    return {"gen_ppl": ppl, "gen_ppl_se": se, "entropy": ent, "entropy_se": ent_se}


def test_gap_ratio_and_its_delta_method_error(fs):
    ref, teacher, student = _row(10.0, 1.5), _row(30.0, 2.0), _row(18.0, 1.0)
    q, se = fs.gap_ratio(student, teacher, ref)
    assert q == pytest.approx(8.0 / 20.0)
    # the delta method against a Monte Carlo of the three independent estimates
    rng = np.random.default_rng(0)
    n = 400_000
    r = 10.0 + 1.5 * rng.standard_normal(n)
    t = 30.0 + 2.0 * rng.standard_normal(n)
    s = 18.0 + 1.0 * rng.standard_normal(n)
    assert se == pytest.approx(np.std((s - r) / (t - r)), rel=0.05)  # each term is >= 20% of it
    assert np.isnan(fs.gap_ratio(student, _row(9.0, 1.0), ref)[0])  # no gap to close: no ratio


def test_criterion_needs_half_the_gap_and_entropy_within_two_percent(fs):
    ref, teacher = _row(10.0, 0.1, 3.0), _row(30.0, 0.1)
    met = fs.criterion(_row(20.0, 0.1, 3.0 * 1.019), teacher, ref)
    assert met["half_gap"] and met["entropy_ok"] and met["met"]
    assert met["gap_ratio"] == pytest.approx(0.5) and met["entropy_rel"] == pytest.approx(0.019)
    low_entropy = fs.criterion(_row(12.0, 0.1, 3.0 * 0.97), teacher, ref)  # a sharper student: not a win
    assert low_entropy["half_gap"] and not low_entropy["entropy_ok"] and not low_entropy["met"]
    far = fs.criterion(_row(20.1, 0.1, 3.0), teacher, ref)
    assert not far["half_gap"] and far["entropy_ok"] and not far["met"]


def test_settings_grid_reference_and_criteria(fs):
    students = (("sdtt", "mdlm", "a"), ("dcd", "duo", "b"), ("sdtt_fkl", "mdlm", "c"))
    grid = fs.settings([256, 1024], [4, 8], students, variants={})
    assert [(s["model"], s["steps"]) for s in grid if s["teacher"] == "mdlm"] == [
        ("mdlm", 256), ("mdlm", 1024), ("mdlm", 4), ("mdlm", 8), ("sdtt", 4), ("sdtt", 8), ("sdtt_fkl", 4), ("sdtt_fkl", 8)]  # fmt: skip
    assert {s["fields"]["name"] for s in grid if s["teacher"] == "duo"} == {"sedd_analytic"}
    assert {s["fields"]["name"] for s in grid if s["teacher"] == "mdlm"} == {"ancestral"}
    assert all(s["fields"]["steps"] == s["steps"] for s in grid)
    assert [s["role"] for s in grid].count("student") == 6
    assert [s["model"] for s in fs.settings([16], [4], students[1:2], variants={})] == ["duo", "duo", "dcd"]
    more = fs.settings([16], [4, 8], students[1:2], variants={"duo": (("duo+psi", {"name": "psi", "psi_strength": 0.3}),)})
    psi = [s for s in more if s["role"] == "variant"]
    assert [(s["model"], s["net"], s["steps"]) for s in psi] == [("duo+psi", "duo", 4), ("duo+psi", "duo", 8)]
    assert psi[0]["fields"] == {"name": "psi", "psi_strength": 0.3, "steps": 4}
    rows = [{**s, "nfe": s["steps"], **_row(100.0 / s["steps"] + (5.0 if s["role"] == "teacher" else 1.0), 0.1)} for s in grid]
    mdlm = [r for r in rows if r["teacher"] == "mdlm"]
    ref = fs.reference_row(mdlm)
    assert (ref["model"], ref["steps"]) == ("mdlm", 1024)
    out = fs.criteria(mdlm, "mdlm", "sdtt")
    assert set(out) == {4, 8}
    # gaps: teacher 100/k + 5 - (100/1024 + 5), student 100/k + 1 - (100/1024 + 5)
    g = lambda k, c: 100.0 / k + c - (100.0 / 1024 + 5.0)
    assert out[4]["gap_ratio"] == pytest.approx(g(4, 1.0) / g(4, 5.0))
    assert out[8]["gap_ratio"] == pytest.approx(g(8, 1.0) / g(8, 5.0))
    text = fs.report(rows, {"mdlm": 60.0, "sdtt": 120.0}, students)
    assert "teacher training 1.0 min" in text and "sdtt (a; distillation 2.0 min)" in text
    assert text.count("): gap(student)") == 6 and "4 steps (sdtt): gap(student)" in text


def test_round_students_and_the_k_step_student_the_criterion_reads(fs):
    """A run's rounds: round r ends at r * refresh_every with a base_steps / 2^r-step student (SDTT: teacher_steps
    per student step); settings adds '<student>@<step>' rows for the earlier rounds' own k only, and the
    criterion reads them at that k (the newest checkpoint elsewhere)."""
    sdtt = {"method": "sdtt", "rounds": 5, "base_steps": 128, "teacher_steps": 2, "refresh_every": 600}
    assert fs.round_students(sdtt, 3000) == {64: 600, 32: 1200, 16: 1800, 8: 2400, 4: 3000}
    assert fs.round_students({**sdtt, "teacher_steps": 4, "rounds": 3}, 1800) == {32: 600, 8: 1200, 2: 1800}
    dcd = {"method": "dcd", "rounds": 3, "base_steps": 32, "teacher_steps": 2, "refresh_every": 1600}
    assert fs.round_students(dcd, 4800) == {16: 1600, 8: 3200, 4: 4800}
    assert fs.round_students({**dcd, "refresh_every": 1601}, 4800) == {16: 1601, 8: 3202, 4: 4800}
    students = (("sdtt", "mdlm", "a"),)
    grid = fs.settings([1024], [4, 8, 16], students, variants={}, rounds={"sdtt": fs.round_students(sdtt, 3000)})
    rounds = [(s["model"], s["net"], s["steps"], s["round_of"]) for s in grid if "round_of" in s]
    assert rounds == [("sdtt@2400", "sdtt@2400", 8, "sdtt"), ("sdtt@1800", "sdtt@1800", 16, "sdtt")]
    assert all(s["role"] == "student" and s["fields"] == {"name": "ancestral", "steps": s["steps"]} for s in grid if "round_of" in s)
    quality = {"mdlm": 5.0, "sdtt": 3.0, "sdtt@2400": 1.0, "sdtt@1800": 2.0}
    rows = [{**s, "nfe": s["steps"], **_row(100.0 / s["steps"] + quality[s["model"]], 0.1)} for s in grid]
    assert fs.student_row(rows, "sdtt", 8)["model"] == "sdtt@2400" and fs.student_row(rows, "sdtt", 4)["model"] == "sdtt"
    assert fs.student_row(rows, "sdtt", 32) is None
    out = fs.criteria(rows, "mdlm", "sdtt")
    g = lambda k, c: 100.0 / k + c - (100.0 / 1024 + 5.0)
    assert out[8]["model"] == "sdtt@2400" and out[8]["gap_ratio"] == pytest.approx(g(8, 1.0) / g(8, 5.0))
    assert out[4]["model"] == "sdtt" and out[4]["gap_ratio"] == pytest.approx(g(4, 3.0) / g(4, 5.0))
    assert "8 steps (sdtt@2400): gap(student)" in fs.report(rows, {}, students)
    assert [fs.net_of(s["net"]) for s in grid if "round_of" in s] == [("sdtt", 2400), ("sdtt", 1800)]
    assert fs.net_of("dcd_b32") == ("dcd_b32", None)


def test_run_seconds_reads_the_train_lines(fs, tmp_path):
    lines = [{"step": 1, "split": "train", "time": 100.0}, {"step": 2, "split": "eval", "time": 500.0},
             {"step": 50, "split": "train", "time": 160.5}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert fs.run_seconds(str(tmp_path)) == pytest.approx(60.5)
    assert np.isnan(fs.run_seconds(str(tmp_path / "absent")))


@pytest.mark.parametrize("model", ["mdlm", "duo", "sdtt", "dcd"])
def test_recipe_family(model):
    config = eval_cli.load_config_file(f"experiments/few_step.py:model={model}")
    uniform = model in ("duo", "dcd")
    assert config.diffusion.loss == ("duo" if uniform else "mdlm")
    assert config.diffusion.process == ("uniform" if uniform else "absorbing")
    assert config.sampler.name == ("sedd_analytic" if uniform else "ancestral")
    assert (config.model.num_layers, config.model.d_model, config.train.seq_len) == (2, 128, 128)
    if model == "duo":
        assert config.diffusion.curriculum.end == config.train.steps // 2 == 1200
    if model in ("mdlm", "duo"):
        assert config.distill.method == "none" and config.train.steps == 2400
        return
    d = config.distill
    assert d.method == model and d.teacher == f"runs/few_step/{'duo' if uniform else 'mdlm'}"
    assert (d.rounds, d.base_steps, d.refresh_every, config.train.steps) == (5, 128, 600, 3000)
    assert config.sampler.steps == 4 and config.train.ckpt_every == 600 and config.train.keep_checkpoints >= 5
    other = eval_cli.load_config_file(f"experiments/few_step.py:model={model},rounds=3,teacher=runs/t,steps=900")
    assert (other.distill.rounds, other.distill.refresh_every, other.sampler.steps) == (3, 300, 16)
    assert other.distill.teacher == "runs/t"


def test_recipe_rejects_an_unknown_model():
    with pytest.raises(ValueError, match=r"model='bd3lm'; expected one of"):
        eval_cli.load_config_file("experiments/few_step.py:model=bd3lm")


def test_an_untrained_student_is_one_line(fs, tmp_path):
    """Reading a student's rounds from a root without its run: one line naming the checkpoint folder, no
    traceback; the folder is the one the benchmark loads the run from (fs.workdir)."""
    with pytest.raises(SystemExit) as e:
        fs.main(["--root", str(tmp_path), "--students", "sdtt"])
    message = str(e.value)
    assert "\n" not in message and message.startswith("few_step: no checkpoint in ")
    assert fs.workdir(str(tmp_path), "sdtt") in message and fs.workdir(str(tmp_path), "mdlm").endswith("few_step/mdlm")
