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
