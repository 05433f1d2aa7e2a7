"""The sampling CLI (ddlm/sampling/cli.py): a tiny random network, byte tokenizer, files written; and the
real checkpoint path through ddlm.train (a freshly initialised state saved, then restored by run_sampling)."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddlm import models
from ddlm.data import tokenizers
from ddlm.sampling import cli, visualize
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


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_run_sampling_writes_text_jsonl_and_trajectory_with_conditioning(tmp_path, capsys):
    c = _config(name="ancestral", prompt="ab", infill="x[MASK:3]y", constraints="11:122", visualize=True)
    records = cli.run_sampling(c, str(tmp_path), load_fn=_random_loader)
    out = tmp_path / "samples"
    lines = _read_jsonl(out / "samples.jsonl")
    assert len(records) == len(lines) == 3
    for r in lines:
        assert {"text", "tokens", "nfe", "time_s", "entropy", "sampler", "steps"} <= set(r)
        t = r["tokens"]
        assert t[:3] == [ord("a"), ord("b"), ord("x")] and t[6] == ord("y") and t[11] == ord("z")  # clamped
        assert r["nfe"] == 8 and r["entropy"] >= 0
    assert (out / "samples.txt").read_text().count("=" * 80) == 3
    page = (out / "trajectory.html").read_text()
    assert page.count("<tr>") == 8 + 1  # one row per step, plus the start
    assert 'class="m"' in page  # masked positions greyed
    assert "step" in capsys.readouterr().out  # the terminal animation


def test_resolve_config_fills_defaults_and_rejects_unknown_fields():
    partial = ml_collections.ConfigDict({"name": "cached", "steps": 4})
    full = cli.resolve_config(partial)
    assert full.name == "cached" and full.steps == 4 and full.precision == "float64"
    with pytest.raises(ValueError, match="not a sampler field"):
        cli.resolve_config(ml_collections.ConfigDict({"stepz": 4}))


def test_terminal_animation_and_html_rows():
    traj = np.array([[9, 9, 9], [1, 9, 9], [1, 9, 9], [1, 2, 0]])
    text = lambda i: "abc"[i]
    assert visualize.changed_rows(traj).tolist() == [0, 1, 3]
    page = visualize.trajectory_html(traj, text, 9)
    assert page.count("<tr>") == 4 and page.count('class="n"') == 3

    class Stream:
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    s = Stream()
    assert visualize.animate_terminal(traj, text, 9, stream=s) == 3
    assert s.text.splitlines()[-1].endswith("bca") and visualize.MASK_GLYPH in s.text


def test_run_sampling_from_a_real_checkpoint(tmp_path):
    """ddlm.train saves a (freshly initialised) state; run_sampling restores its EMA parameters."""
    trainer = pytest.importorskip("ddlm.train.trainer")
    if not hasattr(trainer, "load_params"):
        pytest.skip("ddlm.train.trainer.load_params is not there yet")
    from ddlm.train import checkpoint as checkpoint_lib
    from ddlm.train import config_lib as cl

    model = cl.model_config("tiny")
    model.num_layers, model.d_model, model.num_heads, model.mlp_dim, model.cond_dim = 1, 32, 2, 64, 16
    config = cl.base_config(
        model=model,
        diffusion=cl.diffusion_config("mdlm", schedule="loglinear"),
        data=cl.data_config(corpus="shakespeare", tokenizer="byte"),
        optim=cl.optim_config(),
        mesh=cl.mesh_config(),
        train=cl.train_config(steps=1, batch_size=8, seq_len=8),
        sampler=sampler_config.default_config(),
    )
    config.sampler.name, config.sampler.num_samples, config.sampler.batch_size = "first_hitting", 8, 8
    setup = trainer.build(config)
    ckpt = checkpoint_lib.Checkpointer(os.path.join(tmp_path, "checkpoints"), keep=1, async_save=False)
    ckpt.save(0, setup.init_state(), force=True)
    ckpt.close()
    records = cli.run_sampling(config, str(tmp_path))
    # First hitting: one network call per generated token.
    assert len(records) == 8 and all(r["checkpoint_step"] == 0 and r["nfe"] == 8 for r in records)
    assert all(len(r["tokens"]) == 8 for r in records)
