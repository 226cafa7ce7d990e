"""k-means in JAX: greedy k-means++ seeding and Lloyd iterations (pure; callers jit).

The self-supervised start's auxiliary labels are k-means cluster ids of the pool's features
(paper Sec. 4.4), so this runs on `[P, D]` pools of up to millions of rows:

  result = jax.jit(functools.partial(kmeans, num_clusters=k))(key, points)
  result.centroids [k, D], result.assignments [P], result.inertia (sum of squared distances)

Distances are computed `chunk_size` rows at a time (`lax.map` over chunks), so memory beyond
the pool itself is `[chunk_size, k]` rather than `[P, k]`. Cluster sums use `segment_sum`.
Seeding follows scikit-learn's greedy k-means++ (`2 + log k` candidates per centroid, keep the
one that lowers the potential most); the stopping rule is scikit-learn's too: the squared
centroid shift below `tolerance * mean(per-feature variance)`, or `max_iterations`.
An empty cluster keeps its previous centroid.
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


@flax.struct.dataclass
class KMeansResult:
  """centroids `[k, D]`, assignments `[P]` int32, inertia (scalar: sum of squared distances
  of each point to its centroid), iterations (Lloyd iterations run)."""

  centroids: jax.Array
  assignments: jax.Array
  inertia: jax.Array
  iterations: jax.Array


def check_inputs(points: ArrayLike, num_clusters: int) -> None:
  """Raises ValueError for a pool that k-means cannot cluster into `num_clusters`.

  Shapes are always checked; values (NaN, inf) only when `points` is concrete (under `jit`,
  call this before tracing: the finite check needs the values).
  """
  shape = np.shape(points)
  if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
    raise ValueError(f"points must be [P, D] with P, D >= 1, got shape {shape}")
  if int(num_clusters) != num_clusters or not 1 <= num_clusters <= shape[0]:
    raise ValueError(
      f"num_clusters={num_clusters!r}; expected an integer in [1, P={shape[0]}] (the pool size)"
    )
  if not isinstance(points, jax.core.Tracer):
    finite = np.isfinite(np.asarray(points))
    if not finite.all():
      row = int(np.argwhere(~finite)[0][0])
      raise ValueError(f"points hold NaN or inf values (first in row {row}); expected finite")


def _chunked(points: jax.Array, chunk_size: int | None) -> tuple[jax.Array, jax.Array]:
  """`[n_chunks, chunk, D]` view of the points (zero rows appended) and the row-valid mask."""
  num_points = points.shape[0]
  chunk = num_points if chunk_size is None else min(int(chunk_size), num_points)
  if chunk < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  num_chunks = -(-num_points // chunk)
  padded = jnp.pad(points, ((0, num_chunks * chunk - num_points), (0, 0)))
  valid = jnp.arange(num_chunks * chunk) < num_points
  return padded.reshape(num_chunks, chunk, -1), valid


def squared_distances(points: ArrayLike, centroids: ArrayLike) -> jax.Array:
  """`[P, k]` squared Euclidean distances (clamped at 0 against cancellation)."""
  points = jnp.asarray(points, jnp.float32)
  centroids = jnp.asarray(centroids, jnp.float32)
  cross = jnp.matmul(points, centroids.T, precision=jax.lax.Precision.HIGHEST)
  distances = (
    jnp.sum(points**2, axis=1, keepdims=True) - 2.0 * cross + jnp.sum(centroids**2, axis=1)[None]
  )
  return jnp.maximum(distances, 0.0)


def assign(
  points: ArrayLike, centroids: ArrayLike, *, chunk_size: int | None = None
) -> tuple[jax.Array, jax.Array]:
  """Nearest centroid of every point, `chunk_size` rows at a time.

  Returns:
    (assignments `[P]` int32, squared distance to that centroid `[P]` float32).
  """
  points = jnp.asarray(points, jnp.float32)
  chunks, _ = _chunked(points, chunk_size)

  def one_chunk(rows):
    distances = squared_distances(rows, centroids)
    return jnp.argmin(distances, axis=1).astype(jnp.int32), jnp.min(distances, axis=1)

  labels, distances = jax.lax.map(one_chunk, chunks)
  num_points = points.shape[0]
  return labels.reshape(-1)[:num_points], distances.reshape(-1)[:num_points]


def _min_distances(points: jax.Array, center: jax.Array, chunk_size: int | None) -> jax.Array:
  """`[T, P]` squared distances of the points to each of `center` `[T, D]`."""
  chunks, _ = _chunked(points, chunk_size)
  per_chunk = jax.lax.map(lambda rows: squared_distances(rows, center).T, chunks)  # [n, T, c]
  return jnp.moveaxis(per_chunk, 0, 1).reshape(center.shape[0], -1)[:, : points.shape[0]]


def kmeans_plusplus(
  key: jax.Array,
  points: ArrayLike,
  num_clusters: int,
  *,
  num_local_trials: int | None = None,
  chunk_size: int | None = None,
) -> jax.Array:
  """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; scikit-learn's variant).

  Args:
    key: PRNG key; the same key gives the same centroids.
    points: `[P, D]`.
    num_clusters: k.
    num_local_trials: candidates drawn per centroid (default `2 + int(log k)`, as sklearn).
    chunk_size: rows per distance chunk (None: all at once).

  Returns:
    `[k, D]` float32 initial centroids (rows of `points`).
  """
  check_inputs(points, num_clusters)
  points = jnp.asarray(points, jnp.float32)
  trials = num_local_trials or 2 + int(math.log(num_clusters))
  first_key, loop_key = jax.random.split(key)
  first = jax.random.randint(first_key, (), 0, points.shape[0])
  centroids = jnp.zeros((num_clusters, points.shape[1]), jnp.float32).at[0].set(points[first])
  closest = _min_distances(points, points[first][None], chunk_size)[0]

  def add_centroid(i, carry):
    centroids, closest = carry
    # Candidates drawn with probability proportional to the current squared distance.
    logits = jnp.where(closest > 0, jnp.log(jnp.maximum(closest, 1e-30)), -jnp.inf)
    logits = jnp.where(jnp.any(closest > 0), logits, 0.0)  # all points coincide: uniform
    candidates = jax.random.categorical(jax.random.fold_in(loop_key, i), logits, shape=(trials,))
    candidate_closest = jnp.minimum(
      closest[None], _min_distances(points, points[candidates], chunk_size)
    )
    best = jnp.argmin(jnp.sum(candidate_closest, axis=1))
    return centroids.at[i].set(points[candidates[best]]), candidate_closest[best]

  centroids, _ = jax.lax.fori_loop(1, num_clusters, add_centroid, (centroids, closest))
  return centroids


def lloyd(
  points: ArrayLike,
  centroids: ArrayLike,
  *,
  max_iterations: int = 300,
  tolerance: float = 1e-4,
  chunk_size: int | None = None,
) -> KMeansResult:
  """Lloyd iterations from `centroids` (a `lax.while_loop`).

  Args:
    points: `[P, D]`.
    centroids: `[k, D]` starting centroids.
    max_iterations: at most this many updates.
    tolerance: stop when the summed squared centroid shift is at most `tolerance` times the
      mean per-feature variance of `points` (scikit-learn's rule); 0 runs `max_iterations`.
    chunk_size: rows per distance chunk (None: all at once).

  Returns:
    `KMeansResult` whose assignments and inertia belong to the returned centroids.
  """
  if max_iterations < 0 or tolerance < 0:
    raise ValueError(
      f"need max_iterations >= 0 and tolerance >= 0, got {max_iterations} and {tolerance}"
    )
  points = jnp.asarray(points, jnp.float32)
  centroids = jnp.asarray(centroids, jnp.float32)
  num_clusters = centroids.shape[0]
  threshold = tolerance * jnp.mean(jnp.var(points, axis=0))

  def update(centroids):
    labels, _ = assign(points, centroids, chunk_size=chunk_size)
    sums = jax.ops.segment_sum(points, labels, num_segments=num_clusters)
    counts = jax.ops.segment_sum(jnp.ones_like(labels, jnp.float32), labels, num_clusters)
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    return jnp.where(counts[:, None] > 0, means, centroids)  # empty clusters stay put

  def keep_going(carry):
    iteration, _, shift = carry
    return (iteration < max_iterations) & (shift > threshold)

  def body(carry):
    iteration, centroids, _ = carry
    new = update(centroids)
    return iteration + 1, new, jnp.sum((new - centroids) ** 2)

  iterations, centroids, _ = jax.lax.while_loop(
    keep_going, body, (jnp.zeros((), jnp.int32), centroids, jnp.asarray(jnp.inf, jnp.float32))
  )
  labels, distances = assign(points, centroids, chunk_size=chunk_size)
  return KMeansResult(
    centroids=centroids, assignments=labels, inertia=jnp.sum(distances), iterations=iterations
  )


def kmeans(
  key: jax.Array,
  points: ArrayLike,
  num_clusters: int,
  *,
  max_iterations: int = 300,
  tolerance: float = 1e-4,
  num_init: int = 1,
  num_local_trials: int | None = None,
  chunk_size: int | None = None,
) -> KMeansResult:
  """k-means: `num_init` seeded k-means++ starts, Lloyd from each, the lowest inertia kept.

  Args:
    key: PRNG key (the result is a function of it and the points).
    points: `[P, D]` finite values.
    num_clusters: k, in [1, P] (static under jit).
    max_iterations, tolerance: see `lloyd`.
    num_init: independent starts (vmapped; scikit-learn's `n_init`).
    num_local_trials: see `kmeans_plusplus`.
    chunk_size: rows per distance chunk (None: all at once).

  Raises:
    ValueError: bad shapes or k (always), NaN/inf (when `points` is concrete).
  """
  check_inputs(points, num_clusters)
  if num_init < 1:
    raise ValueError(f"num_init must be >= 1, got {num_init}")
  points = jnp.asarray(points, jnp.float32)

  def one_start(start_key):
    initial = kmeans_plusplus(
      start_key,
      points,
      num_clusters,
      num_local_trials=num_local_trials,
      chunk_size=chunk_size,
    )
    return lloyd(
      points, initial, max_iterations=max_iterations, tolerance=tolerance, chunk_size=chunk_size
    )

  results = jax.vmap(one_start)(jax.random.split(key, num_init))
  best = jnp.argmin(results.inertia)
  return jax.tree.map(lambda x: x[best], results)
