"""Conditional likelihood log p(response | prompt) of a masked diffusion model, and multiple-choice scoring.

A masked diffusion model has no exact likelihood; LLaDA (Nie et al. 2025) estimates it with the any-order
bound over the response positions (eval_llada.py `get_loglikelihood`; the math is
`ddlm.losses.any_order_conditional_loss`):

    log p(r | p) >= E_{l ~ U{1..R}} E_{M: |M| = l} [ R/l sum_{i in M} log p_theta(r^i | p, r with M masked) ],

R the response length, M a uniformly random set of l response positions; the prompt is never masked.
Each Monte-Carlo draw is one network call on one masked copy of the row. With exact conditionals the
bound is an equality for every (prompt, response), so on the toy oracle the estimate must match the exact
log p(r | p) within its standard error. Draws come in batches of `batch_size` whose l are stratified
(LLaDA's linspace; here `losses.sample_response_mask`); the batch means are independent, so the standard
error is their standard deviation over sqrt(number of batches) (iid draws: over all draws).

Multiple choice is scored the way lm-eval-harness drives a diffusion model (LLaDA's `LLaDAEvalHarness.
loglikelihood`): each choice is a continuation of the prompt, its conditional log-likelihood is estimated,
and the highest wins -- summed ('none', lm-eval's `acc`), per token ('tokens') or per character ('chars',
lm-eval's `acc_norm`). Every choice uses the same random key (common random numbers: the estimates'
errors are correlated, their differences less noisy).

    estimate_fn = make_estimator(denoise_fn, mask_id=tok.mask_id, batch_size=16)
    est = estimate_fn(rng, tokens, response_mask, num_samples=128)          # est.mean, est.se (nats)
    result = multiple_choice(estimate_fn, rng, prompt_ids, [ids_a, ids_b], normalize="tokens")
    result.best, result.scores

denoise_fn(xt [B, L], t [B]) -> logits [B, L, V], as for the samplers; t is the time whose schedule masks
the fraction l/R of tokens (`schedule.t_from_alpha(1 - l/R)`), or l/R itself without a schedule (the
time of the linear schedule; time-free networks such as LLaDA's ignore it). For an SFT model, the prompt
ids are `ddlm.data.sft.encode_prompt(tok, prompt, template)` (bos and template included).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddlm import losses

NORMALIZATIONS = ("none", "tokens", "chars")


@dataclasses.dataclass(frozen=True)
class LikelihoodEstimate:
    """A Monte-Carlo estimate of log p(response | prompt) in nats, its standard error, and the draws."""

    mean: float
    se: float
    num_samples: int


@dataclasses.dataclass(frozen=True)
class ChoiceScores:
    """Multiple-choice result: per-choice estimates, the (normalised) scores compared, the winner."""

    estimates: tuple[LikelihoodEstimate, ...]
    scores: np.ndarray  # float64 [num_choices]: estimate.mean / normaliser
    best: int  # argmax of scores


def make_estimator(
    denoise_fn: Callable,
    *,
    mask_id: int,
    batch_size: int = 16,
    stratified: bool = True,
    schedule=None,
) -> Callable[..., LikelihoodEstimate]:
    """estimate(rng, tokens, response_mask, num_samples=128) -> LikelihoodEstimate of log p(response | rest).

    tokens: int [L], one row (prompt and response); response_mask: bool [L], the positions whose likelihood
    is estimated (every other position is clean conditioning). num_samples draws in batches of batch_size
    (a multiple of it; at least two batches when stratified, for the standard error). The network is
    jitted once per row length and num_samples.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    @functools.partial(jax.jit, static_argnames=("num_batches",))
    def draws(rng, tokens, response_mask, num_batches):
        """-> [num_batches, batch_size] single-draw estimates of log p(response | rest)."""
        x0 = jnp.broadcast_to(tokens, (batch_size,) + tokens.shape)
        response = jnp.broadcast_to(response_mask, x0.shape)
        r = jnp.sum(response, axis=1).astype(jnp.float32)

        def one_batch(key):
            masked = losses.sample_response_mask(key, response, stratified)
            xt = jnp.where(masked, mask_id, x0)
            fraction = jnp.sum(masked, axis=1) / r
            t = fraction if schedule is None else schedule.t_from_alpha(1.0 - fraction)
            logits = denoise_fn(xt, t)
            return -jnp.sum(losses.any_order_conditional_loss(logits, x0, xt, mask_id, response), axis=1)

        return jax.lax.map(one_batch, jax.random.split(rng, num_batches))

    def estimate(rng, tokens, response_mask, num_samples: int = 128) -> LikelihoodEstimate:
        tokens = np.asarray(tokens)
        response_mask = np.asarray(response_mask, bool)
        if tokens.ndim != 1 or response_mask.shape != tokens.shape:
            raise ValueError(
                f"tokens and response_mask must be one row [length], got {tokens.shape} and {response_mask.shape}"
            )
        if not response_mask.any():
            raise ValueError("response_mask selects no position: nothing to score")
        if num_samples % batch_size:
            raise ValueError(f"num_samples={num_samples} must be a multiple of batch_size={batch_size}")
        num_batches = num_samples // batch_size
        if stratified and num_batches < 2:
            raise ValueError(
                f"num_samples={num_samples} gives {num_batches} batch of {batch_size}: stratified draws need "
                f"at least 2 batches (the standard error comes from independent batch means)"
            )
        values = np.asarray(jax.device_get(draws(rng, tokens, response_mask, num_batches)), np.float64)
        units = values.mean(axis=1) if stratified else values.ravel()  # independent units
        se = float(units.std(ddof=1) / math.sqrt(len(units))) if len(units) > 1 else float("nan")
        return LikelihoodEstimate(mean=float(values.mean()), se=se, num_samples=num_samples)

    return estimate


