"""Test set-up: 8 fake CPU devices, set before JAX starts (see WORKSPACE.md)."""

import atexit
import functools
import os
import shutil
import tempfile

# Must run before jax is imported anywhere in the test process.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A compilation cache private to this test process: tests that compile the same program again
# (a resumed run, a replay) load it instead of recompiling (minutes on this CPU otherwise).
# Removed when the process that made it ends (subprocesses that inherit it end first). Under
# pytest-xdist the workers inherit the controller's folder and the controller, ending last,
# removes it. (Sharing it saves little: a CI run's two workers compiled no program in common.)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rare_jax_xla_")
  atexit.register(
    functools.partial(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
  )
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

assert jax.device_count() == 8, (
  "tests/conftest.py must set XLA_FLAGS before jax starts; something imported jax earlier"
)
