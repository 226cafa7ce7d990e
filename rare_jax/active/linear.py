"""L2-regularised logistic regression on cached features, fitted by a full-batch solver.

The fit runs entirely inside `jax.lax.while_loop`, so a caller can `jax.jit` it (and `vmap` it
over categories: `fit_logistic_batched`). It minimises, per category,

    sum_i example_weights_i * logloss(labels_i, x_i . w + b) + 0.5 * l2 * ||w||^2

(the bias is not penalised), which has the same minimiser as scikit-learn's
`LogisticRegression(C=1 / l2, solver="lbfgs").fit(x, y, sample_weight=example_weights)`.
Internally the objective is divided by `sum(example_weights)` (as scikit-learn does), and `tol`
bounds the max-abs gradient of that scaled objective, which is scikit-learn's `tol` too.
Rows with weight 0 are padding and never change the result, so training sets can be padded to
`bucket_size` rows and one compilation serves many rounds.

Three solvers share an exact line search that costs no pass over the features: for a linear
model the margins along a direction are `z + alpha * u`, so once `u = X d` is known every trial
step is O(N). Each iteration then takes the gradient (`X^T r`): 2 passes per iteration.
- `"active_lbfgs"` (default): L-BFGS (memory 10) whose initial inverse-Hessian estimate is
  recomputed every iteration from the Hessian at the current model with only its
  `_ACTIVE_ROWS` (256) rows of largest curvature `weight * p (1 - p)` exact and the rest (in
  a loop round, thousands of easy pseudo-negatives) counted as the multiple of the identity
  with their trace, inverted by the Woodbury identity (a 256 x 256 Gram matrix of the gathered rows
  and its Cholesky factor: no pass over the features, but about one pass's worth of time per
  iteration on a 2-core CPU at D = 2048), plus one pass per fit (the rows' squared norms).
  The curvature of a warm-started fit sits in a few hundred rows, so it needs far fewer
  iterations. Measured on this project's 2-core CPU at tol 1e-6, C = 10, D = 2048, with
  scipy's LAPACK on one thread (`_one_lapack_thread`): on one saved round of a
  `benchmarks/loop_round.py`-shaped run (N = 12,288, random features) warm 3-4 iterations
  instead of 7-15 (0.25-0.27 s vs 0.56-0.59 s), cold 17-19 instead of 23-26 (1.02 vs 0.97-0.98
  s); on `benchmarks/linear_fit.py`'s clustered features (N = 10,240) warm 13 instead of 51
  (0.79 vs 1.87 s), cold 24 instead of 67 (1.44 vs 2.82 s). At tol 1e-4 they were even warm
  (0.41 vs 0.43 s) and plain L-BFGS faster cold (0.69 vs 0.96 s).
  The identity part has a floor (`_ACTIVE_FLOOR` of the mean curvature per coordinate) that
  keeps the small system well conditioned in f32 when the penalty is tiny, and an iteration
  whose direction is not finite or does not descend takes steepest descent instead.
- `"lbfgs"`: L-BFGS (memory 10).
- `"newton"`: forms the (D+1)^2 Hessian each iteration (a D-times heavier matmul, in low
  precision for bf16 features) and converges in a handful of iterations. At C=10, N=10,240,
  D=2048 it measured 2.5-7x slower than L-BFGS on an H200 and far slower on CPUs
  (`benchmarks/linear_fit.py`); it is there for small D and as a cross-check.
Features are centred internally by their weighted mean (an exact reparametrisation of the
unpenalised bias) to decouple the bias from the weights.

bf16 features are not upcast in memory on accelerators: products with f32 vectors split the
vector into three bf16 parts stacked as columns of one matmul with f32 accumulation, which keeps
f32 accuracy at the memory cost of a single bf16 pass. (On CPU, where XLA's bf16 products are
slow, the fit takes one f32 copy of its training features instead.)
"""

from __future__ import annotations

import functools
import math
import os
import threading

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

SOLVERS = ("active_lbfgs", "lbfgs", "newton")

_LBFGS_MEMORY = 10
# The unpenalised bias gets this fraction of the penalty as a ridge in the Newton Hessian and
# in active_lbfgs's estimate: it keeps them invertible when every example saturates, and only
# shapes directions (the line search and the gradient stay exact).
_BIAS_RIDGE = 1e-3
# Rows of the "active_lbfgs" Hessian that are exact (`_active_hessian_inverse`).
_ACTIVE_ROWS = 256
# The smallest diagonal entry of that Hessian's identity part, relative to the mean curvature
# per coordinate (`_active_hessian_inverse`).
_ACTIVE_FLOOR = 1e-3
_LINE_SEARCH_STEPS = 20
# The line search stops once |phi'(alpha)| <= _LINE_SEARCH_RTOL * |phi'(0)|: nearly exact.
_LINE_SEARCH_RTOL = 1e-2


@flax.struct.dataclass
class LinearModel:
  """Logistic-regression parameters; leading axes (e.g. categories) are shared by both fields.

  Attributes:
    weights: `[..., D]`.
    bias: `[...]`.
  """

  weights: jax.Array
  bias: jax.Array


@flax.struct.dataclass
class FitInfo:
  """How a fit ended (per category when batched).

  Attributes:
    num_iters: solver iterations run (each costs 2 passes over the features for "lbfgs" and
      "active_lbfgs"; see the module docstring).
    grad_norm: max-abs gradient of the objective divided by `sum(example_weights)`.
    converged: `grad_norm <= tol`.
    objective: the objective divided by `sum(example_weights)` at the returned model.
  """

  num_iters: jax.Array
  grad_norm: jax.Array
  converged: jax.Array
  objective: jax.Array


def init_model(num_features: int, *, batch_shape: tuple[int, ...] = (), dtype=jnp.float32):
  """An all-zeros `LinearModel` (pass it as `init` to keep one pytree structure per compile)."""
  if num_features < 1:
    raise ValueError(f"num_features={num_features}; expected a positive int")
  return LinearModel(
    weights=jnp.zeros((*batch_shape, num_features), dtype), bias=jnp.zeros(batch_shape, dtype)
  )


