"""ddlm/host.py: after `import ddlm`, a freed large buffer is reused by the next allocation instead of being
unmapped and faulted in again (what made XLA's per-step temporary buffers cost ~15% of a CPU step)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates, touches and frees a buffer of $PROBE_MIB MiB three times; prints the minor page faults of the third
# round.
# Plain malloc through ctypes, like XLA's CPU buffers (numpy would madvise huge pages for its own arrays).
_PROBE = """
import ctypes, os, resource
import ddlm
from ddlm import host
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = int(os.environ["PROBE_MIB"]) * 2**20
for i in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buf = libc.malloc(size)
    ctypes.memset(buf, 1, size)
    libc.free(buf)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, sorted(host.applied))
"""


def _probe(mib=64, **env):
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "PROBE_MIB": str(mib), **env}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    faults, applied = out.stdout.split(" ", 1)
    return int(faults), applied.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_buffers_are_reused_without_page_faults():
    pages = 64 * 2**20 // 4096
    faults, applied = _probe()
    assert applied == "['arena_max', 'mmap_max', 'trim_threshold']"
    assert faults < pages // 10, f"{faults} page faults for a reused 64 MiB buffer"
    # The opt-out restores glibc's default: every round maps and faults the buffer in afresh.
    faults, applied = _probe(DDLM_HOST_MALLOC="0")
    assert applied == "[]" and faults > pages // 2, faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_buffers_above_2_gib_are_reused_too():
    """The `small` train step's temporaries exceed 2 GiB, the largest finite trim threshold: trimming must be off,
    else the heap's top is returned to the kernel and faulted in again every step."""
    mib = 2200
    faults, _ = _probe(mib)
    assert faults < mib * 256 // 10, f"{faults} page faults for a reused {mib} MiB buffer"
