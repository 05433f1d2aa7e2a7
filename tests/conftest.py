"""Test set-up shared by every test: 8 fake CPU devices, set before jax is imported; the jobs the tests
start share a compilation cache of the session, never the user's ~/.cache/ddlm/jax (ddlm.compilation_cache)."""
import atexit
import os
import shutil
import tempfile

os.environ["DDLM_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddlm-test-compilation-cache-")
atexit.register(shutil.rmtree, os.environ["DDLM_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # jax's own setting would win over ddlm's

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)

assert jax.device_count() == 8, (
    f"tests expect 8 fake CPU devices, got {jax.device_count()}: was jax imported before conftest?"
)

import pytest  # noqa: E402

import deadlines  # noqa: E402  (tests/ is on the path: pytest's rootdir-relative conftest import)


def pytest_report_header(config):
    return f"ddlm test deadlines x{deadlines.SCALE:.2f} (DDLM_TEST_TIME_SCALE, else the load per core; tests/deadlines.py)"


def pytest_collection_modifyitems(config, items):
    """Every test's pytest-timeout (its marker, else the ini's) times deadlines.SCALE."""
    if deadlines.SCALE == 1.0:
        return
    default = float(config.getini("timeout") or 0)
    for item in items:
        marker = item.get_closest_marker("timeout")
        base = float(marker.args[0]) if marker is not None and marker.args else default
        if marker is not None and "timeout" in marker.kwargs:
            base = float(marker.kwargs["timeout"])
        if base > 0:
            item.add_marker(pytest.mark.timeout(deadlines.scaled(base)), append=False)
