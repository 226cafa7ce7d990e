"""Rankings, the query rules and pseudo-negatives (paper Algorithm 1, lines 3-4, 9-14).

Everything here is pure and jittable, works on `[C, P]` score arrays (C categories of a group,
P images in the pool) and touches each array a bounded number of times: top-k instead of full
sorts, an order statistic by radix selection over 32-bit keys (two histogram passes) instead
of sorting for the bottom-50% rule, and uniform sampling without replacement in rank space
(random numbers and sorts of the sample's size, not the pool's).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rare_jax.active import linear

# Querying rules. "adaptive": paper lines 9-12; "most_likely_positive": Tropel's rule;
# "random": uniform over the unlabeled pool (the floor of active learning, not in the paper).
QUERYING_RULES = ("adaptive", "most_likely_positive", "random")


def _sum_last_axis(x: jax.Array) -> jax.Array:
  """Sum over the last axis by pairwise halving: elementwise adds in an order fixed by the
  width alone (XLA's reductions vectorise by shape). Fuses into one pass."""
  while x.shape[-1] > 1:
    half = x.shape[-1] // 2
    folded = x[..., :half] + x[..., half : 2 * half]
    x = jnp.concatenate([folded, x[..., 2 * half :]], axis=-1) if x.shape[-1] % 2 else folded
  return x[..., 0]


def _exact_square_terms(x: jax.Array) -> jax.Array:
  """`[..., 3K]` float32 terms whose sum is `x * x` summed over the last axis, each product
  exact: x = hi + lo with 12 significant bits each, x^2 = hi^2 + 2 hi lo + lo^2."""
  x = x.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  hi = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000), jnp.float32)
  lo = x - hi  # exact
  return jnp.concatenate([hi * hi, (2 * hi) * lo, lo * lo], axis=-1)


_SQUARES_BLOCK = 16  # columns per step of `_sum_of_squares` (one 64-byte line of float32)


def _sum_of_squares(x: jax.Array) -> jax.Array:
  """`sum(x * x, -1)` in float32, bitwise the same however the rows are split over devices.

  A plain reduction is not: XLA vectorises it by shape, and LLVM contracts `a * b + c` into
  fused multiply-adds in a loop's vectorised body but not in its scalar tail, so a pool sharded
  over 8 devices rounded some rows differently. Here every product is exact (a contraction
  cannot change it) and the adds run elementwise in an order fixed by the width alone:
  pairwise within blocks of 16 columns, blocks accumulated left to right by a loop, so the
  temporaries are `[rows, 48]` whatever D is (no `[P, D]` copy of the pool).
  """
  width = x.shape[-1]
  blocks, rest = divmod(width, _SQUARES_BLOCK)
  if rest:
    total = _sum_last_axis(_exact_square_terms(x[..., blocks * _SQUARES_BLOCK :]))
  else:
    total = jnp.zeros(x.shape[:-1], jnp.float32)
  if blocks == 0:
    return total

  def add_block(index, total):
    block = jax.lax.dynamic_slice_in_dim(x, index * _SQUARES_BLOCK, _SQUARES_BLOCK, axis=-1)
    return total + _sum_last_axis(_exact_square_terms(block))

  return jax.lax.fori_loop(0, blocks, add_block, total)


def _inverse_norms(x: jax.Array) -> jax.Array:
  """`1 / |row|` of rows (1e6 for zero rows)."""
  return jax.lax.rsqrt(jnp.maximum(_sum_of_squares(x), 1e-12))


def _normalize_rows(x: jax.Array) -> jax.Array:
  return x * _inverse_norms(x)[..., None]


def _cosine_to_centroids(features: jax.Array, centroids: jax.Array) -> jax.Array:
  """`[C, P]` cosine of each pool row to unit `centroids` `[C, D]`: one matmul pass over the
  features (their dtype, f32 accuracy) and one for the row norms; row-wise only, so a pool
  sharded by rows gives bitwise the scores of one device."""
  dots = linear.features_times(features, centroids.T)  # [P, C]
  return (dots * _inverse_norms(features)[:, None]).T


