"""Drives the active loop for one strategy: jit once, checkpoint every round, resume, log.

The library half of `python -m rare_jax.run` and `python -m rare_jax.replay`; it takes explicit
arguments (never absl flags). A strategy's run directory holds:

    checkpoints/      Orbax steps 0..R of the LoopState (step = rounds observed)
    fingerprint.json  what the run started with (features, seeds, loop settings): a rerun with
                      others is refused rather than resumed (`rare_jax.active.fingerprint`)
    answers.jsonl     one line per round: {"round", "query_ids", "answers"}
    metrics.jsonl     one line per round: labels used, per-category and mean metrics

Order within a round: query -> answers appended to answers.jsonl -> observe -> checkpoint ->
metrics. A run killed at any instant restarts from its newest checkpoint; answers already
recorded for the next round are reused when its query matches (a person never answers twice),
so the resumed run ends in exactly the state of an uninterrupted one. `rewind` drops the
checkpoints after a round, and `run_strategy(follow_recorded=True)` then replays the logged
rounds as they were asked (the labeling app's corrections of answers).
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rare_jax.active import answer_logs, fingerprint, labelers, linear, loop, metrics, select
from rare_jax.infra import sharding
from rare_jax.infra.checkpoint import CheckpointStore, record_or_check

# Strategies are configurations of the one loop (paper Sec. 4; the table in docs/method.md).
# querying: the query rule (`select.QUERYING_RULES`); pseudo_negatives: whether W_n is drawn;
# deep_updates: whether the deep model is retrained every Q rounds (frozen-feature strategies
# keep M_pre's features).
# Optional keys (defaults in `_SPEC_DEFAULTS`):
#   pseudo_positives: None, "kd_semi" or "deep_prop" (rare_jax.deep.strategies adds them to the
#     deep update's training set); threshold: KD-Semi's probability threshold;
#   aux_weight: None (config.deep.aux_weight) or a value (0 turns background splitting off);
#   config: overrides of the run config (f_a sweep), applied by `strategy_config`;
#   one_round_per_update: No-Linear-Updates: Q=1 and B=Q*B, the same labels per update;
#   kind: "loop", or "fully_supervised" (one deep model on every pool label, no loop:
#     `rare_jax.deep.strategies.run_fully_supervised`).
_SPEC_DEFAULTS = dict(
  pseudo_positives=None,
  threshold=None,
  aux_weight=None,
  config={},
  one_round_per_update=False,
  kind="loop",
)
KD_SEMI_THRESHOLDS = (0.9, 0.95, 0.98)  # the paper's; "kd_semi" is 0.98
F_A_SWEEP = (10.0, 30.0, 300.0, 1000.0)  # ours with other f_a (paper: 100)


def _spec(**values) -> dict:
  return dict(_SPEC_DEFAULTS, **values)


_OURS = dict(querying="adaptive", pseudo_negatives=True, deep_updates=True)
_TROPEL = dict(querying="most_likely_positive", pseudo_negatives=False)
STRATEGIES = {
  "ours": _spec(**_OURS),
  "ours_linear": _spec(querying="adaptive", pseudo_negatives=True, deep_updates=False),
  "tropel": _spec(**_TROPEL, deep_updates=False),
  # Baselines (paper Sec. 4.2).
  "tropel_deep": _spec(**_TROPEL, deep_updates=True, aux_weight=0.0),
  "kd_semi": _spec(**_OURS, pseudo_positives="kd_semi", threshold=0.98),
  **{
    f"kd_semi_{threshold:g}": _spec(**_OURS, pseudo_positives="kd_semi", threshold=threshold)
    for threshold in KD_SEMI_THRESHOLDS
    if threshold != 0.98
  },
  "deep_prop": _spec(**_OURS, pseudo_positives="deep_prop"),
  "fully_supervised": _spec(**_OURS, kind="fully_supervised"),
  # The floor of active learning (not in the paper): ours_linear but for the query rule.
  "random": _spec(querying="random", pseudo_negatives=True, deep_updates=False),
  # Ablations (paper Sec. 4.3).
  "no_pseudo_neg": _spec(querying="adaptive", pseudo_negatives=False, deep_updates=True),
  "no_bg_split": _spec(**_OURS, aux_weight=0.0),
  "no_linear_updates": _spec(**_OURS, one_round_per_update=True),
  **{f"f_a_{f_a:g}": _spec(**_OURS, config={"pseudo_negative_factor": f_a}) for f_a in F_A_SWEEP},
}


def strategy_spec(strategy: str) -> dict:
  """`STRATEGIES[strategy]`; ValueError naming the known strategies."""
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {sorted(STRATEGIES)}")
  return STRATEGIES[strategy]


def strategy_config(config, strategy: str):
  """The run config as `strategy` sees it: a copy with the strategy's overrides applied.

  Idempotent (applying it to its own output changes nothing), so callers need not track
  whether a config was already specialised.
  """
  spec = strategy_spec(strategy)
  if not spec["config"] and not spec["one_round_per_update"]:
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key, value in spec["config"].items():
      setattr(config, key, type(getattr(config, key))(value))
    if spec["one_round_per_update"]:
      # N updates of one round of Q*B queries: the same labels per update as the Q rounds.
      config.batch_size = int(config.batch_size) * int(config.rounds_per_update)
      config.rounds_per_update = 1
  return config


def loop_config(config, strategy: str) -> loop.LoopConfig:
  """The static `LoopConfig` of `strategy` under a run `config` (an ml_collections config)."""
  spec = strategy_spec(strategy)
  config = strategy_config(config, strategy)
  return loop.LoopConfig(
    batch_size=int(config.batch_size),
    querying=spec["querying"],
    pseudo_negative_factor=float(config.pseudo_negative_factor)
    if spec["pseudo_negatives"]
    else 0.0,
    l2=float(config.l2),
    max_iters=int(config.solver_max_iters),
    tol=float(config.solver_tol),
  )


def num_rounds(config) -> int:
  """N * Q rounds in all."""
  rounds = int(config.num_feature_updates) * int(config.rounds_per_update)
  if rounds < 1:
    raise ValueError(
      "num_feature_updates * rounds_per_update must be >= 1, got "
      f"{config.num_feature_updates} * {config.rounds_per_update}"
    )
  return rounds


class Engine:
  """The jitted `query` and `observe` of one `LoopConfig` (compiled once, reused every round).

  With a `mesh`, the pool is sharded over its `axis` (jit in/out shardings): the features
  `[P, D]` by rows and the state's `[C, P]` arrays by columns, so each device holds P / devices
  of them; the models, the queries and the gathered training sets are replicated. Rankings,
  top-B queries, the bottom-50% draw and the training-set positions run shard-wise plus merges
  (`pool_sharding`: per-shard top-k merged, radix-selection histograms summed across devices,
  positions found where they lie), so no device gathers a `[C, P]` array, and every row-wise
  float product is formulated to round the same whatever the split: a sharded run is bitwise
  the run on one device (tests/test_loop.py). P must be a multiple of the axis size (pad the
  pool otherwise).

  `reuse_rows` (default: on CPU devices): `step` keeps the last round's gathered training-set
  rows (`[C, train_size, D]`, 1 GiB for 10 categories x 12,288 rows x 2048 float32) and
  donates them to the next round, whose gather writes over them (`loop.observe_into`): on a
  CPU host a fresh allocation of that size page-faults every round (2-core CPU, P = 1M,
  `benchmarks/loop_round.py --breakdown`: the gather alone 0.70 s into fresh memory, 0.07 s
  into the reused buffer; whole rounds 1.60-1.72 s before, 1.25-1.45 s after). The engine
  then holds that memory between rounds (`release_rows` frees it); accelerators' allocators
  reuse device memory by themselves, so there it is off. The states are the same either way.
  """

  def __init__(
    self,
    config: loop.LoopConfig,
    *,
    mesh=None,
    axis: str = "data",
    reuse_rows: bool | None = None,
  ):
    self.config = config
    self.mesh = mesh
    self.axis = axis
    if mesh is not None and axis not in mesh.axis_names:
      raise ValueError(f"axis {axis!r} not in mesh axes {mesh.axis_names}")
    if reuse_rows is None:
      device = jax.devices()[0] if mesh is None else mesh.devices.flat[0]
      reuse_rows = device.platform == "cpu"
    if not isinstance(reuse_rows, bool):
      raise ValueError(f"reuse_rows={reuse_rows!r}; expected True, False or None (auto)")
    self.reuse_rows = reuse_rows
    self._rows = None  # the last round's training-set rows, donated to the next round
    # (labels, their label counts) of the last state `step` returned: the next step's
    # training-set size needs the counts on the host, and observe computes them anyway.
    self._last_counts = None
    # The [C, P] arrays' sharding, which query, observe and refit also take to keep top-k, the
    # radix selections' histograms and the training-set positions shard-local (None on one
    # device: the plain path).
    pool = None if mesh is None else NamedSharding(mesh, PartitionSpec(None, axis))
    observe = functools.partial(_observe_positional, config=config, pool_sharding=pool)
    refit = functools.partial(_refit_positional, config=config, pool_sharding=pool)
    query = functools.partial(loop.query, config=config, pool_sharding=pool)
    if mesh is None:
      self.features_sharding = self.state_shardings = None
      self.query = jax.jit(query)
      self.observe = jax.jit(observe, static_argnums=5, donate_argnums=4)
      self.refit = jax.jit(refit, static_argnums=2)
      self._init = jax.jit(_init_positional, static_argnums=2)
    else:
      rep = NamedSharding(mesh, PartitionSpec())
      self.features_sharding = NamedSharding(mesh, PartitionSpec(axis, None))
      self.state_shardings = loop.LoopState(
        round=rep,
        seed=rep,
        labels=pool,
        label_round=pool,
        pseudo_negative=pool,
        linear=linear.LinearModel(weights=rep, bias=rep),
        has_model=rep,
        scores=pool,
      )
      states, features = self.state_shardings, self.features_sharding
      self.query = jax.jit(query, in_shardings=(states,), out_shardings=rep)
      self.observe = jax.jit(
        observe,
        static_argnums=5,
        donate_argnums=4,
        in_shardings=(states, rep, rep, features, rep),
        out_shardings=(states, rep, rep),
      )
      self.refit = jax.jit(
        refit, static_argnums=2, in_shardings=(states, features), out_shardings=states
      )
      self._init = jax.jit(
        _init_positional,
        static_argnums=2,
        in_shardings=(features, rep),
        out_shardings=states,
      )
    self._counts = jax.jit(functools.partial(loop.label_counts, pool_sharding=pool))
    self._sizes = jax.jit(
      lambda labels, pseudo: select.count_true((labels >= 0) | pseudo, pool_sharding=pool)
    )

  def place_features(self, features) -> jax.Array:
    """The features as this engine's functions take them (rows over the mesh's axis)."""
    if self.mesh is None:
      return jnp.asarray(features)
    devices = self.mesh.shape[self.axis]
    if features.shape[0] % devices:
      raise ValueError(
        f"pool size {features.shape[0]} is not a multiple of the {devices} devices of mesh "
        f"axis {self.axis!r}: pad the pool"
      )
    return jax.device_put(features, self.features_sharding)

  def place_state(self, state: loop.LoopState) -> loop.LoopState:
    """`state` with this engine's shardings (a no-op when it has them already)."""
    if self.mesh is None:
      return state
    return jax.device_put(state, self.state_shardings)

  def init(self, features, seed_ids, *, seed: int) -> loop.LoopState:
    """`loop.init`, jitted (and sharded with a mesh)."""
    loop.check_seed_ids(seed_ids, features.shape[0])
    return self._init(self.place_features(features), jnp.asarray(seed_ids), int(seed))

  def step(self, state: loop.LoopState, query_ids, answers, features) -> loop.LoopState:
    """`observe` with the bucketed training-set size computed for this round's answers."""
    answers = np.asarray(answers, bool)
    if self._last_counts is not None and self._last_counts[0] is state.labels:
      counts = self._last_counts[1]
    else:
      counts = self._counts(state.labels)
    num_positive, num_negative = jax.device_get(counts)
    train_size = loop.required_train_size(
      num_positive + answers.sum(1),
      num_negative + (~answers).sum(1),
      state.pool_size,
      config=self.config,
    )
    state, features = self.place_state(state), self.place_features(features)
    buffer = self._rows_buffer((state.num_categories, train_size, features.shape[1]), features)
    state, rows, counts = self.observe(state, query_ids, answers, features, buffer, train_size)
    self._rows = rows if self.reuse_rows else None
    self._last_counts = (state.labels, counts)
    return state

  def _rows_buffer(self, shape: tuple[int, ...], features: jax.Array) -> jax.Array | None:
    """The buffer `observe` gathers the training sets into: the last round's rows when they
    fit (same bucket, dtype and sharding), else new zeros (once per bucket); None when rows
    are not reused."""
    if not self.reuse_rows:
      return None
    rows, self._rows = self._rows, None  # donated below: never used again from here
    sharding = None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())
    if (
      rows is not None
      and not rows.is_deleted()
      and rows.shape == shape
      and rows.dtype == features.dtype
      and (sharding is None or rows.sharding == sharding)
    ):
      return rows
    del rows
    return jnp.zeros(shape, features.dtype, device=sharding)

  def release_rows(self) -> None:
    """Frees the training-set rows kept for the next round (`reuse_rows`); the next `step`
    allocates them again."""
    self._rows = None

  def refit_on(self, state: loop.LoopState, features) -> loop.LoopState:
    """`refit` on new features, with the bucketed size of the current training set."""
    sizes = jax.device_get(self._sizes(state.labels, state.pseudo_negative))
    state, features = self.place_state(state), self.place_features(features)
    return self.refit(state, features, linear.bucket_size(int(np.max(sizes))))

  def compilations(self) -> int:
    """Number of compiled variants of `query` and `observe` so far."""
    return self.query._cache_size() + self.observe._cache_size()


