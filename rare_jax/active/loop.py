"""The active loop as pure transitions over an immutable `LoopState` (paper Algorithm 1).

One round for a group of C categories over a pool of P images with D-dim cached features:

    ids = query(state, config=...)                       # [C, B] pool positions to label
    answers = labeler.answer(ids)                        # [C, B] bool (the only impure step)
    state = observe(state, ids, answers, features, config=..., train_size=...)

`observe` records the answers, redraws pseudo-negatives from the bottom half of the current
ranking, refits the per-category logistic regressions on the cached features and re-scores the
pool (one matmul pass). Both functions are pure; the driver jits them once with
`functools.partial` for its `LoopConfig`. `train_size` (the padded training-set size) is static
and comes from `required_train_size`, bucketed so that a run compiles a bounded number of times.
"""

from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from rare_jax.active import linear, select

UNKNOWN = -1

# The loop's version: raised when a change makes the same inputs give other states (runs that
# started before it can then neither resume bit-exactly nor replay). It is in each run's
# fingerprint, so such a run directory is refused. 2 (2026-12-04): pseudo-negatives
# drawn in rank space, warm fits started from the pool's scores. 3 (2026-12-04): on CPU the
# fits sum their products over the rows in blocks of 256 rows (other float rounding; runs on
# accelerators compute as before, but their version-2 directories are refused too). 4
# (2026-12-04): the logistic regressions are fitted by `linear`'s "active_lbfgs" solver
# instead of L-BFGS (the same optimum within `tol`, other iterates). 5 (2026-12-05): on CPU the
# LAPACK kernels of those fits (scipy's OpenBLAS) run on one thread (`linear._one_lapack_thread`),
# whose factorisations round differently from the several threads before (one per core).
LOOP_VERSION = 5


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """Static settings of the loop (hashable: passed to jitted functions as a static value).

  Attributes:
    batch_size: B, images queried per category per round.
    querying: "adaptive" (paper), "most_likely_positive" (Tropel) or "random" (B images drawn
      uniformly from the unlabeled pool: the floor of active learning).
    pseudo_negative_factor: f_a; 0 disables pseudo-negatives.
    l2: L2 penalty of the logistic regression (sklearn's C = 1 / l2).
    max_iters: solver iteration cap per fit.
    tol: solver gradient-norm tolerance.
  """

  batch_size: int = 10
  querying: str = "adaptive"
  pseudo_negative_factor: float = 100.0
  l2: float = 1.0
  max_iters: int = 200
  tol: float = 1e-6

  def __post_init__(self):
    if not isinstance(self.batch_size, int) or self.batch_size < 1:
      raise ValueError(f"batch_size (B) must be a positive int, got {self.batch_size!r}")
    if self.querying not in select.QUERYING_RULES:
      raise ValueError(f"querying must be one of {select.QUERYING_RULES}, got {self.querying!r}")
    if not 0 <= self.pseudo_negative_factor <= 10_000:
      raise ValueError(
        f"pseudo_negative_factor (f_a) must be in [0, 10000], got {self.pseudo_negative_factor!r}"
      )
    if not self.l2 > 0:
      raise ValueError(f"l2 must be > 0, got {self.l2!r}")
    if self.max_iters < 1:
      raise ValueError(f"max_iters must be >= 1, got {self.max_iters!r}")


@flax.struct.dataclass
class LoopState:
  """Everything the loop knows after a round; fixed-shape arrays only.

  Attributes:
    round: int32 scalar, rounds observed so far (0 after `init`).
    seed: uint32 scalar; round keys are `fold_in(key(seed), round)`.
    labels: int8 `[C, P]`: 1 positive, 0 negative, -1 unknown (human labels and seeds).
    label_round: int32 `[C, P]`: the round a label arrived (0 for seeds), -1 if none.
    pseudo_negative: bool `[C, P]`: this round's pseudo-negatives W_n.
    linear: the per-category logistic regressions, weights `[C, D]`, bias `[C]`.
    has_model: bool scalar, False until the first `observe`. Which categories have a linear
      model is `fitted(state)`: a fit needs both classes in the training set.
    scores: float32 `[C, P]`: the current ranking R_pos (cosine before a category's first
      linear model, then logits; the margin ranking R_ent is |scores| ascending).
  """

  round: jax.Array
  seed: jax.Array
  labels: jax.Array
  label_round: jax.Array
  pseudo_negative: jax.Array
  linear: linear.LinearModel
  has_model: jax.Array
  scores: jax.Array

  @property
  def num_categories(self) -> int:
    return self.labels.shape[0]

  @property
  def pool_size(self) -> int:
    return self.labels.shape[1]