def cosine_scores(features: jax.Array, seed_ids: jax.Array) -> jax.Array:
  """Cosine similarity of every pool image to the mean of the normalised seed features.

  Args:
    features: `[P, D]` pool features (any float dtype).
    seed_ids: `[C, K]` pool positions of the seed positives of each category.

  Returns:
    `[C, P]` float32 scores (higher = more likely positive).
  """
  return cosine_scores_to_rows(features, features[seed_ids], jnp.ones(seed_ids.shape, bool))


def cosine_scores_to_rows(features: jax.Array, rows: jax.Array, member: jax.Array) -> jax.Array:
  """`cosine_scores` with each category's seeds given as gathered unit rows.

  Args:
    features: `[P, D]` pool features.
    rows: `[C, N, D]` feature rows gathered from the pool (e.g. a training set).
    member: `[C, N]` bool: which rows are seeds (the others are left out of the mean).

  Returns:
    `[C, P]` float32 scores; equal to `cosine_scores` up to float rounding.
  """
  unit = _normalize_rows(rows.astype(jnp.float32))
  sums = jnp.sum(jnp.where(member[..., None], unit, 0.0), axis=1)  # the mean's scale cancels
  return _cosine_to_centroids(features, _normalize_rows(sums))


def query_priority(scores: jax.Array, *, labels: jax.Array, use_positive_rule: jax.Array):
  """Priority of each image for querying; labeled images get -inf (never re-queried).

  Args:
    scores: `[C, P]` current positive scores (cosine before any linear model, else logits).
    labels: `[C, P]` int labels, -1 where unknown.
    use_positive_rule: `[C]` bool: True -> most likely positive (highest score first),
      False -> closest to the margin (smallest |logit| first).
  """
  priority = jnp.where(use_positive_rule[:, None], scores, -jnp.abs(scores))
  return jnp.where(labels < 0, priority, -jnp.inf)


def random_priority(key: jax.Array, *, labels: jax.Array) -> jax.Array:
  """Uniform random priorities for the unlabeled images, below all of them for labeled ones.

  Top-k of these is a uniform draw without replacement from each category's unlabeled pool.
  31 random bits per image (int32, labeled images -1): float32 uniforms have only 23, so ties,
  which top-k breaks towards low pool positions, would be 256 times more frequent.

  Args:
    key: PRNG key of this round's query.
    labels: `[C, P]` int labels, -1 where unknown.

  Returns:
    `[C, P]` int32 priorities.
  """
  bits = jax.random.bits(key, labels.shape, jnp.uint32) >> 1
  return jnp.where(labels < 0, bits.astype(jnp.int32), -1)


def top_unlabeled(
  priority: jax.Array, num: int, *, pool_sharding: NamedSharding | None = None
) -> jax.Array:
  """The `num` highest-priority pool positions per category, `[C, num]` int32.

  Ties go to the lowest positions (`lax.top_k`). With `pool_sharding` (see `pool_axis`), each
  device takes the top `num` of its own columns and the `devices * num` candidates are merged
  by a second top-k: the same positions, without gathering `priority` on one device (XLA's
  partitioner gathers it for a plain top-k). Candidates are concatenated in shard order, so a
  tie in the merge still goes to the lowest pool position.
  """
  axis = pool_axis(pool_sharding)
  width, rest = divmod(priority.shape[-1], _axis_size(pool_sharding))
  if axis is None or rest or num > width:  # (then a plain top-k, which XLA may gather for)
    _, ids = jax.lax.top_k(priority, num)
    return ids.astype(jnp.int32)
  spec = _last_axis_spec(priority.ndim, axis)

  def local_top(shard):
    values, ids = jax.lax.top_k(shard, num)
    return values, ids.astype(jnp.int32) + jax.lax.axis_index(axis) * width

  values, ids = jax.shard_map(
    local_top, mesh=pool_sharding.mesh, in_specs=spec, out_specs=(spec, spec)
  )(priority)
  _, best = jax.lax.top_k(values, num)
  return jnp.take_along_axis(ids, best, axis=-1)


