"""Supervised fine-tuning data (LLaDA's SFT format): prompt/response records -> one padded row each.

Records are JSON lines with two string fields, ``{"prompt": ..., "response": ...}``, in a ``.jsonl`` file
or in every ``.jsonl`` file under a directory (``config.data.sft_data``), or the built-in set
``'shakespeare_replies'`` (built on first use from the prepared Shakespeare corpus: the last line of one
speech -> the first line of the next speaker's reply, both at most 48 characters; 25k pairs). The
tokenizer is that of ``config.data.corpus``: an SFT run fine-tunes a model trained on that corpus.

Row layout (LLaDA GUIDELINES.md, 'SFT'), ``seq_len`` tokens per example::

    tokens:     bos  <prompt, templated>  <response>  eos eos ... eos
    loss_mask:   0          0...0            1...1     1   1  ...  1

``loss_mask`` is 1 on the response and on the whole eos padding: the padding counts in the loss, which is
how the model learns where the response ends (sampling fills a fixed-length canvas and the eos tail is part
of it). ``loss_mask == 0`` marks the prompt, which the 'sft' loss (ddlm.losses.training_loss) never masks.

Packing: one example per row, padded. Packing several examples into a row would need attention kept within
each example (a segment mask in the network; ddlm.models has none) -- bidirectional attention would
otherwise let examples see each other -- and it would remove the eos tail LLaDA trains on. The cost is the
compute spent on padding; sorting examples into length buckets is the usual remedy (not done here).
A response that does not fit is truncated (counted in ``truncated_tokens``, logged once); a prompt that
leaves no room for a response is an error naming the record.

Chat templates (``config.data.sft_template``): ``'none'`` uses the prompt text as it is; ``'chat'`` wraps it
in plain-text role markers (characters every tokenizer of ours can encode, Shakespeare's alphabet included)::

    [user] <prompt>
    [assistant] <response>

The prompt part is ``'[user] ' + prompt + '\\n[assistant] '``; the response follows it directly. One turn
only (no multi-turn dialogue).

The pipeline keeps ddlm.data.pipeline's conventions: records sharded by process, shuffled by a seed,
repeated, encoded in grain (worker processes optional), batched, and handed out as global ``jax.Array``s by
``ddlm.data.batching.DataIterator``, whose state (grain's plus the counters here) is checkpointed with the model.
The train/validation split is by a hash of each record's key (``<file>:<line>``), like the corpora's.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import os
from typing import Any

import grain
import jax
import numpy as np
from absl import logging

from ddlm.data.config import default_config
from ddlm.data import corpora, sources
from ddlm.data import tokenizers as tokenizers_lib
from ddlm.data.batching import DataIterator, prefetch

TEMPLATES = ("none", "chat")
BUILTIN = ("shakespeare_replies",)
# The built-in set keeps pairs whose prompt and response lines both have at most this many characters.
BUILTIN_MAX_CHARS = 48


def is_sft(data_config) -> bool:
    """Whether the data config reads SFT records (``config.data.sft_data`` set) rather than plain text.
    A data config built without the defaults' SFT fields (by hand, in tests) is plain text."""
    return "sft_data" in data_config and bool(data_config.sft_data)


# ----------------------------------------------------------------------------------------------
# One example -> one row
# ----------------------------------------------------------------------------------------------


def template_prompt(prompt: str, template: str) -> str:
    """The prompt text as the model sees it under ``template`` ('none' | 'chat', see the module doc)."""
    if template == "none":
        return prompt
    if template == "chat":
        return f"[user] {prompt}\n[assistant] "
    raise ValueError(f"config.data.sft_template must be one of {TEMPLATES}, got {template!r}")


def encode_prompt(tok: tokenizers_lib.Tokenizer, prompt: str, template: str) -> list[int]:
    """[bos] + ids of the templated prompt: the known prefix of an SFT row (for training, sampling, scoring)."""
    return [tok.bos_id] + tok.encode(template_prompt(prompt, template))


