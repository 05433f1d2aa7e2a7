"""Commit rules for masked-diffusion parallel decoding: which masked positions take their candidate token
at a step.

A decoding step draws a candidate token for every masked position of the current block from
p_theta(x_0 | x_t); a commit rule is the small pure function that decides which of them are kept:

    rule(cand: Candidates, count int32 [B], rng, opts: RuleOptions) -> commit bool [B, N]

    cand.tokens     int32 [B, N]      the candidate token of each position (a draw, or the argmax)
    cand.log_probs  float32 [B, N, V] log p_theta(x_0^l | x_t), filtered (temperature / top-k / top-p)
    cand.editable   bool [B, N]       still masked, inside the current block; prompt and clamped
                                      positions are never editable
    count           int32 [B]         tokens to commit this step (used by the fixed-count rules only)

The decoder (ddlm.sampling.parallel) calls the rule on the current block. Every rule commits a subset of
the editable positions and at least one of them whenever a row has any. Rules:

    random          `count` uniformly random positions (with one per step: the exact MDLM /
                    first-hitting order, any-order autoregression)
    low_confidence  the `count` positions whose candidate is most probable, p_theta(candidate)
                    (LLaDA's low-confidence remasking, Nie et al. 2025; the top probability
                    under greedy decoding)
    margin          the `count` largest top1 - top2 probability margins (Kim et al. 2025; Dream's
                    'topk_margin')
    entropy         the `count` lowest-entropy positions (Dream's 'entropy')
    threshold       every position whose candidate's probability exceeds `threshold`, and at least the
                    most confident one (Fast-dLLM, Wu et al. 2025)
    factor          Fast-dLLM's factor rule (its get_transfer_index_dynamic): with the confidences sorted,
                    c_(1) >= c_(2) >= ..., the largest n with (n + 1)(1 - c_(n)) <= factor, at least 1
    entropy_bounded EB-sampler (Ben-Hamu et al. 2025): in confidence order, the largest prefix U
                    with sum_{U} H - max_{U} H <= gamma, at least one

The fixed-count rules take `count` from the decoder: LLaDA's get_num_transfer_tokens (the masked tokens
of a block spread evenly over its steps, the remainder to the earliest steps). Adding a rule is one
function here and one line in RULES.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Candidates(NamedTuple):
    tokens: jax.Array  # int32 [B, N]
    log_probs: jax.Array  # float32 [B, N, V]
    editable: jax.Array  # bool [B, N]


class RuleOptions(NamedTuple):
    threshold: float = 0.9  # 'threshold': commit every candidate with probability > threshold
    factor: float = 1.0  # 'factor': Fast-dLLM's f
    gamma: float = 0.01  # 'entropy_bounded': the entropy budget (nats)


RuleFn = Callable[[Candidates, jax.Array, jax.Array, RuleOptions], jax.Array]


class CommitRule(NamedTuple):
    fn: RuleFn
    fixed_count: bool  # True: commits exactly `count` per step, so the steps of a block are fixed


# ------------------------------------------------------------------------------------------ scores


def confidence(cand: Candidates):
    """p_theta(candidate token) [B, N] (LLaDA's x0_p; Fast-dLLM's confidence)."""
    return jnp.exp(jnp.take_along_axis(cand.log_probs, cand.tokens[..., None], axis=-1)[..., 0])


def entropy(cand: Candidates):
    """H(p_theta(x_0^l | x_t)) [B, N] in nats (filtered-out ids carry no mass)."""
    p = jnp.exp(cand.log_probs)
    return -jnp.sum(jnp.where(p > 0, p * cand.log_probs, 0.0), axis=-1)


def margin(cand: Candidates):
    """Top-1 minus top-2 probability [B, N]."""
    top2 = jax.lax.top_k(jnp.exp(cand.log_probs), 2)[0]
    return top2[..., 0] - top2[..., 1]


def commit_best(scores, editable, count):
    """The `count` [B] editable positions with the largest scores [B, N] (ties: the earlier position)."""
    s = jnp.where(editable, scores.astype(jnp.float32), -jnp.inf)
    order = jnp.argsort(-s, axis=-1, stable=True)  # best first
    rank = jnp.argsort(order, axis=-1)  # rank of each position in that order
    return editable & (rank < count[:, None])


def _leading_true(cond):
    """Length of the run of True at the start of each row of cond [B, N] -> int32 [B]."""
    return jnp.sum(jnp.cumprod(cond.astype(jnp.int32), axis=-1), axis=-1)


def _sorted_by_confidence(cand: Candidates, values):
    """values [B, N] reordered by decreasing confidence, non-editable positions last."""
    s = jnp.where(cand.editable, confidence(cand), -jnp.inf)
    order = jnp.argsort(-s, axis=-1, stable=True)
    return jnp.take_along_axis(values, order, axis=-1)


def _at_least_one(k, editable):
    n = jnp.sum(editable, axis=-1)
    return jnp.minimum(jnp.maximum(k, 1), n)


# ------------------------------------------------------------------------------------------ rules


def random_rule(cand, count, rng, opts):
    return commit_best(jax.random.uniform(rng, cand.tokens.shape), cand.editable, count)


def low_confidence_rule(cand, count, rng, opts):
    return commit_best(confidence(cand), cand.editable, count)


def margin_rule(cand, count, rng, opts):
    return commit_best(margin(cand), cand.editable, count)


def entropy_rule(cand, count, rng, opts):
    return commit_best(-entropy(cand), cand.editable, count)


def threshold_rule(cand, count, rng, opts):
    conf = confidence(cand)
    above = jnp.sum(cand.editable & (conf > opts.threshold), axis=-1)
    # The candidates above the threshold are exactly the best `above` by confidence; at least one.
    return commit_best(conf, cand.editable, _at_least_one(above, cand.editable))


def factor_rule(cand, count, rng, opts):
    # Fast-dLLM's get_transfer_index_dynamic compares the n-th most confident with 1 - f / (n + 1).
    # (n + 1)(1 - c_(n)) grows with n, so the accepted n form a prefix. The reference code also commits
    # the last candidate when it alone fails (its loop index ends at n - 1 either way); we do not.
    conf_sorted = _sorted_by_confidence(cand, jnp.where(cand.editable, confidence(cand), 0.0))
    n = jnp.arange(1, conf_sorted.shape[-1] + 1, dtype=jnp.float32)
    k = _leading_true((n + 1.0) * (1.0 - conf_sorted) <= opts.factor)
    return commit_best(confidence(cand), cand.editable, _at_least_one(k, cand.editable))


def entropy_bounded_rule(cand, count, rng, opts):
    # EB-sampler: sum_U H - max_U H bounds the error of committing U together (Ben-Hamu et al. 2025);
    # it is non-decreasing along the order, so the accepted sets form a prefix.
    h_sorted = _sorted_by_confidence(cand, entropy(cand))
    excess = jnp.cumsum(h_sorted, axis=-1) - jax.lax.cummax(h_sorted, axis=h_sorted.ndim - 1)
    k = _leading_true(excess <= opts.gamma)
    return commit_best(confidence(cand), cand.editable, _at_least_one(k, cand.editable))


RULES: dict[str, CommitRule] = {
    "random": CommitRule(random_rule, fixed_count=True),
    "low_confidence": CommitRule(low_confidence_rule, fixed_count=True),
    "margin": CommitRule(margin_rule, fixed_count=True),
    "entropy": CommitRule(entropy_rule, fixed_count=True),
    "threshold": CommitRule(threshold_rule, fixed_count=False),
    "factor": CommitRule(factor_rule, fixed_count=False),
    "entropy_bounded": CommitRule(entropy_bounded_rule, fixed_count=False),
}


def get_rule(name: str) -> CommitRule:
    if name not in RULES:
        raise ValueError(f"config.sampler.rule={name!r} is not a commit rule; expected one of {tuple(RULES)}")
    return RULES[name]


def check_options(opts: RuleOptions):
    """The ranges the sampler accepts (the rule functions themselves take any value)."""
    if not 0.0 < opts.threshold <= 1.0:
        raise ValueError(f"config.sampler.threshold must be in (0, 1], got {opts.threshold}")
    if opts.factor < 0.0:
        raise ValueError(f"config.sampler.factor must be >= 0, got {opts.factor}")
    if opts.gamma < 0.0:
        raise ValueError(f"config.sampler.gamma must be >= 0, got {opts.gamma}")


def num_transfer_tokens(masked, steps_left):
    """Tokens to commit now so that the `masked` [B] tokens of a block are spread evenly over the
    `steps_left` steps, the remainder to the earliest: ceil(masked / steps_left). Called at every step
    with the current count, this gives exactly LLaDA's get_num_transfer_tokens schedule
    (n = q s + r: q + 1 for the first r steps, q after), and it adapts when remasking adds tokens."""
    steps_left = jnp.maximum(steps_left, 1)
    return (masked + steps_left - 1) // steps_left
