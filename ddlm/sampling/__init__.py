"""Samplers of discrete diffusion models: pure functions of (denoise_fn or score_fn, rng, x_init, config).

    from ddlm import sampling
    sample = sampling.make_sampler(config.sampler, denoise_fn=fn, schedule=sched, mask_id=tok.mask_id)
    out = jax.jit(sample)(rng, x_init)        # out.tokens int32 [B, L], out.nfe (network calls)

Samplers (config.sampler.name):
    ancestral       masked diffusion ancestral steps (MDLM / MD4)                 masked.ancestral_sample
    cached          ancestral, reusing the last call when nothing changed       masked.ancestral_sample(cache=True)
    remdm           ancestral with ReMDM remasking (cap / rescale / confidence) masked.ancestral_sample(remasking=...)
    first_hitting   one unmasking event per call (Zheng et al. 2024)            masked.first_hitting_sample
    sedd_euler      SEDD Euler steps, absorbing or uniform graph                score.score_sample(method='euler')
    sedd_analytic   SEDD analytic (Tweedie tau-leaping) steps                   score.score_sample(method='analytic')
    parallel        semi-AR blocks + a commit rule (LLaDA, Fast-dLLM, EB-sampler) parallel.parallel_sample
                    (cfg.cache='prefix' | 'dual': Fast-dLLM's KV caches, decoder=...)  caches.cached_logits_provider
    ar              autoregressive decoding with a KV cache (causal networks)   autoregressive.ar_sample
    speculative     AR with a draft network proposing cfg.draft_tokens, the target  speculative.speculative_sample
                    verifying them in one call (exactly the target's law; draft_decoder=...)
    bd3lm           BD3-LM blocks with the exact KV cache (block-causal)       block.block_sample
    canvas          DiffusionGemma-style canvases for uniform-state (DUO) networks: uniform noise, mean-
                    parameterised reverse steps, entropy-bounded acceptance with re-noising, annealed
                    temperature, early stop                                      canvas.canvas_sample
    psi             Psi predictor-corrector steps for uniform-state (DUO) networks: the exact reverse
                    step mixed with denoise-then-renoise (cfg.psi_strength), optional pure corrector
                    calls (cfg.psi_corrector_steps), greedy tail (cfg.greedy_tail)   psi.psi_sample

ar, speculative and bd3lm decode a network with a KV cache: pass decoder=models.make_decoder(model, variables) instead of
denoise_fn; bd3lm runs the masked sampler cfg.block_sampler inside each block. So does parallel with
cfg.cache != 'none' (a bidirectional network, approximate caches refreshed per cfg.refresh_every).
"""

from __future__ import annotations

import collections
import functools

import jax

from ddlm.sampling import autoregressive, block, canvas, categorical, conditioning, masked, parallel, psi, rules, score
from ddlm.sampling import caches
from ddlm.sampling import speculative
from ddlm.sampling.config import default_config
from ddlm.sampling.masked import SampleOutput, ancestral_sample, first_hitting_sample
from ddlm.sampling.score import absorbing_score_fn, score_sample

SAMPLERS = (
    "ancestral", "cached", "remdm", "first_hitting", "sedd_euler", "sedd_analytic", "parallel", "canvas", "psi"
)  # fmt: skip
# Samplers that decode a network with its KV cache (make_sampler's `decoder`), and the masked samplers a
# bd3lm block may run (cfg.block_sampler).
CACHED_SAMPLERS = ("ar", "bd3lm", "speculative")
SAMPLERS += CACHED_SAMPLERS
BLOCK_SAMPLERS = ("first_hitting", "ancestral", "cached", "remdm", "parallel")
# Samplers that feed a self-conditioned network its previous prediction (make_sampler's self_conditioning);
# the others call it as denoise_fn(xt, t): the zero signal, its first pass.
SELF_CONDITIONED_SAMPLERS = ("ancestral", "remdm", "first_hitting", "sedd_euler", "sedd_analytic", "psi", "canvas")

# Number of times each sampler built by `jit_sampler` has been traced (compiled), by name.
TRACE_COUNTS: collections.Counter = collections.Counter()


