"""Exact likelihood of a masked-diffusion sampler whose unmasking order is deterministic (DUEL: Turok, De Sa and
Kuleshov 2026, "Exact Likelihood for Masked Diffusion via Deterministic Unmasking").

A step of ddlm's parallel sampler (ddlm.sampling.parallel) does two things: it chooses which masked positions
of the current block to reveal (the commit rule, with the count of LLaDA's schedule) and draws their tokens
from p_theta(. | x_t) (temperature / top-k / top-p filtered). When the chosen positions are a function of the
canvas x_t alone -- through the network's distribution, never through the drawn tokens -- the path from the
all-mask canvas to a final sequence x is fixed by x: at every step the positions S_k = rule(x_{t_k}) are
known, their tokens must be x's, and the next canvas is x_{t_k} with x revealed at S_k. So the sampler's
probability of producing x is the product of the committed tokens' probabilities along that one path:

    log P_sampler(x) = sum_k sum_{l in S_k} log p_theta(x^l | x_{t_k}),   x_{t_{k+1}} = x_{t_k} with x on S_k,

one network call per step (the sampler's own NFE), exact, with no Monte-Carlo noise and no ELBO gap: the
likelihood of the distribution the sampler actually draws from (DUEL's "proper perplexity").

Which ddlm rules qualify (`STATE_RULES`): 'margin' (top-1 minus top-2 probability) and 'entropy' rank the
positions by p_theta(. | x_t) alone. 'low_confidence', 'threshold', 'factor' and 'entropy_bounded' rank the
*drawn* candidates by their probability (p_theta(candidate), LLaDA's x0_p), so under sampling the order
depends on the draws and the sampler's law is a sum over paths (at temperature 0 every rule is
deterministic, and its output a single sequence); 'random' draws the order (a mixture over orders, whose
likelihood is what the NELBO bounds). ReMDM remasking and the approximate KV caches are refused too.
The prompt (x_init != mask_id) is clamped, as in the sampler: the result is log P_sampler(x | prompt).

    log_p = duel_log_likelihood(denoise_fn, x, x_init, mask_id=m, schedule=s, rule='margin', steps=64,
                                block_length=32, temperature=1.0)             # float32 [B] (nats)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ddlm import schedules as schedules_lib
from ddlm.sampling import masked, parallel, rules

# Commit rules that choose positions from p_theta(. | x_t) alone: the sampler's path is a function of its output.
STATE_RULES = ("margin", "entropy")


def check_deterministic(rule: str, temperature: float, remasking: str = "none", cache: str = "none") -> None:
    """A ValueError naming the setting unless the parallel sampler with it is a DUEL sampler (module doc)."""
    rules.get_rule(rule)
    if rule not in STATE_RULES:
        raise ValueError(
            f"config.sampler.rule={rule!r}: DUEL's exact likelihood needs positions chosen from p_theta(. | x_t) "
            f"alone, one of {STATE_RULES} ('{rule}' ranks the drawn candidates, or draws the order)"
        )
    if not temperature > 0:
        raise ValueError(
            f"config.sampler.temperature={temperature}: the exact likelihood is of sampled tokens (> 0); at 0 the "
            "sampler's output is one sequence"
        )
    if remasking != "none":
        raise ValueError(f"config.sampler.parallel_remasking={remasking!r}: a remasked token's path is not unique")
    if cache != "none":
        raise ValueError(f"config.sampler.cache={cache!r}: the exact likelihood replays the full network")


def duel_log_likelihood(
    denoise_fn,
    x,
    x_init,
    *,
    mask_id: int,
    schedule: schedules_lib.Schedule,
    rule: str = "margin",
    steps: int = 128,
    block_length: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
):
    """log P(x | x_init) [B] (float32, nats) under ddlm.sampling.parallel.parallel_sample with these settings
    (module doc). x: int [B, L] the sequences (x == x_init where x_init is known); x_init: int [B, L] the
    canvas, mask_id where the sampler generates. denoise_fn(xt, t) -> logits [B, L, V] as for the sampler
    (t = parallel.sequence_time). -inf where x is not reachable (a filtered-out token, or x differing from
    the prompt)."""
    check_deterministic(rule, temperature)
    masked._check_init(x_init, mask_id)
    x = jnp.asarray(x, jnp.int32)
    x_init = jnp.asarray(x_init, jnp.int32)
    if x.shape != x_init.shape:
        raise ValueError(f"x and x_init must have one shape [batch, length], got {x.shape} and {x_init.shape}")
    length = x_init.shape[1]
    p = parallel.plan(length, rule=rule, steps=steps, block_length=block_length)
    bl = p.block_length
    commit_rule = rules.get_rule(rule).fn
    opts = rules.RuleOptions()
    known = x_init != mask_id
    prompt_ok = jnp.all(jnp.where(known, x == x_init, True), axis=1)
    no_key = jax.random.key(0)  # the state rules draw nothing

    def step_fn(b, carry):
        xt, j, logp_total = carry
        start = b * bl
        t = parallel.sequence_time(xt, mask_id, schedule)
        logits = jax.lax.dynamic_slice_in_dim(denoise_fn(xt, t).astype(jnp.float32), start, bl, axis=1)
        x_blk = jax.lax.dynamic_slice_in_dim(xt, start, bl, axis=1)
        target = jax.lax.dynamic_slice_in_dim(x, start, bl, axis=1)
        editable = x_blk == mask_id
        logp = masked.logits_to_log_probs(logits, mask_id, temperature, top_k, top_p)
        cand = rules.Candidates(target, logp, editable)  # tokens unused by the state rules
        count = rules.num_transfer_tokens(jnp.sum(editable, axis=-1), p.steps_per_block - j)
        commit = commit_rule(cand, count, no_key, opts) & editable
        token_logp = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
        logp_total = logp_total + jnp.sum(jnp.where(commit, token_logp, 0.0), axis=-1)
        xt = jax.lax.dynamic_update_slice_in_dim(xt, jnp.where(commit, target, x_blk), start, axis=1)
        return xt, j + 1, logp_total

    def block_fn(b, carry):
        xt, logp_total = carry

        def cond(c):
            x_blk = jax.lax.dynamic_slice_in_dim(c[0], b * bl, bl, axis=1)
            return jnp.logical_and(c[1] < p.budget, jnp.any(x_blk == mask_id))

        xt, _, logp_total = jax.lax.while_loop(cond, lambda c: step_fn(b, c), (xt, jnp.int32(0), logp_total))
        return xt, logp_total

    zero = jnp.zeros((x.shape[0],), jnp.float32)
    _, logp_total = jax.lax.fori_loop(0, p.num_blocks, block_fn, (x_init, zero))
    return jnp.where(prompt_ok, logp_total, -jnp.inf)
