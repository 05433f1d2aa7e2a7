"""Tokenizers on the real corpora: exact round-trips, special ids, vocabulary checks, the CLI."""

import os
import subprocess
import sys

import numpy as np
import pytest

from ddlm.data import corpora, pipeline, tokenizers

TOKENIZERS = ("char", "byte", "sentencepiece", "gpt2")
CORPORA = ("shakespeare", "kjv")
SPM_VOCAB = 4096
TRICKY = "  Two  spaces,\ttab, Ünïcødé — “quotes” 日本語 🙂\n\n\nend with space "


def real_config(corpus: str, tokenizer: str):
    """The real corpora live in the default cache ($DDLM_DATA_DIR or ~/.cache/ddlm), shared by runs."""
    c = pipeline.default_config()
    c.corpus, c.tokenizer = corpus, tokenizer
    c.vocab_size = SPM_VOCAB if tokenizer == "sentencepiece" else 0
    return c


@pytest.fixture(
    scope="module", params=[(c, t) for c in CORPORA for t in TOKENIZERS], ids=lambda p: f"{p[0]}-{p[1]}"
)
def corpus_tokenizer(request):
    corpus, kind = request.param
    config = real_config(corpus, kind)
    return config, tokenizers.get_tokenizer(config)


def test_round_trip_on_real_corpus(corpus_tokenizer):
    config, tok = corpus_tokenizer
    texts = list(corpora.iter_texts(config, "validation"))
    assert len(texts) >= 30 and sum(map(len, texts)) > 150_000  # a real slice of the corpus
    specials = {tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id}
    n_tokens = 0
    for text in texts:
        ids = tok.encode(text)
        n_tokens += len(ids)
        assert tok.decode(ids) == text
        arr = np.asarray(ids)
        assert arr.min() >= 0 and arr.max() < tok.vocab_size
        assert not specials & set(ids), "encode must never emit pad/bos/eos/mask"
    n_chars = sum(map(len, texts))
    # Subword tokenizers compress English; char/byte are one id per character/byte.
    if config.tokenizer in ("sentencepiece", "gpt2"):
        assert n_tokens < 0.4 * n_chars
    else:
        assert n_tokens >= n_chars


def test_special_ids_and_mask(corpus_tokenizer):
    config, tok = corpus_tokenizer
    ids = [tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id]
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.mask_id == tok.vocab_size - 1
    assert len({tok.pad_id, tok.mask_id, tok.bos_id}) == 3 and tok.eos_id != tok.mask_id
    if config.tokenizer == "sentencepiece":
        assert tok.vocab_size == SPM_VOCAB
    expected = {"byte": 260, "gpt2": 50259}.get(config.tokenizer)
    if expected:
        assert tok.vocab_size == expected
    # decode drops specials
    body = tok.encode("To be, or not")
    assert tok.decode([tok.bos_id] + body + [tok.eos_id, tok.pad_id, tok.mask_id]) == "To be, or not"


@pytest.mark.parametrize("kind", ["byte", "sentencepiece", "gpt2"])
def test_round_trip_any_unicode(kind):
    """Byte-level tokenizers round-trip any text (SentencePiece through byte fallback)."""
    tok = tokenizers.get_tokenizer(real_config("shakespeare", kind))
    assert tok.decode(tok.encode(TRICKY)) == TRICKY


def test_gpt2_matches_known_ids():
    tok = tokenizers.get_tokenizer(real_config("shakespeare", "gpt2"))
    # GPT-2 ids of "Hello world" and " the" (OpenAI's encoder.json).
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]


def test_char_tokenizer_rejects_unknown_character():
    tok = tokenizers.get_tokenizer(real_config("shakespeare", "char"))
    with pytest.raises(ValueError, match="not in the char tokenizer's alphabet"):
        tok.encode("日本")


def test_vocab_size_mismatch_is_an_error(tmp_path):
    config = real_config("shakespeare", "byte")
    config.vocab_size = 300
    with pytest.raises(ValueError, match="vocab_size=260.*config.data.vocab_size=300"):
        tokenizers.get_tokenizer(config)
    # A saved SentencePiece model whose size differs from the config.
    config = real_config("shakespeare", "sentencepiece")
    config.tokenizer_path = tokenizers.sentencepiece_path(config)
    config.vocab_size = 8000
    with pytest.raises(ValueError, match="vocab_size=4096.*config.data.vocab_size=8000"):
        tokenizers.get_tokenizer(config)
    config.tokenizer_path = str(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="does not exist"):
        tokenizers.get_tokenizer(config)


