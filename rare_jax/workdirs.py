"""A run's working directory: its config, task and cached features, created once and reloaded.

WORKDIR/config.json        the config the run was started with (a rerun must match it)
WORKDIR/task.json          the RareTask (pool, seeds, validation, pretraining split)
WORKDIR/m_pre/             M_pre's TrainState checkpoints (config.features == "m_pre")
WORKDIR/features/          the features the loop starts from: for "pixel_pca" pool.npy and
                           val.npy; for "m_pre" feature stores pool/ (with M_pre's hard
                           predictions, the auxiliary labels) and val/
WORKDIR/<strategy>/        one directory per strategy (see rare_jax.active.runner)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from rare_jax.active import runner
from rare_jax.data import sources, tasks
from rare_jax.deep import m_pre, selfsup, stand_in, strategies, updates
from rare_jax.infra import sharding

FEATURE_KINDS = ("pixel_pca", "m_pre")


@dataclasses.dataclass(frozen=True)
class RunContext:
  """What every strategy of a run shares.

  Attributes:
    features, val_features: `[P, D]` and `[V, D]` starting features (device arrays).
    aux_labels: `[P]` M_pre's hard predictions on the pool (None for pixel features).
    deep_parts: for "m_pre" runs, a dict with the `DeepSettings`, the `ImageData`, M_pre's
      variables and its number of classes; None otherwise.
  """

  config: ml_collections.ConfigDict
  workdir: str
  task: tasks.RareTask
  features: jnp.ndarray
  val_features: jnp.ndarray
  aux_labels: np.ndarray | None = None
  deep_parts: dict[str, Any] | None = None

  def updater(self, strategy: str, run_dir: str | None = None, *, log=print):
    """A `DeepUpdater` for strategies with deep updates, else None.

    The strategy's deep settings (`aux_weight` 0 for No-BG-Splitting and Tropel-Deep) and
    pseudo-labeler (KD-Semi, DeepProp) come from `runner.STRATEGIES`.
    """
    spec = runner.strategy_spec(strategy)
    if not spec["deep_updates"]:
      return None
    if self.deep_parts is None:
      raise ValueError(
        f"strategy {strategy!r} trains the deep model: it needs config.features='m_pre', "
        f"got {self.config.features!r}"
      )
    settings = self.deep_parts["settings"]
    if spec["aux_weight"] is not None:
      settings = dataclasses.replace(settings, aux_weight=float(spec["aux_weight"]))
    if spec["kind"] == "fully_supervised":
      settings = dataclasses.replace(
        settings, epochs=strategies.fully_supervised_epochs(self.config)
      )
    config = runner.strategy_config(self.config, strategy)
    mode = normalization_mode(self.config)
    refit = None
    if not settings.warm_start and runner.strategy_spec(strategy)["kind"] == "loop":
      engine = functools.cache(lambda: runner.Engine(runner.loop_config(config, strategy)))
      refit = lambda state, features: engine().refit_on(state, features)  # noqa: E731
    return updates.DeepUpdater(
      run_dir=run_dir or os.path.join(self.workdir, strategy),
      settings=settings,
      task=self.task,
      data=self.deep_parts["data"],
      m_pre_variables=self.deep_parts["m_pre_variables"],
      num_aux_classes=self.deep_parts["num_aux_classes"],
      aux_labels=self.aux_labels,
      base_features=(self.features, self.val_features),
      normalize=functools.partial(normalize_features, mode=mode),
      statistics=functools.partial(feature_statistics, mode=mode),
      base_raw_pool=self.deep_parts["raw_pool"],
      seed=int(self.config.seed),
      log=log,
      pseudo_labeler=strategies.pseudo_labeler(spec, config),
      pool_outputs=strategies.pool_outputs(spec),
      refit=refit,
    )


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON data (tuples become lists), for config.json and comparisons."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def prepare(
  workdir: str, config: ml_collections.ConfigDict, *, log: Callable[[str], None] = print
) -> RunContext:
  """Creates or reopens `workdir` for `config` (refusing one made with another config)."""
  if config.features not in FEATURE_KINDS:
    raise ValueError(f"config.features must be one of {FEATURE_KINDS}, got {config.features!r}")
  for strategy in config.strategies:
    runner.loop_config(config, strategy)  # fail on a bad strategy or setting before any work
    if runner.STRATEGIES[strategy]["deep_updates"] and config.features != "m_pre":
      raise ValueError(
        f"strategy {strategy!r} trains the deep model: it needs config.features='m_pre', "
        f"got {config.features!r}"
      )
  runner.num_rounds(config)
  # Settings read later, checked before config.json records them (a typo would otherwise be
  # recorded and then refuse the corrected config in the same workdir).
  validation_mode(config)
  normalization_mode(config)
  if "deep" in config:
    updates.DeepSettings.from_config(config.deep)
  # Multi-host: process 0 writes config.json, task.json and pixel features; the others then
  # read (or check) what it wrote.
  sharding.primary_first(
    lambda: _write_config(workdir, config), f"prepare:config:{os.path.abspath(workdir)}"
  )
  data_dir = config.data_dir or None
  task = sharding.primary_first(
    lambda: _task(workdir, config, data_dir, log), f"prepare:task:{os.path.abspath(workdir)}"
  )
  if config.features == "pixel_pca":
    features, val_features = sharding.primary_first(
      lambda: _pixel_features(workdir, config, task, data_dir, log),
      f"prepare:features:{os.path.abspath(workdir)}",
    )
    return RunContext(config, workdir, task, features, val_features)
  return _m_pre_context(workdir, config, task, data_dir, log)


def _write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  os.makedirs(workdir, exist_ok=True)
  runner.write_config(workdir, config_to_dict(config))


def validation_mode(config) -> str:
  """`config.validation`: how the validation set gets the pool's imbalance (`tasks.make_task`).

  Absent means "subsample" (configs from before the key).
  """
  mode = config.get("validation", "subsample")
  if mode not in tasks.VALIDATION_MODES:
    raise ValueError(f"config.validation={mode!r}; expected one of {tasks.VALIDATION_MODES}")
  return mode


def _task(workdir: str, config, data_dir: str | None, log) -> tasks.RareTask:
  mode = validation_mode(config)
  if os.path.exists(os.path.join(workdir, "task.json")):
    task = tasks.RareTask.load(workdir, data_dir=data_dir)
    # config.json already refuses another config; this catches a task.json put there by hand.
    if task.validation != mode:
      raise ValueError(
        f"{workdir}/task.json has a {task.validation!r} validation set but "
        f"config.validation={mode!r}; use a new workdir"
      )
    return task
  log(f"building the task: {config.dataset}, categories {tuple(config.categories)}")
  task = tasks.task_from_dataset(
    config.dataset,
    tuple(config.categories),
    int(config.seed),
    data_dir=data_dir,
    pool_fraction=float(config.pool_fraction),
    num_seed_positives=int(config.num_seed_positives),
    # Datasets whose test split is unlabeled (iNaturalist, Places) evaluate on "validation".
    train_split=config.get("train_split", "train"),
    eval_split=config.get("eval_split", "test"),
    validation=mode,
  )
  task.save(workdir)
  return task


def load(workdir: str, *, log: Callable[[str], None] = lambda _: None) -> RunContext:
  """Reopens a finished or running workdir exactly as it was created (for replay)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{workdir} holds no run: {path} is missing")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  return prepare(workdir, config, log=log)