def check_seed_ids(seed_ids, pool_size: int) -> None:
  """Raises ValueError unless `seed_ids` is an int `[C, K]` array of pool positions in [0, P).

  Indexing would silently wrap negative ids and clamp or drop those past the pool, so a run
  given dataset ids (`RareTask.seed_ids()`) instead of pool positions (`seed_positives`) would
  start from the wrong seeds.
  """
  seed_ids = np.asarray(seed_ids)
  if seed_ids.ndim != 2 or 0 in seed_ids.shape:
    raise ValueError(f"seed_ids must be a non-empty [C, K] array, got shape {seed_ids.shape}")
  if not np.issubdtype(seed_ids.dtype, np.integer):
    raise ValueError(f"seed_ids must be integer pool positions, got dtype {seed_ids.dtype}")
  bad = np.unique(seed_ids[(seed_ids < 0) | (seed_ids >= pool_size)])
  if bad.size:
    raise ValueError(
      f"seed_ids must be pool positions in [0, {pool_size}), got {bad.size} outside: "
      f"{bad[:10].tolist()}{' ...' if bad.size > 10 else ''} (dataset ids such as "
      "RareTask.seed_ids() are not pool positions: pass RareTask.seed_positives)"
    )


def init(features: jax.Array, seed_ids: jax.Array, *, seed: int | jax.Array) -> LoopState:
  """Algorithm 1 lines 3-6: seeds are the first positives; cosine ranking to their centroid.

  Args:
    features: `[P, D]` cached pool features.
    seed_ids: `[C, K]` pool positions of each category's seed positives, in [0, P) (checked
      when concrete; ValueError otherwise).
    seed: the run's seed.
  """
  pool_size, dim = features.shape
  if not isinstance(seed_ids, jax.core.Tracer):
    check_seed_ids(seed_ids, pool_size)
  num_categories = seed_ids.shape[0]
  rows = jnp.arange(num_categories)[:, None]
  labels = jnp.full((num_categories, pool_size), UNKNOWN, jnp.int8).at[rows, seed_ids].set(1)
  label_round = jnp.where(labels >= 0, 0, UNKNOWN).astype(jnp.int32)
  return LoopState(
    round=jnp.zeros((), jnp.int32),
    seed=jnp.asarray(seed, jnp.uint32),
    labels=labels,
    label_round=label_round,
    pseudo_negative=jnp.zeros((num_categories, pool_size), bool),
    linear=linear.LinearModel(
      weights=jnp.zeros((num_categories, dim), jnp.float32),
      bias=jnp.zeros((num_categories,), jnp.float32),
    ),
    has_model=jnp.zeros((), bool),
    scores=select.cosine_scores(features, seed_ids),
  )


def label_counts(
  labels: jax.Array, *, pool_sharding: NamedSharding | None = None
) -> tuple[jax.Array, jax.Array]:
  """(|L_p|, |L_n|) per category, `[C]` int32 each. `pool_sharding`: as in `observe`."""
  return (
    select.count_true(labels == 1, pool_sharding=pool_sharding),
    select.count_true(labels == 0, pool_sharding=pool_sharding),
  )


def both_classes(
  labels: jax.Array, pseudo_negative: jax.Array, *, pool_sharding: NamedSharding | None = None
) -> jax.Array:
  """`[C]` bool: the category's training set holds a positive and a negative.

  Pseudo-negatives count as negatives. A logistic regression fitted on one class only is
  degenerate (sklearn refuses it): the bias runs away and the weights shrink towards 0, so the
  float32 scores collapse to a few values and top-k ties fall back to pool order.
  `pool_sharding`: as in `observe`.
  """
  negative = jnp.logical_or(labels == 0, pseudo_negative)
  positives = select.count_true(labels == 1, pool_sharding=pool_sharding)
  return jnp.logical_and(
    positives > 0, select.count_true(negative, pool_sharding=pool_sharding) > 0
  )


