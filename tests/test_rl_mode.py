"""The RL training mode (ddlm/train/rl.py) and its local task (ddlm/data/tasks.py): the task's split, rewards
and SFT records; the rollout rows' layout; one-line errors for bad settings; and the mode end to end through
the trainer — GRPO and wd1 updates that change the network, logged rewards and rollout times, held-out
accuracy evals, checkpoints, and a resume that continues exactly (the same prompts, keys and parameters as
an uninterrupted run), on one device and on the 8-device mesh. The estimators' and losses' math is checked on
the exact oracle in tests/test_rl.py."""

import json
import os

import jax
import numpy as np
import pytest

from ddlm import checkpoints
from ddlm.data import tasks, tokenizers
from ddlm.sharding import ConfigError
from ddlm.train import lora, rl, trainer
import model_utils



def _config(name, arg="smoke"):
    return model_utils.experiment_config(name, arg)


# ------------------------------------------------------------------------------------------------ the task


def test_addition_split_is_fixed_disjoint_and_rewards_only_the_exact_sum():
    task = tasks.get_task("addition", digits=2)
    train = tasks.problems(task, "train", 3000, seed=0)
    test = tasks.problems(task, "test", 300, seed=0)
    train_keys, test_keys = {p.key for p in train}, {p.key for p in test}
    assert not train_keys & test_keys
    # The split hashes the operands: the same for any seed; about TEST_FRACTION of all pairs are held out.
    assert {p.key for p in tasks.problems(task, "test", 300, seed=7)} <= {
        f"{a}+{b}" for a in range(10, 100) for b in range(10, 100) if tasks.split_of(tasks.Problem("", "", f"{a}+{b}")) == "test"
    }
    held_out = np.mean([tasks.split_of(tasks.Problem("", "", f"{a}+{b}")) == "test" for a in range(10, 100) for b in range(10, 100)])
    assert abs(held_out - tasks.TEST_FRACTION) < 0.02
    for p in train[:50] + test[:50]:
        a, b = (int(x) for x in p.prompt.rstrip(":").split(" "))
        assert 10 <= a < 100 and 10 <= b < 100 and p.answer == str(a + b) and p.key == f"{a}+{b}"
        assert task.reward(p, p.answer) == 1.0 and task.reward(p, f"  {p.answer}\n") == 1.0
        assert task.reward(p, str(a + b + 1)) == 0.0 and task.reward(p, p.answer + "0") == 0.0
    assert task.format_ok(" 123 ") and not task.format_ok("12a") and not task.format_ok("")
    with pytest.raises(ValueError, match="digits must be an integer in"):
        tasks.get_task("addition", digits=0)
    with pytest.raises(ValueError, match="unknown task 'sudoku'"):
        tasks.get_task("sudoku")


def test_sft_records_hold_train_problems_only_and_are_written_once(tmp_path):
    config = _config("sft_addition")
    config.data.data_dir = str(tmp_path)
    task = tasks.get_task("addition", digits=2)
    path = tasks.sft_records(task, config.data, n=200, seed=3)
    assert path.startswith(str(tmp_path))
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 200
    expected = tasks.problems(task, "train", 200, seed=3)
    assert rows == [{"prompt": p.prompt, "response": p.answer} for p in expected]
    mtime = os.stat(path).st_mtime_ns
    assert tasks.sft_records(task, config.data, n=200, seed=3) == path and os.stat(path).st_mtime_ns == mtime


