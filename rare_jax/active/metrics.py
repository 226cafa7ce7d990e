"""Evaluation metrics, the per-run metrics.jsonl log, and the F1-vs-labels plot (host-side numpy).

Conventions for undefined values (the same as scikit-learn with `zero_division=0`):
- precision with no predicted positives is 0;
- recall with no positives in the ground truth is 0;
- F1 = 2 tp / (2 tp + fp + fn), and 0 when that denominator is 0 (nothing predicted, nothing
  true);
- average precision with no positives in the ground truth is 0 (scikit-learn warns and returns
  0 too). A rare-category task always has validation positives, so this only shows up in tests.
Sample weights (a weighted validation set, `RareTask.val_weights`) replace every count by a
sum of weights: TP, FP and FN at the threshold, and AP as
`sklearn.metrics.average_precision_score(..., sample_weight=w)` (integer weights equal
duplicating rows). Without weights (None) the results are those of the unweighted code, bit for
bit.
Pseudo-label error rates over an empty set are NaN (there is nothing to be wrong about); the
metrics log stores NaN and infinities as JSON null.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# ----------------------------------------------------------------------------------------------
# Classification metrics.


def _sample_weights(sample_weight, shape: tuple[int, ...]) -> np.ndarray:
  """float64 weights of `shape`; ValueError unless finite and >= 0."""
  weights = np.asarray(sample_weight)
  if weights.shape != shape:
    raise ValueError(f"sample_weight of shape {weights.shape}; expected {shape} like the scores")
  real = np.issubdtype(weights.dtype, np.integer) or np.issubdtype(weights.dtype, np.floating)
  if not real:  # bool and complex are not real numbers here
    raise ValueError(f"sample_weight of dtype {weights.dtype}; expected real numbers")
  weights = weights.astype(np.float64)
  if not np.isfinite(weights).all():
    raise ValueError(
      f"sample_weight holds {int((~np.isfinite(weights)).sum())} non-finite values; expected "
      "finite weights"
    )
  if (weights < 0).any():
    raise ValueError(f"sample_weight holds {weights[weights < 0][0]}; expected weights >= 0")
  return weights


def average_precision(
  scores: np.ndarray, labels: np.ndarray, sample_weight: np.ndarray | None = None
) -> float:
  """Area under the precision-recall step curve: `sklearn.metrics.average_precision_score`.

  Ties in `scores` form one threshold (as in scikit-learn): AP = sum over distinct thresholds,
  from high to low, of (recall gained) * (precision at that threshold). 0 without positives
  (or when the positives weigh 0). `sample_weight` (`[V]`, >= 0) weighs each image, as
  scikit-learn's `sample_weight`.
  """
  scores = np.asarray(scores)
  labels = np.asarray(labels, bool)
  if sample_weight is None:
    positive_mass, mass = labels, np.ones(labels.shape, np.int64)
  else:
    mass = _sample_weights(sample_weight, scores.shape)
    positive_mass = np.where(labels, mass, 0.0)
  num_positives = positive_mass.sum()
  if num_positives == 0:
    return 0.0
  order = np.argsort(scores, kind="mergesort")[::-1]
  sorted_scores = scores[order]
  # The last index of each group of equal scores: where the threshold takes effect.
  last_of_group = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
  true_positives = np.cumsum(positive_mass[order])[last_of_group]
  predicted = np.cumsum(mass[order])[last_of_group]
  # A threshold where everything so far weighs 0 gains no recall: its precision is moot.
  precision = true_positives / np.where(predicted > 0, predicted, 1)
  recall_gain = np.diff(np.r_[0, true_positives]) / num_positives
  return float(np.sum(recall_gain * precision))


def binary_metrics(
  scores: np.ndarray,
  labels: np.ndarray,
  threshold: float = 0.5,
  sample_weight: np.ndarray | None = None,
) -> dict[str, float | int]:
  """Metrics of the positive class for one category.

  Args:
    scores: `[V]` positive-class probabilities (or any scores; ties matter only for AP).
    labels: `[V]` ground truth, True = positive.
    threshold: predict positive where `scores >= threshold`.
    sample_weight: `[V]` weights >= 0 of the images, or None (all 1).

  Returns:
    `f1`, `precision`, `recall`, `average_precision` (floats; 0/0 cases as in the module
    docstring), `num_positives` (true), `num_predicted` (predicted positive). With
    `sample_weight`, `num_positives` and `num_predicted` are the weights' sums (floats: the
    counts the metrics are computed from, e.g. at the pool's prevalence) and
    `num_positive_images`, `num_predicted_images` the unweighted counts (ints).
  """
  scores = np.asarray(scores)
  labels = np.asarray(labels)
  if scores.ndim != 1 or labels.shape != scores.shape:
    raise ValueError(
      f"scores of shape {scores.shape} and labels of shape {labels.shape}; expected both [V]"
    )
  if labels.dtype != bool:
    if not np.all((labels == 0) | (labels == 1)):
      raise ValueError(f"labels of dtype {labels.dtype} with values other than 0/1; expected bool")
    labels = labels.astype(bool)
  if np.isnan(scores).any():
    raise ValueError(f"scores hold {int(np.isnan(scores).sum())} NaN values; expected none")
  predicted = scores >= threshold
  if sample_weight is not None:
    return _weighted_binary_metrics(scores, labels, predicted, sample_weight)
  true_positives = int(np.sum(predicted & labels))
  num_predicted = int(predicted.sum())
  num_positives = int(labels.sum())
  false_positives = num_predicted - true_positives
  false_negatives = num_positives - true_positives
  f1_denominator = 2 * true_positives + false_positives + false_negatives
  return {
    "f1": 2 * true_positives / f1_denominator if f1_denominator else 0.0,
    "precision": true_positives / num_predicted if num_predicted else 0.0,
    "recall": true_positives / num_positives if num_positives else 0.0,
    "average_precision": average_precision(scores, labels),
    "num_positives": num_positives,
    "num_predicted": num_predicted,
  }


def _weighted_binary_metrics(scores, labels, predicted, sample_weight) -> dict[str, float | int]:
  weights = _sample_weights(sample_weight, scores.shape)
  # Each sum over its own images (not differences of sums): no negative rounding residue.
  true_positives = float(weights[predicted & labels].sum())
  false_positives = float(weights[predicted & ~labels].sum())
  false_negatives = float(weights[~predicted & labels].sum())
  num_predicted = float(weights[predicted].sum())
  num_positives = float(weights[labels].sum())
  f1_denominator = 2 * true_positives + false_positives + false_negatives
  return {
    "f1": 2 * true_positives / f1_denominator if f1_denominator else 0.0,
    "precision": true_positives / num_predicted if num_predicted else 0.0,
    "recall": true_positives / num_positives if num_positives else 0.0,
    "average_precision": average_precision(scores, labels, weights),
    "num_positives": num_positives,
    "num_predicted": num_predicted,
    "num_positive_images": int(labels.sum()),
    "num_predicted_images": int(predicted.sum()),
  }


_PER_CATEGORY = ("f1", "precision", "recall", "average_precision", "num_positives", "num_predicted")
_MEANS = {
  "f1": "mean_f1",
  "precision": "mean_precision",
  "recall": "mean_recall",
  "average_precision": "mean_ap",
}


def category_metrics(
  probs: np.ndarray,
  ground_truth: np.ndarray,
  threshold: float = 0.5,
  sample_weight: np.ndarray | None = None,
) -> dict[str, Any]:
  """`binary_metrics` of each category and their means.

  Args:
    probs: `[C, V]` positive-class probabilities on the validation set.
    ground_truth: `[C, V]` bool.
    threshold: as in `binary_metrics`.
    sample_weight: `[V]` weights of the validation images (the same for every category:
      `RareTask.val_weights`), or None (all 1).

  Returns:
    Per-category lists under `f1`, `precision`, `recall`, `average_precision`,
    `num_positives`, `num_predicted` (with weights also `num_positive_images`,
    `num_predicted_images`: see `binary_metrics`), and `mean_f1`, `mean_precision`,
    `mean_recall`, `mean_ap` (plain Python numbers: ready for JSON).
  """
  probs = np.asarray(probs)
  ground_truth = np.asarray(ground_truth)
  if probs.ndim != 2 or ground_truth.shape != probs.shape:
    raise ValueError(
      f"probs of shape {probs.shape} and ground_truth of shape {ground_truth.shape}; expected "
      "both [C, V]"
    )
  keys = _PER_CATEGORY
  if sample_weight is not None:
    sample_weight = _sample_weights(sample_weight, probs.shape[1:])
    keys += ("num_positive_images", "num_predicted_images")
  per_category = [
    binary_metrics(p, g, threshold, sample_weight) for p, g in zip(probs, ground_truth, strict=True)
  ]
  out: dict[str, Any] = {key: [m[key] for m in per_category] for key in keys}
  for key, mean_key in _MEANS.items():
    out[mean_key] = float(np.mean(out[key])) if per_category else float("nan")
  return out


def pseudo_label_error_rates(
  pseudo_positive_mask: np.ndarray, pseudo_negative_mask: np.ndarray, ground_truth: np.ndarray
) -> dict[str, Any]:
  """How wrong the pseudo-labels are (the paper's Figure 4), per category.

  Args:
    pseudo_positive_mask: `[C, P]` (or `[P]`) bool, images pseudo-labeled positive.
    pseudo_negative_mask: same shape, images pseudo-labeled negative.
    ground_truth: same shape, bool.

  Returns:
    Per-category lists: `pseudo_positive_fpr` (fraction of pseudo-positives that are truly
    negative), `pseudo_negative_fnr` (fraction of pseudo-negatives that are truly positive),
    both NaN for an empty set; `num_pseudo_positives`, `num_pseudo_negatives`; and their means
    over the categories where defined, `mean_pseudo_positive_fpr`, `mean_pseudo_negative_fnr`
    (NaN if defined nowhere).
  """
  positive = np.asarray(pseudo_positive_mask, bool)
  negative = np.asarray(pseudo_negative_mask, bool)
  truth = np.asarray(ground_truth)
  if not (positive.shape == negative.shape == truth.shape) or positive.ndim not in (1, 2):
    raise ValueError(
      f"masks of shapes {positive.shape}, {negative.shape} and ground_truth {truth.shape}; "
      "expected one shape, [C, P] or [P]"
    )
  truth = truth.astype(bool)
  if positive.ndim == 1:
    positive, negative, truth = positive[None], negative[None], truth[None]
  num_positive = positive.sum(axis=1)
  num_negative = negative.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    fpr = np.where(num_positive > 0, (positive & ~truth).sum(axis=1) / num_positive, np.nan)
    fnr = np.where(num_negative > 0, (negative & truth).sum(axis=1) / num_negative, np.nan)

  def mean_where_defined(values):
    return float(np.mean(values[~np.isnan(values)])) if (~np.isnan(values)).any() else math.nan

  return {
    "pseudo_positive_fpr": fpr.tolist(),
    "pseudo_negative_fnr": fnr.tolist(),
    "num_pseudo_positives": num_positive.tolist(),
    "num_pseudo_negatives": num_negative.tolist(),
    "mean_pseudo_positive_fpr": mean_where_defined(fpr),
    "mean_pseudo_negative_fnr": mean_where_defined(fnr),
  }


# ----------------------------------------------------------------------------------------------
# Intervals for comparisons between strategies.


def t_interval(values, confidence: float = 0.95) -> dict[str, Any]:
  """`{mean, low, high, n}`: a Student-t interval for the mean of `values` (NaN bounds for one
  value; NaN everywhere for none). The one interval every comparison report uses."""
  from scipy import stats

  values = np.asarray(values, float).ravel()
  n = int(values.size)
  mean = float(values.mean()) if n else math.nan
  if n > 1:
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * values.std(ddof=1) / math.sqrt(n))
  else:
    half = math.nan
  return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def signed(value: float) -> str:
  """A difference as the comparison tables print it: 3 decimals with its sign, and no sign on
  zero. A negated zero difference (B - A of identical runs) and a float residue such as -2e-17
  print +0.000; a real small difference (-0.00005) keeps its sign and prints -0.000."""
  return f"{0.0 if abs(value) < 1e-12 else value:+.3f}"


def interval_text(t: Mapping[str, Any]) -> str:
  """A `t_interval` as the comparison reports write it: `+0.014 [-0.006, +0.034] (n = 25)`,
  or `+0.014 (n = 1, no interval)`."""
  if t["n"] < 2:
    return f"{signed(t['mean'])} (n = {t['n']}, no interval)"
  return f"{signed(t['mean'])} [{signed(t['low'])}, {signed(t['high'])}] (n = {t['n']})"


# ----------------------------------------------------------------------------------------------
# metrics.jsonl: one JSON object per line, durable, readable after a crash.


def _jsonable(value: Any) -> Any:
  """Plain JSON values: numpy/jax scalars and arrays to Python, NaN/inf to None."""
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (str, bool)) or value is None:
    return value
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if hasattr(value, "tolist"):  # numpy and jax arrays and scalars
    return _jsonable(value.tolist())
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, int):
    return value
  raise ValueError(f"metrics value {value!r} of type {type(value).__name__}; expected JSON data")


def _fsync_directory(path: str) -> None:
  try:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def drop_torn_tail(path: str) -> None:
  """Cuts a last line that a killed writer left without its newline."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if size == 0:
      return
    f.seek(size - 1)
    if f.read(1) == b"\n":
      return
    # Walk back to the last newline (the torn line is short: one record).
    position, block = size, 1 << 16
    while position > 0:
      start = max(0, position - block)
      f.seek(start)
      chunk = f.read(position - start)
      newline = chunk.rfind(b"\n")
      if newline >= 0:
        f.truncate(start + newline + 1)
        break
      position = start
    else:
      f.truncate(0)
    f.flush()
    os.fsync(f.fileno())


class MetricsWriter:
  """Appends records to a metrics.jsonl file, one JSON object per line, flushed and fsynced.

  Opening repairs a file whose last line was torn by a killed writer (it is dropped), so the
  next record starts on its own line. Use as a context manager or call `close()`. A path of
  None writes nothing (the processes other than 0 of a multi-host run).
  """

  def __init__(self, path: str | os.PathLike | None):
    self._file = None
    if path is None:
      self.path = None
      return
    self.path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(self.path))
    os.makedirs(parent, exist_ok=True)
    drop_torn_tail(self.path)
    self._file = open(self.path, "a", encoding="utf-8")

  def write(self, record: Mapping[str, Any]) -> None:
    """Appends one record (a mapping of JSON-able values; NaN/inf become null)."""
    if not isinstance(record, Mapping):
      raise ValueError(f"record of type {type(record).__name__}; expected a dict")
    line = json.dumps(_jsonable(record), allow_nan=False, sort_keys=True)
    if self._file is None:
      return
    self._file.write(line + "\n")
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self) -> None:
    if self._file is not None:
      self._file.close()

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file ([] if it does not exist).

  A last line that does not parse (a writer killed mid-line) is skipped; a bad line anywhere
  else raises ValueError, since that is damage, not a crash.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = f.read().split("\n")
  records = []
  last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
  for number, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      if number == last:
        break
      raise ValueError(
        f"{path} line {number + 1} is not JSON ({error}); expected one object"
      ) from None
    if not isinstance(record, dict):
      raise ValueError(f"{path} line {number + 1} holds {type(record).__name__}; expected object")
    records.append(record)
  return records