def fitted(state: LoopState, *, pool_sharding: NamedSharding | None = None) -> jax.Array:
  """`[C]` bool: which categories' scores come from a linear model (else the cosine ranking).

  Derived from the state rather than stored, so checkpoints keep their layout: the current
  model was fitted on `labels` and `pseudo_negative`, and only where both classes were there.
  `pool_sharding`: as in `observe`.
  """
  both = both_classes(state.labels, state.pseudo_negative, pool_sharding=pool_sharding)
  return jnp.logical_and(state.has_model, both)


def query(
  state: LoopState, *, config: LoopConfig, pool_sharding: NamedSharding | None = None
) -> jax.Array:
  """Algorithm 1 lines 9-12: `[C, B]` pool positions to label, never already labeled ones.

  `pool_sharding`: the sharding of the state's `[C, P]` arrays when the pool is split over a
  mesh (`runner.Engine`): the top-k is then taken shard by shard and merged. Same result.
  """
  top = functools.partial(select.top_unlabeled, num=config.batch_size, pool_sharding=pool_sharding)
  if config.querying == "random":
    return top(select.random_priority(query_key(state), labels=state.labels))
  num_positive, num_negative = label_counts(state.labels, pool_sharding=pool_sharding)
  positive_rule = select.use_positive_rule(
    querying=config.querying,
    has_model=fitted(state, pool_sharding=pool_sharding),
    num_positive=num_positive,
    num_negative=num_negative,
  )
  return top(
    select.query_priority(state.scores, labels=state.labels, use_positive_rule=positive_rule)
  )


def round_key(state: LoopState, round_index: jax.Array) -> jax.Array:
  return jax.random.fold_in(jax.random.key(state.seed), round_index)


# The round's random draws fold these into its key, so that they share no random bits: the
# random query rule's priorities and the pseudo-negatives.
_QUERY_STREAM = 1
_PSEUDO_NEGATIVE_STREAM = 2


def query_key(state: LoopState) -> jax.Array:
  """The key of the random query of the round after `state` (`fold_in(seed, round)`-derived)."""
  return jax.random.fold_in(round_key(state, state.round + 1), _QUERY_STREAM)


def pseudo_negative_key(state: LoopState) -> jax.Array:
  """The key of the pseudo-negative draw of the round after `state`."""
  return jax.random.fold_in(round_key(state, state.round + 1), _PSEUDO_NEGATIVE_STREAM)


def observe(
  state: LoopState,
  query_ids: jax.Array,
  answers: jax.Array,
  features: jax.Array,
  *,
  config: LoopConfig,
  train_size: int,
  pool_sharding: NamedSharding | None = None,
) -> LoopState:
  """Algorithm 1 lines 13-18: labels in, pseudo-negatives, linear fit, new rankings.

  Args:
    state: the state `query_ids` were computed from.
    query_ids: `[C, B]` pool positions that were asked.
    answers: `[C, B]` bool answers.
    features: `[P, D]` the cached pool features, the ones `state.scores` were computed on
      (after new features, `refit` first): the warm start's logits on the training rows are
      taken from `state.scores` rather than recomputed. (So a float64 fit starts from float32
      logits.)
    config: static loop settings.
    train_size: static padded training-set size, >= every category's |L_p|+|L_n|+|W_n|
      (`required_train_size`; `Engine.step` computes it). Smaller, the pseudo-negative draw
      and the training sets come out wrong without an error (traced values are not checked).
    pool_sharding: the sharding of the state's `[C, P]` arrays when the pool is split over a
      mesh (`runner.Engine`; not a `LoopConfig` field: how the pool is laid out is no setting of
      the run, and results are the same): the radix selections then histogram shard by shard
      and the training-set positions are found shard by shard (`select.nth_true`).
  """
  state, _ = observe_into(
    state,
    query_ids,
    answers,
    features,
    None,
    config=config,
    train_size=train_size,
    pool_sharding=pool_sharding,
  )
  return state