def make_sampler(
    cfg,
    *,
    denoise_fn=None,
    score_fn=None,
    schedule,
    mask_id=None,
    graph: str = "absorbing",
    return_trajectory: bool = False,
    progress_fn=None,
    decoder=None,
    eos_id=None,
    pad_id=None,
    draft_decoder=None,
    self_conditioning: bool = False,
):
    """sample(rng, x_init, clamp=None) -> SampleOutput for the sampler named cfg.name (not jitted: pure).

    cfg: config.sampler (see ddlm.sampling.config.default_config). denoise_fn(xt, t) -> logits for the
    masked samplers (and the absorbing score samplers, via RADD's score); score_fn(xt, t) for the score
    samplers (required on the uniform graph): log ratios on the uniform graph, log c (the ratios without
    their factor alpha/(1 - alpha)) on the absorbing one, see ddlm.sampling.score. cfg.guidance_scale != 0 wraps denoise_fn in
    classifier-free guidance with the known tokens of x_init as the condition. clamp: bool [B, L], positions
    kept fixed on the uniform graph. progress_fn(steps_done): a host callback after every step (optional).
    'ar' / 'bd3lm': decoder = models.make_decoder(model, variables) of a causal / block-causal network;
    eos_id, pad_id for cfg.stop_at_eos (variable length). 'speculative': decoder of the target and
    draft_decoder of the draft (causal networks over one vocabulary). 'parallel' with cfg.cache='prefix' | 'dual':
    decoder of a bidirectional network (denoise_fn unused).
    self_conditioning: a self-conditioned network (model.self_conditioning): denoise_fn(xt, t, self_cond=None)
    and score_fn(xt, t, self_cond) -> (score, signal) (ddlm.sampling.score); the SELF_CONDITIONED_SAMPLERS
    feed each call's prediction to the next, the others call denoise_fn(xt, t) (the zero signal).
    """
    if cfg.name not in SAMPLERS:
        raise ValueError(f"unknown sampler {cfg.name!r}; expected one of {SAMPLERS}")
    if cfg.cache != "none" and cfg.name != "parallel":
        raise ValueError(
            f"config.sampler.cache={cfg.cache!r} serves name='parallel' (semi-AR blocks), not {cfg.name!r}"
        )
    if cfg.name in CACHED_SAMPLERS:
        return _make_cached_sampler(
            cfg, decoder, schedule, mask_id, return_trajectory, progress_fn, eos_id, pad_id, draft_decoder
        )
    if cfg.name == "canvas":
        return _make_canvas_sampler(
            cfg, denoise_fn, schedule, graph, return_trajectory, progress_fn, decoder, self_conditioning
        )
    if cfg.name == "psi":
        return _make_psi_sampler(cfg, denoise_fn, schedule, graph, return_trajectory, progress_fn, self_conditioning)
    if graph == "uniform" and not cfg.name.startswith("sedd_"):
        raise ValueError(
            f"sampler {cfg.name!r} is for masked diffusion; the uniform graph needs sedd_euler, sedd_analytic, "
            "canvas or psi"
        )
    if cfg.name.startswith("sedd_") and score_fn is None and (graph != "absorbing" or denoise_fn is None):
        raise ValueError(f"sampler {cfg.name!r} on the {graph} graph needs a score_fn")
    refresh = None
    if cfg.name == "parallel":  # fail before tracing; the length-dependent checks run at trace time
        rules.get_rule(cfg.rule)
        rules.check_options(rules.RuleOptions(cfg.threshold, cfg.factor, cfg.gamma))
        caches.check_cache(cfg.cache, decoder)
        refresh = caches.refresh_policy(cfg.refresh_every)
        if cfg.cache != "none" and cfg.guidance_scale:
            raise ValueError(
                f"config.sampler.cache={cfg.cache!r} has no classifier-free guidance: set "
                "config.sampler.guidance_scale=0 or cache='none'"
            )
    cached_parallel = cfg.name == "parallel" and cfg.cache != "none"
    if score_fn is None and denoise_fn is None and not cached_parallel:
        raise ValueError("make_sampler needs denoise_fn (masked samplers) or score_fn (score samplers)")
    filters = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    feeds = self_conditioning and cfg.name in SELF_CONDITIONED_SAMPLERS
    if feeds and cfg.guidance_scale:
        raise ValueError(
            f"sampler {cfg.name!r} feeds a self-conditioned network its previous prediction and has no "
            "classifier-free guidance then: set config.sampler.guidance_scale=0"
        )

    def sample(rng, x_init, clamp=None):
        fn = denoise_fn
        if fn is not None and cfg.guidance_scale:
            fn = conditioning.guided_denoise_fn(fn, x_init != mask_id, mask_id, cfg.guidance_scale)
        common = dict(
            mask_id=mask_id,
            schedule=schedule,
            precision=cfg.precision,
            return_trajectory=return_trajectory,
            progress_fn=progress_fn,
        )
        if cfg.name == "parallel":
            provider = None
            if cached_parallel:  # Fast-dLLM's prefix / dual KV cache over the network's decode path
                provider = caches.cached_logits_provider(
                    decoder,
                    cache=cfg.cache,
                    mask_id=mask_id,
                    schedule=schedule,
                    block_length=cfg.block_length,
                    refresh=refresh,
                )
            return parallel.parallel_sample(
                fn,
                rng,
                x_init,
                rule=cfg.rule,
                steps=cfg.steps,
                block_length=cfg.block_length,
                threshold=cfg.threshold,
                factor=cfg.factor,
                gamma=cfg.gamma,
                remasking=cfg.parallel_remasking,
                eta=cfg.eta,
                logits_provider=provider,
                **common,
                **filters,
            )
        if cfg.name == "first_hitting":
            return first_hitting_sample(fn, rng, x_init, self_conditioning=feeds, **common, **filters)
        if cfg.name in ("ancestral", "cached", "remdm"):
            remasking = cfg.remasking if cfg.name == "remdm" else "none"
            if cfg.name == "remdm" and remasking == "none":
                raise ValueError(
                    "sampler 'remdm' needs config.sampler.remasking in cap | rescale | confidence"
                )
            return ancestral_sample(
                fn,
                rng,
                x_init,
                steps=cfg.steps,
                t_min=cfg.t_min,
                noise_removal=cfg.noise_removal,
                cache=cfg.name == "cached",
                remasking=remasking,
                eta=cfg.eta,
                self_conditioning=feeds,
                **common,
                **filters,
            )
        sfn = score_fn
        if sfn is None:
            sfn = absorbing_score_fn(fn, mask_id=mask_id, self_conditioning=feeds, **filters)
        return score_sample(
            sfn,
            rng,
            x_init,
            graph=graph,
            schedule=schedule,
            steps=cfg.steps,
            method=cfg.name[len("sedd_") :],
            mask_id=mask_id,
            clamp=clamp,
            t_min=cfg.t_min,
            noise_removal=cfg.noise_removal,
            precision=cfg.precision,
            return_trajectory=return_trajectory,
            progress_fn=progress_fn,
            self_conditioning=feeds,
        )

    return sample


