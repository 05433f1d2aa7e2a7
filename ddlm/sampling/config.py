"""The sampler fields of an experiment config (config.sampler); experiments copy `default_config()`.

Override any field on the command line, e.g.
    python -m ddlm.main --mode=sample --config=experiments/mdlm.py --workdir=runs/mdlm \
        --config.sampler.name=first_hitting --config.sampler.prompt="ROMEO:" --config.sampler.visualize=True
"""

from __future__ import annotations

import math

import ml_collections


# The samplers with a greedy tail (config.sampler.greedy_tail).
GREEDY_TAIL_SAMPLERS = ("psi",)


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "ancestral"  # ancestral | cached | first_hitting | remdm | sedd_euler | sedd_analytic | parallel | psi
    c.steps = 128  # reverse steps (ignored by first_hitting: one network call per masked token)
    c.grid = ""  # schedule whose alpha(t) spaces the steps: loglinear | linear | cosine | ...; '' = config.diffusion.schedule
    c.t_min = 0.0  # the grid runs from t = 1 down to t_min
    c.temperature = 1.0  # softmax temperature of p_theta(x_0 | x_t); name=parallel: 0 = greedy (argmax)
    c.top_k = 0  # keep the k most likely tokens (0 = off)
    c.top_p = 1.0  # nucleus sampling mass (1 = off)
    c.noise_removal = (
        True  # final greedy step for tokens still masked at t_min (SEDD: greedy Tweedie denoise)
    )
    c.precision = (
        "float64"  # Gumbel noise: float64 (53-bit, untruncated tail) | float32_64bit | float32 (biased)
    )
    c.remasking = "rescale"  # ReMDM strategy for name=remdm: cap | rescale | confidence
    c.eta = 0.02  # ReMDM remasking strength (eta_cap or eta_rescale); 0 = plain ancestral
    # name=parallel (ddlm.sampling.parallel): semi-autoregressive blocks, a commit rule per step.
    c.rule = "low_confidence"  # random|low_confidence|margin|entropy|threshold|factor|entropy_bounded
    c.block_length = 0  # tokens per semi-autoregressive block (must divide seq_len); 0 = one block
    c.threshold = 0.9  # rule=threshold: commit every candidate with probability above this, in (0, 1]
    c.factor = 1.0  # rule=factor: Fast-dLLM's f, commit the largest n with (n + 1)(1 - c_(n)) <= f
    c.gamma = 0.01  # rule=entropy_bounded: EB-sampler's entropy budget (nats)
    c.parallel_remasking = "none"  # ReMDM remasking in name=parallel: none | cap | rescale | confidence (eta)
    c.cache = "none"  # name=parallel, a dit network: Fast-dLLM KV cache none | prefix | dual (approximate)
    c.refresh_every = 0  # cache refreshes: 0 = once per block (Fast-dLLM); k = also every k steps of a block
    c.guidance_scale = (
        0.0  # classifier-free guidance w (LLaDA form, prompt masked as unconditional input); 0 = off
    )
    c.prompt = ""  # text the samples start with (prefix conditioning)
    c.infill = ""  # infill template: 'The [MASK:20] sat on the mat.' ([MASK] or [MASK:n], n >= 1; '' = none)
    c.constraints = ""  # hard token constraints 'pos:id,pos:id' (pos < 0 counts from the end; '' = none)
    c.end = 0  # length control: eos at this position, padding after (0 = use the whole sequence)
    c.truncate_at_eos = True  # in the outputs, everything after the first eos becomes padding
    c.num_samples = 8  # sequences to generate
    c.batch_size = 8  # sequences per sampling call (sharded over the mesh's data axis)
    c.seq_len = 0  # generated length; 0 = config.train.seq_len
    c.seed = 0  # sampling randomness: the same seed, the same samples (reproducible); change it for new ones
    c.use_ema = True  # sample with the EMA parameters
    c.checkpoint_step = 0  # sample the workdir's checkpoint of this step (a distillation round's, say); 0 = newest
    c.progress = True  # per-step progress bar (a host callback from the jitted loop after every step)
    c.visualize = False  # write every sample's trajectory to trajectory.html (+ an animation on a terminal)
    c.output_dir = ""  # each run writes to <output_dir>/<date>-<time>-step<N>-<name>/; '' = <workdir>/samples
    # name=ar (causal networks) and name=bd3lm (block-causal): decoding with the network's KV cache
    c.canvas_length = 0  # name=canvas: tokens per canvas, generated left to right (must divide seq_len; 0 = one)
    c.entropy_bound = 1.0  # name=canvas: accept the lowest-entropy positions while their entropy sum stays below
    c.renoise = True  # name=canvas: rejected positions become random tokens (False: they keep theirs)
    c.anneal_max = 1.0  # name=canvas: temperature at t = 1 ...
    c.anneal_min = 1.0  # ... and at t = 0 (DiffusionGemma: 0.8 -> 0.4)
    c.anneal_exponent = 1.0  # name=canvas: T = min + (max - min)(1 - (1 - t)^exponent)
    c.stop_when_stable = False  # name=canvas: end a row's canvas after stable_patience steps that change none of its tokens
    c.stable_patience = 1  # name=canvas: steps without a changed token that end a row's canvas (>= 1)
    c.stop_entropy = 0.0  # name=canvas: end a row's canvas at a step whose predictive entropy (nats) is below this (0 = off)
    c.stop_entropy_reduce = "mean"  # name=canvas: the canvas's entropy for stop_entropy: mean | max over its positions
    c.psi_strength = 0.0  # name=psi: corrector strength 1 - kappa in [0, 1] (0 = the plain reverse step)
    c.psi_corrector_steps = 0  # name=psi: pure corrector calls at s after each step but the last (each one NFE)
    c.greedy_tail = 0  # name=psi: the last k calls output the argmax of the clean prediction (DUO's greedy noise removal: 1)
    c.kv_cache = True  # reuse the keys/values of finished tokens (False: full forward per call; same tokens)
    c.greedy = False  # ar: argmax decoding (else temperature / top_k / top_p, float64 Gumbel noise)
    c.stop_at_eos = False  # stop once every sequence has generated eos (variable length); pad after it
    c.block_sampler = (
        "first_hitting"  # bd3lm, inside each block: first_hitting|ancestral|cached|remdm|parallel
    )
    c.window = 0  # bd3lm: clean tokens kept in the cache; 0 = all (train.seq_len - block past the context)
    c.draft_tokens = 4  # speculative: tokens the draft proposes per round (the target verifies k + 1 in one call)
    return c


