"""`python -m ddlm.main --mode=eval --config=... --workdir=...`: likelihood with error bars (and sample quality).

    run_eval(config, workdir, load_fn=None) -> report (dict)

Evaluates the latest checkpoint of `workdir` on config.eval.split (the whole split by default) with the
estimators of ddlm.eval.likelihood: the NELBO of config.diffusion.loss with config.eval.time_samples
antithetic times per sequence (the exact NLL for 'ar'), plus the T-step discrete-time bound for absorbing-
graph models (config.eval.discrete_steps). With config.eval.ar_workdir (and the config it was trained with,
config.eval.ar_config) the AR model's exact NLL on the same split is evaluated beside it, and it scores
config.eval.num_samples samples drawn with config.sampler (generative perplexity, unigram entropy,
distinct n-grams). Writes <workdir>/eval/report.json (or config.eval.output_dir) and prints a table.

Every input is checked before any work (`check_inputs`: the AR workdir holds a checkpoint, the sampler
config, the report's folder can be written), and both checkpoints are restored before either is evaluated,
so a mistake is one line in seconds, not a traceback after the evaluation.

load_fn(config, workdir, ema) -> Loaded replaces the checkpoint loading (tests; other checkpoint formats).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from ddlm import checkpoints, loading, losses, paths, schedules, sharding
from ddlm.eval import config as config_lib
from ddlm.eval import likelihood, sample_quality

ABSORBING_LOSSES = ("mdlm", "d3pm", "sedd_absorb", "radd")


class Loaded(NamedTuple):
    model: Any  # flax module: apply({'params': p}, tokens, t, x0=None, train=False) -> logits
    params: Any
    tokenizer: Any
    batch_sharding: Any  # where a global batch lives (None: one device)
    step: int
    config: Any = None  # the config the network was built from (the checkpoint's own when none was given)


def load_checkpoint(config, workdir: str, *, ema: bool = True) -> Loaded:
    """The latest usable checkpoint of `workdir` (ddlm.loading.load_for_inference); with config=None the
    network is rebuilt from the config stored in the checkpoint."""
    loaded = loading.load_for_inference(workdir, config, ema=ema)
    return Loaded(
        loaded.model,
        loaded.params,
        loaded.tokenizer,
        sharding.batch_sharding(loaded.mesh),
        int(loaded.step),
        loaded.config,
    )


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """'experiments/quickstart_ar.py[:arg]' -> that file's get_config(arg)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"config.eval.ar_config: experiment config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location("_ddlm_eval_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def resolve_config(eval_config) -> ml_collections.ConfigDict:
    """default_config() with the fields of `eval_config` set; a field default_config lacks is an error."""
    out = config_lib.default_config()
    for key, value in eval_config.items():
        if key not in out:
            raise ValueError(f"config.eval.{key} is not an eval field; fields: {sorted(out.keys())}")
        out[key] = value
    if out.split not in ("validation", "train"):
        raise ValueError(f"config.eval.split must be 'validation' or 'train', got {out.split!r}")
    for key in ("num_batches", "batch_size", "num_samples", "mauve_seeds"):
        if out[key] < 0:
            raise ValueError(f"config.eval.{key} must be >= 0, got {out[key]}")
    if out.time_samples < 1:
        raise ValueError(f"config.eval.time_samples must be >= 1, got {out.time_samples}")
    if out.discrete_steps < -1:
        raise ValueError(
            f"config.eval.discrete_steps must be >= -1 (-1 = config.sampler.steps, 0 = off), got {out.discrete_steps}"
        )
    if not 0 <= out.seed < 2**32:
        raise ValueError(f"config.eval.seed must be in [0, 2^32) (a jax key holds 32 bits of it), got {out.seed}")
    if out.mauve_seeds and out.num_samples < 2:
        raise ValueError(
            f"config.eval.mauve_seeds={out.mauve_seeds} needs config.eval.num_samples >= 2 (the samples it scores), "
            f"got {out.num_samples}"
        )
    if out.ar_config and not out.ar_workdir:
        raise ValueError(
            "config.eval.ar_config needs config.eval.ar_workdir (the AR checkpoint's workdir; its config is read "
            "from the checkpoint, ar_config only overrides it)"
        )
    return out


# --------------------------------------------------------------------------------------------
# Estimators of one checkpoint
# --------------------------------------------------------------------------------------------


