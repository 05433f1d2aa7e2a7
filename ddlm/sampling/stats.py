"""Statistics of sampled token ids that the sampling CLI writes with each sample (and ddlm.eval reports).

    unigram_entropy(ids) -> float     entropy (nats) of one sample's token histogram

Here rather than in ddlm.eval: sampling sits below evaluation (ddlm.eval.sample_quality imports it from here).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def unigram_entropy(ids: Sequence[int]) -> float:
    """Entropy (nats) of the token histogram of one sample (MDLM/DUO's sample entropy); 0 for an empty one.
    ids: int [length] (any shape; flattened)."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size == 0:
        return 0.0
    _, counts = np.unique(ids, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())