def _observe_positional(
  state, query_ids, answers, features, rows_buffer, train_size, *, config, pool_sharding
):
  # jit takes no keyword arguments with in_shardings: the static size is positional.
  state, rows = loop.observe_into(
    state,
    query_ids,
    answers,
    features,
    rows_buffer,
    config=config,
    train_size=train_size,
    pool_sharding=pool_sharding,
  )
  # The counts: observe's own (CSE).
  return state, rows, loop.label_counts(state.labels, pool_sharding=pool_sharding)


def _init_positional(features, seed_ids, seed):
  return loop.init(features, seed_ids, seed=seed)


def _refit_positional(state, features, train_size, *, config, pool_sharding):
  return loop.refit(
    state, features, config=config, train_size=train_size, pool_sharding=pool_sharding
  )


def abstract_state(features: jax.Array, seed_ids: np.ndarray, seed: int):
  return jax.eval_shape(functools.partial(loop.init, seed=seed), features, seed_ids)


def read_answers(path: str) -> dict[int, dict]:
  """The answers log as {round: record}; a torn last line (killed mid-write) is dropped.

  Raises:
    ValueError: a damaged line (not JSON, or not a {round, query_ids, answers} record of
      matching shapes), naming the file and the line and saying what to do
      (`rare_jax.active.answer_logs`).
  """
  records = answer_logs.read_records(path, with_round=True, advice=answer_logs.ANSWERS_ADVICE)
  return {record["round"]: record for record in records}


