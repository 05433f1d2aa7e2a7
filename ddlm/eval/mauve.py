"""MAUVE (Pillutla et al. 2021) of samples against reference text, on features from a ddlm network (the judge:
an AR checkpoint, an imported GPT-2, any loaded network). The score itself is the maintained `mauve-text`
package's (PCA, k-means quantisation, divergence curve: `mauve.compute_mauve` on precomputed features);
this module makes the features and repeats the score over k-means seeds for its error bar.

    judge = Judge.from_loaded(loaded)                            # ddlm.loading.Loaded of the judge network
    p = judge.text_features(reference_texts)                     # [N, d] float32
    q = judge.text_features(sample_texts)
    mauve_over_seeds(p, q, seeds=(1, 2, 3, 4, 5))                # {'mauve', 'mauve_se', 'mauve_seeds', ...}

Features (`hidden_states`): the output of the network's final norm (`norm_final`, the last hidden state the
output layer reads; GPT-2's hidden_states[-1] after ln_f), captured with flax's capture_intermediates, so no
network code changes. A text is framed as the judge's training data frames a document ([bos] + ids, cut to
its context), padded on the right; pooling 'last' takes the last real position (MAUVE's GPT-2 featurisation;
the default for a causal judge, whose earlier positions never see the padding), 'mean' the mean over real
positions (the default for a bidirectional judge; its positions attend to the padding, as for a padded
training row).

Error bar: MAUVE depends on the k-means seed (and, with few samples, on the number of buckets, n / 10 by
default). `mauve_over_seeds` reports the mean over seeds and its standard error (std / sqrt(seeds)): the
quantisation noise only, not the sampling noise of the texts themselves (which needs more samples, not
more seeds).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FINAL_NORM = "norm_final"  # the module name of the final norm in ddlm.models (Transformer and Llama)
POOLINGS = ("last", "mean")


def hidden_states(model, params, tokens, t=None) -> jax.Array:
    """The final norm's output [B, L, d] of a ddlm network on tokens int [B, L] (t [B] for a time-conditioned
    network; a block-causal one is not supported)."""
    _, state = model.apply(
        {"params": params},
        tokens,
        t,
        x0=None,
        train=False,
        capture_intermediates=lambda module, method: module.name == FINAL_NORM and method == "__call__",
        mutable=["intermediates"],
    )
    found = jax.tree.leaves(state["intermediates"])
    if len(found) != 1:
        raise ValueError(f"the network has no single '{FINAL_NORM}' module whose output is its last hidden state")
    return found[0]


def pool(hidden, lengths, pooling: str):
    """hidden [B, L, d], lengths int [B] (real positions) -> [B, d]: the last real position or their mean."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    lengths = jnp.asarray(lengths)
    if pooling == "last":
        return jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    real = (jnp.arange(hidden.shape[1])[None, :] < lengths[:, None]).astype(hidden.dtype)
    return jnp.sum(hidden * real[..., None], axis=1) / lengths[:, None].astype(hidden.dtype)


