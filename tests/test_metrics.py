"""Tests of rare_jax.active.metrics: hand-computed values, scikit-learn agreement, jsonl, plot."""

import json
import math
import os

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from rare_jax.active import metrics


def test_binary_metrics_hand_computed():
  scores = np.array([0.9, 0.8, 0.6, 0.5, 0.4, 0.2, 0.1])
  labels = np.array([1, 0, 1, 0, 1, 0, 0], bool)
  out = metrics.binary_metrics(scores, labels)
  # Predicted (>= 0.5): 0.9 (tp), 0.8 (fp), 0.6 (tp), 0.5 (fp). Missed: 0.4.
  assert out["num_predicted"] == 4 and out["num_positives"] == 3
  assert out["precision"] == pytest.approx(2 / 4)
  assert out["recall"] == pytest.approx(2 / 3)
  assert out["f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
  # AP: positives at ranks 1, 3, 5: (1/1 + 2/3 + 3/5) / 3.
  assert out["average_precision"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def test_average_precision_ties_hand_computed():
  # One threshold for the tied pair: precision 1/2 there, recall jumps from 0 to 1/2.
  scores = np.array([0.7, 0.7, 0.3, 0.2])
  labels = np.array([1, 0, 1, 0], bool)
  expected = 0.5 * (1 / 2) + 0.5 * (2 / 3)
  assert metrics.average_precision(scores, labels) == pytest.approx(expected)
  assert sk_metrics.average_precision_score(labels, scores) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(6))
def test_binary_metrics_match_sklearn(seed):
  rng = np.random.default_rng(seed)
  size = 200
  labels = rng.random(size) < 0.1
  # Coarse scores: many ties, also around the threshold.
  scores = np.round(np.clip(0.3 * labels + rng.random(size) * 0.7, 0, 1), 1 + seed % 3)
  threshold = [0.5, 0.3, 0.7][seed % 3]
  out = metrics.binary_metrics(scores, labels, threshold=threshold)
  predicted = scores >= threshold
  assert out["f1"] == pytest.approx(sk_metrics.f1_score(labels, predicted, zero_division=0))
  assert out["precision"] == pytest.approx(
    sk_metrics.precision_score(labels, predicted, zero_division=0)
  )
  assert out["recall"] == pytest.approx(sk_metrics.recall_score(labels, predicted, zero_division=0))
  assert out["average_precision"] == pytest.approx(
    sk_metrics.average_precision_score(labels, scores), abs=1e-12
  )


def test_binary_metrics_edge_cases():
  labels = np.array([1, 0, 1, 0], bool)
  nothing_predicted = metrics.binary_metrics(np.array([0.4, 0.1, 0.3, 0.2]), labels)
  assert nothing_predicted["num_predicted"] == 0
  assert nothing_predicted["precision"] == 0.0  # 0/0 -> 0
  assert nothing_predicted["recall"] == 0.0 and nothing_predicted["f1"] == 0.0
  assert nothing_predicted["average_precision"] == pytest.approx(1.0)  # ranking is perfect
  no_truth = metrics.binary_metrics(np.array([0.9, 0.2, 0.6, 0.4]), np.zeros(4, bool))
  assert no_truth["num_positives"] == 0
  assert no_truth["recall"] == 0.0 and no_truth["f1"] == 0.0 and no_truth["precision"] == 0.0
  assert no_truth["average_precision"] == 0.0  # undefined; 0 as sklearn
  neither = metrics.binary_metrics(np.array([0.1, 0.2]), np.zeros(2, bool))
  assert neither["f1"] == 0.0 and neither["precision"] == 0.0 and neither["recall"] == 0.0
  perfect = metrics.binary_metrics(np.array([0.9, 0.1, 0.8, 0.2]), labels)
  assert perfect["f1"] == 1.0 and perfect["average_precision"] == 1.0
  # 0/1 integer labels are accepted; anything else is not.
  assert metrics.binary_metrics(np.array([0.9, 0.1]), np.array([1, 0]))["f1"] == 1.0
  with pytest.raises(ValueError, match="labels of dtype"):
    metrics.binary_metrics(np.array([0.9, 0.1]), np.array([2, 0]))
  with pytest.raises(ValueError, match="expected both"):
    metrics.binary_metrics(np.array([0.9, 0.1]), np.array([True]))
  with pytest.raises(ValueError, match="NaN"):
    metrics.binary_metrics(np.array([np.nan, 0.1]), np.array([True, False]))


def test_category_metrics():
  rng = np.random.default_rng(0)
  truth = rng.random((3, 50)) < 0.2
  probs = np.clip(0.5 * truth + 0.6 * rng.random((3, 50)), 0, 1)
  out = metrics.category_metrics(probs, truth)
  for c in range(3):
    single = metrics.binary_metrics(probs[c], truth[c])
    for key, value in single.items():
      assert out[key][c] == value
  assert out["mean_f1"] == pytest.approx(np.mean(out["f1"]))
  assert out["mean_precision"] == pytest.approx(np.mean(out["precision"]))
  assert out["mean_recall"] == pytest.approx(np.mean(out["recall"]))
  assert out["mean_ap"] == pytest.approx(np.mean(out["average_precision"]))
  json.dumps(out, allow_nan=False)  # plain Python numbers
  with pytest.raises(ValueError, match=r"expected both \[C, V\]"):
    metrics.category_metrics(probs, truth[:2])


# Sample weights (a weighted validation set, RareTask.val_weights).


def _weighted_case(seed, size=300):
  rng = np.random.default_rng(seed)
  labels = rng.random(size) < 0.15
  # Coarse scores: ties, also at the threshold; some zero weights.
  scores = np.round(np.clip(0.3 * labels + rng.random(size) * 0.7, 0, 1), 1 + seed % 2)
  weights = np.where(labels, rng.choice([0.0, 0.014, 0.5, 2.0], size), 1.0)
  return scores, labels, weights


@pytest.mark.parametrize("seed", range(6))
def test_weighted_metrics_match_sklearn(seed):
  scores, labels, weights = _weighted_case(seed)
  threshold = [0.5, 0.3, 0.7][seed % 3]
  out = metrics.binary_metrics(scores, labels, threshold, sample_weight=weights)
  predicted = scores >= threshold
  for key, sk_score in (
    ("f1", sk_metrics.f1_score),
    ("precision", sk_metrics.precision_score),
    ("recall", sk_metrics.recall_score),
  ):
    expected = sk_score(labels, predicted, sample_weight=weights, zero_division=0)
    assert out[key] == pytest.approx(expected, abs=1e-12), key
  assert out["average_precision"] == pytest.approx(
    sk_metrics.average_precision_score(labels, scores, sample_weight=weights), abs=1e-12
  )
  # Weighted sums as floats, image counts under their own keys.
  assert out["num_positives"] == pytest.approx(weights[labels].sum())
  assert out["num_predicted"] == pytest.approx(weights[predicted].sum())
  assert out["num_positive_images"] == int(labels.sum())
  assert out["num_predicted_images"] == int(predicted.sum())
  assert isinstance(out["num_positives"], float) and isinstance(out["num_positive_images"], int)
  # The weighting changes the answer here: the test could fail.
  assert out["average_precision"] != pytest.approx(metrics.average_precision(scores, labels))


@pytest.mark.parametrize("seed", range(4))
def test_integer_weights_equal_duplicated_rows(seed):
  rng = np.random.default_rng(seed)
  scores, labels, _ = _weighted_case(seed, size=120)
  counts = rng.integers(0, 4, size=scores.size)
  weighted = metrics.binary_metrics(scores, labels, sample_weight=counts)
  duplicated = metrics.binary_metrics(np.repeat(scores, counts), np.repeat(labels, counts))
  for key in ("f1", "precision", "recall", "average_precision"):
    assert weighted[key] == pytest.approx(duplicated[key], abs=1e-12), key
  assert weighted["num_positives"] == duplicated["num_positives"]
  assert weighted["num_predicted"] == duplicated["num_predicted"]


def test_weighted_ap_hand_computed_and_zero_weights():
  # The tied top pair is one threshold (positive mass 1 of its mass 4); positive mass 3 in all.
  scores = np.array([0.7, 0.7, 0.3, 0.2])
  labels = np.array([1, 0, 1, 0], bool)
  weights = np.array([1.0, 3.0, 2.0, 1.0])
  # Threshold 0.7: tp 1, predicted 4 -> precision 1/4, recall 1/3. Threshold 0.3: tp 3,
  # predicted 6 -> precision 1/2, recall 1. AP = 1/3 * 1/4 + 2/3 * 1/2.
  expected = 1 / 3 * 1 / 4 + 2 / 3 * 1 / 2
  assert metrics.average_precision(scores, labels, weights) == pytest.approx(expected)
  # Positives of zero weight: AP 0, recall 0 (as without positives).
  zero = metrics.binary_metrics(scores, labels, sample_weight=np.array([0.0, 1, 0, 1]))
  assert zero["average_precision"] == 0.0 and zero["recall"] == 0.0 and zero["f1"] == 0.0
  # A zero-weight top image does not count: same as dropping it.
  dropped = metrics.binary_metrics(scores[1:], labels[1:])
  kept = metrics.binary_metrics(scores, labels, sample_weight=np.array([0.0, 1, 1, 1]))
  for key in ("f1", "precision", "recall", "average_precision"):
    assert kept[key] == pytest.approx(dropped[key]), key


def test_unit_weights_equal_none_and_none_is_unchanged():
  rng = np.random.default_rng(3)
  truth = rng.random((3, 80)) < 0.2
  probs = np.round(np.clip(0.5 * truth + 0.6 * rng.random((3, 80)), 0, 1), 2)
  plain = metrics.category_metrics(probs, truth)
  ones = metrics.category_metrics(probs, truth, sample_weight=np.ones(80))
  # None: the keys and int counts of the unweighted metrics (records read as before).
  assert set(plain) == set(ones) - {"num_positive_images", "num_predicted_images"}
  assert all(isinstance(n, int) for n in plain["num_positives"] + plain["num_predicted"])
  for key, value in plain.items():
    assert ones[key] == pytest.approx(value, abs=1e-12), key
  assert ones["num_positive_images"] == plain["num_positives"]
  json.dumps(ones, allow_nan=False)


def test_category_metrics_weights_per_image():
  rng = np.random.default_rng(1)
  truth = rng.random((2, 60)) < 0.3
  probs = rng.random((2, 60))
  weights = rng.random(60) * 2
  out = metrics.category_metrics(probs, truth, sample_weight=weights)
  for c in range(2):
    single = metrics.binary_metrics(probs[c], truth[c], sample_weight=weights)
    for key, value in single.items():
      assert out[key][c] == value
  assert out["mean_ap"] == pytest.approx(np.mean(out["average_precision"]))


@pytest.mark.parametrize(
  "weights, match",
  [
    (np.ones(3), r"shape \(3,\); expected \(4,\)"),
    (np.array([1.0, np.nan, 1, 1]), "1 non-finite"),
    (np.array([1.0, np.inf, 1, 1]), "1 non-finite"),
    (np.array([1.0, -0.5, 1, 1]), "holds -0.5; expected weights >= 0"),
    (np.array([True, False, True, True]), "dtype bool"),
    (np.array([1, 1j, 1, 1]), "dtype complex128"),
  ],
)
def test_bad_sample_weights(weights, match):
  scores, labels = np.array([0.9, 0.1, 0.6, 0.4]), np.array([1, 0, 1, 0], bool)
  with pytest.raises(ValueError, match=match):
    metrics.binary_metrics(scores, labels, sample_weight=weights)
  with pytest.raises(ValueError, match=match):
    metrics.average_precision(scores, labels, weights)
  with pytest.raises(ValueError, match=match):
    metrics.category_metrics(scores[None], labels[None], sample_weight=weights)


def test_pseudo_label_error_rates():
  truth = np.array([[1, 1, 0, 0, 0, 0], [0, 1, 0, 0, 1, 0]], bool)
  pseudo_positive = np.array([[1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
  pseudo_negative = np.array([[0, 1, 0, 0, 1, 1], [1, 1, 1, 0, 0, 0]], bool)
  out = metrics.pseudo_label_error_rates(pseudo_positive, pseudo_negative, truth)
  # Category 0: pseudo-positives {0, 2, 3}, 2 truly negative; pseudo-negatives {1, 4, 5}, 1
  # truly positive. Category 1: no pseudo-positives (NaN); pseudo-negatives {0, 1, 2}, 1 wrong.
  assert out["pseudo_positive_fpr"][0] == pytest.approx(2 / 3)
  assert math.isnan(out["pseudo_positive_fpr"][1])
  assert out["pseudo_negative_fnr"] == pytest.approx([1 / 3, 1 / 3])
  assert out["num_pseudo_positives"] == [3, 0] and out["num_pseudo_negatives"] == [3, 3]
  assert out["mean_pseudo_positive_fpr"] == pytest.approx(2 / 3)  # over defined categories
  assert out["mean_pseudo_negative_fnr"] == pytest.approx(1 / 3)
  single = metrics.pseudo_label_error_rates(pseudo_positive[0], pseudo_negative[0], truth[0])
  assert single["pseudo_positive_fpr"] == pytest.approx([2 / 3])
  with pytest.raises(ValueError, match="one shape"):
    metrics.pseudo_label_error_rates(pseudo_positive, pseudo_negative[:1], truth)


def test_metrics_writer_round_trip_and_sanitising(tmp_path):
  path = tmp_path / "run" / "metrics.jsonl"
  with metrics.MetricsWriter(path) as writer:
    writer.write({"round": 0, "mean_f1": np.float32(0.25), "f1": np.array([0.5, 0.0])})
    writer.write({"round": 1, "fpr": float("nan"), "count": np.int64(3), "ok": np.bool_(True)})
  records = metrics.read_metrics(path)
  assert records == [
    {"round": 0, "mean_f1": 0.25, "f1": [0.5, 0.0]},
    {"round": 1, "fpr": None, "count": 3, "ok": True},
  ]
  with metrics.MetricsWriter(path) as writer:  # reopening appends
    writer.write({"round": 2})
  assert [r["round"] for r in metrics.read_metrics(path)] == [0, 1, 2]
  with pytest.raises(ValueError, match="expected a dict"), metrics.MetricsWriter(path) as writer:
    writer.write([1, 2])
  with pytest.raises(ValueError, match="expected JSON data"), metrics.MetricsWriter(path) as w:
    w.write({"round": 3, "bad": object()})
  assert metrics.read_metrics(tmp_path / "missing.jsonl") == []


def test_torn_last_line_is_skipped_and_repaired(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with metrics.MetricsWriter(path) as writer:
    writer.write({"round": 0, "mean_f1": 0.1})
    writer.write({"round": 1, "mean_f1": 0.2})
  with open(path, "a") as f:
    f.write('{"round": 2, "mean_f')  # a writer killed mid-line
  assert [r["round"] for r in metrics.read_metrics(path)] == [0, 1]
  # The next writer drops the torn tail, so its record is on a line of its own.
  with metrics.MetricsWriter(path) as writer:
    writer.write({"round": 2, "mean_f1": 0.3})
  assert [r["round"] for r in metrics.read_metrics(path)] == [0, 1, 2]
  with open(path) as f:
    assert f.read().count("\n") == 3
  # Damage before the last line is not a crash: it is reported.
  with open(path, "w") as f:
    f.write('{"round": 0}\nnot json\n{"round": 2}\n')
  with pytest.raises(ValueError, match="line 2"):
    metrics.read_metrics(path)


def test_rewrite_up_to(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with metrics.MetricsWriter(path) as writer:
    for round_index in range(5):
      writer.write({"round": round_index, "mean_f1": round_index / 10})
  with open(path, "a") as f:
    f.write('{"round": 5, "me')
  assert metrics.rewrite_up_to(path, 2) == 3
  assert [r["round"] for r in metrics.read_metrics(path)] == [0, 1, 2]
  assert not os.path.exists(str(path) + ".tmp")
  # Resuming appends after the kept rounds: no duplicated rows.
  with metrics.MetricsWriter(path) as writer:
    writer.write({"round": 3, "mean_f1": 0.33})
  assert [r["round"] for r in metrics.read_metrics(path)] == [0, 1, 2, 3]
  assert metrics.rewrite_up_to(path, -1) == 0 and metrics.read_metrics(path) == []
  assert metrics.rewrite_up_to(tmp_path / "absent.jsonl", 3) == 0
  assert not os.path.exists(tmp_path / "absent.jsonl")
  with open(path, "w") as f:
    f.write('{"labels": 10}\n')
  with pytest.raises(ValueError, match="lacks an int 'round'"):
    metrics.rewrite_up_to(path, 3)


def test_plot_f1_vs_labels(tmp_path):
  def records(offset):
    return [
      {
        "labels_per_category": n,
        "f1": [offset + n / 1000, offset + n / 2000, None],
        "mean_f1": offset + n / 1500,
      }
      for n in (50, 100, 150)
    ]

  out = tmp_path / "plots" / "f1.png"
  written = metrics.plot_f1_vs_labels(
    {"ours_linear": records(0.2), "tropel": records(0.1)}, out, category_names=["a", "b", "c"]
  )
  assert written == str(out)
  with open(out, "rb") as f:
    header = f.read(8)
  assert header == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(out) > 5000  # an actual figure, not an empty canvas
  with pytest.raises(ValueError, match="category_names"):
    metrics.plot_f1_vs_labels({"ours": records(0)}, out, category_names=["a"])
  with pytest.raises(ValueError, match="lacks 'mean_f1'"):
    metrics.plot_f1_vs_labels({"ours": [{"labels_per_category": 1, "f1": [0.1]}]}, out)
  with pytest.raises(ValueError, match="empty"):
    metrics.plot_f1_vs_labels({}, out)


def test_t_interval_is_the_student_t_interval_of_the_mean():
  values = [0.2, 0.4, 0.6]
  out = metrics.t_interval(values)
  half = 4.302652729911275 * 0.2 / math.sqrt(3)  # t(0.975, 2) x sd / sqrt(n)
  assert out["n"] == 3
  np.testing.assert_allclose([out["mean"], out["low"], out["high"]], [0.4, 0.4 - half, 0.4 + half])
  wider = metrics.t_interval(np.array([[0.2, 0.4], [0.6, 0.8]]), confidence=0.99)
  assert wider["n"] == 4 and wider["high"] - wider["mean"] > 0.5  # t(0.995, 3) = 5.84
  one = metrics.t_interval([0.5])
  assert (one["mean"], one["n"]) == (0.5, 1) and math.isnan(one["low"]) and math.isnan(one["high"])
  none = metrics.t_interval([])
  assert none["n"] == 0 and all(math.isnan(none[k]) for k in ("mean", "low", "high"))


def test_interval_text_writes_the_reports_format():
  t = metrics.t_interval([0.1, 0.2, 0.3])
  assert metrics.interval_text(t) == "+0.200 [-0.048, +0.448] (n = 3)"
  assert metrics.interval_text(metrics.t_interval([-2e-17])) == "+0.000 (n = 1, no interval)"