def evaluate(
  state: loop.LoopState,
  val_features,
  val_ground_truth: np.ndarray,
  val_weights: np.ndarray | None = None,
) -> dict:
  """Metrics of the linear models on the validation set (F1 at probability 0.5, AP, ...).

  `val_weights` (`[V]`, the task's `val_weights`) weighs the validation images; None: all 1.
  """
  probabilities = np.asarray(
    jax.device_get(linear.predict_proba(val_features, state.linear))
  ).T  # [C, V]
  return metrics.category_metrics(probabilities, val_ground_truth, sample_weight=val_weights)


def run_strategy(
  *,
  run_dir: str,
  config,
  strategy: str,
  features: jax.Array,
  val_features: jax.Array,
  seed_ids: np.ndarray,
  val_ground_truth: np.ndarray,
  labeler: labelers.Labeler,
  updater=None,
  log: Callable[[str], None] = print,
  stop_after: int | None = None,
  engine: Engine | None = None,
  update_after: Callable[[int], bool] | None = None,
  val_weights: np.ndarray | None = None,
  follow_recorded: bool = False,
) -> list[dict]:
  """Runs (or resumes) all rounds of one strategy; returns the metrics records.

  Refuses (ValueError) to resume a run directory started with other features, seeds or loop
  settings (`rare_jax.active.fingerprint`), and seed ids outside the pool (`loop.check_seed_ids`).

  Args:
    run_dir: this strategy's directory (created).
    config: the run's ml_collections config.
    strategy: a key of `STRATEGIES`.
    features: `[P, D]` pool features (M_pre's); val_features: `[V, D]`.
    seed_ids: `[C, K]` seed positives, pool positions in [0, P) (ValueError otherwise).
    val_ground_truth: `[C, V]` bool.
    labeler: answers the queries.
    updater: a `rare_jax.deep.updates.DeepUpdater` for strategies with deep updates (every Q rounds
      the deep model is retrained, the pool re-embedded and the linear models refitted).
    log: receives progress lines.
    stop_after: stop after this many rounds in total (tests; None runs all).
    engine: an `Engine` of this strategy's `loop_config` to reuse (its compiled functions
      serve every strategy with the same `LoopConfig`); None makes one.
    update_after: with `updater`, for any loop strategy: `update_after(r)` says whether a deep
      update follows round r, instead of every `rounds_per_update` rounds (the labeling app:
      an update asked from the page). It must answer the same for a round on a restart. Each
      checkpoint records its feature version (`feature_version` in its metadata), which a
      resumed run reads back.
    val_weights: `[V]` weights of the validation images in the metrics (the task's
      `val_weights`: a weighted validation set); None weighs every image 1.
    follow_recorded: rounds of answers.jsonl beyond the newest checkpoint are replayed as
      recorded (their query ids and answers), not only when the recomputed query matches, and
      answers.jsonl is not cut back to the checkpoint. The labeling app's corrections
      (`rewind`, then this): later rounds keep the images the person was asked, with the
      corrected answers, instead of being asked again.
  """
  if strategy_spec(strategy)["kind"] != "loop":
    raise ValueError(
      f"strategy {strategy!r} runs no loop: use rare_jax.deep.strategies.run_fully_supervised"
    )
  if update_after is not None:
    if updater is None:
      raise ValueError("update_after without an updater; expected a DeepUpdater with it")
  elif STRATEGIES[strategy]["deep_updates"] != (updater is not None):
    raise ValueError(
      f"strategy {strategy!r} {'needs' if updater is None else 'takes no'} deep updater"
    )
  loop.check_seed_ids(seed_ids, features.shape[0])
  config = strategy_config(config, strategy)
  if engine is None:
    engine = Engine(loop_config(config, strategy))
  elif engine.config != loop_config(config, strategy):
    raise ValueError(
      f"engine of {engine.config} given for strategy {strategy!r}, expected "
      f"{loop_config(config, strategy)}"
    )
  features = engine.place_features(features)
  total = num_rounds(config)
  per_update = int(config.rounds_per_update)
  os.makedirs(run_dir, exist_ok=True)
  answers_path = os.path.join(run_dir, "answers.jsonl")
  metrics_path = os.path.join(run_dir, "metrics.jsonl")
  seed = int(config.seed)
  seed_ids = np.asarray(seed_ids)
  started_with = fingerprint.run_fingerprint(
    strategy=strategy,
    seed=seed,
    loop_config=engine.config,
    features=features,
    val_features=val_features,
    seed_ids=seed_ids,
    val_ground_truth=val_ground_truth,
    rounds_per_update=None if updater is None or update_after is not None else per_update,
    val_weights=val_weights,
  )

  def updates_after(round_index: int) -> bool:
    if updater is None:
      return False
    if update_after is not None:
      return bool(update_after(round_index))
    return round_index % per_update == 0

  def record_of(state, round_index, deep_metrics):
    record = _round_record(state, round_index, config, val_features, val_ground_truth, val_weights)
    if deep_metrics is not None:
      record["deep"] = deep_metrics
    return record

  primary = sharding.is_primary()
  sharding.barrier(f"run_strategy:open:{run_dir}")  # every process sees the same steps
  with CheckpointStore(os.path.join(run_dir, "checkpoints")) as store:
    latest = store.latest_step()
    if latest is None:
      if primary:
        fingerprint.record(run_dir, started_with)
      state = engine.init(features, seed_ids, seed=seed)
      # Every process saves (collective).
      store.save(0, state, {"round": 0, "strategy": strategy, "feature_version": 0})
      latest = version = 0
      recorded = {}
      if primary:
        for path in (answers_path, metrics_path):
          metrics.rewrite_up_to(path, 0)  # a fresh run: no stale lines from an older one
    else:
      # Before anything is rewritten: resuming with other features or settings would mix runs.
      if not fingerprint.check(run_dir, started_with) and primary:
        fingerprint.record(run_dir, started_with)  # a run from before fingerprints
      state, meta = store.restore(latest, abstract_state(features, seed_ids, seed))
      state = engine.place_state(state)
      version = latest // per_update if updater is not None else 0
      if update_after is not None:
        version = int(meta.get("feature_version", 0))
      if version > 0:
        features, val_features = updater.features(version)
      recorded = {r: e for r, e in read_answers(answers_path).items() if r > latest}
      sharding.barrier(f"run_strategy:read:{run_dir}")  # all read before process 0 rewrites
      if primary:
        for path in (metrics_path,) if follow_recorded else (answers_path, metrics_path):
          metrics.rewrite_up_to(path, latest)
      if (
        primary
        and latest > 0
        and not any(m["round"] == latest for m in metrics.read_metrics(metrics_path))
      ):
        # Killed between the checkpoint and the metrics line: recompute it (deterministic).
        deep_metrics = None
        if version > 0 and updates_after(latest):
          deep_metrics = updater.evaluate(version)
        with metrics.MetricsWriter(metrics_path) as writer:
          writer.write(record_of(state, latest, deep_metrics))
      log(f"[{strategy}] resuming from round {latest} of {total}")
    sharding.barrier(f"run_strategy:start:{run_dir}")  # process 0's files are as resumed

    records = metrics.read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    last = total if stop_after is None else min(total, stop_after)
    with (
      metrics.MetricsWriter(answers_path if primary else None) as answers_log,
      metrics.MetricsWriter(metrics_path if primary else None) as metrics_log,
    ):
      for round_index in range(latest + 1, last + 1):
        start = time.perf_counter()
        previous = recorded.pop(round_index, None)
        if follow_recorded and previous is not None:
          query_ids = np.asarray(previous["query_ids"])
        else:
          query_ids = np.asarray(jax.device_get(engine.query(state)))
        if previous is not None and np.array_equal(previous["query_ids"], query_ids):
          answers = labelers.check_answers(
            query_ids, np.asarray(previous["query_ids"]), np.asarray(previous["answers"], bool)
          )
          replayed = follow_recorded
        else:
          replayed = False
          if follow_recorded and recorded:
            raise ValueError(
              f"{answers_path} records rounds {sorted(recorded)} after round {round_index}, "
              f"which it lacks; expected consecutive rounds"
            )
          answers = np.asarray(labeler.answer(query_ids), bool)
          if answers.shape != query_ids.shape:
            raise ValueError(
              f"labeler returned answers of shape {answers.shape}, expected {query_ids.shape}"
            )
        if not replayed:  # a replayed round's line is in the file already
          answers_log.write(
            {"round": round_index, "query_ids": query_ids.tolist(), "answers": answers.tolist()}
          )
        state = engine.step(state, query_ids, answers, features)
        deep_metrics = None
        if updates_after(round_index):
          version += 1
          engine.release_rows()  # not held through the deep update
          features, val_features, deep_metrics = updater.update(state, version)
          state = engine.refit_on(state, features)
        store.save(
          round_index,
          state,
          {"round": round_index, "strategy": strategy, "feature_version": version},
        )
        record = record_of(state, round_index, deep_metrics)
        record["seconds"] = round(time.perf_counter() - start, 3)
        metrics_log.write(record)
        records.append(record)
        deep = ""
        if deep_metrics is not None and "mean_f1" in deep_metrics:
          deep = f" | deep head mean F1 {deep_metrics['mean_f1']:.3f}"
        log(
          f"[{strategy}] round {round_index:3d}/{total} | labels/category "
          f"{record['labels_per_category']:4d} | positives found {record['positives_found']} | "
          f"mean F1 {record['mean_f1']:.3f}{deep} | {record['seconds']:.2f}s"
        )
  engine.release_rows()  # an engine kept for other runs (compare) holds no rows between them
  return records


