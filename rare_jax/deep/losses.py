"""Losses of background splitting: per-example values and masks; the caller reduces (optax).

- `masked_sigmoid_bce`: the main head's binary cross-entropy, one per (image, category),
  zero where that category has no label for the image (neither human nor pseudo).
- `aux_cross_entropy`: the auxiliary head's softmax cross-entropy against `M_pre`'s hard labels
  (also the pretraining loss of `M_pre` itself), zero for padding.
- `bgsplit_loss`: mean masked BCE over the labeled entries + `aux_weight` x mean auxiliary CE
  over the real examples (docs/method.md), with metrics.

Masked entries are replaced before the loss so that no NaN/inf from garbage logits or
out-of-range labels in padding can leak into values or gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike


def masked_sigmoid_bce(
  logits: ArrayLike, labels: ArrayLike, mask: ArrayLike, weights: ArrayLike | None = None
) -> jax.Array:
  """Sigmoid binary cross-entropy per entry, zero where `mask` is false.

  Args:
    logits: [B, C] main-head logits.
    labels: [B, C] targets in [0, 1] (1 positive, 0 negative or pseudo-negative).
    mask: [B, C] true (or 1) where the entry has a label.
    weights: optional [B, C] per-label weights >= 0 (DeepProp's certainty of a propagated
      pseudo-label); None weighs every label 1.

  Returns:
    [B, C] float32 losses (times `weights` when given).
  """
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels, jnp.float32)
  mask = jnp.asarray(mask).astype(bool)
  if logits.ndim != 2 or labels.shape != logits.shape or mask.shape != logits.shape:
    raise ValueError(
      f"expected logits, labels and mask of one shape [B, C]; got {logits.shape}, "
      f"{labels.shape}, {mask.shape}"
    )
  safe_logits = jnp.where(mask, logits, 0.0)
  safe_labels = jnp.where(mask, labels, 0.0)
  losses = optax.sigmoid_binary_cross_entropy(safe_logits, safe_labels)
  if weights is not None:
    weights = jnp.asarray(weights, jnp.float32)
    if weights.shape != logits.shape:
      raise ValueError(f"expected weights of shape {logits.shape}, got {weights.shape}")
    losses = losses * jnp.where(mask, weights, 0.0)
  return jnp.where(mask, losses, 0.0)


def aux_cross_entropy(logits: ArrayLike, labels: ArrayLike, mask: ArrayLike) -> jax.Array:
  """Softmax cross-entropy against integer labels per example, zero where `mask` is false.

  Args:
    logits: [B, K] auxiliary-head (or classifier) logits.
    labels: [B] integer class ids in [0, K) (anything where masked).
    mask: [B] true (or 1) for real examples.

  Returns:
    [B] float32 losses.
  """
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels)
  mask = jnp.asarray(mask).astype(bool)
  if logits.ndim != 2 or labels.shape != logits.shape[:1] or mask.shape != logits.shape[:1]:
    raise ValueError(
      f"expected logits [B, K], labels [B] and mask [B]; got {logits.shape}, "
      f"{labels.shape}, {mask.shape}"
    )
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
  safe_labels = jnp.where(mask, labels, 0)
  safe_logits = jnp.where(mask[:, None], logits, 0.0)
  losses = optax.softmax_cross_entropy_with_integer_labels(safe_logits, safe_labels)
  return jnp.where(mask, losses, 0.0)


def masked_mean(values: ArrayLike, mask: ArrayLike) -> jax.Array:
  """Mean of `values` over the true entries of `mask` (0 when there are none)."""
  values = jnp.asarray(values, jnp.float32)
  mask = jnp.asarray(mask).astype(jnp.float32)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def bgsplit_loss(
  main_logits: ArrayLike,
  labels: ArrayLike,
  label_mask: ArrayLike,
  aux_logits: ArrayLike,
  aux_labels: ArrayLike,
  example_mask: ArrayLike,
  *,
  aux_weight: float = 0.1,
  label_weights: ArrayLike | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Background-splitting loss: mean masked BCE + `aux_weight` x mean auxiliary CE.

  Args:
    main_logits: [B, C] main-head logits.
    labels: [B, C] binary targets.
    label_mask: [B, C] where a (human or pseudo) label exists; padded rows are also dropped
      through `example_mask`.
    aux_logits: [B, K] auxiliary-head logits.
    aux_labels: [B] `M_pre`'s hard labels.
    example_mask: [B] true for real (non-padding) examples.
    aux_weight: weight of the auxiliary term (0 turns background splitting off).
    label_weights: optional [B, C] per-label weights of the BCE terms; the mean stays over
      the number of labeled entries (as in Iscen et al.'s weighted loss), so weights of 1
      give the unweighted loss.

  Returns:
    (scalar loss, metrics) with metrics `loss`, `bce`, `aux_ce`, `num_labels`,
    `num_examples`, `main_accuracy` (at logit 0 over labeled entries) and `aux_accuracy`.
  """
  example_mask = jnp.asarray(example_mask).astype(bool)
  label_mask = jnp.asarray(label_mask).astype(bool)
  if label_mask.ndim != 2 or example_mask.shape != label_mask.shape[:1]:
    raise ValueError(
      f"expected label_mask [B, C] and example_mask [B]; got {label_mask.shape}, "
      f"{example_mask.shape}"
    )
  entry_mask = label_mask & example_mask[:, None]
  bce = masked_mean(masked_sigmoid_bce(main_logits, labels, entry_mask, label_weights), entry_mask)
  aux_ce = masked_mean(aux_cross_entropy(aux_logits, aux_labels, example_mask), example_mask)
  loss = bce + aux_weight * aux_ce
  main_correct = (jnp.asarray(main_logits) > 0) == (jnp.asarray(labels) > 0.5)
  aux_correct = jnp.argmax(aux_logits, axis=-1) == jnp.asarray(aux_labels)
  metrics = {
    "loss": loss,
    "bce": bce,
    "aux_ce": aux_ce,
    "num_labels": jnp.sum(entry_mask.astype(jnp.float32)),
    "num_examples": jnp.sum(example_mask.astype(jnp.float32)),
    "main_accuracy": masked_mean(main_correct, entry_mask),
    "aux_accuracy": masked_mean(aux_correct, example_mask),
  }
  return loss, metrics


def classification_loss(
  logits: ArrayLike, labels: ArrayLike, example_mask: ArrayLike
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Supervised pretraining loss of `M_pre`: mean softmax CE over real examples, with metrics
  `loss`, `accuracy`, `num_examples`."""
  example_mask = jnp.asarray(example_mask).astype(bool)
  loss = masked_mean(aux_cross_entropy(logits, labels, example_mask), example_mask)
  correct = jnp.argmax(logits, axis=-1) == jnp.asarray(labels)
  return loss, {
    "loss": loss,
    "accuracy": masked_mean(correct, example_mask),
    "num_examples": jnp.sum(example_mask.astype(jnp.float32)),
  }
