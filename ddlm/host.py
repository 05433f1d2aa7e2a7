"""Process-wide host settings for training on CPU, applied when `ddlm` is imported.

glibc's malloc serves every allocation above 32 MiB with a fresh mmap and returns it to the kernel on
free. XLA's CPU runtime allocates each execution's temporary buffer (hundreds of MiB for a train step) that
way, so every step faulted in, zeroed and unmapped that memory again: on the peers' benchmark shape (4 x 256
DiT, batch 8 x 256) 115k minor page faults and 0.19 s of kernel time per step, about 15% of the step's CPU
time. With one arena, no mmap and a high trim threshold, freed buffers stay in the process heap and the
next step reuses them: 0 faults and 0.02 s of kernel time per step (benchmarks/RESULTS.md, "Host malloc");
on the 12 x 768 shape, 840k faults and 3 s of kernel time per step before, 0 and 0.02 s after.

The settings only take effect for threads that have not yet picked an arena, i.e. before JAX starts its
CPU client, so `ddlm/__init__.py` applies them at import. They change no numerics. They are skipped where
an accelerator plugin is installed (its host side allocates differently, and one arena could contend there),
on non-glibc systems, and with DDLM_HOST_MALLOC=0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

ENV = "DDLM_HOST_MALLOC"

# mallopt(3) parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# Free memory at the heap's top is never returned to the kernel: -1 disables trimming (mallopt(3)). A finite
# threshold is an int, at most 2 GiB, and the `small` train step's temporaries are larger: with 2**31 - 1 its
# steps still faulted 840k pages (3 s of kernel time, 12% of the step) each.
_TRIM_THRESHOLD = -1

_ACCELERATOR_PLUGINS = (
    "jax_cuda12_plugin",
    "jax_cuda13_plugin",
    "jax_rocm60_plugin",
    "jax_rocm7_plugin",
    "libtpu",
)

applied: dict[str, int] = {}


def _accelerator_plugin_installed() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def configure_malloc(force: bool = False) -> bool:
    """Keeps freed memory in the heap for reuse (see the module docstring). Returns whether it applied.

    Skipped (False) with DDLM_HOST_MALLOC=0, off Linux/glibc, or, unless `force`, when an accelerator plugin
    is installed or JAX_PLATFORMS names a platform other than cpu."""
    if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if not force:
        platforms = os.environ.get("JAX_PLATFORMS", "")
        if platforms and set(platforms.split(",")) != {"cpu"}:
            return False
        if not platforms and _accelerator_plugin_installed():
            return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    for name, param, value in (
        ("arena_max", _M_ARENA_MAX, 1),
        ("mmap_max", _M_MMAP_MAX, 0),
        ("trim_threshold", _M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
    ):
        if mallopt(param, value) == 1:
            applied[name] = value
    return bool(applied)