def _round_record(
  state, round_index, config, val_features, val_ground_truth, val_weights=None
) -> dict:
  # Plain sums (eager, once per round): a sharded state stays sharded, nothing is gathered.
  labels = state.labels
  num_positive, num_negative = (
    np.asarray(x) for x in jax.device_get(((labels == 1).sum(-1), (labels == 0).sum(-1)))
  )
  seeds = np.asarray(jax.device_get((state.label_round == 0).sum(-1)))
  record = {
    "round": round_index,
    "labels_per_category": round_index * int(config.batch_size),
    "positives_found": (num_positive - seeds).tolist(),
    "num_negative": num_negative.tolist(),
    "num_pseudo_negative": np.asarray(jax.device_get(state.pseudo_negative.sum(-1))).tolist(),
    "model": "linear",
  }
  record.update(evaluate(state, val_features, val_ground_truth, val_weights))
  return record


def rewind(run_dir: str, to_round: int, like) -> dict:
  """Drops a run's checkpoints after `to_round` (newest first) and its metrics lines after it;
  returns the metadata of checkpoint `to_round` (restored into `like`, the abstract state, so
  a damaged one is refused before anything is dropped). answers.jsonl is left as it is: a
  `run_strategy(follow_recorded=True)` then replays its later rounds (the labeling app's
  corrections, with their answers corrected in answers.jsonl first).

  The newest remaining checkpoint is a state of the run at every instant, so a kill during the
  rewind leaves a run that resumes (and a repeated rewind finishes the job).

  Raises:
    ValueError: `to_round` has no checkpoint, or it cannot be restored.
  """
  directory = os.path.join(run_dir, "checkpoints")
  with CheckpointStore(directory) as store:
    steps = store.all_steps()
    if isinstance(to_round, bool) or not isinstance(to_round, int) or to_round not in steps:
      raise ValueError(f"to_round={to_round!r}; expected a checkpointed round of {steps}")
    _, meta = store.restore(to_round, like)
  for step in sorted((s for s in steps if s > to_round), reverse=True):
    path = os.path.join(directory, str(step))
    if not os.path.isdir(path) or os.path.islink(path):
      raise ValueError(f"checkpoint step {step}: {path} is not its directory; cannot rewind")
    shutil.rmtree(path)
  with CheckpointStore(directory) as store:
    left = store.all_steps()
  if max(left) != to_round:
    raise ValueError(f"{directory} still holds steps {left} after rewinding to {to_round}")
  metrics.rewrite_up_to(os.path.join(run_dir, "metrics.jsonl"), to_round)
  return meta