def make_estimator(
    model,
    params,
    name: str,
    *,
    diffusion_config,
    model_config,
    tokenizer,
    time_samples,
    num_steps,
    count_sampling,
):
    """(tokens, loss_mask, rng) -> SequenceEstimates for the loss `name`, jitted once (params an argument)."""
    schedule = schedules.get_schedule(diffusion_config.schedule, **dict(diffusion_config.schedule_kwargs))
    block_size = int(model_config.block_size) if name == "bd3lm" else None

    def estimate(params, tokens, loss_mask, rng):
        def apply_fn(xt, t, x0_context):
            out = model.apply({"params": params}, xt, t, x0=x0_context, train=False)
            return out.astype(jnp.float32)

        return likelihood.nelbo_per_sequence(
            name,
            apply_fn,
            tokens,
            loss_mask,
            rng,
            schedule=schedule,
            vocab_size=tokenizer.vocab_size,
            mask_id=tokenizer.mask_id,
            block_size=block_size,
            num_steps=num_steps,
            time_samples=time_samples,
            count_sampling=count_sampling,
        )

    jitted = jax.jit(estimate)
    return functools.partial(jitted, params)


def _iterator(config, tokenizer, split, batch_size, sharding):
    from ddlm.data import pipeline

    return pipeline.make_iterator(
        config.data,
        tokenizer,
        split,
        global_batch_size=batch_size,
        seq_len=config.train.seq_len,
        seed=config.train.seed,
        sharding=sharding,
        num_epochs=1,
    )


def _batch_size(config, ec, loaded: Loaded) -> int:
    size = ec.batch_size or config.train.eval_batch_size
    sh = loaded.batch_sharding
    parts = 1
    if sh is not None and hasattr(sh, "mesh"):
        parts = math.prod(sh.mesh.shape[a] for a in sh.mesh.axis_names if a in ("data", "fsdp"))
    if size % parts:
        raise ValueError(
            f"config.eval.batch_size={size} must be divisible by the mesh's data*fsdp={parts} devices"
        )
    return size


def evaluate_checkpoint(config, loaded: Loaded, ec, *, discrete_steps: int = 0) -> dict:
    """{label: likelihood summary} of one loaded checkpoint on config.eval's split."""
    name = config.diffusion.loss
    tok = loaded.tokenizer
    common = dict(
        diffusion_config=config.diffusion,
        model_config=config.model,
        tokenizer=tok,
        count_sampling=ec.count_sampling,
    )
    num_steps = int(config.diffusion.num_steps) or None
    main_label = "ar exact NLL" if name == "ar" else f"{name} NELBO"
    estimators = {
        main_label: (
            make_estimator(
                loaded.model, loaded.params, name, time_samples=ec.time_samples, num_steps=num_steps, **common
            ),
            name,
        )
    }
    if discrete_steps and name in ABSORBING_LOSSES:
        fn = make_estimator(
            loaded.model,
            loaded.params,
            "d3pm",
            time_samples=ec.time_samples,
            num_steps=discrete_steps,
            **common,
        )
        estimators[f"T={discrete_steps} step bound"] = (fn, "d3pm")
    batch_size = _batch_size(config, ec, loaded)
    batches = _iterator(config, tok, ec.split, batch_size, loaded.batch_sharding)
    t0 = time.time()
    results = likelihood.evaluate_split(
        estimators, batches, jax.random.key(ec.seed), decode=tok.decode, max_batches=ec.num_batches
    )
    seconds = time.time() - t0
    out = {}
    for label, r in results.items():
        summary = likelihood.likelihood_summary(
            r["nats"], r["tokens"], r.get("chars"), exact=label == main_label and name == "ar"
        )
        summary.update(
            loss=estimators[label][1], seconds=seconds, time_samples=1 if name == "ar" else ec.time_samples
        )
        out[label] = summary
    return out


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _fmt(value, se, digits=4):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if se is None or math.isnan(se):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {se:.{digits}f}"


def _samples_text(name: str, ec) -> str:
    if name == "ar":
        return "exact NLL"
    how = (
        "stratified mask counts"
        if ec.count_sampling and name in losses.COUNT_SAMPLED_LOSSES
        else "antithetic times"
    )
    return f"{ec.time_samples} Monte-Carlo samples per sequence ({how})"


