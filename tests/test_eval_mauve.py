"""MAUVE (ddlm/eval/mauve.py) on features of a tiny random causal judge (last-token pooling): the features are the hidden state the
output layer reads; a sample set against itself scores 1, against a second draw of its distribution high, and
against its own tokens shuffled within each row low; the error bar comes from the k-means seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("mauve")

from ddlm.data import tokenizers  # noqa: E402
from ddlm.eval import mauve as mauve_lib  # noqa: E402

from model_utils import random_variables, tiny_model  # noqa: E402

WORDS = ["the", "king", "is", "dead", "long", "live", "queen", "and", "her", "crown"]


def texts(rng, n):
    """Rows of words of a small vocabulary: 'the king is dead and the queen ...'."""
    return [" ".join(rng.choice(WORDS, size=6)) for _ in range(n)]


def shuffled(rng, rows):
    return ["".join(rng.permutation(list(r))) for r in rows]


@pytest.fixture(scope="module")
def judge():
    tok = tokenizers.ByteTokenizer()
    model = tiny_model("ar", tok.vocab_size, time_conditioning=False)
    tokens = jnp.zeros((1, 48), jnp.int32)
    params = random_variables(model, tokens, None, seed=3)["params"]
    import flax.linen as nn

    return mauve_lib.Judge(model, nn.meta.unbox(params), tok, context_len=48, pooling="last", batch_size=40)


def test_features_are_the_hidden_state_the_output_layer_reads(judge):
    """logits = hidden @ output_kernel + output_bias for a time-free network: the captured tensor is the last
    hidden state, and each pooling picks the real positions."""
    tok = judge.tokenizer
    rows = [judge.frame("the king"), judge.frame("long live the queen")]
    tokens = np.full((2, 48), tok.pad_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    hidden = np.asarray(mauve_lib.hidden_states(judge.model, judge.params, tokens), np.float64)
    logits = np.asarray(judge.model.apply({"params": judge.params}, tokens, None, train=False), np.float64)
    p = judge.params
    v = tok.vocab_size
    direct = hidden @ np.asarray(p["output_kernel"], np.float64)[:, :v] + np.asarray(p["output_bias"])[:v]
    np.testing.assert_allclose(direct, logits, rtol=1e-4, atol=1e-4)

    feats = judge.token_features(rows)
    assert feats.shape == (2, 32) and feats.dtype == np.float32
    np.testing.assert_allclose(feats[0], hidden[0, len(rows[0]) - 1], rtol=1e-5, atol=1e-5)
    mean = mauve_lib.Judge(judge.model, judge.params, tok, context_len=48, pooling="mean")
    np.testing.assert_allclose(mean.token_features(rows)[1], hidden[1, : len(rows[1])].mean(0), rtol=1e-5, atol=1e-5)
    # a causal judge's features do not depend on the padding after the text
    padded = np.full((1, 48), tok.bos_id, np.int32)
    padded[0, : len(rows[0])] = rows[0]
    other = np.asarray(mauve_lib.hidden_states(judge.model, judge.params, padded))[0, : len(rows[0])]
    np.testing.assert_allclose(other, hidden[0, : len(rows[0])], rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(300)
def test_mauve_is_one_against_itself_high_against_its_distribution_low_against_shuffled_tokens(judge):
    rng = np.random.default_rng(0)
    p_texts, q_texts = texts(rng, 200), texts(rng, 200)
    p, q = judge.text_features(p_texts), judge.text_features(q_texts)
    s = judge.text_features(shuffled(rng, p_texts))

    same = mauve_lib.mauve_over_seeds(p, p, seeds=(1, 2))
    assert same["mauve_seeds"] == pytest.approx([1.0, 1.0], abs=1e-12) and same["mauve_se"] < 1e-12
    assert same["num_buckets"] == 20 and same["p_count"] == same["q_count"] == 200  # n / 10 buckets

    fresh = mauve_lib.mauve_over_seeds(p, q, seeds=(1, 2, 3))
    broken = mauve_lib.mauve_over_seeds(p, s, seeds=(1, 2, 3))
    print(fresh, broken)
    # (a random judge sees no words, only the bytes and their order: shuffled rows are far from 0, but far
    # below a fresh draw; measured 0.97 and 0.69)
    assert fresh["mauve"] > 0.9 and broken["mauve"] < 0.8 and fresh["mauve"] - broken["mauve"] > 0.2
    # the error bar: the spread over k-means seeds
    values = np.asarray(broken["mauve_seeds"])
    assert len(values) == 3 and broken["mauve_se"] == pytest.approx(values.std(ddof=1) / np.sqrt(3))


def test_bad_inputs_are_one_clear_error(judge):
    with pytest.raises(ValueError, match="features \\[n, d\\] of one width"):
        mauve_lib.mauve_over_seeds(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="at least 2 texts"):
        mauve_lib.mauve_over_seeds(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="pooling must be one of"):
        mauve_lib.Judge(judge.model, judge.params, judge.tokenizer, 48, pooling="max")
    with pytest.raises(ValueError, match="does not fit the judge's context of 48"):
        judge.token_features([[1] * 49])


def test_mauve_in_the_eval_config_and_the_frontier_points(tmp_path):
    """config.eval.mauve_seeds is checked with the other eval fields; a frontier point carries MAUVE and its
    error (saved, loaded, tabled), and a frontier file written before it still loads (nan)."""
    import json
    import math

    import ml_collections

    from ddlm.eval import cli, frontier_points

    with pytest.raises(ValueError, match="config.eval.mauve_seeds=3 needs config.eval.num_samples >= 2"):
        cli.resolve_config(ml_collections.ConfigDict({"mauve_seeds": 3, "num_samples": 1}))
    with pytest.raises(ValueError, match="config.eval.mauve_seeds must be >= 0"):
        cli.resolve_config(ml_collections.ConfigDict({"mauve_seeds": -1}))
    q = {"entropy": 4.0, "entropy_se": 0.1, "samples": 8, "sampler": "ancestral", "steps": 8, "mauve": 0.7,
         "mauve_se": 0.02}  # fmt: skip
    point = frontier_points.FrontierPoint.from_quality("run", q)
    assert (point.mauve, point.mauve_se) == (0.7, 0.02)
    path = str(tmp_path / "frontier.json")
    frontier_points.save(path, [point])
    assert frontier_points.load(path)[0].mauve == 0.7
    assert "0.700 ± 0.020" in frontier_points.format_points([point]) and "MAUVE" in frontier_points.format_points([point])
    with open(path) as f:
        old = json.load(f)
    for p in old["points"]:
        del p["mauve"], p["mauve_se"]
    with open(path, "w") as f:
        json.dump(old, f)
    loaded = frontier_points.load(path)[0]
    assert math.isnan(loaded.mauve) and "MAUVE" not in frontier_points.format_points([loaded])
