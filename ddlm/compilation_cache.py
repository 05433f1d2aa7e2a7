"""JAX's persistent compilation cache, on for every ddlm command: a rerun loads its compiled programs from
disk instead of compiling them again (a sampler, an eval step, the train step: seconds to minutes each).

    enable()      -> the cache folder (None when off); call before the first compilation
    stats()       -> Stats(requests, loaded): programs asked of XLA in this process, and those the cache served
    summary()     -> 'compilation: 2 programs compiled (4.1 s), 31 loaded from the cache <dir>'

Where: $DDLM_COMPILATION_CACHE_DIR, else ~/.cache/ddlm/jax ($XDG_CACHE_HOME/ddlm/jax), in a subfolder named
after the host's CPU (below). A user cache folder rather than the workdir: compiled programs depend on the
shapes and the config, not on the parameters, so a fork in a new workdir, `--mode=eval` of another run, and
the trainer's eval step and the eval command share them; a workdir in a bucket would be a slow cache, and a
local disk is a fast one. A folder set by jax itself (JAX_COMPILATION_CACHE_DIR, or jax.config) is used as
it is. Off: DDLM_COMPILATION_CACHE=0 or the commands' --nocompilation_cache.

What is cached: every program, however fast it compiled (jax skips those under 1 s by default, which on a
CPU is most of them: 0 s here), and of any size. Not cached (jax 0.10): a program with a host callback,
e.g. the sampler's per-step progress bar (jax.debug.callback), whose function pointer is baked into the
program; ddlm.sampling.cli therefore draws that bar only with the cache off.

XLA:CPU's cache key names the platform 'cpu' and jaxlib's version, not the processor: a program compiled
for one CPU's instruction set (AVX-512, say) would be loaded on another from a home folder shared by
different machines. The subfolder `<machine>-<hash of the CPU's model and feature flags>` keeps them apart.
Only process 0 of a multi-process job writes entries (jax); every process reads them. jax writes an entry
in place: a reader that meets a half-written one warns and compiles the program itself.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
from typing import NamedTuple

ENV = "DDLM_COMPILATION_CACHE"  # '0': off
DIR_ENV = "DDLM_COMPILATION_CACHE_DIR"
# jax's monitoring events (jax/_src/dispatch.py, compiler.py): every program handed to XLA (compiled or
# loaded from the cache), and those loaded.
_REQUEST_EVENT = "/jax/core/compile/backend_compile_duration"
_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class Stats(NamedTuple):
    requests: int  # programs handed to XLA in this process (compiled, or loaded from the cache)
    loaded: int  # of which the persistent cache served
    seconds: float  # the time all of them took

    @property
    def compiled(self) -> int:
        return self.requests - self.loaded


_lock = threading.Lock()
_counts = {"requests": 0, "loaded": 0, "seconds": 0.0}
_listening = False
_directory: str | None = None


def _on_event(event: str, **_) -> None:
    if event == _HIT_EVENT:
        with _lock:
            _counts["loaded"] += 1


def _on_duration(event: str, duration: float, **_) -> None:
    if event == _REQUEST_EVENT:
        with _lock:
            _counts["requests"] += 1
            _counts["seconds"] += duration


def _listen() -> None:
    global _listening
    if _listening:
        return
    import jax.monitoring

    jax.monitoring.register_event_listener(_on_event)
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    _listening = True


def stats() -> Stats:
    """The counts since enable() (or since the first stats() call)."""
    _listen()
    with _lock:
        return Stats(_counts["requests"], _counts["loaded"], _counts["seconds"])


def cpu_tag(cpuinfo: str | None = None) -> str:
    """'<machine>-<8 hex digits>': the host's architecture and a hash of its CPU model and feature flags, from
    `cpuinfo` (default: /proc/cpuinfo; platform.processor() where there is none). Other lines (the clock,
    the core's number) do not change it."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = platform.processor()
    lines = [line.strip() for line in cpuinfo.splitlines() if line.split(":")[0].strip() in _CPU_FIELDS]
    text = "\n".join(dict.fromkeys(lines)) or cpuinfo  # each distinct line once (every core repeats them)
    return f"{platform.machine() or 'cpu'}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


# What sets the instruction set (x86 'flags', ARM 'Features') and the CPU it tunes for.
_CPU_FIELDS = (
    "model name",
    "flags",
    "Features",
    "CPU implementer",
    "CPU part",
    "vendor_id",
    "cpu family",
    "model",
)


def default_dir() -> str:
    """$DDLM_COMPILATION_CACHE_DIR or $XDG_CACHE_HOME/ddlm/jax (~/.cache/ddlm/jax), with the CPU's subfolder."""
    base = os.environ.get(DIR_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ddlm", "jax"
    )
    return os.path.join(os.path.expanduser(base), cpu_tag())


def enable(enabled: bool | None = None) -> str | None:
    """Turns the persistent cache on (see the module doc) and returns its folder, or turns it off
    (enabled=False, or DDLM_COMPILATION_CACHE=0 when enabled is None) and returns None. Call it before
    the first compilation: jax decides once per process whether the cache is used. jax's own settings of
    the thresholds (JAX_PERSISTENT_CACHE_MIN_*) are kept."""
    global _directory
    import jax

    _listen()
    if enabled is None:
        enabled = os.environ.get(ENV, "1") != "0"
    if not enabled:
        jax.config.update("jax_enable_compilation_cache", False)
        _directory = None
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    directory = jax.config.jax_compilation_cache_dir or default_dir()
    jax.config.update("jax_compilation_cache_dir", directory)
    for name, value in (
        ("jax_persistent_cache_min_compile_time_secs", 0.0),
        ("jax_persistent_cache_min_entry_size_bytes", -1),  # -1: no size limit, and no override of it
    ):
        if name.upper() not in os.environ:
            jax.config.update(name, value)
    _directory = directory
    return directory


def directory() -> str | None:
    """The folder enable() chose (None: off, or enable() not called)."""
    return _directory


def summary() -> str:
    """One line: the programs this process compiled and those it loaded, and from where."""
    s = stats()
    where = f"the cache {_directory}" if _directory else "no cache (off)"
    return (
        f"compilation: {s.compiled} program{'s' if s.compiled != 1 else ''} compiled, {s.loaded} loaded from "
        f"{where} ({s.seconds:.1f} s in all)"
    )