def observe_into(
  state: LoopState,
  query_ids: jax.Array,
  answers: jax.Array,
  features: jax.Array,
  rows_buffer: jax.Array | None,
  *,
  config: LoopConfig,
  train_size: int,
  pool_sharding: NamedSharding | None = None,
) -> tuple[LoopState, jax.Array | None]:
  """`observe`, writing the gathered training-set rows over `rows_buffer` and returning them.

  The rows (`[C, train_size, D]` in the features' dtype, 1 GiB for 10 categories of 12,288
  rows of 2048 float32) are the round's largest temporary. Jitted with `rows_buffer` donated
  and the returned rows passed back as the next round's buffer, the gather writes into memory
  the process already holds: a fresh allocation of that size costs a page fault per 4 KiB on
  a CPU host (`runner.Engine` does this on CPUs). The buffer's contents are never read, and
  the state is the one `observe` returns.

  Args:
    rows_buffer: `[C, train_size, D]` array of the features' dtype, or None (a fresh one).
    Others: as in `observe`.

  Returns:
    (the new state, the training-set rows: pass them back as the next `rows_buffer`; None
    when `rows_buffer` is None, so that the rows are no output of a jitted call then).
  """
  next_round = state.round + 1
  categories = jnp.arange(state.num_categories)[:, None]
  labels = state.labels.at[categories, query_ids].set(answers.astype(jnp.int8))
  label_round = state.label_round.at[categories, query_ids].set(next_round)
  unlabeled = labels < 0
  num_positive, num_negative = label_counts(labels, pool_sharding=pool_sharding)

  if config.pseudo_negative_factor > 0:
    pseudo_negative = select.pseudo_negatives(
      pseudo_negative_key(state),
      scores=state.scores,
      unlabeled=unlabeled,
      num=select.num_pseudo_negatives(num_positive, num_negative, config.pseudo_negative_factor),
      max_num=train_size,  # >= labels + pseudo-negatives (required_train_size)
      pool_sharding=pool_sharding,
    )
  else:
    pseudo_negative = jnp.zeros_like(state.pseudo_negative)

  fit = both_classes(labels, pseudo_negative, pool_sharding=pool_sharding)
  ids, member = training_set(labels, pseudo_negative, train_size, pool_sharding=pool_sharding)
  warm, margins = warm_start(state, ids, pool_sharding=pool_sharding)
  rows = features[ids]
  if rows_buffer is not None:
    if rows_buffer.shape != rows.shape or rows_buffer.dtype != rows.dtype:
      raise ValueError(
        f"rows_buffer of shape {rows_buffer.shape} and dtype {rows_buffer.dtype}; expected "
        f"{rows.shape} {rows.dtype} (categories, train_size, features' width and dtype)"
      )
    rows = jax.lax.dynamic_update_slice(rows_buffer, rows, (0,) * rows.ndim)
  model, scores = _fit_and_score(
    labels, ids, member, rows, features, warm, margins, fit, config=config
  )
  # A category still without both classes keeps its previous model and ranking.
  new_state = state.replace(
    round=next_round,
    labels=labels,
    label_round=label_round,
    pseudo_negative=pseudo_negative,
    linear=_where_fitted(fit, model, state.linear),
    has_model=jnp.ones((), bool),
    scores=jnp.where(fit[:, None], scores, state.scores),
  )
  return new_state, (rows if rows_buffer is not None else None)


def refit(
  state: LoopState,
  features: jax.Array,
  *,
  config: LoopConfig,
  train_size: int,
  pool_sharding: NamedSharding | None = None,
) -> LoopState:
  """Refits the linear models on new features (after a deep update re-embedded the pool).

  Same training set (labels and this round's pseudo-negatives), cold start: the old weights
  live in another feature space. Rankings are recomputed on the new features: the linear
  model's where the training set holds both classes, else the cosine ranking to the seeds.
  `pool_sharding` as in `observe`.
  """
  fit = both_classes(state.labels, state.pseudo_negative, pool_sharding=pool_sharding)
  zeros = jax.tree.map(jnp.zeros_like, state.linear)
  ids, member = training_set(
    state.labels, state.pseudo_negative, train_size, pool_sharding=pool_sharding
  )
  rows = features[ids]  # [C, train_size, D]: the only rows gathered from the pool
  model, scores = _fit_and_score(
    state.labels, ids, member, rows, features, zeros, jnp.zeros(ids.shape), fit, config=config
  )
  # The seeds are in the training set (labels from round 0): their centroid from its rows.
  seeds = jnp.logical_and(state.label_round == 0, state.labels == 1)
  cosine = select.cosine_scores_to_rows(
    features, rows, jnp.logical_and(member, jnp.take_along_axis(seeds, ids, axis=-1))
  )
  return state.replace(
    linear=_where_fitted(fit, model, zeros),
    has_model=jnp.ones((), bool),
    scores=jnp.where(fit[:, None], scores, cosine),
  )


