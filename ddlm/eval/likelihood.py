"""Likelihood with error bars: the NELBO of a diffusion model (or the exact NLL of an autoregressive one) over
a split, per sequence, summarised as nats/token, bits/token, bits/character and the perplexity bound, each
with a standard error.

The estimator (`nelbo_per_sequence`, jittable). Each sequence x_b of a batch is copied K times and handed to
`losses.training_loss` as one batch of K, so the K copies get K antithetic times t_k = (u_b + k/K) mod 1
with u_b ~ U[0, 1) drawn independently per sequence (for 'bd3lm', K times per block; for 'd3pm', the times
are snapped to the T-step grid). training_loss returns the masked mean over the K copies, hence

    Y_b = (1/K) sum_k sum_l loss_l(x_b, t_bk, x_t) m_bl  +  n_b (prior + reconstruction)       [nats]

with m_bl the loss mask, n_b = sum_l m_bl the scored tokens of x_b and the boundary terms per token from
`losses.boundary_terms` (0 when alpha(0) = 1 and alpha(1) = 0). E[Y_b | x_b] is x_b's NELBO, an upper bound
on -log p_theta(x_b). For 'ar', Y_b is the exact NLL of tokens 1..L-1 (token 0 has no context in a packed
row and is not scored: n_b = sum_{l >= 1} m_bl) and K = 1.

The masked continuous-time losses (mdlm, sedd_absorb, radd, bd3lm) draw the number of masked tokens
instead of the time (`losses.count_sampled_nelbo`, stratified over the K copies): the same NELBO with
importance weights bounded by L. With uniform t the 1/t weight on Binomial(L, t) masked tokens gives a second
moment growing like int dt / t: rare sequences drawn at tiny t carry estimates many times the mean, and the
standard error is unreliable (measured on the quickstart: benchmarks/RESULTS.md). The T-step bound ('d3pm'),
the uniform graph and 'ar' go through `losses.training_loss`.

Error bars (`ratio_summary`). Per-token figures are ratios R = sum_b Y_b / sum_b n_b. Treating the N
evaluated sequences as an i.i.d. sample, the delta method gives

    SE(R) = sqrt( sum_b (Y_b - R n_b)^2 / (N (N - 1)) ) / mean_b(n_b),

which is the plain standard error of the mean of Y_b / n when every n_b = n (wrap packing). It includes both
sources of randomness: which sequences the split holds, and (for diffusion) the Monte-Carlo noise of the
times and masks; for 'ar' only the former. bits = nats / ln 2 (SE likewise). bits/character is the same
ratio with c_b, the characters of the decoded scored tokens of x_b (`tokenizer.decode`, which drops
bos/eos/pad, whose bits still count), in place of n_b: total bits over total characters, comparable across
tokenizers. The perplexity bound exp(R) has SE exp(R) SE(R) (delta method) and the 95% interval
exp(R -+ 1.96 SE(R)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ddlm import losses


class SequenceEstimates(NamedTuple):
    nats: jax.Array  # float32 [B]: per-sequence NELBO estimate (exact NLL for 'ar'), boundary terms included
    tokens: jax.Array  # float32 [B]: scored tokens n_b


def scored_mask(name: str, loss_mask):
    """[B, L] positions whose loss counts: the loss mask, without position 0 for 'ar' (it has no context).
    numpy in, numpy out; jax in, jax out."""
    if name != "ar":
        return loss_mask
    xp = np if isinstance(loss_mask, np.ndarray) else jnp
    return loss_mask * (xp.arange(loss_mask.shape[1]) > 0)


def nelbo_per_sequence(
    name: str,
    apply_fn: losses.ApplyFn,
    x0,
    loss_mask,
    rng,
    *,
    schedule,
    vocab_size: int,
    mask_id: int | None,
    block_size: int | None = None,
    num_steps: int | None = None,
    time_samples: int = 1,
    count_sampling: bool = True,
    boundary: bool = True,
) -> SequenceEstimates:
    """Per-sequence NELBO estimates with `time_samples` antithetic times per sequence (see module doc).

    name: a loss of ddlm.losses.LOSSES; apply_fn(xt, t, x0_context) -> [K, L, V] as training_loss calls it;
    x0: int [B, L]; loss_mask: [B, L] or None (all ones); rng: a key. The remaining arguments are
    training_loss's. count_sampling: the masked continuous-time losses (losses.COUNT_SAMPLED_LOSSES) draw the
    number of masked tokens rather than the time (losses.count_sampled_nelbo: the same NELBO, bounded
    weights); False: training_loss's uniform times. boundary=False leaves out the prior and reconstruction
    terms. Returns SequenceEstimates(nats [B], tokens [B]) in float32.
    """
    if time_samples < 1:
        raise ValueError(f"time_samples must be >= 1, got {time_samples}")
    losses._check_tokens("x0", x0)
    if loss_mask is None:
        loss_mask = jnp.ones(x0.shape, jnp.float32)
    loss_mask = jnp.asarray(loss_mask, jnp.float32)
    k = 1 if name == "ar" else time_samples  # the AR loss is exact: one evaluation suffices
    scored = scored_mask(name, loss_mask)
    count = count_sampling and name in losses.COUNT_SAMPLED_LOSSES

    def one(x, m, key):
        xs, ms = jnp.tile(x[None], (k, 1)), jnp.tile(m[None], (k, 1))
        if count:
            per_copy = losses.count_sampled_nelbo(
                name, apply_fn, xs, ms, key, schedule=schedule, mask_id=mask_id, block_size=block_size
            )
            return jnp.mean(per_copy) / jnp.maximum(jnp.sum(scored_mask(name, m)), 1.0)
        mean, _ = losses.training_loss(
            name,
            apply_fn,
            xs,
            ms,
            key,
            schedule=schedule,
            vocab_size=vocab_size,
            mask_id=mask_id,
            block_size=block_size,
            num_steps=num_steps,
            antithetic=True,
        )
        return mean

    keys = jax.random.split(rng, x0.shape[0])
    mean = jax.vmap(one)(x0, loss_mask, keys)  # nats per scored token of each sequence
    tokens = jnp.sum(scored, axis=1)
    nats = mean * tokens
    if boundary:
        prior, recon = losses.boundary_terms(name, schedule, vocab_size)
        nats = nats + (prior + recon) * tokens
    return SequenceEstimates(nats=nats.astype(jnp.float32), tokens=tokens)


# --------------------------------------------------------------------------------------------
# Summaries with standard errors
# --------------------------------------------------------------------------------------------


def ratio_summary(values, counts) -> dict:
    """R = sum(values) / sum(counts) and its delta-method standard error (module doc), over the items with
    counts > 0. values, counts: [N]. Returns {'mean', 'se', 'n'} (se = nan when n < 2)."""
    values = np.asarray(values, np.float64).reshape(-1)
    counts = np.asarray(counts, np.float64).reshape(-1)
    if values.shape != counts.shape:
        raise ValueError(f"values and counts must have the same shape, got {values.shape} and {counts.shape}")
    keep = counts > 0
    values, counts = values[keep], counts[keep]
    n = len(values)
    if n == 0:
        return {"mean": float("nan"), "se": float("nan"), "n": 0}
    r = values.sum() / counts.sum()
    if n < 2:
        return {"mean": float(r), "se": float("nan"), "n": n}
    resid = values - r * counts
    se = math.sqrt(np.sum(resid**2) / (n * (n - 1))) / counts.mean()
    return {"mean": float(r), "se": float(se), "n": n}


def mean_summary(values) -> dict:
    """Mean and its standard error (sample std / sqrt(n)) of per-item values [N]."""
    return ratio_summary(values, np.ones(np.shape(values)))


def likelihood_summary(nats, tokens, chars=None, *, exact: bool = False) -> dict:
    """The figures of a split from per-sequence nats [N], scored tokens [N] and characters [N] (optional):
    nats/token, bits/token, bits/char (each with '_se') and the perplexity (bound) with its SE and 95%
    interval. exact=True labels an exact NLL (the AR model), else a NELBO bound."""
    per_token = ratio_summary(nats, tokens)
    r, se = per_token["mean"], per_token["se"]
    ln2 = math.log(2.0)
    out = {
        "kind": "exact NLL" if exact else "NELBO (upper bound)",
        "sequences": per_token["n"],
        "tokens": float(np.sum(tokens)),
        "nats_per_token": r,
        "nats_per_token_se": se,
        "bits_per_token": r / ln2,
        "bits_per_token_se": se / ln2,
        "perplexity": math.exp(min(r, 700.0)),
        "perplexity_se": math.exp(min(r, 700.0)) * se,
        "perplexity_low": math.exp(min(r - 1.96 * se, 700.0)),
        "perplexity_high": math.exp(min(r + 1.96 * se, 700.0)),
    }
    if chars is not None:
        per_char = ratio_summary(nats, chars)
        out.update(
            characters=float(np.sum(chars)),
            bits_per_char=per_char["mean"] / ln2,
            bits_per_char_se=per_char["se"] / ln2,
        )
    return out


# --------------------------------------------------------------------------------------------
# Over a split
# --------------------------------------------------------------------------------------------

# estimate_fn(tokens [B, L], loss_mask [B, L], rng) -> SequenceEstimates (e.g. a jitted nelbo_per_sequence)
EstimateFn = Callable[..., SequenceEstimates]


def host_array(x) -> np.ndarray:
    """A (possibly sharded, possibly multi-process) jax.Array as a numpy array of all its rows."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def characters_per_row(tokens: np.ndarray, mask: np.ndarray, decode: Callable) -> np.ndarray:
    """[B]: the number of characters of decode(scored tokens) of each row."""
    return np.array([len(decode(row[m > 0].tolist())) for row, m in zip(tokens, mask)], np.float64)


