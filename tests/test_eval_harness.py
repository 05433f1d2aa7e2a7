"""The lm-evaluation-harness backend `ddlm` (ddlm/eval/harness.py) on the local tasks of tests/data/lm_eval
(multiple choice, generation with stop sequences, rolling perplexity), run through lm-eval's own evaluator:
every score it reports equals ddlm's direct computation, for an AR and an MDLM workdir (tiny networks with
random, nowhere-zero parameters, written as params-only checkpoints: no training)."""

import configparser
import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from ddlm import checkpoints, models, sharding  # noqa: E402
from ddlm.data import tokenizers  # noqa: E402
from ddlm.eval import conditional, likelihood  # noqa: E402
from ddlm.sampling import parallel  # noqa: E402
from ddlm.train import config_lib as cl  # noqa: E402

from model_utils import random_variables  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join("tests", "data", "lm_eval")
SEQ_LEN = 128
STOPS = ["\n", "."]


def random_workdir(workdir, loss: str, *, sampler: str = "ancestral"):
    """A workdir holding a params-only checkpoint (as ddlm.convert writes) of a 1-layer, 32-wide network with
    random parameters and the byte tokenizer; returns its config."""
    import flax.linen as nn

    model_config = cl.model_config(
        "tiny",
        name="ar" if loss == "ar" else "dit",
        num_layers=1,
        d_model=32,
        num_heads=2,
        mlp_dim=64,
        cond_dim=16,
        time_conditioning=loss != "ar",
    )
    config = cl.base_config(
        model=model_config,
        diffusion=cl.diffusion_config(loss),
        data=cl.data_config(tokenizer="byte"),
        optim=cl.optim_config(),
        mesh=cl.mesh_config(),
        train=cl.train_config(steps=1, batch_size=8, seq_len=SEQ_LEN),
        sampler=cl.sampler_config(name=sampler),
    )
    tok = tokenizers.get_tokenizer(config.data)
    model = models.get_model(config.model, tok.vocab_size)
    tokens, t, x0 = sharding.model_init_inputs(loss, 1, SEQ_LEN)
    params = nn.meta.unbox(random_variables(model, tokens, None if loss == "ar" else t, x0))["params"]
    mesh = sharding.make_mesh(config.mesh, jax.devices())
    meta = checkpoints.params_only_metadata(config, tok)
    step = jax.device_put(np.zeros((), np.int32), sharding.replicated(mesh))
    directory = os.path.join(str(workdir), checkpoints.CHECKPOINTS_DIR)
    with checkpoints.Checkpointer(directory, keep=1, async_save=False) as checkpointer:
        checkpointer.save(0, {"params": params, "step": step}, metadata=meta, force=True)
    return config


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    random_workdir(root / "ar", "ar", sampler="ar")
    random_workdir(root / "mdlm", "mdlm")
    return {"ar": str(root / "ar"), "mdlm": str(root / "mdlm")}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """The task files name their data relative to the repository; nothing is downloaded."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets"))


def read_jsonl(name):
    with open(os.path.join(REPO, TASKS, name)) as f:
        return [json.loads(line) for line in f]


def evaluate(lm, tasks, limit=None):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=TaskManager(include_path=TASKS),
        log_samples=True,
        limit=limit,
        bootstrap_iters=0,
    )


def by_doc(out, task):
    return sorted(out["samples"][task], key=lambda s: s["doc_id"])


def direct_logits_fn(lm):
    """logits(tokens [B, L], t) of the loaded network, jitted: ddlm's forward pass, called here directly."""
    model, params = lm.loaded.model, lm.loaded.params
    return jax.jit(lambda x, t=None: model.apply({"params": params}, x, t, x0=None, train=False))


def cut(text, stops=STOPS):
    for s in stops:
        if s in text:
            text = text[: text.index(s)]
    return text


def word_perplexity(lls, texts):
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    return math.exp(-sum(lls) / words)