def test_rollout_rows_put_the_prompt_after_bos_and_decode_up_to_eos():
    config = _config("rl_addition")
    tok = tokenizers.get_tokenizer(config.data)
    problems = tasks.problems(tasks.get_task("addition", digits=3), "train", 2, seed=0)
    x, m = rl.encode_prompts(tok, problems, 16, repeat=3)
    assert x.shape == m.shape == (6, 16) and x.dtype == np.int32 and m.dtype == np.float32
    for i, p in enumerate(problems):
        ids = [tok.bos_id] + tok.encode(p.prompt)
        for r in range(3):
            row = 3 * i + r
            assert list(x[row, : len(ids)]) == ids and (x[row, len(ids) :] == tok.mask_id).all()
            assert (m[row, : len(ids)] == 0).all() and (m[row, len(ids) :] == 1).all()
    # A completion: the response part up to its first eos; no eos: the whole response.
    filled = x.copy()
    n = 1 + len(problems[0].prompt)
    answer = tok.encode("1234")
    filled[0, n : n + 4] = answer
    filled[0, n + 4] = tok.eos_id
    filled[0, n + 5 :] = tok.encode("9" * (16 - n - 5))
    filled[1, n:] = tok.encode("7" * (16 - n))
    texts = rl.completions(tok, filled[:2], m[:2])
    assert texts == ["1234", "7" * (16 - n)]


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("rl.group_size", 1, "config.rl.group_size must be an integer >= 2"),
        ("rl.estimator", "exact", "config.rl.estimator must be one of"),
        ("rl.objective", "ppo", "config.rl.objective must be one of"),
        ("rl.p_mask", 1.0, r"config.rl.p_mask must be in \[0, 1\)"),
        ("rl.clip_eps", 0.0, r"config.rl.clip_eps must be in \(0, 1\)"),
        ("rl.beta", float("nan"), "config.rl.beta must be a finite number >= 0"),
        ("rl.task", "chess", "config.rl.task must be one of"),
        ("train.batch_size", 12, "must be a multiple of config.rl.group_size=8"),
        ("optim.grad_accum_steps", 2, "config.optim.grad_accum_steps must be 1 in the RL mode"),
        ("train.init_from", "", "config.train.init_from must name the SFT run to start from"),
        ("model.time_conditioning", True, "config.model.time_conditioning must be False in the RL mode"),
        ("train.seq_len", 10, "config.train.seq_len=10 leaves no room for the answer"),
        ("diffusion.loss", "mdlm", "the RL mode .* fine-tunes an SFT model"),
    ],
)
def test_rl_config_errors_are_one_line(field, value, match):
    config = _config("rl_addition", "")
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=match) as e:
        trainer.validate_config(config, 1)
    assert "\n" not in str(e.value)


def test_qlora_rollouts_need_the_uncached_sampler():
    config = _config("rl_addition", "lora=4")
    config.lora.quantize = "int8"
    with pytest.raises(ConfigError, match="config.sampler.cache='dual' decodes merged weights") as e:
        trainer.validate_config(config, 1)
    assert "\n" not in str(e.value)
    config.sampler.cache = "none"
    trainer.validate_config(config, 1)


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def sft_base(tmp_path_factory):
    """The SFT warm start: experiments/sft_addition.py at smoke size, 2 steps (what RL starts from and the
    reference it regularises towards)."""
    workdir = str(tmp_path_factory.mktemp("sft_addition"))
    trainer.train_and_evaluate(_config("sft_addition"), workdir, jax.devices()[:1])
    return workdir


@pytest.fixture
def rewarded(monkeypatch):
    """A reward the smoke-size network earns on about half its rollouts (an untrained network never writes
    the sum): the parity of the completion's character codes. Any deterministic function of the text would
    do; the point is non-zero advantages, so that updates change the network."""
    monkeypatch.setattr(tasks.Addition, "reward", lambda self, p, s: float(sum(map(ord, s)) % 2))


def _rl_config(sft_dir, arg="smoke", **fields):
    config = _config("rl_addition", arg)
    config.train.init_from = sft_dir
    config.train.steps, config.train.ckpt_every, config.train.eval_every, config.train.log_every = 3, 1, 2, 1
    config.optim.warmup_steps = 1
    config.optim.lr = 3e-2  # a visible change in 3 steps of a smoke-size network
    for k, v in fields.items():
        section, name = k.split(".")
        config[section][name] = v
    return config


