"""--mode=eval end to end on a tiny MDLM and a tiny AR model trained once for this module (Shakespeare
characters, 1 layer x 32 wide, 60 steps, in subprocesses on one CPU device): the table with bits/char and
standard errors, report.json, metrics.jsonl, the AR baseline and generative perplexity beside the MDLM, and
the AR model's exact NLL against a direct computation from its logits."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = """
import importlib.util

_spec = importlib.util.spec_from_file_location("_base", {base!r})
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config(arg=None):
    c = _base.get_config(arg)
    m = c.model
    m.num_layers, m.d_model, m.num_heads, m.mlp_dim, m.cond_dim = 1, 32, 2, 64, 16
    t = c.train
    t.steps, t.batch_size, t.eval_batch_size, t.seq_len = 60, 8, 8, 32
    t.eval_batches, t.log_every, t.eval_every, t.ckpt_every = 1, 20, 0, 0
    t.sample_at_end = False
    c.optim.warmup_steps = 5
    c.sampler.steps, c.sampler.num_samples, c.sampler.batch_size = 8, 4, 4
    c.eval.num_batches = 4
    return c
"""


def child_env(cache_dir):
    """CPU, one device, ddlm's compilation cache in `cache_dir` (never the user's), the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION", "JAX_PERSISTENT"))}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        DDLM_COMPILATION_CACHE_DIR=str(cache_dir),
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


DDLM_FILES = {f for _, _, files in os.walk(os.path.join(REPO, "ddlm")) for f in files if f.endswith(".py")}


def other_libraries_info_lines(log: str) -> list[str]:
    """absl-format INFO lines of the log emitted by a file that is not ddlm's (orbax, jax, grain, tfds)."""
    return [
        line
        for line in log.splitlines()
        if (m := re.match(r"I\d{4} [\d:.]+ +\d+ (\S+?):\d+\]", line)) and m.group(1) not in DDLM_FILES
    ]


