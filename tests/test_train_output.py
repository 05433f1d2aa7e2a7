"""What a training run prints and records (issue 22 item 4), in process with stand-ins for the compiled steps
(the real steps are tests/test_train.py's): the periodic eval line in bits/char with a standard error
(NELBO, or the exact NLL for an AR model), no MFU figure on a CPU, the closing line naming the final figure,
the checkpoint and the samples; and --mode=eval's rows in metrics.jsonl, one per checkpoint step."""

import importlib.util
import json
import logging as python_logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm.train import metrics as metrics_lib
from ddlm.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quick_config(name="quickstart.py", **overrides):
    """experiments/<name>:smoke (1 layer, 32 wide, 8 x 16 tokens) with `overrides`."""
    path = os.path.join(REPO, "experiments", name)
    spec = importlib.util.spec_from_file_location(name[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    config.update_from_flattened_dict(overrides)
    return config


def _stand_in_training(monkeypatch, samples_folder=None):
    """The trainer with a train step that only counts, an eval step whose NELBO of a batch is known (its
    tokens' mean id / 10 nats per token), zero parameters (nothing to compile) and, given, a stand-in for the
    sampler that makes `samples_folder`. Returns the eval step's per-batch (nats, tokens) record."""
    seen = []

    def step(state, batch):
        return state.replace(step=state.step + 1), {"loss": jnp.float32(1.0), "finite": jnp.float32(1)}

    def eval_step(params, batch, rng):
        tokens = np.asarray(batch["tokens"], np.float64)
        mask = np.asarray(batch["loss_mask"], np.float64)
        count = mask.sum()
        nats = (tokens * mask).sum() / 10.0
        seen.append((nats, count))
        return {"loss_sum": jnp.float32(nats), "tokens": jnp.float32(count)}

    build = trainer.build

    def build_zero_init(config, devices=None):
        setup = build(config, devices)
        setup.init_state = lambda: jax.tree.map(
            lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding), setup.abstract_state()
        )
        return setup

    def sample(config, workdir):
        if samples_folder is not None:
            os.makedirs(os.path.join(workdir, "samples", samples_folder))

    monkeypatch.setattr(trainer, "build", build_zero_init)
    monkeypatch.setattr(trainer, "compile_train_step", lambda setup: step)
    monkeypatch.setattr(trainer, "compile_eval_step", lambda setup: eval_step)
    monkeypatch.setattr(trainer, "run_sampling_if_available", sample)
    return seen


def _validation_characters(config, batches):
    """The characters of the first `batches` validation batches, decoded independently of the trainer."""
    from ddlm.data import pipeline, tokenizers

    tok = tokenizers.get_tokenizer(config.data)
    it = pipeline.make_iterator(
        config.data,
        tok,
        "validation",
        global_batch_size=config.train.eval_batch_size,
        seq_len=config.train.seq_len,
        seed=config.train.seed,
        sharding=None,
        num_epochs=1,
    )
    out = []
    for _, batch in zip(range(batches), it):
        rows = zip(batch["tokens"], batch["loss_mask"])
        out.append(sum(len(tok.decode([int(i) for i, m in zip(r, ms) if m > 0])) for r, ms in rows))
    return out


def test_training_log_says_bits_per_char_with_an_error_bar_no_cpu_mfu_and_closes_with_a_summary(
    tmp_path, monkeypatch, caplog
):
    seen = _stand_in_training(monkeypatch, samples_folder="20261207-000000-step4-ancestral-steps=128")
    config = quick_config(**{"train.steps": 4, "train.log_every": 2, "train.eval_batches": 3})
    config.train.sample_at_end = True
    workdir = str(tmp_path / "run")
    caplog.set_level(python_logging.INFO)
    final = trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    lines = [r.getMessage() for r in caplog.records]

    # The figures against their definitions: total nats over total tokens / characters, and the delta-method
    # standard error over the 3 batches.
    nats = np.array([n for n, _ in seen[:3]])
    tokens = np.array([t for _, t in seen[:3]])
    chars = np.array(_validation_characters(config, 3), np.float64)
    bpc = nats.sum() / chars.sum() / math.log(2)
    resid = nats - nats.sum() / chars.sum() * chars
    se = math.sqrt((resid**2).sum() / (3 * 2)) / chars.mean() / math.log(2)
    assert final["bits_per_char"] == pytest.approx(bpc, rel=1e-5)
    assert final["bits_per_char_se"] == pytest.approx(se, rel=1e-5)
    assert final["nelbo"] == pytest.approx(nats.sum() / tokens.sum(), rel=1e-5)
    assert final["bits_per_token_se"] == pytest.approx(final["nelbo_se"] / math.log(2))

    (eval_line,) = [line for line in lines if line.startswith("eval at step")]
    assert eval_line.startswith(
        f"eval at step 4 (EMA params, 3 batches): {bpc:.4f} ± {se:.4f} bits/char, NELBO "
        f"{final['nelbo']:.4f} ± {final['nelbo_se']:.4f} nats/token, perplexity <= "
    )
    assert not any("bits/token" in line or "MFU " in line for line in lines), lines
    assert any("no MFU: no peak FLOP/s known for 'cpu' devices" in line for line in lines)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert all("mfu" not in r for r in rows) and [r["split"] for r in rows] == ["train", "train", "eval"]
    assert rows[-1]["bits_per_char"] == pytest.approx(bpc, rel=1e-5)
    assert lines[-1] == (
        f"Done: trained steps 1-4 in {lines[-1].split(' in ')[1].split(';')[0]}; final validation "
        f"{bpc:.4f} ± {se:.4f} bits/char (NELBO, EMA params); checkpoint {workdir}/checkpoints/4; samples "
        f"{workdir}/samples/20261207-000000-step4-ancestral-steps=128; metrics {workdir}/metrics.jsonl and "
        f"{workdir}/tensorboard"
    )
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))


