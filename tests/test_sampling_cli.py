"""The sampling CLI (ddlm/sampling/cli.py): a tiny random network, byte tokenizer, files written; and the
real checkpoint path through ddlm.train (a freshly initialised state saved, then restored by run_sampling)."""

import io
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pyte
import pytest
from rich.console import Console

from ddlm import models, paths
from ddlm.data import tokenizers
from ddlm.sampling import cli, conditioning, visualize
from ddlm.sampling import config as sampler_config

SEQ_LEN = 12


def _config(**sampler_fields):
    c = ml_collections.ConfigDict()
    c.model = models.default_config("tiny")
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim, c.model.cond_dim = (
        1,
        32,
        2,
        64,
        16,
    )
    c.data = ml_collections.ConfigDict({"tokenizer": "byte", "vocab_size": 0})
    c.diffusion = ml_collections.ConfigDict(
        {"loss": "mdlm", "schedule": "loglinear", "schedule_kwargs": {"eps": 1e-3}, "process": "absorbing"}
    )
    c.train = ml_collections.ConfigDict({"seq_len": SEQ_LEN})
    c.sampler = sampler_config.default_config()
    c.sampler.num_samples, c.sampler.batch_size, c.sampler.steps = 3, 2, 8
    for k, v in sampler_fields.items():
        c.sampler[k] = v
    return c


class _TinyNet(nn.Module):
    """A stand-in network with the models' apply signature (compiles in a second, unlike a transformer)."""

    vocab_size: int

    @nn.compact
    def __call__(self, tokens, t, x0=None, train=False):
        h = nn.Embed(self.vocab_size, 16)(tokens)
        h = h + nn.Dense(16)(jnp.mean(h, axis=1, keepdims=True)) + (0.0 if t is None else t[:, None, None])
        return nn.Dense(self.vocab_size)(h)


def _random_loader(config, workdir):
    tok = tokenizers.ByteTokenizer()
    model = _TinyNet(tok.vocab_size)
    tokens = jnp.zeros((1, SEQ_LEN), jnp.int32)
    params = model.init({"params": jax.random.key(0)}, tokens, jnp.zeros((1,)), x0=None, train=False)[
        "params"
    ]
    return model, params, tok, None, 0


def _trainer_config():
    """A full experiment config (ddlm.train.config_lib) with a 1-layer model and a byte tokenizer."""
    from ddlm.train import config_lib as cl

    model = cl.model_config("tiny")
    model.num_layers, model.d_model, model.num_heads, model.mlp_dim, model.cond_dim = 1, 32, 2, 64, 16
    return cl.base_config(
        model=model,
        diffusion=cl.diffusion_config("mdlm", schedule="loglinear"),
        data=cl.data_config(corpus="shakespeare", tokenizer="byte"),
        optim=cl.optim_config(),
        mesh=cl.mesh_config(),
        train=cl.train_config(steps=1, batch_size=8, seq_len=8),
        sampler=sampler_config.default_config(),
    )


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _run_dirs(base):
    return sorted(p for p in base.iterdir() if p.is_dir())