def bucket_size(n: int, *, minimum: int = 64, steps_per_octave: int = 2) -> int:
  """The padded row count for a training set of `n` rows.

  Sizes are `2^k * (1 + j / steps_per_octave)`: with the default 2 these are powers of two and
  1.5 times powers of two (64, 96, 128, 192, ...), wasting at most a third of the rows while a
  run that grows from tens to tens of thousands of rows compiles about 2 times per doubling.

  Args:
    n: rows that must fit (>= 0).
    minimum: the smallest bucket (>= 1).
    steps_per_octave: buckets per doubling: 1, 2 or 4.

  Returns:
    The smallest bucket >= max(n, minimum).
  """
  if n < 0:
    raise ValueError(f"n={n}; expected a row count >= 0")
  if minimum < 1:
    raise ValueError(f"minimum={minimum}; expected a positive int")
  if steps_per_octave not in (1, 2, 4):
    raise ValueError(f"steps_per_octave={steps_per_octave}; expected 1, 2 or 4")
  target = max(n, minimum)
  octave = 1 << max(0, (target - 1).bit_length() - 1)  # largest power of two < target (or 1)
  while True:
    for step in range(steps_per_octave + 1):
      size = octave + (octave * step) // steps_per_octave
      if size >= target and (octave * step) % steps_per_octave == 0:
        return size
    octave *= 2


def check_finite(features, *, name: str = "features", chunk_rows: int = 65536) -> None:
  """Raises ValueError if `features` holds NaN or inf (host-side; call before jitting a fit).

  Works on numpy arrays (in row chunks, so memory-mapped stores are not loaded whole) and on
  jax arrays (reduced on device, one scalar comes back).
  """
  if isinstance(features, jax.Array):
    bad = int(jnp.sum(~jnp.isfinite(features)))
  else:
    array = np.asarray(features)
    flat = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1)
    bad = 0
    for start in range(0, flat.shape[0], chunk_rows):
      bad += int(np.count_nonzero(~np.isfinite(flat[start : start + chunk_rows])))
  if bad:
    raise ValueError(
      f"{name} of shape {tuple(features.shape)} holds {bad} NaN/inf values; expected all finite"
    )


# ----------------------------------------------------------------------------------------------
# Products with the features. Accurate to the compute dtype whatever the storage dtype.


def _compute_dtype(features_dtype) -> jnp.dtype:
  return jnp.promote_types(features_dtype, jnp.float32)


def _truncate_to_bfloat16(values: jax.Array) -> jax.Array:
  """f32 values with the low 16 bits cleared: exactly representable in bf16."""
  bits = lax.bitcast_convert_type(values, jnp.uint32)
  return lax.bitcast_convert_type(bits & jnp.uint32(0xFFFF0000), jnp.float32)


def _split_bfloat16(vectors: jax.Array) -> jax.Array:
  """Splits f32 `[..., K]` exactly into 3 bf16 parts: `[..., 3K]` (hi, mid, lo blocks).

  Bit masks rather than `f32 -> bf16 -> f32` round trips: XLA (with its default
  `xla_allow_excess_precision`) may fold such a round trip to the identity, which on GPU
  silently left only the rounded `hi` part (logit errors of 3e-2 instead of 1e-5).
  """
  vectors = vectors.astype(jnp.float32)
  hi = _truncate_to_bfloat16(vectors)
  rest = vectors - hi  # exact: the low 16 bits of the significand
  mid = _truncate_to_bfloat16(rest)
  lo = rest - mid  # exact, and at most 8 significant bits: representable in bf16
  return jnp.concatenate([hi, mid, lo], axis=-1).astype(jnp.bfloat16)


# XLA:CPU runs a product that contracts the rows of a tall operand (`X^T r`, `[N, D] x [N]`)
# about 1.4x slower than `X d` over the same bytes (37.6 vs 26.9 ms at [10, 12288, 2048] f32 on
# this project's 2-core CPU machine). Split into blocks of `_ROW_BLOCK` rows, one batched
# product of the blocks whose partial sums are then added, it runs at `X d`'s speed (24.4 ms).
# Only the summation order differs (float rounding). Applies to the f32/f64 products, which on
# CPU include the fits of bf16 and f16 features (upcast to f32 first).
_ROW_BLOCK = 256


def _row_block(num_rows: int) -> int:
  """Rows per block for f32/f64 products that contract the rows on CPU; 0 for one product."""
  if jax.default_backend() != "cpu" or num_rows % _ROW_BLOCK or num_rows < 2 * _ROW_BLOCK:
    return 0
  return _ROW_BLOCK


def _exact_dot(lhs: jax.Array, rhs: jax.Array, dimension_numbers) -> jax.Array:
  """`lax.dot_general` at full precision, accumulated in the operands' (f32/f64) dtype."""
  return lax.dot_general(
    lhs, rhs, dimension_numbers, precision=lax.Precision.HIGHEST, preferred_element_type=lhs.dtype
  )