def choice_row(
    prompt_ids: Sequence[int], choice_ids: Sequence[int], *, length: int = 0, end_id: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [L], response_mask bool [L]) of prompt + choice.

    length = 0: L = len(prompt) + len(choice), LLaDA's unpadded row. length > 0: the row is padded to
    `length` with end_id (an SFT model's eos padding), and the padding is scored with the choice: the
    estimate is then of p(choice, then end | prompt), the probability that the response is exactly it."""
    body = list(prompt_ids) + list(choice_ids)
    if length:
        if end_id is None:
            raise ValueError("a padded choice row (length > 0) needs end_id")
        if len(body) > length:
            raise ValueError(f"prompt + choice are {len(body)} tokens, more than length={length}")
        body += [end_id] * (length - len(body))
    tokens = np.asarray(body, np.int32)
    response_mask = np.arange(len(body)) >= len(prompt_ids)
    return tokens, response_mask


def multiple_choice(
    estimate_fn: Callable[..., LikelihoodEstimate],
    rng,
    prompt_ids: Sequence[int],
    choices: Sequence[Sequence[int]],
    *,
    normalize: str = "none",
    choice_texts: Sequence[str] | None = None,
    num_samples: int = 128,
    length: int = 0,
    end_id: int | None = None,
) -> ChoiceScores:
    """Scores each choice (token ids) as a continuation of the prompt by its estimated conditional
    log-likelihood and picks the highest score.

    normalize: 'none' (the log-likelihood), 'tokens' (divided by the choice's token count) or 'chars'
    (divided by len(choice_texts[i]), lm-eval-harness's acc_norm). length / end_id: see `choice_row`.
    Every choice is estimated with the same key `rng`."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if not choices:
        raise ValueError("multiple_choice needs at least one choice")
    if normalize == "chars":
        if choice_texts is None or len(choice_texts) != len(choices):
            raise ValueError("normalize='chars' needs choice_texts, one text per choice")
        if any(len(text) == 0 for text in choice_texts):
            raise ValueError("normalize='chars': a choice text is empty")
    if any(len(c) == 0 for c in choices):
        raise ValueError("a choice has no tokens")
    estimates = []
    for choice in choices:
        tokens, response_mask = choice_row(prompt_ids, choice, length=length, end_id=end_id)
        estimates.append(estimate_fn(rng, tokens, response_mask, num_samples=num_samples))
    if normalize == "none":
        denominators = np.ones(len(choices))
    elif normalize == "tokens":
        denominators = np.array([len(c) for c in choices], np.float64)
    else:
        denominators = np.array([len(text) for text in choice_texts], np.float64)
    scores = np.array([e.mean for e in estimates]) / denominators
    return ChoiceScores(estimates=tuple(estimates), scores=scores, best=int(np.argmax(scores)))
