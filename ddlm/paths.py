"""Workdir paths: a local folder, a file:// URI or a bucket (gs://, s3://...), through one API.

    resolve('runs/x') -> '/abs/runs/x'; resolve('file:///tmp/x') -> '/tmp/x'; resolve('gs://b/x') -> 'gs://b/x'
    path(p) -> etils.epath.Path       exists / mkdir / iterdir / open / rename on any of them
    is_remote(p)                      a bucket: no appends, no atomic renames, no file locks

Checkpoint arrays go through orbax and tensorstore (which write gs:// natively); everything else that ddlm
writes into a workdir (the write probe, metrics, samples, reports, the checkpoint listing and quarantine)
goes through `path()` (etils.epath; gs:// needs `pip install gcsfs`), never through os.path or open().
"""

from __future__ import annotations

import os

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
