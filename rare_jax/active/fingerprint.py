"""What a strategy's run directory was started with, so that a rerun resumes only that run.

`runner.run_strategy` records `fingerprint.json` in the run directory when a run starts and,
when it resumes one, refuses a fingerprint that differs: resuming with other features, seeds or
loop settings (l2, B, f_a, ...) would silently mix two runs in one set of checkpoints and logs.

A fingerprint is a flat JSON dict: the strategy, the seed, the `LoopConfig` fields, the loop's
version (`loop.LOOP_VERSION`: code that draws or fits differently), the deep
update period Q (deep strategies), and for each array (pool and validation features, seed
positions, validation ground truth) its shape, dtype and a SHA-256 of up to `SAMPLE_ROWS` rows
evenly spaced through it (cheap on a large pool; exact, so a resumed run is bit-identical).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import numpy as np

from rare_jax.active import loop
from rare_jax.infra.checkpoint import write_json_atomic

FILENAME = "fingerprint.json"
SAMPLE_ROWS = 64


def array_summary(x) -> dict:
  """Shape, dtype and a SHA-256 of up to `SAMPLE_ROWS` evenly spaced rows of `x` (any array)."""
  shape = tuple(int(n) for n in x.shape)
  if shape and shape[0]:
    rows = np.unique(np.linspace(0, shape[0] - 1, min(shape[0], SAMPLE_ROWS)).round())
    sample = np.asarray(jax.device_get(x[rows.astype(np.int64)]))
  else:
    sample = np.asarray(jax.device_get(x))
  digest = hashlib.sha256(np.ascontiguousarray(sample).tobytes()).hexdigest()[:16]
  return {"shape": list(shape), "dtype": str(sample.dtype), "sample_sha256": digest}


def run_fingerprint(
  *,
  strategy: str,
  seed: int,
  loop_config,
  features,
  val_features,
  seed_ids,
  val_ground_truth,
  rounds_per_update: int | None = None,
  val_weights=None,
) -> dict:
  """The fingerprint of one strategy's run (JSON-ready).

  Args:
    strategy: the strategy's name.
    seed: the config seed.
    loop_config: the strategy's `loop.LoopConfig`.
    features, val_features: the starting `[P, D]` and `[V, D]` features.
    seed_ids: `[C, K]` seed pool positions.
    val_ground_truth: `[C, V]` bool.
    rounds_per_update: Q for strategies with deep updates (None: frozen features).
    val_weights: `[V]` validation weights; None (all 1) adds no key, as before the field.
  """
  fingerprint = {"strategy": strategy, "seed": int(seed), **dataclasses.asdict(loop_config)}
  fingerprint["loop_version"] = loop.LOOP_VERSION  # (absent: version 1)
  if rounds_per_update is not None:
    fingerprint["rounds_per_update"] = int(rounds_per_update)
  for name, value in (
    ("features", features),
    ("val_features", val_features),
    ("seed_ids", np.asarray(seed_ids, np.int64)),
    ("val_ground_truth", np.asarray(val_ground_truth, bool)),
  ):
    fingerprint[name] = array_summary(value)
  if val_weights is not None:
    fingerprint["val_weights"] = array_summary(np.asarray(val_weights, np.float64))
  return json.loads(json.dumps(fingerprint))  # as it reads back from disk (lists, floats)


def record(run_dir: str, fingerprint: dict) -> None:
  """Writes `fingerprint` as the run directory's (a fresh run: replaces any older one)."""
  write_json_atomic(os.path.join(run_dir, FILENAME), fingerprint)


def check(run_dir: str, fingerprint: dict) -> bool:
  """Raises ValueError naming what differs unless `run_dir` was started with `fingerprint`.

  Returns:
    False when the directory holds no fingerprint (a run from before fingerprints; the caller
    may record one), True when it matches.
  """
  path = os.path.join(run_dir, FILENAME)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    try:
      recorded = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e}); refusing to resume {run_dir}") from e
  differences = [
    f"{key}: {recorded.get(key)!r} in the run, {fingerprint.get(key)!r} now"
    for key in sorted(set(recorded) | set(fingerprint))
    if recorded.get(key) != fingerprint.get(key)
  ]
  if differences:
    raise ValueError(
      f"run directory {run_dir} was started with other settings, refusing to resume it "
      f"(differs in {'; '.join(differences)}); use a new run directory or the original "
      "features and settings"
    )
  return True