def encode_example(
    tok: tokenizers_lib.Tokenizer, prompt: str, response: str, *, template: str, seq_len: int, where: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens int32 [seq_len], loss_mask float32 [seq_len], truncated response tokens) of one record."""
    try:
        prompt_ids = encode_prompt(tok, prompt, template)
        response_ids = tok.encode(response)
    except ValueError as e:  # e.g. a character outside a char tokenizer's alphabet
        raise ValueError(f"{where}: {e}") from None
    if len(prompt_ids) >= seq_len:
        raise ValueError(
            f"{where}: the prompt takes {len(prompt_ids)} tokens (bos and the {template!r} template "
            f"included), which leaves no room for a response in train.seq_len={seq_len}"
        )
    body = np.asarray(prompt_ids + response_ids + [tok.eos_id], np.int32)
    tokenizers_lib.check_token_ids(body, tok, where)
    truncated = max(0, len(body) - seq_len)
    tokens = np.full([seq_len], tok.eos_id, np.int32)
    tokens[: min(len(body), seq_len)] = body[:seq_len]
    loss_mask = np.zeros([seq_len], np.float32)
    loss_mask[len(prompt_ids) :] = 1.0
    return tokens, loss_mask, truncated


class _EncodeExample:
    """Picklable map function (it runs in grain workers): record -> row dict."""

    def __init__(self, tok, template: str, seq_len: int):
        self.tok, self.template, self.seq_len = tok, template, seq_len

    def __call__(self, record) -> dict[str, Any]:
        tokens, loss_mask, truncated = encode_example(
            self.tok,
            record["prompt"],
            record["response"],
            template=self.template,
            seq_len=self.seq_len,
            where=f"SFT record {record['id']}",
        )
        return {"tokens": tokens, "loss_mask": loss_mask, "truncated": np.int64(truncated)}


# ----------------------------------------------------------------------------------------------
# Records: files, the built-in set, the split
# ----------------------------------------------------------------------------------------------


def read_records(path: str) -> list[dict[str, str]]:
    """Every record of a .jsonl file, or of all .jsonl files under a directory (sorted, recursive), as
    {'id': '<file>:<line>', 'prompt': str, 'response': str}. A line that is not a JSON object with string
    fields 'prompt' and 'response', or not UTF-8 text, is an error naming config.data.sft_data, the file and
    the line; blank lines are skipped."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.jsonl"), recursive=True))
        root = path
        if not files:
            raise ValueError(f"config.data.sft_data: no .jsonl files under {path}")
    elif os.path.isfile(path):
        files, root = [path], os.path.dirname(path)
    else:
        raise ValueError(
            f"config.data.sft_data: {path} does not exist (expected a .jsonl file, a folder of them, "
            f"or one of {BUILTIN})"
        )
    records = []
    for name in files:
        rel = os.path.relpath(name, root)
        for lineno, line in enumerate(_text_lines(name), 1):
            if not line.strip():
                continue
            where = f"config.data.sft_data: {name}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not a JSON object ({e})") from None
            if not (
                isinstance(record, dict)
                and isinstance(record.get("prompt"), str)
                and isinstance(record.get("response"), str)
            ):
                raise ValueError(
                    f"{where}: expected a JSON object with string fields 'prompt' and 'response' "
                    f"(an SFT record), got {line.strip()[:80]!r}"
                )
            records.append(
                {"id": f"{rel}:{lineno}", "prompt": record["prompt"], "response": record["response"]}
            )
    if not records:
        raise ValueError(f"config.data.sft_data: {path} holds no records")
    return records


def _text_lines(name: str) -> list[str]:
    """The lines of a UTF-8 text file (newlines as open() reads them); a file that is not UTF-8 text (a
    binary file, another encoding) is an error naming config.data.sft_data, the file and the line."""
    with open(name, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"config.data.sft_data: {name}:{lineno}: not UTF-8 text (byte {data[e.start]:#04x} at offset "
            f"{e.start}); expected JSON lines with string fields 'prompt' and 'response'"
        ) from None
    return io.StringIO(text, newline=None).readlines()


def shakespeare_reply_pairs(texts, max_chars: int = BUILTIN_MAX_CHARS) -> list[tuple[str, str]]:
    """(last line of a speech, first line of the next speaker's speech) in scene texts, both lines non-empty
    and at most max_chars long. A speech is a block (between blank lines) whose first line names the
    speaker; single-line blocks (headings, stage directions) are not speeches."""
    pairs = []
    for text in texts:
        blocks = [b.split("\n") for b in text.split("\n\n")]
        speeches = [b for b in blocks if len(b) >= 2 and b[0].strip() and b[1].strip()]
        for first, second in itertools.pairwise(speeches):
            if first[0].strip() == second[0].strip():  # the same speaker again: not a reply
                continue
            prompt, response = first[-1].strip(), second[1].strip()
            if 0 < len(prompt) <= max_chars and 0 < len(response) <= max_chars:
                pairs.append((prompt, response))
    return pairs


def _builtin_path(data_config, name: str) -> str:
    """The .jsonl of a built-in set under <cache>/sft/, written on first use (atomically, under a lock)."""
    corpus_config = default_config()  # the Shakespeare corpus in the same cache
    corpus_config.data_dir = data_config.data_dir
    prepared = corpora.prepare_corpus(corpus_config)
    key = prepared.manifest["fingerprint"][:12]
    path = os.path.join(corpora.cache_dir(data_config), "sft", f"{name}_{BUILTIN_MAX_CHARS}_{key}.jsonl")
    with corpora.file_lock(path + ".lock"):
        if not os.path.exists(path):
            texts = [t for split in corpora.SPLITS for t in corpora.iter_texts(corpus_config, split)]
            pairs = shakespeare_reply_pairs(texts)
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs)
            os.replace(path + ".tmp", path)
            logging.info("SFT set %s: %d pairs written to %s", name, len(pairs), path)
    return path


