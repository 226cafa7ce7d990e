"""k-means: scikit-learn's objective within 1%, determinism, chunking, bad input."""

import functools

import jax
import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from rare_jax.deep import kmeans


def _problem(name):
  if name == "separated":
    points, _ = make_blobs(1500, n_features=8, centers=6, random_state=0)
    return points.astype(np.float32), 6
  # Overlapping: 20 wide clusters in 16-d, many local optima.
  points, _ = make_blobs(2000, n_features=16, centers=20, cluster_std=6.0, random_state=1)
  return points.astype(np.float32), 20


@pytest.fixture(scope="module")
def cluster():
  return jax.jit(
    functools.partial(kmeans.kmeans, num_init=3, chunk_size=512),
    static_argnames="num_clusters",
  )


@pytest.mark.parametrize("name", ["separated", "overlapping"])
def test_objective_within_one_percent_of_sklearn(cluster, name):
  points, k = _problem(name)
  result = cluster(jax.random.key(0), points, num_clusters=k)
  reference = min(KMeans(k, n_init=3, random_state=seed).fit(points).inertia_ for seed in range(3))
  ratio = float(result.inertia) / reference
  assert ratio <= 1.01, (name, ratio)
  # The reported inertia is the objective of the returned centroids and assignments.
  recomputed = np.sum((points - np.asarray(result.centroids)[np.asarray(result.assignments)]) ** 2)
  np.testing.assert_allclose(float(result.inertia), recomputed, rtol=1e-4)
  assert 1 <= int(result.iterations) <= 300


def test_deterministic_for_a_seed(cluster):
  points, k = _problem("overlapping")
  first = cluster(jax.random.key(3), points, num_clusters=k)
  again = cluster(jax.random.key(3), points, num_clusters=k)
  np.testing.assert_array_equal(np.asarray(first.centroids), np.asarray(again.centroids))
  np.testing.assert_array_equal(np.asarray(first.assignments), np.asarray(again.assignments))
  seeds = kmeans.kmeans_plusplus(jax.random.key(3), points, k)
  other = kmeans.kmeans_plusplus(jax.random.key(4), points, k)
  assert not np.array_equal(np.asarray(seeds), np.asarray(other))


def test_chunked_assignment_matches_whole():
  rng = np.random.default_rng(0)
  points = rng.normal(size=(103, 5)).astype(np.float32)
  centroids = rng.normal(size=(7, 5)).astype(np.float32)
  labels, distances = kmeans.assign(points, centroids, chunk_size=10)
  full = ((points[:, None] - centroids[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(np.asarray(labels), full.argmin(1))
  np.testing.assert_allclose(np.asarray(distances), full.min(1), rtol=1e-4, atol=1e-5)


def test_lloyd_matches_sklearn_from_the_same_centers():
  """Four Lloyd steps from fixed centers, tolerance 0: scikit-learn's Lloyd from the same
  centers (max_iter=4, tol=0) must give the same centroids, assignments and inertia."""
  points, k = _problem("overlapping")
  initial = points[:k]  # overlapping clusters: far from converged after 4 steps
  result = jax.jit(functools.partial(kmeans.lloyd, max_iterations=4, tolerance=0.0))(
    points, initial
  )
  reference = KMeans(k, init=initial.astype(np.float64), n_init=1, max_iter=4, tol=0.0)
  reference.fit(points.astype(np.float64))
  assert reference.n_iter_ == 4  # sklearn did not stop early: the same 4 updates
  assert int(result.iterations) == 4
  assert np.bincount(reference.labels_, minlength=k).min() > 0  # no empty-cluster relocation
  np.testing.assert_allclose(result.centroids, reference.cluster_centers_, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(result.assignments, reference.labels_)
  np.testing.assert_allclose(float(result.inertia), reference.inertia_, rtol=1e-4)
  # One step differs from four: the step count is checked by the centroids too.
  one = kmeans.lloyd(points, initial, max_iterations=1, tolerance=0.0)
  assert np.abs(np.asarray(one.centroids) - reference.cluster_centers_).max() > 1e-2


@pytest.mark.parametrize(
  "points, k, match",
  [
    (np.zeros((5, 2), np.float32), 6, "num_clusters=6"),
    (np.zeros((5, 2), np.float32), 0, "num_clusters=0"),
    (np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]], np.float32), 2, "NaN.*row 1"),
    (np.zeros((5,), np.float32), 2, r"shape \(5,\)"),
  ],
)
def test_bad_input_raises(points, k, match):
  with pytest.raises(ValueError, match=match):
    kmeans.kmeans(jax.random.key(0), points, k)