# --------------------------------------------------------------------------------------------
# AR: exact scores
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_ar_workdir_under_lm_eval_equals_its_direct_scores(workdirs):
    from ddlm.eval import harness

    lm = harness.DDLMLM(workdir=workdirs["ar"], sampler="ar:greedy=true", batch_size=4)
    out = evaluate(lm, ["ddlm_local_mc", "ddlm_local_gen", "ddlm_local_ppl"])
    tok, logits = lm.tok, direct_logits_fn(lm)

    def log_probs(ids):  # ids [n] -> log p(ids[i] | ids[:i]) [n - 1], from one padded forward pass
        x = np.full((1, SEQ_LEN), tok.pad_id, np.int32)
        x[0, : len(ids)] = ids
        z = np.asarray(logits(x)[0, : len(ids) - 1], np.float64)
        z[:, tok.mask_id] = -np.inf  # the mask id is never predicted (ar_sample never draws it)
        lp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
        return lp[np.arange(len(ids) - 1), ids[1:]]

    # multiple choice: log p(choice | bos question), summed over the choice's bytes
    # (lm-eval's requests: the question, then " " + each choice)
    docs, correct = read_jsonl("mc.jsonl"), []
    for doc, sample in zip(docs, by_doc(out, "ddlm_local_mc")):
        assert [a[1] for a in sample["arguments"]] == [" " + c for c in doc["choices"]]
        prompt = [tok.bos_id] + tok.encode(doc["question"])
        direct = [
            float(np.sum(log_probs(prompt + tok.encode(" " + c))[len(prompt) - 1 :])) for c in doc["choices"]
        ]
        got = [r[0][0] for r in sample["resps"]]
        np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-4)
        correct.append(int(np.argmax(direct)) == doc["label"])
    assert out["results"]["ddlm_local_mc"]["acc,none"] == pytest.approx(np.mean(correct))

    # rolling: the exact log-likelihood of bos text (every text fits the window)
    texts = [d["text"] for d in read_jsonl("ppl.jsonl")]
    direct = [float(np.sum(log_probs([tok.bos_id] + tok.encode(t)))) for t in texts]
    got = [s["resps"][0][0] for s in by_doc(out, "ddlm_local_ppl")]
    np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-4)
    ppl = out["results"]["ddlm_local_ppl"]["word_perplexity,none"]
    assert ppl == pytest.approx(word_perplexity(direct, texts), rel=1e-4)

    # generation: greedy decoding token by token, 12 tokens, cut at the task's stop sequences
    for doc, sample in zip(read_jsonl("gen.jsonl"), by_doc(out, "ddlm_local_gen")):
        ids = [tok.bos_id] + tok.encode(doc["prompt"])
        for _ in range(12):
            x = np.full((1, SEQ_LEN), tok.pad_id, np.int32)
            x[0, : len(ids)] = ids
            ids.append(int(np.argmax(np.asarray(logits(x))[0, len(ids) - 1])))
        new = ids[-12:]
        new = new[: next((i for i, t in enumerate(new) if t in (tok.eos_id, tok.pad_id)), 12)]
        assert sample["resps"][0][0] == cut(tok.decode(new))
        assert sample["filtered_resps"][0] == cut(tok.decode(new))

    # is_greedy: true exactly when every continuation token is the argmax (token ids: a random network's
    # argmax bytes need not decode to text)
    ids = [tok.bos_id] + tok.encode("To be")
    for _ in range(3):
        x = np.full((1, SEQ_LEN), tok.pad_id, np.int32)
        x[0, : len(ids)] = ids
        ids.append(int(np.argmax(np.asarray(logits(x))[0, len(ids) - 1])))
    greedy = harness.Encoded(ids[:-3], ids[-3:])
    other = harness.Encoded(ids[:-3], ids[-3:-1] + [(ids[-1] + 1) % 256])
    assert [g for _, g in lm.loglikelihood_encoded(["To be"] * 2, [greedy, other])] == [True, False]


