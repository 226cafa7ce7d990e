"""Times `rare_jax.active.linear.fit_logistic_batched` against scikit-learn, per category.

The shape is the end of a paper-configuration run: C = 10 categories, each with about 500 labels
and 9,500 pseudo-negatives, padded to N = 10,240 rows, D = 2048 features (f32 and bf16). A cold
start (zeros) and a warm start (from the model fitted on the previous round's training set: the
same labels but 10 fewer, and a fresh draw of pseudo-negatives) are timed, against
`sklearn.linear_model.LogisticRegression(C=1/l2, solver="lbfgs")` fitted per category on the
unpadded rows (f64), at its default tol=1e-4 and at rare_jax's default 1e-6 (same meaning).

Run (on CPU add `--solvers active_lbfgs,lbfgs --sklearn-categories 2`: Newton and sklearn are
slow there):
  python benchmarks/linear_fit.py [--categories 10 --rows 10240 --dim 2048]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rare_jax.active import linear  # noqa: E402
from rare_jax.infra import provenance  # noqa: E402


def make_labeled(rng, *, categories, labels, dim, basis, prototypes):
  """Each category's labeled examples: 1 in 5 positive, half the negatives hard (near them)."""
  latent_dim = basis.shape[0]
  positives = labels // 5
  out = []
  for c in range(categories):
    latent = rng.standard_normal((labels, latent_dim)).astype(np.float32)
    latent[:positives] += prototypes[c]
    hard = rng.random((labels - positives, 1)) < 0.5
    latent[positives:] += 0.5 * prototypes[c] * hard
    targets = np.zeros(labels, np.float32)
    targets[:positives] = 1
    order = rng.permutation(labels)  # label arrival order: positives and negatives mixed
    out.append((_embed(rng, latent, basis)[order], targets[order]))
  return out


def _embed(rng, latent, basis):
  noise = 0.3 * rng.standard_normal((latent.shape[0], basis.shape[1])).astype(np.float32)
  return np.maximum(latent @ basis + noise, 0)  # post-ReLU-like, non-negative


def make_round(rng, labeled, *, num_labels, pseudo_negatives, rows, basis):
  """One round's padded training sets: features [C, N, D], labels [C, N], weights [C, N].

  The first `num_labels` labeled examples of each category and a fresh draw of
  `pseudo_negatives` pseudo-negatives (weight 1, label 0), then padding (weight 0).
  """
  used = num_labels + pseudo_negatives
  if used > rows:
    raise ValueError(f"num_labels + pseudo_negatives = {used}; expected <= rows = {rows}")
  categories, dim = len(labeled), basis.shape[1]
  features = np.zeros((categories, rows, dim), np.float32)
  targets = np.zeros((categories, rows), np.float32)
  weights = np.zeros((categories, rows), np.float32)
  for c, (labeled_x, labeled_y) in enumerate(labeled):
    features[c, :num_labels] = labeled_x[:num_labels]
    targets[c, :num_labels] = labeled_y[:num_labels]
    latent = rng.standard_normal((pseudo_negatives, basis.shape[0])).astype(np.float32)
    features[c, num_labels:used] = _embed(rng, latent, basis)
    weights[c, :used] = 1
  return features, targets, weights


def timed(fn, *args, repeats):
  """Median wall time of `fn(*args)` after a warm-up (compile) call; also its last output."""
  out = jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)), out


def sklearn_fit(features, targets, weights, *, l2, tol, categories):
  """Per-category sklearn fits on the unpadded rows: (seconds, iterations, [(coef, bias)])."""
  from sklearn.linear_model import LogisticRegression

  start = time.perf_counter()
  iters, models = [], []
  for c in range(categories):
    keep = weights[c] > 0
    clf = LogisticRegression(C=1 / l2, solver="lbfgs", tol=tol, max_iter=10_000)
    clf.fit(features[c, keep].astype(np.float64), targets[c, keep], sample_weight=weights[c, keep])
    iters.append(int(clf.n_iter_[0]))
    models.append((clf.coef_[0], float(clf.intercept_[0])))
  return time.perf_counter() - start, iters, models


