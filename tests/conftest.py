"""Test set-up shared by every test: 8 fake CPU devices, set before jax is imported."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)

assert jax.device_count() == 8, (
    f"tests expect 8 fake CPU devices, got {jax.device_count()}: was jax imported before conftest?"
)