def format_table(rows: dict) -> str:
    """One line per estimate: nats/token, bits/token, bits/char, perplexity, each with its SE."""
    header = f"{'':34s} {'nats/token':>19s} {'bits/token':>19s} {'bits/char':>19s} {'perplexity':>21s}"
    lines = [header]
    for label, r in rows.items():
        bound = "" if r["kind"] == "exact NLL" else "<= "
        lines.append(
            f"{label:34s} {_fmt(r['nats_per_token'], r['nats_per_token_se']):>19s} "
            f"{_fmt(r['bits_per_token'], r['bits_per_token_se']):>19s} "
            f"{_fmt(r.get('bits_per_char'), r.get('bits_per_char_se')):>19s} "
            f"{bound + _fmt(r['perplexity'], r['perplexity_se'], 3):>21s}"
        )
    return "\n".join(lines)


def sampling_config(config, *, num_samples: int, output_dir: str):
    """A copy of `config` whose sampler draws num_samples samples (in batches of at most that) into
    output_dir, without a progress bar: what sample_and_score runs."""
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
        cfg.sampler.num_samples = num_samples
        cfg.sampler.batch_size = min(cfg.sampler.batch_size, num_samples)
        cfg.sampler.output_dir = output_dir
        cfg.sampler.progress = False
    return cfg


def sample_and_score(
    config, workdir, loaded: Loaded, scorer, *, num_samples: int, output_dir: str, mauve=None
) -> dict:
    """Draws num_samples samples with config.sampler (ddlm.sampling.cli.run_sampling, samples written to
    output_dir) and returns their quality (sample_quality.sample_quality), the sampler settings, the network
    calls and tokens/s (sampling time without compilation). mauve = (judge, reference texts, seeds): also
    MAUVE of the samples against the references (ddlm.eval.mauve: 'mauve', 'mauve_se' over the seeds)."""
    from ddlm.sampling import cli as sampling_cli

    cfg = sampling_config(config, num_samples=num_samples, output_dir=output_dir)
    load = lambda *_: (loaded.model, loaded.params, loaded.tokenizer, None, loaded.step)
    records = sampling_cli.run_sampling(cfg, workdir, load_fn=load)
    rows = [r["tokens"] for r in records]
    out = sample_quality.sample_quality(scorer, rows, loaded.tokenizer)
    if mauve is not None:
        from ddlm.eval import mauve as mauve_lib

        judge, references, seeds = mauve
        texts = [loaded.tokenizer.decode(sample_quality.content_ids(r, loaded.tokenizer)) for r in rows]
        out.update(mauve_lib.sample_mauve(judge, references, texts, seeds=range(1, seeds + 1)))
    seconds = sum(r["time_s"] for r in records)
    sc, seq_len = sampling_cli.check_config(cfg)
    out.update(
        sampler=cfg.sampler.name,
        settings=sampling_cli.describe(sc, seq_len),  # 'parallel (rule=threshold, ...)'
        steps=int(sc.steps) if sampling_cli.uses_steps(sc) else 0,  # 0: the sampler takes no step count
        temperature=float(cfg.sampler.temperature),
        precision=cfg.sampler.precision,
        nfe=float(records[0]["nfe"]) if records else float("nan"),
        tokens_per_s=sum(len(r) for r in rows) / seconds if seconds > 0 else float("nan"),
    )
    return out


def validation_rows(config, tokenizer, n: int) -> list[list[int]]:
    """The first n validation rows of train.seq_len tokens (the frontier's data point, MAUVE's reference)."""
    from ddlm.data import pipeline

    it = pipeline.make_iterator(
        config.data,
        tokenizer,
        "validation",
        global_batch_size=n,
        seq_len=config.train.seq_len,
        seed=config.train.seed,
        sharding=None,
        num_epochs=1,
    )
    return [row.tolist() for row in next(it)["tokens"]]


def reference_texts(config, tokenizer, n: int) -> list[str]:
    """The texts of validation_rows (MAUVE's reference)."""
    rows = validation_rows(config, tokenizer, n)
    return [tokenizer.decode(sample_quality.content_ids(row, tokenizer)) for row in rows]


def make_scorer(config, loaded: Loaded, batch_size: int = 8) -> sample_quality.ARScorer:
    """An ARScorer from a loaded ddlm AR checkpoint (context = its train.seq_len)."""
    model = loaded.model
    logits_fn = lambda params, tokens: model.apply({"params": params}, tokens, None, train=False)
    return sample_quality.ARScorer(
        logits_fn,
        loaded.params,
        loaded.tokenizer,
        context_len=int(config.train.seq_len),
        batch_size=batch_size,
    )


