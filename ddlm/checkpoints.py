"""Checkpoints: what is saved with each one and how a restore is checked (the network is not built here: the
loader sampling/ and eval/ use, ddlm.loading.load_for_inference, sits above this module and ddlm.models).

    Checkpointer(directory, keep=3)                 orbax CheckpointManager (async, keep N): the trainer's
    Checkpointer(directory, read_only=True)         restores only; creates, moves and deletes nothing
    checkpoint_metadata(config, tokenizer)          the config, its compatibility subset, the data fingerprint
    check_writable(directory, what)                 one-line CheckpointError if `directory` cannot be written

Layout of <workdir>/checkpoints/<step>/ (orbax writes <step>.orbax-checkpoint-tmp and renames it when every
item is complete, so a killed job never leaves a half-written checkpoint that is listed):

    state/   the TrainState (params, opt_state, ema_params, step, rng) as sharded arrays
    data/    the grain iterator's state, one file per process: a resumed run sees exactly the batches an
             uninterrupted one would
    ddlm/    JSON: the whole config, its compatibility subset, the data fingerprint, one checksum per leaf
             of state/ and one sha256 per file of data/
    _CHECKPOINT_METADATA   orbax's record of the step; its custom metadata holds ddlm's format version and
             the sha256 of ddlm/'s JSON (written inside the same atomic commit as the items)

Every file a restore reads is verified: the arrays by their checksums, the data-iterator state by its
sha256, the JSON by the sha256 in orbax's record. A checkpoint whose record names a ddlm format (or
lists the ddlm item) but lacks ddlm/, or whose JSON says format 2 but whose record lacks the checksum,
is damaged. Checkpoints of older versions still restore: format 1 (ddlm/ with array checksums only) with
the data state and the JSON unverified, and checkpoints without ddlm/ (orbax's record lists no ddlm item)
with nothing but the structure checked; each with a warning.

A restore tries the newest committed checkpoint first and checks, in this order:

  1. compatibility: the fields that fix parameter shapes or what a token id means (COMPATIBILITY_FIELDS and
     the tokenizer's vocab_size) must equal the current config's, else IncompatibleCheckpointError: one line
     naming each differing field (old -> new), nothing on disk touched. Steps, learning rate, logging, the
     mesh, dropout, batch size... may change on resume.
  2. data: the corpus's and the tokenizer's fingerprints must match, else DataChangedError, unless
     `config.train.allow_data_change=True` (then the model and optimizer are restored and the data iterator
     starts afresh on the new data).
  3. structure: every leaf's shape and dtype on disk must equal the target's (this names what 1 does not
     cover, e.g. an optimizer change, and checks checkpoints written before configs were stored).
  4. contents: the arrays are read and their checksums (see leaf_checksums) compared with the stored ones;
     the data-iterator state is checked against its sha256 before the iterator is set.

(The metadata is verified before 1.) A checkpoint whose files cannot be read, are missing, or whose
checksum differs, is corrupt: a warning names the step (and the leaf or file), the trainer moves it to
<workdir>/checkpoints_corrupt/<step>-<time> (a new name every time: nothing there is overwritten or
deleted) and falls back to the previous checkpoint. Read-only users (eval, sampling) skip it and leave it
in place. That warning is the only line: orbax's error records and the reports of the asyncio tasks it
abandons are INFO (see ddlm.train.console), shown with --log_level=info.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import logging as py_logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax import lax
from jax.experimental import multihost_utils

from ddlm import paths
from ddlm.sharding import ConfigError

# 1: ddlm/ with per-leaf array checksums. 2: also the data-iterator state's and the JSON's own checksums,
# and the format in orbax's step record (a missing ddlm/ is then damage, not an older checkpoint).
FORMAT_VERSION = 2
CHECKPOINTS_DIR = "checkpoints"
_META_ITEM = "ddlm"  # the orbax item holding our JSON metadata
_STEP_RECORD = "_CHECKPOINT_METADATA"  # orbax's per-step JSON (item handlers, custom metadata), in the commit

# Config fields that fix parameter shapes or what a token id means: a checkpoint restores only into a config
# with the same values. (model.block_size is not here: BD3-LM fine-tunes one block size from another.)
COMPATIBILITY_FIELDS = (
    "model.name",
    "model.num_layers",
    "model.d_model",
    "model.num_heads",
    "model.mlp_dim",
    "model.cond_dim",
    "model.time_conditioning",
    "model.param_dtype",
    "model.tie_embeddings",
    "model.vocab_multiple",
    "model.scan_layers",  # stacked ('blocks') vs per-layer parameters: ddlm.models.stack converts between them
    "model.attention",
    "model.num_kv_heads",
    "model.head_dim",
    "model.qkv_bias",
    "model.logit_shift",
    "model.time_input",  # what the network is shown as its time: same shapes, another function
    "model.max_positions",
    "model.norm_bias",
    "model.attention_bias",
    "model.self_conditioning",  # one more parameter, 'self_cond_embedding'
    "data.tokenizer",
    "diffusion.loss",
    "diffusion.process",
    "train.seq_len",
)

# Fields added after checkpoints were first written, with the value an older checkpoint implies.
_COMPATIBILITY_DEFAULTS = {
    "model.scan_layers": False,
    "model.attention": "",  # implied by model.name (the LLaMA family's fields came later)
    "model.num_kv_heads": 0,
    "model.head_dim": 0,
    "model.qkv_bias": False,
    "model.logit_shift": False,
    "model.time_input": "scaled_t",
    "model.max_positions": 0,
    "model.norm_bias": False,
    "model.attention_bias": False,
    "model.self_conditioning": False,
}


class CheckpointError(ConfigError):
    """A checkpoint problem the user must resolve; its message is one line."""


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint was written by a config with other shapes or another tokenizer."""