def rewrite_up_to(path: str | os.PathLike, last_round: int, *, key: str = "round") -> int:
  """Keeps only records with `record[key] <= last_round` (for a run resumed from that round).

  The file is replaced atomically (write a temporary, fsync, rename), so a crash leaves either
  the old or the new file. A torn last line is dropped too. Call it before opening a
  `MetricsWriter` on the file (a writer already open keeps appending to the replaced file).

  Returns:
    The number of records kept (0 if the file does not exist; nothing is created then).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    return 0
  records = read_metrics(path)
  for record in records:
    if not isinstance(record.get(key), int):
      raise ValueError(f"record {record!r} in {path} lacks an int {key!r}; expected every record")
  kept = [record for record in records if record[key] <= last_round]
  temporary = path + ".tmp"
  with open(temporary, "w", encoding="utf-8") as f:
    for record in kept:
      f.write(json.dumps(record, allow_nan=False, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, path)
  _fsync_directory(path)
  return len(kept)


# ----------------------------------------------------------------------------------------------
# The F1-vs-labels plot.

_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")


def plot_f1_vs_labels(
  records_by_strategy: Mapping[str, Sequence[Mapping[str, Any]]],
  out_png: str | os.PathLike,
  *,
  category_names: Sequence[str] | None = None,
  title: str | None = None,
) -> str:
  """Plots F1 against labels per category: thin lines per category, a thick mean per strategy.

  Args:
    records_by_strategy: strategy name -> metrics records, each with `labels_per_category`
      (int), `f1` (list over categories) and `mean_f1`.
    out_png: the PNG to write (replaced atomically).
    category_names: names for the per-category lines (legend), in the records' order.
    title: the figure title.

  Returns:
    The path written.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global state
  from matplotlib.figure import Figure

  if not records_by_strategy:
    raise ValueError("records_by_strategy is empty; expected at least one strategy")
  figure = Figure(figsize=(8, 5), dpi=100)
  FigureCanvasAgg(figure)
  axes = figure.add_subplot(1, 1, 1)
  colors = [f"C{i % 10}" for i in range(len(records_by_strategy))]
  num_categories = 0
  for color, (strategy, records) in zip(colors, records_by_strategy.items(), strict=True):
    for record in records:
      for key in ("labels_per_category", "f1", "mean_f1"):
        if key not in record:
          raise ValueError(f"a {strategy!r} record lacks {key!r}: {dict(record)!r}")
    records = sorted(records, key=lambda r: r["labels_per_category"])
    labels = [r["labels_per_category"] for r in records]
    per_category = np.array(
      [[np.nan if v is None else v for v in r["f1"]] for r in records], dtype=float
    )
    if per_category.size:
      num_categories = max(num_categories, per_category.shape[1])
      for c in range(per_category.shape[1]):
        axes.plot(
          labels,
          per_category[:, c],
          color=color,
          linewidth=0.8,
          alpha=0.45,
          linestyle=_LINESTYLES[c % len(_LINESTYLES)],
          marker=_MARKERS[c % len(_MARKERS)],
          markersize=3,
        )
    means = [np.nan if r["mean_f1"] is None else r["mean_f1"] for r in records]
    axes.plot(labels, means, color=color, linewidth=2.5, marker="o", label=f"{strategy} (mean)")
  strategy_legend = axes.legend(loc="lower right", fontsize=8)
  if category_names is not None:
    if len(category_names) != num_categories:
      raise ValueError(
        f"{len(category_names)} category_names; expected {num_categories}, one per category"
      )
    handles = [
      axes.plot(
        [],
        [],
        color="gray",
        linewidth=0.8,
        linestyle=_LINESTYLES[c % len(_LINESTYLES)],
        marker=_MARKERS[c % len(_MARKERS)],
        markersize=3,
      )[0]
      for c in range(num_categories)
    ]
    axes.add_artist(strategy_legend)
    axes.legend(handles, list(category_names), loc="upper left", fontsize=7, title="category")
  axes.set_xlabel("labels per category")
  axes.set_ylabel("F1 (positive class, p >= 0.5)")
  axes.set_ylim(-0.02, 1.02)
  axes.grid(alpha=0.3)
  if title:
    axes.set_title(title)
  out_png = os.fspath(out_png)
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  temporary = out_png + ".tmp.png"
  figure.savefig(temporary, format="png")
  os.replace(temporary, out_png)
  return out_png
