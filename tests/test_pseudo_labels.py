"""KD-Semi and DeepProp pseudo-labels: hand-built graphs, brute-force references, jit == no-jit."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.distance import cdist
from sklearn.neighbors import NearestNeighbors
from sklearn.semi_supervised import LabelSpreading

from rare_jax.deep import pseudo_labels

# ----------------------------------------------------------------------------------------------
# Reference implementations (dense numpy).


def brute_force_knn(features, k, gamma):
  normalized = features / np.linalg.norm(features, axis=1, keepdims=True)
  similarities = normalized @ normalized.T
  np.fill_diagonal(similarities, -np.inf)
  order = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
  values = np.take_along_axis(similarities, order, axis=1)
  return order, np.maximum(values, 0.0) ** gamma


def dense_normalized_graph(neighbors, weights):
  pool_size = neighbors.shape[0]
  affinity = np.zeros((pool_size, pool_size))
  for i in range(pool_size):
    for m in range(neighbors.shape[1]):
      affinity[i, neighbors[i, m]] += weights[i, m]
  symmetric = affinity + affinity.T
  degrees = symmetric.sum(axis=1)
  inv_sqrt = np.where(degrees > 0, 1.0 / np.sqrt(np.where(degrees > 0, degrees, 1)), 0.0)
  return inv_sqrt[:, None] * symmetric * inv_sqrt[None, :]


def dense_propagate(neighbors, weights, seeds, alpha):
  graph = dense_normalized_graph(np.asarray(neighbors), np.asarray(weights, np.float64))
  targets = np.asarray(pseudo_labels.seed_matrix(seeds), np.float64)  # [C, P, 2]
  system = np.eye(graph.shape[0]) - alpha * graph
  return np.stack([np.linalg.solve(system, targets[c]) for c in range(targets.shape[0])])


def two_cluster_graph(size=6, bridge=0.01):
  """Two cliques of `size` nodes (weight 1 inside), joined by one weak edge 0 -- size."""
  pool_size = 2 * size
  neighbors = np.zeros((pool_size, size), np.int32)
  weights = np.zeros((pool_size, size), np.float32)
  for i in range(pool_size):
    base = 0 if i < size else size
    others = [j for j in range(base, base + size) if j != i]
    neighbors[i, : size - 1] = others
    weights[i, : size - 1] = 1.0
    # The last slot: the bridge for nodes 0 and `size`, otherwise a zero-weight self-free filler.
    if i == 0:
      neighbors[i, -1], weights[i, -1] = size, bridge
    elif i == size:
      neighbors[i, -1], weights[i, -1] = 0, bridge
    else:
      neighbors[i, -1], weights[i, -1] = others[0], 0.0
  return neighbors, weights


@functools.cache
def _compiled(name, **static):
  """One jitted function per (function, static arguments), shared by the tests."""
  return jax.jit(functools.partial(getattr(pseudo_labels, name), **static))


def propagate(neighbors, weights, seeds, **static):
  return _compiled("propagate", **static)(neighbors, weights, seeds)


def knn_graph(features, **static):
  return _compiled("knn_graph", **static)(features)


def deep_prop_pseudo_labels(scores, unlabeled):
  return _compiled("deep_prop_pseudo_labels")(scores, unlabeled)


@pytest.fixture(scope="module")
def jitted():
  return {
    "knn": jax.jit(functools.partial(pseudo_labels.knn_graph, k=4, gamma=3.0, block_size=5)),
    "propagate": jax.jit(functools.partial(pseudo_labels.propagate, alpha=0.99, iterations=20)),
    "labels": jax.jit(pseudo_labels.deep_prop_pseudo_labels),
    "kd_semi": jax.jit(functools.partial(pseudo_labels.kd_semi_pseudo_positives, threshold=0.9)),
  }


# ----------------------------------------------------------------------------------------------
# KD-Semi


def test_kd_semi_threshold_and_labeled():
  probabilities = jnp.array([[0.97, 0.98, 0.99, 0.5, 0.985], [0.1, 0.98, 0.2, 0.999, 0.0]])
  unlabeled = jnp.array([[True, True, True, True, False], [True, True, True, False, True]])
  got = pseudo_labels.kd_semi_pseudo_positives(probabilities, unlabeled, threshold=0.98)
  # >= threshold counts (0.98 itself); labeled images (0.985, 0.999) are never marked.
  expected = [[False, True, True, False, False], [False, True, False, False, False]]
  np.testing.assert_array_equal(got, expected)
  lower = pseudo_labels.kd_semi_pseudo_positives(probabilities, unlabeled, threshold=0.9)
  np.testing.assert_array_equal(lower[0], [True, True, True, False, False])


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.5, 1.5])
def test_kd_semi_rejects_bad_threshold(threshold):
  with pytest.raises(ValueError, match="threshold"):
    pseudo_labels.kd_semi_pseudo_positives(
      jnp.zeros((1, 3)), jnp.ones((1, 3), bool), threshold=threshold
    )


def test_kd_semi_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="unlabeled"):
    pseudo_labels.kd_semi_pseudo_positives(jnp.zeros((2, 3)), jnp.ones((2, 4), bool), threshold=0.9)


def test_kd_semi_matches_numpy_eager_and_jit(jitted):
  rng = np.random.default_rng(3)
  probabilities = rng.uniform(size=(3, 50)).astype(np.float32)
  probabilities[:, :4] = np.float32(0.9)  # exactly at the threshold: pseudo-positive
  probabilities[:, 4:8] = np.nextafter(np.float32(0.9), np.float32(0))  # just below: not
  unlabeled = rng.uniform(size=(3, 50)) < 0.7
  unlabeled[:, :8] = True
  expected = (probabilities >= np.float32(0.9)) & unlabeled
  assert expected.sum() > 12 and (~unlabeled & (probabilities >= 0.9)).any()
  eager = pseudo_labels.kd_semi_pseudo_positives(probabilities, unlabeled, threshold=0.9)
  np.testing.assert_array_equal(eager, expected)
  np.testing.assert_array_equal(jitted["kd_semi"](probabilities, unlabeled), expected)


# ----------------------------------------------------------------------------------------------
# kNN graph


@pytest.mark.parametrize("block_size", [1, 8, 1024])
def test_knn_graph_matches_brute_force(block_size):
  rng = np.random.default_rng(0)
  features = rng.normal(size=(37, 6)).astype(np.float32)
  neighbors, weights = knn_graph(features, k=5, gamma=3.0, block_size=block_size)
  expected_neighbors, expected_weights = brute_force_knn(features.astype(np.float64), 5, 3.0)
  assert neighbors.dtype == jnp.int32 and weights.dtype == jnp.float32
  np.testing.assert_array_equal(neighbors, expected_neighbors)
  np.testing.assert_allclose(weights, expected_weights, rtol=1e-4, atol=1e-6)
  assert not np.any(np.asarray(neighbors) == np.arange(37)[:, None]), "self must be excluded"


def test_knn_graph_clips_negative_similarities():
  rng = np.random.default_rng(1)
  features = rng.normal(size=(12, 3)).astype(np.float32)
  # k = P - 1: every other image is a neighbour, so negative similarities appear and clip to 0.
  neighbors, weights = knn_graph(features, k=11, gamma=2.0, block_size=4)
  expected_neighbors, expected_weights = brute_force_knn(features.astype(np.float64), 11, 2.0)
  np.testing.assert_array_equal(neighbors, expected_neighbors)
  np.testing.assert_allclose(weights, expected_weights, rtol=1e-4, atol=1e-6)
  assert np.sum(np.asarray(weights) == 0) > 0 and np.all(np.asarray(weights) >= 0)
  for i in range(12):
    assert sorted(np.asarray(neighbors[i]).tolist()) == [j for j in range(12) if j != i]


def test_knn_graph_duplicates_are_neighbours():
  features = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
  neighbors, weights = knn_graph(features, k=1, gamma=3.0)
  np.testing.assert_array_equal(neighbors[:, 0], [1, 0, 3, 2])
  np.testing.assert_allclose(weights[:, 0], [1.0, 1.0, 0.8**3, 0.8**3], rtol=1e-5)


@pytest.mark.parametrize(
  "kwargs, match",
  [({"k": 0}, "k must"), ({"k": 10}, "k must"), ({"k": 2, "block_size": 0}, "block_size")],
)
def test_knn_graph_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    pseudo_labels.knn_graph(np.ones((10, 3), np.float32), **kwargs)


def test_knn_graph_matches_sklearn_eager_and_jit(jitted):
  """Neighbours by cosine distance from scikit-learn; weights [cos]_+^3 of those distances."""
  rng = np.random.default_rng(2)
  features = rng.normal(size=(23, 4)).astype(np.float32)
  features[1] = 3.0 * features[0]  # the same direction at another norm: similarity 1
  search = NearestNeighbors(n_neighbors=4, metric="cosine", algorithm="brute")
  distances, ids = search.fit(features.astype(np.float64)).kneighbors()  # self excluded
  similarity = 1.0 - cdist(features, features, metric="cosine")  # float64
  for neighbors, weights in (
    pseudo_labels.knn_graph(features, k=4, gamma=3.0, block_size=5),
    jitted["knn"](features),
  ):
    neighbors = np.asarray(neighbors)
    np.testing.assert_allclose(weights, np.maximum(1.0 - distances, 0.0) ** 3, atol=1e-5)
    # The same neighbours as sklearn's, up to the order of ties (0 and 1 are one direction).
    np.testing.assert_allclose(
      np.take_along_axis(similarity, neighbors, axis=1), 1.0 - distances, atol=1e-5
    )
    assert not np.any(neighbors == np.arange(23)[:, None])
    untied = np.abs(np.diff(1.0 - distances, axis=1)).min(axis=1) > 1e-4
    np.testing.assert_array_equal(neighbors[untied], ids[untied])
    assert neighbors[0, 0] == 1 and neighbors[1, 0] == 0


# ----------------------------------------------------------------------------------------------
# Propagation


def test_propagation_spreads_within_clusters():
  neighbors, weights = two_cluster_graph()
  # Category 0: positive seed in cluster A (node 1), negative in B (node 8).
  # Category 1: the reverse. Category 2: no seeds at all.
  seeds = np.full((3, 12), -1, np.int8)
  seeds[0, 1], seeds[0, 8] = 1, 0
  seeds[1, 1], seeds[1, 8] = 0, 1
  scores = propagate(neighbors, weights, seeds, alpha=0.99, iterations=20)
  assert scores.shape == (3, 12, 2)
  positive, negative, weight = deep_prop_pseudo_labels(scores, seeds < 0)
  cluster_a = np.arange(12) < 6
  unlabeled = np.asarray(seeds[0] < 0)
  np.testing.assert_array_equal(positive[0], cluster_a & unlabeled)
  np.testing.assert_array_equal(negative[0], ~cluster_a & unlabeled)
  np.testing.assert_array_equal(positive[1], ~cluster_a & unlabeled)
  np.testing.assert_array_equal(negative[1], cluster_a & unlabeled)
  # A weak bridge: confident labels inside the clusters.
  assert np.all(np.asarray(weight[:2])[:, unlabeled] > 0.5)
  # No seeds: nothing propagates, nothing is pseudo-labeled.
  np.testing.assert_array_equal(scores[2], 0.0)
  assert not positive[2].any() and not negative[2].any() and not weight[2].any()


def test_propagation_matches_dense_solve_on_hand_graph():
  neighbors, weights = two_cluster_graph()
  seeds = np.full((2, 12), -1, np.int8)
  seeds[0, [1, 2]], seeds[0, 8] = 1, 0
  seeds[1, 3], seeds[1, [7, 9, 10]] = 1, 0
  # CG on a 12-node system converges within 12 steps in exact arithmetic.
  scores = propagate(neighbors, weights, seeds, alpha=0.99, iterations=40)
  expected = dense_propagate(neighbors, weights, seeds, 0.99)
  np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_propagation_matches_dense_solve_on_knn_graph():
  rng = np.random.default_rng(4)
  features = rng.normal(size=(60, 8)).astype(np.float32)
  neighbors, weights = knn_graph(features, k=6)
  seeds = np.full((2, 60), -1, np.int8)
  seeds[0, :3], seeds[0, 10:20] = 1, 0
  seeds[1, 30:32], seeds[1, 40:50] = 1, 0
  expected = dense_propagate(neighbors, weights, seeds, 0.9)
  scale = np.abs(expected).max()
  converged = propagate(neighbors, weights, seeds, alpha=0.9, iterations=60)
  np.testing.assert_allclose(converged, expected, atol=1e-4 * scale)
  # The default 20 steps (the authors' maxiter) already get close.
  default = propagate(neighbors, weights, seeds, alpha=0.9)
  np.testing.assert_allclose(default, expected, atol=2e-2 * scale)


def test_unbalanced_seeds_follow_the_plain_system():
  neighbors, weights = two_cluster_graph()
  seeds = np.full((1, 12), -1, np.int8)
  seeds[0, 1], seeds[0, [6, 7, 8]] = 1, 0
  balanced = np.asarray(pseudo_labels.seed_matrix(seeds))
  np.testing.assert_allclose(balanced[0, [6, 7, 8], 0], 1 / 3)
  np.testing.assert_allclose(balanced[0, 1, 1], 1.0)
  plain = propagate(neighbors, weights, seeds, alpha=0.5, iterations=40, balance_seeds=False)
  graph = dense_normalized_graph(neighbors, weights.astype(np.float64))
  targets = np.stack([seeds[0] == 0, seeds[0] == 1], axis=-1).astype(np.float64)
  expected = np.linalg.solve(np.eye(12) - 0.5 * graph, targets)
  np.testing.assert_allclose(plain[0], expected, rtol=1e-4, atol=1e-6)


def test_extra_iterations_are_stable():
  neighbors, weights = two_cluster_graph()
  seeds = np.full((1, 12), -1, np.int8)
  seeds[0, 0], seeds[0, 11] = 1, 0
  many = np.asarray(propagate(neighbors, weights, seeds, iterations=300))
  assert np.all(np.isfinite(many))
  np.testing.assert_allclose(many, dense_propagate(neighbors, weights, seeds, 0.99), rtol=1e-3)


def test_propagation_end_to_end_on_two_feature_clusters():
  rng = np.random.default_rng(5)
  centers = np.array([[5.0, 0, 0, 0], [0, 5.0, 0, 0]], np.float32)
  features = np.concatenate(
    [centers[0] + rng.normal(size=(20, 4)), centers[1] + rng.normal(size=(30, 4))]
  )
  neighbors, weights = knn_graph(features.astype(np.float32), k=5, block_size=16)
  seeds = np.full((1, 50), -1, np.int8)
  seeds[0, :3], seeds[0, 20:25] = 1, 0
  scores = propagate(neighbors, weights, seeds)
  positive, negative, _ = deep_prop_pseudo_labels(scores, seeds < 0)
  truth = np.arange(50) < 20
  unlabeled = seeds[0] < 0
  np.testing.assert_array_equal(positive[0], truth & unlabeled)
  np.testing.assert_array_equal(negative[0], ~truth & unlabeled)


@pytest.mark.parametrize(
  "kwargs, match",
  [({"alpha": 1.0}, "alpha"), ({"alpha": 0.0}, "alpha"), ({"iterations": 0}, "iterations")],
)
def test_propagate_rejects_bad_arguments(kwargs, match):
  neighbors, weights = two_cluster_graph()
  with pytest.raises(ValueError, match=match):
    pseudo_labels.propagate(neighbors, weights, np.zeros((1, 12), np.int8), **kwargs)


def test_propagate_rejects_bad_inputs():
  neighbors, weights = two_cluster_graph()
  with pytest.raises(ValueError, match="seeds has shape"):
    pseudo_labels.propagate(neighbors, weights, np.zeros((1, 11), np.int8))
  with pytest.raises(ValueError, match="weights has shape"):
    pseudo_labels.propagate(neighbors, weights[:, :2], np.zeros((1, 12), np.int8))
  with pytest.raises(ValueError, match="seeds must hold"):
    pseudo_labels.propagate(neighbors, weights, np.full((1, 12), 2, np.int8))
  with pytest.raises(ValueError, match="neighbors must be pool positions"):
    pseudo_labels.propagate(neighbors + 12, weights, np.zeros((1, 12), np.int8))


def label_spreading(neighbors, weights, seeds, alpha):
  """scikit-learn's LabelSpreading (its own normalised graph and iteration) on the symmetrised
  kNN affinity A + A^T; rows are its label distributions, columns (negative, positive)."""
  affinity = np.zeros((len(neighbors), len(neighbors)))
  np.add.at(affinity, (np.arange(len(neighbors))[:, None], neighbors), weights)
  symmetric = affinity + affinity.T
  spread = LabelSpreading(
    kernel=lambda a, b: symmetric, alpha=alpha, max_iter=100_000, tol=1e-12
  ).fit(np.arange(len(neighbors), dtype=np.float64)[:, None], seeds)
  assert spread.n_iter_ < 100_000
  return spread.label_distributions_


@pytest.mark.parametrize("graph", ["hand", "knn"])
def test_propagate_matches_sklearn_label_spreading_eager_and_jit(graph):
  """Unbalanced seeds (one-hot Y, as sklearn's): the row-normalised scores are sklearn's label
  distributions; balanced seeds: the dense closed form (I - alpha W)^-1 Y."""
  if graph == "hand":
    neighbors, weights = two_cluster_graph()
    seeds = np.full((2, 12), -1, np.int8)
    seeds[0, 1], seeds[0, 8] = 1, 0
    seeds[1, 4], seeds[1, [2, 9]] = 1, 0
    alpha = 0.99
  else:
    rng = np.random.default_rng(7)
    features = rng.normal(size=(40, 5)).astype(np.float32)
    neighbors, weights = (np.asarray(x) for x in knn_graph(features, k=5, gamma=3.0))
    seeds = np.full((2, 40), -1, np.int8)
    seeds[0, [0, 3]], seeds[0, 10:20] = 1, 0
    seeds[1, 25], seeds[1, [5, 30, 31, 32]] = 1, 0
    alpha = 0.8
  static = dict(alpha=alpha, iterations=60, balance_seeds=False)
  eager = pseudo_labels.propagate(neighbors, weights, seeds, **static)
  jitted = propagate(neighbors, weights, seeds, **static)
  for scores in (eager, jitted):
    scores = np.asarray(scores, np.float64)
    for c in range(len(seeds)):
      expected = label_spreading(neighbors, weights.astype(np.float64), seeds[c], alpha)
      np.testing.assert_allclose(
        scores[c] / scores[c].sum(axis=1, keepdims=True), expected, atol=1e-4
      )
  balanced = propagate(neighbors, weights, seeds, alpha=alpha, iterations=60)
  expected = dense_propagate(neighbors, weights, seeds, alpha)
  np.testing.assert_allclose(balanced, expected, atol=1e-4 * np.abs(expected).max())


# ----------------------------------------------------------------------------------------------
# Pseudo-labels and weights


def test_deep_prop_labels_and_entropy_weights_by_hand():
  scores = jnp.array(
    [[[3.0, 1.0], [1.0, 1.0], [0.0, 2.0], [0.0, 0.0], [1.0, 3.0], [-1e-7, 2.0], [5.0, 0.0]]]
  )
  unlabeled = jnp.array([[True, True, True, True, True, True, False]])
  positive, negative, weight = deep_prop_pseudo_labels(scores, unlabeled)
  np.testing.assert_array_equal(positive[0], [False, False, True, False, True, True, False])
  np.testing.assert_array_equal(negative[0], [True, True, False, False, False, False, False])
  # (0.75, 0.25): entropy in bits = 0.75 log2(4/3) + 0.25 log2(4) = 0.311278 + 0.5.
  quarter = 1.0 - (0.75 * math.log2(4 / 3) + 0.25 * 2.0)
  expected = [quarter, 0.0, 1.0, 0.0, quarter, 1.0, 0.0]
  np.testing.assert_allclose(weight[0], expected, atol=1e-6)
  np.testing.assert_allclose(quarter, 0.188722, atol=1e-6)
  assert weight.dtype == jnp.float32


def test_deep_prop_matches_numpy_entropy_weights_eager_and_jit(jitted):
  rng = np.random.default_rng(6)
  scores = rng.uniform(-1e-6, 1.0, size=(3, 40, 2)).astype(np.float32)
  scores[0, :3] = [[0.0, 0.0], [0.0, 0.7], [0.4, 0.4]]  # unreached, certain, a 50/50 split
  unlabeled = rng.uniform(size=(3, 40)) < 0.8
  unlabeled[0, :3] = True
  # Iscen et al. Eq. 11 in numpy: z_hat = [z]_+ / sum, omega = 1 - H(z_hat) / log 2.
  clipped = np.maximum(scores.astype(np.float64), 0.0)
  total = clipped.sum(axis=-1)
  z_hat = clipped / np.where(total > 0, total, 1.0)[..., None]
  with np.errstate(divide="ignore", invalid="ignore"):
    entropy_bits = -np.sum(np.where(z_hat > 0, z_hat * np.log2(z_hat), 0.0), axis=-1)
  reached = unlabeled & (total > 0)
  expected_weight = np.where(reached, 1.0 - entropy_bits, 0.0)
  expected_positive = reached & (z_hat[..., 1] > z_hat[..., 0])
  expected_negative = reached & ~(z_hat[..., 1] > z_hat[..., 0])
  np.testing.assert_allclose(expected_weight[0, :3], [0.0, 1.0, 0.0], atol=1e-12)
  assert np.sum((expected_weight > 0.05) & (expected_weight < 0.95)) > 20  # not all 0 or 1
  for positive, negative, weight in (
    pseudo_labels.deep_prop_pseudo_labels(scores, unlabeled),
    jitted["labels"](scores, unlabeled),
  ):
    np.testing.assert_array_equal(positive, expected_positive)
    np.testing.assert_array_equal(negative, expected_negative)
    np.testing.assert_allclose(weight, expected_weight, atol=1e-5)


def test_deep_prop_rejects_bad_shapes():
  with pytest.raises(ValueError, match=r"\[C, P, 2\]"):
    pseudo_labels.deep_prop_pseudo_labels(jnp.zeros((2, 5, 3)), jnp.ones((2, 5), bool))
  with pytest.raises(ValueError, match="unlabeled"):
    pseudo_labels.deep_prop_pseudo_labels(jnp.zeros((2, 5, 2)), jnp.ones((2, 4), bool))


def test_class_balance_weights_by_hand():
  labels = jnp.array([[1, 0, 0, -1, -1, -1, -1, -1], [-1, -1, -1, -1, -1, -1, -1, 0]], jnp.int8)
  pseudo_positive = jnp.array([[0, 0, 0, 1, 0, 0, 0, 0], [0] * 8], bool)
  pseudo_negative = jnp.array([[1, 0, 0, 0, 1, 1, 1, 1], [0] * 8], bool)  # labeled 0 ignored
  got = pseudo_labels.class_balance_weights(labels, pseudo_positive, pseudo_negative)
  # Category 0: 6 negatives (2 human + 4 pseudo), 2 positives, n = 8 -> 4/6 and 4/2.
  # Category 1: one negative, no positive -> 0.5 and 0.
  np.testing.assert_allclose(got, [[4 / 6, 2.0], [0.5, 0.0]], rtol=1e-6)