def check_ar_config(ar_config, ec) -> None:
    """The scorer / baseline checkpoint must be an autoregressive model."""
    if ar_config is not None and ar_config.diffusion.loss != "ar":
        raise ValueError(
            f"config.eval.ar_workdir={ec.ar_workdir!r} / ar_config={ec.ar_config!r}: that model trains loss "
            f"{ar_config.diffusion.loss!r}, not 'ar'"
        )


def check_inputs(config, ec, out_dir: str, *, ddlm_checkpoints: bool = True) -> None:
    """The inputs of run_eval that need no checkpoint restored, each mistake one line naming its field:
    config.eval.ar_workdir is a folder holding a committed checkpoint (with ddlm_checkpoints: the default
    loader's format), config.sampler when samples are drawn (ddlm.sampling.cli.check_config), and the
    report's folder can be written (the trainer's probe). Checked before anything is loaded or evaluated."""
    from ddlm.sampling import cli as sampling_cli

    if ec.ar_workdir:
        if not paths.path(ec.ar_workdir).is_dir():
            raise sharding.ConfigError(
                f"config.eval.ar_workdir={ec.ar_workdir!r} is not a folder (expected the --workdir of a "
                "trained AR model)"
            )
        ckpt_dir = os.path.join(ec.ar_workdir, checkpoints.CHECKPOINTS_DIR)
        if ddlm_checkpoints and not checkpoints.committed_steps(ckpt_dir):
            raise sharding.ConfigError(
                f"config.eval.ar_workdir={ec.ar_workdir!r} holds no checkpoint (nothing in {ckpt_dir}): "
                "train the AR model first"
            )
    if ec.num_samples:
        sampling_cli.check_config(
            sampling_config(config, num_samples=ec.num_samples, output_dir=os.path.join(out_dir, "samples"))
        )
    sampling_cli.check_output_dir(out_dir, "the eval report folder (config.eval.output_dir)")