def check_features(features: np.ndarray, rows: int, name: str) -> None:
  """Raises ValueError unless `features` is a finite float `[rows, D]` array."""
  if features.ndim != 2 or features.shape[0] != rows:
    raise ValueError(f"{name} features must be [{rows}, D], got shape {features.shape}")
  finite = np.isfinite(features.astype(np.float32, copy=False))
  if not finite.all():
    bad = np.flatnonzero(~finite.all(axis=1))
    raise ValueError(f"{name} features hold NaN/inf in {len(bad)} rows (first: {bad[:5].tolist()})")


def image_data(config, task: tasks.RareTask, data_dir: str | None):
  """The task's images for the deep model; in memory when small (the embedded default)."""
  train = sources.open_source(config.dataset, task.train_split, data_dir)
  evaluation = sources.open_source(config.dataset, task.eval_split, data_dir)
  if config.get("images_in_memory", True):
    return updates.ImageData(train=sources.load_arrays(train), eval=sources.load_arrays(evaluation))
  return updates.ImageData(train=train, eval=evaluation)


def _pixel_features(workdir, config, task, data_dir, log):
  directory = os.path.join(workdir, "features")
  pool_path = os.path.join(directory, "pool.npy")
  val_path = os.path.join(directory, "val.npy")
  if not (os.path.exists(pool_path) and os.path.exists(val_path)):
    log(f"computing stand-in features ({config.features}, dim {config.feature_dim})")
    train = sources.open_source(config.dataset, task.train_split, data_dir)
    evaluation = sources.open_source(config.dataset, task.eval_split, data_dir)
    pretrain_images, _ = sources.load_arrays(train, task.pretrain_ids)
    pool_images, _ = sources.load_arrays(train, task.pool_ids)
    val_images, _ = sources.load_arrays(evaluation, task.val_ids)
    pool, val = stand_in.pixel_pca_features(
      pretrain_images, pool_images, val_images, dim=int(config.feature_dim)
    )
    os.makedirs(directory, exist_ok=True)
    for path, array in ((pool_path, pool), (val_path, val)):
      np.save(path + ".tmp.npy", array)
      os.replace(path + ".tmp.npy", path)
  return _checked(np.load(pool_path, mmap_mode="r"), np.load(val_path, mmap_mode="r"), task, config)