def _make_canvas_sampler(
    cfg, denoise_fn, schedule, graph, return_trajectory, progress_fn, decoder=None, self_conditioning=False
):
    """The 'canvas' sampler (canvas.canvas_sample) over a mean-parameterised uniform-state network: a
    block-causal decoder (block_size = cfg.canvas_length) is decoded with the exact KV cache of the committed
    canvases (cfg.kv_cache); any other network through denoise_fn, the whole sequence per call."""
    if graph != "uniform":
        raise ValueError(
            "sampler 'canvas' is for uniform-state networks (config.diffusion.process='uniform', loss='duo'), "
            f"got the {graph} graph (a masked model: use ancestral, parallel, ...)"
        )
    block_causal = decoder is not None and decoder.attention == "block_causal"
    if denoise_fn is None and not block_causal:
        raise ValueError("sampler 'canvas' needs denoise_fn: the network's logits (x_theta = softmax)")
    canvas.check_stop_options(cfg.stable_patience, cfg.stop_entropy, cfg.stop_entropy_reduce)
    if cfg.guidance_scale:
        raise ValueError("sampler 'canvas' has no classifier-free guidance: set config.sampler.guidance_scale=0")

    def sample(rng, x_init, clamp=None):
        return canvas.canvas_sample(
            None if block_causal else denoise_fn,
            rng,
            x_init,
            schedule=schedule,
            steps=cfg.steps,
            canvas_length=cfg.canvas_length,
            entropy_bound=cfg.entropy_bound,
            renoise=bool(cfg.renoise),
            temperature_max=cfg.anneal_max,
            temperature_min=cfg.anneal_min,
            temperature_exponent=cfg.anneal_exponent,
            stop_when_stable=bool(cfg.stop_when_stable),
            stable_patience=cfg.stable_patience,
            stop_entropy=cfg.stop_entropy,
            stop_entropy_reduce=cfg.stop_entropy_reduce,
            decoder=decoder if block_causal else None,
            kv_cache=bool(cfg.kv_cache),
            clamp=clamp,
            return_trajectory=return_trajectory,
            progress_fn=progress_fn,
            self_conditioning=self_conditioning,
        )

    return sample


def _make_psi_sampler(cfg, denoise_fn, schedule, graph, return_trajectory, progress_fn, self_conditioning=False):
    """The 'psi' sampler (psi.psi_sample) over a mean-parameterised uniform-state network."""
    if graph != "uniform":
        raise ValueError(
            f"sampler 'psi' needs a uniform-state model (diffusion.process='uniform'), got {graph!r}"
        )
    if denoise_fn is None:
        raise ValueError("sampler 'psi' needs denoise_fn: the network's logits (x_theta = softmax)")
    if cfg.guidance_scale:
        raise ValueError("sampler 'psi' has no classifier-free guidance: set config.sampler.guidance_scale=0")
    options = dict(
        schedule=schedule,
        steps=cfg.steps,
        strength=cfg.psi_strength,
        corrector_steps=cfg.psi_corrector_steps,
        greedy_tail=cfg.greedy_tail,
        t_min=cfg.t_min,
        noise_removal=cfg.noise_removal,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        precision=cfg.precision,
    )
    psi.check_options(
        **{k: options[k] for k in ("steps", "strength", "corrector_steps", "greedy_tail", "noise_removal")}
    )

    def sample(rng, x_init, clamp=None):
        return psi.psi_sample(
            denoise_fn,
            rng,
            x_init,
            clamp=clamp,
            return_trajectory=return_trajectory,
            progress_fn=progress_fn,
            self_conditioning=self_conditioning,
            **options,
        )

    return sample


