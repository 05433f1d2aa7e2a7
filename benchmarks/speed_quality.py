"""Faster than autoregression at matched quality? One run: every model of experiments/speed_quality.py and every
decoder setting, judged by a model that is neither side, timed side by side on one device (issue 27).

    python benchmarks/speed_quality.py                 # the trained runs/sq_* checkpoints, judged by runs/judge
    python benchmarks/speed_quality.py --dry-run       # random networks of the recipes' shapes, tiny: checks
                                                       # every path of the script in a few minutes on CPU
    python benchmarks/speed_quality.py --device-suite  # the grid a GPU session runs (benchmarks/device_suite.sh)
    python benchmarks/speed_quality.py --export=sq_carry   # the newest checkpoints only (~60 MB), to carry there;
                                                       # then --root=sq_carry

Protocol (what a reader needs to trust the ratios):
  * Prompts: the first PROMPT_TOKENS - 1 characters of held-out (validation split) rows after bos; every
    setting continues the same prompts with the same keys. All samples are drawn at temperature 1, full
    vocabulary (no top-k / top-p), float64 Gumbel noise: the AR baseline's samples are its model's law.
  * Quality (the `--new_tokens` short length, whose samples fit the 128-character training context):
    generative perplexity under the judge (experiments/judge.py: a larger AR model trained longer, never a
    side) with its standard error over samples (delta method, ddlm.eval.sample_quality), the mean unigram
    entropy of the samples with its SE, and MAUVE against the held-out continuations of the same prompts
    (mauve-text on the judge's final hidden states, ddlm.eval.mauve), its error the standard deviation over
    bootstrap resamples of the samples (`bootstrap_mauve`: sampling and k-means noise together).
    Text is scored whole (prompt included: the prompts are common to every setting).
  * Matched: a setting matches the AR baseline when its gen-ppl and entropy are each within 2 standard
    errors of the difference (sqrt(se_a^2 + se_b^2)) of AR's, and its MAUVE within 2 such errors too.
    AR with speculative decoding samples AR's law exactly, so it must match: the check of the protocol.
  * Speed: tokens/s = batch x new tokens / seconds (median of --repeats compiled calls after one untimed
    warm-up call, compilation excluded; compiled programs go to ddlm's persistent cache, so a rerun is faster),
    at every batch in --batches, for the short and the long (--long_tokens) output; NFE = network calls of
    the target (batch-wide: the batch moves in lockstep); tokens per forward = new tokens / NFE; the
    speculative rows also count the draft's calls. Long outputs run past the 128-character training context
    (the samplers slide the cache window where they have one; the DiT sees the whole canvas): their tokens
    are not judged and the adaptive rules' step counts there come from off-distribution contexts.
  * Time to first token (batch 1; at every batch with --ttft_sweep): the wall time until the first streamable unit is final: AR and
    speculative decoding, one token (the same call on a sequence ending one token after the prompt); BD3-LM
    and Fast-dLLM v2, the first block (the same, one block after the prompt: causal across blocks, so
    later blocks cannot change the computation); MDLM, the first semi-autoregressive block, measured on the
    full canvas with every later position filled with a known token (the same network call costs; the
    step count of the first block can differ from the full run's, as the filled tokens are not masks).

Printed: the settings table (quality, NFE, tokens per forward, TTFT, tokens/s and the ratio to AR + KV cache
at every batch and both lengths), the matched settings with their speed ratios to AR + KV cache and AR +
speculative decoding; written: --out (a PNG: speed ratio vs gen-ppl at batch 1 and the largest batch, matched
settings filled) and the same figures as JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/machine.py when imported by path

import machine  # benchmarks/machine.py

from ddlm import models, sampling, schedules
from ddlm.sampling import config as sampler_config

PROMPT_TOKENS = 16  # bos + 15 characters of held-out text; a multiple of every block size below


class Setting(NamedTuple):
    label: str
    model: str  # a key of WORKDIRS
    fields: dict  # config.sampler fields (temperature 1 and no progress bar are added)
    long: bool = True  # also timed on the long output (False: a quality reference too slow to time there)


WORKDIRS = {
    "ar": "runs/sq_ar",
    "draft": "runs/sq_draft",
    "mdlm": "runs/sq_mdlm",
    "bd3lm4": "runs/sq_bd3lm4",
    "fdv2_16": "runs/sq_fdv2_16",
    "fdv2_4": "runs/sq_fdv2_4",
    "judge": "runs/judge",
}
BASELINE = "AR + KV cache"
SPECULATIVE = "AR + speculative (k=4)"
_threshold = lambda t: {"rule": "threshold", "threshold": t}

SETTINGS: tuple[Setting, ...] = (
    Setting(BASELINE, "ar", {"name": "ar"}),
    Setting(SPECULATIVE, "ar", {"name": "speculative", "draft_tokens": 4}),
    Setting("MDLM ancestral, 1 step/token", "mdlm", {"name": "ancestral", "steps": -1}, long=False),  # -1: new tokens
    Setting("MDLM threshold 0.9, blocks 16, dual cache", "mdlm",
            {"name": "parallel", **_threshold(0.9), "block_length": 16, "cache": "dual"}),
    Setting("MDLM threshold 0.7, blocks 16, dual cache", "mdlm",
            {"name": "parallel", **_threshold(0.7), "block_length": 16, "cache": "dual"}),
    Setting("BD3-LM 4, first-hitting, KV cache", "bd3lm4", {"name": "bd3lm", "block_sampler": "first_hitting"}),
    Setting("BD3-LM 4, threshold 0.9, KV cache", "bd3lm4", {"name": "bd3lm", "block_sampler": "parallel", **_threshold(0.9)}),
    Setting("BD3-LM 4, threshold 0.7, KV cache", "bd3lm4", {"name": "bd3lm", "block_sampler": "parallel", **_threshold(0.7)}),
    Setting("BD3-LM 4, threshold 0.5, KV cache", "bd3lm4", {"name": "bd3lm", "block_sampler": "parallel", **_threshold(0.5)}),
    Setting("Fast-dLLM v2 16, first-hitting, KV cache", "fdv2_16", {"name": "bd3lm", "block_sampler": "first_hitting"}),
    Setting("Fast-dLLM v2 16, threshold 0.9, KV cache", "fdv2_16", {"name": "bd3lm", "block_sampler": "parallel", **_threshold(0.9)}),
    Setting("Fast-dLLM v2 16, threshold 0.7, KV cache", "fdv2_16", {"name": "bd3lm", "block_sampler": "parallel", **_threshold(0.7)}),
    # Fast-dLLM v2's sub-blocks: a block of 16 decoded as 4 semi-autoregressive sub-blocks of 4, threshold rule
    Setting("Fast-dLLM v2 16, sub-blocks 4, threshold 0.9", "fdv2_16",
            {"name": "bd3lm", "block_sampler": "parallel", **_threshold(0.9), "block_length": 4}),
    Setting("Fast-dLLM v2 4, first-hitting, KV cache", "fdv2_4", {"name": "bd3lm", "block_sampler": "first_hitting"}),
    Setting("Fast-dLLM v2 4, threshold 0.9, KV cache", "fdv2_4", {"name": "bd3lm", "block_sampler": "parallel", **_threshold(0.9)}),
    Setting("Fast-dLLM v2 4, threshold 0.7, KV cache", "fdv2_4", {"name": "bd3lm", "block_sampler": "parallel", **_threshold(0.7)}),
    Setting("Fast-dLLM v2 4, threshold 0.5, KV cache", "fdv2_4", {"name": "bd3lm", "block_sampler": "parallel", **_threshold(0.5)}),
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Pure pieces (tested in tests/test_speed_quality.py)
# ----------------------------------------------------------------------------------------------------------


def sampler_fields(setting: Setting, new_tokens: int) -> dict:
    """The config.sampler fields of a setting for `new_tokens` generated tokens (temperature 1, no bar)."""
    fields = {"temperature": 1.0, "progress": False, **setting.fields}
    if fields.get("steps") == -1:
        fields["steps"] = new_tokens
    return fields


def prompts(rows, tokenizer, count: int) -> np.ndarray:
    """int32 [count, PROMPT_TOKENS]: bos + the first PROMPT_TOKENS - 1 content ids of each held-out row
    (rows are reused cyclically when count exceeds them)."""
    from ddlm.eval import sample_quality

    out = []
    for i in range(count):
        ids = sample_quality.content_ids(rows[i % len(rows)], tokenizer)[: PROMPT_TOKENS - 1]
        if len(ids) < PROMPT_TOKENS - 1:
            raise ValueError(f"held-out row {i % len(rows)} has {len(ids)} content ids, fewer than the prompt's")
        out.append([tokenizer.bos_id, *ids])
    return np.asarray(out, np.int32)


def canvas(prompt_ids: np.ndarray, new_tokens: int, mask_id: int, *, masked: int | None = None, fill: int = 0):
    """x_init [B, P + new_tokens]: the prompts then masks; with `masked`, only the first `masked` new
    positions are masks and the rest are `fill` (known tokens: the MDLM time-to-first-token canvas)."""
    b, p = prompt_ids.shape
    x = np.full((b, p + new_tokens), mask_id, np.int32)
    x[:, :p] = prompt_ids
    if masked is not None:
        x[:, p + masked :] = fill
    return x


def first_unit(setting: Setting, block_sizes: dict) -> tuple[str, int]:
    """How a setting's first streamable unit is timed: ('truncate', n) = generate n tokens after the prompt
    (causal across units); ('fill', n) = the full canvas with only the first n new positions masked."""
    name = setting.fields["name"]
    if name in ("ar", "speculative"):
        return "truncate", 1
    if name == "bd3lm":
        return "truncate", block_sizes[setting.model]
    if name == "parallel":
        return "fill", int(setting.fields["block_length"])
    return "fill", 0  # one canvas: the first token is final when the whole sequence is (0 = nothing filled)


def distance(row: dict, base: dict) -> float:
    """How far a quality row is from the baseline's: the larger of its gen-ppl and entropy differences, each in
    standard errors of the difference (`within`'s scale; a setting matches at <= 2 and MAUVE within)."""
    out = 0.0
    for key in ("gen_ppl", "entropy"):
        se = math.sqrt(row[f"{key}_se"] ** 2 + base[f"{key}_se"] ** 2)
        out = max(out, abs(row[key] - base[key]) / se if se > 0 else math.inf)
    return out


def within(a: float, se_a: float, b: float, se_b: float, z: float = 2.0) -> bool:
    """|a - b| <= z sqrt(se_a^2 + se_b^2) (a missing SE counts as 0; NaN values never match)."""
    if any(map(math.isnan, (a, b))):
        return False
    se = math.sqrt(sum(0.0 if math.isnan(s) else s * s for s in (se_a, se_b)))
    return abs(a - b) <= z * se


def matches(row: dict, base: dict, z: float = 2.0) -> bool:
    """Whether a setting's quality row matches the baseline's: gen-ppl, entropy and (when both have it)
    MAUVE, each within z standard errors of the difference."""
    ok = within(row["gen_ppl"], row["gen_ppl_se"], base["gen_ppl"], base["gen_ppl_se"], z)
    ok = ok and within(row["entropy"], row["entropy_se"], base["entropy"], base["entropy_se"], z)
    if "mauve" in row and "mauve" in base:
        ok = ok and within(row["mauve"], row.get("mauve_se", float("nan")), base["mauve"], base.get("mauve_se", float("nan")), z)
    return ok


# ----------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------


class Net(NamedTuple):
    config: ml_collections.ConfigDict
    model: Any
    params: Any
    tokenizer: Any


def load_nets(names, workdirs: dict, steps: dict | None = None) -> dict:
    """The trained networks (EMA parameters, one device): the checkpoint at steps[name] where given, else the
    newest."""
    from ddlm import loading

    out = {}
    for name in names:
        step = (steps or {}).get(name)
        loaded = loading.load_for_inference(workdirs[name], devices=jax.devices()[:1], step=step)
        out[name] = Net(loaded.config, loaded.model, loaded.params, loaded.tokenizer)
        print(f"{name}: {workdirs[name]} step {loaded.step}", flush=True)
    return out


def random_nets(names) -> dict:
    """--dry-run: random networks of the recipes' shapes (smoke configs), no checkpoint needed."""
    import flax.linen as nn

    from ddlm.data import tokenizers
    from ddlm.eval import cli as eval_cli

    recipes = {"judge": "experiments/judge.py", "mdlm": "model=mdlm", "bd3lm4": "model=bd3lm,block_size=4",
               "fdv2_16": "model=fastdllm_v2,block_size=16", "fdv2_4": "model=fastdllm_v2,block_size=4",
               "ar": "model=ar", "draft": "model=draft"}  # fmt: skip
    out = {}
    for i, name in enumerate(names):
        spec = recipes[name]
        path, arg = (spec, "smoke") if spec.endswith(".py") else ("experiments/speed_quality.py", spec + ",smoke")
        config = eval_cli.load_config_file(f"{path}:{arg}")
        config.train.seq_len = 128
        tok = tokenizers.get_tokenizer(config.data)
        model = models.get_model(config.model, tok.vocab_size)
        x = jnp.zeros((1, 2 * max(int(config.model.get("block_size", 0) or 0), 4)), jnp.int32)
        t = jnp.zeros((1,)) if config.model.get("time_conditioning", False) else None
        x0 = x if config.model.name == "bd3lm" else None
        params = dict(nn.unbox(jax.jit(model.init)(jax.random.key(i), x, t, x0=x0))["params"])
        params["output_kernel"] = jax.random.normal(jax.random.key(100 + i), params["output_kernel"].shape) * 0.5
        out[name] = Net(config, model, params, tok)
    return out


# ----------------------------------------------------------------------------------------------------------
# Sampling and timing
# ----------------------------------------------------------------------------------------------------------


def make_run(setting: Setting, nets: dict, new_tokens: int):
    """run(params, draft_params, rng, x_init) -> (tokens [B, L], nfe, draft_nfe): the setting's sampler."""
    from ddlm.sampling import cli as sampling_cli

    net = nets[setting.model]
    sc = sampler_config.resolve(ml_collections.ConfigDict(sampler_fields(setting, new_tokens)))
    tok = net.tokenizer
    if sc.name == "speculative":
        draft = nets["draft"]
        schedule = schedules.get_schedule(net.config.diffusion.schedule)

        def run(params, draft_params, rng, x):
            out = sampling.make_sampler(
                sc,
                schedule=schedule,
                mask_id=tok.mask_id,
                decoder=models.make_decoder(net.model, {"params": params}),
                draft_decoder=models.make_decoder(draft.model, {"params": draft_params}),
                eos_id=tok.eos_id,
                pad_id=tok.pad_id,
            )(rng, x)
            return out.tokens, out.nfe, out.draft_nfe

        return run
    sample = sampling_cli.sample_fn(net.config, sc, net.model, tok, None)

    def run(params, draft_params, rng, x):
        out = sample(params, rng, x, None)
        return out.tokens, out.nfe, jnp.zeros((), jnp.int32)

    return run


class Timed(NamedTuple):
    seconds: float  # median over repeats
    nfe: float  # mean over repeats
    draft_nfe: float
    compile_s: float


def compile_run(setting: Setting, nets: dict, x: np.ndarray, new_tokens: int):
    """(run(rng, x) -> (tokens, nfe, draft_nfe), compile seconds): the setting's sampler compiled for x's shape
    with its parameters bound (the draft's for speculative decoding)."""
    params = nets[setting.model].params
    draft_params = nets["draft"].params if setting.fields["name"] == "speculative" else None
    t0 = time.perf_counter()
    fn = jax.jit(make_run(setting, nets, new_tokens)).lower(params, draft_params, jax.random.key(0), x).compile()
    return (lambda rng, x: fn(params, draft_params, rng, x)), time.perf_counter() - t0


def timed(setting: Setting, nets: dict, x: np.ndarray, new_tokens: int, repeats: int, seed: int = 0) -> Timed:
    run, compile_s = compile_run(setting, nets, x, new_tokens)
    run(jax.random.key(seed + repeats), x)[0].block_until_ready()  # warm-up, not timed
    secs, nfes, drafts = [], [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        tokens, nfe, draft_nfe = run(jax.random.key(seed + r), x)
        tokens.block_until_ready()
        secs.append(time.perf_counter() - t0)
        nfes.append(int(nfe))
        drafts.append(int(draft_nfe))
    return Timed(float(np.median(secs)), float(np.mean(nfes)), float(np.mean(drafts)), compile_s)


def quality_samples(setting, nets, prompt_ids, new_tokens, batch, count) -> tuple[np.ndarray, float]:
    """`count` samples continuing the prompts, `batch` at a time (keys 1000 + offset): (tokens, mean NFE)."""
    mask_id = nets[setting.model].tokenizer.mask_id
    rows, nfes, run = [], [], None
    for lo in range(0, count, batch):
        x = canvas(prompt_ids[lo : lo + batch], new_tokens, mask_id)
        if run is None:
            run, _ = compile_run(setting, nets, x, new_tokens)
        tokens, nfe, _ = run(jax.random.key(1000 + lo), x)
        rows.append(np.asarray(tokens))
        nfes.append(int(nfe))
    return np.concatenate(rows)[:count], float(np.mean(nfes))


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------


def header(args, names=()) -> str:
    used = sorted({WORKDIRS[n] for n in names}) if names else sorted(set(WORKDIRS.values()))
    weights = "RANDOM weights (--dry-run)" if args.dry_run else "trained checkpoints " + ", ".join(used)
    return (
        f"{machine.describe()}; {weights}; prompts {PROMPT_TOKENS} tokens, {args.samples} samples "
        f"per setting, median of {args.repeats}"
    )


def bootstrap_mauve(p_features, q_features, reps: int, seed: int = 0) -> dict:
    """MAUVE(P, Q) with an error bar that includes the samples' own noise: the mean and standard deviation over
    `reps` bootstrap resamples of the samples Q (with replacement; k-means seed = the resample's index), the
    reference P fixed (it is common to every setting, so it does not enter their differences).
    mauve_over_seeds' SE is the k-means noise alone, far below the sampling noise at a few hundred texts."""
    from ddlm.eval import mauve as mauve_lib

    rng = np.random.default_rng(seed)
    values = []
    for r in range(reps):
        idx = rng.integers(0, len(q_features), len(q_features))
        values.append(mauve_lib.mauve_over_seeds(p_features, q_features[idx], seeds=(r + 1,))["mauve"])
    values = np.asarray(values)
    return {"mauve": float(values.mean()), "mauve_se": float(values.std(ddof=1)) if reps > 1 else float("nan"),
            "mauve_resamples": values.tolist()}  # fmt: skip


def quality(setting, nets, judge_scorer, judge, reference_features, prompt_ids, args) -> dict:
    from ddlm.eval import sample_quality

    tok = nets[setting.model].tokenizer
    t0 = time.perf_counter()
    rows, nfe = quality_samples(setting, nets, prompt_ids, args.new_tokens, max(args.batch_list), args.samples)
    out = sample_quality.sample_quality(judge_scorer, rows.tolist(), tok)
    texts = [tok.decode(sample_quality.content_ids(r, tok)) for r in rows.tolist()]
    out.update(bootstrap_mauve(reference_features, judge.text_features(texts), args.mauve_seeds))
    out.update(quality_nfe=nfe, quality_s=time.perf_counter() - t0, example=texts[0])
    return out


def fmt(x, se=None, digits=2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    s = f"{x:.{digits}f}"
    return s if se is None or math.isnan(se) else f"{s} ± {se:.{digits}f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=128, help="judged samples per setting")
    parser.add_argument("--new_tokens", type=int, default=112, help="short output (judged; prompt + this <= 128)")
    parser.add_argument("--long_tokens", type=int, default=1024, help="long output (speed only); 0 = none")
    parser.add_argument("--batches", default="1,8,32", help="batch sweep (the largest also draws the judged samples)")
    parser.add_argument("--long_batches", default="1", help="batch sweep of the long output")
    parser.add_argument("--verbose", action="store_true", help="print every timed cell as it is measured")
    parser.add_argument("--ttft_sweep", action="store_true", help="time to first token at every batch (else the first)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mauve_seeds", type=int, default=8, help="bootstrap resamples of MAUVE (its error bar)")
    parser.add_argument("--only", default="", help="comma-separated substrings of setting labels (the AR rows always run)")
    parser.add_argument("--judge", default=WORKDIRS["judge"], help="the judge's workdir (an AR run, never a side)")
    parser.add_argument("--root", default="runs", help="the folder holding the runs (sq_ar, ..., judge)")
    parser.add_argument("--export", default="", help="copy the newest checkpoint of every run to this folder "
                        "(to carry to a GPU: ~60 MB) and exit; then --root=<it>")  # fmt: skip
    parser.add_argument("--out", default="benchmarks/speed_quality.png", help="the plot; the JSON goes beside it")
    parser.add_argument("--dry-run", dest="dry_run", action="store_true", help="random networks, tiny sizes, once")
    parser.add_argument("--device-suite", dest="device_suite", action="store_true", help="the GPU grid: batches 1,8,32 both lengths")
    parser.add_argument("--from_json", default="", help="print the report of a written JSON (no sampling); with --out, redraw")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        results = saved["results"]
        base = next(r for r in results if r["label"] == BASELINE)
        spec = next(r for r in results if r["label"] == SPECULATIVE)
        for r in results:
            r["matched"] = matches(r, base)
        cells = [tuple(map(int, c.split("x"))) for c in base["speed"]]
        args.new_tokens, args.samples, args.judge = cells[0][0], saved["held_out"]["samples"], saved.get("judge", "runs/judge")
        print(saved["header"] + "\n")
        print(report(results, base, spec, cells, args, saved["held_out"]))
        if args.out != parser.get_default("out"):  # redraw the plot from the JSON
            plot(results, saved["held_out"], cells, args, saved.get("device", "cpu"))
        return
    if args.dry_run:
        args.samples, args.new_tokens, args.long_tokens, args.repeats, args.mauve_seeds = 8, 32, 64, 1, 2
        args.batches, args.long_batches = "1,4", "1"
        if args.out == parser.get_default("out"):
            args.out = os.path.join("/tmp", "speed_quality_dry_run.png")
    if args.device_suite:
        args.long_batches, args.repeats, args.ttft_sweep = "1,8,32", 5, True
    for name, path in WORKDIRS.items():
        WORKDIRS[name] = os.path.join(args.root, os.path.basename(path))
    if args.judge != parser.get_default("judge"):
        WORKDIRS["judge"] = args.judge
    args.judge = WORKDIRS["judge"]
    if args.export:
        export(args.export)
        return
    args.batch_list = [int(b) for b in args.batches.split(",")]
    long_batches = [int(b) for b in args.long_batches.split(",")] if args.long_tokens else []
    settings = [s for s in SETTINGS if s.label in (BASELINE, SPECULATIVE) or not args.only
                or any(o in s.label for o in args.only.split(","))]  # fmt: skip
    names = sorted({s.model for s in settings} | {"draft", "judge"})
    missing = [WORKDIRS[n] for n in names if not args.dry_run and not os.path.isdir(os.path.join(WORKDIRS[n], "checkpoints"))]
    if missing:
        sys.exit(f"speed_quality: no checkpoints in {', '.join(missing)}: train them first (experiments/speed_quality.py)")
    from ddlm import compilation_cache

    compilation_cache.enable()  # a rerun loads the compiled samplers (compile_s is then the load time)
    print(header(args, names), flush=True)
    nets = random_nets(names) if args.dry_run else load_nets(names, WORKDIRS)

    from ddlm.eval import cli as eval_cli
    from ddlm.eval import mauve as mauve_lib
    from ddlm.eval import sample_quality

    judge_net = nets["judge"]
    scorer = eval_cli.make_scorer(judge_net.config, judge_net, batch_size=32)
    judge = mauve_lib.Judge.from_loaded(judge_net, batch_size=32)
    ar_net = nets["ar"]
    held_out = eval_cli.validation_rows(ar_net.config, ar_net.tokenizer, args.samples)
    prompt_ids = prompts(held_out, ar_net.tokenizer, max(args.samples, max(args.batch_list + long_batches)))
    references = [ar_net.tokenizer.decode(sample_quality.content_ids(r, ar_net.tokenizer)) for r in held_out]
    block_sizes = {n: int(nets[n].config.model.get("block_size", 0) or 0) for n in names}
    reference_features = judge.text_features(references)
    ref_quality = sample_quality.sample_quality(scorer, held_out, ar_net.tokenizer)
    print(f"held-out text itself: gen-ppl {fmt(ref_quality['gen_ppl'], ref_quality['gen_ppl_se'])}, entropy "
          f"{fmt(ref_quality['entropy'], ref_quality['entropy_se'], 3)}", flush=True)  # fmt: skip

    results = []
    t_start = time.time()
    for s in settings:
        mask_id = nets[s.model].tokenizer.mask_id
        row = {"label": s.label, "model": s.model, "fields": sampler_fields(s, args.new_tokens)}
        row.update(quality(s, nets, scorer, judge, reference_features, prompt_ids[: args.samples], args))
        speed = {}
        for length, batches in ((args.new_tokens, args.batch_list), (args.long_tokens, long_batches)):
            for b in batches if length == args.new_tokens or s.long else ():
                t = timed(s, nets, canvas(prompt_ids[:b], length, mask_id), length, args.repeats)
                if args.verbose:
                    print(f"  {length} new x {b}: {t.seconds:.3f} s, NFE {t.nfe:.1f}, compile {t.compile_s:.1f} s", flush=True)
                speed[f"{length}x{b}"] = {"s": t.seconds, "nfe": t.nfe, "draft_nfe": t.draft_nfe,
                                          "tokens_per_s": b * length / t.seconds, "compile_s": t.compile_s}  # fmt: skip
        how, n = first_unit(s, block_sizes)
        ttft = {}
        for b in args.batch_list if args.ttft_sweep else args.batch_list[:1]:
            if how == "truncate":
                t = timed(s, nets, canvas(prompt_ids[:b], n, mask_id), n, args.repeats)
            else:
                fill = int(prompt_ids[0, 1])
                x = canvas(prompt_ids[:b], args.new_tokens, mask_id, masked=n or None, fill=fill)
                t = timed(s, nets, x, args.new_tokens, args.repeats)
            ttft[str(b)] = t.seconds
        row.update(speed=speed, ttft_s=ttft[str(args.batch_list[0])], ttft_by_batch=ttft, ttft_unit=n or args.new_tokens)
        results.append(row)
        b1 = speed.get(f"{args.new_tokens}x1", {})
        print(f"{s.label}: gen-ppl {fmt(row['gen_ppl'], row['gen_ppl_se'])}, entropy "
              f"{fmt(row['entropy'], row['entropy_se'], 3)}, MAUVE {fmt(row['mauve'], row['mauve_se'], 3)}, "
              f"NFE (batch 1) {fmt(b1.get('nfe'), None, 1)}, TTFT {row['ttft_s'] * 1e3:.1f} ms "
              f"[{time.time() - t_start:.0f} s]", flush=True)  # fmt: skip

    base = next(r for r in results if r["label"] == BASELINE)
    spec = next(r for r in results if r["label"] == SPECULATIVE)
    for r in results:
        r["matched"] = matches(r, base)
    cells = [(args.new_tokens, b) for b in args.batch_list] + [(args.long_tokens, b) for b in long_batches]
    print()
    print(report(results, base, spec, cells, args, ref_quality))
    write(results, ref_quality, cells, args)


def ratio(r, base, cell) -> float:
    """r's tokens/s over base's in one cell (NaN where r was not timed there)."""
    if cell not in r["speed"]:
        return float("nan")
    return r["speed"][cell]["tokens_per_s"] / base["speed"][cell]["tokens_per_s"]


def speed_cell(r, base, cell) -> str:
    if cell not in r["speed"]:
        return "-"
    return f"{r['speed'][cell]['tokens_per_s']:,.0f} ({ratio(r, base, cell):.2f}x)"


def report(results, base, spec, cells, args, ref_quality) -> str:
    title = (
        f"Quality of {args.new_tokens}-token continuations ({args.samples} per setting; judge: {args.judge}; "
        f"held-out text itself: gen-ppl {fmt(ref_quality['gen_ppl'], ref_quality['gen_ppl_se'])}, entropy "
        f"{fmt(ref_quality['entropy'], ref_quality['entropy_se'], 3)}), NFE and tokens per forward at batch 1, "
        "time to first token at batch 1:"
    )
    lines = [
        title,
        "",
        "| setting | matched | gen-ppl | entropy | MAUVE | NFE | tokens/forward | TTFT ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    c1 = f"{args.new_tokens}x1"
    for r in results:
        sp = r["speed"].get(c1, {})
        nfe = sp.get("nfe", float("nan"))
        draft = f" (+{sp['draft_nfe']:.0f} draft)" if sp.get("draft_nfe") else ""
        lines.append(
            f"| {r['label']} | {'yes' if r['matched'] else 'no'} | {fmt(r['gen_ppl'], r['gen_ppl_se'])} | "
            f"{fmt(r['entropy'], r['entropy_se'], 3)} | {fmt(r['mauve'], r['mauve_se'], 3)} | {nfe:.1f}{draft} | "
            f"{args.new_tokens / nfe:.2f} | {r['ttft_s'] * 1e3:.1f} |"
        )
    swept = [b for b in results[0].get("ttft_by_batch", {})]
    if len(swept) > 1:
        lines += ["", "Time to first token (ms) per batch:", "", "| setting | " + " | ".join(f"batch {b}" for b in swept) + " |",
                  "|---|" + "---|" * len(swept)]  # fmt: skip
        for r in results:
            lines.append(f"| {r['label']} | " + " | ".join(f"{r['ttft_by_batch'][b] * 1e3:.1f}" for b in swept) + " |")
    lines += ["", "Tokens/s (and the ratio to AR + KV cache) per output length x batch:", ""]
    lines.append("| setting | " + " | ".join(f"{n} new x {b}" for n, b in cells) + " |")
    lines.append("|---|" + "---|" * len(cells))
    for r in results:
        lines.append(f"| {r['label']} | " + " | ".join(speed_cell(r, base, f"{n}x{b}") for n, b in cells) + " |")
    matched = [r for r in results if r["matched"] and r["model"] != "ar"]
    lines.append("")
    if matched:
        best = max(matched, key=lambda r: args.new_tokens / r["speed"][c1]["nfe"])
        lines.append(
            "Matched diffusion settings (gen-ppl, entropy and MAUVE within 2 SE of AR + KV cache): "
            + "; ".join(
                f"{r['label']}: {args.new_tokens / r['speed'][c1]['nfe']:.2f} tokens/forward, "
                + ", ".join(f"{ratio(r, base, f'{n}x{b}'):.2f}x AR+KV / {ratio(r, spec, f'{n}x{b}'):.2f}x AR+spec at {n}x{b}"
                            for n, b in cells if f"{n}x{b}" in r["speed"])
                for r in matched
            )
        )  # fmt: skip
        lines.append(f"Best tokens per forward at matched quality: {args.new_tokens / best['speed'][c1]['nfe']:.2f} ({best['label']}).")
    elif any(r["model"] != "ar" for r in results):
        closest = min((r for r in results if r["model"] != "ar"), key=lambda r: distance(r, base))
        lines.append(
            f"No diffusion setting matches AR + KV cache. Closest ({distance(closest, base):.1f} SE on the worse of "
            f"gen-ppl and entropy): {closest['label']}: "
            f"{fmt(closest['gen_ppl'], closest['gen_ppl_se'])} vs {fmt(base['gen_ppl'], base['gen_ppl_se'])}, entropy "
            f"{fmt(closest['entropy'], closest['entropy_se'], 3)} vs {fmt(base['entropy'], base['entropy_se'], 3)}, MAUVE "
            f"{fmt(closest['mauve'], closest['mauve_se'], 3)} vs {fmt(base['mauve'], base['mauve_se'], 3)}."
        )
    lines.append(f"AR + speculative decoding (lossless) matched AR + KV cache: {'yes' if spec['matched'] else 'NO (protocol check failed)'}.")
    return "\n".join(lines)


def export(out: str) -> None:
    """The newest committed checkpoint of every run in WORKDIRS, copied to out/<run>/checkpoints/<step>: what a
    device session needs (load_for_inference reads the newest step), a fraction of the runs' size."""
    import shutil

    from ddlm import checkpoints

    total = 0
    for path in sorted(set(WORKDIRS.values())):
        src = os.path.join(path, checkpoints.CHECKPOINTS_DIR)
        steps = checkpoints.committed_steps(src)
        if not steps:
            sys.exit(f"speed_quality --export: no committed checkpoint in {src}")
        dst = os.path.join(out, os.path.basename(path), checkpoints.CHECKPOINTS_DIR, str(max(steps)))
        if os.path.exists(dst):
            sys.exit(f"speed_quality --export: {dst} exists; export to an empty folder")
        shutil.copytree(os.path.join(src, str(max(steps))), dst)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dst) for f in fs)
        total += size
        print(f"{path} step {max(steps)} -> {dst} ({size / 2**20:.1f} MiB)")
    print(f"{total / 2**20:.1f} MiB in all; run with --root={out}")


def plot(results, ref_quality, cells, args, device: str) -> None:
    """Two panels: the quality plane (gen-ppl against entropy: AR's +-2 SE box, the held-out text) and speed
    against gen-ppl (tokens/s over AR + KV cache at batch 1, 112 new tokens). One number per setting, the legend
    names them; color = model, filled = matches AR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in results if r["label"] == BASELINE)
    cell = f"{cells[0][0]}x{cells[0][1]}"
    families = {"ar": "black", "mdlm": "tab:blue", "bd3lm4": "tab:orange", "fdv2_16": "tab:green", "fdv2_4": "tab:red"}
    fig, (qa, sa) = plt.subplots(1, 2, figsize=(14, 5.5))
    for i, r in enumerate(results, 1):
        color = families.get(r["model"], "gray")
        style = {"color": color, "mfc": color if r["matched"] else "white", "ms": 8, "capsize": 2, "fmt": "o"}
        qa.errorbar(r["entropy"], r["gen_ppl"], xerr=2 * r["entropy_se"], yerr=2 * r["gen_ppl_se"], **style,
                    label=f"{i}. {r['label']}")  # fmt: skip
        sa.errorbar(ratio(r, base, cell), r["gen_ppl"], yerr=2 * r["gen_ppl_se"], **style)
        for ax, x in ((qa, r["entropy"]), (sa, ratio(r, base, cell))):
            ax.annotate(str(i), (x, r["gen_ppl"]), fontsize=8, xytext=(5, 4), textcoords="offset points")
    for ax in (qa, sa):
        ax.axhspan(base["gen_ppl"] - 2 * base["gen_ppl_se"], base["gen_ppl"] + 2 * base["gen_ppl_se"], color="k", alpha=0.08)
        ax.axhline(ref_quality["gen_ppl"], color="gray", ls=":", lw=1)
        ax.set_ylabel("generative perplexity under the judge (±2 SE)")
    qa.axvspan(base["entropy"] - 2 * base["entropy_se"], base["entropy"] + 2 * base["entropy_se"], color="k", alpha=0.08)
    qa.axvline(ref_quality["entropy"], color="gray", ls=":", lw=1)
    qa.set_xlabel("unigram entropy of the samples (nats, ±2 SE); dotted: held-out text")
    qa.set_title("quality: AR's ±2 SE band shaded; filled = matches AR (gen-ppl, entropy, MAUVE)", fontsize=9)
    sa.set_xscale("log")
    sa.set_xlabel(f"tokens/s relative to AR + KV cache ({cells[0][0]} new tokens, batch {cells[0][1]}, {device})")
    sa.set_title("speed against quality", fontsize=9)
    fig.legend(loc="center right", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.76, 1))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=120)


def write(results, ref_quality, cells, args) -> None:
    plot(results, ref_quality, cells, args, jax.devices()[0].device_kind)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"header": header(args, sorted({r["model"] for r in results} | {"draft", "judge"})), "judge": args.judge,
                   "device": jax.devices()[0].device_kind, "held_out": ref_quality, "results": results}, f, indent=1, default=float)  # fmt: skip
    print(f"\nwrote {args.out} and {os.path.splitext(args.out)[0]}.json")


if __name__ == "__main__":
    main()