def use_positive_rule(
  *, querying: str, has_model: jax.Array, num_positive: jax.Array, num_negative: jax.Array
) -> jax.Array:
  """Which categories query their most likely positives this round (`[C]` bool).

  Adaptive (paper lines 9-12): most likely positive while |L_p| < |L_n|, else the margin;
  where a category has no linear model yet, its cosine ranking (most likely positive).

  Args:
    has_model: `[C]` (or scalar) bool: which categories' scores come from a linear model.
  """
  if querying == "most_likely_positive":
    return jnp.ones(num_positive.shape, bool)
  if querying == "random":
    raise ValueError("querying='random' ranks nothing: query with random_priority")
  if querying != "adaptive":
    raise ValueError(f"querying must be one of {QUERYING_RULES}, got {querying!r}")
  return jnp.logical_or(jnp.logical_not(has_model), num_positive < num_negative)


def num_pseudo_negatives(
  num_positive: jax.Array, num_negative: jax.Array, factor: float
) -> jax.Array:
  """`round(f_a * (|L_p| + 0.1 |L_n|))` with round-half-to-even, like Python's `round`.

  Computed as `f_a * (10 |L_p| + |L_n|) / 10` so that integer factors are exact in float32.
  """
  tenths = 10 * num_positive.astype(jnp.float32) + num_negative.astype(jnp.float32)
  return jnp.round(factor * tenths / 10.0).astype(jnp.int32)


def sortable_keys(values: jax.Array) -> jax.Array:
  """Maps float32 to uint32 so that unsigned order equals float order (-0.0 < +0.0)."""
  bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.uint32)
  flip = jnp.where(bits >> 31 == 1, jnp.uint32(0xFFFFFFFF), jnp.uint32(0x80000000))
  return bits ^ flip


_DIGIT_BITS = 16  # order statistics: two histogram passes over 16-bit digits of uint32 keys
_NUM_BINS = 1 << _DIGIT_BITS


def pool_axis(pool_sharding: NamedSharding | None) -> str | tuple[str, ...] | None:
  """The mesh axis (or axes) that `pool_sharding` splits the pool's columns over, or None.

  `pool_sharding` is the sharding of the `[C, P]` arrays: `NamedSharding(mesh, P(None, axis))`
  (`runner.Engine`). Raises ValueError for one that splits the rows (categories) too.
  """
  if pool_sharding is None:
    return None
  spec = tuple(pool_sharding.spec)
  if any(entry is not None for entry in spec[:-1]):
    raise ValueError(
      f"pool_sharding must split only the last (pool) axis of [C, P] arrays, got spec {spec}"
    )
  return spec[-1] if spec else None


def _axis_size(pool_sharding: NamedSharding | None) -> int:
  axis = pool_axis(pool_sharding)
  if axis is None:
    return 1
  names = (axis,) if isinstance(axis, str) else axis
  return math.prod(pool_sharding.mesh.shape[name] for name in names)


def _last_axis_spec(ndim: int, axis) -> PartitionSpec:
  return PartitionSpec(*([None] * (ndim - 1)), axis)


# XLA:CPU sums a `[C, P]` bool mask as int32 through a materialised int32 copy and a tree of
# partial reductions (14.8 ms at [10, 1,000,000] on this project's 2-core CPU machine); int8
# sums over blocks of 127 entries (which cannot overflow int8), then an int32 sum of those,
# take 1.2 ms. Integer sums: the counts are exact either way.
_COUNT_BLOCK = 127