def resolve_path(data_config) -> str:
    """The file or folder of ``config.data.sft_data`` (a built-in set is built first)."""
    if data_config.sft_data in BUILTIN:
        return _builtin_path(data_config, data_config.sft_data)
    return data_config.sft_data


def split_records(records: list[dict], validation_fraction: float) -> dict[str, list[dict]]:
    """{'train': [...], 'validation': [...]} by a hash of each record's key (sources.validation_bucket); if
    a split would be empty, the record with the most extreme hash moves there (as the corpora do)."""
    if len(records) < 2:
        raise ValueError(f"config.data.sft_data: {len(records)} record(s); need 2 (train and validation)")
    buckets = [sources.validation_bucket(r["id"]) for r in records]
    out = {"train": [], "validation": []}
    for r, b in zip(records, buckets):
        out["validation" if b < validation_fraction else "train"].append(r)
    if not out["validation"]:
        i = int(np.argmin(buckets))
        out["validation"] = [records[i]]
        out["train"] = [r for j, r in enumerate(records) if j != i]
    if not out["train"]:
        i = int(np.argmax(buckets))
        out["train"] = [records[i]]
        out["validation"] = [r for j, r in enumerate(records) if j != i]
    return out


# ----------------------------------------------------------------------------------------------
# The iterator
# ----------------------------------------------------------------------------------------------


class _CountTruncated(grain.IterDataset):
    """Takes the per-row 'truncated' counts out of the batches, sums them, and stops every process after
    the same number of batches."""

    def __init__(self, parent: grain.IterDataset, *, where: str, local_batch: int):
        super().__init__(parent)
        self.where, self.local_batch = where, local_batch

    def __iter__(self):
        return _CountTruncatedIterator(self._parent.__iter__(), self)


class _CountTruncatedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, ds: _CountTruncated):
        super().__init__(parent)
        self._ds = ds
        self.batches = 0
        self.truncated_tokens = 0

    def __next__(self):
        try:
            batch = next(self._parent)
        except StopIteration:
            if self.batches == 0:
                raise ValueError(
                    f"{self._ds.where}: the examples ran out before one batch of {self._ds.local_batch} rows "
                    f"(use a smaller batch, more records, or num_epochs=None)"
                ) from None
            raise
        truncated = int(np.sum(batch.pop("truncated")))
        if truncated and self.truncated_tokens == 0:
            logging.warning(
                "%s: truncating responses longer than seq_len (counted in truncated_tokens)", self._ds.where
            )
        self.truncated_tokens += truncated
        self.batches += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "batches": self.batches,
            "truncated_tokens": self.truncated_tokens,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.batches = state["batches"]
        self.truncated_tokens = state["truncated_tokens"]


def make_iterator(
    config,
    tok: tokenizers_lib.Tokenizer,
    split: str,
    *,
    global_batch_size: int,
    seq_len: int,
    seed: int,
    sharding: jax.sharding.Sharding | None,
    num_epochs: int | None,
    process_index: int,
    process_count: int,
):
    """The SFT input pipeline of one process. ``ddlm.data.pipeline.make_iterator`` calls it, with the
    arguments checked and resolved, when ``config.sft_data`` is set: build iterators through that.

    Returns a ``DataIterator``: ``next(it)`` -> {'tokens': int32 [global_batch_size, seq_len],
    'loss_mask': float32, same shape} (numpy rows of this process without a sharding), rows laid out as in
    the module docstring. With several processes and finite ``num_epochs``, every process stops after the
    batches of the process with the fewest records.
    """
    p, n_proc = process_index, process_count
    if config.sft_template not in TEMPLATES:
        raise ValueError(f"config.data.sft_template must be one of {TEMPLATES}, got {config.sft_template!r}")
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    local_batch = global_batch_size // n_proc
    where = f"SFT data {config.sft_data!r} split {split!r} (process {p} of {n_proc})"
    records = split_records(read_records(resolve_path(config)), float(config.validation_fraction))[split]
    if len(records) < n_proc:
        raise ValueError(f"{where}: {len(records)} records cannot be shared by {n_proc} processes")

    ds = grain.MapDataset.source(records)[p::n_proc]
    ds = ds.shuffle(seed=int(seed) % 2**32).repeat(num_epochs)
    ds = ds.map(_EncodeExample(tok, config.sft_template, seq_len))
    ds = ds.batch(local_batch, drop_remainder=True)
    if num_epochs is not None and n_proc > 1:
        ds = ds[: min(num_epochs * len(range(q, len(records), n_proc)) // local_batch for q in range(n_proc))]
    it_ds = prefetch(ds.to_iter_dataset(), config)
    it_ds = _CountTruncated(it_ds, where=where, local_batch=local_batch)
    return DataIterator(iter(it_ds), sharding=sharding, global_shape=(global_batch_size, seq_len))