@dataclasses.dataclass
class Judge:
    """A network whose pooled last hidden states are MAUVE's features. model / params: a flax ddlm network;
    tokenizer: its tokenizer; context_len: its window; pooling: 'last' | 'mean'; context: a callable
    returning the mesh context (Loaded.context) or None."""

    model: Any
    params: Any
    tokenizer: Any
    context_len: int
    pooling: str = "last"
    batch_size: int = 8
    context: Any = None

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"the MAUVE judge's pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if getattr(self.model, "attention", "") == "block_causal":
            raise ValueError("a block-causal (bd3lm) network cannot be a MAUVE judge: use a causal or bidirectional one")
        time_conditioned = bool(getattr(self.model, "time_conditioning", False))

        def featurize(params, tokens, lengths):
            t = jnp.zeros((tokens.shape[0],), jnp.float32) if time_conditioned else None  # clean text: t = 0
            hidden = hidden_states(self.model, params, tokens, t).astype(jnp.float32)
            return pool(hidden, lengths, self.pooling)

        self._featurize = jax.jit(featurize)

    @classmethod
    def from_loaded(cls, loaded, pooling: str = "", batch_size: int = 8) -> Judge:
        """The judge of a ddlm.loading.Loaded (or eval.cli.Loaded) checkpoint; pooling '' = 'last' for a causal
        network, 'mean' otherwise."""
        from ddlm import models

        config = loaded.config
        pooling = pooling or ("last" if models.attention_of(config.model) == "causal" else "mean")
        context = getattr(loaded, "context", None)
        return cls(
            loaded.model,
            loaded.params,
            loaded.tokenizer,
            int(config.train.seq_len),
            pooling,
            batch_size,
            context if callable(context) else None,
        )

    def frame(self, text: str) -> list[int]:
        return ([self.tokenizer.bos_id] + self.tokenizer.encode(text))[: self.context_len]

    def token_features(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Features [N, d] float32 of framed id rows (each at most context_len ids), batch_size at a time."""
        if not len(rows):
            raise ValueError("no texts to featurise")
        pad, c, b = self.tokenizer.pad_id, self.context_len, self.batch_size
        out = []
        for lo in range(0, len(rows), b):
            chunk = rows[lo : lo + b]
            tokens = np.full((b, c), pad, np.int32)
            lengths = np.ones((b,), np.int32)
            for i, row in enumerate(chunk):
                if not 0 < len(row) <= c:
                    raise ValueError(f"a row of {len(row)} ids does not fit the judge's context of {c}")
                tokens[i, : len(row)] = row
                lengths[i] = len(row)
            if self.context is not None:
                with self.context():
                    feats = self._featurize(self.params, tokens, lengths)
            else:
                feats = self._featurize(self.params, tokens, lengths)
            out.append(np.asarray(jax.device_get(feats))[: len(chunk)])
        return np.concatenate(out).astype(np.float32)

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        """Features [N, d] of texts, each framed by the judge's tokenizer (`frame`)."""
        return self.token_features([self.frame(t) for t in texts])


def mauve_over_seeds(
    p_features, q_features, *, seeds: Sequence[int] = (1, 2, 3, 4, 5), num_buckets="auto", **kwargs
) -> dict:
    """MAUVE(P, Q) of features p [N, d] (the reference) and q [M, d] (the samples) by mauve-text, once per
    k-means seed: {'mauve': mean, 'mauve_se': std / sqrt(seeds) (nan for one seed), 'mauve_seeds': [...],
    'num_buckets', 'p_count', 'q_count'}. kwargs go to mauve.compute_mauve."""
    import mauve  # the mauve-text package (the 'eval' extra); imports torch

    p = np.asarray(p_features, np.float32)
    q = np.asarray(q_features, np.float32)
    if p.ndim != 2 or q.ndim != 2 or p.shape[1] != q.shape[1]:
        raise ValueError(f"MAUVE needs features [n, d] of one width, got {p.shape} and {q.shape}")
    if min(len(p), len(q)) < 2:
        raise ValueError(f"MAUVE needs at least 2 texts on each side, got {len(p)} and {len(q)}")
    if not seeds:
        raise ValueError("mauve_over_seeds needs at least one seed")
    values, buckets = [], None
    for seed in seeds:
        r = mauve.compute_mauve(p_features=p, q_features=q, num_buckets=num_buckets, seed=int(seed), **kwargs)
        values.append(float(r.mauve))
        buckets = int(r.num_buckets)
    values_np = np.asarray(values)
    se = float(values_np.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return {
        "mauve": float(values_np.mean()),
        "mauve_se": se,
        "mauve_seeds": values,
        "num_buckets": buckets,
        "p_count": len(p),
        "q_count": len(q),
    }


def sample_mauve(judge: Judge, reference_texts: Sequence[str], sample_texts: Sequence[str], **kwargs) -> dict:
    """mauve_over_seeds of the judge's features of reference texts (P) and samples (Q)."""
    return mauve_over_seeds(judge.text_features(reference_texts), judge.text_features(sample_texts), **kwargs)
