r"""Times one active-loop round at paper scale against a scikit-learn/numpy baseline.

    python benchmarks/loop_round.py [--pool=1000000 --dim=2048 --dtypes=float32,bfloat16]

State as at the end of a paper-configuration run: per category 50 positives and 455 negatives
labeled (505 labels) and about 9,500 pseudo-negatives, a warm linear model. Prints, per feature
dtype: (1) rare_jax's round (jitted query + observe: answers, pseudo-negatives, logistic
regressions, re-scoring the pool), (2) the baseline: sklearn LogisticRegression (lbfgs) per
category + numpy scoring + argsort rankings + numpy sampling, in its own process on the same
features, (3) the floor: one jitted pass of `features @ weights.T` over the pool; then the
ratios and each process's peak resident memory against the feature matrix (8 GiB at the
default float32 size; the features are never copied). Compilation is excluded (a warm-up
round runs first). Not a test: numbers depend on the machine (and its load, printed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import LogisticRegression

from rare_jax import loop, runner


def make_features(pool: int, dim: int, dtype, seed: int = 0) -> jax.Array:
  """Random features written chunk by chunk into one donated buffer: never a second copy."""
  key = jax.random.key(seed)
  step = min(16384, pool)

  def write(buffer, k, start, rows):
    chunk = jax.random.normal(k, (rows, dim), jnp.float32).astype(dtype)
    return jax.lax.dynamic_update_slice(buffer, chunk, (start, 0))

  write = jax.jit(write, static_argnums=3, donate_argnums=0)
  features = jnp.zeros((pool, dim), dtype)
  for start in range(0, pool, step):
    rows = min(step, pool - start)
    features = write(features, jax.random.fold_in(key, start), start, rows)
  return features.block_until_ready()


def end_of_run_state(engine, features, *, categories, seed=0, positives=50, negatives=455):
  pool, dim = features.shape
  rng = np.random.default_rng(seed)
  labels = np.full((categories, pool), -1, np.int8)
  for c in range(categories):
    chosen = rng.choice(pool, positives + negatives, replace=False)
    labels[c, chosen[:positives]] = 1
    labels[c, chosen[positives:]] = 0
  seed_ids = np.stack([np.flatnonzero(labels[c] == 1)[:5] for c in range(categories)])
  state = engine.init(features, seed_ids, seed=seed)  # jitted: no [P, D] temporaries
  labels = jnp.asarray(labels)
  return state.replace(
    labels=labels,
    label_round=jnp.where(labels >= 0, 1, -1).astype(jnp.int32),
    round=jnp.asarray(50, jnp.int32),
  )


def time_it(fn, *args, repeats=1, **kwargs):
  """Best wall time of `fn(*args, **kwargs)` over `repeats` runs, and its last result."""
  best = float("inf")
  result = None
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    jax.block_until_ready(result)
    best = min(best, time.perf_counter() - start)
  return best, result


def rare_jax_round(engine, state, features, rng):
  ids = np.asarray(engine.query(state))
  answers = rng.random(ids.shape) < 0.1
  return engine.step(state, ids, answers, features)


def baseline_round(state, features_np, *, batch_size, factor, l2, rng):
  """What a straightforward implementation does: sklearn + numpy, one category at a time."""
  labels = np.array(state.labels)  # a writable host copy
  scores = np.asarray(state.scores)
  categories = labels.shape[0]
  weights = np.zeros((categories, features_np.shape[1]), np.float32)
  bias = np.zeros(categories, np.float32)
  for c in range(categories):
    unlabeled = np.flatnonzero(labels[c] < 0)
    order = unlabeled[np.argsort(scores[c, unlabeled])]  # full sort: ranking + bottom half
    query = order[-batch_size:]
    answers = rng.random(batch_size) < 0.1
    labels[c, query] = answers
    p, n = (labels[c] == 1).sum(), (labels[c] == 0).sum()
    bottom = order[: len(order) // 2]
    bottom = bottom[labels[c, bottom] < 0]
    pseudo = rng.choice(bottom, min(len(bottom), round(factor * (p + 0.1 * n))), replace=False)
    ids = np.concatenate([np.flatnonzero(labels[c] >= 0), pseudo])
    targets = np.concatenate([labels[c, labels[c] >= 0] == 1, np.zeros(len(pseudo), bool)])
    model = LogisticRegression(C=1.0 / l2, solver="lbfgs", max_iter=200, tol=1e-6)
    model.fit(features_np[ids].astype(np.float32), targets)
    weights[c], bias[c] = model.coef_[0], model.intercept_[0]
  new_scores = features_np @ weights.T + bias  # [P, C]
  return np.argsort(new_scores, axis=0)


def floor_pass(features, weights):
  return jnp.matmul(features, weights.T.astype(features.dtype), preferred_element_type=jnp.float32)


def peak_rss_gib() -> float:
  """This process's peak resident memory (VmHWM: getrusage's ru_maxrss would report the
  parent's peak in the baseline's process, as Linux carries it over fork and exec)."""
  try:
    with open("/proc/self/status") as status:
      for line in status:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 2**20
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_dtype(args, config, dtype_name: str) -> None:
  features = make_features(args.pool, args.dim, jnp.dtype(dtype_name))
  feature_gib = features.nbytes / 2**30
  engine = runner.Engine(config)
  state = end_of_run_state(engine, features, categories=args.categories)
  rng = np.random.default_rng(0)
  warm = rare_jax_round(engine, state, features, rng)  # compile + a first fit
  jax.block_until_ready(warm)
  del state
  # The timed round starts from a warm model, as every round after the first does.
  warm = warm.replace(round=warm.round + 1)
  ours, after = time_it(rare_jax_round, engine, warm, features, rng, repeats=2)
  pseudo = np.asarray(after.pseudo_negative.sum(1))
  floor_fn = jax.jit(floor_pass)
  weights = after.linear.weights
  floor_fn(features, weights).block_until_ready()
  floor, _ = time_it(floor_fn, features, weights, repeats=3)
  peak = peak_rss_gib()
  print(
    f"[{dtype_name}] pseudo-negatives per category: {pseudo.min()}-{pseudo.max()}; "
    f"compilations: {engine.compilations()}"
  )
  print(
    f"[{dtype_name}] rare_jax round: {ours:.3f}s | floor (one matmul pass): {floor:.3f}s "
    f"| round/floor = {ours / floor:.2f}x | peak RSS so far {peak:.2f} GiB = "
    f"{peak / feature_gib:.2f}x the features ({feature_gib:.2f} GiB)",
    flush=True,
  )
  if args.skip_baseline:
    return
  # The baseline runs in its own process on the same features (regenerated from the seed), so
  # that neither holds two feature matrices and each peak RSS is its own.
  with tempfile.TemporaryDirectory() as tmp:
    state_path = os.path.join(tmp, "state.npz")
    np.savez(state_path, labels=np.asarray(warm.labels), scores=np.asarray(warm.scores))
    del features, warm, after, weights
    command = [sys.executable, __file__, f"--baseline_state={state_path}", f"--dtypes={dtype_name}"]
    command += [f"--pool={args.pool}", f"--dim={args.dim}", f"--batch_size={args.batch_size}"]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
  measured = json.loads(result.stdout.strip().splitlines()[-1])
  baseline = measured["seconds"]
  print(
    f"[{dtype_name}] baseline (sklearn + numpy, own process): {baseline:.3f}s, peak RSS "
    f"{measured['peak_rss_gib']:.2f} GiB | speed-up = {baseline / ours:.2f}x | round/floor = "
    f"{ours / floor:.2f}x | rare_jax peak RSS {peak:.2f} GiB = {peak / feature_gib:.2f}x the "
    "features",
    flush=True,
  )


def run_baseline(args) -> None:
  """The child process of `bench_dtype`: times `baseline_round`, prints one JSON line."""
  (dtype_name,) = args.dtypes.split(",")
  features = make_features(args.pool, args.dim, jnp.dtype(dtype_name))
  features_np = np.asarray(features)  # zero-copy on the CPU
  if features_np.dtype != np.float32:
    features_np = features_np.astype(np.float32)  # sklearn/numpy work in float32
    del features
  with np.load(args.baseline_state) as saved:
    state = types.SimpleNamespace(labels=saved["labels"], scores=saved["scores"])
  seconds, _ = time_it(
    baseline_round,
    state,
    features_np,
    batch_size=args.batch_size,
    factor=100.0,
    l2=1.0,
    rng=np.random.default_rng(0),
  )
  print(json.dumps({"seconds": seconds, "peak_rss_gib": peak_rss_gib()}))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--pool", type=int, default=1_000_000)
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--categories", type=int, default=10)
  parser.add_argument("--batch_size", type=int, default=10)
  parser.add_argument("--dtypes", default="float32")
  parser.add_argument("--skip_baseline", action="store_true")
  parser.add_argument("--baseline_state", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.baseline_state:
    run_baseline(args)
    return
  print(
    f"devices: {jax.devices()}; pool {args.pool} x dim {args.dim}, {args.categories} categories"
  )
  print(f"load average before: {os.getloadavg()}", flush=True)
  config = loop.LoopConfig(
    batch_size=args.batch_size,
    querying="adaptive",
    pseudo_negative_factor=100.0,
    l2=1.0,
    max_iters=200,
    tol=1e-6,
  )
  for dtype_name in args.dtypes.split(","):
    bench_dtype(args, config, dtype_name)
  print(f"load average after: {os.getloadavg()}")
  print(f"peak resident memory (host): {peak_rss_gib():.1f} GiB")


if __name__ == "__main__":
  main()
