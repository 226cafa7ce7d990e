"""EfficientNet-Lite trunks in Flax linen (NHWC), returning the globally pooled embedding.

EfficientNet-Lite (Tan and Le 2019; Google's TF Lite variants of 2020) is EfficientNet without
squeeze-and-excitation, with ReLU6 instead of swish, and with the stem (32 filters) and the
head (1280 filters) not scaled with width: mobile inverted bottleneck blocks (1x1 expansion,
depthwise kxk, 1x1 projection, a residual when shape allows), TensorFlow's "SAME" padding
(the extra row/column of a stride-2 convolution goes bottom/right), BatchNorm with epsilon 1e-3.
Its parameters match the published ImageNet checkpoints (`rare_jax.models.pretrained`).

Depthwise convolutions: XLA:CPU runs a grouped convolution (`feature_group_count` = channels)
very slowly (measured 2026-12-02 on 2 cores, Lite0 shapes at 64x64, batch 64: forward 74 img/s,
train 20 img/s). Written as k*k shifted multiply-adds it ran at 1,000 / 118 img/s. The
gradient of the shifted form is slow on the small maps of the last blocks (the transpose of
each of the k*k slices is a padded copy): on a 3x3 map of 1152 channels, batch 128, 592 ms
against 51 ms for the same convolution written as one dense `[out positions, in positions]`
matrix per channel ("dense", an einsum; forward 23 vs 18 ms; 2-core CPU, shared, 2026-12-02).
`depthwise` chooses: "native" (the grouped convolution, for accelerators), "shifted",
"dense", or "auto" (on the CPU backend dense for maps of at most `DENSE_MAX_POSITIONS`
positions, shifted for larger ones; native elsewhere). All have the same parameters and give
the same values up to float rounding (tests/test_pretrained.py).

Padding rows: as in `resnet.py`, `__call__` takes an optional example `mask` [B]; in training
BatchNorm statistics come from the real examples only. Drop-connect is not applied (the
deep updates fine-tune for a few epochs; deterministic steps keep replays exact).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# (repeats, kernel, stride, expansion, input filters, output filters) of EfficientNet-B0,
# which the Lite family shares.
_BLOCKS = (
  (1, 3, 1, 1, 32, 16),
  (2, 3, 2, 6, 16, 24),
  (2, 5, 2, 6, 24, 40),
  (3, 3, 2, 6, 40, 80),
  (3, 5, 1, 6, 80, 112),
  (4, 5, 2, 6, 112, 192),
  (1, 3, 1, 6, 192, 320),
)
DEPTHWISE_MODES = ("auto", "native", "shifted", "dense")
# "auto" on the CPU: the dense form up to this many input positions (4x4). Measured at 6x6 it
# trained 9x faster but ran forward 1.4x slower, and frozen blocks only run forward.
DENSE_MAX_POSITIONS = 16


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """EfficientNet's width scaling: to a multiple of `divisor`, never 10% below the target."""
  target = filters * width
  rounded = max(divisor, int(target + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * target:
    rounded += divisor
  return int(rounded)


def block_specs(width: float, depth: float) -> list[tuple[int, int, int, int, int]]:
  """Per block: (kernel, stride, expansion, input filters, output filters), Lite rules.

  The first and last groups keep their repeats (Lite's fixed stem and head), and the first
  block reads the fixed 32-filter stem.
  """
  specs = []
  for group, (repeats, kernel, stride, expand, filters_in, filters_out) in enumerate(_BLOCKS):
    filters_in = 32 if group == 0 else round_filters(filters_in, width)
    filters_out = round_filters(filters_out, width)
    if 0 < group < len(_BLOCKS) - 1:
      repeats = int(math.ceil(depth * repeats))
    for i in range(repeats):
      specs.append((kernel, stride if i == 0 else 1, expand, filters_in, filters_out))
      filters_in = filters_out
  return specs


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def depthwise_shifted(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """Depthwise convolution with "SAME" padding as k*k strided slices times per-channel weights.

  Args:
    x: `[B, H, W, C]`.
    kernel: `[k, k, 1, C]` (Flax's layout for `feature_group_count=C`).
    stride: the same in both spatial dimensions.
  """
  k_h, k_w = kernel.shape[:2]
  height, width = x.shape[1:3]
  pad_h, pad_w = _same_pads(height, k_h, stride), _same_pads(width, k_w, stride)
  x = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
  out_h, out_w = -(-height // stride), -(-width // stride)
  out = None
  for i in range(k_h):
    for j in range(k_w):
      window = lax.slice(
        x,
        (0, i, j, 0),
        (x.shape[0], i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, x.shape[3]),
        (1, stride, stride, 1),
      )
      term = window * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def _depthwise_taps(height, width, k_h, k_w, stride) -> np.ndarray:
  """`[out_h * out_w, height * width]` int: the kernel tap `i * k_w + j` that joins output
  position p and input position q under "SAME" padding, `k_h * k_w` where none does."""
  pad_h, pad_w = _same_pads(height, k_h, stride)[0], _same_pads(width, k_w, stride)[0]
  out_h, out_w = -(-height // stride), -(-width // stride)
  taps = np.full((out_h * out_w, height * width), k_h * k_w, np.int32)
  for oy in range(out_h):
    for ox in range(out_w):
      for i in range(k_h):
        for j in range(k_w):
          y, x = oy * stride + i - pad_h, ox * stride + j - pad_w
          if 0 <= y < height and 0 <= x < width:
            taps[oy * out_w + ox, y * width + x] = i * k_w + j
  return taps


def depthwise_dense(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """Depthwise convolution with "SAME" padding as one dense spatial matrix per channel.

  `out[b, p, c] = sum_q x[b, q, c] * M[p, q, c]` with `M` gathered from the kernel's taps
  (zero where the window of output p misses input q): `[P_out, P_in, C]` numbers, so only for
  small maps; its gradient is two einsums, unlike the shifted form's k*k padded copies.

  Args:
    x: `[B, H, W, C]`.
    kernel: `[k, k, 1, C]` (Flax's layout for `feature_group_count=C`).
    stride: the same in both spatial dimensions.
  """
  batch, height, width, channels = x.shape
  k_h, k_w = kernel.shape[:2]
  taps = _depthwise_taps(height, width, k_h, k_w, stride)
  flat = kernel.reshape(k_h * k_w, channels)
  flat = jnp.concatenate([flat, jnp.zeros((1, channels), flat.dtype)])  # the "no tap" row
  out = jnp.einsum("bqc,pqc->bpc", x.reshape(batch, height * width, channels), flat[taps])
  return out.reshape(batch, -(-height // stride), -(-width // stride), channels)


class DepthwiseConv(nn.Module):
  """A depthwise kxk convolution without bias ("SAME" padding): native, shifted or dense."""

  kernel_size: int
  stride: int = 1
  mode: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.mode not in DEPTHWISE_MODES:
      raise ValueError(f"depthwise mode must be one of {DEPTHWISE_MODES}, got {self.mode!r}")
    channels = x.shape[-1]
    kernel = self.param(
      "kernel",
      nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
      (self.kernel_size, self.kernel_size, 1, channels),
      self.param_dtype,
    )
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    mode = self.mode
    if mode == "auto":
      if jax.default_backend() != "cpu":
        mode = "native"
      else:
        mode = "dense" if x.shape[1] * x.shape[2] <= DENSE_MAX_POSITIONS else "shifted"
    if mode == "shifted":
      return depthwise_shifted(x, kernel, self.stride)
    if mode == "dense":
      return depthwise_dense(x, kernel, self.stride)
    return lax.conv_general_dilated(
      x,
      kernel,
      window_strides=(self.stride, self.stride),
      padding="SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=channels,
    )


class MBConvBlock(nn.Module):
  """Mobile inverted bottleneck without squeeze-excitation (Lite): expand, depthwise, project."""

  kernel_size: int
  stride: int
  expansion: int
  filters_in: int
  filters_out: int
  conv: Any
  norm: Any
  depthwise: Any

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    inputs = x
    if self.expansion != 1:
      x = self.conv(self.filters_in * self.expansion, (1, 1), name="expand_conv")(x)
      x = jnp.clip(self.norm(name="expand_bn")(x, mask=mask), 0, 6)
    x = self.depthwise(self.kernel_size, self.stride, name="depthwise_conv")(x)
    x = jnp.clip(self.norm(name="depthwise_bn")(x, mask=mask), 0, 6)
    x = self.conv(self.filters_out, (1, 1), name="project_conv")(x)
    x = self.norm(name="project_bn")(x, mask=mask)
    if self.stride == 1 and self.filters_in == self.filters_out:
      x = x + inputs
    return x


PARTS = ("all", "frozen", "trainable")


class EfficientNetLite(nn.Module):
  """An EfficientNet-Lite trunk: `__call__(x [B,H,W,C], train, mask=None) -> [B, 1280]` (f32).

  Attributes:
    width, depth: the compound-scaling coefficients (Lite0 1.0/1.0, Lite1 1.0/1.1, Lite2
      1.1/1.2).
    depthwise: "auto", "native" or "shifted" (see the module docstring).
    dtype: compute dtype; parameters are `param_dtype`.
  """

  width: float = 1.0
  depth: float = 1.0
  depthwise: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  # The stem and the first `frozen_blocks` blocks are frozen: BatchNorm uses its running
  # statistics even in training and no gradient flows into them (see `frozen_modules`).
  frozen_blocks: int = 0
  # Every BatchNorm uses its running statistics, also in training (the pretrained ones), so
  # training sees the embedding that evaluation and the cached features see.
  freeze_batchnorm: bool = False
  # Which part of the network a call runs: "all" (images -> embedding), "frozen" (images ->
  # the output of the stem and the frozen blocks, a constant function of the image) or
  # "trainable" (that output -> embedding). "frozen" then "trainable" equals "all"; the split
  # lets a deep update compute the frozen part once per image (`deep.FrozenActivations`).
  part: str = "all"

  embedding_dim = 1280

  def frozen_modules(self) -> frozenset[str]:
    """Names of the frozen submodules, whose parameters an optimizer must leave unchanged."""
    if self.frozen_blocks == 0:
      return frozenset()
    return frozenset(["stem_conv", "stem_bn"] + [f"block{i}" for i in range(self.frozen_blocks)])

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None):
    if x.ndim != 4:
      raise ValueError(f"EfficientNetLite expects NHWC images [B, H, W, C], got shape {x.shape}")
    if self.part not in PARTS:
      raise ValueError(f"part must be one of {PARTS}, got {self.part!r}")
    if self.part != "all" and self.frozen_blocks == 0:
      raise ValueError(f"part={self.part!r} needs frozen_blocks >= 1 (nothing is frozen)")
    conv = functools.partial(
      nn.Conv,
      use_bias=False,
      padding="SAME",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
    )
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train or self.freeze_batchnorm,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    depthwise = functools.partial(
      DepthwiseConv, mode=self.depthwise, dtype=self.dtype, param_dtype=self.param_dtype
    )
    bn_mask = None
    if mask is not None and train:
      if mask.shape != x.shape[:1]:
        raise ValueError(f"mask must have shape {x.shape[:1]} (one per image), got {mask.shape}")
      mask = mask.astype(bool)
      mask = jnp.where(jnp.any(mask), mask, True)  # all padding: avoid 0/0 statistics
      bn_mask = mask[:, None, None, None]

    specs = block_specs(self.width, self.depth)
    if not 0 <= self.frozen_blocks <= len(specs):
      raise ValueError(f"frozen_blocks must be in [0, {len(specs)}], got {self.frozen_blocks}")
    frozen_norm = functools.partial(norm, use_running_average=True)
    x = x.astype(self.dtype)
    if self.part != "trainable":
      x = conv(32, (3, 3), (2, 2), name="stem_conv")(x)
      stem_norm = frozen_norm if self.frozen_blocks else norm
      x = stem_norm(name="stem_bn")(x, mask=None if self.frozen_blocks else bn_mask)
      x = jnp.clip(x, 0, 6)
    for i, (kernel, stride, expand, filters_in, filters_out) in enumerate(specs):
      frozen = i < self.frozen_blocks
      if self.part == "trainable" and frozen:
        continue
      if self.part == "frozen" and not frozen:
        return x
      x = MBConvBlock(
        kernel,
        stride,
        expand,
        filters_in,
        filters_out,
        conv=conv,
        norm=frozen_norm if frozen else norm,
        depthwise=depthwise,
        name=f"block{i}",
      )(x, None if frozen else bn_mask)
      if i + 1 == self.frozen_blocks:
        x = lax.stop_gradient(x)
    if self.part == "frozen":  # every block frozen
      return x
    x = conv(self.embedding_dim, (1, 1), name="head_conv")(x)
    x = jnp.clip(norm(name="head_bn")(x, mask=bn_mask), 0, 6)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def efficientnet_lite0(*, dtype: Any = jnp.float32, **kwargs) -> EfficientNetLite:
  """EfficientNet-Lite0: 3.4M trunk parameters, 224x224 in the ImageNet checkpoint."""
  return EfficientNetLite(width=1.0, depth=1.0, dtype=dtype, **kwargs)


def efficientnet_lite1(*, dtype: Any = jnp.float32, **kwargs) -> EfficientNetLite:
  """EfficientNet-Lite1: depth x1.1, 240x240 in the ImageNet checkpoint."""
  return EfficientNetLite(width=1.0, depth=1.1, dtype=dtype, **kwargs)


def efficientnet_lite2(*, dtype: Any = jnp.float32, **kwargs) -> EfficientNetLite:
  """EfficientNet-Lite2: width x1.1, depth x1.2, 260x260 in the ImageNet checkpoint."""
  return EfficientNetLite(width=1.1, depth=1.2, dtype=dtype, **kwargs)


# Inference only: BatchNorm folded into the convolutions (`fold_batchnorm`, `embed_folded`).
# Training, the deep updates' `embed` and every Flax path above are unchanged.


def fold_batchnorm(
  variables: dict[str, Any], *, epsilon: float = 1e-3, dtype: Any = jnp.float32
) -> dict[str, Any]:
  """A trunk's variables with every BatchNorm folded into the convolution before it.

  `bn(conv(x, w)) = conv(x, w * s) + (beta - mean * s)` with `s = gamma / sqrt(var + eps)`:
  one kernel and one bias per convolution, in float64 then cast to `dtype` (so float32
  folding rounds once; the result differs from the unfolded network by float rounding only).

  Args:
    variables: `{"params": {...}, "batch_stats": {...}}` of an `EfficientNetLite` (the
      trunk's own, e.g. a `Classifier`'s `variables["params"]["trunk"]` level).
    epsilon: the BatchNorm epsilon (`EfficientNetLite.bn_epsilon`).
    dtype: the folded arrays' dtype.

  Returns:
    `{layer path: {"kernel", "bias"}}` with paths like "stem", "block3/expand", "head" (the
    layers `variables` has).
  """
  params, stats = variables["params"], variables["batch_stats"]

  def fold(conv, bn):
    kernel = np.asarray(conv["kernel"], np.float64)
    scale = np.asarray(bn["scale"], np.float64) / np.sqrt(
      np.asarray(bn["var"], np.float64) + epsilon
    )
    bias = np.asarray(bn["bias"], np.float64) - np.asarray(bn["mean"], np.float64) * scale
    return {"kernel": jnp.asarray(kernel * scale, dtype), "bias": jnp.asarray(bias, dtype)}

  out = {}
  for name, conv in (("stem", "stem_conv"), ("head", "head_conv")):
    if conv in params:  # (a trunk initialised as one part has only that part's layers)
      bn = f"{name}_bn"
      out[name] = fold(params[conv], {**params[bn], **stats[bn]})
  for name in sorted(k for k in params if k.startswith("block")):
    block, block_stats = params[name], stats[name]
    for part in ("expand", "depthwise", "project"):
      if f"{part}_conv" in block:
        bn = {**block[f"{part}_bn"], **block_stats[f"{part}_bn"]}
        out[f"{name}/{part}"] = fold(block[f"{part}_conv"], bn)
  return out


def _pointwise(x: jax.Array, layer: dict[str, jax.Array], matmul_dtype: Any) -> jax.Array:
  """A 1x1 convolution plus bias, as one matrix product over all positions (its operands in
  `matmul_dtype`, accumulated and returned in `x.dtype`)."""
  kernel = layer["kernel"].reshape(layer["kernel"].shape[-2:]).astype(matmul_dtype)
  out = jnp.einsum("bhwc,cd->bhwd", x.astype(matmul_dtype), kernel, preferred_element_type=x.dtype)
  return out + layer["bias"].astype(x.dtype)


def _depthwise(x: jax.Array, layer: dict[str, jax.Array], stride: int, mode: str) -> jax.Array:
  """A depthwise convolution plus bias in `mode` ("auto": as `DepthwiseConv` picks)."""
  if mode == "auto":
    if jax.default_backend() != "cpu":
      mode = "native"
    else:
      mode = "dense" if x.shape[1] * x.shape[2] <= DENSE_MAX_POSITIONS else "shifted"
  kernel = layer["kernel"].astype(x.dtype)
  if mode == "shifted":
    out = depthwise_shifted(x, kernel, stride)
  elif mode == "dense":
    out = depthwise_dense(x, kernel, stride)
  else:
    out = lax.conv_general_dilated(
      x,
      kernel,
      window_strides=(stride, stride),
      padding="SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1],
    )
  return out + layer["bias"].astype(x.dtype)


def embed_folded(
  folded: dict[str, Any],
  x: jax.Array,
  *,
  width: float = 1.0,
  depth: float = 1.0,
  depthwise: str = "auto",
  dtype: Any = jnp.float32,
  matmul_dtype: Any = None,
  part: str = "all",
  frozen_blocks: int = 0,
) -> jax.Array:
  """The trunk's embedding `[B, 1280]` (float32) with folded BatchNorm (`fold_batchnorm`).

  Equals `EfficientNetLite(width, depth, depthwise=depthwise, frozen_blocks=frozen_blocks,
  part=part)(x, train=False)` up to float rounding (tests/test_embed_speed.py): `part="frozen"`
  returns the output of the stem and the first `frozen_blocks` blocks, `"trainable"` reads
  that output and runs the rest. Pointwise convolutions are matrix products.
  """
  if depthwise not in DEPTHWISE_MODES:
    raise ValueError(f"depthwise mode must be one of {DEPTHWISE_MODES}, got {depthwise!r}")
  specs = block_specs(width, depth)
  if part not in PARTS:
    raise ValueError(f"part must be one of {PARTS}, got {part!r}")
  if part != "all" and not 1 <= frozen_blocks <= len(specs):
    raise ValueError(f"part={part!r} needs frozen_blocks in [1, {len(specs)}], got {frozen_blocks}")
  relu6 = functools.partial(jnp.clip, min=0, max=6)
  matmul_dtype = dtype if matmul_dtype is None else matmul_dtype
  x = x.astype(dtype)
  if part != "trainable":
    stem = folded["stem"]
    with jax.named_scope("stem"):
      x = lax.conv_general_dilated(
        x,
        stem["kernel"].astype(dtype),
        window_strides=(2, 2),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )
      x = relu6(x + stem["bias"].astype(dtype))
  for i, (_, stride, expand, filters_in, filters_out) in enumerate(specs):
    if part == "trainable" and i < frozen_blocks:
      continue
    if part == "frozen" and i >= frozen_blocks:
      return x
    inputs = x
    if expand != 1:
      with jax.named_scope(f"block{i}/expand"):
        x = relu6(_pointwise(x, folded[f"block{i}/expand"], matmul_dtype))
    with jax.named_scope(f"block{i}/depthwise"):
      x = relu6(_depthwise(x, folded[f"block{i}/depthwise"], stride, depthwise))
    with jax.named_scope(f"block{i}/project"):
      x = _pointwise(x, folded[f"block{i}/project"], matmul_dtype)
      if stride == 1 and filters_in == filters_out:
        x = x + inputs
  if part == "frozen":  # every block frozen
    return x
  with jax.named_scope("head"):
    x = relu6(_pointwise(x, folded["head"], matmul_dtype))
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