class DataChangedError(CheckpointError):
    """The corpus or the tokenizer's vocabulary differs from the checkpoint's (allow_data_change=False)."""


# ------------------------------------------------------------------------------------------------ metadata


def _field(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if part not in node:
            return None  # a config without this field (an older or partial config)
        node = node[part]
    return node


def compatibility(config, tokenizer) -> dict:
    """{dotted field: value} of COMPATIBILITY_FIELDS, plus 'tokenizer.vocab_size' (what the network's vocab
    dimension is built from; config.data.vocab_size may be 0 = 'the tokenizer's')."""
    out = {name: _field(config, name) for name in COMPATIBILITY_FIELDS}
    for name, default in _COMPATIBILITY_DEFAULTS.items():
        out[name] = default if out[name] is None else out[name]
    out["tokenizer.vocab_size"] = int(tokenizer.vocab_size)
    return out


def data_fingerprint(data_config, tokenizer) -> dict:
    """What identifies the training data: the prepared corpus's content hash (for corpora we prepare: the
    sha256 of every prepared file, from its manifest), the split, the packing, and the tokenizer's
    vocabulary hash. The corpus name is kept for messages only: a moved local corpus is the same data."""
    from ddlm.data import corpora

    if corpora.is_local_corpus(data_config.corpus):
        manifest = corpora.prepare_corpus(data_config).manifest
        digest = hashlib.sha256(json.dumps([manifest["files"], manifest["splits"]], sort_keys=True).encode())
        corpus = digest.hexdigest()[:16]
    else:  # an external tfds dataset: its name is all we know
        corpus = f"tfds:{data_config.corpus}"
    return {
        "corpus": data_config.corpus,
        "corpus_fingerprint": corpus,
        "train_split": data_config.train_split,
        "packing": data_config.packing,
        "tokenizer_fingerprint": tokenizer.fingerprint,
    }


# Fields of data_fingerprint() that must match ('corpus' is the name, shown with corpus_fingerprint).
_DATA_FIELDS = ("corpus_fingerprint", "train_split", "packing", "tokenizer_fingerprint")


def checkpoint_metadata(config, tokenizer) -> dict:
    """The JSON saved with every checkpoint (its per-leaf checksums are added at save time)."""
    return {
        "format": FORMAT_VERSION,
        "process_count": jax.process_count(),  # whose data iterator states the checkpoint holds
        "config": json.loads(config.to_json_best_effort()),
        "compatibility": compatibility(config, tokenizer),
        "data": data_fingerprint(config.data, tokenizer),
    }


def params_only_metadata(config, tokenizer) -> dict:
    """The JSON of a checkpoint that holds parameters only, not trained here (a conversion, a test's random
    network): no corpus, no data iterator; loaders read its 'params' (there is no EMA)."""
    return {
        "config": json.loads(config.to_json_best_effort()),
        "compatibility": compatibility(config, tokenizer),
        "data": {"corpus": "", "tokenizer_fingerprint": tokenizer.fingerprint},
        "params_only": True,
    }


def _differences(stored: dict, current: dict, fields, prefix: str = "") -> list[str]:
    """'field: old -> new' for each of `fields` present in both dicts with different values."""
    return [
        f"{prefix}{name}: {stored[name]!r} -> {current[name]!r}"
        for name in fields
        if name in stored and name in current and stored[name] != current[name]
    ]


def compatibility_differences(stored_meta: dict, current_meta: dict) -> list[str]:
    stored = {**_COMPATIBILITY_DEFAULTS, **stored_meta.get("compatibility", {})}
    current = {**_COMPATIBILITY_DEFAULTS, **current_meta["compatibility"]}
    return _differences(stored, current, sorted(current))


def data_differences(stored_meta: dict, current_meta: dict, fields=_DATA_FIELDS) -> list[str]:
    """'data.field: old -> new' for each of `fields` that differs, and the corpus name beside them when
    both metadata name it (a loader compares the tokenizer's fingerprint only: it has no corpus)."""
    stored, current = stored_meta.get("data", {}), current_meta["data"]
    out = _differences(stored, current, fields, prefix="data.")
    if out and "corpus" in stored and "corpus" in current and stored["corpus"] != current["corpus"]:
        out.append(f"data.corpus: {stored['corpus']!r} -> {current['corpus']!r}")
    return out


# ------------------------------------------------------------------------------------------------ checksums
#
# One 64-bit checksum per saved array, computed by XLA where the array lives. Each 32-bit word w at position
# i of the whole (global) array is mixed as h = fmix32(w ^ (i * K + C)) (murmur3's finaliser); the two
# 32-bit lanes are sum(h) and sum(h * (i | 1)), mod 2^32. Because the sums run over global positions, the
# value does not depend on how the array is sharded: a checkpoint restored onto another mesh verifies, and
# with several processes nothing is gathered (each device reduces its shard, XLA adds the partial sums, two
# uint32 per leaf reach the host). For a fixed position h is a bijection of w, so any change confined to
# one word always changes the first lane; other corruption goes unseen with probability about 2^-64.
# Cost: about 2.4 times a plain sum over the state (benchmarks/checkpoint_overhead.py), plus one compile
# per process of a program over the whole tree (the TrainState of the '1b' preset, 1,000 leaves: 10 s on 2
# CPU cores; 'small', 520 leaves: 4.5 s).

_MIX = (0x9E3779B1, 0x7F4A7C15)


def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x) -> jax.Array:
    """The array's bits as uint32 words: [...] for 1-4 byte dtypes, [..., 2] for 8-byte ones."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size in (4, 8):
        return lax.bitcast_convert_type(x, jnp.uint32)
    return lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)


@jax.jit
def _leaf_checksum(x) -> jax.Array:
    """uint32 [2]: the two lanes of one array's checksum."""
    w = _words(x)
    index = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(w.ndim)):  # the global row-major position, without a (resharding) reshape
        index = index + lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2**32)
        stride *= w.shape[d]
    h = _fmix32(w ^ (index * jnp.uint32(_MIX[0]) + jnp.uint32(_MIX[1])))
    return jnp.stack([jnp.sum(h, dtype=jnp.uint32), jnp.sum(h * (index | 1), dtype=jnp.uint32)])


