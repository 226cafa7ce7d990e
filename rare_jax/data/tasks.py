"""Rare-category tasks: the pool, seed positives, validation set and related-domain split.

A `RareTask` is built from the labels of a dataset's train and eval splits (`make_task`), so
it is testable without images:
- the train split is cut by a seeded permutation into a related-domain part, kept only for its
  non-rare classes (the pretraining split of `M_pre`), and a pool part;
- in the pool part every non-rare image is kept and each rare category is subsampled to `k`
  images with `k / pool_size == pool_fraction` within one image:
  `k = round(pool_fraction * P_nonrare / (1 - C * pool_fraction))`;
- `num_seed_positives` seed positives per category are drawn from the pool's positives;
- the validation set is the eval split at the pool's imbalance: `validation="subsample"`
  subsamples each rare category of it as the pool (`k` images by the same formula), or
  `validation="weighted"` keeps every eval image and weighs each image of rare category `r`
  `k / n_r` (`n_r` its eval images; every other image weighs 1), the same set in expectation
  with all `n_r` positives (`RareTask.val_weights`; docs/reproducing.md).
Every random choice derives from `seed` (one NumPy stream per purpose). Saved as JSON
(`task.json`) in a run's workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from rare_jax.data import sources

TASK_FILE = "task.json"
TASK_FORMAT = "rare_jax.RareTask/1"
# Seed positives plus at least one positive left to find.
MIN_POOL_POSITIVES = 6
# Independent random streams (np.random.default_rng([seed, stream])).
_SPLIT_STREAM, _POOL_STREAM, _SEED_STREAM, _VAL_STREAM = range(4)
# How the validation set gets the pool's imbalance (see the module docstring).
VALIDATION_MODES = ("subsample", "weighted")

_OPTIONAL_FIELDS = ("val_weights", "data_dir")  # Not required in task.json.
_ARRAY_FIELDS = (
  "pool_ids",
  "pool_labels",
  "seed_positives",
  "val_ids",
  "val_labels",
  "pretrain_ids",
  "pretrain_labels",
)


@dataclasses.dataclass(frozen=True, eq=False)
class RareTask:
  """A rare-category task: which images form the pool, the seeds, validation and pretraining.

  Ids are indices into a split of `dataset`: `pool_ids` and `pretrain_ids` into
  `train_split`, `val_ids` into `eval_split`. `seed_positives[c]` are positions into the pool
  (indices into `pool_ids`) of category `categories[c]`. Labels are the dataset's class ids.
  `val_weights` (float64 `[V]`, or None for all ones) weighs each validation image in the
  metrics (`validation="weighted"`).
  """

  dataset: str
  train_split: str
  eval_split: str
  categories: tuple[int, ...]
  category_names: tuple[str, ...]
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  seed: int
  pool_fraction: float
  num_seed_positives: int
  pretrain_fraction: float
  pool_ids: np.ndarray
  pool_labels: np.ndarray
  seed_positives: np.ndarray
  val_ids: np.ndarray
  val_labels: np.ndarray
  pretrain_ids: np.ndarray
  pretrain_labels: np.ndarray
  val_weights: np.ndarray | None = None  # None: every validation image weighs 1.
  data_dir: str | None = None  # Where the dataset lives on this machine; not saved.

  def __post_init__(self):
    object.__setattr__(self, "categories", tuple(int(c) for c in self.categories))
    object.__setattr__(self, "category_names", tuple(str(n) for n in self.category_names))
    for name in _ARRAY_FIELDS:
      array = np.array(getattr(self, name), dtype=np.int64)
      array.setflags(write=False)
      object.__setattr__(self, name, array)
    if self.val_weights is not None:
      weights = _float_array(self.val_weights, "val_weights")
      weights.setflags(write=False)
      object.__setattr__(self, "val_weights", weights)
    _check_task(self)

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, RareTask):
      return NotImplemented
    for field in dataclasses.fields(self):
      mine, theirs = getattr(self, field.name), getattr(other, field.name)
      if field.name in _ARRAY_FIELDS or field.name == "val_weights":
        if (mine is None) != (theirs is None) or not np.array_equal(mine, theirs):
          return False
      elif mine != theirs:
        return False
    return True

  __hash__ = None

  @property
  def num_categories(self) -> int:
    return len(self.categories)

  @property
  def pool_size(self) -> int:
    return len(self.pool_ids)

  @property
  def validation(self) -> str:
    """How the validation set has the pool's imbalance: "subsample" or "weighted"."""
    return "subsample" if self.val_weights is None else "weighted"

  @property
  def related_classes(self) -> tuple[int, ...]:
    """The dataset's classes that are not rare: the classes of the pretraining split."""
    return tuple(c for c in range(self.num_classes) if c not in self.categories)

  def ground_truth(self) -> np.ndarray:
    """bool [C, P]: whether pool image p belongs to category c (the simulated labeler)."""
    return self.pool_labels[None, :] == np.asarray(self.categories)[:, None]

  def val_ground_truth(self) -> np.ndarray:
    """bool [C, V]: whether validation image v belongs to category c."""
    return self.val_labels[None, :] == np.asarray(self.categories)[:, None]

  def seed_ids(self) -> np.ndarray:
    """int64 [C, S]: the seed positives as ids of the train split."""
    return self.pool_ids[self.seed_positives]

  def to_json(self) -> str:
    record: dict[str, Any] = {"format": TASK_FORMAT}
    for field in dataclasses.fields(self):
      if field.name == "data_dir":
        continue
      value = getattr(self, field.name)
      if field.name == "val_weights":
        # Omitted when None: a subsampled task writes the task.json it wrote before the field.
        if value is not None:
          record[field.name] = value.tolist()
        continue
      record[field.name] = value.tolist() if field.name in _ARRAY_FIELDS else value
    record["categories"] = list(self.categories)
    record["category_names"] = list(self.category_names)
    return json.dumps(record)

  @classmethod
  def from_json(cls, text: str, *, data_dir: str | None = None) -> RareTask:
    """Parses `to_json` output; ValueError naming what is malformed."""
    try:
      record = json.loads(text)
    except json.JSONDecodeError as error:
      raise ValueError(f"task JSON does not parse: {error}") from None
    if not isinstance(record, dict):
      raise ValueError(f"task JSON is a {type(record).__name__}; expected an object")
    if record.get("format") != TASK_FORMAT:
      raise ValueError(f"task JSON format {record.get('format')!r}; expected {TASK_FORMAT!r}")
    names = [f.name for f in dataclasses.fields(cls) if f.name not in _OPTIONAL_FIELDS]
    missing = [name for name in names if name not in record]
    if missing:
      raise ValueError(f"task JSON misses keys {missing}; expected all of {names}")
    unknown = sorted(set(record) - set(names) - {"format", "val_weights"})
    if unknown:
      raise ValueError(
        f"task JSON has unknown keys {unknown}; expected only {names} and 'val_weights'"
      )
    kinds = {
      "dataset": str,
      "train_split": str,
      "eval_split": str,
      "num_classes": int,
      "num_train_examples": int,
      "num_eval_examples": int,
      "seed": int,
      "num_seed_positives": int,
      "pool_fraction": float,
      "pretrain_fraction": float,
    }
    for name, kind in kinds.items():
      value = record[name]
      ok = isinstance(value, kind) and not isinstance(value, bool)
      if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
      if not ok:
        raise ValueError(f"task JSON {name}={value!r}; expected a {kind.__name__}")
    for name in ("categories", "category_names"):
      if not isinstance(record[name], list):
        raise ValueError(f"task JSON {name}={record[name]!r}; expected a list")
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in record["categories"]):
      raise ValueError(f"task JSON categories={record['categories']!r}; expected ints")
    if not all(isinstance(n, str) for n in record["category_names"]):
      raise ValueError(f"task JSON category_names={record['category_names']!r}; expected strings")
    for name in _ARRAY_FIELDS:
      record[name] = _int_array(record[name], name)
    record["pool_fraction"] = float(record["pool_fraction"])
    record["pretrain_fraction"] = float(record["pretrain_fraction"])
    # Absent in files written before the field (and for subsampled validation sets): None.
    val_weights = record.get("val_weights")
    if val_weights is not None:
      val_weights = _float_array(val_weights, "val_weights", where="task JSON ")
    return cls(**{name: record[name] for name in names}, val_weights=val_weights, data_dir=data_dir)

  def save(self, workdir: str | os.PathLike) -> pathlib.Path:
    """Writes `workdir/task.json` atomically (a killed write leaves the old file or none)."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / TASK_FILE
    temporary = workdir / f".{TASK_FILE}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
      f.write(self.to_json())
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
    return path

  @classmethod
  def load(cls, workdir: str | os.PathLike, *, data_dir: str | None = None) -> RareTask:
    """Reads `workdir/task.json`."""
    path = pathlib.Path(workdir) / TASK_FILE
    if not path.is_file():
      raise FileNotFoundError(f"No task at {path}; expected a {TASK_FILE} written by save()")
    return cls.from_json(path.read_text(), data_dir=data_dir)

  def summary(self) -> str:
    """Human-readable counts: pool, positives per category, seeds, validation, pretraining."""
    truth = self.ground_truth()
    val_truth = self.val_ground_truth()
    lines = [
      f"dataset {self.dataset} (train split {self.train_split!r}: {self.num_train_examples} "
      f"images, eval split {self.eval_split!r}: {self.num_eval_examples} images), seed "
      f"{self.seed}",
      f"pool: {self.pool_size} images from {self.train_split!r}, target fraction per "
      f"category {self.pool_fraction:.4%}",
    ]
    for c, (category, name) in enumerate(zip(self.categories, self.category_names, strict=True)):
      positives = int(truth[c].sum())
      in_validation = f"{int(val_truth[c].sum())} in validation"
      if self.val_weights is not None:
        in_validation += f" (weight sum {self.val_weights[val_truth[c]].sum():.2f})"
      lines.append(
        f"  category {category} ({name}): {positives} positives in pool "
        f"({positives / self.pool_size:.4%}), {in_validation}; seed "
        f"ids {self.seed_ids()[c].tolist()} (pool positions {self.seed_positives[c].tolist()})"
      )
    lines += [
      f"validation: {len(self.val_ids)} images from {self.eval_split!r}, "
      f"{int(val_truth.any(axis=0).sum())} of them rare-category positives"
      + ("" if self.val_weights is None else " (weighted to the pool's imbalance)"),
      f"related-domain (pretraining) split: {len(self.pretrain_ids)} images of "
      f"{len(self.related_classes)} non-rare classes from {self.train_split!r}",
    ]
    return "\n".join(lines)


def _int_array(value: Any, name: str) -> np.ndarray:
  try:
    array = np.asarray(value)
  except ValueError as error:  # Ragged nested lists.
    raise ValueError(f"task JSON {name} is not a regular array: {error}") from None
  if array.size and not np.issubdtype(array.dtype, np.integer):
    raise ValueError(f"task JSON {name} has {array.dtype} values; expected integers")
  return array.astype(np.int64)


def _float_array(value: Any, name: str, *, where: str = "") -> np.ndarray:
  try:
    array = np.asarray(value)
  except ValueError as error:  # Ragged nested lists.
    raise ValueError(f"{where}{name} is not a regular array: {error}") from None
  if array.size and not (
    np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
  ):
    raise ValueError(f"{where}{name} has {array.dtype} values; expected numbers")
  return array.astype(np.float64)


def _check_ids(ids: np.ndarray, name: str, upper: int) -> None:
  if ids.ndim != 1:
    raise ValueError(f"{name} has shape {ids.shape}; expected one dimension")
  if ids.size and (ids.min() < 0 or ids.max() >= upper):
    bad = ids[(ids < 0) | (ids >= upper)][0]
    raise ValueError(f"{name} contains {bad}; expected ids in [0, {upper})")
  if len(np.unique(ids)) != len(ids):
    raise ValueError(f"{name} contains duplicate ids; expected distinct ids")


def _check_task(task: RareTask) -> None:
  """The invariants every task holds (checked on construction, e.g. from JSON)."""
  _check_categories(task.categories, task.num_classes)
  if len(task.category_names) != len(task.categories):
    raise ValueError(
      f"{len(task.category_names)} category_names for {len(task.categories)} categories; "
      "expected one name per category"
    )
  _check_fractions(task.pool_fraction, task.pretrain_fraction, len(task.categories))
  for ids, labels, name, upper in (
    (task.pool_ids, task.pool_labels, "pool", task.num_train_examples),
    (task.val_ids, task.val_labels, "val", task.num_eval_examples),
    (task.pretrain_ids, task.pretrain_labels, "pretrain", task.num_train_examples),
  ):
    _check_ids(ids, f"{name}_ids", upper)
    if labels.shape != ids.shape:
      raise ValueError(
        f"{name}_labels has shape {labels.shape}; expected {ids.shape} like {name}_ids"
      )
    if labels.size and (labels.min() < 0 or labels.max() >= task.num_classes):
      raise ValueError(f"{name}_labels out of range; expected class ids in [0, {task.num_classes})")
  if task.val_weights is not None:
    _check_val_weights(task.val_weights, task.val_ids.shape)
  if np.intersect1d(task.pool_ids, task.pretrain_ids).size:
    raise ValueError("pool_ids and pretrain_ids overlap; expected disjoint train images")
  if np.isin(task.pretrain_labels, task.categories).any():
    raise ValueError("pretrain_labels contain a rare category; expected only related classes")
  expected_shape = (len(task.categories), task.num_seed_positives)
  if task.seed_positives.shape != expected_shape:
    raise ValueError(
      f"seed_positives has shape {task.seed_positives.shape}; expected {expected_shape} "
      "(categories x num_seed_positives)"
    )
  positions = task.seed_positives
  if positions.size and (positions.min() < 0 or positions.max() >= len(task.pool_ids)):
    raise ValueError(
      f"seed_positives out of range; expected pool positions in [0, {task.pool_size})"
    )
  for c, category in enumerate(task.categories):
    if not np.all(task.pool_labels[positions[c]] == category):
      raise ValueError(
        f"seed_positives[{c}] = {positions[c].tolist()} are not all of category {category}; "
        "expected true positives of the pool"
      )


def _check_val_weights(weights: np.ndarray, shape: tuple[int, ...]) -> None:
  if weights.shape != shape:
    raise ValueError(f"val_weights has shape {weights.shape}; expected {shape} like val_ids")
  if not np.isfinite(weights).all():
    raise ValueError(
      f"val_weights holds {int((~np.isfinite(weights)).sum())} non-finite values; expected "
      "finite weights"
    )
  if (weights < 0).any():
    raise ValueError(f"val_weights holds {weights[weights < 0][0]}; expected weights >= 0")


def _check_categories(categories: Sequence[int], num_classes: int) -> None:
  if not categories:
    raise ValueError("categories=(); expected at least one rare category id")
  for category in categories:
    if not 0 <= category < num_classes:
      raise ValueError(
        f"category id {category} is not in the dataset; expected ids in [0, {num_classes})"
      )
  if len(set(categories)) != len(categories):
    raise ValueError(f"duplicate categories {list(categories)}; expected distinct ids")
  if len(categories) >= num_classes:
    raise ValueError(
      f"{len(categories)} categories of {num_classes} classes; expected at least one class "
      "left non-rare for the pool and the related domain"
    )


def _check_fractions(pool_fraction: float, pretrain_fraction: float, num_categories: int) -> None:
  if not 0 < pool_fraction < 1 / num_categories:
    raise ValueError(
      f"pool_fraction={pool_fraction}; expected 0 < pool_fraction < 1/{num_categories} "
      "(the paper's range is 0.0001-0.0027)"
    )
  if not 0 <= pretrain_fraction < 1:
    raise ValueError(f"pretrain_fraction={pretrain_fraction}; expected 0 <= it < 1")


def rare_count(num_nonrare: int, pool_fraction: float, num_categories: int) -> int:
  """Images per rare category so that each is `pool_fraction` of the pool within one image."""
  return int(round(pool_fraction * num_nonrare / (1 - num_categories * pool_fraction)))


def _labels_array(labels: Any, name: str, num_classes: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
    raise ValueError(f"{name} has shape {labels.shape} ({labels.dtype}); expected int [N]")
  labels = labels.astype(np.int64)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
      f"{name} holds labels in [{labels.min()}, {labels.max()}]; expected class ids in "
      f"[0, {num_classes}) (unlabeled splits cannot make a task)"
    )
  return labels


def _rare_keep_count(
  labels: np.ndarray,
  categories: tuple[int, ...],
  pool_fraction: float,
  *,
  what: str,
  minimum: int,
) -> int:
  """`rare_count` of `labels`: the images each rare category keeps, checked to be available."""
  is_rare = np.isin(labels, categories)
  count = rare_count(int((~is_rare).sum()), pool_fraction, len(categories))
  if count < minimum:
    raise ValueError(
      f"pool_fraction={pool_fraction} leaves {count} positives per category in the {what} "
      f"({int((~is_rare).sum())} non-rare images); expected at least {minimum}: raise "
      "pool_fraction or use more images"
    )
  for category in categories:
    available = int((labels == category).sum())
    if available < count:
      raise ValueError(
        f"pool_fraction={pool_fraction} needs {count} images of category {category} in the "
        f"{what} but only {available} are available; expected a smaller pool_fraction "
        "(or a smaller pretrain_fraction)"
      )
  return count


def _subsample_rare(
  ids: np.ndarray,
  labels: np.ndarray,
  categories: tuple[int, ...],
  pool_fraction: float,
  rng: np.random.Generator,
  *,
  what: str,
  minimum: int,
) -> np.ndarray:
  """Keeps all non-rare ids and `rare_count` ids of each rare category (sorted)."""
  count = _rare_keep_count(labels, categories, pool_fraction, what=what, minimum=minimum)
  kept = [ids[~np.isin(labels, categories)]]
  for category in categories:
    kept.append(rng.choice(ids[labels == category], size=count, replace=False))
  return np.sort(np.concatenate(kept))


def rare_weights(
  labels: np.ndarray,
  categories: tuple[int, ...],
  pool_fraction: float,
  *,
  what: str,
  minimum: int,
) -> np.ndarray:
  """float64 `[N]`: `k / n_r` for an image of rare category r, 1 for the others.

  `k` is what `_subsample_rare` keeps per category and `n_r` the images of r in `labels`, so
  the weighted set equals the subsampled one in expectation (each rare image is kept with
  probability `k / n_r` there); each category's weights sum to `k` (up to rounding).
  """
  count = _rare_keep_count(labels, categories, pool_fraction, what=what, minimum=minimum)
  weights = np.ones(len(labels), np.float64)
  for category in categories:
    members = labels == category
    weights[members] = count / int(members.sum())
  return weights


def make_task(
  labels_train: Sequence[int] | np.ndarray,
  labels_eval: Sequence[int] | np.ndarray,
  *,
  dataset: str,
  categories: Sequence[int],
  seed: int,
  pool_fraction: float = 0.002,
  num_seed_positives: int = 5,
  pretrain_fraction: float = 0.5,
  class_names: Sequence[str] | None = None,
  num_classes: int | None = None,
  train_split: str = "train",
  eval_split: str = "test",
  data_dir: str | None = None,
  validation: str = "subsample",
) -> RareTask:
  """Builds a `RareTask` from the labels of a dataset's train and eval splits.

  Args:
    labels_train: class id of every train-split image, int [N].
    labels_eval: class id of every eval-split image, int [M].
    dataset: the TFDS name (recorded in the task).
    categories: the rare category ids.
    seed: all random choices derive from it.
    pool_fraction: each rare category's fraction of the pool and of validation.
    num_seed_positives: seed positives per category, drawn from the pool's positives.
    pretrain_fraction: share of the train images cut off as the related domain (of which only
      the non-rare classes are kept); the rest is the pool part.
    class_names: one per class (default: the ids as strings).
    num_classes: default `len(class_names)`, else `max(label) + 1`.
    train_split: recorded: the split `labels_train` describes.
    eval_split: recorded: the split `labels_eval` describes.
    data_dir: recorded on the task object (not saved).
    validation: how the validation set gets the pool's imbalance: "subsample" (each rare
      category of the eval split subsampled to the pool's fraction) or "weighted" (every eval
      image, rare ones weighted `k / n_r`: `val_weights`). Nothing else depends on it.

  Returns:
    The task; the same arguments give the identical task.

  Raises:
    ValueError: bad categories, fractions, seed positive count, labels or validation.
  """
  if num_classes is None:
    if class_names is not None:
      num_classes = len(class_names)
    else:
      both = np.concatenate([np.ravel(labels_train), np.ravel(labels_eval)]).astype(np.int64)
      num_classes = int(both.max()) + 1 if both.size else 0
  if class_names is None:
    class_names = [str(c) for c in range(num_classes)]
  if len(class_names) != num_classes:
    raise ValueError(f"{len(class_names)} class_names for num_classes={num_classes}")
  labels_train = _labels_array(labels_train, "labels_train", num_classes)
  labels_eval = _labels_array(labels_eval, "labels_eval", num_classes)
  categories = tuple(categories)
  if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in categories):
    raise ValueError(f"categories={list(categories)}; expected int class ids")
  categories = tuple(int(c) for c in categories)
  _check_categories(categories, num_classes)
  _check_fractions(pool_fraction, pretrain_fraction, len(categories))
  if int(num_seed_positives) != num_seed_positives or num_seed_positives < 1:
    raise ValueError(f"num_seed_positives={num_seed_positives}; expected a positive int")
  if validation not in VALIDATION_MODES:
    raise ValueError(f"validation={validation!r}; expected one of {VALIDATION_MODES}")

  # Related domain vs pool part of the train split.
  order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(len(labels_train))
  num_pretrain = int(round(pretrain_fraction * len(labels_train)))
  pretrain_part, pool_part = np.sort(order[:num_pretrain]), order[num_pretrain:]
  pretrain_ids = pretrain_part[~np.isin(labels_train[pretrain_part], categories)]

  pool_rng = np.random.default_rng([seed, _POOL_STREAM])
  pool_ids = _subsample_rare(
    np.sort(pool_part),
    labels_train[np.sort(pool_part)],
    categories,
    pool_fraction,
    pool_rng,
    what="pool",
    minimum=MIN_POOL_POSITIVES,
  )
  # A seeded order: no strategy can exploit the dataset's order (some are sorted by class).
  pool_ids = pool_ids[pool_rng.permutation(len(pool_ids))]
  pool_labels = labels_train[pool_ids]

  seed_rng = np.random.default_rng([seed, _SEED_STREAM])
  seed_positives = []
  for category in categories:
    positives = np.flatnonzero(pool_labels == category)
    if num_seed_positives >= len(positives):
      raise ValueError(
        f"num_seed_positives={num_seed_positives} but category {category} has only "
        f"{len(positives)} positives in the pool; expected fewer seeds than positives (at "
        "least one left to find): lower num_seed_positives or raise pool_fraction"
      )
    seed_positives.append(np.sort(seed_rng.choice(positives, num_seed_positives, replace=False)))

  val_weights = None
  if validation == "subsample":
    val_ids = _subsample_rare(
      np.arange(len(labels_eval)),
      labels_eval,
      categories,
      pool_fraction,
      np.random.default_rng([seed, _VAL_STREAM]),
      what="validation set",
      minimum=1,
    )
  else:
    val_ids = np.arange(len(labels_eval))
    val_weights = rare_weights(
      labels_eval, categories, pool_fraction, what="validation set", minimum=1
    )
  return RareTask(
    dataset=dataset,
    train_split=train_split,
    eval_split=eval_split,
    categories=categories,
    category_names=tuple(class_names[c] for c in categories),
    num_classes=num_classes,
    num_train_examples=len(labels_train),
    num_eval_examples=len(labels_eval),
    seed=int(seed),
    pool_fraction=float(pool_fraction),
    num_seed_positives=int(num_seed_positives),
    pretrain_fraction=float(pretrain_fraction),
    pool_ids=pool_ids,
    pool_labels=pool_labels,
    seed_positives=np.stack(seed_positives),
    val_ids=val_ids,
    val_labels=labels_eval[val_ids],
    pretrain_ids=pretrain_ids,
    pretrain_labels=labels_train[pretrain_ids],
    val_weights=val_weights,
    data_dir=data_dir,
  )


def task_from_dataset(
  name: str,
  categories: Sequence[int],
  seed: int,
  data_dir: str | None = None,
  *,
  train_split: str = "train",
  eval_split: str = "test",
  **kwargs,
) -> RareTask:
  """`make_task` on the labels of a prepared TFDS dataset (see `sources.open_source`).

  `kwargs` go to `make_task` (`pool_fraction`, `validation`, ...).
  """
  train = sources.open_source(name, train_split, data_dir)
  evaluation = sources.open_source(name, eval_split, data_dir)
  return make_task(
    train.labels(),
    evaluation.labels(),
    dataset=name,
    categories=categories,
    seed=seed,
    class_names=train.class_names,
    train_split=train_split,
    eval_split=eval_split,
    data_dir=data_dir,
    **kwargs,
  )
