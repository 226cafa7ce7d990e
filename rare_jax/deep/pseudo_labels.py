"""Pseudo-labels of the semi-supervised baselines KD-Semi and DeepProp (paper Sec. 4).

Both baselines add *pseudo-positives* to the pseudo-negatives W_n of our method (the paper's
Figure 4 measures how wrong those pseudo-positives are; `rare_jax.active.metrics.
pseudo_label_error_rates` computes that false-positive rate, NaN where a category has none).

- KD-Semi: unlabeled images whose previous deep model's main-head probability is at least a
  threshold (0.9, 0.95 or 0.98 in the paper) become pseudo-positives.
- DeepProp: label propagation after Iscen, Tolias, Avrithis and Chum, "Label Propagation for
  Deep Semi-supervised Learning", CVPR 2019 (the paper's [20]), run per category as a binary
  problem (class 0 negative, class 1 positive):
    1. `knn_graph`: the affinity a_ij = [v_i^T v_j]_+^gamma between L2-normalised features,
       for each i its k nearest neighbours j != i (gamma = 3, k = 50 in the authors' code);
    2. `propagate`: W = A + A^T, normalised D^-1/2 W D^-1/2, then Z solving
       (I - alpha W) Z = Y (alpha = 0.99) by conjugate gradient, as the authors do;
    3. `deep_prop_pseudo_labels`: the argmax class of each unlabeled image, weighted by
       1 - H(z_hat)/log(c) with z_hat the L1-normalised row of Z (Iscen et al. Eq. 11, numbered
       so in the authors' code `lp/db_semisuper.py`), and `class_balance_weights`, the inverse
       class population zeta_j of Iscen et al. (the equation after the entropy weight).

Everything is pure; the graph is kept as kNN lists `[P, k]` (never a dense `[P, P]` matrix), so
memory is O(P k) for the graph and O(block_size P) while building it. Library functions are not
jitted; `k`, `gamma`, `block_size`, `alpha`, `iterations` and `threshold` are static.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

# Paper thresholds for KD-Semi's pseudo-positives (Sec. 4, Figure 4).
KD_SEMI_THRESHOLDS = (0.9, 0.95, 0.98)


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_matrix(name: str, x: jax.Array, shape: tuple[int, ...] | None = None) -> None:
  if x.ndim != 2:
    raise ValueError(f"{name} must be 2-d, got shape {x.shape}")
  if shape is not None and x.shape != shape:
    raise ValueError(f"{name} has shape {x.shape}; expected {shape}")


# ----------------------------------------------------------------------------------------------
# KD-Semi


def kd_semi_pseudo_positives(
  probabilities: ArrayLike, unlabeled: ArrayLike, *, threshold: float
) -> jax.Array:
  """KD-Semi's pseudo-positives: confident positive predictions of the previous deep model.

  Args:
    probabilities: `[C, P]` main-head positive probabilities (sigmoid of the logits) of the
      deep model from the previous update, for every pool image.
    unlabeled: `[C, P]` bool, images without a human label for that category.
    threshold: static float in (0, 1); an image is a pseudo-positive when its probability is
      >= threshold (paper: 0.98, also 0.9 and 0.95).

  Returns:
    `[C, P]` bool, never true on a labeled image.
  """
  if not 0.0 < float(threshold) < 1.0:
    raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
  probabilities = jnp.asarray(probabilities)
  unlabeled = jnp.asarray(unlabeled)
  _check_matrix("probabilities", probabilities)
  _check_matrix("unlabeled", unlabeled, probabilities.shape)
  return jnp.logical_and(unlabeled.astype(bool), probabilities >= threshold)


# ----------------------------------------------------------------------------------------------
# DeepProp: kNN graph


def knn_graph(
  features: ArrayLike, *, k: int, gamma: float = 3.0, block_size: int = 1024
) -> tuple[jax.Array, jax.Array]:
  """The k-nearest-neighbour affinity lists of Iscen et al. (a_ij = [cos(v_i, v_j)]_+^gamma).

  Rows are processed `block_size` at a time (one `[block_size, D] x [D, P]` matmul and a
  `top_k` per block, sequentially with `lax.map`), so peak memory is O(block_size * P) rather
  than O(P^2). The image itself is excluded from its own list (by position, so duplicates of an
  image are still neighbours). Similarities below zero are clipped to 0 before the power, as in
  the paper (the authors' code omits the clip; it only matters for features with negative
  entries). Ties in similarity go to the lower position (`lax.top_k`).

  Args:
    features: `[P, D]` pool features (any float dtype; computed in float32).
    k: static, neighbours per image, 1 <= k <= P - 1 (the authors use 50).
    gamma: static exponent (>= 0) of the clipped similarity (the authors use 3).
    block_size: static, rows per matmul block (>= 1).

  Returns:
    `neighbors`: int32 `[P, k]` pool positions, most similar first;
    `weights`: float32 `[P, k]` affinities a_ij >= 0.
  """
  features = jnp.asarray(features)
  _check_matrix("features", features)
  pool_size, dim = features.shape
  if not isinstance(k, int) or not 1 <= k <= pool_size - 1:
    raise ValueError(f"k must be an int in [1, P - 1] = [1, {pool_size - 1}], got {k!r}")
  if not float(gamma) >= 0:
    raise ValueError(f"gamma must be >= 0, got {gamma!r}")
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")

  features = features.astype(jnp.float32)
  normalized = features * jax.lax.rsqrt(
    jnp.maximum(jnp.sum(features * features, axis=-1, keepdims=True), 1e-12)
  )
  block_size = min(block_size, pool_size)
  num_blocks = -(-pool_size // block_size)
  padded = jnp.pad(normalized, ((0, num_blocks * block_size - pool_size), (0, 0)))
  blocks = padded.reshape(num_blocks, block_size, dim)
  starts = jnp.arange(num_blocks, dtype=jnp.int32) * block_size
  columns = jnp.arange(pool_size, dtype=jnp.int32)

  def one_block(args):
    rows, start = args
    similarities = rows @ normalized.T  # [block, P]
    is_self = columns[None, :] == start + jnp.arange(block_size, dtype=jnp.int32)[:, None]
    similarities = jnp.where(is_self, -jnp.inf, similarities)
    values, ids = jax.lax.top_k(similarities, k)
    return ids.astype(jnp.int32), values

  ids, values = jax.lax.map(one_block, (blocks, starts))
  neighbors = ids.reshape(-1, k)[:pool_size]
  values = values.reshape(-1, k)[:pool_size]
  weights = jnp.power(jnp.maximum(values, 0.0), gamma)
  return neighbors, weights.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# DeepProp: propagation


def _symmetric_matvec(neighbors: jax.Array, weights: jax.Array, x: jax.Array) -> jax.Array:
  """`(A + A^T) x` for the kNN affinity A (A[i, neighbors[i, m]] = weights[i, m]); x `[P, M]`.

  Duplicated edges (j in NN(i) and i in NN(j)) count twice, like `W + W.T` on the authors'
  sparse matrix.
  """
  forward = jnp.einsum("pk,pkm->pm", weights, x[neighbors])  # sum_j A_ij x_j
  contributions = weights[:, :, None] * x[:, None, :]  # A_ij x_i, sent to row j
  backward = jax.ops.segment_sum(
    contributions.reshape(-1, x.shape[-1]), neighbors.reshape(-1), num_segments=x.shape[0]
  )
  return forward + backward


def seed_matrix(seeds: ArrayLike, *, balance: bool = True) -> jax.Array:
  """The propagation targets Y `[C, P, 2]`: column 1 for positive seeds, column 0 for negative.

  Args:
    seeds: `[C, P]` int: 1 positive, 0 negative, anything else (-1) unknown.
    balance: divide each class's column by its number of seeds (Y_ij = 1/|L_j|), as the
      authors' code does (`lp/db_semisuper.py`: "eq 5 from the paper, normalized with the
      class size"); without it, the many negatives of a rare category outweigh its few
      positives. A class without seeds keeps a zero column.
  """
  seeds = jnp.asarray(seeds)
  targets = jnp.stack([seeds == 0, seeds == 1], axis=-1).astype(jnp.float32)
  if balance:
    counts = jnp.sum(targets, axis=1, keepdims=True)  # [C, 1, 2]
    targets = targets / jnp.maximum(counts, 1.0)
  return targets


def propagate(
  neighbors: ArrayLike,
  weights: ArrayLike,
  seeds: ArrayLike,
  *,
  alpha: float = 0.99,
  iterations: int = 20,
  balance_seeds: bool = True,
) -> jax.Array:
  """Label propagation (Zhou et al. 2004, as used by Iscen et al.): Z = (I - alpha W)^-1 Y.

  W is the kNN affinity symmetrised (A + A^T) and normalised D^-1/2 (A + A^T) D^-1/2, with D
  its degrees (an isolated image, degree 0, gets zero rows, like the authors' code).

  Solver: `iterations` steps of conjugate gradient, one independent CG per column of Y (per
  category and class), with a fixed step count so the function is a plain `fori_loop`. Why CG
  and not the fixed-point iteration Z <- alpha W Z + Y: that iteration contracts the error by
  only alpha = 0.99 per step (20 steps leave ~80% of it: a 20-hop truncated walk), whereas CG
  on the SPD matrix I - alpha W (condition number <= (1 + alpha)/(1 - alpha) = 199) contracts it
  by ~(sqrt(199) - 1)/(sqrt(199) + 1) ~ 0.87 per step and is what Iscen et al. use
  (`scipy.sparse.linalg.cg`, maxiter 20, in `lp/diffusion.py`). Steps after convergence are
  no-ops (a zero residual gives a zero step), so extra iterations are safe. The sparse matvec
  gathers over the kNN lists and scatters back with `segment_sum`: O(P k C) memory per step.

  Args:
    neighbors: int `[P, k]` from `knn_graph`.
    weights: float `[P, k]` affinities >= 0 from `knn_graph`.
    seeds: `[C, P]` int8: 1 positive, 0 negative, -1 unknown (e.g. `LoopState.labels`; pass
      the pseudo-negatives W_n as 0 too if they should anchor the negative class: a category
      without negative seeds propagates only the positive class, so every image reached from
      a positive comes out positive).
    alpha: static, in (0, 1).
    iterations: static, CG steps (>= 1).
    balance_seeds: see `seed_matrix`.

  Returns:
    `[C, P, 2]` float32 scores Z: `[..., 0]` negative, `[..., 1]` positive.
  """
  neighbors = jnp.asarray(neighbors)
  weights = jnp.asarray(weights)
  seeds = jnp.asarray(seeds)
  _check_matrix("neighbors", neighbors)
  _check_matrix("weights", weights, neighbors.shape)
  _check_matrix("seeds", seeds)
  pool_size = neighbors.shape[0]
  if seeds.shape[1] != pool_size:
    raise ValueError(f"seeds has shape {seeds.shape}; expected [C, P] with P = {pool_size}")
  if not jnp.issubdtype(neighbors.dtype, jnp.integer):
    raise ValueError(f"neighbors must be integer pool positions, got dtype {neighbors.dtype}")
  if not 0.0 < float(alpha) < 1.0:
    raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
  if not isinstance(iterations, int) or iterations < 1:
    raise ValueError(f"iterations must be a positive int, got {iterations!r}")
  if _is_concrete(seeds) and seeds.size and not bool(jnp.all((seeds >= -1) & (seeds <= 1))):
    raise ValueError("seeds must hold 1 (positive), 0 (negative) or -1 (unknown) only")
  if _is_concrete(neighbors) and neighbors.size:
    if not bool(jnp.all((neighbors >= 0) & (neighbors < pool_size))):
      raise ValueError(f"neighbors must be pool positions in [0, {pool_size}), got others")

  num_categories = seeds.shape[0]
  weights = weights.astype(jnp.float32)
  degrees = _symmetric_matvec(neighbors, weights, jnp.ones((pool_size, 1), jnp.float32))[:, 0]
  inv_sqrt_degrees = jnp.where(degrees > 0, jax.lax.rsqrt(jnp.maximum(degrees, 1e-30)), 0.0)
  inv_sqrt_degrees = inv_sqrt_degrees[:, None]

  def system(x):  # (I - alpha D^-1/2 W D^-1/2) x, x [P, M]
    spread = _symmetric_matvec(neighbors, weights, inv_sqrt_degrees * x)
    return x - alpha * inv_sqrt_degrees * spread

  # Columns: (category, class) pairs, [P, 2C]; each column is its own CG.
  targets = seed_matrix(seeds, balance=balance_seeds)
  rhs = jnp.transpose(targets, (1, 0, 2)).reshape(pool_size, 2 * num_categories)

  def safe_divide(numerator, denominator):
    return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1), 0)

  def step(_, carry):
    solution, residual, direction, residual_norm = carry
    product = system(direction)
    step_size = safe_divide(residual_norm, jnp.sum(direction * product, axis=0))
    solution = solution + step_size * direction
    residual = residual - step_size * product
    new_norm = jnp.sum(residual * residual, axis=0)
    direction = residual + safe_divide(new_norm, residual_norm) * direction
    return solution, residual, direction, new_norm

  init = (jnp.zeros_like(rhs), rhs, rhs, jnp.sum(rhs * rhs, axis=0))
  solution, *_ = jax.lax.fori_loop(0, iterations, step, init)
  return jnp.transpose(solution.reshape(pool_size, num_categories, 2), (1, 0, 2))


# ----------------------------------------------------------------------------------------------
# DeepProp: pseudo-labels and their weights


def deep_prop_pseudo_labels(
  scores: ArrayLike, unlabeled: ArrayLike
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Hard pseudo-labels and certainty weights from propagated scores (Iscen et al. Eq. 11).

  Negative scores (numerical error of the solver) are clipped to 0, as in the authors' code;
  z_hat is the L1-normalised row; the label is its argmax, ties going to the negative class
  (the prior for a rare category); the weight is omega = 1 - H(z_hat) / log(2), in [0, 1]:
  1 when all mass is on one class, 0 for a 50/50 split. An image that received no mass (not
  reachable from any seed) is neither pseudo-positive nor pseudo-negative, with weight 0.
  Labeled images are never pseudo-labeled and get weight 0. Unlike the authors' code, weights
  are not rescaled by their maximum (the paper's formula; a rescale is the caller's choice).

  Args:
    scores: `[C, P, 2]` from `propagate` (`[..., 0]` negative, `[..., 1]` positive).
    unlabeled: `[C, P]` bool, images without a human label for that category.

  Returns:
    `pseudo_positive` bool `[C, P]`, `pseudo_negative` bool `[C, P]` (disjoint, both only on
    unlabeled images), `weight` float32 `[C, P]` (0 where neither).
  """
  scores = jnp.asarray(scores)
  unlabeled = jnp.asarray(unlabeled)
  if scores.ndim != 3 or scores.shape[-1] != 2:
    raise ValueError(f"scores has shape {scores.shape}; expected [C, P, 2]")
  _check_matrix("unlabeled", unlabeled, scores.shape[:2])
  scores = jnp.maximum(scores.astype(jnp.float32), 0.0)
  total = jnp.sum(scores, axis=-1)
  reached = jnp.logical_and(unlabeled.astype(bool), total > 0)
  probabilities = scores / jnp.where(total > 0, total, 1.0)[..., None]
  entropy = jnp.sum(jax.scipy.special.entr(probabilities), axis=-1)
  weight = jnp.clip(1.0 - entropy / math.log(2.0), 0.0, 1.0)
  positive = scores[..., 1] > scores[..., 0]
  return (
    jnp.logical_and(reached, positive),
    jnp.logical_and(reached, jnp.logical_not(positive)),
    jnp.where(reached, weight, 0.0).astype(jnp.float32),
  )


def class_balance_weights(
  labels: ArrayLike, pseudo_positive: ArrayLike, pseudo_negative: ArrayLike
) -> jax.Array:
  """Iscen et al.'s per-class weights zeta_j, inverse to the class population, `[C, 2]`.

  zeta_j = (n / 2) / n_j with n_j = |L_j| + |U_j| the human-labeled plus pseudo-labeled images
  of class j and n = n_0 + n_1: the paper's (|L_j| + |U_j|)^-1 scaled as in the authors' code
  (N / c / count), so a balanced set gets 1 and the total weight n is kept. In Iscen et al.'s
  loss zeta multiplies every term, human labels included. A class with no images gets 0.

  Args:
    labels: `[C, P]` int, 1 positive, 0 negative, -1 unknown.
    pseudo_positive: `[C, P]` bool.
    pseudo_negative: `[C, P]` bool.

  Returns:
    float32 `[C, 2]`: `[:, 0]` for negatives, `[:, 1]` for positives.
  """
  labels = jnp.asarray(labels)
  pseudo_positive = jnp.asarray(pseudo_positive)
  pseudo_negative = jnp.asarray(pseudo_negative)
  _check_matrix("labels", labels)
  _check_matrix("pseudo_positive", pseudo_positive, labels.shape)
  _check_matrix("pseudo_negative", pseudo_negative, labels.shape)
  unknown = labels < 0
  negatives = jnp.logical_or(labels == 0, jnp.logical_and(unknown, pseudo_negative.astype(bool)))
  positives = jnp.logical_or(labels == 1, jnp.logical_and(unknown, pseudo_positive.astype(bool)))
  counts = jnp.stack([jnp.sum(negatives, axis=-1), jnp.sum(positives, axis=-1)], axis=-1).astype(
    jnp.float32
  )
  total = jnp.sum(counts, axis=-1, keepdims=True)
  return jnp.where(counts > 0, 0.5 * total / jnp.maximum(counts, 1.0), 0.0).astype(jnp.float32)
