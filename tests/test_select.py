"""Hand-built cases for rankings, the adaptive rule and pseudo-negatives."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from rare_jax.active import select
from rare_jax.infra import sharding


def test_cosine_scores_match_numpy():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(20, 5)).astype(np.float32)
  seed_ids = np.array([[0, 1, 2], [5, 6, 7]])
  got = np.asarray(select.cosine_scores(jnp.asarray(features), jnp.asarray(seed_ids)))
  normalized = features / np.linalg.norm(features, axis=1, keepdims=True)
  for c in range(2):
    centroid = normalized[seed_ids[c]].mean(0)
    expected = normalized @ centroid / np.linalg.norm(centroid)
    np.testing.assert_allclose(got[c], expected, rtol=1e-5, atol=1e-6)


def test_adaptive_switch():
  num_positive = jnp.array([5, 5, 7, 9])
  num_negative = jnp.array([6, 5, 3, 20])
  got = select.use_positive_rule(
    querying="adaptive",
    has_model=jnp.array(True),
    num_positive=num_positive,
    num_negative=num_negative,
  )
  # |L_p| < |L_n| -> most likely positive; otherwise the margin.
  np.testing.assert_array_equal(got, [True, False, False, True])
  before_model = select.use_positive_rule(
    querying="adaptive",
    has_model=jnp.array(False),
    num_positive=num_positive,
    num_negative=num_negative,
  )
  np.testing.assert_array_equal(before_model, [True] * 4)
  tropel = select.use_positive_rule(
    querying="most_likely_positive",
    has_model=jnp.array(True),
    num_positive=num_positive,
    num_negative=num_negative,
  )
  np.testing.assert_array_equal(tropel, [True] * 4)
  for querying, match in (("uncertainty", "querying must be one of"), ("random", "ranks nothing")):
    with pytest.raises(ValueError, match=match):
      select.use_positive_rule(
        querying=querying,
        has_model=jnp.array(True),
        num_positive=num_positive,
        num_negative=num_negative,
      )


def test_query_priority_positive_and_margin_never_requery():
  scores = jnp.array([[3.0, -0.1, 2.0, 0.2, -5.0, 0.05]] * 2)
  labels = jnp.array([[-1, -1, 1, -1, -1, 0]] * 2, jnp.int8)
  priority = select.query_priority(
    scores, labels=labels, use_positive_rule=jnp.array([True, False])
  )
  ids = np.asarray(select.top_unlabeled(priority, 3))
  # Category 0: highest scores among unlabeled (position 2 is labeled).
  np.testing.assert_array_equal(ids[0], [0, 3, 1])
  # Category 1: smallest |logit| among unlabeled (position 5 is labeled although |0.05| is least).
  np.testing.assert_array_equal(ids[1], [1, 3, 0])


def test_num_pseudo_negatives_rounds_like_python():
  num_positive = jnp.array([5, 3, 12, 0])
  num_negative = jnp.array([5, 5, 100, 0])
  got = np.asarray(select.num_pseudo_negatives(num_positive, num_negative, 100.0))
  np.testing.assert_array_equal(got, [550, 350, 2200, 0])
  got = np.asarray(select.num_pseudo_negatives(num_positive, num_negative, 1.0))
  expected = [
    round(1.0 * (p + 0.1 * n)) for p, n in zip([5, 3, 12, 0], [5, 5, 100, 0], strict=True)
  ]
  np.testing.assert_array_equal(got, expected)  # 5.5 -> 6, 3.5 -> 4 (half to even)


def test_sortable_keys_preserve_order():
  values = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, np.inf], np.float32)
  keys = np.asarray(select.sortable_keys(jnp.asarray(values))).astype(np.int64)
  assert np.all(np.diff(keys) > 0)


def test_smallest_k_mask_exact_count_and_ties():
  keys = jnp.array([5, 1, 3, 3, 3, 0, 9], jnp.uint32)
  valid = jnp.array([True, True, True, True, True, False, True])
  mask = np.asarray(select.smallest_k_mask(keys, valid, jnp.int32(3)))
  # 1 and the first two tied 3s (lowest positions); position 5 is not valid.
  np.testing.assert_array_equal(mask, [False, True, True, True, False, False, False])
  assert np.asarray(select.smallest_k_mask(keys, valid, jnp.int32(0))).sum() == 0
  assert np.asarray(select.smallest_k_mask(keys, valid, jnp.int32(100))).sum() == 6


def test_bottom_half_matches_partition():
  rng = np.random.default_rng(1)
  scores = rng.normal(size=(3, 101)).astype(np.float32)
  unlabeled = rng.random((3, 101)) > 0.2
  mask = np.asarray(select.bottom_half(jnp.asarray(scores), jnp.asarray(unlabeled)))
  for c in range(3):
    candidates = np.flatnonzero(unlabeled[c])
    order = candidates[np.argsort(scores[c, candidates], kind="stable")]
    expected = np.zeros(101, bool)
    expected[order[: len(candidates) // 2]] = True
    np.testing.assert_array_equal(mask[c], expected)


def test_pseudo_negatives_count_range_and_uniformity():
  pool = 400
  scores = jnp.tile(jnp.arange(pool, dtype=jnp.float32)[None], (2, 1))  # position = rank
  labels_known = np.zeros((2, pool), bool)
  labels_known[:, [3, 10, 50, 399]] = True
  unlabeled = jnp.asarray(~labels_known)
  num = jnp.array([30, 1000])
  draw = jax.jit(
    lambda r: select.pseudo_negatives(
      jax.random.fold_in(jax.random.key(0), r), scores=scores, unlabeled=unlabeled, num=num
    )
  )
  draws = []
  for r in range(200):
    mask = np.asarray(draw(r))
    half = (pool - 4) // 2
    bottom = np.flatnonzero(~labels_known[0])[:half]
    assert mask[0].sum() == 30
    assert mask[1].sum() == half  # asks for more than the bottom half holds: takes all of it
    assert set(np.flatnonzero(mask[0])) <= set(bottom)  # only the bottom 50%...
    assert not np.any(mask & labels_known)  # ...and never labeled images
    draws.append(mask[0])
  frequency = np.mean(draws, axis=0)[bottom]
  # Uniform: every candidate drawn with probability 30/198 (about 0.15).
  assert abs(frequency.mean() - 30 / 198) < 1e-6
  assert frequency.min() > 0.05 and frequency.max() < 0.3
  unjitted = select.pseudo_negatives(
    jax.random.fold_in(jax.random.key(0), 7), scores=scores, unlabeled=unlabeled, num=num
  )
  np.testing.assert_array_equal(np.asarray(unjitted)[0], draws[7])  # jit == no jit


def test_uniform_subset_draws_every_subset_equally_often_and_exactly_num():
  """6 candidates among 9 positions: 2 of them (15 subsets, drawn as ranks) and 4 of them (15
  subsets, drawn as the 2 left out) come out equally often; 0, all and more than all are
  exact; the ranks behind them are distinct, sorted and padded."""
  candidates = np.zeros((5, 9), bool)
  candidates[:, [0, 2, 3, 5, 7, 8]] = True
  num = jnp.array([2, 4, 0, 6, 50])
  draw = jax.jit(
    lambda r: select.uniform_subset(jax.random.fold_in(jax.random.key(0), r), candidates, num)
  )
  counts = [{}, {}]
  for r in range(3000):
    mask = np.asarray(draw(r))
    np.testing.assert_array_equal(mask.sum(1), [2, 4, 0, 6, 6])
    assert not np.any(mask & ~candidates)
    for row in (0, 1):
      subset = tuple(np.flatnonzero(mask[row]))
      counts[row][subset] = counts[row].get(subset, 0) + 1
  for row in (0, 1):
    assert len(counts[row]) == 15, counts[row]
    # 200 expected each; binomial sd about 14: 6 sd either way.
    assert min(counts[row].values()) > 115 and max(counts[row].values()) < 285, counts[row]
  ranks = np.asarray(
    select.distinct_ranks(
      jax.random.key(1), jnp.array([10, 1, 0, 1000]), jnp.array([5, 0, 0, 3]), 6
    )
  )
  no_rank = np.iinfo(np.int32).max
  for row, (population, count) in enumerate([(10, 5), (1, 0), (0, 0), (1000, 3)]):
    drawn = ranks[row, :count]
    assert len(set(drawn)) == count and np.all(np.diff(drawn) > 0)
    assert np.all((drawn >= 0) & (drawn < population)) and np.all(ranks[row, count:] == no_rank)
  with pytest.raises(ValueError, match="more than max_num=1"):
    select.uniform_subset(jax.random.key(0), jnp.asarray(candidates), num, max_num=1)


def _bisection_smallest_k_mask(keys, valid, k):
  """The previous implementation (32 bisection steps, ties by a cumulative sum), one row."""

  def step(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(jnp.logical_and(valid, keys <= mid), dtype=jnp.int32) >= jnp.maximum(k, 1)
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  k = jnp.minimum(k, jnp.sum(valid, dtype=jnp.int32))
  threshold, _ = jax.lax.fori_loop(0, 32, step, (jnp.uint32(0), jnp.uint32(0xFFFFFFFF)))
  below = jnp.logical_and(valid, keys < threshold)
  tied = jnp.logical_and(valid, keys == threshold)
  room = k - jnp.sum(below, dtype=jnp.int32)
  take_tied = jnp.logical_and(tied, jnp.cumsum(tied, dtype=jnp.int32) <= room)
  return jnp.logical_and(jnp.logical_or(below, take_tied), k > 0)


def test_radix_selection_equals_bisection_on_random_and_tied_keys():
  rng = np.random.default_rng(3)
  rows, pool = 8, 203  # not a multiple of the 32-bit words
  key_sets = [
    rng.integers(0, 2**32, (rows, pool), dtype=np.uint64).astype(np.uint32),
    rng.integers(0, 4, (rows, pool)).astype(np.uint32),  # many ties
    # Ties within a high-16-bit bin and at its edges, and the largest key.
    (rng.integers(0, 3, (rows, pool)) * 65536 + rng.integers(65532, 65536, (rows, pool))),
    np.asarray(select.sortable_keys(jnp.asarray(rng.normal(size=(rows, pool)).round(1)))),
  ]
  key_sets[2][:, :3] = 0xFFFFFFFF
  new = jax.jit(select.smallest_k_mask)
  old = jax.jit(jax.vmap(_bisection_smallest_k_mask))
  for keys in key_sets:
    for _ in range(3):
      valid = rng.random((rows, pool)) < rng.random()
      valid[0] = False  # nothing to choose
      k = rng.integers(0, pool // 2, rows).astype(np.int32)
      k[1], k[2] = 0, pool + 5  # none asked; more asked than valid
      args = (jnp.asarray(keys.astype(np.uint32)), jnp.asarray(valid), jnp.asarray(k))
      got = np.asarray(new(*args))
      np.testing.assert_array_equal(got, np.asarray(old(*args)))
      np.testing.assert_array_equal(got.sum(1), np.minimum(k, valid.sum(1)))


def test_selections_with_the_pool_split_over_8_devices_are_the_one_device_ones():
  """With `pool_sharding` (columns split over 8 devices: shard-local histograms summed across
  devices, positions of Trues found shard by shard, per-shard top-k merged), every selection
  equals the one-device one, ties included."""
  mesh = sharding.make_mesh([("data", 8)])
  split = NamedSharding(mesh, PartitionSpec(None, "data"))
  rng = np.random.default_rng(5)
  rows, pool = 4, 8 * 40

  def both(fn, *args, width=pool, **static):
    """(one device, split over the mesh) results of `fn(*args)` as NumPy arrays; the args
    `width` wide are split."""
    one = jax.jit(functools.partial(fn, **static))(*args)
    shardings = tuple(split if np.shape(a)[-1:] == (width,) else None for a in args)
    sharded = jax.jit(functools.partial(fn, pool_sharding=split, **static), in_shardings=shardings)
    return np.asarray(one), np.asarray(sharded(*args))  # jit places the uncommitted args

  key_sets = [
    rng.integers(0, 2**32, (rows, pool), dtype=np.uint64).astype(np.uint32),
    rng.integers(0, 4, (rows, pool)).astype(np.uint32),  # ties across shards
    (rng.integers(0, 3, (rows, pool)) * 65536 + rng.integers(65532, 65536, (rows, pool))),
  ]
  for keys in key_sets:
    valid = rng.random((rows, pool)) < 0.7
    valid[0] = False
    k = np.array([0, 5, pool // 3, pool + 5], np.int32)
    args = (jnp.asarray(keys.astype(np.uint32)), jnp.asarray(valid), jnp.asarray(k))
    one, split_result = both(select.smallest_k_mask, *args)
    np.testing.assert_array_equal(split_result, one)
    np.testing.assert_array_equal(one.sum(1), np.minimum(k, valid.sum(1)))
  scores = jnp.asarray(rng.normal(size=(rows, pool)).round(1).astype(np.float32))
  unlabeled = jnp.asarray(rng.random((rows, pool)) < 0.9)
  num = jnp.array([0, 7, 100, 1000], jnp.int32)

  def draw(scores, unlabeled, **kwargs):
    key = jax.random.key(3)
    return select.pseudo_negatives(key, scores=scores, unlabeled=unlabeled, num=num, **kwargs)

  one, split_result = both(draw, scores, unlabeled)
  np.testing.assert_array_equal(split_result, one)
  assert one.sum() == 0 + 7 + 100 + np.asarray(unlabeled).sum(1)[3] // 2
  # Top-k: many ties (the lowest positions win, across shards for num = 40) and labeled images
  # (-inf, or -1 for random_priority's int32); 40 columns per device, so num = 41 takes the
  # plain top-k.
  ties = rng.integers(0, 3, (rows, pool))
  priorities = [
    jnp.where(unlabeled, jnp.asarray(ties, jnp.float32), -jnp.inf),
    jnp.where(unlabeled, jnp.asarray(ties, jnp.int32), -1),
  ]
  for priority in priorities:
    for num_queries in (1, 7, 40, 41):
      one, split_result = both(select.top_unlabeled, priority, num=num_queries)
      np.testing.assert_array_equal(split_result, one)
  mask = rng.random((rows, pool)) < np.array([[0.0], [0.02], [0.5], [1.0]])
  ranks = jnp.asarray(np.tile(np.arange(-1, pool + 2), (rows, 1)))
  one, split_result = both(select.nth_true, jnp.asarray(mask), ranks, fill_value=-3)
  np.testing.assert_array_equal(split_result, one)
  assert np.sum(one >= 0) == mask.sum()
  # 40 columns per device (no whole block), 300 (2 and a part): counted shard by shard (a psum
  # of the counts). A pool that 8 devices cannot split evenly: the plain sum.
  counted = jax.jit(functools.partial(select.count_true, pool_sharding=split))
  for columns in (pool, 8 * 300, 8 * 300 + 3):
    mask = jnp.asarray(rng.random((rows, columns)) < np.array([[0.0], [0.02], [0.5], [1.0]]))
    even = columns % 8 == 0
    if even:
      one, split_result = both(select.count_true, mask, width=columns)
      np.testing.assert_array_equal(split_result, one)
      mask = jax.device_put(mask, split)
    np.testing.assert_array_equal(counted(mask), np.asarray(mask).sum(1))
    text = counted.lower(mask).as_text()
    assert ("psum" in text or "all_reduce" in text) == even, columns
  with pytest.raises(ValueError, match="only the last"):
    select.pool_axis(NamedSharding(mesh, PartitionSpec("data", None)))


@pytest.mark.parametrize("size", [0, 1, 126, 127, 128, 254, 1000, 127 * 300 + 5])
def test_count_true_is_an_exact_sum(size):
  """int8 sums over blocks of 127, then int32: exact for all-True rows (no int8 overflow)."""
  rng = np.random.default_rng(size)
  mask = rng.random((2, 4, size)) < np.array([0.0, 0.3, 0.9, 1.0])[:, None]
  counts = jax.jit(select.count_true)(jnp.asarray(mask))
  assert counts.dtype == jnp.int32
  np.testing.assert_array_equal(counts, mask.sum(-1))
  with pytest.raises(ValueError, match="mask of dtype int8; expected bool"):
    select.count_true(jnp.asarray(mask, jnp.int8))  # int8 block sums of non-0/1 values overflow


def test_nth_true_is_nonzero():
  rng = np.random.default_rng(4)
  mask = rng.random((3, 203)) < np.array([[0.0], [0.1], [0.9]])
  ranks = np.tile(np.arange(-1, 210), (3, 1))
  got = np.asarray(select.nth_true(jnp.asarray(mask), jnp.asarray(ranks), fill_value=7))
  for row in range(3):
    positions = np.flatnonzero(mask[row])
    expected = [positions[n] if 0 <= n < len(positions) else 7 for n in ranks[row]]
    np.testing.assert_array_equal(got[row], expected)
  assert np.asarray(select.nth_true(jnp.asarray(mask), jnp.asarray(ranks)))[0, 0] == 203
