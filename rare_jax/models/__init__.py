"""Model registry: trunk name -> constructor returning a Flax trunk (ResNet, EfficientNet-Lite).

Every constructor takes keyword arguments (`dtype=jnp.bfloat16` for bf16 compute with f32
parameters; any other `ResNet` field overrides the preset). A test runs every entry.
Wrap a trunk with `BGSplitModel` (the loop's deep model) or `Classifier` (`M_pre`).
Which trunks have pretrained weights, their resolution and preprocessing: `pretrained.py`.
"""

from __future__ import annotations

from rare_jax.models.bgsplit import BGSplitModel, Classifier, TrunkOutput, init_from_pretrained
from rare_jax.models.efficientnet import (
  EfficientNetLite,
  efficientnet_lite0,
  efficientnet_lite1,
  efficientnet_lite2,
)
from rare_jax.models.resnet import (
  BasicBlock,
  BottleneckBlock,
  ResNet,
  resnet18,
  resnet50,
  resnet_tiny,
)

MODELS = {
  "resnet50": resnet50,
  "resnet18": resnet18,
  "resnet_tiny": resnet_tiny,
  "efficientnet_lite0": efficientnet_lite0,
  "efficientnet_lite1": efficientnet_lite1,
  "efficientnet_lite2": efficientnet_lite2,
}


def get_trunk(name: str, **kwargs):
  """Returns `MODELS[name](**kwargs)`; raises ValueError naming the known models."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
  return MODELS[name](**kwargs)


__all__ = [
  "MODELS",
  "BGSplitModel",
  "BasicBlock",
  "BottleneckBlock",
  "Classifier",
  "TrunkOutput",
  "EfficientNetLite",
  "ResNet",
  "get_trunk",
  "init_from_pretrained",
  "resnet18",
  "resnet50",
  "resnet_tiny",
]