def test_each_run_writes_its_own_folder_with_all_samples_in_the_trajectory(tmp_path, capsys):
    """Two runs in one workdir: each gets its own folder (nothing overwritten, no stale trajectory.html
    beside another run's samples); the trajectory page shows every sample and says steps and NFE right;
    the terminal animation is off when stdout is not a terminal (pytest's capture)."""
    c = _config(name="ancestral", prompt="ab", infill="x[MASK:3]y", constraints="11:122", visualize=True)
    records = cli.run_sampling(c, str(tmp_path), load_fn=_random_loader)
    (first,) = _run_dirs(tmp_path / "samples")
    lines = _read_jsonl(first / "samples.jsonl")
    assert len(records) == len(lines) == 3
    for r in lines:
        assert {"text", "tokens", "nfe", "time_s", "entropy", "sampler", "steps"} <= set(r)
        t = r["tokens"]
        assert t[:3] == [ord("a"), ord("b"), ord("x")] and t[6] == ord("y") and t[11] == ord("z")  # clamped
        assert r["nfe"] == 8 and r["entropy"] >= 0
    assert (first / "samples.txt").read_text().count("=" * 80) == 3
    saved = json.loads((first / "config.json").read_text())
    assert saved["sampler"]["name"] == "ancestral" and saved["sampler"]["seed"] == 0
    page = (first / "trajectory.html").read_text()
    assert "ancestral (steps=8): NFE 8 (network calls)" in page
    assert all(f"sample {i} (NFE 8)" in page for i in range(3))  # every sample, not only sample 0
    assert 1 + 3 <= page.count("<tr>") <= 3 * (8 + 1)  # rows where something changed
    assert 'class="m"' in page  # masked positions greyed
    out = capsys.readouterr().out
    assert "step 0/" not in out and visualize.MASK_GLYPH not in out  # no frames on a non-terminal
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    # Same workdir, another run: a new folder, the first one untouched, no trajectory beside its samples.
    c = _config(name="first_hitting", prompt="ab", seq_len=8)
    records = cli.run_sampling(c, str(tmp_path), load_fn=_random_loader)
    assert all(r["nfe"] == 6 for r in records)  # one call per generated token
    runs = _run_dirs(tmp_path / "samples")
    assert len(runs) == 2 and runs[0] == first and first.name.endswith("-step0-ancestral-steps=8")
    assert runs[1].name.endswith("-step0-first_hitting")  # no step count: it takes none
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert sorted(p.name for p in runs[1].iterdir()) == ["config.json", "samples.jsonl", "samples.txt"]
    # The page title of a first-hitting run counts its calls, not config.sampler.steps (64 by default).
    title = cli._trajectory_title(_config(name="first_hitting", steps=64).sampler, records, 5, 8)
    assert title == "first_hitting (one network call per unmasked token): NFE 6 (network calls), checkpoint step 5"
    assert [r["steps"] for r in records] == [None] * 3  # samples.jsonl: no step count either


def test_resolve_config_fills_defaults_and_rejects_unknown_fields():
    partial = ml_collections.ConfigDict({"name": "cached", "steps": 4})
    full = cli.resolve_config(partial)
    assert full.name == "cached" and full.steps == 4 and full.precision == "float64"
    with pytest.raises(ValueError, match="not a sampler field"):
        cli.resolve_config(ml_collections.ConfigDict({"stepz": 4}))


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("name", "nonexistent", "one of"),
        ("steps", 0, "an integer >= 1"),
        ("temperature", 0.0, "> 0"),
        ("top_p", 0.0, r"in \(0, 1\]"),
        ("top_p", 1.5, r"in \(0, 1\]"),
        ("top_k", -1, ">= 0"),
        ("precision", "float16", "one of"),
        ("remasking", "none", "one of"),
        ("eta", 2.0, r"in \[0, 1\]"),
        ("t_min", 1.0, r"in \[0, 1\)"),
        ("grid", "cosin", "one of"),
        ("num_samples", 0, ">= 1"),
        ("batch_size", 0, ">= 1"),
        ("seed", 2**32 + 5, r"in \[0, 2\^32\)"),
        ("seed", -1, r"in \[0, 2\^32\)"),
        ("guidance_scale", -1.0, ">= 0"),
        ("end", 99, r"in \[0, 12\]"),
        ("infill", "a [MASK:x] b", "malformed placeholder"),
        ("constraints", "a:b", "not 'pos:id'"),
        ("constraints", "12:5", "outside a sequence of length 12"),
    ],
)
def test_a_bad_sampler_field_is_one_line_before_the_checkpoint_is_loaded(field, value, expected):
    def must_not_load(config, workdir):
        raise AssertionError("the checkpoint was loaded before the sampler config was checked")

    c = _config(**{field: value})
    with pytest.raises(ValueError, match=rf"config\.sampler\.{field}.*{expected}") as info:
        cli.run_sampling(c, "/nonexistent", load_fn=must_not_load)
    assert "\n" not in str(info.value)


