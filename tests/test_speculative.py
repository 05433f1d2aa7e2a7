"""Speculative decoding (ddlm/sampling/speculative.py): the output law is exactly the target AR network's (TV
against the enumerated joint, with and without filters, with a draft that disagrees with the target so that
rejections and residual draws happen), greedy speculative decoding gives greedy AR's tokens, and the round
accounting (target calls, draft calls, drafted and accepted tokens) adds up."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_utils import tiny_decoder

from ddlm import sampling
from ddlm.sampling import autoregressive, categorical, speculative

FAST = {"xla_backend_optimization_level": 0}  # tiny programs compile ~5x faster on CPU
fast_jit = functools.partial(jax.jit, compiler_options=FAST)


@functools.cache
def _decoders(vocab, dtype=jnp.float32):
    """(target, draft): two different random causal networks over one vocabulary."""
    return tiny_decoder("ar", vocab, False, dtype, seed=1), tiny_decoder("ar", vocab, False, dtype, seed=2)


def _spec(target, draft, mask, **kw):
    return fast_jit(lambda r, x: speculative.speculative_sample(target, draft, r, x, mask_id=mask, **kw))


def _exact_joint(dec, vocab, length, temperature=1.0, top_k=0):
    """The target AR sampler's law over the 4^(length-1) continuations of bos = 0 (ids 0..3, mask = vocab - 1):
    prod_p softmax(filter(logits at p - 1))[x_p], from the full forward of every sequence."""
    seqs = np.stack(np.meshgrid(*[np.arange(4)] * (length - 1), indexing="ij"), -1).reshape(-1, length - 1)
    full = np.concatenate([np.zeros((len(seqs), 1), int), seqs], 1)
    logits = fast_jit(dec.forward)(jnp.asarray(full)).astype(jnp.float32).at[..., vocab - 1].set(-1e9)
    logp = np.asarray(jax.nn.log_softmax(categorical.filter_logits(logits, temperature, top_k), -1), np.float64)
    return np.exp(sum(logp[np.arange(len(seqs)), p - 1, full[:, p]] for p in range(1, length))), seqs


@pytest.mark.parametrize(
    "k, options", [(2, {}), (3, {"temperature": 0.7, "top_k": 3})], ids=["k2", "k3_filtered"]
)
def test_speculative_samples_the_targets_joint_distribution(k, options):
    """The histogram of n samples over the 64 continuations of bos must match the target's exact joint (not the
    draft's) within the TV bound: E[TV] <= 1/2 sum sqrt(p(1-p)/n), plus McDiarmid's deviation at 1e-4."""
    vocab, length, n = 5, 4, 6000
    target, draft = _decoders(vocab)
    exact, seqs = _exact_joint(target, vocab, length, **options)
    draft_law, _ = _exact_joint(draft, vocab, length, **options)
    x = jnp.full((n, length), vocab - 1, jnp.int32).at[:, 0].set(0)
    out = _spec(target, draft, vocab - 1, k=k, **options)(jax.random.key(3), x)
    tokens = np.asarray(out.tokens)
    idx = tokens[:, 1] * 16 + tokens[:, 2] * 4 + tokens[:, 3]
    empirical = np.bincount(idx, minlength=64) / n
    bound = 0.5 * np.sum(np.sqrt(exact * (1 - exact) / n)) + math.sqrt(math.log(1e4) / (2 * n))
    tv = 0.5 * np.abs(empirical - exact).sum()
    tv_draft = 0.5 * np.abs(draft_law - exact).sum()
    rate = np.asarray(out.accepted).sum() / np.asarray(out.drafted).sum()
    print(f"speculative TV {tv:.4f} (bound {bound:.4f}; draft's law at TV {tv_draft:.3f}); acceptance {rate:.3f}")
    assert tv_draft > 4 * bound  # the draft's own law would fail the test: the draft is corrected
    assert tv < bound
    assert 0.2 < rate < 0.95  # both paths (accepted drafts, residual draws) were taken many times


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _accounting(out, x, k, mask):
    """Per row: every position from the first generated one on was produced by a round, each round of a live
    row produced its accepted drafts plus one token, so generated <= accepted + rounds_of_row <= generated + k;
    calls: target = prefill chunks + rounds, draft = prefill chunks + k * rounds."""
    x = np.asarray(x)
    start = max(int((x == mask).argmax(1).min()), 1)
    todo = x.shape[1] - start
    drafted, accepted = np.asarray(out.drafted), np.asarray(out.accepted)
    row_rounds = drafted // k
    assert np.all(drafted % k == 0) and np.all(accepted <= drafted)
    assert np.all(todo <= accepted + row_rounds) and np.all(accepted + row_rounds <= todo + k)
    rounds, prefill = int(out.rounds), int(out.nfe) - int(out.rounds)
    assert row_rounds.max() == rounds and prefill == math.ceil((start - 1) / 64)
    assert int(out.draft_nfe) == prefill + k * rounds


def test_greedy_speculative_decoding_gives_greedy_ars_tokens(x64):
    """With greedy decoding the law is a point mass: the tokens must be AR's exactly, for prompts of different
    lengths and a constraint, and a disagreeing draft (rejections corrected by the target's argmax)."""
    vocab, mask, length, k = 11, 10, 20, 3
    target, draft = _decoders(vocab, jnp.float64)
    rng = np.random.default_rng(0)
    x = np.full((4, length), mask)
    for row, p in enumerate([1, 3, 6, 2]):
        x[row, :p] = rng.integers(0, mask, p)
    x[2, 12] = 4  # a constraint inside the generated region
    x = jnp.asarray(x, jnp.int32)
    expected = fast_jit(lambda r, x: autoregressive.ar_sample(target, r, x, mask_id=mask, greedy=True))(
        jax.random.key(0), x
    )
    out = _spec(target, draft, mask, k=k, greedy=True)(jax.random.key(5), x)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
    assert int(np.asarray(out.tokens)[2, 12]) == 4
    _accounting(out, x, k, mask)
    assert 0 < int(np.asarray(out.accepted).sum()) < int(np.asarray(out.drafted).sum())


def test_the_target_as_its_own_draft_accepts_every_token(x64):
    """q = p: every draft is accepted, so each round makes k + 1 tokens: ceil(generated / (k + 1)) target calls."""
    vocab, mask, length, k = 11, 10, 23, 4
    target, _ = _decoders(vocab, jnp.float64)
    x = jnp.full((3, length), mask, jnp.int32).at[:, 0].set(0)
    out = _spec(target, target, mask, k=k)(jax.random.key(1), x)
    np.testing.assert_array_equal(out.accepted, out.drafted)
    assert int(out.rounds) == math.ceil((length - 1) / (k + 1)) and int(out.nfe) == int(out.rounds)
    assert not np.any(np.asarray(out.tokens) == mask)
    _accounting(out, x, k, mask)


def test_speculative_stops_at_eos_and_pads_after_it(x64):
    """stop_at_eos: each row is padded after its first generated eos, as greedy AR with the same settings."""
    vocab, mask, length, eos, pad = 11, 10, 24, 3, 9
    target, draft = _decoders(vocab, jnp.float64)
    x = jnp.full((4, length), mask, jnp.int32).at[:, 0].set(jnp.arange(4))
    kw = dict(greedy=True, eos_id=eos, pad_id=pad, stop_at_eos=True)
    expected = fast_jit(lambda r, x: autoregressive.ar_sample(target, r, x, mask_id=mask, **kw))(
        jax.random.key(0), x
    )
    out = _spec(target, draft, mask, k=2, **kw)(jax.random.key(0), x)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
    assert np.any(np.asarray(out.tokens) == pad)  # some row stopped early (this seed)


def test_speculative_sampler_registration_and_errors():
    vocab, mask = 11, 10
    target, draft = _decoders(vocab)
    cfg = sampling.default_config()
    cfg.name, cfg.draft_tokens = "speculative", 2
    x = jnp.full((2, 8), mask, jnp.int32).at[:, 0].set(0)
    sample = sampling.make_sampler(cfg, schedule=None, mask_id=mask, decoder=target, draft_decoder=draft)
    out = fast_jit(sample)(jax.random.key(0), x)
    direct = _spec(target, draft, mask, k=2)(jax.random.key(0), x)
    np.testing.assert_array_equal(out.tokens, direct.tokens)
    with pytest.raises(ValueError, match="draft_decoder"):
        sampling.make_sampler(cfg, schedule=None, mask_id=mask, decoder=target)
    bidirectional = tiny_decoder("dit", vocab, False)
    with pytest.raises(ValueError, match="causal draft"):
        speculative.speculative_sample(target, bidirectional, jax.random.key(0), x, mask_id=mask)
    with pytest.raises(ValueError, match="draft's vocabulary"):
        speculative.speculative_sample(target, tiny_decoder("ar", 7, False), jax.random.key(0), x, mask_id=mask)
    with pytest.raises(ValueError, match="draft_tokens"):
        speculative.speculative_sample(target, draft, jax.random.key(0), x, mask_id=mask, k=0)
    with pytest.raises(ValueError, match=r"x_init\[:, 0\] is mask_id"):
        speculative.speculative_sample(target, draft, jax.random.key(0), x.at[1, 0].set(mask), mask_id=mask)
    cfg.draft_tokens = 0
    with pytest.raises(ValueError, match="config.sampler.draft_tokens"):
        sampling.config.validate(cfg)