def features_times(
  features: jax.Array, columns: jax.Array, contract_rows: bool = False
) -> jax.Array:
  """`features @ columns` (`[N, D] x [D, K] -> [N, K]`) or `features.T @ columns` if
  `contract_rows` (`[N, K] -> [D, K]`), accumulated in the compute dtype."""
  out_dtype = _compute_dtype(features.dtype)
  contract = ((0,), (0,)) if contract_rows else ((1,), (0,))
  if features.dtype == jnp.bfloat16:
    k = columns.shape[-1]
    parts = _split_bfloat16(columns)
    product = lax.dot_general(
      features, parts, (contract, ((), ())), preferred_element_type=out_dtype
    )
    product = product.reshape(*product.shape[:-1], 3, k)
    return (product[..., 2, :] + product[..., 1, :]) + product[..., 0, :]
  # f32/f64 (and, upcast, other low-precision types such as f16).
  features, columns = features.astype(out_dtype), columns.astype(out_dtype)
  two_d = features.ndim == 2 and columns.ndim == 2
  block = _row_block(features.shape[0]) if contract_rows and two_d else 0
  if block:  # [N/B, B, D]^T x [N/B, B, K] -> [N/B, D, K] partial sums, then their sum
    blocks = features.shape[0] // block
    dims = (((1,), (1,)), ((0,), (0,)))
    return jnp.sum(
      _exact_dot(features.reshape(blocks, block, -1), columns.reshape(blocks, block, -1), dims),
      axis=0,
    )
  return _exact_dot(features, columns, (contract, ((), ())))


def _vectors_times_features(vectors: jax.Array, features: jax.Array) -> jax.Array:
  """`vectors @ features` (`[K, N] x [N, D] -> [K, D]`): K products over the rows in one pass.

  The vectors are the left operand: XLA:CPU runs `features.T @ vectors` with K = 2 through a
  path ~7x slower than one `features.T @ vector`, while this form costs about 1.1x it.
  """
  out_dtype = _compute_dtype(features.dtype)
  contract = (((vectors.ndim - 1,), (0,)), ((), ()))
  if features.dtype == jnp.bfloat16:
    k = vectors.shape[0]
    parts = _split_bfloat16(vectors.T).T  # [3K, N]: hi, mid, lo blocks
    product = lax.dot_general(parts, features, contract, preferred_element_type=out_dtype)
    return (product[2 * k :] + product[k : 2 * k]) + product[:k]
  vectors, features = vectors.astype(out_dtype), features.astype(out_dtype)
  block = _row_block(features.shape[0]) if vectors.ndim == 2 and features.ndim == 2 else 0
  if block:  # [K, N/B, B] x [N/B, B, D] -> [N/B, K, D] partial sums, then their sum
    blocks = features.shape[0] // block
    dims = (((2,), (1,)), ((1,), (0,)))
    return jnp.sum(
      _exact_dot(vectors.reshape(-1, blocks, block), features.reshape(blocks, block, -1), dims),
      axis=0,
    )
  return _exact_dot(vectors, features, contract)


def _matvec(features: jax.Array, vector: jax.Array) -> jax.Array:
  return features_times(features, vector[:, None], contract_rows=False)[:, 0]


def _rmatvec(features: jax.Array, vector: jax.Array) -> jax.Array:
  return features_times(features, vector[:, None], contract_rows=True)[:, 0]


def decision_function(features: jax.Array, model: LinearModel) -> jax.Array:
  """Logits `features @ weights.T + bias` in one matmul over the features.

  Args:
    features: `[P, D]`, any float dtype (bf16 features are accumulated in f32 at f32 accuracy).
    model: weights `[C, D]` and bias `[C]`, or weights `[D]` and a scalar bias.

  Returns:
    `[P, C]` logits (or `[P]` for a single model), in f32 (f64 for f64 inputs).
  """
  weights, bias = jnp.asarray(model.weights), jnp.asarray(model.bias)
  if features.ndim != 2:
    raise ValueError(f"features of shape {features.shape}; expected [P, D]")
  if weights.ndim not in (1, 2) or weights.shape[-1] != features.shape[1]:
    raise ValueError(
      f"model.weights of shape {weights.shape}; expected [C, {features.shape[1]}] or "
      f"[{features.shape[1]}] to match features {features.shape}"
    )
  if bias.shape != weights.shape[:-1]:
    raise ValueError(f"model.bias of shape {bias.shape}; expected {weights.shape[:-1]}")
  columns = weights.T if weights.ndim == 2 else weights[:, None]
  logits = features_times(features, columns, contract_rows=False)
  logits = logits + bias.astype(logits.dtype)
  return logits if weights.ndim == 2 else logits[:, 0]


def sigmoid(logits) -> np.ndarray:
  """float64 numpy sigmoid of logits on the host (every host-side score: predict, exports, the
  labeling and audit pages; jitted code uses `jax.nn.sigmoid`),
  from exp(-|x|): no overflow warning for very negative logits and their tiny probabilities kept
  (1 / (1 + exp(-x)) overflows below about -709 and rounds them to 0)."""
  logits = np.asarray(logits, np.float64)
  small = np.exp(-np.abs(logits))
  return np.where(logits >= 0, 1.0 / (1.0 + small), small / (1.0 + small))


def predict_proba(features: jax.Array, model: LinearModel) -> jax.Array:
  """`sigmoid(decision_function(features, model))`: `[P, C]` positive-class probabilities."""
  return jax.nn.sigmoid(decision_function(features, model))


# ----------------------------------------------------------------------------------------------
# The solver. All vectors below are of one category; `fit_logistic_batched` vmaps.


