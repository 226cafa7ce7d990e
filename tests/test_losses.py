"""Losses: hand-computed values, masking (garbage in masked entries), gradients, jit."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rare_jax import losses

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


def test_gradients_check():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  labels = jnp.asarray(rng.random((3, 4)) > 0.5, jnp.float32)
  mask = jnp.asarray(rng.random((3, 4)) > 0.3)
  aux_logits = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  aux_labels = jnp.asarray([0, 3, 4])
  tol = {"atol": 2e-2, "rtol": 2e-2, "eps": 1e-2, "modes": ("rev",)}
  check_grads(jax.jit(lambda z: losses.masked_sigmoid_bce(z, labels, mask)), (logits,), 2, **tol)
  aux_mask = jnp.array([True, False, True])
  check_grads(
    jax.jit(lambda z: losses.aux_cross_entropy(z, aux_labels, aux_mask)), (aux_logits,), 1, **tol
  )
  total = lambda z, a: losses.bgsplit_loss(z, labels, mask, a, aux_labels, jnp.ones(3, bool))[0]
  check_grads(jax.jit(total), (logits, aux_logits), 1, **tol)


def test_jit_matches_eager():
  args = (LOGITS, LABELS, LABEL_MASK, AUX_LOGITS, AUX_LABELS, np.array([True, True]))
  eager = losses.bgsplit_loss(*args)
  jitted = jax.jit(losses.bgsplit_loss)(*args)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager, jitted)


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
