"""ddlm.eval.sample_quality: entropy and distinct n-grams on hand-made samples; generative perplexity against
NLLs computed directly (a bigram scorer whose NLL is a sum of table entries, and a real causal transformer);
scoring across tokenizers equals scoring the re-encoded text."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm import models
from ddlm.data import tokenizers
from ddlm.eval import sample_quality as sq

CHAR = tokenizers.CharTokenizer("abcdefgh ")
BYTE = tokenizers.ByteTokenizer()


def test_unigram_entropy_hand_made():
    assert sq.unigram_entropy([7, 7, 7, 7]) == 0.0
    assert math.isclose(sq.unigram_entropy([1, 2, 1, 2]), math.log(2))
    assert math.isclose(sq.unigram_entropy([1, 2, 3, 4]), math.log(4))
    p = np.array([3, 1]) / 4
    assert math.isclose(sq.unigram_entropy([5, 5, 9, 5]), -(p * np.log(p)).sum())
    assert sq.unigram_entropy([]) == 0.0


def test_distinct_ngrams_hand_made():
    row = [1, 2, 1, 2, 1, 2]
    assert sq.distinct_ngrams(row, 1) == 2 / 6
    assert sq.distinct_ngrams(row, 2) == 2 / 5  # (1,2) (2,1) repeated
    assert sq.distinct_ngrams(row, 3) == 2 / 4
    assert sq.distinct_ngrams([1, 2, 3, 4], 2) == 1.0
    assert math.isnan(sq.distinct_ngrams([1, 2], 3))
    s = sq.diversity_summary([[1, 1, 1, 1], [1, 2, 3, 4]], ngram_orders=(1, 2))
    assert math.isclose(s["entropy"], math.log(4) / 2)
    assert math.isclose(s["entropy_se"], math.log(4) / 2)  # std of {0, log 4} / sqrt(2)
    assert s["distinct_1"] == (1 / 4 + 1) / 2 and s["distinct_2"] == (1 / 3 + 1) / 2
    assert sq.content_ids([CHAR.bos_id, 5, CHAR.eos_id, 6, CHAR.pad_id, CHAR.mask_id], CHAR) == [5, 6]


def bigram_scorer(tok, context_len, **kw):
    """logits[i] = table[token i]: the NLL of a row is sum_i -log softmax(table[x_i])[x_{i+1}] over the ids
    other than the mask, whatever the windows, since each window repeats the token before its first target."""
    table = (
        np.asarray(jax.random.normal(jax.random.key(3), (tok.vocab_size, tok.vocab_size)), np.float64) * 2.0
    )
    scorer = sq.ARScorer(
        lambda p, x: p[x], jnp.asarray(table, jnp.float32), tok, context_len, batch_size=3, **kw
    )
    kept = np.where(np.arange(tok.vocab_size) == tok.mask_id, -np.inf, table)  # the mask id is never predicted
    log_probs = kept - np.log(np.exp(kept).sum(-1, keepdims=True))
    direct = lambda ids: float(sum(-log_probs[a, b] for a, b in zip(ids[:-1], ids[1:])))
    return scorer, direct


@pytest.mark.parametrize("context_len", [4, 64])
def test_generative_perplexity_of_known_text_equals_direct_nll(context_len):
    scorer, direct = bigram_scorer(BYTE, context_len)
    texts = ["the cat sat on the mat", "a", "", "hello world, again and again"]
    nll, counts = sq.score_texts(scorer, texts)
    for text, v, n in zip(texts, nll, counts):
        ids = [BYTE.bos_id] + BYTE.encode(text)
        assert n == len(ids) - 1
        np.testing.assert_allclose(v, direct(ids), rtol=1e-5, atol=1e-5)
    q = sq.sample_quality(scorer, [[BYTE.bos_id] + BYTE.encode(t) for t in texts], BYTE)
    np.testing.assert_allclose(q["gen_ppl"], math.exp(nll.sum() / counts.sum()), rtol=1e-6)


def test_scorer_framing_conventions():
    scorer, direct = bigram_scorer(BYTE, 5, add_bos=False, add_eos=True)
    ids = BYTE.encode("abcdefghij")
    nll, counts = sq.score_token_rows(scorer, [ids])
    assert counts[0] == len(ids)  # no bos: the first byte is context only; eos is a target
    np.testing.assert_allclose(nll[0], direct(ids + [BYTE.eos_id]), rtol=1e-5)


def test_cross_tokenizer_scoring_equals_scoring_the_reencoded_text():
    """Char-tokenizer samples (with bos/eos/pad ids, which decode drops) scored by a byte-level scorer equal
    the byte-level scoring of their text, and the bigram NLL of those bytes."""
    scorer, direct = bigram_scorer(BYTE, 8)
    texts = ["abc def", "hhh gg a", "bad cafe"]
    rows = [[CHAR.bos_id] + CHAR.encode(t) + [CHAR.eos_id, CHAR.pad_id, CHAR.pad_id] for t in texts]
    nll, counts, decoded = sq.score_samples(scorer, rows, CHAR)
    assert decoded == texts
    nll_bytes, counts_bytes = sq.score_token_rows(scorer, [BYTE.encode(t) for t in texts])
    np.testing.assert_array_equal(nll, nll_bytes)
    np.testing.assert_array_equal(counts, counts_bytes)
    for t, v in zip(texts, nll):
        np.testing.assert_allclose(v, direct([BYTE.bos_id] + BYTE.encode(t)), rtol=1e-5)


def test_transformer_scorer_equals_log_softmax_of_its_logits():
    """A real (random) causal ddlm transformer: the scorer's NLL equals -log softmax(logits[i])[x_{i+1}] (over
    the ids other than the mask) summed directly from one forward pass of the whole framed row."""
    cfg = models.default_config("tiny")
    cfg.name, cfg.time_conditioning = "ar", False
    cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.mlp_dim = 1, 32, 2, 64
    model = models.get_model(cfg, CHAR.vocab_size)
    x = jnp.zeros((1, 16), jnp.int32)
    # Random parameters of the right shapes without compiling the initialiser (seconds on a loaded CPU).
    shapes = nn.meta.unbox(
        jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x, None)["params"])
    )
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)
    logits_fn = lambda p, tokens: model.apply({"params": p}, tokens, None, train=False)
    scorer = sq.ARScorer(logits_fn, params, CHAR, context_len=16, batch_size=2)
    text = "a bad cafe"
    nll, counts = sq.score_texts(scorer, [text])
    ids = np.array([CHAR.bos_id] + CHAR.encode(text))
    logits = np.asarray(jax.jit(logits_fn)(params, jnp.asarray(ids[None])), np.float64)[0]
    logits[:, CHAR.mask_id] = -np.inf  # the softmax over the ids ar_sample can draw
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    direct = -sum(log_probs[i, ids[i + 1]] for i in range(len(ids) - 1))
    assert counts[0] == len(ids) - 1
    np.testing.assert_allclose(nll[0], direct, rtol=1e-5)
