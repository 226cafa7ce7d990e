r"""Times active-loop rounds at paper scale against a scikit-learn/numpy baseline.

    python benchmarks/loop_round.py [--pool=1000000 --dim=2048 --dtypes=float32,bfloat16]
                                    [--repeats=5] [--breakdown] [--skip_baseline]

State as at the end of a paper-configuration run: per category 50 positives and 455 negatives
labeled (505 labels) and about 9,500 pseudo-negatives; two warm-up rounds (`--warmup_rounds`),
so that the timed rounds start, like every later round of a run, from a linear model fitted on
pseudo-negatives of a linear ranking. Then `--repeats` consecutive rounds are timed, each from
the state the previous one returned (as a run goes), each followed by a timed floor pass.
Prints, per feature dtype: (1) rare_jax's rounds (jitted query
+ observe: answers, pseudo-negatives, logistic regressions, re-scoring the pool), (2) the
baseline from the same starting states: sklearn LogisticRegression (lbfgs) per category + numpy
scoring + argsort rankings + numpy sampling, in its own process on the same features, (3) the
floor: one jitted pass of `features @ weights.T` over the pool; then the ratios of the totals
(and of the first round alone) and each process's peak resident memory against the feature
matrix (8 GiB at the default float32 size; the features are never copied). Compilation is
excluded (the warm-up rounds compile). `--breakdown` also times the first round's parts one by
one against the floor (query, pseudo-negatives, training-set ids, the gather of the training
sets into fresh memory and into a reused buffer, the logistic regressions warm and cold with
their iterations, by the loop's solver and by L-BFGS, the re-scoring), to show where a round
above the floor goes. Not a test: numbers depend on the machine (and its load, printed).
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

import rare_jax
from rare_jax.active import linear, loop, runner, select
from rare_jax.infra import provenance


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


def breakdown(engine, state, features, floor: float, rng) -> None:
  """Times the parts of one round separately (each jitted alone, so they add up to a little
  more than the fused round) and prints them against the floor, with the fits' iterations."""
  config = engine.config
  ids = np.asarray(engine.query(state))
  answers = jnp.asarray(rng.random(ids.shape) < 0.1)
  num_positive, num_negative = jax.device_get(loop.label_counts(state.labels))
  train_size = loop.required_train_size(
    num_positive + np.asarray(answers).sum(1),
    num_negative + (~np.asarray(answers)).sum(1),
    state.pool_size,
    config=config,
  )

  @jax.jit
  def pseudo_negatives(state, ids, answers):
    labels = state.labels.at[jnp.arange(ids.shape[0])[:, None], ids].set(answers.astype(jnp.int8))
    num = select.num_pseudo_negatives(*loop.label_counts(labels), config.pseudo_negative_factor)
    return labels, select.pseudo_negatives(
      loop.pseudo_negative_key(state),
      scores=state.scores,
      unlabeled=labels < 0,
      num=num,
      max_num=train_size,
    )

  labels, pseudo = pseudo_negatives(state, ids, answers)
  training_set = jax.jit(loop.training_set, static_argnums=2)
  train_ids, member = training_set(labels, pseudo, train_size)
  gather = jax.jit(lambda features, ids: features[ids])
  rows = gather(features, train_ids)
  donated = jax.jit(
    lambda features, ids, buffer: jax.lax.dynamic_update_slice(buffer, features[ids], (0, 0, 0)),
    donate_argnums=2,
  )
  buffers = [jnp.zeros_like(rows)]

  def gather_into_reused_buffer(features, ids):  # as Engine.step on a CPU
    buffers.append(donated(features, ids, buffers.pop()))
    return buffers[-1]

  targets = (jnp.take_along_axis(labels, train_ids, axis=-1) == 1).astype(jnp.float32)

  def fitter(solver):
    return jax.jit(
      lambda rows, targets, weights, init, margins: linear.fit_logistic_batched_with_info(
        rows,
        targets,
        weights,
        l2=config.l2,
        init=init,
        max_iters=config.max_iters,
        tol=config.tol,
        init_margins=margins,
        solver=solver,
      )
    )

  fit, lbfgs = fitter("active_lbfgs"), fitter("lbfgs")  # the loop's solver, the previous one
  weights = member.astype(jnp.float32)
  warm, margins = loop.warm_start(state, train_ids)  # as observe starts its fits
  cold = linear.init_model(rows.shape[2], batch_shape=rows.shape[:1])
  zeros = jnp.zeros(train_ids.shape)
  one_pass = jax.jit(lambda rows, v: jnp.einsum("cnd,cd->cn", rows, v))
  score = jax.jit(lambda features, model: linear.decision_function(features, model))
  parts = [
    ("one pass over the training sets (X d)", one_pass, (rows, state.linear.weights)),
    ("query (priorities, top-B)", engine.query, (state,)),
    (
      "answers in, pseudo-negatives (bottom half by radix selection, draw by ranks)",
      pseudo_negatives,
      (state, ids, answers),
    ),
    ("training-set ids (packed words)", training_set, (labels, pseudo, train_size)),
    (f"gather the training sets {tuple(rows.shape)}, fresh", gather, (features, train_ids)),
    ("the same gather into a reused buffer", gather_into_reused_buffer, (features, train_ids)),
    ("logistic regressions, warm start", fit, (rows, targets, weights, warm, margins)),
    ("the same by L-BFGS", lbfgs, (rows, targets, weights, warm, margins)),
    ("logistic regressions, cold start", fit, (rows, targets, weights, cold, zeros)),
    ("the same by L-BFGS", lbfgs, (rows, targets, weights, cold, zeros)),
    ("re-score the pool (decision_function)", score, (features, state.linear)),
  ]
  print(
    f"breakdown (each part jitted alone; training sets {rows.nbytes / 2**30:.2f} GiB, "
    f"{int(weights.sum(1).min())}-{int(weights.sum(1).max())} valid rows of {rows.shape[1]}):"
  )
  pass_seconds = None
  for name, fn, args in parts:
    seconds, result = time_it(fn, *args, repeats=2)
    pass_seconds = pass_seconds or seconds
    line = f"  {name}: {seconds:.3f}s = {seconds / floor:.2f}x the floor"
    if fn in (fit, lbfgs):
      # The batched solver runs until the slowest category converges: 1 pass to start (the
      # centring mean and the gradient's X^T r together; the margins are given), 1 more for
      # active_lbfgs (the rows' squared norms), then 2 per iteration (X d, then X^T r);
      # active_lbfgs's iterations also build a 256 x 256 Gram matrix per category.
      iters = np.asarray(result[1].num_iters)
      passes = (1 if fn is lbfgs else 2) + 2 * int(iters.max())
      line += (
        f"; iterations per category {iters.min()}-{iters.max()}, i.e. {passes} passes: "
        f"{seconds / passes:.3f}s each = {seconds / passes / pass_seconds:.2f}x one X d pass"
      )
    print(line, flush=True)


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
  # Warm-up rounds: compilation, a first (cold) fit on pseudo-negatives from the bottom of the
  # cosine ranking, then (from 2 on) fits warm-started and drawn from the linear ranking.
  warm = state
  for _ in range(args.warmup_rounds):
    warm = rare_jax_round(engine, warm, features, rng)
  jax.block_until_ready(warm)
  del state
  # The timed rounds start from a warm model, as every round after the first does, and follow
  # each other as in a run (each from the state the previous one returned); each is followed
  # by a timed floor pass, so that both see the same machine (shared machines drift). Each
  # round's starting state is saved for the baseline, which times its round from the same one.
  floor_fn = jax.jit(floor_pass)
  floor_fn(features, warm.linear.weights).block_until_ready()
  rounds, floors, state, pseudo = [], [], warm, []
  compiled = engine.compilations()
  with tempfile.TemporaryDirectory() as tmp:
    state_paths = []
    for index in range(args.repeats):
      state_paths.append(os.path.join(tmp, f"state_{index}.npz"))
      np.savez(state_paths[-1], labels=np.asarray(state.labels), scores=np.asarray(state.scores))
      seconds, state = time_it(rare_jax_round, engine, state, features, rng)
      rounds.append(seconds)
      pseudo.append(np.asarray(state.pseudo_negative.sum(1)))
      floors.append(time_it(floor_fn, features, state.linear.weights)[0])
    if engine.compilations() != compiled:
      print(f"note: the timed rounds compiled {engine.compilations() - compiled} new variant(s)")
    pseudo = np.concatenate(pseudo)
    ours, floor = sum(rounds), sum(floors)
    peak = peak_rss_gib()
    print(
      f"[{dtype_name}] {args.repeats} consecutive rounds from the warm state: pseudo-negatives "
      f"per category {pseudo.min()}-{pseudo.max()}; compilations: {engine.compilations()}"
    )
    print(f"[{dtype_name}]   rare_jax round (s):  {' '.join(f'{t:6.3f}' for t in rounds)}")
    print(f"[{dtype_name}]   floor pass (s):      {' '.join(f'{t:6.3f}' for t in floors)}")
    print(
      f"[{dtype_name}] rare_jax rounds: {ours:.3f}s | floor (one matmul pass after each): "
      f"{floor:.3f}s | round/floor = {ours / floor:.2f}x (first round "
      f"{rounds[0] / floors[0]:.2f}x) | peak RSS so far {peak:.2f} GiB = "
      f"{peak / feature_gib:.2f}x the features ({feature_gib:.2f} GiB)",
      flush=True,
    )
    if args.breakdown:
      breakdown(engine, warm, features, floors[0], rng)
    if args.skip_baseline:
      return
    # The baseline runs in its own process on the same features (regenerated from the seed),
    # so that neither holds two feature matrices and each peak RSS is its own.
    engine.release_rows()
    del features, warm, state
    command = [sys.executable, __file__, f"--baseline_state={','.join(state_paths)}"]
    command += [f"--dtypes={dtype_name}", f"--pool={args.pool}", f"--dim={args.dim}"]
    command += [f"--batch_size={args.batch_size}"]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
  measured = json.loads(result.stdout.strip().splitlines()[-1])
  baselines = measured["seconds"]
  baseline = sum(baselines)
  print(f"[{dtype_name}]   baseline round (s):  {' '.join(f'{t:6.3f}' for t in baselines)}")
  print(
    f"[{dtype_name}] baseline (sklearn + numpy, own process, same {args.repeats} starting "
    f"states): {baseline:.3f}s, peak RSS {measured['peak_rss_gib']:.2f} GiB | speed-up = "
    f"{baseline / ours:.2f}x (first round {baselines[0] / rounds[0]:.2f}x) | round/floor = "
    f"{ours / floor:.2f}x | rare_jax peak RSS {peak:.2f} GiB = {peak / feature_gib:.2f}x the "
    "features",
    flush=True,
  )