@flax.struct.dataclass
class _Problem:
  features: jax.Array  # [N, D] storage dtype
  labels: jax.Array  # [N] compute dtype, in [0, 1]
  weights: jax.Array  # [N] example weights / sum(example weights)
  mean: jax.Array  # [D] weighted feature mean (the centring)
  l2: jax.Array  # l2 / sum(example weights)

  def margins(self, w: jax.Array, b: jax.Array) -> jax.Array:
    """Centred margins `(X - mean) w + b`: one pass."""
    return _matvec(self.features, w) - jnp.dot(self.mean, w) + b

  def gradient(self, w: jax.Array, margins: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Gradient of the scaled objective in (w, centred bias): one pass."""
    residual = self.weights * (jax.nn.sigmoid(margins) - self.labels)
    total = jnp.sum(residual)
    grad_w = _rmatvec(self.features, residual) - self.mean * total + self.l2 * w
    return grad_w, total

  def objective(self, w: jax.Array, margins: jax.Array) -> jax.Array:
    losses = jax.nn.softplus(margins) - self.labels * margins
    return jnp.sum(self.weights * losses) + 0.5 * self.l2 * jnp.dot(w, w)


def _line_search(problem: _Problem, w, margins, direction_w, along):
  """Nearly exact minimisation of the (convex) objective along a direction.

  Safeguarded Newton on `alpha` with a bracket; each step is O(N) because the margins at
  `alpha` are `margins + alpha * along` with `along = X_c direction_w + direction_b`.

  Returns:
    `(alpha, slope_at_zero)`; alpha is 0 when the direction does not descend.
  """
  w_dot_d = jnp.dot(w, direction_w)
  d_dot_d = jnp.dot(direction_w, direction_w)

  def derivatives(alpha):
    probs = jax.nn.sigmoid(margins + alpha * along)
    weighted = problem.weights * along
    slope = jnp.sum(weighted * (probs - problem.labels)) + problem.l2 * (w_dot_d + alpha * d_dot_d)
    curvature = jnp.sum(weighted * along * probs * (1 - probs)) + problem.l2 * d_dot_d
    return slope, curvature

  slope0, _ = derivatives(jnp.zeros_like(w_dot_d))
  one = jnp.ones_like(slope0)
  tiny = jnp.finfo(slope0.dtype).tiny
  descends = slope0 < 0  # otherwise the search is skipped and alpha = 0

  def cond(carry):
    step, _, _, _, slope, _ = carry
    return (
      descends
      & (step < _LINE_SEARCH_STEPS)
      & (jnp.abs(slope) > _LINE_SEARCH_RTOL * jnp.abs(slope0))
    )

  def body(carry):
    step, alpha, low, high, slope, curvature = carry
    low = jnp.where(slope < 0, alpha, low)
    high = jnp.where(slope < 0, high, alpha)
    newton = alpha - slope / jnp.maximum(curvature, tiny)
    inside = (newton > low) & (newton < high) & jnp.isfinite(newton)
    fallback = jnp.where(jnp.isfinite(high), 0.5 * (low + high), 2 * jnp.maximum(alpha, one))
    alpha = jnp.where(inside, newton, fallback)
    slope, curvature = derivatives(alpha)
    return step + 1, alpha, low, high, slope, curvature

  slope1, curvature1 = derivatives(one)
  carry = (jnp.zeros((), jnp.int32), one, 0 * one, jnp.inf * one, slope1, curvature1)
  carry = lax.while_loop(cond, body, carry)
  alpha = jnp.where(descends, carry[1], 0 * one)
  return alpha, slope0


def _inverse_hessian_times(grad, s_hist, y_hist, count, newest, precondition):
  """The L-BFGS inverse-Hessian estimate times `grad` (a D+1 vector).

  The compact form of Byrd, Nocedal and Schnabel (1994) (Nocedal and Wright, eq. 7.24; their
  Theorem 2.2 for a general initial matrix) with the initial estimate `gamma * M^-1`:
  `precondition` applies `M^-1` to rows of vectors (the identity for plain L-BFGS) and
  `gamma = s.y / y.M^-1 y` of the newest pair. A few small matrix products and two m x m
  triangular solves instead of the two-loop recursion's 2m sequential steps, so nothing loops
  or unrolls (fast to compile, few kernels per step). Unused slots of the ring buffer are
  zeroed and given a unit diagonal in R, which makes them contribute nothing.
  """
  memory = s_hist.shape[0]
  order = (newest + 1 + jnp.arange(memory)) % memory  # oldest .. newest
  valid = jnp.arange(memory) >= memory - count
  s = jnp.where(valid[:, None], s_hist[order], 0)  # [m, D+1]
  y = jnp.where(valid[:, None], y_hist[order], 0)
  hy, h_grad = jnp.split(precondition(jnp.concatenate([y, grad[None]])), [memory])  # M^-1 y, g
  h_grad = h_grad[0]
  s_dot_y = s @ y.T  # [i, j] = s_i . y_j
  upper = jnp.triu(s_dot_y) + jnp.diag(jnp.where(valid, 0, 1).astype(s.dtype))
  y_new, s_new, hy_new = y[-1], s[-1], hy[-1]
  gamma = jnp.where(count > 0, jnp.dot(s_new, y_new) / jnp.dot(y_new, hy_new), 1.0)
  s_grad, hy_grad = s @ grad, hy @ grad
  solved = jax.scipy.linalg.solve_triangular(upper, s_grad, lower=False)  # R^-1 S^T g
  inner = jnp.diagonal(s_dot_y) * solved + gamma * ((y @ hy.T) @ solved) - gamma * hy_grad
  first = jax.scipy.linalg.solve_triangular(upper, inner, trans="T", lower=False)
  return gamma * h_grad + s.T @ first - gamma * (hy.T @ solved)


def _centred_squared_norms(problem: _Problem) -> jax.Array:
  """`[N]` squared norms of the centred rows `x_i - mean` (one pass), for
  `_active_hessian_inverse`'s trace of the rows it does not keep exactly."""
  features = problem.features.astype(problem.mean.dtype)
  return jnp.sum(jnp.square(features - problem.mean), axis=-1)


def _active_hessian_inverse(problem: _Problem, margins: jax.Array, squared_norms: jax.Array):
  """`V -> V M^-1` for rows `V` `[k, D+1]`: M approximates the Hessian at `margins`.

  In M the `_ACTIVE_ROWS` rows of largest curvature `weight * p * (1 - p)` (labelled images
  near the boundary, once a run is warm) are exact and the rest (thousands of easy
  pseudo-negatives) count as the multiple of the identity with their trace (`squared_norms`:
  the centred rows' squared norms), plus the penalty (on the unpenalised bias a tiny ridge, as
  in `_hessian`), each diagonal entry at least `_ACTIVE_FLOOR` of the mean curvature per
  coordinate. Inverted by the Woodbury identity: a `[a, a]` Gram matrix of the gathered rows
  and its Cholesky factor, no pass over the features.
  """
  features, dtype = problem.features, problem.mean.dtype
  num_rows, dim = features.shape
  probs = jax.nn.sigmoid(margins)
  curvature = problem.weights * probs * (1 - probs)
  _, top = lax.top_k(curvature, min(num_rows, _ACTIVE_ROWS))
  rest = curvature.at[top].set(0)
  diagonal = jnp.concatenate(
    [
      jnp.full((dim,), problem.l2 + jnp.dot(rest, squared_norms) / dim, dtype),
      (_BIAS_RIDGE * problem.l2 + jnp.sum(rest))[None],
    ]
  )
  # Floor: a fraction of the data's mean curvature per coordinate, so that I + U U^T below stays
  # well conditioned in f32 when the penalty is tiny next to the curvature and few rows are left
  # out (otherwise its Cholesky factor came out NaN for l2 = 1e-3 at N = 200, D = 64).
  mean_curvature = jnp.dot(curvature, squared_norms + 1) / (dim + 1)
  diagonal = jnp.maximum(diagonal, _ACTIVE_FLOOR * mean_curvature)
  centred = features[top].astype(dtype) - problem.mean
  rows = jnp.concatenate([centred, jnp.ones((top.shape[0], 1), dtype)], axis=1)
  # M = S (I + U^T U) S with S = diagonal^(1/2) and U = rows * curvature^(1/2) / S: the
  # symmetric form keeps the tiny bias ridge from turning M^-1 v into a difference of huge
  # numbers (whose rounding then depended on how XLA fused it: a mesh's program differed).
  root = lax.rsqrt(diagonal)
  scaled = rows * jnp.sqrt(curvature[top])[:, None] * root  # U, [a, D+1]
  gram = jnp.eye(top.shape[0], dtype=dtype) + _exact_dot(scaled, scaled, (((1,), (1,)), ((), ())))
  factor = jax.scipy.linalg.cho_factor(gram, lower=True)

  def apply(vectors):  # [k, D+1]
    vectors = vectors * root
    inner = jax.scipy.linalg.cho_solve(
      factor, _exact_dot(scaled, vectors, (((1,), (1,)), ((), ())))
    )  # [a, k]
    return (vectors - _exact_dot(inner, scaled, (((0,), (0,)), ((), ())))) * root

  return apply


def _fit_lbfgs(problem: _Problem, w0, b0, margins, grad_w, grad_b, *, max_iters, tol, active=False):
  """L-BFGS; with `active`, its initial matrix each iteration is `_active_hessian_inverse` at
  the current margins instead of a multiple of the identity."""
  dim = w0.shape[0] + 1
  dtype = w0.dtype
  zeros_hist = jnp.zeros((_LBFGS_MEMORY, dim), dtype)
  if active:
    squared_norms = _centred_squared_norms(problem)
  state = dict(
    w=w0,
    b=b0,
    margins=margins,
    grad=jnp.concatenate([grad_w, grad_b[None]]),
    s_hist=zeros_hist,
    y_hist=zeros_hist,
    count=jnp.zeros((), jnp.int32),
    newest=jnp.full((), _LBFGS_MEMORY - 1, jnp.int32),
    iters=jnp.zeros((), jnp.int32),
    stalled=jnp.zeros((), bool),
  )

  def cond(state):
    grad_max = jnp.max(jnp.abs(state["grad"]))
    return (state["iters"] < max_iters) & (grad_max > tol) & ~state["stalled"]

  def body(state):
    grad = state["grad"]
    if active:
      precondition = _active_hessian_inverse(problem, state["margins"], squared_norms)
    else:
      precondition = lambda vectors: vectors  # noqa: E731
    direction = -_inverse_hessian_times(
      grad, state["s_hist"], state["y_hist"], state["count"], state["newest"], precondition
    )
    # A direction that is not finite or does not descend (an inaccurate preconditioner in low
    # precision): steepest descent instead.
    usable = jnp.all(jnp.isfinite(direction)) & (jnp.dot(direction, grad) < 0)
    direction = jnp.where(usable, direction, -grad)
    direction_w, direction_b = direction[:-1], direction[-1]
    along = problem.margins(direction_w, direction_b)
    alpha, _ = _line_search(problem, state["w"], state["margins"], direction_w, along)
    w = state["w"] + alpha * direction_w
    b = state["b"] + alpha * direction_b
    margins = state["margins"] + alpha * along
    grad_w, grad_b = problem.gradient(w, margins)
    new_grad = jnp.concatenate([grad_w, grad_b[None]])
    step, change = alpha * direction, new_grad - grad
    curvature = jnp.dot(step, change)
    # Keep the pair only when it carries positive curvature; a rejected step (alpha = 0)
    # clears the memory so the next direction comes from the initial matrix alone (steepest
    # descent for plain L-BFGS), and two in a row stop.
    keep = curvature > jnp.finfo(dtype).eps * jnp.dot(change, change)
    newest = jnp.where(keep, (state["newest"] + 1) % _LBFGS_MEMORY, state["newest"])
    moved = alpha > 0
    return dict(
      w=w,
      b=b,
      margins=margins,
      grad=new_grad,
      s_hist=jnp.where(keep, state["s_hist"].at[newest].set(step), state["s_hist"]),
      y_hist=jnp.where(keep, state["y_hist"].at[newest].set(change), state["y_hist"]),
      count=jnp.where(moved, jnp.minimum(state["count"] + keep, _LBFGS_MEMORY), 0),
      newest=newest,
      iters=state["iters"] + 1,
      stalled=~moved & (state["count"] == 0),
    )

  state = lax.while_loop(cond, body, state)
  return state["w"], state["b"], state["margins"], state["grad"], state["iters"]


def _hessian(problem: _Problem, margins: jax.Array) -> jax.Array:
  """The (D+1)^2 Hessian of the scaled objective in (w, centred bias).

  The D x D block is one matmul in the storage dtype (bf16 stays bf16: only the Newton
  direction depends on it, the line search and the gradient stay exact).
  """
  probs = jax.nn.sigmoid(margins)
  curvature = problem.weights * probs * (1 - probs)  # [N]
  compute_dtype = _compute_dtype(problem.features.dtype)
  scaled = (problem.features.astype(compute_dtype) * jnp.sqrt(curvature)[:, None]).astype(
    problem.features.dtype
  )
  precision = lax.Precision.DEFAULT
  gram = lax.dot_general(
    scaled,
    scaled,
    (((0,), (0,)), ((), ())),
    precision=precision,
    preferred_element_type=compute_dtype,
  )
  cross = _rmatvec(problem.features, curvature)  # X^T c
  total = jnp.sum(curvature)
  # Centre: (X - 1 m^T)^T C (X - 1 m^T) = X^T C X - m (X^T c)^T - (X^T c) m^T + total m m^T.
  mean = problem.mean
  gram = gram - jnp.outer(mean, cross) - jnp.outer(cross, mean) + total * jnp.outer(mean, mean)
  cross_centred = cross - total * mean
  dim = mean.shape[0]
  gram = gram + problem.l2 * jnp.eye(dim, dtype=compute_dtype)
  top = jnp.concatenate([gram, cross_centred[:, None]], axis=1)
  bottom = jnp.concatenate([cross_centred, (total + _BIAS_RIDGE * problem.l2)[None]])
  return jnp.concatenate([top, bottom[None]], axis=0)


def _fit_newton(problem: _Problem, w0, b0, margins, grad_w, grad_b, *, max_iters, tol):
  state = (
    w0,
    b0,
    margins,
    jnp.concatenate([grad_w, grad_b[None]]),
    jnp.zeros((), jnp.int32),
    jnp.zeros((), bool),
  )

  def cond(state):
    _, _, _, grad, iters, stalled = state
    return (iters < max_iters) & (jnp.max(jnp.abs(grad)) > tol) & ~stalled

  def body(state):
    w, b, margins, grad, iters, _ = state
    hessian = _hessian(problem, margins)
    factor = jax.scipy.linalg.cho_factor(hessian, lower=True)
    direction = -jax.scipy.linalg.cho_solve(factor, grad)
    # A failed factorisation (NaN) falls back to steepest descent.
    direction = jnp.where(jnp.all(jnp.isfinite(direction)), direction, -grad)
    direction_w, direction_b = direction[:-1], direction[-1]
    along = problem.margins(direction_w, direction_b)
    alpha, _ = _line_search(problem, w, margins, direction_w, along)
    w, b, margins = w + alpha * direction_w, b + alpha * direction_b, margins + alpha * along
    grad_w, grad_b = problem.gradient(w, margins)
    return w, b, margins, jnp.concatenate([grad_w, grad_b[None]]), iters + 1, alpha <= 0

  w, b, margins, grad, iters, _ = lax.while_loop(cond, body, state)
  return w, b, margins, grad, iters


def _validate(features, labels, example_weights, l2, init, max_iters, tol, solver, batched):
  lead = 1 if batched else 0
  want = "[C, N, D]" if batched else "[N, D]"
  if features.ndim != 2 + lead:
    raise ValueError(f"features of shape {features.shape}; expected {want}")
  if not jnp.issubdtype(features.dtype, jnp.floating):
    raise ValueError(f"features of dtype {features.dtype}; expected a float dtype")
  rows = features.shape[: 1 + lead]
  for name, array in (("labels", labels), ("example_weights", example_weights)):
    if array.shape != rows:
      raise ValueError(f"{name} of shape {array.shape}; expected {rows} to match features")
  if isinstance(l2, (int, float)) and not (l2 > 0 and math.isfinite(l2)):
    raise ValueError(f"l2={l2}; expected a finite float > 0 (it is 1/C of scikit-learn)")
  if isinstance(tol, (int, float)) and not tol >= 0:
    raise ValueError(f"tol={tol}; expected >= 0")
  if isinstance(max_iters, int) and max_iters < 0:
    raise ValueError(f"max_iters={max_iters}; expected >= 0")
  if solver not in SOLVERS:
    raise ValueError(f"solver={solver!r}; expected one of {SOLVERS}")
  if init is not None:
    want_w, want_b = features.shape[:lead] + features.shape[-1:], features.shape[:lead]
    if init.weights.shape != want_w or jnp.shape(init.bias) != want_b:
      raise ValueError(
        f"init with weights {init.weights.shape} and bias {jnp.shape(init.bias)}; expected "
        f"{want_w} and {want_b}"
      )
  # Value checks only where values exist (not under jit); features: see `check_finite`.
  try:
    labels_np, weights_np = np.asarray(labels), np.asarray(example_weights)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  if not np.all((labels_np >= 0) & (labels_np <= 1)):
    raise ValueError("labels outside [0, 1] (or NaN); expected 0/1 (or soft) labels")
  if not np.all(np.isfinite(weights_np) & (weights_np >= 0)):
    raise ValueError("example_weights negative, NaN or inf; expected finite values >= 0")


_LAPACK_THREADS_SET = False
_LAPACK_THREADS_LOCK = threading.Lock()
# Where scipy's wheels keep their own BLAS (pip: scipy.libs/, macOS: scipy/.dylibs/, source
# builds against the scipy-openblas32 package), relative to the directory holding `scipy/`.
_SCIPY_BLAS_DIRS = ("scipy", "scipy.libs", "scipy_openblas32")


def _one_lapack_thread() -> None:
  """Runs the LAPACK kernels that XLA:CPU calls on one thread (once per process; CPU only).

  jax's CPU Cholesky factorisations and triangular solves (active_lbfgs's small systems, the
  Newton step, L-BFGS's m x m solves) call scipy's LAPACK (`scipy.linalg.cython_lapack`), whose
  OpenBLAS starts a thread per core. XLA already runs its own thread pool over the cores: the
  OpenBLAS threads keep spinning after each call and take cores from XLA's matmuls, and the
  factorisations' rounding depends on their number (2 vs 1 threads gave weights 1e-7 apart).
  On this project's 2-core CPU one thread made a warm batched fit (C = 10, N = 12,288,
  D = 2048) 0.27-0.32 s instead of 0.44-0.48 s (set by OPENBLAS_NUM_THREADS=1 then).

  So, when a fit is first traced and JAX's default backend is the CPU (fits placed on a CPU
  device under another default backend are not covered), the BLAS libraries in scipy's own
  directories (pip's wheels; numpy's library keeps its threads) are set to one thread with
  threadpoolctl; if scipy has none of its own and exactly one BLAS library is loaded (conda's
  shared OpenBLAS or MKL, a system scipy), that one, numpy's too; otherwise nothing, with a
  warning. A failure is logged, never raised: fits stay correct, only slower, with rounding
  that depends on the thread count.
  OpenBLAS takes its thread count from one controlling thread: a count set earlier from
  another thread can keep this from taking effect (warned), and threadpoolctl can set it back
  from the thread that set it (then results depend on the thread count again).
  """
  global _LAPACK_THREADS_SET
  if _LAPACK_THREADS_SET or jax.default_backend() != "cpu":
    return
  with _LAPACK_THREADS_LOCK:
    if _LAPACK_THREADS_SET:
      return
    _LAPACK_THREADS_SET = True  # one attempt per process, whatever its outcome
    try:
      _set_lapack_threads(1)
    except Exception as error:  # a speed setting must never fail a fit
      logging.warning("linear fits: could not set scipy's BLAS threads: %r", error)


def _set_lapack_threads(count: int) -> None:
  """`_one_lapack_thread`'s work: finds scipy's BLAS libraries and sets their thread count."""
  import scipy
  import scipy.linalg.cython_lapack  # noqa: F401  (loads the BLAS library jaxlib's kernels use)
  import threadpoolctl

  blas = threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers
  root = os.path.dirname(os.path.dirname(os.path.realpath(scipy.__file__)))
  dirs = tuple(os.path.join(root, name) + os.sep for name in _SCIPY_BLAS_DIRS)
  chosen = [lib for lib in blas if os.path.realpath(lib.filepath).startswith(dirs)]
  if not chosen and len(blas) == 1:
    chosen = blas
    logging.warning(
      "linear fits: scipy has no BLAS of its own here; setting the one loaded, %s, to %d "
      "thread(s) (numpy shares it)",
      blas[0].filepath,
      count,
    )
  elif not chosen:
    logging.warning(
      "linear fits: scipy's BLAS not found among %s; LAPACK keeps its threads (slower fits "
      "on CPU, rounding that depends on the thread count)",
      [lib.filepath for lib in blas],
    )
  for lib in chosen:
    before = lib.num_threads
    if before == count:
      continue
    lib.set_num_threads(count)
    if lib.num_threads == count:
      logging.info("linear fits: BLAS %s set to %d thread(s) (was %d)", lib.filepath, count, before)
    else:
      logging.warning(
        "linear fits: BLAS %s kept %d threads (asked %d: OpenBLAS obeys the thread that set "
        "its count first)",
        lib.filepath,
        lib.num_threads,
        count,
      )


def _fit_one(
  features, labels, example_weights, l2, init_w, init_b, init_margins, max_iters, tol, solver
):
  _one_lapack_thread()
  dtype = _compute_dtype(features.dtype)
  if features.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
    # XLA:CPU runs bf16 products that contract over rows (X^T r) and batched ones 10-100x
    # slower than f32; one f32 copy for the whole fit is cheaper (same values, same optimum).
    features = features.astype(dtype)
  labels = labels.astype(dtype)
  example_weights = example_weights.astype(dtype)
  total = jnp.sum(example_weights)
  # All-padding (total 0): scale by 1 so the fit returns w = 0 and leaves the bias alone.
  scale = 1 / jnp.where(total > 0, total, 1)
  weights = example_weights * scale
  w0 = init_w.astype(dtype)
  if init_margins is None:
    margins = _matvec(features, w0) + init_b.astype(dtype)  # one pass
  else:
    margins = init_margins.astype(dtype)
  # The weighted mean (the centring) and X^T r of the initial gradient, in one pass. The
  # centred margins (X - mean) w0 + (b0 + mean . w0) are the margins above.
  residual = weights * (jax.nn.sigmoid(margins) - labels)
  mean, x_residual = _vectors_times_features(jnp.stack([weights, residual]), features)
  problem = _Problem(features, labels, weights, mean, jnp.asarray(l2, dtype) * scale)
  b0 = init_b.astype(dtype) + jnp.dot(mean, w0)  # the centred bias of the initial model
  grad_b = jnp.sum(residual)
  grad_w = x_residual - mean * grad_b + problem.l2 * w0  # as _Problem.gradient
  run = {
    "active_lbfgs": functools.partial(_fit_lbfgs, active=True),
    "lbfgs": _fit_lbfgs,
    "newton": _fit_newton,
  }[solver]
  w, b, margins, grad, iters = run(
    problem, w0, b0, margins, grad_w, grad_b, max_iters=max_iters, tol=tol
  )
  grad_norm = jnp.max(jnp.abs(grad))
  model = LinearModel(weights=w, bias=b - jnp.dot(mean, w))
  info = FitInfo(
    num_iters=iters,
    grad_norm=grad_norm,
    converged=grad_norm <= tol,
    objective=problem.objective(w, margins),
  )
  return model, info


def _checked_margins(init_margins, rows: tuple[int, ...]) -> jax.Array:
  init_margins = jnp.asarray(init_margins)
  if init_margins.shape != rows:
    raise ValueError(f"init_margins of shape {init_margins.shape}; expected {rows}")
  return init_margins


def fit_logistic_with_info(
  features: jax.Array,
  labels: jax.Array,
  example_weights: jax.Array,
  *,
  l2: float,
  init: LinearModel | None = None,
  max_iters: int = 200,
  tol: float = 1e-6,
  solver: str = "active_lbfgs",
  init_margins: jax.Array | None = None,
) -> tuple[LinearModel, FitInfo]:
  """`fit_logistic`, also returning how the solver ended (iterations, gradient, converged)."""
  features, labels = jnp.asarray(features), jnp.asarray(labels)
  example_weights = jnp.asarray(example_weights)
  _validate(features, labels, example_weights, l2, init, max_iters, tol, solver, batched=False)
  dtype = _compute_dtype(features.dtype)
  if init is None:
    init = init_model(features.shape[1], dtype=dtype)
  if init_margins is not None:
    init_margins = _checked_margins(init_margins, features.shape[:1])
  return _fit_one(
    features,
    labels,
    example_weights,
    l2,
    init.weights,
    jnp.asarray(init.bias),
    init_margins,
    max_iters,
    tol,
    solver,
  )


def fit_logistic(
  features: jax.Array,
  labels: jax.Array,
  example_weights: jax.Array,
  *,
  l2: float,
  init: LinearModel | None = None,
  max_iters: int = 200,
  tol: float = 1e-6,
  solver: str = "active_lbfgs",
  init_margins: jax.Array | None = None,
) -> LinearModel:
  """Fits one L2-regularised logistic regression (not jitted: callers jit).

  Args:
    features: `[N, D]` float features (bf16, f32 or f64).
    labels: `[N]` targets in [0, 1] (1 = positive).
    example_weights: `[N]` weights >= 0; 0 marks padding, which never changes the result
      (padding rows must still hold finite features, e.g. zeros or a real row: 0 * NaN = NaN).
    l2: penalty on `||w||^2 / 2` relative to the summed weighted log-loss (sklearn's `1 / C`).
    init: the starting model (e.g. the previous round's), weights `[D]`, scalar bias; zeros if
      None. A warm start only changes how many iterations are needed, not the optimum.
    max_iters: iteration cap.
    tol: stop when the max-abs gradient of `objective / sum(example_weights)` is <= tol (the
      meaning of scikit-learn's `tol` for lbfgs). On nearly separable sets of 500 labels and
      thousands of pseudo-negatives, 1e-6 left the objective within 4e-6 to 3e-5 relative of
      the optimum and training margins within about 0.02 of it (1e-5: 4e-4 and 0.6). f32 gets
      to about 1e-9; below that the solver stops when the line search can no longer descend,
      or at `max_iters`.
    solver: "active_lbfgs", "lbfgs" or "newton" (see the module docstring); all three
      stop on the same `tol`, so they return the same optimum within it.
    init_margins: `[N]` the logits of `init` on the rows (`features @ init.weights +
      init.bias`) when the caller has them, e.g. the pool's scores under that model: saves
      the fit its first pass. None: computed. Margins that are not `init`'s make the fit
      wrong without an error: the solver updates the margins it is given and never
      recomputes them, so it converges (and reports convergence) for another problem.

  Returns:
    A `LinearModel` with weights `[D]` and a scalar bias, in f32 (f64 for f64 features).
  """
  model, _ = fit_logistic_with_info(
    features,
    labels,
    example_weights,
    l2=l2,
    init=init,
    max_iters=max_iters,
    tol=tol,
    solver=solver,
    init_margins=init_margins,
  )
  return model


def fit_logistic_batched_with_info(
  features: jax.Array,
  labels: jax.Array,
  example_weights: jax.Array,
  *,
  l2: float,
  init: LinearModel | None = None,
  max_iters: int = 200,
  tol: float = 1e-6,
  solver: str = "active_lbfgs",
  init_margins: jax.Array | None = None,
) -> tuple[LinearModel, FitInfo]:
  """`fit_logistic_batched`, also returning a per-category `FitInfo`."""
  features, labels = jnp.asarray(features), jnp.asarray(labels)
  example_weights = jnp.asarray(example_weights)
  _validate(features, labels, example_weights, l2, init, max_iters, tol, solver, batched=True)
  if init is None:
    init = init_model(
      features.shape[2], batch_shape=features.shape[:1], dtype=_compute_dtype(features.dtype)
    )

  def one(features, labels, example_weights, init_w, init_b, init_margins):
    return _fit_one(
      features, labels, example_weights, l2, init_w, init_b, init_margins, max_iters, tol, solver
    )

  if init_margins is not None:
    init_margins = _checked_margins(init_margins, features.shape[:2])
  return jax.vmap(one)(
    features, labels, example_weights, init.weights, jnp.asarray(init.bias), init_margins
  )


def fit_logistic_batched(
  features: jax.Array,
  labels: jax.Array,
  example_weights: jax.Array,
  *,
  l2: float,
  init: LinearModel | None = None,
  max_iters: int = 200,
  tol: float = 1e-6,
  solver: str = "active_lbfgs",
  init_margins: jax.Array | None = None,
) -> LinearModel:
  """`fit_logistic` for C categories at once (vmapped; one while_loop runs until all converge).

  Args:
    features: `[C, N, D]` (each category's padded training set).
    labels: `[C, N]`.
    example_weights: `[C, N]` (0 = padding).
    l2, max_iters, tol, solver: as in `fit_logistic`, shared by all categories.
    init: weights `[C, D]` and bias `[C]`, or None for zeros.
    init_margins: `[C, N]` logits of `init` on the rows, or None (see `fit_logistic`).

  Returns:
    A `LinearModel` with weights `[C, D]` and bias `[C]`.
  """
  model, _ = fit_logistic_batched_with_info(
    features,
    labels,
    example_weights,
    l2=l2,
    init=init,
    max_iters=max_iters,
    tol=tol,
    solver=solver,
    init_margins=init_margins,
  )
  return model