def _must_not_load(config, workdir):
    raise AssertionError("the checkpoint was loaded before the inputs were checked")


def _one_line_error(config, workdir, load_fn=_must_not_load) -> str:
    with pytest.raises(ValueError) as info:
        cli.run_sampling(config, str(workdir), load_fn=load_fn)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_an_unwritable_samples_folder_is_one_line_before_loading(tmp_path):
    """--mode=sample on a workdir it cannot write used to sample everything and then fail with an OSError
    traceback: the trainer's write probe (checkpoints.check_writable) now runs before the checkpoint is
    loaded. chmod does not stop root (CI runs as root), a file in the way stops everyone: the probe sees the
    same OSError either way."""
    (tmp_path / "samples").write_text("a file where the samples folder goes")
    message = _one_line_error(_config(), tmp_path)
    folder = tmp_path / "samples"
    assert message.startswith(
        f"the samples folder (config.sampler.output_dir) {folder} is not writable (FileExistsError"
    )
    blocked = tmp_path / "file"
    blocked.write_text("")
    message = _one_line_error(_config(output_dir=str(blocked / "out" / "samples")), tmp_path)
    assert f"config.sampler.output_dir) {blocked} is not writable (FileExistsError" in message
    if os.geteuid() != 0:  # permissions bind only non-root users; the file in the way above binds root too
        readonly = tmp_path / "readonly"
        readonly.mkdir(mode=0o555)
        message = _one_line_error(_config(), readonly)
        assert f"{readonly} is not writable (PermissionError" in message
    # The probe creates nothing: a mistyped workdir is not left behind by a load that finds no checkpoint.
    def no_checkpoint(config, workdir):
        raise ValueError(f"no checkpoint in {workdir}/checkpoints")

    assert _one_line_error(_config(), tmp_path / "typo", no_checkpoint).startswith("no checkpoint in")
    assert not (tmp_path / "typo").exists()


def test_a_sample_length_past_the_network_context_is_one_line_before_loading():
    """seq_len=100000 on a network trained at 12 used to allocate 320 GB and end in an out-of-memory
    traceback. Only bd3lm goes past the training context, with a sliding window that fits inside it."""
    message = _one_line_error(_config(seq_len=100000), "/unused")
    assert message == (
        "config.sampler.seq_len=100000 is longer than the network's context, config.train.seq_len=12 "
        "(positions past it were never trained; only name='bd3lm' samples past it, with a sliding window): "
        "use at most 12 (0 = 12)"
    )
    sc, seq_len = cli.check_config(_config(seq_len=12))  # the context itself is fine
    assert seq_len == 12 and sc.window == 0

    def bd3lm(**fields):
        c = _config(name="bd3lm", **fields)
        c.model.name, c.model.block_size, c.diffusion.loss = "bd3lm", 4, "bd3lm"
        return c

    c = bd3lm(seq_len=40)
    sc, seq_len = cli.check_config(c)
    assert seq_len == 40 and sc.window == 8 and c.sampler.window == 0  # 12 - 4, on the run's copy only
    assert cli.check_config(bd3lm(seq_len=40, window=4))[0].window == 4
    assert "use a window of at most 8 (0 = 8)" in _one_line_error(bd3lm(seq_len=40, window=12), "/unused")
    assert "window=40 keeps all 40 tokens" in _one_line_error(bd3lm(seq_len=40, window=40), "/unused")
    message = _one_line_error(bd3lm(seq_len=40, kv_cache=False), "/unused")
    assert message.startswith("config.sampler.kv_cache must be True for seq_len=40 past the network's")