def objective(features, targets, weights, coef, bias, l2):
  """sum_i w_i logloss_i + l2/2 ||coef||^2, divided by sum(w) (f64)."""
  logits = features.astype(np.float64) @ np.asarray(coef, np.float64) + bias
  losses = np.logaddexp(0, logits) - targets * logits
  return float((weights @ losses + 0.5 * l2 * np.dot(coef, coef)) / weights.sum())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--categories", type=int, default=10)
  parser.add_argument("--rows", type=int, default=10_240)
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--labels", type=int, default=500)
  parser.add_argument("--pseudo-negatives", type=int, default=9_500)
  parser.add_argument("--l2", type=float, default=1.0)
  parser.add_argument("--tols", default="1e-4,1e-6", help="1e-4: sklearn default; 1e-6: ours")
  parser.add_argument("--max-iters", type=int, default=500)
  parser.add_argument("--solvers", default="active_lbfgs,lbfgs,newton")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
    "--sklearn-categories",
    type=int,
    default=None,
    help="fit sklearn on this many categories and scale its time to all (default: all)",
  )
  args = parser.parse_args()
  print(f"provenance: {provenance.one_line()}")
  tols = sorted((float(t) for t in args.tols.split(",")), reverse=True)
  print(
    f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
    f"{os.cpu_count()} CPUs"
  )
  print(
    f"C={args.categories} N={args.rows} D={args.dim} labels={args.labels} "
    f"pseudo_negatives={args.pseudo_negatives} l2={args.l2} tols={tols}"
  )

  rng = np.random.default_rng(0)
  latent_dim = 64
  basis = (rng.standard_normal((latent_dim, args.dim)) / np.sqrt(latent_dim)).astype(np.float32)
  prototypes = 0.4 * rng.standard_normal((args.categories, latent_dim)).astype(np.float32)
  labeled = make_labeled(
    rng,
    categories=args.categories,
    labels=args.labels,
    dim=args.dim,
    basis=basis,
    prototypes=prototypes,
  )
  shape = dict(pseudo_negatives=args.pseudo_negatives, rows=args.rows, basis=basis)
  previous = make_round(rng, labeled, num_labels=args.labels - 10, **shape)
  current = make_round(rng, labeled, num_labels=args.labels, **shape)
  print(f"training features: {current[0].nbytes / 1e9:.2f} GB in f32")

  results, fitted = {}, {}
  for dtype_name in args.dtypes.split(","):
    dtype = jnp.dtype(dtype_name)
    x, prev_x = jnp.asarray(current[0], dtype), jnp.asarray(previous[0], dtype)
    y, w = jnp.asarray(current[1]), jnp.asarray(current[2])
    prev_y, prev_w = jnp.asarray(previous[1]), jnp.asarray(previous[2])
    # One matmul pass over the training features: the unit of cost.
    one_pass = jax.jit(
      lambda x, v: jnp.einsum(
        "cnd,cd->cn", x, v.astype(x.dtype), preferred_element_type=jnp.float32
      )
    )
    pass_time, _ = timed(one_pass, x, jnp.ones((args.categories, args.dim)), repeats=args.repeats)
    print(f"\n[{dtype_name}] one pass over [C, N, D] (X @ v): {pass_time * 1e3:.2f} ms")
    zeros = linear.init_model(args.dim, batch_shape=(args.categories,))
    for solver in args.solvers.split(","):
      for tol in tols:
        options = dict(l2=args.l2, tol=tol, max_iters=args.max_iters, solver=solver)
        fit = jax.jit(
          lambda x, y, w, init, options=options: linear.fit_logistic_batched_with_info(
            x, y, w, init=init, **options
          )
        )
        start = time.perf_counter()
        jax.block_until_ready(fit(x, y, w, zeros))
        first_call = time.perf_counter() - start
        prev_model, _ = fit(prev_x, prev_y, prev_w, zeros)
        cold_time, (cold_model, cold_info) = timed(fit, x, y, w, zeros, repeats=args.repeats)
        warm_time, (_, warm_info) = timed(fit, x, y, w, prev_model, repeats=args.repeats)
        results[(dtype_name, solver, tol)] = (cold_time, warm_time)
        fitted[(dtype_name, solver, tol)] = jax.device_get(cold_model)
        print(
          f"[{dtype_name} {solver} tol={tol:g}] first call {first_call:6.2f} s | cold "
          f"{cold_time * 1e3:8.1f} ms = {cold_time / pass_time:5.1f} passes, max iters "
          f"{int(np.max(cold_info.num_iters)):3d} | warm {warm_time * 1e3:8.1f} ms = "
          f"{warm_time / pass_time:5.1f} passes, max iters {int(np.max(warm_info.num_iters)):3d}"
          f" | converged {bool(np.all(cold_info.converged))}/{bool(np.all(warm_info.converged))}"
        )

    # decision_function accuracy: stored features (exact in f64) times the f32 weights.
    model = fitted[(dtype_name, args.solvers.split(",")[0], tols[-1])]
    logits = np.asarray(jax.jit(linear.decision_function)(x[0], model))
    exact = np.asarray(x[0], np.float64) @ np.asarray(model.weights, np.float64).T
    exact += np.asarray(model.bias, np.float64)
    print(
      f"[{dtype_name}] decision_function [N, D] x [C, D]: max |logit error| vs f64 "
      f"{np.abs(logits - exact).max():.1e} (logits up to {np.abs(exact).max():.1f})"
    )

  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    print(f"peak device memory: {stats['peak_bytes_in_use'] / 1e9:.2f} GB")

  sk_categories = args.sklearn_categories or args.categories
  print(
    f"\nsklearn LogisticRegression(lbfgs, f64, {sk_categories} of {args.categories} "
    "categories, time scaled to all):"
  )
  for tol in tols:
    sk_time, iters, sk_models = sklearn_fit(*current, l2=args.l2, tol=tol, categories=sk_categories)
    sk_time *= args.categories / sk_categories
    print(f"  tol={tol:g}: {sk_time:8.2f} s, iters {iters}")
    for (dtype_name, solver, our_tol), (cold_time, warm_time) in results.items():
      if our_tol != tol:
        continue
      model = fitted[(dtype_name, solver, tol)]
      gaps = []
      for c, (coef, bias) in enumerate(sk_models):
        data = [a[c] for a in current]
        theirs = objective(*data, coef, bias, args.l2)
        ours = objective(*data, np.asarray(model.weights[c]), float(model.bias[c]), args.l2)
        gaps.append((ours - theirs) / theirs)
      print(
        f"    rare_jax [{dtype_name} {solver}] cold {sk_time / cold_time:7.1f}x, warm "
        f"{sk_time / warm_time:7.1f}x faster; objective rel. to sklearn's "
        f"{min(gaps):+.1e}..{max(gaps):+.1e}"
      )


if __name__ == "__main__":
  main()