def main_cmd(config, workdir, *args):
    return [sys.executable, "-m", "ddlm.main", f"--config={config}", f"--workdir={workdir}", *args]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Trains the tiny MDLM and AR models side by side; returns {name: (config file, workdir)} and the env."""
    root = tmp_path_factory.mktemp("eval_runs")
    env = child_env(root / "jax_cache")
    runs, procs = {}, {}
    for name, base in (("mdlm", "quickstart.py"), ("ar", "quickstart_ar.py")):
        config = root / f"tiny_{name}.py"
        config.write_text(TINY.format(base=os.path.join(REPO, "experiments", base)))
        workdir = root / name
        runs[name] = (str(config), str(workdir))
        procs[name] = subprocess.Popen(
            main_cmd(config, workdir),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    logs = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=280)
        assert proc.returncode == 0, (name, out[-3000:])
        logs[name] = out
    return runs, env, logs


def read_records(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.mark.timeout(300)
def test_eval_mode_prints_bits_per_char_with_standard_errors_beside_the_ar_baseline(tiny_runs):
    runs, env, _ = tiny_runs
    (mdlm_config, mdlm_dir), (ar_config, ar_dir) = runs["mdlm"], runs["ar"]
    args = [
        "--mode=eval",
        f"--config.eval.ar_workdir={ar_dir}",
        f"--config.eval.ar_config={ar_config}",
        "--config.eval.num_samples=4",
    ]
    proc = subprocess.run(
        main_cmd(mdlm_config, mdlm_dir, *args),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=250,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    out = proc.stdout
    print(out)
    assert "bits/char" in out and "Restored checkpoint from step 60" in proc.stderr
    row = next(line for line in out.splitlines() if line.startswith("mdlm NELBO"))
    assert row.count("±") == 4 and "<=" in row
    assert any(line.startswith("ar exact NLL (ar)") for line in out.splitlines())

    with open(os.path.join(mdlm_dir, "eval", "report.json")) as f:
        report = json.load(f)
    rows = report["likelihood"]
    assert list(rows) == ["mdlm NELBO", "T=8 step bound", "ar exact NLL (ar)"]
    nelbo, ar = rows["mdlm NELBO"], rows["ar exact NLL (ar)"]
    assert nelbo["sequences"] == 32 and nelbo["tokens"] == 32 * 32
    assert ar["tokens"] == 32 * 31  # token 0 of a packed row has no context
    for r in rows.values():
        assert 0 < r["bits_per_char_se"] < 0.5 and 0 < r["nats_per_token_se"] < 0.5
        assert r["bits_per_char"] < math.log2(
            70
        )  # learned something: below a uniform guess over the characters
    assert nelbo["kind"] == "NELBO (upper bound)" and ar["kind"] == "exact NLL"
    samples = report["samples"]
    assert samples["samples"] == 4 and samples["steps"] == 8
    assert (
        1.0 < samples["gen_ppl"] < 70 and samples["gen_ppl_se"] > 0 and 0 < samples["entropy"] < math.log(32)
    )
    assert "generative perplexity" in out and "samples (4, ancestral (steps=8), NFE 8)" in out
    # Nothing but ddlm's own INFO lines, none of orbax's read-only notes (issue 22 item 4).
    assert other_libraries_info_lines(proc.stderr) == []
    assert "read_only=True" not in proc.stderr and "Given directory is read only" not in proc.stderr

    # metrics.jsonl: the report's figures as split 'eval_report', not a second 'eval' row of step 60.
    final = read_records(mdlm_dir, "eval_report")[-1]
    assert [r["step"] for r in read_records(mdlm_dir, "eval")] == [60]
    assert final["step"] == 60 and math.isclose(final["bits_per_char"], nelbo["bits_per_char"], rel_tol=1e-6)
    assert final["bits_per_char_se"] > 0
    assert final["samples_gen_ppl"] == samples["gen_ppl"] and final["samples_entropy"] == samples["entropy"]


@pytest.mark.timeout(300)
def test_eval_of_an_ar_checkpoint_is_its_exact_nll(tiny_runs, capsys):
    """In-process run_eval on the AR workdir; the NLL recomputed directly from the model's logits on the same
    batches (numpy log-softmax without the mask id, positions 1..L-1) must match, and so must the characters counted. With
    config.eval.num_samples the AR model samples with its KV cache and scores its own samples: their
    generative NLL must equal the same direct computation on the sample rows (decode, re-encode, bos frame)."""
    from ddlm.data import pipeline
    from ddlm.eval import cli

    runs, _, _ = tiny_runs
    ar_config_path, ar_dir = runs["ar"]
    config = cli.load_config_file(ar_config_path)
    with config.unlocked():
        config.eval.num_samples = 4
    report = cli.run_eval(config, ar_dir)
    printed = capsys.readouterr().out
    assert "ar exact NLL" in printed and "<=" not in printed.split("\n")[2]
    assert "(scored by this model itself)" in printed
    ((label, row),) = report["likelihood"].items()
    assert label == "ar exact NLL" and row["kind"] == "exact NLL"

    loaded = cli.load_checkpoint(config, ar_dir)
    tok = loaded.tokenizer
    it = pipeline.make_iterator(
        config.data, tok, "validation", global_batch_size=8, seq_len=32, seed=config.train.seed, num_epochs=1
    )
    apply = jax.jit(lambda p, x: loaded.model.apply({"params": p}, x, None, train=False))

    def token_logp(x):
        logits = np.asarray(apply(loaded.params, x), np.float64)
        logits[..., tok.mask_id] = -np.inf  # over the ids ar_sample can draw
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return np.take_along_axis(logp[:, :-1], x[:, 1:, None], axis=-1)[..., 0]  # [B, L - 1]

    nll, count, chars = 0.0, 0, 0
    specials = {tok.bos_id, tok.eos_id, tok.pad_id}
    for _, batch in zip(range(4), it):
        x = batch["tokens"]
        nll -= token_logp(x).sum()
        count += x[:, 1:].size
        chars += sum(int(i) not in specials for i in x[:, 1:].reshape(-1))
    assert row["tokens"] == count and row["characters"] == chars
    np.testing.assert_allclose(row["nats_per_token"], nll / count, rtol=2e-5)
    np.testing.assert_allclose(row["bits_per_char"], nll / chars / math.log(2), rtol=2e-5)

    s = report["samples"]
    assert s["sampler"] == "ar" and s["nfe"] == 31 and s["scorer"] == os.path.abspath(ar_dir)
    (run_dir,) = os.listdir(os.path.join(ar_dir, "eval", "samples"))
    with open(os.path.join(ar_dir, "eval", "samples", run_dir, "samples.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 4 and all(r["tokens"][0] == tok.bos_id and len(r["tokens"]) == 32 for r in records)
    # What is scored: the sample's text (specials dropped) re-encoded after bos, each character given its prefix.
    encoded = [[tok.bos_id] + tok.encode(r["text"]) for r in records]
    rows = np.array([ids + [tok.pad_id] * (32 - len(ids)) for ids in encoded])
    scored = np.arange(1, 32)[None, :] < np.array([len(ids) for ids in encoded])[:, None]  # [4, 31]
    gen_nll = -(token_logp(rows) * scored).sum()
    assert s["scored_tokens"] == scored.sum() > 0
    np.testing.assert_allclose(s["gen_nll_per_token"], gen_nll / scored.sum(), rtol=2e-5)


@pytest.mark.timeout(300)
def test_frontier_sweep_and_plots_on_the_tiny_runs(tiny_runs, tmp_path):
    """python -m ddlm.eval.frontier: one point per (steps, precision) of ancestral, one for parallel with the
    threshold rule (no step count), one for the AR baseline's own samples, plus the data, saved and drawn;
    the plots of both workdirs. The data's generative perplexity under the AR scorer is near the AR model's own
    validation perplexity (same model, same kind of text: a scorer that mixed up its positions would not be),
    and so is that of the AR model's own samples at temperature 1 (it scores text drawn from itself)."""
    from ddlm.eval import frontier, plots

    runs, env, _ = tiny_runs
    (mdlm_config, mdlm_dir), (_, ar_dir) = runs["mdlm"], runs["ar"]
    cmd = [
        sys.executable,
        "-m",
        "ddlm.eval.frontier",
        f"--config={mdlm_config}",
        f"--workdir={mdlm_dir}",
        f"--config.eval.ar_workdir={ar_dir}",  # the AR config comes from its checkpoint
        "--samplers=ancestral,parallel:rule=threshold:threshold=0.9",
        "--steps=4,8",
        "--precisions=float64",
        "--num_samples=4",
        "--batch_size=4",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=250, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    points = frontier.load(os.path.join(mdlm_dir, "eval", "frontier.json"))
    assert [(p.label, p.sampler, p.steps) for p in points] == [
        ("mdlm", "ancestral", 4),
        ("mdlm", "ancestral", 8),
        ("mdlm", "parallel:rule=threshold:threshold=0.9", 0),
        ("ar", "ar", 0),
        ("data", "", 0),
    ]
    for p in points:
        assert 0 < p.entropy < math.log(32) and 1 < p.gen_ppl < 70 and p.samples == 4
    assert points[0].nfe <= 4 and points[1].tokens_per_s > 0
    assert 1 <= points[2].nfe <= 32 and points[3].nfe == 31 and points[3].tokens_per_s > 0
    ar_ppl = math.exp(read_records(ar_dir, "eval")[0]["nelbo"])  # the AR's validation NLL after training
    assert 0.5 < points[-1].gen_ppl / ar_ppl < 2.0, (points[-1].gen_ppl, ar_ppl)
    assert 0.5 < points[3].gen_ppl / ar_ppl < 2.0, (points[3].gen_ppl, ar_ppl)
    assert "ar ar NFE 31 T=1 float64" in proc.stdout  # the matching summary names the AR point
    # Only ddlm's own INFO lines (orbax and XLA wrote about 95 before, issue 22 item 4), the sampler's
    # settings in each of them, and the compilation's summary last.
    assert other_libraries_info_lines(proc.stderr) == [], other_libraries_info_lines(proc.stderr)[:5]
    parallel = "parallel (rule=threshold, threshold=0.9, blocks=1, cache=none)"
    for settings in ("ancestral (steps=4)", "ancestral (steps=8)", parallel, "ar,"):
        assert f"tokens with {settings}" in proc.stderr, settings
    last = proc.stderr.splitlines()[-1]
    assert re.search(r"compilation: \d+ programs? compiled, \d+ loaded from the cache", last), last
    assert not os.path.exists(os.path.join(ar_dir, "eval", "frontier_samples"))  # samples go to the mdlm run
    assert os.path.getsize(os.path.join(mdlm_dir, "eval", "frontier.png")) > 1000

    written = plots.make_plots([mdlm_dir, ar_dir], str(tmp_path / "plots"))
    assert sorted(os.path.basename(p) for p in written) == ["frontier.png", "loss_curves.png", "speed.png"]


# ------------------------------------------------------------------------------------------------ inputs
# Checked before any checkpoint is restored: no trained model needed (the fixture above is not used).


def _quickstart_config(**fields):
    """experiments/quickstart.py with `fields` ('eval.x' / 'sampler.y') set."""
    from ddlm.eval import cli

    config = cli.load_config_file(os.path.join(REPO, "experiments", "quickstart.py"))
    with config.unlocked():
        for dotted, value in fields.items():
            group, key = dotted.split(".")
            config[group][key] = value
    return config


def _must_not_load(config, workdir, ema):
    raise AssertionError(f"restored {workdir} before the inputs were checked")


def _eval_error(config, workdir, load_fn=_must_not_load) -> str:
    from ddlm.eval import cli

    with pytest.raises(ValueError) as info:
        cli.run_eval(config, str(workdir), load_fn=load_fn)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_eval_inputs_are_one_line_before_any_checkpoint_is_restored(tmp_path):
    """A missing config.eval.ar_workdir used to be found after the whole evaluation of the main checkpoint
    (41 s), a read-only workdir after all of it (an OSError writing report.json), a bad sampler field after
    the likelihood: each is now one line naming the field before anything is loaded."""
    run = tmp_path / "run"
    missing = tmp_path / "missing"
    message = _eval_error(_quickstart_config(**{"eval.ar_workdir": str(missing)}), run)
    assert message.startswith(f"config.eval.ar_workdir='{missing}' is not a folder")
    # A folder without a checkpoint, with the default loader (which would otherwise restore `run` first).
    empty = tmp_path / "empty"
    empty.mkdir()
    message = _eval_error(_quickstart_config(**{"eval.ar_workdir": str(empty)}), run, load_fn=None)
    assert message == (
        f"config.eval.ar_workdir='{empty}' holds no checkpoint (nothing in {empty / 'checkpoints'}): "
        "train the AR model first"
    )
    # The sampler config of config.eval.num_samples (the whole check of ddlm.sampling.cli).
    bad = _quickstart_config(**{"eval.num_samples": 4, "sampler.name": "nonexistent"})
    assert _eval_error(bad, run).startswith("config.sampler.name must be one of")
    long = _quickstart_config(**{"eval.num_samples": 4, "sampler.seq_len": 100000})
    assert _eval_error(long, run).startswith("config.sampler.seq_len=100000 is longer than the network's")
    # The report's folder: in the way of the default <workdir>/eval, or of config.eval.output_dir.
    run.mkdir()
    (run / "eval").write_text("a file where the report folder goes")
    message = _eval_error(_quickstart_config(), run)
    assert message.startswith(
        f"the eval report folder (config.eval.output_dir) {run / 'eval'} is not writable (FileExistsError"
    )
    blocked = tmp_path / "file"
    blocked.write_text("")
    message = _eval_error(_quickstart_config(**{"eval.output_dir": str(blocked / "eval")}), run)
    assert f"(config.eval.output_dir) {blocked} is not writable" in message
    assert not missing.exists() and not (tmp_path / "file" / "eval").exists()


def test_the_ar_checkpoint_is_restored_before_the_main_one_is_evaluated(tmp_path, monkeypatch):
    """Both checkpoints are restored (and checked) before either is evaluated: a damaged or incompatible AR
    checkpoint is one line in seconds, not after the evaluation of the main one."""
    from ddlm import checkpoints
    from ddlm.eval import cli

    ar_dir = tmp_path / "ar"
    ar_dir.mkdir()
    restored = []

    def load(config, workdir, ema):
        restored.append(workdir)
        if workdir == str(ar_dir):
            raise checkpoints.IncompatibleCheckpointError(f"the checkpoint in {workdir} is incompatible")
        return cli.Loaded(None, None, None, None, 7)

    def evaluate(*args, **kwargs):
        raise AssertionError("evaluated before the AR checkpoint was restored")

    monkeypatch.setattr(cli, "evaluate_checkpoint", evaluate)
    message = _eval_error(_quickstart_config(**{"eval.ar_workdir": str(ar_dir)}), tmp_path / "run", load)
    assert message == f"the checkpoint in {ar_dir} is incompatible"
    assert restored == [str(tmp_path / "run"), str(ar_dir)]


@pytest.mark.timeout(300)
def test_training_logs_name_what_the_eval_measures(tiny_runs):
    """The fixture's training logs (issue 22 item 4): the MDLM's eval is a NELBO bound, the AR model's an exact
    NLL ('perplexity =', not '<='), both in bits/char; no MFU on a CPU; each ends with the closing summary."""
    runs, _, logs = tiny_runs
    for name, kind, bound in (("mdlm", "NELBO", "<="), ("ar", "NLL", "=")):
        log, workdir = logs[name], runs[name][1]
        (line,) = [x for x in log.splitlines() if "eval at step 60" in x]
        figures = rf"\d\.\d{{4}} bits/char, {kind} \d\.\d{{4}} nats/token, perplexity {bound} "
        assert re.search(r"\(EMA params, 1 batch\): " + figures, line), line
        assert "bits/token" not in log and "MFU" not in log.replace("no MFU: no peak", "")
        checkpoint = f"checkpoint {workdir}/checkpoints/60"
        assert f"({kind}, EMA params); {checkpoint}; samples none (config.train.sample_at_end=False)" in log
        assert other_libraries_info_lines(log) == []


@pytest.mark.timeout(300)
def test_a_second_sampling_run_compiles_nothing_and_each_run_names_its_settings(tiny_runs, tmp_path):
    """Issue 22 items 3 and 5: --mode=sample twice on one workdir with a fresh compilation cache (not the
    user's, not the fixture's): the first compiles, the second loads every program from the cache (jax's
    monitoring events, counted by ddlm.compilation_cache) and draws the same samples; each run's folder and
    log line name the rule, the blocks and the cache of its parallel sampler."""
    runs, env, _ = tiny_runs
    config, workdir = runs["mdlm"]
    env = {**env, "DDLM_COMPILATION_CACHE_DIR": str(tmp_path / "cache")}
    out = str(tmp_path / "samples")
    args = [
        "--mode=sample",
        "--config.sampler.name=parallel",
        "--config.sampler.rule=threshold",
        "--config.sampler.block_length=8",
        "--config.sampler.cache=dual",
        f"--config.sampler.output_dir={out}",
    ]
    settings = "parallel (rule=threshold, threshold=0.9, blocks=4, cache=dual)"
    counts, texts = [], []
    for _ in range(2):
        proc = subprocess.run(
            main_cmd(config, workdir, *args),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=200,
            check=False,
        )
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert f"with {settings}, checkpoint step 60" in proc.stderr
        m = re.search(r"compilation: (\d+) programs? compiled, (\d+) loaded from the cache (\S+) ", proc.stderr)
        assert m and m.group(3).startswith(str(tmp_path / "cache")), proc.stderr[-2000:]
        counts.append((int(m.group(1)), int(m.group(2))))
    (first_compiled, _), (second_compiled, second_loaded) = counts
    assert first_compiled > 0 and second_compiled == 0 and second_loaded >= first_compiled, counts
    assert "Loaded the compiled sampler from the compilation cache" in proc.stderr
    folders = sorted(os.listdir(out))
    assert len(folders) == 2 and len(set(folders)) == 2
    for folder in folders:
        name = r"\d{8}-\d{6}-step60-parallel-rule=threshold-threshold=0.9-blocks=4-cache=dual(-2)?"
        assert re.fullmatch(name, folder), folder
        with open(os.path.join(out, folder, "samples.jsonl")) as f:
            texts.append([json.loads(line)["text"] for line in f])
    assert texts[0] == texts[1]  # the cached program samples exactly what the compiled one did


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("split", "test", "must be 'validation' or 'train'"),
        ("num_batches", -1, "must be >= 0"),
        ("num_samples", -2, "must be >= 0"),
        ("time_samples", 0, "must be >= 1"),
        ("discrete_steps", -2, r"must be >= -1"),
        ("seed", -1, r"must be in \[0, 2\^32\)"),
        ("seed", 2**32 + 5, r"must be in \[0, 2\^32\)"),
        ("ar_config", "experiments/quickstart_ar.py", "needs config.eval.ar_workdir"),
        ("stepz", 1, "is not an eval field"),
    ],
)
def test_a_bad_eval_field_is_one_line_naming_it(field, value, expected):
    import ml_collections

    from ddlm.eval import cli as eval_cli

    with pytest.raises(ValueError, match=rf"config\.eval\.{field}.*{expected}|config\.eval\.{field} {expected}") as e:
        eval_cli.resolve_config(ml_collections.ConfigDict({field: value}))
    assert "\n" not in str(e.value)
    eval_cli.resolve_config(ml_collections.ConfigDict({}))  # the defaults pass