def test_a_sampler_too_big_for_the_device_is_one_line_before_it_runs(tmp_path, monkeypatch):
    """The compiled sampler's memory (XLA's memory_analysis) against what a device holds: past it, one line
    instead of an out-of-memory traceback, and no run folder. The limit of a CPU device is the host's
    memory (/proc/meminfo) shared by the local devices."""
    with open("/proc/meminfo") as f:
        total_kib = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    assert cli._memory_limit_bytes(jax.devices("cpu")[0]) == total_kib * 1024 // jax.local_device_count()
    monkeypatch.setattr(cli, "_memory_limit_bytes", lambda device: 1 << 10)
    message = _one_line_error(_config(), tmp_path, _random_loader)
    assert re.fullmatch(
        r"config\.sampler\.batch_size=2 x seq_len=12: the compiled sampler needs [0-9.]+ MiB per device, "
        r"more than the 0\.0 MiB one holds; "
        r"lower config\.sampler\.batch_size or config\.sampler\.seq_len",
        message,
    ), message
    assert not (tmp_path / "samples").exists() or not any((tmp_path / "samples").iterdir())
    monkeypatch.setattr(cli, "_memory_limit_bytes", lambda device: 1 << 40)
    assert len(cli.run_sampling(_config(), str(tmp_path), load_fn=_random_loader)) == 3


def test_sampling_imports_nothing_from_the_layers_above_it():
    """ddlm/sampling sits below ddlm/eval, ddlm/train and ddlm/main (STYLE.md, one-way layers): no module of
    it imports them, at the top or inside a function (sampling/cli used to import eval.sample_quality)."""
    import ast

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ddlm", "sampling")
    found = []
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(root, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            modules = []
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for m in modules:
                if m.split(".")[:2] in (["ddlm", "eval"], ["ddlm", "train"], ["ddlm", "main"]):
                    found.append(f"{name}:{node.lineno} imports {m}")
    assert not found, found


def test_sampler_and_diffusion_mismatches_are_one_line_before_loading():
    def must_not_load(config, workdir):
        raise AssertionError("loaded before the config was checked")

    for process, loss, schedule, fields, expected in [
        ("uniform", "sedd_uniform", "geometric", {"name": "ancestral"}, "needs the absorbing process"),
        ("uniform", "sedd_uniform", "linear", {"name": "sedd_euler"}, r"need alpha\(1\) > 0"),
        ("uniform", "sedd_uniform", "geometric", {"name": "sedd_euler", "grid": "cosine"}, "alpha"),
        ("absorbing", "sedd_absorb", "loglinear", {"name": "sedd_euler", "guidance_scale": 1.0}, "denoiser"),
        ("absorbing", "ar", "loglinear", {"name": "ancestral"}, "is sampled with config.sampler.name=.ar."),
        # a SEDD network outputs scores: no x_0 prediction for temperature / top-k / top-p to act on
        ("uniform", "sedd_uniform", "geometric", {"name": "sedd_analytic", "temperature": 0.9}, r"temperature=0.9.*scores"),
        ("absorbing", "sedd_absorb", "loglinear", {"name": "sedd_euler", "top_k": 5}, r"top_k=5.*scores"),
        ("absorbing", "sedd_absorb", "loglinear", {"name": "sedd_euler", "top_p": 0.5}, r"top_p=0.5.*scores"),
    ]:
        c = _config(**fields)
        c.diffusion.process, c.diffusion.loss, c.diffusion.schedule = process, loss, schedule
        c.diffusion.schedule_kwargs = {}
        with pytest.raises(ValueError, match=expected):
            cli.run_sampling(c, "/unused", load_fn=must_not_load)


def test_the_trainer_checks_the_sampler_config_at_start_up_when_it_will_sample():
    from ddlm.train import trainer

    config = _trainer_config()
    config.train.sample_at_end = True
    config.sampler.name = "nonexistent"
    with pytest.raises(ValueError, match=r"config\.sampler\.name must be one of"):
        trainer.validate_config(config, num_devices=8)
    config.train.sample_at_end = False  # not sampling: the sampler config is not the train job's business
    trainer.validate_config(config, num_devices=8)


@pytest.mark.parametrize(
    "template,expected",
    [
        ("a [MASK:x] b", "'[MASK:x]' at character 2"),
        ("a [MASK:-3] b", "'[MASK:-3]'"),
        ("a [MASK:0] b", "'[MASK:0]'"),
        ("a [MASK:3 b", "'[MASK:3 b'"),
        ("a [mask] b", "'[mask]'"),
    ],
)
def test_malformed_infill_templates_name_the_field(template, expected):
    with pytest.raises(
        ValueError, match=r"config\.sampler\.infill: malformed placeholder " + re.escape(expected)
    ):
        conditioning.parse_infill_template(template, lambda s: [ord(ch) for ch in s], mask_id=-1)


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("0:99999", r"token id 99999 in '0:99999' is outside the vocabulary \[0, 260\)"),
        ("0:-1", r"token id -1 in '0:-1' is outside the vocabulary"),
        ("0:259", "token id 259 in '0:259' is the mask id"),
        ("a:b", r"'a:b' is not 'pos:id'"),
        ("3", r"'3' is not 'pos:id'"),
        ("1:5,1:6", "position 1 is constrained twice"),
        ("-13:5", "position -13 in '-13:5' is outside a sequence of length 12"),
    ],
)
def test_bad_constraints_name_the_field(spec, expected, tmp_path):
    """Checked against the tokenizer after loading (0:99999 used to be a bare IndexError in decode)."""
    with pytest.raises(ValueError, match=rf"config\.sampler\.constraints: {expected}"):
        cli.run_sampling(_config(constraints=spec), str(tmp_path), load_fn=_random_loader)


