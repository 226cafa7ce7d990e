"""The background-splitting model (a shared trunk, two heads) and the pretrained classifier.

`Classifier` is `M_pre`: a trunk and one softmax head over the related domain's classes.
`BGSplitModel` is the deep model of the loop: the same trunk, a main head with one binary
logit per category of the group, and an auxiliary head over `M_pre`'s classes. The two heads'
logits are never mixed (docs/method.md, "Deep updates").
`init_from_pretrained` copies `M_pre`'s trunk and classifier into a `BGSplitModel`'s
variables, the classifier becoming the auxiliary head.

Variables are `{"params": ..., "batch_stats": ...}` with the trunk under "trunk" in both models
and the heads under "main_head"/"aux_head" (BGSplitModel) and "head" (Classifier).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class BGSplitModel(nn.Module):
  """Shared trunk, main head (binary logit per category) and auxiliary head (softmax).

  `__call__(x, train=False, mask=None) -> dict(embedding [B,D], main_logits [B,C],
  aux_logits [B,K])`, logits in float32.
  """

  trunk: nn.Module
  num_categories: int
  num_aux_classes: int

  def setup(self):
    if self.num_categories < 1:
      raise ValueError(f"num_categories must be >= 1, got {self.num_categories}")
    if self.num_aux_classes < 1:
      raise ValueError(f"num_aux_classes must be >= 1, got {self.num_aux_classes}")
    self.main_head = nn.Dense(self.num_categories, name="main_head")
    self.aux_head = nn.Dense(self.num_aux_classes, name="aux_head")

  def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None):
    embedding = self.trunk(x, train=train, mask=mask).astype(jnp.float32)
    return {
      "embedding": embedding,
      "main_logits": self.main_head(embedding),
      "aux_logits": self.aux_head(embedding),
    }


class Classifier(nn.Module):
  """`M_pre`: a trunk and a softmax head over `num_classes` classes.

  `__call__(x, train=False, mask=None) -> dict(embedding [B,D], logits [B,K])`.
  """

  trunk: nn.Module
  num_classes: int

  def setup(self):
    if self.num_classes < 2:
      raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
    self.head = nn.Dense(self.num_classes, name="head")

  def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None):
    embedding = self.trunk(x, train=train, mask=mask).astype(jnp.float32)
    return {"embedding": embedding, "logits": self.head(embedding)}


class TrunkOutput(nn.Module):
  """A trunk alone, its output flattened per example as `embedding`.

  With an EfficientNet-Lite trunk of `part="frozen"` this computes the frozen blocks' output
  that `deep.frozen_inputs` caches; variables are `{"params": {"trunk": ...}, ...}` like the
  other models', so a `Classifier`'s or `BGSplitModel`'s trunk variables apply as they are.
  """

  trunk: nn.Module

  def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None):
    out = self.trunk(x, train=train, mask=mask)
    return {"embedding": out.reshape(out.shape[0], -1).astype(jnp.float32)}


def init_from_pretrained(
  bgsplit_variables: dict[str, Any],
  pretrained_variables: dict[str, Any],
  *,
  copy_trunk: bool = True,
  copy_aux_head: bool = True,
) -> dict[str, Any]:
  """Returns `bgsplit_variables` with the trunk and/or auxiliary head taken from `M_pre`.

  Args:
    bgsplit_variables: `{"params", "batch_stats"}` of a `BGSplitModel`.
    pretrained_variables: `{"params", "batch_stats"}` of a `Classifier` with the same trunk
      and as many classes as the auxiliary head.
    copy_trunk: copy the trunk's parameters and BatchNorm statistics.
    copy_aux_head: the classifier head becomes the auxiliary head.

  Returns:
    New variables (the main head is left as it is).

  Raises:
    ValueError: if a tree is missing a part or shapes differ.
  """
  for name, variables in (
    ("bgsplit_variables", bgsplit_variables),
    ("pretrained_variables", pretrained_variables),
  ):
    if "params" not in variables:
      raise ValueError(f"{name} must hold 'params', got keys {sorted(variables)}")
  params = dict(bgsplit_variables["params"])
  batch_stats = dict(bgsplit_variables.get("batch_stats", {}))
  pre_params = pretrained_variables["params"]
  if copy_trunk:
    _check_same("trunk params", params.get("trunk"), pre_params.get("trunk"))
    params["trunk"] = pre_params["trunk"]
    if "trunk" in batch_stats:
      pre_stats = pretrained_variables.get("batch_stats", {}).get("trunk")
      _check_same("trunk batch_stats", batch_stats["trunk"], pre_stats)
      batch_stats["trunk"] = pre_stats
  if copy_aux_head:
    _check_same("aux_head <- head", params.get("aux_head"), pre_params.get("head"))
    params["aux_head"] = pre_params["head"]
  out = dict(bgsplit_variables)
  out["params"] = params
  if "batch_stats" in bgsplit_variables:
    out["batch_stats"] = batch_stats
  return out


def _check_same(what: str, target: Any, source: Any) -> None:
  if target is None or source is None:
    raise ValueError(f"{what}: missing in {'target' if target is None else 'source'} tree")
  t_struct, s_struct = jax.tree.structure(target), jax.tree.structure(source)
  if t_struct != s_struct:
    raise ValueError(f"{what}: tree structures differ: expected {t_struct}, got {s_struct}")
  t_shapes = [tuple(x.shape) for x in jax.tree.leaves(target)]
  s_shapes = [tuple(x.shape) for x in jax.tree.leaves(source)]
  if t_shapes != s_shapes:
    bad = next((t, s) for t, s in zip(t_shapes, s_shapes, strict=True) if t != s)
    raise ValueError(f"{what}: shapes differ: expected {bad[0]}, got {bad[1]}")