# --------------------------------------------------------------------------------------------
# Diffusion: Monte-Carlo conditional likelihood, NELBO, any sampler
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_mdlm_workdir_under_lm_eval_equals_its_direct_scores(workdirs, caplog):
    from ddlm.eval import harness

    lm = harness.DDLMLM(
        workdir=workdirs["mdlm"],
        sampler=f"parallel:rule=low_confidence:temperature=0:steps={SEQ_LEN}",
        num_samples=32,
        mc_batch_size=16,
        time_samples=4,
        greedy_check=False,
        batch_size=4,
    )
    with caplog.at_level("INFO", logger="lm_eval.ddlm"):
        out = evaluate(lm, ["ddlm_local_mc", "ddlm_local_gen", "ddlm_local_ppl"], limit=2)
    tok, logits = lm.tok, direct_logits_fn(lm)
    schedule = lm.schedule
    # conditional.make_estimator over the same network (the backend's, compiled once)
    estimate = lm.estimator()

    # multiple choice: log p(" " + choice | bos question) by the conditional estimator on the window's row
    # (context, choice, masked tail) with the question's key (common random numbers)
    correct = []
    for doc, sample in zip(read_jsonl("mc.jsonl")[:2], by_doc(out, "ddlm_local_mc")):
        prompt = [tok.bos_id] + tok.encode(doc["question"])
        direct = []
        for choice in doc["choices"]:
            ids = tok.encode(" " + choice)
            tokens = np.asarray(prompt + ids + [tok.mask_id] * (SEQ_LEN - len(prompt) - len(ids)), np.int32)
            response = (np.arange(SEQ_LEN) >= len(prompt)) & (np.arange(SEQ_LEN) < len(prompt) + len(ids))
            key = harness.request_key(0, doc["question"])
            direct.append(estimate(key, tokens, response, num_samples=32).mean)
        got = [r[0][0] for r in sample["resps"]]
        np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-4)
        assert all(not r[0][1] for r in sample["resps"])  # greedy_check=false
        correct.append(int(np.argmax(direct)) == doc["label"])
    assert out["results"]["ddlm_local_mc"]["acc,none"] == pytest.approx(np.mean(correct))
    # the standard error of every estimate is kept and logged beside lm-eval's lines
    assert all(e.se > 0 and e.num_samples == 32 for e in lm.estimates)
    assert any("standard error" in r.getMessage() for r in caplog.records)

    # rolling: minus the NELBO of bos text (bos not scored), with the text's key
    texts = [d["text"] for d in read_jsonl("ppl.jsonl")[:2]]
    direct = []
    for text in texts:
        x0 = np.asarray([[tok.bos_id] + tok.encode(text)], np.int32)
        mask = np.ones(x0.shape, np.float32)
        mask[0, 0] = 0
        est = likelihood.nelbo_per_sequence(
            "mdlm",
            lambda xt, t, ctx: logits(xt, t).astype(jnp.float32),
            x0,
            mask,
            jax.random.fold_in(harness.request_key(0, text), 0),
            schedule=schedule,
            vocab_size=tok.vocab_size,
            mask_id=tok.mask_id,
            time_samples=4,
        )
        direct.append(-float(est.nats[0]))
    got = [s["resps"][0][0] for s in by_doc(out, "ddlm_local_ppl")]
    np.testing.assert_allclose(got, direct, rtol=1e-4)
    assert out["results"]["ddlm_local_ppl"]["word_perplexity,none"] == pytest.approx(
        word_perplexity(direct, texts), rel=1e-3
    )

    # generation: greedy, the most confident masked position first, one per step, over the whole canvas
    for doc, sample in zip(read_jsonl("gen.jsonl")[:2], by_doc(out, "ddlm_local_gen")):
        prompt = [tok.bos_id] + tok.encode(doc["prompt"])
        x = np.asarray([prompt + [tok.mask_id] * (SEQ_LEN - len(prompt))], np.int32)
        while (x == tok.mask_id).any():
            t = parallel.sequence_time(jnp.asarray(x), tok.mask_id, schedule)
            lg = np.asarray(logits(x, t), np.float64)[0]
            lg[:, tok.mask_id] = -np.inf
            p = np.exp(lg - lg.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            conf = np.where(x[0] == tok.mask_id, p.max(-1), -np.inf)
            pos = int(np.argmax(conf))
            x[0, pos] = int(np.argmax(p[pos]))
        new = x[0, len(prompt) : len(prompt) + 12].tolist()
        new = new[: next((i for i, t in enumerate(new) if t in (tok.eos_id, tok.pad_id)), 12)]
        assert sample["filtered_resps"][0] == cut(tok.decode(new))


@pytest.mark.timeout(300)
def test_diffusion_is_greedy_reproduces_greedy_decoding(workdirs):
    """LLaDA's check: is_greedy is true when greedy decoding of the continuation's length gives it back."""
    from ddlm.eval import harness

    lm = harness.DDLMLM(workdir=workdirs["mdlm"], num_samples=32, mc_batch_size=16)
    enc = lm.encode_pair("ROMEO:", " ab")
    greedy = lm.greedy_continuation(enc)
    assert len(greedy) == 3
    pairs = [harness.Encoded(enc.context, greedy), harness.Encoded(enc.context, greedy[:2] + [(greedy[2] + 1) % 256])]
    assert [g for _, g in lm.loglikelihood_encoded(["ROMEO:"] * 2, pairs)] == [True, False]


# --------------------------------------------------------------------------------------------
# Pieces and mistakes
# --------------------------------------------------------------------------------------------


def test_text_is_cut_at_eos_and_the_first_stop_sequence(workdirs):
    from ddlm.eval import harness

    lm = harness.DDLMLM(workdir=workdirs["ar"])
    ids = lm.tok.encode("ab.cd\nef")
    assert lm.cut(ids, ["\n", "."]) == "ab"
    assert lm.cut(ids, ["\n"]) == "ab.cd"
    assert lm.cut(ids[:2] + [lm.tok.eos_id] + ids[2:], ["\n"]) == "ab"
    assert lm.cut(ids, []) == "ab.cd\nef"
    # the canvas: bos, the context, max_gen_toks masks, then padding (AR)
    row, start = lm.canvas("hi", 5)
    assert len(row) == SEQ_LEN and start == 3 and row[:3] == [lm.tok.bos_id] + lm.tok.encode("hi")
    assert row[3:8] == [lm.tok.mask_id] * 5 and set(row[8:]) == {lm.tok.pad_id}


def test_sampler_specs_and_model_args_are_checked(workdirs):
    from ddlm.eval import harness
    from ddlm.sampling import config as sampling_config

    sc = harness.sampler_config(sampling_config.default_config(), "parallel:rule=threshold:threshold=0.8:steps=16")
    assert (sc.name, sc.rule, sc.threshold, sc.steps) == ("parallel", "threshold", 0.8, 16)
    with pytest.raises(ValueError, match="sampler='nope'.*unknown sampler"):
        harness.sampler_config(sampling_config.default_config(), "nope")
    with pytest.raises(ValueError, match="steps='x' is not a int"):
        harness.sampler_config(sampling_config.default_config(), "ancestral:steps=x")
    with pytest.raises(ValueError, match="--model_args colour: not a ddlm model argument"):
        harness.DDLMLM(workdir=workdirs["ar"], colour="red")
    with pytest.raises(ValueError, match="num_samples=40 must be a multiple of mc_batch_size=16"):
        harness.DDLMLM(workdir=workdirs["ar"], num_samples=40)
    with pytest.raises(ValueError, match="workdir=... is required"):
        harness.DDLMLM()


def test_the_backend_is_registered_under_its_entry_point():
    """setup.cfg's lm_eval.models entry point names the class that registers itself as `ddlm`."""
    from lm_eval.api.registry import get_model

    from ddlm.eval import harness

    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO, "setup.cfg"))
    entry = parser["options.entry_points"]["lm_eval.models"].strip()
    name, _, target = (part.strip() for part in entry.partition("="))
    assert name == "ddlm" and target == "ddlm.eval.harness:DDLMLM"
    assert get_model("ddlm") is harness.DDLMLM