def test_conditioning_keeps_well_formed_input():
    encode = lambda s: [ord(c) for c in s]
    assert conditioning.parse_infill_template("[MASK:2]x[MASK]", encode, 7) == [7, 7, 120, 7]
    assert conditioning.parse_constraints(" 0:5, -1:9 ,", vocab_size=10, length=4) == {0: 5, -1: 9}


class _Stream:
    def __init__(self, tty):
        self.text, self.tty = "", tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return self.tty


def _screen(output: str, columns: int, lines: int = 12) -> list[str]:
    """What a VT100 terminal of that size shows after `output` (pyte emulates the cursor moves)."""
    screen = pyte.Screen(columns, lines)
    stream = pyte.Stream(screen)
    stream.feed(output.replace("\n", "\r\n"))  # a tty's output processing turns \n into \r\n
    return [line.rstrip() for line in screen.display]


def test_terminal_animation_redraws_wrapped_frames_in_place_and_html_rows():
    traj = np.array([[9] * 24, [1] + [9] * 23, [1] + [9] * 23, [1] * 12 + [2] * 12])
    text = lambda i: "abc"[i]
    assert visualize.changed_rows(traj).tolist() == [0, 1, 3]
    page = visualize.trajectory_html(traj, text, 9)
    assert page.count("<tr>") == 3 and page.count('class="n"') == 1 + 23
    # A terminal 10 columns wide: each frame ('step k/3  ' + 24 tokens) wraps over 4 screen lines. Redrawn
    # in place, the screen ends showing the last frame alone (moving up by text lines, not screen lines,
    # left earlier frames' lines behind: hundreds of lines for a long run).
    s = _Stream(tty=True)
    console = Console(file=s, force_terminal=True, width=10, color_system=None)
    assert visualize.animate_terminal(traj, text, 9, console=console, delay=0.0) == 3
    shown = [line for line in _screen(s.text, 10) if line]
    assert shown == ["step 3/3", "bbbbbbbbbb", "bbcccccccc", "cccc"], shown
    # Not a terminal: no animation at all.
    s = _Stream(tty=False)
    assert visualize.animate_terminal(traj, text, 9, stream=s) == 0 and s.text == ""


