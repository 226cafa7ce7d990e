"""ResNet v1.5 trunks in Flax linen (NHWC), returning the globally pooled embedding.

v1.5: in a bottleneck block the stride sits on the 3x3 convolution (torchvision, the Flax
ImageNet example). With the standard stem, `resnet50` has exactly the parameters of
torchvision's ResNet-50 without its `fc` layer (23,508,032: conv kernels, BatchNorm scales
and biases; no conv biases). The running BatchNorm statistics live in the `batch_stats`
collection.

`dtype` is the compute dtype (bfloat16 for speed on accelerators); parameters stay float32
(`param_dtype`) and BatchNorm statistics are reduced in float32. The pooled embedding is
returned in float32.

Padding follows torchvision (symmetric, also for stride 2), so torchvision/timm weights
imported by `pretrained.py` give torchvision's outputs.

Masks: `__call__` takes an optional example `mask` [B]; in training mode BatchNorm computes
its batch statistics over the real examples only, so padded rows of a fixed-shape batch do not
change what the real rows see (nor the running statistics).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any
# torchvision pads a 3x3 convolution by 1 on every side, also at stride 2, where Flax's "SAME"
# would pad only bottom/right: explicit padding keeps imported weights exact.
_PAD3 = ((1, 1), (1, 1))


class BasicBlock(nn.Module):
  """Two 3x3 convolutions (ResNet-18/34)."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: tuple[int, int] = (1, 1)
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides, padding=_PAD3, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y, mask=mask))
    y = self.conv(self.filters, (3, 3), padding=_PAD3, name="conv2")(y)
    # Zero-init of the last scale: each block starts as the identity (Goyal et al. 2017).
    y = self.norm(scale_init=nn.initializers.zeros_init(), name="bn2")(y, mask=mask)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="downsample_conv")(residual)
      residual = self.norm(name="downsample_bn")(residual, mask=mask)
    return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
  """1x1 -> 3x3 (strided, v1.5) -> 1x1 x4 (ResNet-50/101/152)."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: tuple[int, int] = (1, 1)
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    residual = x
    y = self.conv(self.filters, (1, 1), name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y, mask=mask))
    y = self.conv(self.filters, (3, 3), self.strides, padding=_PAD3, name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y, mask=mask))
    y = self.conv(self.filters * 4, (1, 1), name="conv3")(y)
    y = self.norm(scale_init=nn.initializers.zeros_init(), name="bn3")(y, mask=mask)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1, 1), self.strides, name="downsample_conv")(residual)
      residual = self.norm(name="downsample_bn")(residual, mask=mask)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """A ResNet trunk: `__call__(x [B,H,W,C], train, mask=None) -> embedding [B, D]` (float32).

  Attributes:
    stage_sizes: blocks per stage; stage i > 0 halves the resolution.
    block_cls: `BasicBlock` or `BottleneckBlock`.
    num_filters: width of the first stage (doubles every stage).
    small_stem: a 3x3 stride-1 stem without max-pooling (for 28x28/32x32 inputs) instead of
      the ImageNet 7x7 stride-2 stem + 3x3 stride-2 max-pool.
    dtype: compute dtype; parameters are `param_dtype`.
    bn_momentum: BatchNorm running-average decay (torchvision's 0.1 update = 0.9 here).
  """

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_filters: int = 64
  small_stem: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @property
  def embedding_dim(self) -> int:
    return self.num_filters * 2 ** (len(self.stage_sizes) - 1) * self.block_cls.expansion

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None):
    if x.ndim != 4:
      raise ValueError(f"ResNet expects NHWC images [B, H, W, C], got shape {x.shape}")
    conv = functools.partial(
      nn.Conv,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
    )
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    bn_mask = None
    if mask is not None and train:
      if mask.shape != x.shape[:1]:
        raise ValueError(f"mask must have shape {x.shape[:1]} (one per image), got {mask.shape}")
      mask = mask.astype(bool)
      # An all-padding batch would give 0/0 statistics; fall back to all rows (its loss is 0).
      mask = jnp.where(jnp.any(mask), mask, True)
      bn_mask = mask[:, None, None, None]

    x = x.astype(self.dtype)
    if self.small_stem:
      x = conv(self.num_filters, (3, 3), name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x, mask=bn_mask))
    else:
      x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x, mask=bn_mask))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(
          self.num_filters * 2**i,
          conv=conv,
          norm=norm,
          strides=strides,
          name=f"stage{i + 1}_block{j + 1}",
        )(x, bn_mask)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def resnet50(*, dtype: Any = jnp.float32, **kwargs) -> ResNet:
  """The paper's trunk: bottleneck blocks (3, 4, 6, 3), width 64, 2048-d embedding."""
  return ResNet(stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock, dtype=dtype, **kwargs)


def resnet18(*, dtype: Any = jnp.float32, **kwargs) -> ResNet:
  """Basic blocks (2, 2, 2, 2), width 64, 512-d embedding."""
  return ResNet(stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock, dtype=dtype, **kwargs)


def resnet_tiny(*, dtype: Any = jnp.float32, **kwargs) -> ResNet:
  """For 28x28 grayscale on a CPU: basic blocks (1, 1, 1), width 16, 3x3 stem, 64-d."""
  kwargs = {"stage_sizes": (1, 1, 1), "num_filters": 16, "small_stem": True, **kwargs}
  return ResNet(block_cls=BasicBlock, dtype=dtype, **kwargs)
