"""Workdir paths: a local folder, a file:// URI or a bucket (gs://, s3://...), through one API.

    resolve('runs/x') -> '/abs/runs/x'; resolve('file:///tmp/x') -> '/tmp/x'; resolve('gs://b/x') -> 'gs://b/x'
    path(p) -> etils.epath.Path       exists / mkdir / iterdir / open / rename on any of them
    is_remote(p)                      a bucket: no appends, no atomic renames, no file locks

Checkpoint arrays go through orbax and tensorstore (which write gs:// natively); everything else that ddlm
writes into a workdir (the write probe, metrics, samples, reports, the checkpoint listing and quarantine)
goes through `path()` (etils.epath; gs:// needs `pip install gcsfs`), never through os.path or open().
"""

from __future__ import annotations

import hashlib
import os
import re

from etils import epath

REMOTE_PREFIXES = ("gs://", "s3://", "az://", "hf://")  # etils.epath's URI schemes


def is_remote(p) -> bool:
    return str(p).startswith(REMOTE_PREFIXES)


def resolve(p) -> str:
    """The canonical string form of a workdir: a bucket URI unchanged, a file:// URI or a local path as
    an absolute local path (etils.epath does not know file://; orbax wants absolute paths)."""
    p = os.fspath(p)
    if is_remote(p):
        return p.rstrip("/")
    if p.startswith("file://"):
        p = p[len("file://") :]
        if not p.startswith("/"):
            raise ValueError(f"{p!r}: a file:// URI must be absolute (file:///path)")
    return os.path.abspath(os.path.expanduser(p))


def path(p, *parts) -> epath.Path:
    """etils.epath.Path of resolve(p) / parts."""
    return epath.Path(resolve(p), *parts)


def folder_name(text: str, max_len: int = 120) -> str:
    """`text` (a user's string: a sampler spec, a label) as one safe folder name: every character other than
    a letter, a digit, '.', '_', '-', '=' or ',' becomes '_', so no '/', '..' or absolute path survives; a
    name longer than max_len keeps its start and gains a hash of the whole (two long names stay apart)."""
    name = re.sub(r"[^A-Za-z0-9._=,-]", "_", text).strip(".") or "_"
    if len(name) > max_len:
        digest = hashlib.sha1(text.encode(errors="surrogatepass")).hexdigest()
        name = f"{name[: max_len - 9]}_{digest[:8]}"
    return name


def inside(base, name: str) -> str:
    """resolve(base)/name, or a ValueError naming both if that is not strictly inside base: a name with
    '..' or a leading '/', or a symbolic link leading out (followed for a local path)."""
    root = resolve(base)
    target = f"{root}/{name}"
    parts = name.split("/")
    outside = not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts)
    if not outside and not is_remote(root):
        real_root, real_target = os.path.realpath(root), os.path.realpath(target)
        outside = real_target == real_root or os.path.commonpath([real_root, real_target]) != real_root
    if outside:
        raise ValueError(f"{name!r} leads out of {root}: a folder name must stay inside it")
    return target