def test_run_sampling_from_a_real_checkpoint(tmp_path):
    """ddlm.train saves a (freshly initialised) state; run_sampling restores its EMA parameters."""
    trainer = pytest.importorskip("ddlm.train.trainer")
    if not hasattr(trainer, "load_params"):
        pytest.skip("ddlm.train.trainer.load_params is not there yet")
    from ddlm.train import checkpoint as checkpoint_lib

    config = _trainer_config()
    config.sampler.name, config.sampler.num_samples, config.sampler.batch_size = "first_hitting", 8, 8
    setup = trainer.build(config)
    ckpt = checkpoint_lib.Checkpointer(os.path.join(tmp_path, "checkpoints"), keep=2, async_save=False)
    state = setup.init_state()
    ckpt.save(3, state, force=True)
    # A newer checkpoint with other EMA parameters: sampled by default; config.sampler.checkpoint_step=3 the older.
    other = jax.tree.map(lambda p: p + jnp.cos(jnp.arange(p.size, dtype=p.dtype).reshape(p.shape)), state.ema_params)
    ckpt.save(5, state.replace(ema_params=other), force=True)
    ckpt.close()
    newest = cli.run_sampling(config, str(tmp_path))
    config.sampler.checkpoint_step = 3
    records = cli.run_sampling(config, str(tmp_path))
    # First hitting: one network call per generated token.
    assert len(records) == 8 and all(r["checkpoint_step"] == 3 and r["nfe"] == 8 for r in records)
    assert all(len(r["tokens"]) == 8 for r in records)
    assert all(r["checkpoint_step"] == 5 for r in newest)
    assert [r["tokens"] for r in records] != [r["tokens"] for r in newest]
    config.sampler.checkpoint_step = 4
    with pytest.raises(ValueError, match=r"^no checkpoint at step 4 in .*; committed steps: \[3, 5\]$"):
        cli.run_sampling(config, str(tmp_path))


# ------------------------------------------------------------------------------------------------ names
# Issue 22 item 5: runs of one sampler with different settings were all '...-parallel' folders, and the log
# named neither the rule, the blocks nor the cache; first_hitting said '(128 steps)'.

NAMED_RUNS = [
    ({"name": "first_hitting", "steps": 128}, "first_hitting"),  # no step count: it takes none
    ({"name": "ancestral", "steps": 64}, "ancestral (steps=64)"),
    ({"name": "ancestral", "temperature": 0.8, "top_k": 5}, "ancestral (steps=8, temperature=0.8, top_k=5)"),
    (
        {"name": "parallel", "rule": "threshold", "threshold": 0.9, "block_length": 4, "cache": "dual"},
        "parallel (rule=threshold, threshold=0.9, blocks=3, cache=dual)",  # adaptive rule: no steps
    ),
    (
        {"name": "parallel", "rule": "low_confidence", "steps": 6, "block_length": 4, "refresh_every": 2},
        "parallel (rule=low_confidence, blocks=3, cache=none, steps=6)",  # refresh_every: only with a cache
    ),
    (
        {"name": "parallel", "cache": "prefix", "refresh_every": 2, "parallel_remasking": "cap", "eta": 0.05},
        (
            "parallel (rule=low_confidence, blocks=1, cache=prefix, refresh_every=2, remasking=cap, eta=0.05, "
            "steps=8)"
        ),
    ),
    ({"name": "remdm", "remasking": "cap", "eta": 0.1}, "remdm (remasking=cap, eta=0.1, steps=8)"),
    ({"name": "ar", "greedy": True, "kv_cache": False}, "ar (kv_cache=False, greedy=True)"),
    ({"name": "bd3lm", "block_sampler": "first_hitting"}, "bd3lm (block_sampler=first_hitting)"),
    ({"name": "bd3lm", "block_sampler": "ancestral"}, "bd3lm (block_sampler=ancestral, steps=8)"),
    (
        {"name": "bd3lm", "block_sampler": "parallel", "rule": "factor", "factor": 2.0, "window": 8},
        "bd3lm (block_sampler=parallel, rule=factor, factor=2, window=8)",
    ),
]