def warm_start(
  state: LoopState, ids: jax.Array, *, pool_sharding: NamedSharding | None = None
) -> tuple[linear.LinearModel, jax.Array]:
  """The model `observe`'s fits start from and its logits on the training rows `ids` `[C, N]`.

  The state's model where it has one (`fitted`), else zeros. Its logits are the pool's current
  scores at `ids` (0 for a zero model), so the fit needs no pass over the rows to start.
  `pool_sharding`: as in `observe`.
  """
  has_model = fitted(state, pool_sharding=pool_sharding)
  model = _where_fitted(has_model, state.linear, jax.tree.map(jnp.zeros_like, state.linear))
  margins = jnp.where(has_model[:, None], jnp.take_along_axis(state.scores, ids, axis=-1), 0.0)
  return model, margins


def _where_fitted(fit: jax.Array, model: linear.LinearModel, other: linear.LinearModel):
  """Per category (`fit` `[C]` bool), `model`'s weights and bias, else `other`'s."""
  return jax.tree.map(
    lambda a, b: jnp.where(fit.reshape(fit.shape + (1,) * (a.ndim - 1)), a, b), model, other
  )


def _fit_and_score(labels, ids, valid, rows, features, init, margins, fit, *, config):
  """Algorithm 1 lines 15-18: fit on L_p (1), L_n and W_n (0); score the pool in one pass.

  `ids`, `valid` are the training set (`training_set`), `rows` its gathered features, `margins`
  the logits of the starting model `init` on them. Categories
  where `fit` (`[C]` bool) is False get no examples (their one-class fit would be degenerate
  and, running to `max_iters`, would hold up the batched solver); the caller keeps another
  model for them.
  """
  valid = jnp.logical_and(valid, fit[:, None])
  targets = (jnp.take_along_axis(labels, ids, axis=-1) == 1).astype(jnp.float32)
  model = linear.fit_logistic_batched(
    rows,
    targets,
    valid.astype(jnp.float32),
    l2=config.l2,
    init=init,
    max_iters=config.max_iters,
    tol=config.tol,
    init_margins=margins,
  )
  return model, linear.decision_function(features, model).T.astype(jnp.float32)


def training_set(
  labels: jax.Array,
  pseudo_negative: jax.Array,
  size: int,
  *,
  pool_sharding: NamedSharding | None = None,
):
  """Pool positions of each category's training set, padded to `size`.

  `pool_sharding`: as in `observe` (the positions are then found shard by shard).

  Returns:
    (ids `[C, size]` int32, valid `[C, size]` bool); padding rows point at position 0 and are
    marked invalid (their example weight is 0).
  """
  member = jnp.logical_or(labels >= 0, pseudo_negative)
  # `jnp.nonzero(size=size, fill_value=0)` per row, without its cumulative sum over the pool.
  ranks = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), member.shape[:-1] + (size,))
  ids = select.nth_true(member, ranks, fill_value=0, pool_sharding=pool_sharding)
  count = select.count_true(member, pool_sharding=pool_sharding)
  valid = jnp.arange(size)[None, :] < count[:, None]
  return ids, valid


def required_train_size(
  num_positive: np.ndarray, num_negative: np.ndarray, pool_size: int, *, config: LoopConfig
) -> int:
  """The bucketed static training-set size for a round, computed on the host.

  Args:
    num_positive, num_negative: `[C]` label counts *after* this round's answers.
    pool_size: P.
  """
  num_positive = np.asarray(num_positive, np.int64)
  num_negative = np.asarray(num_negative, np.int64)
  labeled = num_positive + num_negative
  pseudo = np.round(
    config.pseudo_negative_factor * (10 * num_positive + num_negative) / 10.0
  ).astype(np.int64)
  pseudo = np.minimum(pseudo + 1, (pool_size - labeled) // 2)  # +1: float32 rounding slack
  return linear.bucket_size(int(np.max(labeled + pseudo)))
