"""Fast-dLLM's prefix and dual KV caches (ddlm/sampling/caches.py) for bidirectional networks.

Exactness (float64, a random tiny DiT, time-free and time-conditioned): a step right after a refresh on the
same input gives the full forward's logits; what each cache recomputes and what it reads from the cache;
refreshing every step gives the uncached sampler's tokens. On a tiny time-free DiT trained once for the session
(Shakespeare characters, in this process): greedy outputs with and without the caches (token agreement
printed), and the NELBO of sampled outputs under the network, cached against uncached, within the spread of
uncached runs with different keys. Refresh policies, compilation counts, 8-device sharding, the CLI and the
one-line errors.
"""

import functools
import importlib.util
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from model_utils import tiny_decoder
from test_parallel_decoding import cfg as _cfg  # config.sampler with name='parallel' and these fields

from ddlm import loading, models, sampling, schedules
from ddlm.data import corpora
from ddlm.eval import likelihood
from ddlm.sampling import caches, cli, parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 37
MASK = VOCAB - 1
SCHED = schedules.LogLinearSchedule()
FAST = {"xla_backend_optimization_level": 0}  # tiny programs compile ~5x faster on CPU
fast_jit = functools.partial(jax.jit, compiler_options=FAST)
LENGTH, BLOCK = 24, 8