def count_true(mask: jax.Array, *, pool_sharding: NamedSharding | None = None) -> jax.Array:
  """`jnp.sum(mask, axis=-1, dtype=jnp.int32)` of a `[..., P]` bool mask, as int8 block sums.

  `pool_sharding`: the sharding of `mask` when its last axis is split over a mesh
  (`pool_axis`): each device counts its own columns and the counts are summed across devices
  (the blocks never straddle two devices' columns). A sharded pool that does not split evenly
  is summed by XLA as it partitions it (the blocks' reshape could gather it).
  """
  if mask.dtype != jnp.bool_:
    raise ValueError(f"mask of dtype {mask.dtype}; expected bool (e.g. `labels == 1`)")
  axis = pool_axis(pool_sharding)
  if axis is None:
    return _count_true_local(mask)
  if mask.shape[-1] % _axis_size(pool_sharding):
    return jnp.sum(mask, axis=-1, dtype=jnp.int32)
  return jax.shard_map(
    lambda shard: jax.lax.psum(_count_true_local(shard), axis),
    mesh=pool_sharding.mesh,
    in_specs=_last_axis_spec(mask.ndim, axis),
    out_specs=PartitionSpec(),
  )(mask)


def _count_true_local(mask: jax.Array) -> jax.Array:
  """`count_true` on one device (or one device's columns)."""
  size = mask.shape[-1]
  whole = size - size % _COUNT_BLOCK
  counts = jnp.sum(mask[..., whole:], axis=-1, dtype=jnp.int32)  # the last, partial block
  if whole:
    blocks = mask[..., :whole].astype(jnp.int8)
    blocks = blocks.reshape(mask.shape[:-1] + (whole // _COUNT_BLOCK, _COUNT_BLOCK))
    counts = counts + jnp.sum(jnp.sum(blocks, axis=-1, dtype=jnp.int8), -1, dtype=jnp.int32)
  return counts


def _histogram(
  digits: jax.Array, weights: jax.Array, pool_sharding: NamedSharding | None = None
) -> jax.Array:
  """`[..., 65536]` int32 sums of `weights` per digit value, row by row.

  `digits` `[..., P]` int32 in [0, 65536); `weights` `[..., P]` int32. With `pool_sharding`
  (the last axis split over a mesh axis), each device histograms its own columns and the
  counts are summed across devices (an all-reduce of `[rows, 65536]` int32): XLA's partitioner
  would otherwise all-gather both `[..., P]` arrays for the scatter-add. Integer sums, so the
  counts are exactly the one-device ones.
  """
  axis = pool_axis(pool_sharding)
  if axis is None or digits.shape[-1] % _axis_size(pool_sharding):
    return _local_histogram(digits, weights)  # (XLA partitions it, gathering if sharded)
  spec = _last_axis_spec(digits.ndim, axis)
  return jax.shard_map(
    lambda d, w: jax.lax.psum(_local_histogram(d, w), axis),
    mesh=pool_sharding.mesh,
    in_specs=(spec, spec),
    out_specs=PartitionSpec(),
  )(digits, weights)


def _local_histogram(digits: jax.Array, weights: jax.Array) -> jax.Array:
  """`_histogram` on one device, in one scatter-add: the rows are flattened into one index
  space (one scatter over all of them is faster on XLA's CPU than a batched one)."""
  lead = digits.shape[:-1]
  rows = math.prod(lead)
  offsets = (jnp.arange(rows, dtype=jnp.int32) * _NUM_BINS).reshape(lead + (1,))
  flat = (digits + offsets).reshape(-1)
  counts = jnp.zeros((rows * _NUM_BINS,), jnp.int32).at[flat].add(weights.reshape(-1))
  return counts.reshape(lead + (_NUM_BINS,))


def _first_bin_reaching(counts: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(first bin `b` with `sum(counts[..., :b + 1]) >= k`, `sum(counts[..., :b])`), per row.

  Where no bin reaches `k` (more asked than counted), the last bin.
  """
  cumulative = jnp.cumsum(counts, axis=-1, dtype=jnp.int32)
  index = jnp.sum(cumulative < k[..., None], axis=-1, dtype=jnp.int32)  # cumulative is sorted
  index = jnp.minimum(index, counts.shape[-1] - 1)
  at = lambda x: jnp.take_along_axis(x, index[..., None], axis=-1)[..., 0]  # noqa: E731
  return index, at(cumulative) - at(counts)


def _kth_smallest(
  keys: jax.Array, valid: jax.Array, k: jax.Array, pool_sharding: NamedSharding | None = None
) -> jax.Array:
  """Smallest t with `#{valid & keys <= t} >= k` (k >= 1), per row (0xFFFFFFFF if none).

  Radix selection in two passes over the keys (a histogram of their high 16 bits, then one of
  the low 16 bits of the keys in the bin that holds the k-th), instead of 32 bisection steps.

  Args:
    keys: `[..., P]` uint32.
    valid: `[..., P]` bool.
    k: `[...]` int32.
    pool_sharding: the sharding of `keys` and `valid` over a mesh, if any (see `_histogram`).
  """
  high = (keys >> _DIGIT_BITS).astype(jnp.int32)
  low = (keys & jnp.uint32(_NUM_BINS - 1)).astype(jnp.int32)
  high_bin, below = _first_bin_reaching(_histogram(high, valid.astype(jnp.int32), pool_sharding), k)
  in_bin = jnp.logical_and(valid, high == high_bin[..., None])
  low_counts = _histogram(low, in_bin.astype(jnp.int32), pool_sharding)
  low_bin, _ = _first_bin_reaching(low_counts, k - below)
  return (high_bin.astype(jnp.uint32) << _DIGIT_BITS) | low_bin.astype(jnp.uint32)


_WORD_BITS = 32
# _PREFIX_MASKS[j]: bits 0..j set.
_PREFIX_MASKS = np.array([(2 << j) - 1 for j in range(_WORD_BITS)], np.uint64).astype(np.uint32)


def _pack_bits(mask: jax.Array) -> jax.Array:
  """`[..., P]` bool as `[..., ceil(P / 32)]` uint32 words (position 32 w + j is bit j of w)."""
  size = mask.shape[-1]
  words = -(-size // _WORD_BITS)
  pad = [(0, 0)] * (mask.ndim - 1) + [(0, words * _WORD_BITS - size)]
  bits = jnp.pad(mask, pad).reshape(mask.shape[:-1] + (words, _WORD_BITS))
  shifts = jnp.arange(_WORD_BITS, dtype=jnp.uint32)
  return jnp.sum(jnp.where(bits, jnp.uint32(1) << shifts, jnp.uint32(0)), -1, dtype=jnp.uint32)


def nth_true(
  mask: jax.Array,
  n: jax.Array,
  *,
  fill_value: int | None = None,
  pool_sharding: NamedSharding | None = None,
) -> jax.Array:
  """Positions of the `n`-th (0-based) True of each row of `mask`; `fill_value` where none.

  `nth_true(mask, jnp.arange(size))` is `jnp.nonzero(mask, size=size, fill_value=...)` row by
  row, without a cumulative sum over the whole row: the mask is packed into 32-bit words (one
  pass), their popcounts are summed cumulatively (32 times fewer), each `n` finds its word by
  binary search and its bit within the word by popcounts of the word's prefixes.

  With `pool_sharding` (the last axis split over a mesh, see `pool_axis`), each device does
  that on its own columns for the ranks that fall in them (its Trues counted, the counts of
  the devices before it subtracted) and the positions are summed across devices (each rank is
  found on one device): no device gathers the mask or its words.

  Args:
    mask: `[..., P]` bool.
    n: `[..., S]` int, the ranks wanted per row.
    fill_value: position returned where a row has `n` or fewer Trues or `n < 0` (P if None).
    pool_sharding: the sharding of `mask` over a mesh, if any (`n` is replicated).

  Returns:
    `[..., S]` int32 positions.
  """
  size = mask.shape[-1]
  fill_value = size if fill_value is None else fill_value
  n = n.astype(jnp.int32)
  axis = pool_axis(pool_sharding)
  devices = _axis_size(pool_sharding)
  if axis is None or size % devices:
    return _nth_true_one_device(mask, n, fill_value)
  width = size // devices

  def local(shard, n):
    count = _count_true_local(shard)  # [...]
    counts = jax.lax.all_gather(count, axis)  # [devices, ...]
    index = jax.lax.axis_index(axis)
    earlier = jnp.arange(devices).reshape((devices,) + (1,) * count.ndim) < index
    before = jnp.sum(jnp.where(earlier, counts, 0), axis=0, dtype=jnp.int32)
    position = _nth_true_one_device(shard, n - before[..., None], -1)
    position = jax.lax.psum(jnp.where(position >= 0, position + index * width, 0), axis)
    found = jnp.logical_and(n >= 0, n < jax.lax.psum(count, axis)[..., None])
    return jnp.where(found, position, fill_value).astype(jnp.int32)

  spec = _last_axis_spec(mask.ndim, axis)
  return jax.shard_map(
    local,
    mesh=pool_sharding.mesh,
    in_specs=(spec, PartitionSpec()),
    out_specs=PartitionSpec(),
  )(mask, n)


def _nth_true_one_device(mask: jax.Array, n: jax.Array, fill_value: int) -> jax.Array:
  """`nth_true` of int32 `n` on one device (or one device's columns)."""
  words = _pack_bits(mask)
  counts = jax.lax.population_count(words).astype(jnp.int32)
  cumulative = jnp.cumsum(counts, axis=-1, dtype=jnp.int32)
  flat_cumulative = cumulative.reshape(-1, cumulative.shape[-1])
  flat_n = n.reshape(-1, n.shape[-1])
  word = jax.vmap(lambda c, q: jnp.searchsorted(c, q, side="right"))(flat_cumulative, flat_n)
  word = jnp.minimum(word.reshape(n.shape).astype(jnp.int32), words.shape[-1] - 1)
  at = lambda x: jnp.take_along_axis(x, word, axis=-1)  # noqa: E731
  rank = n - (at(cumulative) - at(counts))  # rank of the wanted True within its word
  prefix_counts = jax.lax.population_count(at(words)[..., None] & jnp.asarray(_PREFIX_MASKS))
  bit = jnp.sum(prefix_counts.astype(jnp.int32) <= rank[..., None], axis=-1, dtype=jnp.int32)
  found = jnp.logical_and(n >= 0, n < cumulative[..., -1:])
  return jnp.where(found, word * _WORD_BITS + bit, fill_value).astype(jnp.int32)


def smallest_k_mask(
  keys: jax.Array, valid: jax.Array, k: jax.Array, *, pool_sharding: NamedSharding | None = None
) -> jax.Array:
  """Mask of exactly `min(k, #valid)` valid entries with the smallest keys, row by row.

  Ties at the threshold go to the lowest positions, so the result is deterministic.

  Args:
    keys: `[..., P]` uint32.
    valid: `[..., P]` bool: the entries that may be chosen.
    k: `[...]` int32, how many to choose per row.
    pool_sharding: the sharding of `keys` and `valid` when their last axis is split over a
      mesh (`pool_axis`): the histograms are then shard-local plus a sum across devices.
  """
  k = jnp.minimum(k, count_true(valid, pool_sharding=pool_sharding))
  threshold = _kth_smallest(keys, valid, jnp.maximum(k, 1), pool_sharding)[..., None]
  below = jnp.logical_and(valid, keys < threshold)
  tied = jnp.logical_and(valid, keys == threshold)
  room = k - count_true(below, pool_sharding=pool_sharding)
  # The first `room` tied entries: those up to the position of the (room - 1)-th (none if 0).
  last = nth_true(tied, room[..., None] - 1, fill_value=-1, pool_sharding=pool_sharding)
  positions = jax.lax.broadcasted_iota(jnp.int32, keys.shape, keys.ndim - 1)
  take_tied = jnp.logical_and(tied, positions <= last)
  return jnp.logical_and(jnp.logical_or(below, take_tied), k[..., None] > 0)


def bottom_half(
  scores: jax.Array, unlabeled: jax.Array, *, pool_sharding: NamedSharding | None = None
) -> jax.Array:
  """`[C, P]` mask of the lowest-scoring floor(U/2) unlabeled images of each category."""
  half = count_true(unlabeled, pool_sharding=pool_sharding) // 2
  return smallest_k_mask(sortable_keys(scores), unlabeled, half, pool_sharding=pool_sharding)


def pseudo_negatives(
  key: jax.Array,
  *,
  scores: jax.Array,
  unlabeled: jax.Array,
  num: jax.Array,
  max_num: int | None = None,
  pool_sharding: NamedSharding | None = None,
) -> jax.Array:
  """Draws pseudo-negatives (paper line 14) uniformly from the bottom 50% of the ranking.

  Args:
    key: PRNG key for this round's draw.
    scores: `[C, P]` current positive scores.
    unlabeled: `[C, P]` bool, images without a human label for that category.
    num: `[C]` int32 how many to draw (all candidates if fewer).
    max_num: static bound on `num` (>= every row's `num`, e.g. the padded training-set
      size): the draw works on `[C, max_num]` ranks. None: P // 2, always enough.
    pool_sharding: the sharding of the `[C, P]` arrays when the pool is split over a mesh
      (`NamedSharding(mesh, P(None, axis))`): the selections' histograms are then shard-local,
      summed across devices. None (one device): the plain path. Same result either way.

  Returns:
    `[C, P]` bool mask of exactly `min(num, floor(U/2))` images per category.
  """
  candidates = bottom_half(scores, unlabeled, pool_sharding=pool_sharding)
  return uniform_subset(key, candidates, num, max_num=max_num, pool_sharding=pool_sharding)


def uniform_subset(
  key: jax.Array,
  candidates: jax.Array,
  num: jax.Array,
  *,
  max_num: int | None = None,
  pool_sharding: NamedSharding | None = None,
) -> jax.Array:
  """`[..., P]` mask of `min(num, #candidates)` of each row's candidates, drawn uniformly
  without replacement.

  Drawn in rank space: with m candidates in a row, `min(num, m - num)` distinct ranks in
  [0, m) (`distinct_ranks`; the complement when more than half are wanted), then their pool
  positions (`nth_true`, one pass over the packed mask). The random numbers and sorts are
  `[..., max_num]`, not `[..., P]`: one random word per candidate and two radix selections
  over the pool were the previous draw (the whole pseudo-negative step took 0.45 s with it and
  0.26 s with this one at C = 10, P = 1M on a 2-core CPU, `benchmarks/loop_round.py
  --breakdown`).

  Args:
    key: PRNG key.
    candidates: `[..., P]` bool.
    num: `[...]` int, how many to draw per row.
    max_num: static bound on `num` (see `pseudo_negatives`); None: P // 2.
    pool_sharding: the sharding of `candidates` over a mesh, if any (see `nth_true`).
  """
  size = candidates.shape[-1]
  bound = max(1, size // 2) if max_num is None else max(1, min(int(max_num), size // 2))
  available = count_true(candidates, pool_sharding=pool_sharding)
  wanted = jnp.clip(jnp.asarray(num).astype(jnp.int32), 0, available)
  complement = 2 * wanted > available  # draw the ones to leave out instead (fewer)
  count = jnp.where(complement, available - wanted, wanted)  # <= available // 2 <= P // 2
  if not isinstance(count, jax.core.Tracer) and np.any(np.asarray(count) > bound):
    raise ValueError(
      f"num {np.asarray(num).tolist()} needs more than max_num={max_num} draws for "
      f"{np.asarray(available).tolist()} candidates; expected max_num >= num"
    )
  ranks = distinct_ranks(key, available, count, bound)
  positions = nth_true(candidates, ranks, fill_value=-1, pool_sharding=pool_sharding)
  drawn = _mask_of_positions(positions, size, pool_sharding)
  return jnp.where(complement[..., None], jnp.logical_and(candidates, ~drawn), drawn)


_NO_RANK = np.iinfo(np.int32).max


def distinct_ranks(key: jax.Array, population: jax.Array, count: jax.Array, size: int):
  """`[..., size]` int32 per row: `count` distinct ranks drawn uniformly from
  [0, population), in increasing order, then `2^31 - 1` in the unused slots.

  Draws `count` ranks with replacement, then redraws the repeats until none is left. The
  procedure commutes with every relabelling of [0, population), so the set it ends with is a
  uniformly random `count`-subset. Needs `count <= population // 2` (each redraw then hits a
  new rank with probability >= 1/2: a few sorts of `[..., size]` in all) and `count <= size`.

  Args:
    key: PRNG key (redraw i uses `fold_in(key, i)`).
    population, count: `[...]` int32.
    size: static number of slots.
  """
  population = population.astype(jnp.int32)
  shape = population.shape + (size,)
  used = jnp.arange(size, dtype=jnp.int32) < count[..., None]
  high = jnp.maximum(population, 1)[..., None]

  def draw(index):
    return jax.random.randint(jax.random.fold_in(key, index), shape, 0, high, jnp.int32)

  def repeats(ranks):  # all but the first of equal ranks (sorted rows)
    same = jnp.concatenate(
      [jnp.zeros(shape[:-1] + (1,), bool), ranks[..., 1:] == ranks[..., :-1]], axis=-1
    )
    return jnp.logical_and(same, ranks != _NO_RANK)

  def redraw(carry):
    index, ranks = carry
    return index + 1, jnp.sort(jnp.where(repeats(ranks), draw(index), ranks), axis=-1)

  ranks = jnp.sort(jnp.where(used, draw(0), _NO_RANK), axis=-1)
  _, ranks = jax.lax.while_loop(lambda carry: jnp.any(repeats(carry[1])), redraw, (1, ranks))
  return ranks


def _mask_of_positions(
  positions: jax.Array, size: int, pool_sharding: NamedSharding | None = None
) -> jax.Array:
  """`[..., size]` bool, True at `positions` (`[..., S]` int32; negative entries: none).

  With `pool_sharding` each device sets the positions that fall in its own columns.
  """
  axis = pool_axis(pool_sharding)
  devices = _axis_size(pool_sharding)
  if axis is None or size % devices:
    return _local_mask_of_positions(positions, size)
  width = size // devices

  def local(positions):
    offset = jax.lax.axis_index(axis) * width
    inside = jnp.logical_and(positions >= offset, positions < offset + width)
    return _local_mask_of_positions(jnp.where(inside, positions - offset, -1), width)

  return jax.shard_map(
    local,
    mesh=pool_sharding.mesh,
    in_specs=PartitionSpec(),
    out_specs=_last_axis_spec(positions.ndim, axis),
  )(positions)


def _local_mask_of_positions(positions: jax.Array, size: int) -> jax.Array:
  lead = positions.shape[:-1]
  rows = math.prod(lead)
  flat = positions.reshape(rows, -1)
  index = jnp.where(flat >= 0, flat, size)  # out of bounds: dropped
  mask = jnp.zeros((rows, size), bool).at[jnp.arange(rows)[:, None], index].set(True, mode="drop")
  return mask.reshape(lead + (size,))
