"""What sets the paper's baselines apart from the one loop: pseudo-positives and full supervision.

`runner.STRATEGIES` is the table; this module supplies the two pieces that are not settings of
`LoopConfig` or `DeepSettings`:

- `pseudo_labeler(spec, config)`: for KD-Semi and DeepProp, a callable the `DeepUpdater` asks,
  before each deep update, for pseudo-labels to train on besides L_p and L_n:
  - KD-Semi: unlabeled pool images whose previous deep model's main-head probability is >= the
    threshold become pseudo-positives (none at the first update: M_0 = M_pre has no main
    head); the pseudo-negatives are ours (W_n).
  - DeepProp: label propagation (Iscen et al. 2019, `rare_jax.deep.pseudo_labels`) from the human
    labels over a kNN graph of the current features (those the loop ranks with); propagated
    positives become pseudo-positives weighted by their certainty omega, and W_n's images
    (ours) that propagation calls negative weigh omega too (1 where propagation did not reach);
    every pseudo-label's weight is also multiplied by its class's balance weight zeta (inverse
    class population, Iscen et al.), so the few positives are not outweighed by W_n.
  Both can cap the pseudo-positives per category (`config.max_pseudo_positives`, the most
  confident first; 0 = no cap) to bound the deep update's training set on a small machine.
- `run_fully_supervised`: the upper line, one deep model trained from M_pre on every pool label
  for `config.fully_supervised_epochs` epochs (paper: 50) and evaluated on validation.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable

import jax
import numpy as np

from rare_jax.active import linear, metrics
from rare_jax.deep import pseudo_labels
from rare_jax.infra import sharding


@dataclasses.dataclass(frozen=True)
class PseudoLabels:
  """Pseudo-labels of one deep update, `[C, P]` each.

  Attributes:
    positive: bool, pseudo-positives (unlabeled images only).
    negative: bool, pseudo-negatives (unlabeled images only, disjoint from `positive`).
    weights: float BCE weights of the pseudo-labels, or None (all 1).
  """

  positive: np.ndarray
  negative: np.ndarray
  weights: np.ndarray | None = None


def cap_per_category(mask: np.ndarray, scores: np.ndarray, cap: int) -> np.ndarray:
  """Keeps, per category (row), the `cap` entries of `mask` with the highest `scores`.

  Ties go to the lower position. cap 0 keeps everything.
  """
  mask = np.asarray(mask, bool)
  if cap < 0:
    raise ValueError(f"cap must be >= 0, got {cap!r}")
  if cap == 0:
    return mask
  kept = np.zeros_like(mask)
  for row, (members, row_scores) in enumerate(zip(mask, np.asarray(scores), strict=True)):
    candidates = np.flatnonzero(members)
    if len(candidates) > cap:
      order = np.argsort(-row_scores[candidates], kind="stable")[:cap]
      candidates = candidates[order]
    kept[row, candidates] = True
  return kept


def kd_semi_labels(
  labels: np.ndarray,
  pseudo_negative: np.ndarray,
  probabilities: np.ndarray | None,
  *,
  threshold: float,
  cap: int = 0,
) -> PseudoLabels:
  """KD-Semi's pseudo-labels: confident main-head predictions on top of W_n.

  Args:
    labels: `[C, P]` human labels (1, 0, -1 unknown).
    pseudo_negative: `[C, P]` W_n.
    probabilities: `[C, P]` main-head probabilities of the previous deep model, or None
      (no previous deep model: no pseudo-positives).
    threshold: pseudo-positive where probability >= threshold.
    cap: at most this many pseudo-positives per category, most confident first (0: all).
  """
  labels = np.asarray(labels)
  unlabeled = labels < 0
  if probabilities is None:
    positive = np.zeros_like(unlabeled)
  else:
    positive = np.asarray(
      pseudo_labels.kd_semi_pseudo_positives(probabilities, unlabeled, threshold=threshold)
    )
    positive = cap_per_category(positive, probabilities, cap)
  negative = np.asarray(pseudo_negative, bool) & unlabeled & ~positive
  return PseudoLabels(positive=positive, negative=negative)


@functools.partial(jax.jit, static_argnames=("k", "alpha", "iterations"))
def _propagate(features, labels, *, k, alpha, iterations):
  neighbors, weights = pseudo_labels.knn_graph(features, k=k)
  scores = pseudo_labels.propagate(neighbors, weights, labels, alpha=alpha, iterations=iterations)
  positive, negative, omega = pseudo_labels.deep_prop_pseudo_labels(scores, labels < 0)
  positive_share = scores[..., 1] / jax.numpy.maximum(scores.sum(-1), 1e-30)
  return positive, negative, omega, positive_share


def deep_prop_labels(
  features,
  labels: np.ndarray,
  pseudo_negative: np.ndarray,
  *,
  k: int = 50,
  alpha: float = 0.99,
  iterations: int = 20,
  cap: int = 0,
) -> PseudoLabels:
  """DeepProp's pseudo-labels: label propagation from the human labels over a kNN graph.

  Each pseudo-label weighs omega * zeta_j (Iscen et al. 2019, their weighted loss): omega its
  certainty (`pseudo_labels.deep_prop_pseudo_labels`; 1 for an image of W_n that propagation
  did not reach), zeta_j the class-balance weight of its class j
  (`pseudo_labels.class_balance_weights`), the class populations counted over the training set:
  human labels, the pseudo-positives kept (after `cap`) and W_n. Iscen et al. also weigh the
  human labels by zeta; here they weigh 1 (`deep.training_set`).

  Args:
    features: `[P, D]` current pool features.
    labels: `[C, P]` human labels (the propagation's seeds).
    pseudo_negative: `[C, P]` W_n (ours); those propagated positive become pseudo-positives.
    k, alpha, iterations: the graph's neighbours, the propagation's alpha and CG steps.
    cap: at most this many pseudo-positives per category, most confident first (0: all).
  """
  labels = np.asarray(labels)
  k = min(int(k), int(features.shape[0]) - 1)
  positive, negative, omega, share = jax.device_get(
    _propagate(
      features, jax.numpy.asarray(labels, jax.numpy.int8), k=k, alpha=alpha, iterations=iterations
    )
  )
  positive = cap_per_category(np.asarray(positive), np.asarray(omega) * np.asarray(share), cap)
  unlabeled = labels < 0
  pseudo_negative = np.asarray(pseudo_negative, bool) & unlabeled & ~positive
  certainty = np.where(
    positive, omega, np.where(pseudo_negative & np.asarray(negative), omega, 1.0)
  )
  # Iscen et al.'s loss weighs each pseudo-label by omega * zeta of its class, zeta counted
  # over the training set (human labels, the pseudo-positives kept and W_n).
  balance = np.asarray(pseudo_labels.class_balance_weights(labels, positive, pseudo_negative))
  weights = certainty * np.where(positive, balance[:, 1:], balance[:, :1])
  return PseudoLabels(
    positive=positive, negative=pseudo_negative, weights=weights.astype(np.float32)
  )


def pseudo_labeler(spec: dict, config) -> Callable | None:
  """The `DeepUpdater.pseudo_labeler` of a strategy spec (None: train on L_p, L_n, W_n)."""
  kind = spec.get("pseudo_positives")
  cap = int(config.get("max_pseudo_positives", 0))
  if kind is None:
    return None
  if kind == "kd_semi":
    threshold = float(spec["threshold"])

    def kd_semi(updater, state, version):
      probabilities = None
      if version > 1:
        probabilities = np.asarray(updater.pool_store(version - 1)["main_probs"]).T
      return kd_semi_labels(
        jax.device_get(state.labels),
        jax.device_get(state.pseudo_negative),
        probabilities,
        threshold=threshold,
        cap=cap,
      )

    return kd_semi
  if kind == "deep_prop":
    options = dict(
      k=int(config.get("deep_prop_k", 50)),
      alpha=float(config.get("deep_prop_alpha", 0.99)),
      iterations=int(config.get("deep_prop_iterations", 20)),
      cap=cap,
    )

    def deep_prop(updater, state, version):
      features, _ = updater.features(version - 1)
      return deep_prop_labels(
        features, jax.device_get(state.labels), jax.device_get(state.pseudo_negative), **options
      )

    return deep_prop
  raise ValueError(f"pseudo_positives must be None, 'kd_semi' or 'deep_prop', got {kind!r}")


def pool_outputs(spec: dict) -> tuple[str, ...]:
  """What a strategy's re-embedding keeps per pool image (KD-Semi reads the main head)."""
  if spec.get("pseudo_positives") == "kd_semi":
    return ("embedding", "main_probs")
  return ("embedding",)


@dataclasses.dataclass(frozen=True)
class _AllLabels:
  """A LoopState stand-in holding every ground-truth pool label and no pseudo-negatives."""

  labels: np.ndarray
  pseudo_negative: np.ndarray


def fully_supervised_linear_metrics(
  features, val_features, truth, val_truth, config, val_weights=None
) -> dict:
  """Validation metrics of logistic regressions fitted on every pool label (`[C, P]` truth).

  `val_weights`: `[V]` weights of the validation images (None: all 1).
  """
  truth = np.asarray(truth)
  num_categories, pool_size = truth.shape
  model = jax.jit(
    functools.partial(
      linear.fit_logistic_batched,
      l2=float(config.l2),
      max_iters=int(config.solver_max_iters),
      tol=float(config.solver_tol),
    )
  )(
    jax.numpy.broadcast_to(features, (num_categories, *features.shape)),
    jax.numpy.asarray(truth, jax.numpy.float32),
    jax.numpy.ones((num_categories, pool_size), jax.numpy.float32),
  )
  probabilities = np.asarray(jax.device_get(linear.predict_proba(val_features, model))).T
  return metrics.category_metrics(probabilities, np.asarray(val_truth), sample_weight=val_weights)


def fully_supervised_epochs(config) -> int:
  return int(config.get("fully_supervised_epochs", 50))


def run_fully_supervised(*, run_dir: str, context, log: Callable[[str], None] = print) -> list:
  """The fully supervised upper line: trains once on every pool label, evaluates, records.

  Writes `run_dir/metrics.jsonl` with one record (`labels_per_category` = the pool size): the
  deep main head's validation metrics under "deep", and at the top level those of logistic
  regressions fitted on every pool label on the re-embedded features (as the loop's records).
  Resumes an interrupted run (training from its epoch checkpoints, embedding from its
  stores); a finished one returns its record without work.

  Args:
    run_dir: the strategy's directory.
    context: the workdir's `RunContext` (its config.features must be "m_pre").
    log: receives progress lines.
  """
  metrics_path = os.path.join(run_dir, "metrics.jsonl")
  records = metrics.read_metrics(metrics_path)
  if records:
    log(f"[fully_supervised] finished: mean F1 {records[-1]['mean_f1']:.3f}")
    return records
  start = time.perf_counter()
  updater = context.updater("fully_supervised", run_dir, log=log)
  truth = context.task.ground_truth()
  state = _AllLabels(labels=truth.astype(np.int8), pseudo_negative=np.zeros_like(truth))
  features, val_features, deep_metrics = updater.update(state, 1)
  record = {
    "round": 1,
    "labels_per_category": int(context.task.pool_size),
    "model": "linear",
    "epochs": updater.settings.epochs,
    "deep": deep_metrics,
    # Like the loop's records: top-level metrics are the linear models' (here fitted on every
    # pool label, on the fully supervised model's features), the deep head's under "deep".
    **fully_supervised_linear_metrics(
      features,
      val_features,
      truth,
      context.task.val_ground_truth(),
      context.config,
      context.task.val_weights,
    ),
    "seconds": round(time.perf_counter() - start, 3),
  }
  with metrics.MetricsWriter(metrics_path if sharding.is_primary() else None) as writer:
    writer.write(record)
  log(
    f"[fully_supervised] every pool label, {updater.settings.epochs} epochs: linear mean F1 "
    f"{record['mean_f1']:.3f} | deep head mean F1 {deep_metrics['mean_f1']:.3f} | "
    f"{record['seconds']:.0f}s"
  )
  return [record]