def _partly_decoded(batch=2, seed=0):
    """x int32 [batch, 24]: a prompt of 6, then tokens and masks (60% masked) up to the end."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, MASK, (batch, LENGTH))
    x[:, 6:] = np.where(rng.random((batch, LENGTH - 6)) < 0.6, MASK, x[:, 6:])
    return jnp.asarray(x, jnp.int32)


# ------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("time_conditioning", [False, True], ids=["time_free", "time"])
def test_a_step_after_a_refresh_on_the_same_input_is_the_full_forward(time_conditioning):
    """float64: the refresh's logits, and a prefix / dual step on the refreshed input for each of the 3 blocks
    (the first with no prefix, the last with no suffix), equal the training forward within 1e-5."""
    with jax.enable_x64(True):
        dec = tiny_decoder("dit", VOCAB, time_conditioning, dtype=jnp.float64)
        x = _partly_decoded()
        t = parallel.sequence_time(x, MASK, SCHED).astype(jnp.float64) if time_conditioning else None
        full = np.asarray(dec.forward(x, t))
        state0 = caches.CacheState(dec.init_cache(2, LENGTH), x, jnp.zeros((), jnp.int32))
        logits, state = fast_jit(lambda s, x: caches.refresh_step(dec, s, x, t))(state0, x)
        np.testing.assert_allclose(logits, full, atol=1e-5, rtol=0)
        for kind in ("prefix", "dual"):
            step = fast_jit(lambda s, x, b, kind=kind: caches.cached_step(dec, kind, s, x, b, BLOCK, t))
            for b in range(LENGTH // BLOCK):
                out, after = step(state, x, jnp.int32(b))
                np.testing.assert_allclose(
                    out, full[:, b * BLOCK : (b + 1) * BLOCK], atol=1e-5, rtol=0, err_msg=f"{kind} {b}"
                )
                assert int(after.since) == 1 and np.array_equal(after.tokens, x)


def test_what_each_cache_recomputes_and_what_it_reads_from_the_cache():
    """After a refresh on x, edits elsewhere in the sequence: the prefix is read from the cache by both
    (an edited prefix token changes nothing), the suffix is recomputed by 'prefix' but read from the cache by
    'dual'. Each step equals the same attention written without the write-back (cached slots outside the
    recomputed slice concatenated with its fresh keys/values), and an edit after the refresh leaves it
    stale: not the full forward of the edited sequence."""
    with jax.enable_x64(True):
        dec = tiny_decoder("dit", VOCAB, False, dtype=jnp.float64)
        x = _partly_decoded()
        state0 = caches.CacheState(dec.init_cache(2, LENGTH), x, jnp.zeros((), jnp.int32))
        _, state = fast_jit(lambda s, x: caches.refresh_step(dec, s, x))(state0, x)
        block, start = 1, BLOCK
        edits = {"prefix": 3, "block": start + 2, "suffix": 20}
        edited = {where: x.at[:, pos].set((x[:, pos] + 1) % MASK) for where, pos in edits.items()}
        slots = jnp.arange(LENGTH)

        def reference(x, kind):
            """The slice attends the cached slots outside it and itself, without writing (concat path)."""
            end = LENGTH if kind == "prefix" else start + BLOCK
            outside = (slots < start) | (slots >= end)
            out, _ = dec.step(state.cache, x[:, start:end], jnp.arange(start, end), outside, None, None, None)
            return out[:, :BLOCK]

        for kind in ("prefix", "dual"):
            step = fast_jit(lambda s, x, kind=kind: caches.cached_step(dec, kind, s, x, block, BLOCK)[0])
            ref = fast_jit(functools.partial(reference, kind=kind))
            base = np.asarray(step(state, x))
            for where, xe in edited.items():
                out = np.asarray(step(state, xe))
                np.testing.assert_allclose(out, ref(xe), atol=1e-10, rtol=0, err_msg=f"{kind} {where}")
                recomputed = where == "block" or (where == "suffix" and kind == "prefix")
                change = np.abs(out - base).max()
                assert (change > 1e-6) == recomputed, (kind, where, change)
                stale = np.abs(out - np.asarray(dec.forward(xe))[:, start : start + BLOCK]).max()
                assert stale > 1e-6, (kind, where, stale)  # the cached keys are those of x


def test_refreshing_every_step_gives_the_uncached_samplers_tokens():
    """config.sampler.refresh_every=1: every call is a full forward, so the cached sampler decodes exactly the
    tokens of the uncached one (float64 network, sampled candidates, LLaDA low_confidence); with the
    default (one refresh per block) the NFE is the same and the tokens are those of another network."""
    with jax.enable_x64(True):
        dec = tiny_decoder("dit", VOCAB, False, dtype=jnp.float64)
        x = _partly_decoded(batch=4, seed=1)
        kw = {"rule": "low_confidence", "steps": 12, "block_length": BLOCK, "temperature": 0.8}

        def run(**fields):
            fn = sampling.make_sampler(
                _cfg(**kw, **fields),
                denoise_fn=lambda xt, t: dec.forward(xt, None),
                decoder=dec,
                schedule=SCHED,
                mask_id=MASK,
            )
            return jax.tree.map(np.asarray, fast_jit(fn)(jax.random.key(3), x))

        plain = run()
        # (prefix and dual differ only between refreshes: one of them suffices here)
        every = run(cache="prefix", refresh_every=1)
        np.testing.assert_array_equal(every.tokens, plain.tokens)
        assert int(every.nfe) == int(plain.nfe)
        once = run(cache="dual")
        assert int(once.nfe) == int(plain.nfe) and not np.any(once.tokens == MASK)
        known = np.asarray(x) != MASK
        np.testing.assert_array_equal(once.tokens[known], np.asarray(x)[known])
        print(f"dual, refresh once per block: {np.mean(once.tokens == plain.tokens):.3f} token agreement")
        assert not np.array_equal(once.tokens, plain.tokens)  # the cache is used between refreshes


def test_refresh_policies_decide_when_the_full_forward_runs():
    """The provider refreshes at step 0 of a block and where its policy says so (state.since counts the
    cached steps since the last refresh). A time-conditioned network is shown the current sequence's time at
    every call: a refreshed step's logits are the full forward's, a cached step's are cached_step's at that
    time."""
    dec = tiny_decoder("dit", VOCAB, True)
    x0 = jnp.full((2, LENGTH), MASK, jnp.int32).at[:, :BLOCK].set(jnp.arange(BLOCK))
    # Block 1 decoded two tokens per step (row 0) and one (row 1).
    xs = [x0]
    for j in range(4):
        x = xs[-1].at[0, BLOCK + 2 * j : BLOCK + 2 * j + 2].set(5).at[1, BLOCK + j].set(7)
        xs.append(x)
    t_of = lambda x: parallel.sequence_time(x, MASK, SCHED)
    full = fast_jit(lambda x: dec.forward(x, t_of(x)))
    cached = fast_jit(lambda s, x: caches.cached_step(dec, "dual", s, x, 1, BLOCK, t_of(x))[0])
    policies = {
        "once per block": (None, [0, 1, 2, 3]),
        "every 2": (parallel.refresh_every(2), [0, 1, 0, 1]),
        "3 changed": (caches.refresh_when_changed(3), [0, 1, 0, 1]),  # row 0 changes 2 per step
    }
    for name, (policy, expected) in policies.items():
        provider = caches.cached_logits_provider(
            dec, cache="dual", mask_id=MASK, schedule=SCHED, block_length=BLOCK, refresh=policy
        )
        step = fast_jit(provider.logits)
        state = provider.init(x0)
        since = []
        for j in range(4):
            before = state
            logits, state, calls = step(state, xs[j], jnp.int32(1), jnp.int32(j))
            since.append(int(state.since))
            assert int(calls) == 1
            if since[-1] == 0:
                reference = full(xs[j])[:, BLOCK : 2 * BLOCK]
                assert np.array_equal(state.tokens, xs[j])
            else:
                reference = cached(before, xs[j])
            np.testing.assert_allclose(logits, reference, atol=1e-5, rtol=0, err_msg=f"{name} {j}")
        assert since == expected, (name, since)
    with pytest.raises(ValueError, match="n must be >= 1"):
        caches.refresh_when_changed(0)


# ------------------------------------------------------------------------------------------ trained model

QUICKSTART = os.path.join(REPO, "experiments", "quickstart.py")
# The quickstart with a 2 x 64 time-free DiT (as LLaDA, Fast-dLLM's network) on 32-character windows, 400
# steps; the same fields are --config overrides for the subprocess test.
TINY_FIELDS = {
    "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.mlp_dim": 256, "model.cond_dim": 16,
    "model.time_conditioning": False, "train.steps": 400, "train.batch_size": 32, "train.eval_batch_size": 32,
    "train.seq_len": 32, "train.eval_batches": 2, "train.log_every": 100, "train.eval_every": 0,
    "train.ckpt_every": 0, "train.sample_at_end": False, "optim.lr": 3e-3, "optim.warmup_steps": 20,
    "optim.decay": "constant", "sampler.name": "parallel", "sampler.rule": "threshold",
    "sampler.block_length": 8, "sampler.num_samples": 4, "sampler.batch_size": 4, "sampler.progress": False,
}  # fmt: skip


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """The TINY_FIELDS quickstart trained in this process on one device (~25 s idle; validation NELBO ~3.9
    bits/char, the unigram entropy is ~4.7). Returns (workdir, loaded checkpoint)."""
    from ddlm.train import trainer

    spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in TINY_FIELDS.items():
        section, field = key.split(".")
        config[section][field] = value
    workdir = str(tmp_path_factory.mktemp("caches_run"))
    trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    return workdir, loading.load_for_inference(workdir, devices=jax.devices()[:1])


def _prompts(loaded, n, prompt_len, length, seed=0):
    """x_init int32 [n, length]: `prompt_len` characters from random places of the validation split, then
    masks."""
    text = "".join(corpora.iter_texts(loaded.config.data, "validation", max_documents=20))
    ids = np.asarray(loaded.tokenizer.encode(text))
    starts = np.random.default_rng(seed).integers(0, len(ids) - prompt_len, n)
    x = np.full((n, length), loaded.tokenizer.mask_id, np.int32)
    for i, s in enumerate(starts):
        x[i, :prompt_len] = ids[s : s + prompt_len]
    return jnp.asarray(x)


def _path_nll(decoder, mask_id, trajectory):
    """Mean NLL per committed token of a decoding trajectory [S + 1, B, L] under the uncached network:
    -log p_theta(token | the sequence before its step), mask id excluded, over every (step, position) whose
    token changed: how likely the uncached decoder was to draw what was committed, in the same order."""
    steps, batch, length = trajectory.shape
    logits = decoder.forward(trajectory[:-1].reshape(-1, length), None).astype(jnp.float32)
    logits = logits.reshape(steps - 1, batch, length, -1).at[..., mask_id].set(-jnp.inf)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), trajectory[1:, ..., None], -1)[..., 0]
    changed = trajectory[1:] != trajectory[:-1]
    return -jnp.sum(jnp.where(changed, logp, 0.0)) / jnp.sum(changed)


def test_trained_model_cached_outputs_agree_and_keep_their_likelihood(trained):
    """Threshold 0.9 (Fast-dLLM), blocks of 8, 8-character prompts, 24 generated characters, one refresh per
    block. Greedy: the token agreement with the uncached decoder is printed. Sampled (temperature 1, 64
    outputs): two NLLs under the uncached network, (a) per committed token along the decoding trajectory
    (`_path_nll`: exact, sensitive to what the cache changed) and (b) the NELBO per character of the outputs
    (8 antithetic time samples, the same scoring key for every set). Each is a draw around its mean over the
    output distribution; K = 8 uncached runs with different keys give its spread s. A run from the uncached
    distribution falls within the prediction interval mean +- t s sqrt(1 + 1/K), t = t_{K-1}(0.9975) = 4.03,
    but for a 0.5% chance; the cached runs must too: the cache may move the output distribution no further
    than that (measured about +1 s for both caches and both NLLs; benchmarks/RESULTS.md)."""
    _, loaded = trained
    tok = loaded.tokenizer
    mask_id = tok.mask_id
    decoder = models.make_decoder(loaded.model, {"params": loaded.params})
    denoise_fn = lambda xt, t: decoder.forward(xt, None)
    length, n = loaded.config.train.seq_len, 64
    x = _prompts(loaded, n // 4, BLOCK, length)
    x_many = jnp.tile(x, (4, 1))  # 4 draws per prompt

    def sampler(trajectory=False, **fields):
        c = _cfg(rule="threshold", threshold=0.9, block_length=BLOCK, **fields)
        fn = sampling.make_sampler(
            c,
            denoise_fn=denoise_fn,
            decoder=decoder,
            schedule=SCHED,
            mask_id=mask_id,
            return_trajectory=trajectory,
        )
        return fast_jit(fn)

    @jax.jit  # optimised: it runs the network on every step's sequence of every run
    def nlls(out):
        est = likelihood.nelbo_per_sequence(
            "mdlm", lambda xt, t, x0: decoder.forward(xt, None), out.tokens, None, jax.random.key(7),
            schedule=SCHED, vocab_size=tok.vocab_size, mask_id=mask_id, time_samples=8,
        )  # fmt: skip
        return _path_nll(decoder, mask_id, out.trajectory), jnp.sum(est.nats) / jnp.sum(est.tokens)

    greedy = {kind: sampler(cache=kind, temperature=0.0)(jax.random.key(0), x) for kind in caches.CACHES}
    generated = np.asarray(x) == mask_id
    report = [f"uncached greedy NFE {int(greedy['none'].nfe)}"]
    for kind in ("prefix", "dual"):
        same = np.asarray(greedy[kind].tokens)[generated] == np.asarray(greedy["none"].tokens)[generated]
        report.append(f"{kind}: greedy token agreement {np.mean(same):.3f}, NFE {int(greedy[kind].nfe)}")
    uncached = sampler(trajectory=True)
    runs = np.array([nlls(uncached(jax.random.key(k), x_many)) for k in range(8)])  # [K, 2]
    mean, spread = runs.mean(0), runs.std(0, ddof=1)
    tolerance = 4.03 * spread * np.sqrt(1 + 1 / len(runs))  # t_7(0.9975): the prediction interval
    for name, i in (("path NLL", 0), ("NELBO", 1)):
        report.append(f"uncached sampled {name} nats: mean {mean[i]:.4f}, sd {spread[i]:.4f} over 8 keys")
    for kind in ("prefix", "dual"):
        out = sampler(trajectory=True, cache=kind)(jax.random.key(0), x_many)
        value = np.asarray(nlls(out))
        z = (value - mean) / spread
        report.append(
            f"{kind}: sampled path NLL {value[0]:.4f} ({z[0]:+.2f} sd), NELBO {value[1]:.4f} ({z[1]:+.2f} sd), "
            f"NFE {int(out.nfe)}"
        )
        assert np.all(np.abs(value - mean) <= tolerance), report
    print("\n".join(report))


def test_sample_mode_with_a_cache_on_the_trained_checkpoint(trained, tmp_path):
    """run_sampling (the --mode=sample path) with config.sampler.cache='dual' on the trained checkpoint."""
    workdir, loaded = trained
    config = ml_collections.ConfigDict(loaded.config.to_dict())
    config.sampler.cache, config.sampler.prompt, config.sampler.output_dir = "dual", "ROMEO:", str(tmp_path)
    records = cli.run_sampling(config, workdir)
    assert len(records) == 4
    for r in records:
        assert r["text"].startswith("ROMEO:") and len(r["tokens"]) == 32 and 0 < r["nfe"] <= 26


# ------------------------------------------------------------------------------------------ sharding


def test_cached_parallel_samplers_compile_once_and_run_sharded_over_8_devices():
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    batch = NamedSharding(mesh, P("data"))
    rules = (("batch", "data"), ("heads", None), ("kv", None), ("length", None), ("embed", None))
    rules += (("mlp", None), ("vocab", None))
    dec = tiny_decoder("dit", VOCAB, True)
    for kind in ("prefix", "dual"):
        c = _cfg(cache=kind, rule="threshold", block_length=BLOCK, refresh_every=2)
        fn = sampling.jit_sampler(c, compiler_options=FAST, decoder=dec, schedule=SCHED, mask_id=MASK)
        before = sampling.TRACE_COUNTS["parallel"]
        x_host, other = _partly_decoded(8, seed=2), _partly_decoded(8, seed=3)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            x = jax.device_put(x_host, batch)
            a = fn(jax.random.key(0), x)
            b = fn(jax.random.key(1), x)
            fn(jax.random.key(0), jax.device_put(other, batch))  # other tokens: the same program
        assert sampling.TRACE_COUNTS["parallel"] - before == 1, kind
        assert a.tokens.sharding.is_equivalent_to(batch, 2) and len(a.tokens.sharding.device_set) == 8, kind
        tokens = np.asarray(a.tokens)
        known = np.asarray(x_host) != MASK
        assert not np.any(tokens == MASK) and np.array_equal(tokens[known], np.asarray(x_host)[known]), kind
        assert not np.array_equal(tokens, np.asarray(b.tokens)), kind
        if kind == "dual":
            single = fn(jax.random.key(0), jax.device_put(x_host, jax.devices()[0]))
            np.testing.assert_array_equal(np.asarray(single.tokens), tokens)
            assert sampling.TRACE_COUNTS["parallel"] - before <= 2


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_one_clear_error_naming_the_field():
    dit, ar = tiny_decoder("dit", VOCAB, False), tiny_decoder("ar", VOCAB, False)
    x = _partly_decoded()
    cases = [
        ({"cache": "prefix"}, ar, r"config.sampler.cache='prefix' is Fast-dLLM's cache for bidirectional"),
        ({"cache": "dual"}, None, r"config.sampler.cache='dual' needs the network's decode path"),
        (
            {"cache": "full"},
            dit,
            r"config.sampler.cache='full': expected one of \('none', 'prefix', 'dual'\)",
        ),
        (
            {"cache": "dual", "refresh_every": -1},
            dit,
            r"config.sampler.refresh_every must be an integer >= 0",
        ),
        (
            {"cache": "dual", "guidance_scale": 1.0},
            dit,
            r"config.sampler.cache='dual' has no classifier-free",
        ),
        ({"cache": "dual", "name": "ancestral"}, dit, r"config.sampler.cache='dual' serves name='parallel'"),
        (
            {"cache": "dual", "block_length": 5},
            dit,
            r"config.sampler.block_length=5 must divide the sequence",
        ),
        (
            {"cache": "prefix", "rule": "threshold", "threshold": 1.5},
            dit,
            r"config.sampler.threshold must be in",
        ),
        ({"cache": "prefix", "rule": "greedy"}, dit, r"config.sampler.rule='greedy' is not a commit rule"),
    ]
    for fields, decoder, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            fn = sampling.make_sampler(_cfg(**fields), decoder=decoder, schedule=SCHED, mask_id=MASK)
            jax.eval_shape(fn, jax.random.key(0), x)  # length checks run at trace time; nothing compiles
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"cache": "prefix"}, r"config.sampler.cache='prefix' caches a bidirectional network .* got config"),
        (
            {"cache": "dual", "name": "ancestral"},
            r"config.sampler.cache must be 'none' for sampler 'ancestral'",
        ),
        ({"block_length": 5}, r"config.sampler.block_length=5 must divide the sequence length 32"),
        ({"rule": "threshold", "threshold": 0.0}, r"config.sampler.threshold must be in \(0, 1\], got 0.0"),
        ({"rule": "top"}, r"config.sampler.rule='top' is not a commit rule"),
        ({"refresh_every": -2}, r"config.sampler.refresh_every must be an integer >= 0"),
    ],
)
def test_sample_mode_errors_are_one_line_before_the_checkpoint_is_loaded(fields, message):
    def must_not_load(config, workdir):
        raise AssertionError("the checkpoint was loaded before the sampler config was checked")

    c = ml_collections.ConfigDict()
    c.model = models.default_config("tiny")
    c.model.name = "ar" if fields.get("cache") == "prefix" else "dit"
    c.data = ml_collections.ConfigDict({"tokenizer": "char", "vocab_size": 0})
    c.diffusion = ml_collections.ConfigDict(
        {"loss": "mdlm", "schedule": "loglinear", "schedule_kwargs": {"eps": 1e-3}, "process": "absorbing"}
    )
    c.train = ml_collections.ConfigDict({"seq_len": 32})
    c.sampler = _cfg(**{"block_length": 8, **fields})
    with pytest.raises(ValueError, match=message) as info:
        cli.run_sampling(c, "/nonexistent", load_fn=must_not_load)
    assert "\n" not in str(info.value)


def test_main_prints_one_line_for_a_prompt_longer_than_the_sequence(trained):
    """Through `python -m ddlm.main --mode=sample` on the trained checkpoint: a 40-character prompt for 32
    positions is one line naming config.sampler.prompt (the check needs the checkpoint's tokenizer)."""
    workdir, _ = trained
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        "-m",
        "ddlm.main",
        f"--config={QUICKSTART}",
        f"--workdir={workdir}",
        "--mode=sample",
    ]
    cmd += [f"--config.{key}={value}" for key, value in TINY_FIELDS.items()]
    cmd += ["--config.sampler.cache=prefix", "--config.sampler.prompt=" + "x" * 40]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ddlm: error:")]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert re.search(r"config.sampler.prompt is 40 tokens, longer than the sample length 32", lines[0])
    assert "Traceback" not in proc.stderr
