"""The grain input pipeline: documents -> tokens -> fixed-length sequences -> (global) batches.

Per process (host) ``p`` of ``P``::

    tfds data source (documents of the split)
      -> MapDataset.source -> [p::P]        documents sharded by process (config.shard_by_process=False:
                                            all of them, packed into global batches, rows of p kept)
      -> shuffle(seed)      -> repeat(num_epochs)   a new permutation every epoch
      -> map(tokenize)                      int32 [bos, ids..., eos], ids checked < vocab_size, != mask
      -> to_iter_dataset -> mp_prefetch     tokenisation in `num_workers` processes, order preserved
      -> pack + batch (PackIterDataset)     {'tokens': int32 [local_batch, seq_len],
                                             'loss_mask': float32 [local_batch, seq_len]}
      -> DataIterator                       global jax.Arrays via make_array_from_process_local_data

Packing modes:

* ``wrap`` (MDLM's wrapping): documents, each framed as ``bos doc eos``, are concatenated into one
  stream and cut into sequences of ``seq_len``; every token is real (loss_mask all ones). When a
  finite stream ends, the tokens that do not fill a whole batch are dropped, counted
  (``it.dropped_tokens``) and logged; with several processes all stop after the same number of
  batches (a multi-host step needs every process), so the remainder includes the imbalance.
* ``pad``: one document per sequence (``bos doc eos``, then pad); ``loss_mask`` is 1 exactly on the
  real tokens. A document longer than ``seq_len`` is truncated; truncated tokens are counted
  (``it.truncated_tokens``) and logged.

Packing runs after the worker processes, so the batches do not depend on ``num_workers``. The
iterator's state (grain's state plus the packer's carried-over tokens) is JSON, saved and restored
through orbax with ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import logging

from ddlm.data import corpora, sft
from ddlm.data import tokenizers as tokenizers_lib
from ddlm.data.batching import DataIterator, prefetch
from ddlm.data.config import default_config  # noqa: F401 -- the data fields' public name


# ----------------------------------------------------------------------------------------------
# Tokenise: one document -> int32 [bos, ids..., eos]
# ----------------------------------------------------------------------------------------------


class _Tokenize:
    """Picklable map function (it runs in grain workers)."""

    def __init__(self, tok: tokenizers_lib.Tokenizer, text_field: str, where: str):
        self.tok, self.text_field, self.where = tok, text_field, where

    def __call__(self, record) -> np.ndarray:
        doc_id = record.get("id", b"?") if isinstance(record, dict) else "?"
        doc_id = doc_id.decode("utf-8", "replace") if isinstance(doc_id, bytes) else str(doc_id)
        where = f"{self.where} document {doc_id!r}"
        text = corpora.decode_text(record, self.text_field, where)
        try:
            ids = np.asarray(self.tok.encode(text), dtype=np.int32)
        except ValueError as e:  # e.g. a character outside a char tokenizer's alphabet
            raise ValueError(f"{where}, field {self.text_field!r}: {e}") from None
        tokenizers_lib.check_token_ids(ids, self.tok, f"{where}, field {self.text_field!r}")
        return np.concatenate([[self.tok.bos_id], ids, [self.tok.eos_id]]).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Pack + batch
# ----------------------------------------------------------------------------------------------


class PackIterDataset(grain.IterDataset):
    """Packs token arrays into batches {'tokens': int32 [batch, seq_len], 'loss_mask': f32 [...]}."""

    def __init__(
        self,
        parent: grain.IterDataset,
        *,
        seq_len: int,
        batch_size: int,
        mode: str,
        pad_id: int,
        where: str,
        max_batches: int | None = None,
    ):
        super().__init__(parent)
        if mode not in ("wrap", "pad"):
            raise ValueError(f"config.data.packing must be 'wrap' or 'pad', got {mode!r}")
        self.seq_len, self.batch_size, self.mode, self.pad_id, self.where = (
            seq_len,
            batch_size,
            mode,
            pad_id,
            where,
        )
        self.max_batches = max_batches  # finite streams: the same number of batches on every process

    def __iter__(self):
        return _PackIterator(self._parent.__iter__(), self)


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, ds: PackIterDataset):
        super().__init__(parent)
        self._ds = ds
        self._buffer = np.zeros([0], np.int32)  # wrap mode: tokens carried over to the next sequence
        self.batches = 0
        self.dropped_tokens = 0
        self.truncated_tokens = 0

    def _end(self, pending_tokens: int):
        self.dropped_tokens += pending_tokens
        if self.batches == 0:
            raise ValueError(
                f"{self._ds.where}: the data of this process (or of the poorest process) ran out "
                f"before one batch of {self._ds.batch_size} x seq_len={self._ds.seq_len} tokens: the "
                f"sequence length or "
                f"batch is larger than the corpus split (use a smaller seq_len / batch, or num_epochs=None)"
            )
        logging.info(
            "%s: end of data after %d batches; dropped %d tokens that did not fill a batch",
            self._ds.where,
            self.batches,
            pending_tokens,
        )
        raise StopIteration

    def _next_wrap(self):
        L, B = self._ds.seq_len, self._ds.batch_size
        need = L * B
        pieces, have = [self._buffer], len(self._buffer)
        while have < need:
            try:
                doc = next(self._parent)
            except StopIteration:
                self._buffer = self._buffer[:0]  # the pending tokens are dropped (and counted once)
                self._end(have)
            pieces.append(doc)
            have += len(doc)
        stream = np.concatenate(pieces)
        self._buffer = stream[need:]
        tokens = stream[:need].reshape(B, L)
        return {"tokens": tokens, "loss_mask": np.ones([B, L], np.float32)}

    def _next_pad(self):
        L, B = self._ds.seq_len, self._ds.batch_size
        tokens = np.full([B, L], self._ds.pad_id, np.int32)
        mask = np.zeros([B, L], np.float32)
        truncated = 0  # counted only once the batch is complete (rows of a dropped batch are dropped)
        for row in range(B):
            try:
                doc = next(self._parent)
            except StopIteration:
                self._end(int(mask.sum()))
            if len(doc) > L:
                truncated += len(doc) - L
                doc = doc[:L]
            tokens[row, : len(doc)] = doc
            mask[row, : len(doc)] = 1.0
        if truncated and self.truncated_tokens == 0:
            logging.warning(
                "%s: truncating documents longer than seq_len=%d (counted in truncated_tokens)",
                self._ds.where,
                L,
            )
        self.truncated_tokens += truncated
        return {"tokens": tokens, "loss_mask": mask}

    def __next__(self):
        if self._ds.max_batches is not None and self.batches >= self._ds.max_batches:
            # Another process has fewer batches: stop with it (a multi-host step needs every
            # process), counting what is left of this process's data as dropped.
            pending = len(self._buffer) if self._ds.mode == "wrap" else 0
            pending += sum(len(doc) for doc in self._parent)
            self._buffer = self._buffer[:0]
            self._end(pending)
        batch = self._next_wrap() if self._ds.mode == "wrap" else self._next_pad()
        self.batches += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "buffer": self._buffer.tolist(),
            "batches": self.batches,
            "dropped_tokens": self.dropped_tokens,
            "truncated_tokens": self.truncated_tokens,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._buffer = np.asarray(state["buffer"], np.int32)
        self.batches = state["batches"]
        self.dropped_tokens = state["dropped_tokens"]
        self.truncated_tokens = state["truncated_tokens"]


def document_lengths(config, tok, src, split: str) -> np.ndarray:
    """int64 [num_documents]: framed token count (bos + ids + eos) of every document of the split,
    in data-source order; computed once per (corpus, split, tokenizer) and cached as .npy."""
    name = corpora.split_name(config, split)
    data_key = (
        corpora.prepare_corpus(config).manifest["fingerprint"]
        if corpora.is_local_corpus(config.corpus)
        else corpora.cache_dir(config)
    )
    key = tokenizers_lib.hash_text(f"{data_key}|{name}|{len(src)}|{tok.fingerprint}")
    path = os.path.join(tokenizers_lib.tokenizer_dir(config), f"lengths_{key}.npy")
    with corpora.file_lock(path + ".lock"):
        if not os.path.exists(path):
            field = corpora.record_text_field(config)
            lengths = np.array(
                [
                    len(tok.encode(corpora.decode_text(src[i], field, f"{split}[{i}]"))) + 2
                    for i in range(len(src))
                ],
                np.int64,
            )
            np.save(path + ".tmp.npy", lengths)
            os.replace(path + ".tmp.npy", path)
        return np.load(path)


def _batches_per_process(config, tok, src, split, n_proc, local_batch, seq_len, num_epochs) -> int:
    """The number of full batches the poorest process makes in ``num_epochs`` (every process then
    stops there). Pad mode counts documents; wrap mode needs every document's token count."""
    if config.packing == "pad":
        docs = [len(range(p, len(src), n_proc)) for p in range(n_proc)]
        return min(num_epochs * d // local_batch for d in docs)
    lengths = document_lengths(config, tok, src, split)
    return min(int(num_epochs * lengths[p::n_proc].sum()) // (local_batch * seq_len) for p in range(n_proc))


def make_iterator(
    config: ml_collections.ConfigDict,
    tok: tokenizers_lib.Tokenizer,
    split: str = "train",
    *,
    global_batch_size: int,
    seq_len: int,
    seed: int | None = None,
    sharding: jax.sharding.Sharding | None = None,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> DataIterator:
    """Builds the input pipeline of one process (see the module docstring).

    Args:
      config: the data config (``default_config()`` fields).
      tok: the tokenizer (``tokenizers.get_tokenizer(config)``).
      split: 'train' or 'validation'.
      global_batch_size: sequences per step over all processes; each process makes
        ``global_batch_size // process_count`` of them.
      seq_len: tokens per sequence.
      seed: document order seed (``None``: ``config.shuffle_seed``).
      sharding: where the global batch lives (e.g. ``NamedSharding(mesh, P('data'))``), or ``None``
        for numpy arrays of this process's rows. The batch axis must be split evenly over the
        processes (data/fsdp mesh axes spanning the hosts): process p supplies global rows
        [p * local_batch, (p + 1) * local_batch).
      num_epochs: passes over the split (``None``: forever). When finite, with several processes,
        every process stops after the same number of batches (that of the process with the least
        data; wrap mode tokenises the split once to know it, cached), the rest counted as dropped.
      process_index, process_count: override ``jax.process_index()`` / ``jax.process_count()``
        (to simulate several hosts in one process; then ``sharding`` must be ``None``).

    Returns:
      A ``DataIterator``; ``next(it)`` -> {'tokens': int32 [global_batch_size, seq_len] (numpy:
      [global_batch_size // process_count, seq_len]), 'loss_mask': float32, same shape}.
    """
    simulated = process_index is not None or process_count is not None
    p = jax.process_index() if process_index is None else process_index
    n_proc = jax.process_count() if process_count is None else process_count
    if simulated and sharding is not None and n_proc != jax.process_count():
        raise ValueError(
            f"process_count={n_proc} overrides jax.process_count()={jax.process_count()}: "
            "pass sharding=None when simulating processes"
        )
    if not 0 <= p < n_proc:
        raise ValueError(f"process_index={p} must lie in [0, process_count={n_proc})")
    if global_batch_size <= 0 or global_batch_size % n_proc:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of the "
            f"number of processes {n_proc}"
        )
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if config.vocab_size and config.vocab_size != tok.vocab_size:
        raise ValueError(
            f"config.data.vocab_size={config.vocab_size} but the tokenizer has vocab_size={tok.vocab_size}"
        )
    seed = config.shuffle_seed if seed is None else seed
    local_batch = global_batch_size // n_proc
    if config.sft_data:  # prompt/response records, one padded row each (ddlm/data/sft.py)
        return sft.make_iterator(
            config,
            tok,
            split,
            global_batch_size=global_batch_size,
            seq_len=seq_len,
            seed=seed,
            sharding=sharding,
            num_epochs=num_epochs,
            process_index=p,
            process_count=n_proc,
        )
    where = f"corpus {config.corpus!r} split {split!r} (process {p} of {n_proc})"

    src = corpora.data_source(config, split)
    per_process = config.shard_by_process and n_proc > 1
    if per_process and len(src) < n_proc:
        raise ValueError(f"{where}: {len(src)} documents cannot be shared by {n_proc} processes")
    if corpora.is_local_corpus(config.corpus) and config.packing == "wrap":
        prepared = corpora.prepare_corpus(config)
        name = corpora.split_name(config, split)
        if name in prepared.manifest["splits"]:
            most = prepared.num_bytes(name) + 2 * prepared.num_documents(name)
            if most < seq_len:
                raise ValueError(
                    f"{where}: seq_len={seq_len} is larger than the whole split (at most {most} tokens)"
                )

    ds = grain.MapDataset.source(src)
    if per_process:
        ds = ds[p::n_proc]
    ds = ds.shuffle(seed=int(seed) % 2**32).repeat(num_epochs)
    ds = ds.map(_Tokenize(tok, corpora.record_text_field(config), where))
    it_ds = prefetch(ds.to_iter_dataset(), config)
    max_batches = None
    if num_epochs is not None and per_process:
        max_batches = _batches_per_process(config, tok, src, split, n_proc, local_batch, seq_len, num_epochs)
    it_ds = PackIterDataset(
        it_ds,
        seq_len=seq_len,
        batch_size=local_batch if per_process else global_batch_size,
        mode=config.packing,
        pad_id=tok.pad_id,
        where=where,
        max_batches=max_batches,
    )
    rows = None if per_process or n_proc == 1 else slice(p * local_batch, (p + 1) * local_batch)
    return DataIterator(iter(it_ds), sharding=sharding, global_shape=(global_batch_size, seq_len), rows=rows)