def run_baseline(args) -> None:
  """The child process of `bench_dtype`: times `baseline_round` from each saved state, prints
  one JSON line."""
  (dtype_name,) = args.dtypes.split(",")
  features = make_features(args.pool, args.dim, jnp.dtype(dtype_name))
  features_np = np.asarray(features)  # zero-copy on the CPU
  if features_np.dtype != np.float32:
    features_np = features_np.astype(np.float32)  # sklearn/numpy work in float32
    del features
  seconds = []
  for path in args.baseline_state.split(","):
    with np.load(path) as saved:
      state = types.SimpleNamespace(labels=saved["labels"], scores=saved["scores"])
    elapsed, _ = time_it(
      baseline_round,
      state,
      features_np,
      batch_size=args.batch_size,
      factor=100.0,
      l2=1.0,
      rng=np.random.default_rng(0),
    )
    seconds.append(elapsed)
  print(json.dumps({"seconds": seconds, "peak_rss_gib": peak_rss_gib()}))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--pool", type=int, default=1_000_000)
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--categories", type=int, default=10)
  parser.add_argument("--batch_size", type=int, default=10)
  parser.add_argument("--dtypes", default="float32")
  parser.add_argument(
    "--warmup_rounds",
    type=int,
    default=2,
    help="rounds before the timed one (>= 1). With 1 the timed round warm-starts from a model "
    "fitted on the cosine ranking's pseudo-negatives, which only a run's second round does",
  )
  parser.add_argument(
    "--repeats",
    type=int,
    default=5,
    help="consecutive rounds timed (each also by the baseline, from the same state), >= 1",
  )
  parser.add_argument("--skip_baseline", action="store_true")
  parser.add_argument(
    "--breakdown",
    action="store_true",
    help="also time the round's parts (peak memory 2.7 GiB more at the default size: 12.4 GiB)",
  )
  parser.add_argument("--baseline_state", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.repeats < 1:
    parser.error(f"--repeats={args.repeats}; expected >= 1")
  if args.warmup_rounds < 1:
    parser.error(f"--warmup_rounds={args.warmup_rounds}; expected >= 1 (the first compiles)")
  if args.baseline_state:
    run_baseline(args)
    return
  # `python benchmarks/loop_round.py` puts benchmarks/ first on sys.path, not the checkout: run
  # with PYTHONPATH=. to time a worktree's rare_jax rather than the installed one.
  print(f"rare_jax: {os.path.dirname(rare_jax.__file__)}")
  print(f"provenance: {provenance.one_line()}")
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