@jax.jit
def _tree_checksums(leaves) -> jax.Array:
    """uint32 [n, 2]: `_leaf_checksum` of each of `leaves`, in one program."""
    return jnp.stack([_leaf_checksum(x) for x in leaves])


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_paths(tree) -> tuple[list[str], list[Any]]:
    """('params/block_0/attn/qkv_kernel', ...) and the leaves: the same path whether the tree is the
    TrainState, a dict of some of its fields or orbax's metadata tree."""
    pairs = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ["/".join(_key_name(k) for k in path) for path, _ in pairs], [x for _, x in pairs]


def leaf_checksums(tree) -> dict[str, str]:
    """{leaf path: 16 hex digits} of every array in `tree` (see the comment above)."""
    paths, leaves = leaf_paths(tree)
    if jax.process_count() > 1:
        # One leaf at a time, each read back before the next starts: with the checksum programs of all
        # leaves in flight at once, the trainer's first save hung (2 processes x 2 CPU devices, gloo).
        jax.block_until_ready(leaves)
        sums = [_host_value(_leaf_checksum(x)) for x in leaves]
    elif leaves:
        # One program for the whole tree. Separate programs in flight at once, each with its own
        # cross-device reductions, can starve XLA:CPU's collective rendezvous on a loaded machine (8 fake
        # devices on 2 cores: the process aborted after the rendezvous timeout in a restore).
        sums = list(_host_value(_tree_checksums(leaves)))
    else:
        sums = []
    return {path: f"{int(v[0]):08x}{int(v[1]):08x}" for path, v in zip(paths, sums, strict=True)}


def _host_value(s) -> np.ndarray:
    if s.is_fully_replicated:
        return np.asarray(s.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(s, tiled=True))


# ------------------------------------------------------------------------------------------------ file system