def test_an_ar_model_reports_an_exact_nll_and_one_batch_has_no_error_bar(tmp_path, monkeypatch, caplog):
    _stand_in_training(monkeypatch)
    config = quick_config(
        "quickstart_ar.py", **{"train.steps": 2, "train.log_every": 2, "train.eval_batches": 1}
    )
    config.train.sample_at_end = False
    workdir = str(tmp_path / "ar")
    caplog.set_level(python_logging.INFO)
    final = trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    assert "bits_per_char_se" not in final and "nelbo_se" not in final
    lines = [r.getMessage() for r in caplog.records]
    (eval_line,) = [line for line in lines if line.startswith("eval at step")]
    assert eval_line.startswith(
        f"eval at step 2 (EMA params, 1 batch): {final['bits_per_char']:.4f} bits/char, NLL "
        f"{final['nelbo']:.4f} nats/token, perplexity = {final['perplexity_bound']:.3f} ("
    )
    assert "NELBO" not in eval_line and "<=" not in eval_line and "±" not in eval_line
    assert "(NLL, EMA params)" in lines[-1] and "samples none (config.train.sample_at_end=False)" in lines[-1]


def test_eval_mode_rows_are_one_per_checkpoint_step(tmp_path):
    """--mode=eval writes its figures as split 'eval_report', not a second 'eval' row of the step the
    training already evaluated; a rerun on the same checkpoint replaces its row (metrics.jsonl rewritten
    atomically), other rows untouched."""
    workdir = str(tmp_path)
    with metrics_lib.MetricWriter(workdir) as writer:
        writer.write(4, "train", {"loss": 2.0})
        writer.write(4, "eval", {"nelbo": 3.0})
        writer.write(4, trainer.EVAL_REPORT_SPLIT, {"nelbo": 2.9}, replace=True)
        writer.write(8, trainer.EVAL_REPORT_SPLIT, {"nelbo": 2.5}, replace=True)
    with metrics_lib.MetricWriter(workdir) as writer:  # a second --mode=eval of step 4
        writer.write(4, trainer.EVAL_REPORT_SPLIT, {"nelbo": 2.8}, replace=True)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [(r["step"], r["split"], r.get("nelbo", r.get("loss"))) for r in map(json.loads, f)]
    assert rows == [(4, "train", 2.0), (4, "eval", 3.0), (8, "eval_report", 2.5), (4, "eval_report", 2.8)]
