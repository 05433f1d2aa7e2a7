"""Sample quality: generative perplexity under an autoregressive scorer, unigram entropy, distinct n-grams.

Generative perplexity (MDLM, SEDD, DUO) is exp(total NLL / total scored tokens) of the samples under an
AR model. Scoring goes through text, so any scorer works with any sampler's tokenizer: each sample is
decoded with its own tokenizer (specials dropped), re-encoded with the scorer's, framed by the scorer's
convention ([bos] + ids, + [eos] if `add_eos`; without `add_bos` the first token is context only, as in
MDLM's retokenised GPT-2 scoring), and cut into windows of the scorer's context length that overlap by one
token, so every token after the first is scored exactly once (the context restarts at each window).

Generative perplexity alone is gameable (low-temperature or low-precision sampling lowers it while the
samples collapse), so it is reported with the unigram entropy of each sample (the entropy of its token
histogram, in nats, as MDLM and DUO report it; ~5.6-5.7 for GPT-2 tokenised OpenWebText at L = 1024) and
the fraction of distinct n-grams.

    scorer = ARScorer(logits_fn, params, tokenizer, context_len=128)
    nll, n = score_texts(scorer, ["ROMEO: ...", ...])
    gen_ppl = likelihood.likelihood_summary(nll, n)["perplexity"]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddlm import losses
from ddlm.eval import likelihood
from ddlm.sampling.stats import unigram_entropy  # defined below eval: the sampling CLI writes it too

# --------------------------------------------------------------------------------------------
# Per-sample statistics of token ids
# --------------------------------------------------------------------------------------------


def distinct_ngrams(ids: Sequence[int], n: int) -> float:
    """Distinct n-grams / all n-grams of one sample (distinct-n); 1 - this is its n-gram repetition rate.
    nan when the sample has fewer than n tokens."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return float("nan")
    return len(set(grams)) / len(grams)


def content_ids(row: Sequence[int], tokenizer) -> list[int]:
    """The ids of a sample without pad, bos, eos and mask (what its text is made of)."""
    specials = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.mask_id}
    return [int(i) for i in row if int(i) not in specials]


def diversity_summary(rows: Sequence[Sequence[int]], ngram_orders: Sequence[int] = (1, 2, 3, 4)) -> dict:
    """Mean (and SE) over samples of the unigram entropy and distinct-n. rows: content ids per sample."""
    if not len(rows):
        raise ValueError("no samples to summarise")
    ent = likelihood.mean_summary([unigram_entropy(r) for r in rows])
    out = {"entropy": ent["mean"], "entropy_se": ent["se"], "samples": len(rows)}
    for n in ngram_orders:
        vals = [v for v in (distinct_ngrams(r, n) for r in rows) if not math.isnan(v)]
        out[f"distinct_{n}"] = float(np.mean(vals)) if vals else float("nan")
    return out


# --------------------------------------------------------------------------------------------
# The autoregressive scorer
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ARScorer:
    """An autoregressive model that scores text.

    logits_fn(params, tokens int [B, C]) -> logits [B, C, V] (position i predicts token i + 1); params its
    parameters; tokenizer its tokenizer (encode/decode/bos_id/eos_id/pad_id); context_len C its longest
    input; windows are scored batch_size at a time (one compiled shape). add_bos / add_eos: the scorer's
    framing of a text (ddlm's pipeline trains on bos doc eos)."""

    logits_fn: Callable[[Any, jax.Array], jax.Array]
    params: Any
    tokenizer: Any
    context_len: int
    batch_size: int = 8
    add_bos: bool = True
    add_eos: bool = False

    def __post_init__(self):
        if self.context_len < 2:
            raise ValueError(f"the scorer's context_len must be >= 2, got {self.context_len}")
        if self.batch_size < 1:
            raise ValueError(f"the scorer's batch_size must be >= 1, got {self.batch_size}")

        def window_nll(params, tokens, target_mask):
            logits = self.logits_fn(params, tokens)  # the mask id is never predicted (as ar_sample)
            per_token = losses.autoregressive_loss(logits, tokens, self.tokenizer.mask_id)  # [B, C - 1]
            return jnp.sum(per_token * target_mask[:, 1:], axis=1)

        self._window_nll = jax.jit(window_nll)

    def frame(self, ids: Sequence[int]) -> list[int]:
        return (
            ([self.tokenizer.bos_id] if self.add_bos else [])
            + [int(i) for i in ids]
            + ([self.tokenizer.eos_id] if self.add_eos else [])
        )


def _windows(row: list[int], context_len: int):
    """(tokens, target_mask) windows of at most context_len tokens overlapping by one: each token of the row
    after the first is a target exactly once."""
    start = 0
    while True:
        piece = row[start : start + context_len]
        yield piece, [0] + [1] * (len(piece) - 1)
        if start + context_len >= len(row):
            break
        start += context_len - 1


def score_token_rows(scorer: ARScorer, rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """NLL (nats) and scored-token count of each row of scorer token ids (framing added here).
    Returns (nll [N], tokens [N]) as float64."""
    c, b = scorer.context_len, scorer.batch_size
    windows, owner = [], []
    for r, ids in enumerate(rows):
        for piece, mask in _windows(scorer.frame(ids), c):
            windows.append((piece, mask))
            owner.append(r)
    nll = np.zeros(len(rows), np.float64)
    counts = np.zeros(len(rows), np.float64)
    pad = scorer.tokenizer.pad_id
    for lo in range(0, len(windows), b):
        chunk = windows[lo : lo + b]
        tokens = np.full((b, c), pad, np.int32)
        target = np.zeros((b, c), np.float32)
        for i, (piece, mask) in enumerate(chunk):
            tokens[i, : len(piece)] = piece
            target[i, : len(mask)] = mask
        sums = np.asarray(jax.device_get(scorer._window_nll(scorer.params, tokens, target)), np.float64)
        for i in range(len(chunk)):
            nll[owner[lo + i]] += sums[i]
            counts[owner[lo + i]] += target[i].sum()
    return nll, counts


def score_texts(scorer: ARScorer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """NLL (nats) and scored tokens of each text under the scorer (re-encoded with its tokenizer)."""
    return score_token_rows(scorer, [scorer.tokenizer.encode(t) for t in texts])


def score_samples(
    scorer: ARScorer, rows: Sequence[Sequence[int]], tokenizer
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Samples as ids of `tokenizer` -> text -> the scorer's ids -> (nll [N], tokens [N], texts)."""
    texts = [tokenizer.decode([int(i) for i in row]) for row in rows]
    nll, counts = score_texts(scorer, texts)
    return nll, counts, texts


def sample_quality(scorer: ARScorer | None, rows: Sequence[Sequence[int]], tokenizer) -> dict:
    """Generative perplexity (with SE, delta method over samples; None without a scorer), mean unigram
    entropy and distinct-n of samples given as `tokenizer` ids [N][L]."""
    out = diversity_summary([content_ids(r, tokenizer) for r in rows])
    if scorer is not None:
        nll, counts, _ = score_samples(scorer, rows, tokenizer)
        s = likelihood.likelihood_summary(nll, counts, exact=True)
        out.update(
            gen_ppl=s["perplexity"],
            gen_ppl_se=s["perplexity_se"],
            gen_nll_per_token=s["nats_per_token"],
            gen_nll_per_token_se=s["nats_per_token_se"],
            scored_tokens=s["tokens"],
        )
    return out
