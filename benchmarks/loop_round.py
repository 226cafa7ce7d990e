r"""Times one active-loop round at paper scale against a scikit-learn/numpy baseline.

    python benchmarks/loop_round.py [--pool=1000000 --dim=2048 --dtypes=float32,bfloat16]

State as at the end of a paper-configuration run: per category 50 positives and 455 negatives
labeled (505 labels) and about 9,500 pseudo-negatives, a warm linear model. Prints, per feature
dtype: (1) rare_jax's round (jitted query + observe: answers, pseudo-negatives, logistic
regressions, re-scoring the pool), (2) the baseline: sklearn LogisticRegression (lbfgs) per
category + numpy scoring + argsort rankings + numpy sampling, (3) the floor: one jitted pass of
`features @ weights.T` over the pool; then the ratios and the peak resident memory. Compilation
is excluded (a warm-up round runs first). Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import LogisticRegression

from rare_jax import loop, runner


def make_features(pool: int, dim: int, dtype, seed: int = 0) -> jax.Array:
  """Random features made in chunks on the device (no full-size host copy)."""
  chunks = []
  key = jax.random.key(seed)
  step = 131072
  make = jax.jit(
    lambda k, n: jax.random.normal(k, (n, dim), jnp.float32).astype(dtype), static_argnums=1
  )
  for start in range(0, pool, step):
    chunks.append(make(jax.random.fold_in(key, start), min(step, pool - start)))
  features = jnp.concatenate(chunks)
  del chunks
  return features.block_until_ready()


def end_of_run_state(features, *, categories, seed=0, positives=50, negatives=455):
  pool, dim = features.shape
  rng = np.random.default_rng(seed)
  labels = np.full((categories, pool), -1, np.int8)
  for c in range(categories):
    chosen = rng.choice(pool, positives + negatives, replace=False)
    labels[c, chosen[:positives]] = 1
    labels[c, chosen[positives:]] = 0
  seed_ids = np.stack([np.flatnonzero(labels[c] == 1)[:5] for c in range(categories)])
  state = loop.init(features, jnp.asarray(seed_ids), seed=seed)
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


def bench_dtype(args, config, dtype_name: str) -> None:
  features = make_features(args.pool, args.dim, jnp.dtype(dtype_name))
  engine = runner.Engine(config)
  state = end_of_run_state(features, categories=args.categories)
  rng = np.random.default_rng(0)
  warm = rare_jax_round(engine, state, features, rng)  # compile + a first fit
  jax.block_until_ready(warm)
  # The timed round starts from a warm model, as every round after the first does.
  warm = warm.replace(round=warm.round + 1)
  ours, after = time_it(rare_jax_round, engine, warm, features, rng, repeats=2)
  pseudo = np.asarray(after.pseudo_negative.sum(1))
  floor_fn = jax.jit(floor_pass)
  weights = after.linear.weights
  floor_fn(features, weights).block_until_ready()
  floor, _ = time_it(floor_fn, features, weights, repeats=3)
  print(
    f"[{dtype_name}] pseudo-negatives per category: {pseudo.min()}-{pseudo.max()}; "
    f"compilations: {engine.compilations()}"
  )
  print(
    f"[{dtype_name}] rare_jax round: {ours:.3f}s | floor (one matmul pass): {floor:.3f}s "
    f"| round/floor = {ours / floor:.2f}x",
    flush=True,
  )
  if args.skip_baseline:
    return
  features_np = np.asarray(features)
  if features_np.dtype != np.float32:
    features_np = features_np.astype(np.float32)  # sklearn/numpy work in float32
  del features
  baseline, _ = time_it(
    baseline_round,
    warm,
    features_np,
    batch_size=args.batch_size,
    factor=100.0,
    l2=1.0,
    rng=np.random.default_rng(0),
  )
  print(
    f"[{dtype_name}] baseline (sklearn + numpy): {baseline:.3f}s | "
    f"speed-up = {baseline / ours:.2f}x",
    flush=True,
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--pool", type=int, default=1_000_000)
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--categories", type=int, default=10)
  parser.add_argument("--batch_size", type=int, default=10)
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--skip_baseline", action="store_true")
  args = parser.parse_args()
  print(
    f"devices: {jax.devices()}; pool {args.pool} x dim {args.dim}, {args.categories} categories"
  )
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
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"peak resident memory (host): {peak:.1f} GiB")


if __name__ == "__main__":
  main()
