"""Losses: hand-computed values, masking (garbage in masked entries), gradients, jit."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rare_jax.deep import losses

LOGITS = np.array([[0.0, 2.0], [-1.0, 3.0]], np.float32)
LABELS = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
LABEL_MASK = np.array([[True, True], [False, True]])
# softplus(-z) for a positive, softplus(z) for a negative.
BCE = np.array([[math.log(2.0), math.log1p(math.exp(2.0))], [0.0, math.log1p(math.exp(-3.0))]])

AUX_LOGITS = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], np.float32)
AUX_LABELS = np.array([2, 1], np.int32)
AUX_CE = np.array([math.log(math.exp(1) + math.exp(2) + math.exp(3)) - 3.0, math.log(3.0)])


def test_masked_sigmoid_bce_hand_computed():
  out = losses.masked_sigmoid_bce(LOGITS, LABELS, LABEL_MASK)
  assert out.shape == (2, 2) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, BCE, rtol=1e-6)


def test_aux_cross_entropy_hand_computed():
  out = losses.aux_cross_entropy(AUX_LOGITS, AUX_LABELS, np.array([True, True]))
  np.testing.assert_allclose(out, AUX_CE, rtol=1e-6)
  out = losses.aux_cross_entropy(AUX_LOGITS, AUX_LABELS, np.array([True, False]))
  np.testing.assert_allclose(out, [AUX_CE[0], 0.0], rtol=1e-6)


def test_bgsplit_loss_hand_computed():
  loss, metrics = losses.bgsplit_loss(
    LOGITS, LABELS, LABEL_MASK, AUX_LOGITS, AUX_LABELS, np.array([True, True]), aux_weight=0.1
  )
  bce = BCE[LABEL_MASK].mean()  # over the 3 labeled entries, not all 4
  np.testing.assert_allclose(loss, bce + 0.1 * AUX_CE.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["bce"], bce, rtol=1e-6)
  np.testing.assert_allclose(metrics["aux_ce"], AUX_CE.mean(), rtol=1e-6)
  assert float(metrics["num_labels"]) == 3 and float(metrics["num_examples"]) == 2
  # Predictions at logit 0: entries (0,0) wrong (0 > 0 is False vs label 1), (0,1) wrong,
  # (1,1) right.
  np.testing.assert_allclose(metrics["main_accuracy"], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(metrics["aux_accuracy"], 0.5, rtol=1e-6)


def test_bgsplit_loss_drops_padded_examples_and_aux_weight_zero():
  loss, metrics = losses.bgsplit_loss(
    LOGITS, LABELS, LABEL_MASK, AUX_LOGITS, AUX_LABELS, np.array([True, False]), aux_weight=0.5
  )
  np.testing.assert_allclose(loss, BCE[0].mean() + 0.5 * AUX_CE[0], rtol=1e-6)
  assert float(metrics["num_labels"]) == 2
  loss0, _ = losses.bgsplit_loss(
    LOGITS, LABELS, LABEL_MASK, AUX_LOGITS, AUX_LABELS, np.array([True, True]), aux_weight=0.0
  )
  np.testing.assert_allclose(loss0, BCE[LABEL_MASK].mean(), rtol=1e-6)


def test_masked_entries_may_hold_garbage():
  logits = LOGITS.copy()
  logits[1, 0] = np.nan
  labels = LABELS.copy()
  labels[1, 0] = 7.0
  aux_logits = np.concatenate([AUX_LOGITS, [[np.inf, np.nan, 0.0]]]).astype(np.float32)
  aux_labels = np.array([2, 1, 99], np.int32)
  example_mask = np.array([True, True, False])
  np.testing.assert_allclose(losses.masked_sigmoid_bce(logits, labels, LABEL_MASK), BCE, 1e-6)
  np.testing.assert_allclose(
    losses.aux_cross_entropy(aux_logits, aux_labels, example_mask), [*AUX_CE, 0.0], 1e-6
  )

  def total(main_logits, aux_logits):
    main3 = jnp.concatenate([main_logits, jnp.zeros((1, 2))])
    return losses.bgsplit_loss(
      main3,
      np.concatenate([labels, [[0, 0]]]),
      np.concatenate([LABEL_MASK, [[True, True]]]),
      aux_logits,
      aux_labels,
      example_mask,
    )[0]

  value, (g_main, g_aux) = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(logits, aux_logits)
  assert np.isfinite(float(value))
  assert bool(jnp.all(jnp.isfinite(g_main))) and bool(jnp.all(jnp.isfinite(g_aux)))
  assert float(g_main[1, 0]) == 0.0 and float(jnp.abs(g_aux[2]).sum()) == 0.0
  # Gradient of the mean BCE: (sigmoid(z) - y) / number of labeled entries.
  expected = (jax.nn.sigmoid(LOGITS) - LABELS) * LABEL_MASK / 3
  np.testing.assert_allclose(
    np.where(LABEL_MASK, g_main, 0), np.where(LABEL_MASK, expected, 0), rtol=1e-5, atol=1e-7
  )


# ----------------------------------------------------------------------------------------------
# An independent numpy reference (float64) on a random batch with a padded row and label weights.


def _random_batch(seed=0, batch=6, categories=3, aux_classes=4):
  rng = np.random.default_rng(seed)
  example_mask = np.ones(batch, bool)
  example_mask[[2, 5]] = False  # padded rows: their labels must not count anywhere
  return dict(
    main_logits=rng.normal(scale=2.0, size=(batch, categories)).astype(np.float32),
    labels=(rng.random((batch, categories)) < 0.4).astype(np.float32),
    label_mask=rng.random((batch, categories)) < 0.7,
    aux_logits=rng.normal(scale=2.0, size=(batch, aux_classes)).astype(np.float32),
    aux_labels=rng.integers(0, aux_classes, batch).astype(np.int32),
    example_mask=example_mask,
    label_weights=rng.uniform(0.1, 2.0, size=(batch, categories)).astype(np.float32),
  )


def _reference(b, aux_weight):
  """Loss, metrics and gradients of `bgsplit_loss` written out in numpy.

  BCE per entry: y softplus(-z) + (1 - y) softplus(z), times its weight, averaged over the
  labeled entries of real rows; CE per row: logsumexp(a) - a[label], averaged over real rows.
  Gradients: dL/dz = (sigmoid(z) - y) w m / n_labels and
  dL/da = aux_weight (softmax(a) - onehot) / n_examples on real rows, 0 elsewhere.
  """
  z, y, w = (np.asarray(b[k], np.float64) for k in ("main_logits", "labels", "label_weights"))
  a = np.asarray(b["aux_logits"], np.float64)
  real = b["example_mask"]
  entry = b["label_mask"] & real[:, None]
  n_labels, n_examples = entry.sum(), real.sum()
  bce = y * np.logaddexp(0.0, -z) + (1 - y) * np.logaddexp(0.0, z)
  bce_mean = (bce * w)[entry].sum() / n_labels
  log_norm = np.log(np.exp(a).sum(axis=1))
  ce = log_norm - a[np.arange(len(a)), b["aux_labels"]]
  aux_mean = ce[real].mean()
  onehot = np.eye(a.shape[1])[b["aux_labels"]]
  softmax = np.exp(a - log_norm[:, None])
  grad_main = np.where(entry, (1 / (1 + np.exp(-z)) - y) * w, 0.0) / n_labels
  grad_aux = np.where(real[:, None], aux_weight * (softmax - onehot), 0.0) / n_examples
  metrics = {
    "loss": bce_mean + aux_weight * aux_mean,
    "bce": bce_mean,
    "aux_ce": aux_mean,
    "num_labels": n_labels,
    "num_examples": n_examples,
    "main_accuracy": ((z > 0) == (y > 0.5))[entry].mean(),
    "aux_accuracy": (a.argmax(axis=1) == b["aux_labels"])[real].mean(),
  }
  per_entry = {"bce": np.where(entry, bce * w, 0.0), "ce": np.where(real, ce, 0.0)}
  return metrics, per_entry, (grad_main, grad_aux)


def test_gradients_match_hand_derived_formulas():
  b = _random_batch()
  expected, _, (grad_main, grad_aux) = _reference(b, aux_weight=0.3)
  z, y, m, w = b["main_logits"], b["labels"], b["label_mask"], b["label_weights"]
  # Per-entry BCE: d sum / dz = (sigmoid(z) - y) w, 0 where masked.
  got = jax.grad(lambda z: losses.masked_sigmoid_bce(z, y, m, w).sum())(z)
  np.testing.assert_allclose(got, np.where(m, (1 / (1 + np.exp(-z)) - y) * w, 0), rtol=1e-5)
  # Per-example CE: d sum / da = softmax(a) - onehot(label), 0 for padding.
  a, labels, real = b["aux_logits"], b["aux_labels"], b["example_mask"]
  got = jax.grad(lambda a: losses.aux_cross_entropy(a, labels, real).sum())(a)
  softmax = np.exp(a) / np.exp(a).sum(axis=1, keepdims=True)
  np.testing.assert_allclose(
    got, np.where(real[:, None], softmax - np.eye(4)[labels], 0), rtol=1e-5, atol=1e-7
  )

  def total(z, a):
    return losses.bgsplit_loss(z, y, m, a, labels, real, aux_weight=0.3, label_weights=w)[0]

  for fn in (total, jax.jit(total)):
    value, (g_main, g_aux) = jax.value_and_grad(fn, argnums=(0, 1))(z, a)
    np.testing.assert_allclose(value, expected["loss"], rtol=1e-5)
    np.testing.assert_allclose(g_main, grad_main, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(g_aux, grad_aux, rtol=1e-5, atol=1e-8)
  # Autodiff also agrees with finite differences of the total.
  check_grads(jax.jit(total), (z, a), 1, modes=("rev",), atol=2e-2, rtol=2e-2, eps=1e-2)


def test_bgsplit_loss_matches_numpy_reference_eager_and_jit():
  b = _random_batch(seed=1)
  expected, per_entry, _ = _reference(b, aux_weight=0.25)
  fn = functools.partial(losses.bgsplit_loss, aux_weight=0.25)
  for loss_fn in (fn, jax.jit(fn)):
    loss, metrics = loss_fn(**b)
    np.testing.assert_allclose(loss, expected["loss"], rtol=1e-5)
    assert set(metrics) == set(expected)
    for name, value in expected.items():
      np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(
    losses.masked_sigmoid_bce(
      b["main_logits"],
      b["labels"],
      b["label_mask"] & b["example_mask"][:, None],
      b["label_weights"],
    ),
    per_entry["bce"],
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    losses.aux_cross_entropy(b["aux_logits"], b["aux_labels"], b["example_mask"]),
    per_entry["ce"],
    rtol=1e-5,
  )


def test_classification_loss_hand_computed():
  loss, metrics = losses.classification_loss(AUX_LOGITS, AUX_LABELS, np.array([True, True]))
  np.testing.assert_allclose(loss, AUX_CE.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["accuracy"], 0.5)


def test_masked_mean_of_nothing_is_zero():
  assert float(losses.masked_mean(jnp.ones(3), jnp.zeros(3))) == 0.0
  np.testing.assert_allclose(losses.masked_mean(jnp.arange(4.0), jnp.array([0, 1, 1, 0])), 1.5)


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match=r"\[B, C\]"):
    losses.masked_sigmoid_bce(LOGITS, LABELS[:1], LABEL_MASK)
  with pytest.raises(ValueError, match="labels"):
    losses.aux_cross_entropy(AUX_LOGITS, AUX_LABELS.astype(np.float32), np.ones(2, bool))
  with pytest.raises(ValueError, match="example_mask"):
    losses.bgsplit_loss(LOGITS, LABELS, LABEL_MASK, AUX_LOGITS, AUX_LABELS, np.ones(3, bool))