@pytest.mark.timeout(300)
def test_command_line_mistake_is_one_line(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_DATASETS_CACHE"] = str(tmp_path / "hf")
    proc = subprocess.run(
        [sys.executable, "-m", "ddlm.eval.harness", "--model", "ddlm", "--model_args", f"workdir={tmp_path}/none",
         "--tasks", "ddlm_local_mc", "--include_path", TASKS],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=280, check=False,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ddlm: error: ") and "none" in last and "Traceback" not in proc.stderr


def test_a_masked_tail_is_marginalised_by_the_conditional_estimate():
    """The window row's claim (harness.DDLMLM.window_row): with the tail past the continuation kept masked,
    the estimator's mean is log p(continuation | context) with the tail summed out -- exact on the oracle."""
    from ddlm.eval import oracle

    toy = oracle.ToyDistribution(num_tokens=3, length=4, seed=2)
    with jax.enable_x64(True):
        estimate = conditional.make_estimator(toy.absorbing_denoiser(), mask_id=toy.mask_id, batch_size=64)
        for x in ([0, 1, 2, 0], [2, 2, 1, 1]):
            tokens = np.asarray(x[:3] + [toy.mask_id])  # context x0, continuation x1 x2, masked tail
            response = np.array([False, True, True, False])
            est = estimate(jax.random.key(0), tokens, response, num_samples=1024)
            joint = toy.probs[(toy.seqs[:, :3] == x[:3]).all(1)].sum()
            context = toy.probs[toy.seqs[:, 0] == x[0]].sum()
            assert abs(est.mean - math.log(joint / context)) < 4 * est.se + 1e-9
            assert est.se < 0.05
