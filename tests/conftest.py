"""Test set-up: 8 fake CPU devices, set before JAX starts (see WORKSPACE.md)."""

import os

# Must run before jax is imported anywhere in the test process.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

assert jax.device_count() == 8, (
  "tests/conftest.py must set XLA_FLAGS before jax starts; something imported jax earlier"
)