def evaluate_split(
    estimators: dict[str, tuple[EstimateFn, str]],
    batches: Iterable[dict],
    rng,
    *,
    decode: Callable | None = None,
    max_batches: int = 0,
    log_every: int = 20,
) -> dict[str, dict[str, np.ndarray]]:
    """Runs every estimator on the same batches ({'tokens', 'loss_mask'}) of a split.

    estimators: {label: (estimate_fn, loss name)}; batch i uses the key fold_in(rng, i), estimator j of it
    fold_in(that, j). decode(ids) -> text gives the characters (tokenizer.decode). max_batches: 0 = all.
    Returns {label: {'nats': [N], 'tokens': [N], 'chars': [N] (with decode)}} as float64 numpy arrays.
    """
    out = {label: {"nats": [], "tokens": [], "chars": []} for label in estimators}
    chars_cache: dict[bool, np.ndarray] = {}
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        key = jax.random.fold_in(rng, i)
        host_tokens = host_mask = None
        chars_cache.clear()
        for j, (label, (fn, name)) in enumerate(estimators.items()):
            est = fn(batch["tokens"], batch["loss_mask"], jax.random.fold_in(key, j))
            out[label]["nats"].append(host_array(est.nats))
            out[label]["tokens"].append(host_array(est.tokens))
            if decode is not None:
                if host_tokens is None:
                    host_tokens, host_mask = host_array(batch["tokens"]), host_array(batch["loss_mask"])
                ar = name == "ar"
                if ar not in chars_cache:
                    chars_cache[ar] = characters_per_row(host_tokens, scored_mask(name, host_mask), decode)
                out[label]["chars"].append(chars_cache[ar])
        if log_every and (i + 1) % log_every == 0:
            first = next(iter(out.values()))
            s = ratio_summary(np.concatenate(first["nats"]), np.concatenate(first["tokens"]))
            logging.info(
                "eval: %d batches, %d sequences: %.4f +- %.4f nats/token so far",
                i + 1,
                s["n"],
                s["mean"],
                s["se"],
            )
    if not next(iter(out.values()))["nats"]:
        raise ValueError("the split yielded no batch to evaluate")
    return {
        label: {k: np.concatenate(v).astype(np.float64) for k, v in d.items() if v}
        for label, d in out.items()
    }