@pytest.mark.parametrize("fields,expected", NAMED_RUNS)
def test_log_lines_and_folders_name_the_settings_that_matter(fields, expected):
    """describe() for the log line and the trajectory title; the folder holds the same settings as
    name-field=value parts after '<date>-<time>-step<N>-', as a safe folder name."""
    sc = sampler_config.resolve(ml_collections.ConfigDict(fields))
    if "steps" not in fields:
        sc.steps = 8
    assert cli.describe(sc, SEQ_LEN) == expected
    folder = cli.run_folder_name(sc, SEQ_LEN, 2500)
    assert re.fullmatch(r"\d{8}-\d{6}-step2500-.+", folder), folder
    settings = expected.replace(" (", "-").replace(", ", "-").rstrip(")")
    assert folder.endswith("-step2500-" + settings), folder
    assert folder == paths.folder_name(folder, max_len=200)  # nothing a folder name may not hold


def test_run_folders_of_different_settings_differ_and_same_settings_get_a_suffix(tmp_path):
    """Two parallel runs that differ only in the rule, the blocks or the cache land in different folders; the
    same settings twice in one second get '-2' (ddlm.sampling.cli._new_run_dir), never the same folder."""
    base = sampler_config.resolve(ml_collections.ConfigDict({"name": "parallel", "steps": 12}))
    variants = [
        {},
        {"rule": "margin"},
        {"block_length": 4},
        {"block_length": 4, "cache": "dual"},
        {"rule": "threshold", "threshold": 0.8},
        {"rule": "threshold", "threshold": 0.9},
    ]
    names = set()
    for fields in variants:
        sc = sampler_config.resolve(ml_collections.ConfigDict({**base.to_dict(), **fields}))
        names.add(cli.run_folder_name(sc, SEQ_LEN, 7).split("-step7-")[1])
    assert len(names) == len(variants), names
    name = cli.run_folder_name(base, SEQ_LEN, 7)
    first = cli._new_run_dir(str(tmp_path), name)
    second = cli._new_run_dir(str(tmp_path), name)
    assert os.path.basename(first) == name and os.path.basename(second) == name + "-2"


def test_a_long_prompt_free_name_stays_a_bounded_safe_folder_name():
    """Every setting at once: the name keeps its start (date, step, sampler) and gains a hash past 200
    characters (ddlm.paths.folder_name), so it is still one folder."""
    fields = {"name": "parallel", "rule": "entropy_bounded", "gamma": 0.123456, "block_length": 4,
              "cache": "dual", "refresh_every": 3, "parallel_remasking": "confidence", "eta": 0.5,
              "temperature": 0.7, "top_k": 40, "top_p": 0.95, "grid": "cosine", "t_min": 0.01,
              "precision": "float32", "guidance_scale": 1.5, "noise_removal": False}  # fmt: skip
    sc = sampler_config.resolve(ml_collections.ConfigDict(fields))
    folder = cli.run_folder_name(sc, SEQ_LEN, 3)
    assert len(folder) == 200 and "/" not in folder and "-step3-parallel-rule=entropy_bounded" in folder


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_the_per_step_progress_callback_only_on_a_terminal_with_the_compilation_cache_off(monkeypatch):
    """jax (0.10) never writes a program with a host callback to the persistent compilation cache: the
    sampler's per-step bar (jax.debug.callback) would make every rerun compile it again. So the callback
    is there only on a terminal with the cache off; a log file never showed per-step updates anyway."""
    from ddlm import compilation_cache

    sc = sampler_config.default_config()
    monkeypatch.setattr(compilation_cache, "directory", lambda: None)
    assert cli.per_step_progress(sc, _Tty()) and not cli.per_step_progress(sc, io.StringIO())
    sc.progress = False
    assert not cli.per_step_progress(sc, _Tty())
    sc.progress = True
    monkeypatch.setattr(compilation_cache, "directory", lambda: "/some/cache")
    assert not cli.per_step_progress(sc, _Tty())
    # Without per-step updates a terminal's line names the batch as it starts, and draws no step bar.
    stream = _Tty()
    progress = cli._Progress(4, 2, steps=8, stream=stream, per_step=False)
    progress.on_batch_start(1)
    assert "batch 2/2," in stream.getvalue() and "step" not in stream.getvalue()
