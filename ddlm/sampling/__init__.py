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
"""

from __future__ import annotations

import collections
import functools

import jax

from ddlm.sampling import categorical, conditioning, masked, parallel, rules, score
from ddlm.sampling.config import default_config
from ddlm.sampling.masked import SampleOutput, ancestral_sample, first_hitting_sample
from ddlm.sampling.score import absorbing_score_fn, score_sample

SAMPLERS = ("ancestral", "cached", "remdm", "first_hitting", "sedd_euler", "sedd_analytic", "parallel")

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
):
    """sample(rng, x_init, clamp=None) -> SampleOutput for the sampler named cfg.name (not jitted: pure).

    cfg: config.sampler (see ddlm.sampling.config.default_config). denoise_fn(xt, t) -> logits for the
    masked samplers (and the absorbing score samplers, via RADD's score); score_fn(xt, t) for the score
    samplers (required on the uniform graph): log ratios on the uniform graph, log c (the ratios without
    their factor alpha/(1 - alpha)) on the absorbing one, see ddlm.sampling.score. cfg.guidance_scale != 0 wraps denoise_fn in
    classifier-free guidance with the known tokens of x_init as the condition. clamp: bool [B, L], positions
    kept fixed on the uniform graph. progress_fn(steps_done): a host callback after every step (optional).
    """
    if cfg.name not in SAMPLERS:
        raise ValueError(f"unknown sampler {cfg.name!r}; expected one of {SAMPLERS}")
    if graph == "uniform" and not cfg.name.startswith("sedd_"):
        raise ValueError(
            f"sampler {cfg.name!r} is for masked diffusion; the uniform graph needs sedd_euler or sedd_analytic"
        )
    if cfg.name.startswith("sedd_") and score_fn is None and (graph != "absorbing" or denoise_fn is None):
        raise ValueError(f"sampler {cfg.name!r} on the {graph} graph needs a score_fn")
    if score_fn is None and denoise_fn is None:
        raise ValueError("make_sampler needs denoise_fn (masked samplers) or score_fn (score samplers)")
    filters = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    if cfg.name == "parallel":  # fail before tracing; the length-dependent checks run at trace time
        rules.get_rule(cfg.rule)
        rules.check_options(rules.RuleOptions(cfg.threshold, cfg.factor, cfg.gamma))

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
                **common,
                **filters,
            )
        if cfg.name == "first_hitting":
            return first_hitting_sample(fn, rng, x_init, **common, **filters)
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
                **common,
                **filters,
            )
        sfn = score_fn if score_fn is not None else absorbing_score_fn(fn, mask_id=mask_id, **filters)
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
    "SampleOutput",
    "TRACE_COUNTS",
    "absorbing_score_fn",
    "ancestral_sample",
    "categorical",
    "conditioning",
    "default_config",
    "first_hitting_sample",
    "jit_sampler",
    "make_sampler",
    "masked",
    "parallel",
    "rules",
    "score",
    "score_sample",
]