def check_writable(directory: str, what: str) -> None:
    """Creates `directory` if needed and writes and removes a probe file in it; raises a one-line
    CheckpointError naming `what` if that fails (read-only file system, permissions, a file in the way).
    Checked before any work, and before every save: orbax, when it cannot create a checkpoint's directory,
    waits for a signal that never comes (5 minutes per save) instead of failing."""
    probe = paths.path(directory, f".ddlm-write-probe-{jax.process_index()}-{os.getpid()}")
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("probe")
        probe.unlink()
    except Exception as e:  # noqa: BLE001 -- OSError locally; a bucket's client raises its own errors
        reason = getattr(e, "strerror", None) or " ".join(str(e).split())[:200]
        raise CheckpointError(
            f"{what} {directory} is not writable ({type(e).__name__}: {reason}); "
            "fix its permissions or choose another --workdir"
        ) from None


def committed_steps(directory: str) -> list[int]:
    """Steps with a committed checkpoint on disk (orbax renames <step>.orbax-checkpoint-tmp to <step> last)."""
    directory = paths.path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit() and d.is_dir())


# orbax's warnings about the read-only mode that eval and sampling ask for (two lines per load).
_READ_ONLY_NOTES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")


class _OrbaxLog(py_logging.Filter):
    """On the 'absl' logger (orbax logs through absl) while a Checkpointer is open.

    Remembers the last error orbax logged: its background threads log a failed save and carry on, so this
    is where the reason of a checkpoint that never committed can be found. And lowers orbax's errors (each
    with a traceback, several per failed save) to INFO: the Checkpointer reports every failure itself in
    one line (a save in wait(), a read in restore_latest's warning); `--log_level=info` shows them."""

    def __init__(self):
        super().__init__()
        self.last = ""

    def filter(self, record):
        if "orbax" not in record.pathname:
            return True
        if getattr(record, "ddlm_level", record.levelno) >= py_logging.ERROR:
            exc = record.exc_info[1] if record.exc_info else None
            self.last = f"{type(exc).__name__}: {exc}" if exc else record.getMessage()
            _lower_to_info(record)
        elif str(record.msg).startswith(_READ_ONLY_NOTES):
            _lower_to_info(record)
        return True


def _lower_to_info(record: py_logging.LogRecord) -> None:
    if not hasattr(record, "ddlm_level"):
        record.ddlm_level = record.levelno  # for the other Checkpointers' filters
    record.levelno, record.levelname = py_logging.INFO, "INFO"


class _IteratorState:
    """What grain's orbax handler saves/restores for a data iterator, frozen at save time.

    Saves are asynchronous and the iterator keeps moving, so we capture `get_state()` when `save` is
    called. grain's handler writes `get_state()` as text: dict states (grain DatasetIterator) are
    JSON-encoded here, bytes states pass through."""

    def __init__(self, iterator, state=None, *, expected: dict | None = None):
        """expected (restore): {file name: sha256} from the checkpoint's metadata; the state read is
        compared with its entry before the iterator is set (None: an older checkpoint, unverified)."""
        self._iterator = iterator
        self._state = state
        self._expected = expected

    def get_state(self) -> bytes:
        state = self._state
        if isinstance(state, bytes):
            return b"B" + state
        return b"J" + json.dumps(state).encode()

    def set_state(self, blob: bytes, name: str | None = None):
        """name: the file `blob` was read from (default: this process's, the one grain's handler reads)."""
        if self._expected is not None:
            name = name or _data_file(jax.process_index(), jax.process_count())
            if name not in self._expected:
                raise _Corrupt(f"data/{name} has no checksum in the metadata")
            if _sha256(blob) != self._expected[name]:
                raise _Corrupt(f"data/{name} differs from its checksum (the data-iterator state was changed)")
        kind, payload = blob[:1], blob[1:]
        self._iterator.set_state(payload if kind == b"B" else json.loads(payload.decode()))

    def start_prefetch(self):  # called by grain's handler after restore
        if hasattr(self._iterator, "start_prefetch"):
            self._iterator.start_prefetch()


class _Corrupt(Exception):
    """This checkpoint cannot be used: unreadable files or a checksum mismatch (message: why)."""


def _data_file(process: int, count: int) -> str:
    """The name grain's orbax handler gives the data-iterator state of `process` of `count`."""
    return f"process_{process}-of-{count}.json"


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _json_digest(meta: dict) -> str:
    """sha256 of `meta` as canonical JSON: the same for the dict saved and the dict read back."""
    return _sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())


def _data_checksums(blob: bytes) -> dict[str, str]:
    """{data file name: sha256} of every process's iterator state (`blob` is this process's); with
    several processes a collective: the metadata that process 0 writes names all of them."""
    digest = _sha256(blob)
    count = jax.process_count()
    if count == 1:
        return {_data_file(0, 1): digest}
    rows = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(digest), np.uint8))
    return {_data_file(i, count): bytes(np.asarray(row, np.uint8)).hex() for i, row in enumerate(rows)}


# ------------------------------------------------------------------------------------------------ Checkpointer


