"""ddlm/compilation_cache.py (issue 22 item 3): JAX's persistent compilation cache, on for every command, in a
folder of the user's cache per CPU. In fresh processes (jax decides once per process whether the cache is
used): a second process loads every program the first compiled, fast-compiling CPU programs included (jax's
default skips those under 1 s), counted by jax's monitoring events; the switches that turn it off or move it.
The whole path through `python -m ddlm.main --mode=sample` is tests/test_eval_cli.py's."""

import json
import os
import subprocess
import sys

from ddlm import compilation_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Enables the cache (the `enabled` argument from argv), compiles two tiny programs and one with a host callback,
# prints the folder and the counts as JSON.
_PROGRAMS = """
import json, sys
from ddlm import compilation_cache
enabled = {"on": True, "off": False, "env": None}[sys.argv[1]]
folder = compilation_cache.enable(enabled)
import jax, jax.numpy as jnp
jax.jit(lambda x: jnp.sin(x) * 3)(jnp.arange(4.0)).block_until_ready()
jax.jit(lambda x: x @ x.T + 1)(jnp.ones((3, 5))).block_until_ready()
before = compilation_cache.stats()

def with_callback(x):  # like the samplers' per-step progress (jax.debug.callback)
    jax.debug.callback(lambda v: None, x)
    return x + 1

jax.jit(with_callback)(jnp.ones(2)).block_until_ready()
after = compilation_cache.stats()
print(json.dumps({"folder": folder, "compiled": before.compiled, "loaded": before.loaded,
                  "callback_compiled": after.compiled - before.compiled, "total": after.requests,
                  "summary": compilation_cache.summary()}))
"""


def _run(mode="on", **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION", "JAX_PERSISTENT"))}
    base.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run(
        [sys.executable, "-c", _PROGRAMS, mode],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _entries(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith("-cache")) if os.path.isdir(folder) else []


def test_a_second_process_loads_every_program_the_first_compiled(tmp_path):
    """The programs compile in milliseconds (under jax's default 1 s threshold) and are cached all the same;
    the one with a host callback is compiled every time (jax never writes it: why the sampler's per-step
    bar is off while the cache is on)."""
    env = {compilation_cache.DIR_ENV: str(tmp_path / "cache")}
    first = _run(**env)
    assert first["folder"] == os.path.join(str(tmp_path / "cache"), compilation_cache.cpu_tag())
    assert first["compiled"] >= 2 and first["loaded"] == 0, first
    written = _entries(first["folder"])
    assert len(written) == first["total"] - 1, written  # one entry per program but the callback's
    second = _run(**env)
    assert second["compiled"] == 0 and second["loaded"] == first["compiled"], second
    # The callback's program is compiled every time, the rest (its input, say) is loaded.
    assert second["callback_compiled"] == 1 and second["total"] == first["total"]
    assert _entries(first["folder"]) == written
    assert second["summary"].startswith(
        f"compilation: 1 program compiled, {second['total'] - 1} loaded from the cache {second['folder']} ("
    )


def test_off_by_flag_or_environment_and_jax_own_settings_win(tmp_path):
    """--nocompilation_cache (enable(False)) and DDLM_COMPILATION_CACHE=0 write nothing and load nothing;
    JAX_COMPILATION_CACHE_DIR names the folder as it is; JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS is kept
    (nothing compiles in 1000 s: nothing written)."""
    ddlm_dir = tmp_path / "ddlm_cache"
    for mode, env in (("off", {}), ("env", {compilation_cache.ENV: "0"})):
        out = _run(mode, **{compilation_cache.DIR_ENV: str(ddlm_dir)}, **env)
        assert out["folder"] is None and out["loaded"] == 0, out
        assert f"{out['total']} programs compiled, 0 loaded from no cache (off) (" in out["summary"]
    assert not ddlm_dir.exists()

    jax_dir = str(tmp_path / "jax_cache")
    out = _run(JAX_COMPILATION_CACHE_DIR=jax_dir, **{compilation_cache.DIR_ENV: str(ddlm_dir)})
    assert (
        out["folder"] == jax_dir and len(_entries(jax_dir)) == out["total"] - 1 > 0 and not ddlm_dir.exists()
    )

    slow_only = str(tmp_path / "slow_only")
    out = _run(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1000", **{compilation_cache.DIR_ENV: slow_only})
    assert out["compiled"] > 0 and _entries(out["folder"]) == []


def test_the_folder_is_the_users_cache_per_cpu(monkeypatch, tmp_path):
    """$DDLM_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/ddlm/jax, else ~/.cache/ddlm/jax; below it a folder per
    CPU model and instruction set (XLA:CPU's cache key names neither), the same for every core and clock."""
    monkeypatch.delenv(compilation_cache.DIR_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    tag = compilation_cache.cpu_tag()
    assert compilation_cache.default_dir() == str(tmp_path / "home" / ".cache" / "ddlm" / "jax" / tag)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation_cache.default_dir() == str(tmp_path / "xdg" / "ddlm" / "jax" / tag)
    monkeypatch.setenv(compilation_cache.DIR_ENV, str(tmp_path / "mine"))
    assert compilation_cache.default_dir() == str(tmp_path / "mine" / tag)

    def cpuinfo(flags, mhz, cores=2):
        core = "processor\t: {}\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\ncpu MHz\t\t: {}\nflags\t\t: {}\n"
        return "\n".join(core.format(i, mhz, flags) for i in range(cores))

    avx2 = compilation_cache.cpu_tag(cpuinfo("fpu sse2 avx2", 2400.0))
    assert avx2 == compilation_cache.cpu_tag(cpuinfo("fpu sse2 avx2", 3100.5, cores=64))
    assert avx2 != compilation_cache.cpu_tag(cpuinfo("fpu sse2 avx2 avx512f", 2400.0))
    assert avx2.startswith(os.uname().machine + "-") and len(avx2.rsplit("-", 1)[1]) == 8