def resolve(sampler_config) -> ml_collections.ConfigDict:
    """default_config() with the fields of `sampler_config` set; a field default_config lacks is an error."""
    out = default_config()
    for key, value in sampler_config.items():
        if key not in out:
            raise ValueError(f"config.sampler.{key} is not a sampler field; fields: {sorted(out.keys())}")
        out[key] = value
    return out


def validate(sampler_config, *, diffusion=None, seq_len: int | None = None) -> ml_collections.ConfigDict:
    """Checks every field of config.sampler before anything is loaded or compiled, so that a mistake costs
    a second, not a checkpoint restore (or a whole training run, with train.sample_at_end). Returns the
    resolved config (`resolve`). diffusion: config.diffusion, to check the sampler against the loss and
    the process; seq_len: the generated length (sampler.seq_len or train.seq_len), to check positions.
    Raises ValueError naming config.sampler.<field> and what was expected."""
    from ddlm import schedules
    from ddlm.sampling import (
        BLOCK_SAMPLERS,
        SAMPLERS,
        caches,
        categorical,
        conditioning,
        masked,
        parallel,
        rules,
    )

    c = resolve(sampler_config)

    def fail(key, expected):
        raise ValueError(f"config.sampler.{key} must be {expected}, got {c[key]!r}")

    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    def is_number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if c.name not in SAMPLERS:
        fail("name", f"one of {SAMPLERS}")
    integers = (("steps", 1), ("num_samples", 1), ("batch_size", 1), ("top_k", 0), ("end", 0), ("checkpoint_step", 0))
    for key, low in integers:
        if not is_int(c[key]) or c[key] < low:
            fail(key, f"an integer >= {low}")
    if not is_int(c.seq_len) or c.seq_len < 0:
        fail("seq_len", "an integer >= 0 (0 = config.train.seq_len)")
    if not is_int(c.seed) or not 0 <= c.seed < 2**32:
        fail("seed", "an integer in [0, 2^32) (a jax key holds 32 bits of it: 2^32 + 5 would draw what 5 draws)")
    if c.grid not in ("", *schedules.SCHEDULES):
        fail("grid", f"'' (the diffusion schedule) or one of {sorted(schedules.SCHEDULES)}")
    if not is_number(c.t_min) or not 0.0 <= c.t_min < 1.0:
        fail("t_min", "a number in [0, 1)")
    greedy_ok = c.name == "parallel"  # parallel_sample takes the argmax at temperature 0 (LLaDA, Fast-dLLM)
    if not is_number(c.temperature) or c.temperature < 0 or (c.temperature == 0 and not greedy_ok):
        fail("temperature", "a number > 0 (0 = greedy, for name='parallel' only)")
    if not is_number(c.top_p) or not 0.0 < c.top_p <= 1.0:
        fail("top_p", "a number in (0, 1] (1 = off)")
    if c.precision not in categorical.PRECISIONS:
        fail("precision", f"one of {categorical.PRECISIONS}")
    if c.name == "canvas":
        if not is_int(c.canvas_length) or c.canvas_length < 0:
            fail("canvas_length", "an integer >= 0 (0 = the whole sequence as one canvas)")
        if seq_len is not None and c.canvas_length and seq_len % c.canvas_length:
            fail("canvas_length", f"a divisor of the generated length {seq_len} (0 = one canvas)")
        if not isinstance(c.entropy_bound, (int, float)) or isinstance(c.entropy_bound, bool) or c.entropy_bound < 0:
            fail("entropy_bound", "a number >= 0 (nats; inf = accept every position)")
        if not is_number(c.anneal_min) or c.anneal_min <= 0:
            fail("anneal_min", "a number > 0")
        if not is_number(c.anneal_max) or c.anneal_max < c.anneal_min:
            fail("anneal_max", f"a number >= anneal_min={c.anneal_min}")
        if not is_number(c.anneal_exponent) or c.anneal_exponent <= 0:
            fail("anneal_exponent", "a number > 0")
        if not is_int(c.stable_patience) or c.stable_patience < 1:
            fail("stable_patience", "an integer >= 1")
        if not is_number(c.stop_entropy) or not c.stop_entropy >= 0:
            fail("stop_entropy", "a number >= 0 (nats; 0 = off)")
        if c.stop_entropy_reduce not in ("mean", "max"):
            fail("stop_entropy_reduce", "'mean' or 'max'")
    if not is_number(c.psi_strength) or not 0.0 <= c.psi_strength <= 1.0:
        fail("psi_strength", "a number in [0, 1] (the Psi corrector's strength 1 - kappa; 0 = plain predictor)")
    if not is_int(c.psi_corrector_steps) or c.psi_corrector_steps < 0:
        fail("psi_corrector_steps", "an integer >= 0")
    tail_ok = c.name in GREEDY_TAIL_SAMPLERS
    calls = c.steps + int(bool(c.noise_removal))
    if not is_int(c.greedy_tail) or not 0 <= c.greedy_tail <= (calls if tail_ok else 0):
        fail(
            "greedy_tail",
            f"an integer in [0, {calls}] (steps + noise_removal)" if tail_ok
            else f"0 for sampler {c.name!r} (the greedy tail serves {' and '.join(GREEDY_TAIL_SAMPLERS)})",
        )
    strategies = tuple(r for r in masked.REMASKING if r != "none")
    if c.remasking not in strategies:
        fail("remasking", f"one of {strategies}")
    if not is_number(c.eta) or not 0.0 <= c.eta <= 1.0:
        fail("eta", "a number in [0, 1]")
    if not is_number(c.guidance_scale) or c.guidance_scale < 0:
        fail("guidance_scale", "a number >= 0 (0 = off)")
    if c.cache not in caches.CACHES:
        fail("cache", f"one of {caches.CACHES}")
    if c.cache != "none" and c.name != "parallel":
        fail("cache", f"'none' for sampler {c.name!r} (the prefix / dual caches serve name='parallel')")
    if c.cache != "none" and c.guidance_scale:
        fail("cache", "'none' with classifier-free guidance (config.sampler.guidance_scale != 0)")
    if not is_int(c.refresh_every) or c.refresh_every < 0:
        fail("refresh_every", "an integer >= 0 (0 = once per block)")
    if c.name == "parallel":
        rules.get_rule(c.rule)
        rules.check_options(rules.RuleOptions(c.threshold, c.factor, c.gamma))
        if not is_int(c.block_length):
            fail("block_length", "an integer >= 0 (0 = one block)")
        if seq_len is not None:
            parallel.plan(
                seq_len,
                rule=c.rule,
                steps=c.steps,
                block_length=c.block_length,
                remasking=c.parallel_remasking,
            )
    if c.block_sampler not in BLOCK_SAMPLERS:
        fail("block_sampler", f"one of {BLOCK_SAMPLERS}")
    if not is_int(c.window) or c.window < 0:
        fail("window", "an integer >= 0 (0 = keep every block)")
    if not is_int(c.draft_tokens) or c.draft_tokens < 1:
        fail("draft_tokens", "an integer >= 1 (tokens the draft proposes per round)")
    for key in ("kv_cache", "greedy", "stop_at_eos"):
        if not isinstance(c[key], bool):
            fail(key, "True or False")
    for key in ("noise_removal", "truncate_at_eos", "use_ema", "progress", "visualize"):
        if not isinstance(c[key], bool):
            fail(key, "True or False")
    for key in ("prompt", "infill", "constraints", "output_dir"):
        if not isinstance(c[key], str):
            fail(key, "a string")
    # The syntax of the template and the constraints; ids are checked against the vocabulary once the
    # tokenizer is known.
    conditioning.parse_infill_template(c.infill, lambda text: [], mask_id=-1)
    conditioning.parse_constraints(c.constraints, length=seq_len)
    if seq_len is not None and c.end > seq_len:
        fail("end", f"in [0, {seq_len}] (the generated length; 0 = off)")
    if diffusion is not None:
        # A network trained with the 'ar' / 'bd3lm' loss is decoded by the sampler of that name (KV cache).
        allowed = {"ar": ("ar", "speculative"), "bd3lm": ("bd3lm",)}.get(diffusion.loss)
        if allowed and c.name not in allowed:
            raise ValueError(
                f"config.diffusion.loss={diffusion.loss!r} is sampled with config.sampler.name="
                f"{' or '.join(map(repr, allowed))}, got {c.name!r}"
            )
        if c.name == "canvas" and diffusion.loss != "duo":
            raise ValueError(
                "config.sampler.name='canvas' samples uniform-state networks trained with loss='duo', got "
                f"config.diffusion.loss={diffusion.loss!r}"
            )
        if c.name == "psi" and diffusion.process != "uniform":
            raise ValueError(
                "config.sampler.name='psi' needs a uniform-state model (config.diffusion.process='uniform'), got "
                f"{diffusion.process!r}"
            )
        if c.name == "psi" and diffusion.loss != "duo":
            raise ValueError(
                "config.sampler.name='psi' samples mean-parameterised networks trained with loss='duo', got "
                f"config.diffusion.loss={diffusion.loss!r}"
            )
        if diffusion.process == "uniform" and not (c.name.startswith("sedd_") or c.name in ("canvas", "psi")):
            raise ValueError(
                f"config.sampler.name={c.name!r} needs the absorbing process; on "
                "config.diffusion.process='uniform' use sedd_euler, sedd_analytic, canvas or psi"
            )
        if diffusion.process == "uniform":
            grid = c.grid or diffusion.schedule
            kwargs = dict(diffusion.schedule_kwargs) if grid == diffusion.schedule else {}
            if float(schedules.get_schedule(grid, **kwargs).alpha(1.0)) == 0.0:
                raise ValueError(
                    f"config.sampler.grid={c.grid!r} / config.diffusion.schedule={diffusion.schedule!r}: the "
                    f"uniform graph's samplers need alpha(1) > 0 and {grid!r} has alpha(1) = 0 (use 'geometric')"
                )
        if c.guidance_scale and c.name.startswith("sedd_") and diffusion.loss.startswith("sedd_"):
            raise ValueError(
                f"config.sampler.guidance_scale={c.guidance_scale} needs a denoiser, and {c.name} on a "
                f"{diffusion.loss!r} network samples from its score: use 0, or a masked sampler (absorbing)"
            )
        if c.name.startswith("sedd_") and diffusion.loss.startswith("sedd_"):
            for key, off in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0)):
                if c[key] != off:
                    raise ValueError(
                        f"config.sampler.{key}={c[key]!r}: a {diffusion.loss!r} network outputs scores, not an "
                        f"x_0 prediction, so {c.name} has no {key} to apply; leave it at {off!r}"
                    )
    return c