class Checkpointer:
    """The orbax CheckpointManager of one checkpoint directory, with the checks of the module docstring.

    read_only=True: for eval and sampling. Raises CheckpointError at once if there is no committed
    checkpoint (and creates nothing); skips corrupt checkpoints without moving them."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = paths.resolve(directory)
        self.corrupt_directory = self.directory + "_corrupt"
        self.read_only = read_only
        self._pending: int | None = None  # the step whose asynchronous save may still be running
        self._closed = False
        if read_only:
            if not committed_steps(self.directory):
                raise CheckpointError(f"no checkpoint in {self.directory}: train first (--mode=train)")
        else:
            check_writable(self.directory, "the checkpoint directory")
        self._errors = _OrbaxLog()
        py_logging.getLogger("absl").addFilter(self._errors)  # before the options: they log too
        try:
            if read_only:
                options = ocp.CheckpointManagerOptions(read_only=True, create=False)
            else:
                options = ocp.CheckpointManagerOptions(
                    max_to_keep=keep,
                    create=True,
                    enable_async_checkpointing=async_save,
                    cleanup_tmp_directories=True,  # remove half-written checkpoints of a killed run
                )
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except BaseException:
            py_logging.getLogger("absl").removeFilter(self._errors)
            raise

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(raise_errors=exc_type is None)
        return False

    # ---------------------------------------------------------------- save

    def save(
        self, step: int, state, data_iterator=None, *, metadata: dict | None = None, force: bool = False
    ):
        """Starts saving `state` (and the iterator's position) as checkpoint `step`, with `metadata`
        (checkpoint_metadata()) and the state's per-leaf checksums. Raises CheckpointError if the previous
        asynchronous save did not commit or the directory is no longer writable."""
        self.wait()
        check_writable(self.directory, "the checkpoint directory")
        meta = {
            **(metadata or {}),
            "format": FORMAT_VERSION,
            "step": int(step),
            "checksums": leaf_checksums(state),
        }
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            from grain import checkpoint as grain_checkpoint

            frozen = _IteratorState(data_iterator, data_iterator.get_state())
            meta["data_checksums"] = _data_checksums(frozen.get_state())  # the bytes grain's handler writes
            items["data"] = grain_checkpoint.CheckpointSave(frozen)
        meta = json.loads(json.dumps(meta))  # as it will be read back (tuples -> lists), for the digest
        items[_META_ITEM] = ocp.args.JsonSave(meta)
        # The format and the JSON's digest go into orbax's step record, committed with the items: a
        # checkpoint that names a format but lacks ddlm/ is damaged, not older.
        record = {_META_ITEM: {"format": FORMAT_VERSION, "metadata_sha256": _json_digest(meta)}}
        self._pending = int(step)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force, custom_metadata=record)

    def wait(self):
        """Waits for the pending asynchronous save; CheckpointError if it did not commit."""
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        failure = ""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 -- reported below as one line
            failure = f"{type(e).__name__}: {e}"
        if jax.process_count() > 1:  # process 0 renames the checkpoint into place: look after it did
            multihost_utils.sync_global_devices(f"ddlm_checkpoint_wait_{step}")
        if step not in committed_steps(self.directory):
            reason = failure or self._errors.last or "no error reported"
            last = committed_steps(self.directory)
            raise CheckpointError(
                f"the checkpoint of step {step} was not written to {self.directory} ({_shorten(reason)}); "
                f"the last committed checkpoint is {f'step {last[-1]}' if last else 'none'}"
            )

    def close(self, raise_errors: bool = True):
        """Waits for the pending save and shuts orbax down (also on errors: its threads must not outlive us)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        except CheckpointError:
            if raise_errors:
                raise
        finally:
            try:
                self.manager.close()
            except Exception:  # already reported by wait() or by orbax's own log
                if raise_errors:
                    raise
            py_logging.getLogger("absl").removeFilter(self._errors)

    def all_steps(self) -> list[int]:
        """Committed checkpoints, after waiting for a pending save (so a step is named only once it is on
        disk); a save that failed is not listed."""
        try:
            self.wait()
        except CheckpointError as e:
            logging.warning("%s", e)
        self.manager.reload()
        return committed_steps(self.directory)

    # ---------------------------------------------------------------- restore

    def restore_latest(
        self,
        abstract_state,
        data_iterator=None,
        *,
        metadata: dict | None = None,
        allow_data_change: bool = False,
        partial: bool = False,
        step: int | None = None,
    ) -> tuple[Any, int | None]:
        """Restores the newest usable checkpoint into `abstract_state`'s shapes and shardings (resharding
        if the mesh changed) and sets `data_iterator`'s position; the checks of the module docstring, with
        `metadata` = checkpoint_metadata() of the current config. Returns (state, step), or (None, None)
        when no checkpoint is usable.

        partial=True: `abstract_state` is a dict of some of the saved state's fields ({'ema_params': ...,
        'step': ...}), and only those are read (read-only Checkpointers only). step: that checkpoint only
        (CheckpointError naming the committed steps when it is not one of them; (None, None) if it is damaged)."""
        if partial and not self.read_only:
            raise ValueError(
                "a partial restore (a dict of some state fields) needs Checkpointer(read_only=True)"
            )
        for step in reversed(self._candidates(step)):
            problem = None
            try:
                stored = self._read_metadata(step)
                restore_data = self._check_config(step, stored, metadata, allow_data_change)
                data_source = restore_data and self._data_source(step, stored, metadata)
                self._check_structure(step, abstract_state, partial)
            except _Corrupt as e:
                problem = str(e)
            problem = _agree(problem)
            if problem is None:
                try:
                    data = data_iterator if data_source is not False else None
                    data_from = None if data_source is True else data_source
                    expected = (stored or {}).get("data_checksums") if _format(stored) >= 2 else None
                    state = self._read(step, abstract_state, data, partial, data_from, expected)
                    self._verify(step, stored, state)
                except _Corrupt as e:
                    problem = str(e)
                problem = _agree(problem)
            if problem:
                self._corrupt(step, problem)
                continue
            return state, step
        return None, None

    def read_metadata(self, step: int) -> dict | None:
        """The verified JSON stored with checkpoint `step` (None for checkpoints written before it existed,
        and for a damaged one: its restore skips it)."""
        try:
            return self._read_metadata(step)
        except _Corrupt:
            return None

    def _candidates(self, step: int | None) -> list[int]:
        """The committed steps, or [step] when a step is asked for (CheckpointError if it is not committed)."""
        steps = committed_steps(self.directory)
        if step is None:
            return steps
        if step not in steps:
            raise CheckpointError(
                f"no checkpoint at step {step} in {self.directory}; committed steps: {steps or 'none'}"
            )
        return [step]

    def newest_metadata(self, step: int | None = None) -> tuple[int, dict | None]:
        """(step, read_metadata(step)) of the newest checkpoint whose metadata is not damaged (a damaged
        one is skipped, as restore_latest skips it); CheckpointError if every one is damaged. step: that
        checkpoint's (restore_latest's `step`)."""
        steps = self._candidates(step)
        for step in reversed(steps):
            try:
                return step, self._read_metadata(step)
            except _Corrupt:
                continue  # restore_latest reports it
        raise CheckpointError(f"no usable checkpoint in {self.directory} (all corrupt)")

    def _read_metadata(self, step: int) -> dict | None:
        """The JSON of checkpoint `step`, verified against the digest in orbax's step record; None for a
        checkpoint written before ddlm stored metadata. _Corrupt if it is damaged or missing."""
        record = self._step_record(step)
        marker = (record.get("custom_metadata") or {}).get(_META_ITEM)
        listed = _META_ITEM in (record.get("item_handlers") or {})
        if not paths.path(self.directory, str(step), _META_ITEM).is_dir():
            if marker or listed:
                raise _Corrupt(f"its {_META_ITEM}/ metadata is missing")
            return None  # written before ddlm stored metadata (orbax's record lists no such item)
        try:
            meta = self.manager.restore(
                step, args=ocp.args.Composite(**{_META_ITEM: ocp.args.JsonRestore()})
            )[_META_ITEM]
        except Exception as e:  # noqa: BLE001 -- unreadable metadata = unusable checkpoint
            raise _Corrupt(_reason(e)) from None
        if not isinstance(meta, dict):
            raise _Corrupt(f"its {_META_ITEM}/ metadata is not a JSON object")
        if marker is None:
            if _format(meta) >= 2:
                raise _Corrupt(f"orbax's {_STEP_RECORD} lacks the checksum of its {_META_ITEM}/ metadata")
            return meta  # format 1: an older ddlm wrote no digest of the JSON
        if not isinstance(marker, dict) or marker.get("metadata_sha256") != _json_digest(meta):
            raise _Corrupt(f"its {_META_ITEM}/ metadata differs from its checksum")
        return meta

    def _step_record(self, step: int) -> dict:
        """orbax's _CHECKPOINT_METADATA of `step` (every orbax version this project used writes it)."""
        try:
            record = json.loads(paths.path(self.directory, str(step), _STEP_RECORD).read_text())
        except FileNotFoundError:
            raise _Corrupt(f"orbax's {_STEP_RECORD} is missing") from None
        except Exception as e:  # noqa: BLE001 -- unreadable record = unusable checkpoint
            raise _Corrupt(f"orbax's {_STEP_RECORD} is unreadable ({_reason(e)})") from None
        if not isinstance(record, dict):
            raise _Corrupt(f"orbax's {_STEP_RECORD} is not a JSON object")
        return record

    def _check_config(self, step, stored, metadata, allow_data_change) -> bool:
        """Raises on an incompatible config or changed data; returns whether to restore the iterator."""
        if stored is None or metadata is None:
            return True
        diffs = compatibility_differences(stored, metadata)
        if diffs:
            raise IncompatibleCheckpointError(
                f"the checkpoint at step {step} in {self.directory} was written by an incompatible config: "
                f"{'; '.join(diffs)}. Use the checkpoint's values, or another --workdir for a new run "
                "(nothing was changed on disk)"
            )
        diffs = data_differences(stored, metadata)
        if not diffs:
            return True
        if not allow_data_change:
            raise DataChangedError(
                f"the checkpoint at step {step} in {self.directory} was trained on other data: "
                f"{'; '.join(diffs)}. Set --config.train.allow_data_change=True to continue on the new data "
                "(the data iterator then starts afresh), or use the checkpoint's data settings"
            )
        logging.warning(
            "Data changed since the checkpoint at step %d (%s); allow_data_change=True: restoring the model "
            "and optimizer, the data iterator starts afresh.",
            step,
            "; ".join(diffs),
        )
        return False

    def _check_structure(self, step, abstract_state, partial):
        try:
            # Read with a handler of its own: the manager knows an item's handler only after using it.
            handler = ocp.StandardCheckpointHandler()
            try:
                on_disk = handler.metadata(paths.path(self.directory, str(step), "state"))
            finally:
                handler.close()
            on_disk = getattr(on_disk, "tree", on_disk)
        except Exception as e:  # noqa: BLE001 -- unreadable metadata = unusable checkpoint
            raise _Corrupt(_reason(e)) from None
        disk_paths, disk_leaves = leaf_paths(on_disk)
        disk = dict(zip(disk_paths, disk_leaves, strict=True))
        want_paths, want_leaves = leaf_paths(abstract_state)
        want = dict(zip(want_paths, want_leaves, strict=True))
        problems = [f"{p}: missing in the checkpoint" for p in want_paths if p not in disk]
        if not partial:  # a full restore must also use every saved leaf
            problems += [f"{p}: in the checkpoint only" for p in disk_paths if p not in want]
        for p in want_paths:
            if p in disk:
                old, new = disk[p], want[p]
                old_shape, old_dtype = tuple(getattr(old, "shape", ())), getattr(old, "dtype", None)
                if old_shape != tuple(new.shape):
                    problems.append(f"{p}: shape {old_shape} -> {tuple(new.shape)}")
                elif old_dtype is not None and np.dtype(old_dtype) != np.dtype(new.dtype):
                    problems.append(f"{p}: dtype {np.dtype(old_dtype)} -> {np.dtype(new.dtype)}")
        if problems:
            more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
            raise IncompatibleCheckpointError(
                f"the checkpoint at step {step} in {self.directory} does not fit the current config's state: "
                f"{'; '.join(problems[:4])}{more}. Use the config it was trained with, or another --workdir "
                "(nothing was changed on disk)"
            )

    def _data_source(self, step, stored, metadata) -> bool | int:
        """How to restore the data iterator: True = this process's own saved state (same process count);
        N = the state of process 0 of the N that saved it (every process of the old and the new job read
        the one global stream: config.data.shard_by_process=False, or a single process); False = start
        afresh (each old process read its own share of the documents: no position maps onto the new
        processes' shares)."""
        count = jax.process_count()
        old = (stored or {}).get("process_count")
        if old is None or metadata is None or old == count:
            return True

        def global_stream(meta, processes):
            data = meta.get("config", {}).get("data", {})
            return processes == 1 or data.get("shard_by_process") is False

        if global_stream(stored, old) and global_stream(metadata, count):
            return old
        logging.warning(
            "The checkpoint at step %d was written by %d process(es), this job has %d: each process read its "
            "own share of the documents (config.data.shard_by_process=True), so the model and optimizer are "
            "restored and the data iterator starts afresh. With shard_by_process=False the data stream does "
            "not depend on the process count.",
            step,
            old,
            count,
        )
        return False

    def _read(
        self, step, abstract_state, data_iterator, partial, data_from: int | None = None, expected=None
    ):
        """expected: the data-iterator states' checksums ({file name: sha256}; None: not verified)."""
        if partial:
            restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
            items = {
                "state": ocp.args.PyTreeRestore(
                    item=abstract_state, restore_args=restore_args, partial_restore=True
                )
            }
        else:
            items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None and data_from is None:
            from grain import checkpoint as grain_checkpoint

            items["data"] = grain_checkpoint.CheckpointRestore(
                _IteratorState(data_iterator, expected=expected)
            )
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
            if data_iterator is not None and data_from is not None:
                # grain's handler reads only this job's process_<i>-of-<n> file
                name = _data_file(0, data_from)
                blob = paths.path(self.directory, str(step), "data", name)
                frozen = _IteratorState(data_iterator, expected=expected)
                frozen.set_state(blob.read_text().encode(), name)
                frozen.start_prefetch()
            return state
        except _Corrupt:
            raise
        except Exception as e:  # noqa: BLE001 -- any failure to read means this checkpoint is unusable
            raise _Corrupt(_reason(e)) from None

    def _verify(self, step, stored, state):
        if stored is not None and "checksums" not in stored and _format(stored) >= 2:
            raise _Corrupt("its metadata has no array checksums")
        if stored is None or "checksums" not in stored:
            logging.warning(
                "Checkpoint at step %d has no checksums (written by an older ddlm): not verified.", step
            )
            return
        if _format(stored) < 2:
            logging.warning(
                "Checkpoint at step %d was written by an older ddlm (format 1): its data-iterator state and "
                "metadata carry no checksums and were not verified.",
                step,
            )
        expected = stored["checksums"]
        actual = leaf_checksums(state)
        if _format(stored) >= 2:  # its checksums name every saved leaf (format 1's did too, unverified)
            missing = [p for p in actual if p not in expected]
            if missing:
                raise _Corrupt(f"no checksum for leaf {', '.join(missing[:3])} in its metadata")
        bad = [p for p, c in actual.items() if p in expected and expected[p] != c]
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise _Corrupt(f"checksum mismatch in leaf {', '.join(bad[:3])}{more}")

    def _corrupt(self, step: int, reason: str):
        if self.read_only:
            logging.warning(
                "Checkpoint at step %d is corrupt or unreadable (%s); skipping it (left in place: the next "
                "training run quarantines it) and falling back to the previous checkpoint.",
                step,
                reason,
            )
            return
        destination = self._quarantine(step) or self.corrupt_directory  # named on process 0 only
        logging.warning(
            "Checkpoint at step %d is corrupt or unreadable (%s); moved it to %s and falling back to the "
            "previous checkpoint.",
            step,
            reason,
            destination,
        )

    def _quarantine(self, step: int) -> str:
        """Moves checkpoint `step` to checkpoints_corrupt/<step>-<UTC time>[-n], a name not used before."""
        destination = ""
        if jax.process_index() == 0:
            paths.path(self.corrupt_directory).mkdir(parents=True, exist_ok=True)
            base = f"{self.corrupt_directory}/{step}-{_utc_stamp()}"
            destination, n = base, 1
            while paths.path(destination).exists():
                destination, n = f"{base}-{n}", n + 1
            paths.path(self.directory, str(step)).rename(destination)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"ddlm_checkpoint_quarantine_{step}")
        self.manager.reload()
        return destination