NORMALIZATIONS = ("standardize", "none")


def normalization_mode(config) -> str:
  """`config.feature_normalization` (absent means "none"), checked."""
  mode = config.get("feature_normalization", "none")
  if mode not in NORMALIZATIONS:
    raise ValueError(f"config.feature_normalization must be one of {NORMALIZATIONS}, got {mode!r}")
  return mode


def feature_statistics(pool, mode: str) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) `[D]` that `normalize_features` applies: `(x - mean) / std`."""
  if mode not in NORMALIZATIONS:
    raise ValueError(f"config.feature_normalization must be one of {NORMALIZATIONS}, got {mode!r}")
  pool = jnp.asarray(np.asarray(pool), jnp.float32)
  if mode == "none":
    dim = pool.shape[-1]
    return np.zeros(dim, np.float32), np.ones(dim, np.float32)
  mean = jnp.mean(pool, axis=0)
  std = jnp.std(pool, axis=0) + 1e-6
  return np.asarray(mean), np.asarray(std)


def normalize_features(pool, val, mode: str):
  """Feature preprocessing for the linear models, statistics from the (unlabeled) pool.

  "standardize": z-score each dimension with the pool's mean and standard deviation; "none":
  as stored (the paper's, and the demo's). Measured (docs/reproducing.md): z-scoring helped the
  first release's small M_pre (`ours_linear` F1 at 100 labels 0.43 vs 0.23 raw) and costs ~0.03
  at 100 labels on the demo's ImageNet features.
  """
  mean, std = feature_statistics(pool, mode)
  pool = jnp.asarray(np.asarray(pool), jnp.float32)
  val = jnp.asarray(np.asarray(val), jnp.float32)
  if mode == "none":
    return pool, val
  return (pool - mean) / std, (val - mean) / std


def _checked(pool, val, task, config):
  check_features(pool, len(task.pool_ids), "pool")
  check_features(val, len(task.val_ids), "validation")
  return normalize_features(pool, val, normalization_mode(config))


def _m_pre_context(workdir, config, task, data_dir, log) -> RunContext:
  settings = updates.DeepSettings.from_config(config.deep)
  return m_pre_context(workdir, config, task, image_data(config, task, data_dir), settings, log=log)


def m_pre_context(
  workdir: str,
  config: ml_collections.ConfigDict,
  task: tasks.RareTask,
  data: updates.ImageData,
  settings: updates.DeepSettings,
  *,
  log: Callable[[str], None] = print,
) -> RunContext:
  """Algorithm 1 lines 1-2: M_pre (`rare_jax.deep.m_pre`: pretrained weights, or trained here on
  the related-domain split if missing), its features and A_l (its argmax over the pool).

  Writes `workdir/m_pre` and `workdir/features/{pool,val}`; reopening resumes or restores.
  """
  ssl = None
  if "self_supervised" in config:
    ssl = selfsup.SelfSupSettings.from_config(config.self_supervised)
  start = m_pre.load(
    task, data, settings, os.path.join(workdir, "m_pre"), seed=int(config.seed), log=log, ssl=ssl
  )
  model, state = start.model, start.state
  directory = os.path.join(workdir, "features")
  pool = updates.embed(
    model,
    state,
    data.train,
    task.pool_ids,
    os.path.join(directory, "pool"),
    settings,
    outputs=("embedding", "labels"),
    log=log,
  )
  val = updates.embed(
    model, state, data.eval, task.val_ids, os.path.join(directory, "val"), settings, log=log
  )
  features, val_features = _checked(pool.features, val.features, task, config)
  return RunContext(
    config,
    workdir,
    task,
    features,
    val_features,
    aux_labels=np.asarray(pool["labels"]),
    deep_parts={
      "settings": settings,
      "data": data,
      "m_pre_variables": state.variables,
      "num_aux_classes": start.num_classes,
      "raw_pool": pool.features,
    },
  )