def _make_cached_sampler(
    cfg, decoder, schedule, mask_id, return_trajectory, progress_fn, eos_id, pad_id, draft_decoder=None
):
    """The 'ar', 'speculative' and 'bd3lm' samplers: a network decoded with its KV cache."""
    if decoder is None:
        raise ValueError(f"sampler {cfg.name!r} needs decoder=models.make_decoder(model, variables)")
    if mask_id is None:
        raise ValueError(f"sampler {cfg.name!r} needs mask_id (the positions to generate in x_init)")
    if return_trajectory:
        raise ValueError(f"sampler {cfg.name!r} records no trajectory: set config.sampler.visualize=False")
    if cfg.guidance_scale:
        raise ValueError(
            f"sampler {cfg.name!r} has no classifier-free guidance: set config.sampler.guidance_scale=0"
        )
    common = {
        "mask_id": mask_id,
        "kv_cache": bool(cfg.kv_cache),
        "eos_id": eos_id,
        "pad_id": pad_id,
        "stop_at_eos": bool(cfg.stop_at_eos),
        "progress_fn": progress_fn,
    }
    if cfg.name == "ar":
        filters = {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p}

        def sample(rng, x_init, clamp=None):
            return autoregressive.ar_sample(
                decoder, rng, x_init, greedy=bool(cfg.greedy), precision=cfg.precision, **filters, **common
            )

        return sample
    if cfg.name == "speculative":
        if draft_decoder is None:
            raise ValueError(
                "sampler 'speculative' needs draft_decoder=models.make_decoder(draft_model, draft_variables) "
                "(a small causal network over the target's vocabulary)"
            )
        if not cfg.kv_cache:
            raise ValueError("sampler 'speculative' decodes with the KV cache: set config.sampler.kv_cache=True")
        options = {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p}
        options.update(greedy=bool(cfg.greedy), precision=cfg.precision, k=int(cfg.draft_tokens))
        options.update({key: common[key] for key in ("mask_id", "eos_id", "pad_id", "stop_at_eos")})

        def sample(rng, x_init, clamp=None):
            return speculative.speculative_sample(decoder, draft_decoder, rng, x_init, **options)

        return sample
    if cfg.block_sampler not in BLOCK_SAMPLERS:
        raise ValueError(
            f"config.sampler.block_sampler must be one of {BLOCK_SAMPLERS}, got {cfg.block_sampler!r}"
        )
    inner = cfg.copy_and_resolve_references()
    inner.name = cfg.block_sampler
    denoise_block = lambda fn, rng, x_block: make_sampler(
        inner, denoise_fn=fn, schedule=schedule, mask_id=mask_id
    )(rng, x_block)

    def sample(rng, x_init, clamp=None):
        return block.block_sample(
            decoder, rng, x_init, denoise_block=denoise_block, window=int(cfg.window), **common
        )

    return sample


def jit_sampler(cfg, compiler_options=None, **kwargs):
    """jax.jit(make_sampler(cfg, **kwargs)): compiled once per x_init shape (the steps and every other
    option are fixed by cfg). Each trace increments TRACE_COUNTS[cfg.name]. compiler_options go to jax.jit
    (the tests pass {'xla_backend_optimization_level': 0}: 5x faster CPU compiles of tiny programs)."""
    sample = make_sampler(cfg, **kwargs)

    @functools.wraps(sample)
    def traced(rng, x_init, clamp=None):
        TRACE_COUNTS[cfg.name] += 1
        return sample(rng, x_init, clamp)

    return jax.jit(traced, compiler_options=compiler_options)


__all__ = [
    "SAMPLERS",
    "SELF_CONDITIONED_SAMPLERS",
    "SampleOutput",
    "TRACE_COUNTS",
    "absorbing_score_fn",
    "ancestral_sample",
    "autoregressive",
    "block",
    "caches",
    "categorical",
    "conditioning",
    "default_config",
    "first_hitting_sample",
    "jit_sampler",
    "make_sampler",
    "masked",
    "parallel",
    "psi",
    "rules",
    "score",
    "score_sample",
    "speculative",
]