def _format(meta: dict | None) -> int:
    """The format version of a checkpoint's metadata (0: none stored; 1: older ddlm, no 'format' key)."""
    if meta is None:
        return 0
    value = meta.get("format", 1)
    return value if isinstance(value, int) else 1


def _agree(problem: str | None) -> str | None:
    """With several processes: a checkpoint one process cannot read is corrupt for all (each reads its own
    shards), so that all fall back together."""
    if jax.process_count() == 1:
        return problem
    failed = multihost_utils.process_allgather(np.int32(problem is not None))
    if problem is None and np.any(failed):
        return "unreadable on another process"
    return problem


def _utc_stamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")


def _reason(e: Exception) -> str:
    """One line: the exception's first line and, for orbax's wrapper of a TensorStore error (whose own
    text is an array index and a spec), the underlying error's."""
    text = str(e).splitlines()[0] if str(e) else ""
    text = text.split(" See full TensorStore details")[0]
    cause = e.__cause__
    if cause is not None and str(cause) and "TensorStore" in str(e):
        text += f" ({type(cause).__name__}: {str(cause).splitlines()[0]})"
    return _shorten(f"{type(e).__name__}: {text}")


# The operating system's reasons a write or read fails, as tensorstore and Python word them (os.strerror).
_OS_REASONS = tuple(
    os.strerror(n) for n in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)
)


def _shorten(text: str, limit: int = 400) -> str:
    """The first line of `text`, its middle cut out if longer than `limit` characters (tensorstore's errors
    name the file twice and carry a long JSON spec); the operating system's reason ('File too large', 'No space
    left on device', ...), wherever it stood, leads the shortened line."""
    line = text.splitlines()[0] if text else ""
    if len(line) <= limit:
        return line
    half = (limit - 5) // 2
    short = f"{line[:half]} ... {line[-half:]}"
    reason = next((r for r in _OS_REASONS if r in line), None)
    return f"{reason}: {short}" if reason and reason not in short else short