def test_unknown_tokenizer_name():
    config = real_config("shakespeare", "tiktoken")
    with pytest.raises(ValueError, match="config.data.tokenizer must be"):
        tokenizers.get_tokenizer(config)


@pytest.mark.timeout(120)
def test_cli_trains_sentencepiece(tmp_path):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    rng = np.random.default_rng(0)
    words = ["thou", "art", "the", "king", "of", "Denmark", "and", "I", "am", "thy", "servant"]
    for i in range(20):
        (corpus_dir / f"doc{i}.txt").write_text(
            "\n".join(" ".join(rng.choice(words, size=12)) for _ in range(40)) + "\n"
        )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [
        sys.executable,
        "-m",
        "ddlm.data.tokenizers",
        f"--corpus=local:{corpus_dir}",
        "--vocab_size=320",
        f"--data_dir={tmp_path / 'cache'}",
    ]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=110,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "vocab_size=320" in out.stdout and "exact round-trip: True" in out.stdout
    config = pipeline.default_config()
    config.corpus, config.data_dir = f"local:{corpus_dir}", str(tmp_path / "cache")
    config.tokenizer, config.vocab_size = "sentencepiece", 320
    assert os.path.exists(tokenizers.sentencepiece_path(config))
    tok = tokenizers.get_tokenizer(config)  # loads the saved model, no retraining
    assert tok.vocab_size == 320 and tok.decode(tok.encode("thou art the king\n")) == "thou art the king\n"


def test_tokenizers_pickle_for_grain_workers(corpus_tokenizer):
    """grain worker processes receive the tokenizer by pickling; it must encode identically there."""
    import pickle

    _, tok = corpus_tokenizer
    clone = pickle.loads(pickle.dumps(tok))
    text = "Now is the winter of our discontent\nMade glorious summer"
    assert clone.encode(text) == tok.encode(text) and clone.vocab_size == tok.vocab_size


def test_sentencepiece_unigram_and_bpe_are_distinct_models(tmp_path):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    rng = np.random.default_rng(1)
    words = ["wherefore", "art", "thou", "Romeo", "deny", "thy", "father", "and", "refuse", "name"]
    rare = [
        "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(3, 9))) for _ in range(300)
    ]
    for i in range(10):
        lines = [" ".join(rng.choice(words if rng.random() < 0.8 else rare, size=10)) for _ in range(50)]
        (corpus_dir / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    config = pipeline.default_config()
    config.corpus, config.data_dir = f"local:{corpus_dir}", str(tmp_path / "cache")
    config.tokenizer, config.vocab_size = "sentencepiece", 320
    paths = []
    for model_type in ("bpe", "unigram"):
        config.spm_model_type = model_type
        tok = tokenizers.get_tokenizer(config)
        paths.append(tok.model_path)
        assert tok.vocab_size == 320
        assert tok.decode(tok.encode("Romeo, Romeo!  wherefore\n")) == "Romeo, Romeo!  wherefore\n"
        assert len(tok.encode("wherefore art thou Romeo")) < 12  # learned multi-character pieces
    assert paths[0] != paths[1] and all(os.path.exists(p) for p in paths)


def test_wordpiece_tokenizer_from_a_vocab_file(tmp_path):
    """BERT uncased WordPiece: the file's line numbers as ids, [CLS]/[SEP]/[PAD] as bos/eos/pad, the mask id
    after the last line; greedy longest-match subwords, lower-casing, punctuation split; picklable."""
    import pickle

    lines = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "h", "##at", "##s", ","]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(lines) + "\n")
    config = pipeline.default_config()
    config.tokenizer, config.tokenizer_path = "wordpiece", str(vocab)
    tok = tokenizers.get_tokenizer(config)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.vocab_size) == (0, 2, 3, 13, 14)
    ids = tok.encode("The cats sat on THE hat, dog")
    assert ids == [5, 6, 11, 7, 8, 5, 9, 10, 12, 1]  # the cat ##s sat on the h ##at , [UNK]
    assert tok.mask_id not in ids
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == "the cats sat on the hat, [UNK]"
    assert pickle.loads(pickle.dumps(tok)).encode("a cat") == [1, 6]
    config.vocab_size = 30523
    with pytest.raises(ValueError, match="vocab_size=14"):
        tokenizers.get_tokenizer(config)
    config.vocab_size, config.tokenizer_path = 0, str(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="needs config.data.tokenizer_path"):
        tokenizers.get_tokenizer(config)
    vocab.write_text("a\nb\n")
    config.tokenizer_path = str(vocab)
    with pytest.raises(ValueError, match=r"must contain the tokens \['\[PAD\]'"):
        tokenizers.get_tokenizer(config)
