"""LLaDA-style SFT (ddlm/data/sft.py, losses 'sft'): rows and their masks, the loss on a real batch (prompt
never masked, no loss there), the SFT NELBO with the exact oracle on a conditional toy distribution (equals
the conditional entropy, exactly and as the training estimator's mean), and the SFT quickstart end to end
(its loss falls, its samples start with the prompt and stop with eos)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm import losses, schedules
from ddlm.data import pipeline, sft, tokenizers

try:  # the toy oracle is moving to ddlm/eval/oracle.py (with a re-export in tests/)
    from ddlm.eval import oracle
except ImportError:
    import oracle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTE = tokenizers.ByteTokenizer()
RECORDS = [
    {"prompt": "What is the capital of France?", "response": "Paris."},
    {"prompt": "Hi", "response": "Hello there, how are you?"},
    {"prompt": "", "response": "An answer to nothing."},
    {"prompt": "Say nothing.", "response": ""},
    {"prompt": "Count", "response": "one two three"},
    {"prompt": "Colour?", "response": "Blue."},
    {"prompt": "Yes or no?", "response": "No."},
    {"prompt": "Name a play", "response": "Hamlet"},
]


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def sft_config(path, template="chat", **fields):
    c = pipeline.default_config()
    c.tokenizer, c.sft_data, c.sft_template, c.validation_fraction = "byte", str(path), template, 0.25
    for k, v in fields.items():
        c[k] = v
    return c


def expected_row(prompt, response, template, seq_len):
    """The LLaDA row built independently of ddlm.data.sft: bos, templated prompt, response, eos padding."""
    text = prompt if template == "none" else f"[user] {prompt}\n[assistant] "
    head = [BYTE.bos_id] + list(text.encode())
    body = head + list(response.encode()) + [BYTE.eos_id]
    tokens = (body + [BYTE.eos_id] * seq_len)[:seq_len]
    return tokens, [0.0] * len(head) + [1.0] * (seq_len - len(head))


# ------------------------------------------------------------------------------------------------ data


@pytest.mark.parametrize("template", ["chat", "none"])
def test_rows_are_bos_prompt_response_eos_padding_and_cover_every_record_once(tmp_path, template):
    write_jsonl(tmp_path / "a.jsonl", RECORDS[:5])
    write_jsonl(tmp_path / "b.jsonl", RECORDS[5:])
    config = sft_config(tmp_path, template)
    seq_len = 80
    seen = []
    for split in ("train", "validation"):
        it = pipeline.make_iterator(config, BYTE, split, global_batch_size=1, seq_len=seq_len, num_epochs=1)
        for batch in it:
            assert batch["tokens"].shape == batch["loss_mask"].shape == (1, seq_len)
            assert batch["tokens"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
            seen.append((split, batch["tokens"][0].tolist(), batch["loss_mask"][0].tolist()))
    splits = {s for s, _, _ in seen}
    assert splits == {"train", "validation"}  # both splits non-empty, by the hash of each record's key
    rows = sorted((t, m) for _, t, m in seen)
    want = sorted(expected_row(r["prompt"], r["response"], template, seq_len) for r in RECORDS)
    assert rows == want  # every record exactly once over the two splits, laid out as LLaDA's rows


def test_truncation_is_counted_and_a_prompt_without_room_is_an_error(tmp_path):
    write_jsonl(tmp_path / "r.jsonl", [{"prompt": "ab", "response": "x" * 30}] * 4)
    config = sft_config(tmp_path / "r.jsonl", "none", validation_fraction=0.0)
    it = pipeline.make_iterator(config, BYTE, "train", global_batch_size=2, seq_len=16, num_epochs=1)
    batch = next(it)
    # bos + 'ab' + 30 x + eos = 34 tokens in 16: 18 cut, no eos left in the row.
    assert batch["tokens"][0].tolist() == [BYTE.bos_id, 97, 98] + [120] * 13
    assert it.truncated_tokens == 2 * 18
    write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p" * 20, "response": "r"}] * 4)
    it = pipeline.make_iterator(config, BYTE, "train", global_batch_size=2, seq_len=16)
    with pytest.raises(ValueError, match=r"r.jsonl:\d+: the prompt takes 21 tokens .* train.seq_len=16"):
        next(it)


def test_bad_records_and_paths_are_one_clear_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(
        ValueError, match=r"bad.jsonl:3: expected a JSON object with string fields 'prompt' and"
    ):
        sft.read_records(str(path))
    path.write_text("not json\n")
    with pytest.raises(ValueError, match=r"^config\.data\.sft_data: .*bad.jsonl:1: not a JSON object"):
        sft.read_records(str(path))
    with pytest.raises(ValueError, match="config.data.sft_data: .*missing does not exist"):
        sft.read_records(str(tmp_path / "missing"))
    config = sft_config(tmp_path, "chatml")
    write_jsonl(path, RECORDS)
    with pytest.raises(ValueError, match="config.data.sft_template must be one of"):
        pipeline.make_iterator(config, BYTE, "train", global_batch_size=1, seq_len=64)


def test_a_binary_file_is_one_line_naming_the_field_the_file_and_the_line(tmp_path):
    """A file that is not UTF-8 text (here a PNG's header on line 3, after a good record and a blank line)
    used to be a bare UnicodeDecodeError naming neither the file nor config.data.sft_data."""
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n\n\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\n')
    for config in (str(path), str(tmp_path)):  # the file, and a folder of .jsonl files
        with pytest.raises(ValueError) as info:
            sft.read_records(config)
        message = str(info.value)
        assert message == (
            f"config.data.sft_data: {path}:3: not UTF-8 text (byte 0x89 at offset 34); expected JSON lines "
            "with string fields 'prompt' and 'response'"
        )
    # Through the pipeline (what --mode=train reads) the same line reaches the user.
    with pytest.raises(ValueError, match=rf"^config\.data\.sft_data: {path}:3: not UTF-8 text"):
        pipeline.make_iterator(sft_config(path), BYTE, "train", global_batch_size=1, seq_len=64)


def test_processes_get_disjoint_records_and_state_restores_exactly(tmp_path):
    write_jsonl(tmp_path / "r.jsonl", [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(40)])
    config = sft_config(tmp_path, "none", validation_fraction=0.0)
    rows = []
    for p in range(2):
        it = pipeline.make_iterator(
            config,
            BYTE,
            "train",
            global_batch_size=4,
            seq_len=12,
            num_epochs=1,
            process_index=p,
            process_count=2,
        )
        rows.append({tuple(r) for b in it for r in b["tokens"].tolist()})
    # 39 train records (one goes to validation): 20 and 19 per process, 2 per batch; both stop after the
    # poorer process's 9 batches.
    assert len(rows[0]) == len(rows[1]) == 18 and not rows[0] & rows[1]
    it = pipeline.make_iterator(config, BYTE, "train", global_batch_size=4, seq_len=12, seed=3)
    next(it)
    state = it.get_state()
    want = [next(it)["tokens"] for _ in range(3)]
    it.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(it)["tokens"], w)


def test_trainer_rejects_sft_loss_without_sft_data():
    from ddlm.train import trainer
    from ddlm.train.sharding import ConfigError

    config = load_experiment("sft_quickstart")
    config.data.sft_data = ""
    with pytest.raises(ConfigError, match="config.diffusion.loss='sft' and config.data.sft_data go together"):
        trainer.validate_config(config, 1)


# ------------------------------------------------------------------------------------------------ the loss


def test_prompt_is_never_masked_and_carries_no_loss(tmp_path):
    """On a real batch: x_t equals x_0 on every prompt position for every draw, and the loss's gradient
    with respect to the logits is exactly zero there (and not on the response)."""
    write_jsonl(tmp_path / "r.jsonl", RECORDS)
    config = sft_config(tmp_path, "chat", validation_fraction=0.0)
    batch = next(pipeline.make_iterator(config, BYTE, "train", global_batch_size=6, seq_len=64))
    x0, loss_mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["loss_mask"])
    prompt = loss_mask == 0
    assert prompt.any(axis=1).all() and (~prompt).any(axis=1).all()
    logits0 = jax.random.normal(jax.random.key(0), x0.shape + (BYTE.vocab_size,))
    sched = schedules.LinearSchedule()

    @jax.jit
    def loss_and_xt(logits, rng):
        seen = {}

        def apply_fn(xt, t, ctx):
            seen["xt"] = xt
            return logits

        loss, aux = losses.training_loss(
            "sft",
            apply_fn,
            x0,
            loss_mask,
            rng,
            schedule=sched,
            vocab_size=BYTE.vocab_size,
            mask_id=BYTE.mask_id,
        )
        return loss, (seen["xt"], aux["mask_rate"])

    grad_fn = jax.jit(jax.grad(lambda lg, rng: loss_and_xt(lg, rng)[0]))
    masked_response = 0.0
    for i in range(20):
        rng = jax.random.key(i)
        _, (xt, rate) = loss_and_xt(logits0, rng)
        np.testing.assert_array_equal(np.where(prompt, xt, 0), np.where(prompt, x0, 0))
        masked_response += float(jnp.mean(xt[~prompt] == BYTE.mask_id))
        grads = grad_fn(logits0, rng)
        assert float(jnp.max(jnp.abs(grads[prompt]))) == 0.0
        assert float(jnp.max(jnp.abs(grads[~prompt]))) > 0.0 or float(rate) == 0.0
    # Linear schedule: the response is masked at rate t ~ U[0, 1), 0.5 on average.
    assert 0.35 < masked_response / 20 < 0.65


def test_sft_mean_normalises_each_example_by_its_response_length():
    rng = np.random.default_rng(0)
    per_token = rng.random((4, 6))
    mask = np.array(
        [[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]], np.float32
    )
    want = np.mean([per_token[b][mask[b] > 0].sum() / max(mask[b].sum(), 1) for b in range(4)])
    np.testing.assert_allclose(
        float(losses.sft_mean(jnp.asarray(per_token), jnp.asarray(mask))), want, rtol=1e-6
    )


# ------------------------------------------------------------------------------------------------ oracle

TOY = oracle.ToyDistribution(num_tokens=3, length=5, seed=0)
V, L, MASK = TOY.num_tokens, TOY.length, TOY.mask_id


def prefix_entropy(k):
    """H(x_0^{<k}) of the toy, in nats."""
    idx = np.zeros(len(TOY.seqs), np.int64)
    for j in range(k):
        idx = idx * V + TOY.seqs[:, j]
    m = np.bincount(idx, weights=TOY.probs, minlength=V**k)
    m = m[m > 0]
    return float(-np.sum(m * np.log(m)))


def suffix_entropy(start):
    """H(x_0^{>=start}) of the toy (the response's entropy without its prompt), in nats."""
    idx = np.zeros(len(TOY.seqs), np.int64)
    for j in range(start, L):
        idx = idx * V + TOY.seqs[:, j]
    m = np.bincount(idx, weights=TOY.probs)
    m = m[m > 0]
    return float(-np.sum(m * np.log(m)))


def conditional_entropy(prompt_len):
    """H(response | prompt) = H(x) - H(prompt), the prompt being the first prompt_len tokens."""
    return TOY.entropy() - prefix_entropy(prompt_len)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("prompt_len", [1, 2])
def test_sft_oracle_nelbo_equals_conditional_entropy(x64, prompt_len):
    """Exactly: every x_0 with its probability, every masking of the response with its probability at t,
    integrated over t (Gauss-Legendre); the prompt stays clean. With the exact denoiser the SFT NELBO
    (summed over the response) is H(response | prompt), far below the unconditional H(response)."""
    r = L - prompt_len
    patterns = np.array([[0] * prompt_len + list(p) for p in np.ndindex(*(2,) * r)], bool)
    x0 = np.repeat(TOY.seqs, len(patterns), axis=0)
    pat = np.tile(patterns, (len(TOY.seqs), 1))
    xt = np.where(pat, MASK, x0).astype(np.int32)
    px0, m = np.repeat(TOY.probs, len(patterns)), pat.sum(1)
    logits = TOY.absorbing_denoiser()(jnp.asarray(xt))
    sched = schedules.CosineSchedule()
    nodes, weights = np.polynomial.legendre.leggauss(96)

    @jax.jit
    def at(t):
        a = sched.alpha(t)
        prob = jnp.asarray(px0) * a ** (r - m) * (1 - a) ** m
        per = losses.mdlm_loss(logits, jnp.asarray(x0), jnp.asarray(xt), jnp.full((len(x0),), t), sched, MASK)
        return jnp.sum(prob * per.sum(1))

    nelbo = sum(0.5 * w * float(at(jnp.float64(0.5 * (n + 1)))) for n, w in zip(nodes, weights))
    assert abs(nelbo - conditional_entropy(prompt_len)) < 1e-6, (nelbo, conditional_entropy(prompt_len))
    assert suffix_entropy(prompt_len) > conditional_entropy(prompt_len) + 0.1  # the prompt matters


def test_sft_training_loss_is_unbiased_for_the_per_example_conditional_entropy(x64):
    """training_loss('sft') with the oracle on rows whose prompts have 1 or 4 tokens (responses of 4 and
    1): its mean is 1/2 (H(x^{>=1} | x^0) / 4 + H(x^4 | x^{<4}) / 1). A token mean instead of the
    per-example normalisation would be many standard errors away. (Rows of 4096: the 1/t weight makes
    the loss heavy-tailed, and small batches' standard errors are unreliable.)"""
    den = TOY.absorbing_denoiser()
    sched = schedules.CosineSchedule()
    batch = 4096
    prompt_len = np.where(np.arange(batch) % 2 == 0, 1, 4)
    loss_mask = jnp.asarray((np.arange(L)[None, :] >= prompt_len[:, None]).astype(np.float64))

    @jax.jit
    def one(key):
        k1, k2 = jax.random.split(key)
        return losses.training_loss(
            "sft",
            lambda xt, t, c: den(xt),
            TOY.sample(k1, batch),
            loss_mask,
            k2,
            schedule=sched,
            vocab_size=V + 1,
            mask_id=MASK,
        )[0]

    vals = np.array([float(one(k)) for k in jax.random.split(jax.random.key(3), 48)])
    mean, se = vals.mean(), vals.std(ddof=1) / math.sqrt(len(vals))
    h1, h4 = conditional_entropy(1), conditional_entropy(4)
    target = 0.5 * (h1 / 4 + h4 / 1)
    assert abs(mean - target) < 4 * se, (mean, target, se)
    token_mean = (h1 + h4) / 5
    assert abs(token_mean - target) > 6 * se


# ------------------------------------------------------------------------------------------------ end to end


def load_experiment(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


TINY = {
    "model.num_layers": 1,
    "model.d_model": 32,
    "model.num_heads": 2,
    "model.mlp_dim": 64,
    "model.cond_dim": 16,
    "train.steps": 60,
    "train.batch_size": 16,
    "train.eval_batch_size": 16,
    "train.log_every": 10,
    "train.eval_every": 0,
    "train.ckpt_every": 0,
    "train.eval_batches": 2,
    "train.sample_at_end": False,
    "optim.warmup_steps": 5,
    "optim.lr": 3e-3,
    "optim.decay": "constant",
    "optim.ema_decay": 0.9,
    "sampler.steps": 16,
    "sampler.truncate_at_eos": False,
    "sampler.progress": False,
}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """experiments/sft_quickstart.py at a tiny size, 60 steps on the 8 fake devices (data parallel, global
    sharded SFT batches); returns (config, workdir, eval metrics)."""
    from ddlm.train import trainer

    config = load_experiment("sft_quickstart")
    config.update_from_flattened_dict(TINY)
    workdir = str(tmp_path_factory.mktemp("sft_quickstart"))
    result = trainer.train_and_evaluate(config, workdir)
    return config, workdir, result


def test_sft_quickstart_loss_falls(sft_run):
    _, workdir, result = sft_run
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        train = [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]
    assert len(train) == 6 and all(np.isfinite(train))
    assert train[-1] < 0.6 * train[0], train
    assert result["nelbo"] < 0.6 * train[0], (result, train)


def test_sft_model_samples_after_the_prompt_and_stops_with_eos(sft_run):
    """The samplers' CLI on the SFT model: rows start with bos + the templated prompt (clamped), and the
    learned eos padding fills the end of the canvas (an untrained model puts eos at ~1/85 of positions).
    Sampled without truncation at the first eos, to see the canvas the model wrote."""
    from ddlm.sampling import cli

    config, workdir, _ = sft_run
    records = cli.run_sampling(config, workdir)
    tok = tokenizers.get_tokenizer(config.data)
    prompt = sft.encode_prompt(tok, config.sampler.prompt, "chat")
    tokens = np.array([r["tokens"] for r in records])
    assert tokens.shape == (config.sampler.num_samples, config.train.seq_len)
    assert (tokens[:, : len(prompt)] == prompt).all()
    assert ((tokens[:, len(prompt) :] == tok.eos_id).any(axis=1)).all()  # each sample ends (at its first eos)
    tail = tokens[:, -config.train.seq_len // 4 :]
    assert np.mean(tail == tok.eos_id) > 0.5, tokens  # 0.76 after 60 steps
    assert all(r["text"].startswith(sft.template_prompt(config.sampler.prompt, "chat")) for r in records)


def test_sft_model_conditional_likelihood_prefers_text_to_noise(sft_run):
    """The conditional likelihood estimator on the trained network (rows padded with eos like its training
    rows): a real reply is far more likely than random characters of the same length."""
    from ddlm.eval import conditional
    from ddlm.train import trainer

    config, workdir, _ = sft_run
    setup, params, _ = trainer.load_params(config, workdir)
    tok = setup.tokenizer

    def denoise_fn(xt, t):
        return setup.model.apply({"params": params}, xt, t, x0=None, train=False)

    estimate = conditional.make_estimator(denoise_fn, mask_id=tok.mask_id, batch_size=8)
    reply = "I will, my lord, and so farewell."
    noise = "".join(np.random.default_rng(0).choice(list(tok.alphabet[1:]), len(reply)))
    result = conditional.multiple_choice(
        estimate,
        jax.random.key(0),
        sft.encode_prompt(tok, config.sampler.prompt, "chat"),
        [tok.encode(noise), tok.encode(reply)],
        num_samples=32,
        length=config.train.seq_len,
        end_id=tok.eos_id,
    )
    a, b = result.estimates
    assert result.best == 1 and np.isfinite([a.mean, b.mean, a.se, b.se]).all()
    assert b.mean - a.mean > 5 * math.hypot(a.se, b.se), result