def run_eval(config, workdir: str, load_fn: Callable[..., Loaded] | None = None) -> dict:
    """Evaluates the latest checkpoint in `workdir` per config.eval (module doc); returns the report."""
    # ---------------------------------------------------------------- every input, before any work
    ec = resolve_config(config.eval)
    load = load_fn or (lambda c, w, ema: load_checkpoint(c, w, ema=ema))
    ar_config = load_config_file(ec.ar_config) if ec.ar_config else None
    check_ar_config(ar_config, ec)
    if ec.mauve_seeds and not ec.ar_workdir and config.diffusion.loss != "ar":
        raise sharding.ConfigError(
            "config.eval.mauve_seeds needs a judge: config.eval.ar_workdir (an AR checkpoint whose features MAUVE "
            "compares), or an AR model evaluated itself"
        )
    out_dir = ec.output_dir or os.path.join(workdir, "eval")
    check_inputs(config, ec, out_dir, ddlm_checkpoints=load_fn is None)
    # Both checkpoints are restored (and checked) before either is evaluated: a bad AR checkpoint is found
    # in seconds, not after the whole split.
    loaded = load(config, workdir, ec.use_ema)
    logging.info("Restored checkpoint from step %d.", loaded.step)
    _batch_size(config, ec, loaded)
    ar_loaded = None
    if ec.ar_workdir:
        ar_loaded = load(ar_config, ec.ar_workdir, ec.use_ema)  # ar_config None: the checkpoint's own config
        ar_config = ar_config or ar_loaded.config
        check_ar_config(ar_config, ec)
        _batch_size(ar_config, ec, ar_loaded)
        logging.info("Restored the AR checkpoint %s at step %d.", ec.ar_workdir, ar_loaded.step)

    # ---------------------------------------------------------------- evaluate
    name = config.diffusion.loss
    discrete = int(config.sampler.steps) if ec.discrete_steps < 0 else int(ec.discrete_steps)
    rows = evaluate_checkpoint(config, loaded, ec, discrete_steps=discrete)
    if ar_loaded is not None:
        for label, r in evaluate_checkpoint(ar_config, ar_loaded, ec).items():
            rows[f"{label} ({os.path.basename(os.path.normpath(ec.ar_workdir))})"] = r

    report = {
        "workdir": os.path.abspath(workdir),
        "step": loaded.step,
        "loss": name,
        "split": ec.split,
        "corpus": config.data.corpus,
        "tokenizer": config.data.tokenizer,
        "seq_len": int(config.train.seq_len),
        "time_samples": int(ec.time_samples),
        "count_sampling": bool(ec.count_sampling),
        "ema": bool(ec.use_ema),
        "likelihood": rows,
        "standard_errors": "delta method over sequences (ddlm/eval/likelihood.py): data and Monte-Carlo noise",
    }
    if ar_config is not None:
        report.update(ar_workdir=os.path.abspath(ec.ar_workdir), ar_step=ar_loaded.step)
        if ar_config.data.corpus != config.data.corpus:
            report["warning"] = (
                f"the AR model was trained on corpus {ar_config.data.corpus!r}, this model on {config.data.corpus!r}"
            )
    if ec.num_samples:
        # 'ar' and 'bd3lm' checkpoints sample with their KV-cache samplers (config.sampler.name 'ar' /
        # 'bd3lm'). The scorer is the AR checkpoint of config.eval.ar_workdir; an AR model without one
        # scores its own samples (self-scored: a reference point, not an independent judgement).
        scorer, scorer_dir = None, ""
        if ar_loaded is not None:
            scorer, scorer_dir = make_scorer(ar_config, ar_loaded), os.path.abspath(ec.ar_workdir)
        elif name == "ar":
            scorer, scorer_dir = make_scorer(config, loaded), os.path.abspath(workdir)
        mauve = None
        if ec.mauve_seeds and scorer is not None:  # the scorer's network judges (ddlm.eval.mauve)
            from ddlm.eval import mauve as mauve_lib

            judge = mauve_lib.Judge.from_loaded(ar_loaded if ar_loaded is not None else loaded)
            mauve = (judge, reference_texts(config, loaded.tokenizer, ec.num_samples), ec.mauve_seeds)
        report["samples"] = sample_and_score(
            config,
            workdir,
            loaded,
            scorer,
            num_samples=ec.num_samples,
            output_dir=os.path.join(out_dir, "samples"),
            mauve=mauve,
        )
        report["samples"]["scorer"] = scorer_dir

    if jax.process_index() == 0:
        paths.path(out_dir).mkdir(parents=True, exist_ok=True)  # a bucket too (ddlm.paths)
        path = paths.path(out_dir, "report.json")
        with path.open("w") as f:
            json.dump(report, f, indent=1)
        first = next(iter(rows.values()))
        print(
            f"eval of {workdir} at step {loaded.step} ({'EMA' if ec.use_ema else 'raw'} params), split "
            f"{ec.split!r}: {first['sequences']:,} sequences x {config.train.seq_len} tokens, "
            f"{_samples_text(name, ec)}; ± = 1 standard error"
        )
        print(format_table(rows))
        if "samples" in report:
            s = report["samples"]
            gen = _fmt(s.get("gen_ppl"), s.get("gen_ppl_se"), 3) if "gen_ppl" in s else "- (no scorer)"
            if s["scorer"] == report["workdir"]:
                gen += " (scored by this model itself)"
            print(
                f"samples ({s['samples']}, {s['settings']}, NFE {s['nfe']:g}): generative perplexity {gen}, "
                f"unigram entropy {_fmt(s['entropy'], s['entropy_se'], 3)} nats, distinct-4 {s['distinct_4']:.3f}"
            )
        if "mauve" in report.get("samples", {}):
            s = report["samples"]
            print(f"samples: MAUVE {_fmt(s['mauve'], s['mauve_se'], 3)} against {s['p_count']} validation rows "
                  f"(± over {len(s['mauve_seeds'])} k-means seeds)")
        print(f"report: {path}")
    return report


def headline(report: dict) -> dict:
    """The scalar figures of the report's first row, and of its samples when drawn (for metrics.jsonl /
    TensorBoard: the sample quality of each evaluated step beside its NELBO)."""
    r = next(iter(report["likelihood"].values()))
    keys = ("nats_per_token", "bits_per_token", "bits_per_char", "perplexity")
    out = {"nelbo": r["nats_per_token"], "perplexity_bound": r["perplexity"], "tokens": r["tokens"]}
    for k in keys:
        if k in r:
            out[k] = r[k]
            out[k + "_se"] = r[k + "_se"]
    s = report.get("samples", {})
    for k in ("gen_ppl", "gen_ppl_se", "entropy", "entropy_se", "distinct_4", "mauve", "mauve_se"):
        if k in s:
            out[f"samples_{k}"] = s[k]
    return out