def _rows(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def _restore(config, workdir, devices):
    setup = trainer.build(config, devices)
    with checkpoints.Checkpointer(os.path.join(workdir, checkpoints.CHECKPOINTS_DIR), read_only=True) as ck:
        state, step = ck.restore_latest(setup.abstract_state())
    return state, step


@pytest.mark.parametrize(
    "arg,fields,resume",
    [
        ("smoke", {}, True),  # GRPO, NELBO estimator, no reference (beta = 0); and the resume
        # wd1, d1's estimator, KL to the reference (the resume path is the same: checked once)
        ("smoke,estimator=mean_field,objective=wd1", {"rl.beta": 0.05}, False),
    ],
)
def test_rl_mode_updates_the_policy_and_resumes_exactly(sft_base, rewarded, tmp_path, arg, fields, resume):
    devices = jax.devices()[:1]
    config = _rl_config(sft_base, arg, **fields)
    straight = str(tmp_path / "straight")
    result = trainer.train_and_evaluate(config, straight, devices)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["problems"] == config.rl.eval_problems
    train = _rows(straight, "train")
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(0.0 < r["reward"] < 1.0 for r in train)  # the rewarded groups have non-zero advantages
    assert all(r["rollout_s"] > 0 and r["reference_s"] >= 0 for r in train)
    assert (train[0]["reference_s"] > 0) == bool(config.rl.beta)  # the reference runs only with a KL term
    assert all(r["grad_norm"] > 0 and np.isfinite(r["loss"]) for r in train)
    if config.rl.beta:
        assert train[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step's policy is the reference
        assert train[-1]["kl"] > 0
    evals = _rows(straight, "eval")
    assert [r["step"] for r in evals] == [2, 3]
    assert all(set(r) >= {"accuracy", "accuracy_se", "format", "problems"} for r in evals)
    # The update moved the network away from the SFT start.
    final, step = _restore(config, straight, devices)
    assert step == 3
    start = trainer.build(config, devices)
    from ddlm.train import adapt

    base = adapt.load_init_params(sft_base, start.abstract_state().params, start.tokenizer)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(base)))
    assert moved > 1e-3
    if not resume:
        return

    # Interrupted after step 2, resumed to 3: the same prompts, rollouts and update, bit for bit.
    resumed = str(tmp_path / "resumed")
    config.train.steps = 2
    trainer.train_and_evaluate(config, resumed, devices)
    config.train.steps = 3
    trainer.train_and_evaluate(config, resumed, devices)
    again, _ = _restore(config, resumed, devices)
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(final.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["reward"] for r in _rows(resumed, "train")] == [r["reward"] for r in train]


def test_rl_mode_runs_sharded_and_with_lora_adapters(sft_base, rewarded, tmp_path):
    """The 8-device mesh (rows over the data axis) with rank-4 adapters on the frozen SFT network and a KL
    to the reference (the base itself): the adapters train, the checkpoint holds them alone, and the KL
    starts at zero (the adapted network starts as the base) and grows."""
    config = _rl_config(sft_base, "smoke,lora=4", **{"rl.beta": 0.05})
    workdir = str(tmp_path / "lora8")
    trainer.train_and_evaluate(config, workdir, jax.devices())
    train = _rows(workdir, "train")
    assert len(train) == 3 and all(r["grad_norm"] > 0 for r in train)
    # Step 1's rate is 0 (warmup), so the policy moves at step 2 and the KL shows at step 3.
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-6) and train[-1]["kl"] > 0
    state, step = _restore(config, workdir, jax.devices())
    assert step == 3
    names = checkpoints.leaf_paths(state.params)[0]
    assert names and all(n.endswith(lora.ADAPTER_SUFFIXES) for n in names)
    b = [v for k, v in zip(names, jax.tree.leaves(state.params)) if k.endswith("_lora_b")]
    assert any(float(np.abs(np.asarray(v)).max()) > 0 for v in b)  # the adapters trained