def write_config(workdir: str, config_json: dict) -> None:
  """Records the run's config; refuses a workdir that holds a run of another config."""
  record_or_check(
    os.path.join(workdir, "config.json"),
    config_json,
    what="config",
    refusal=lambda differences: (
      f"workdir {workdir} holds a run of another config (differs in {differences}); "
      "use a new --workdir or the original config"
    ),
  )


def replay_strategy(
  *,
  run_dir: str,
  config,
  strategy: str,
  features: jax.Array,
  seed_ids: np.ndarray,
  updater=None,
  recorded=None,
  log: Callable[[str], None] = print,
) -> bool:
  """Re-runs a strategy directory from checkpoint 0 with its recorded answers.

  Args:
    run_dir, config, strategy, features, seed_ids: as for `run_strategy`.
    updater: for deep strategies, a `DeepUpdater` writing into a scratch directory.
    recorded: for deep strategies, a `DeepUpdater` on `run_dir` (to read the run's features).
    log: receives one line per round.

  Returns:
    True when every round's query, state (bit for bit) and features match the records.
  """
  config = strategy_config(config, strategy)
  engine = Engine(loop_config(config, strategy))
  per_update = int(config.rounds_per_update)
  like = abstract_state(features, seed_ids, int(config.seed))
  answers = read_answers(os.path.join(run_dir, "answers.jsonl"))

  def mismatch(round_index, why):
    log(f"[{strategy}] round {round_index}: {why}: MISMATCH")
    return False

  with CheckpointStore(os.path.join(run_dir, "checkpoints")) as store:
    steps = store.all_steps()
    if not steps or steps[0] != 0:
      return mismatch(0, f"no checkpoint 0 in {run_dir}")
    state, _ = store.restore(0, like)
    for round_index in steps[1:]:
      record = answers.get(round_index)
      if record is None:
        return mismatch(round_index, "no recorded answers")
      query_ids = np.asarray(jax.device_get(engine.query(state)))
      if not np.array_equal(query_ids, record["query_ids"]):
        return mismatch(round_index, "recomputed query differs from the log")
      try:
        answer = labelers.check_answers(
          query_ids, np.asarray(record["query_ids"]), np.asarray(record["answers"])
        )
      except ValueError as e:
        return mismatch(round_index, f"bad answers record ({e})")
      state = engine.step(state, query_ids, answer, features)
      if updater is not None and round_index % per_update == 0:
        engine.release_rows()
        features, val_features, _ = updater.update(state, round_index // per_update)
        different = differing_leaves(
          (features, val_features), recorded.features(round_index // per_update)
        )
        if different:
          return mismatch(round_index, f"re-embedded features differ from the run's {different}")
        state = engine.refit_on(state, features)
      stored, _ = store.restore(round_index, like)
      different = differing_leaves(state, stored)
      if different:
        return mismatch(round_index, f"state differs from checkpoint in {different}")
      log(f"[{strategy}] round {round_index}: identical")
  return True


def differing_leaves(a, b) -> list[str]:
  """Paths of the leaves where two pytrees differ (exact: bitwise for floats)."""
  leaves_a = jax.tree_util.tree_flatten_with_path(a)[0]
  leaves_b = jax.tree.leaves(b)
  return [
    jax.tree_util.keystr(path)
    for (path, x), y in zip(leaves_a, leaves_b, strict=True)
    if not _bitwise_equal(np.asarray(jax.device_get(x)), np.asarray(jax.device_get(y)))
  ]


def _bitwise_equal(x: np.ndarray, y: np.ndarray) -> bool:
  return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
