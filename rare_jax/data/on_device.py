"""Resize and normalisation of undecoded uint8 batches in JAX, for inside a jitted step.

The counterpart of `pipeline.iterate_batches(..., host_preprocess=False)`: the workers only
decode (and batch) images, and `preprocess` here does what `pipeline.preprocess` does on the
host: scale to [0, 1], resize (`jax.image.resize`, linear with antialiasing: the weights of
`pipeline.resize_matrix`), grayscale -> 3 channels, `(x - mean) / std`. Results agree with
the host's to float32 rounding (about 1e-6), not bit for bit, so a run keeps one of the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rare_jax.data import pipeline


def preprocess(
  images: jax.Array,
  *,
  image_size: int | Sequence[int] | None = None,
  channels: int | None = None,
  mean: float | Sequence[float] = 0.0,
  std: float | Sequence[float] = 1.0,
) -> jax.Array:
  """uint8 [B, H, W, C] -> float32 [B, h, w, c]; the options of `pipeline.preprocess`.

  Padding rows (zeros) come out as `-mean / std`, not zeros: consumers mask them.
  """
  mean = np.asarray(mean, dtype=np.float32)
  std = np.asarray(std, dtype=np.float32)
  if np.any(std <= 0):
    raise ValueError(f"std={std.tolist()}; expected positive values")
  if images.ndim != 4:
    raise ValueError(f"images of shape {images.shape}; expected [B, H, W, C]")
  x = images.astype(jnp.float32)
  size = pipeline.as_size(image_size)
  if size is not None:
    if tuple(x.shape[1:3]) != size:
      shape = (x.shape[0], int(size[0]), int(size[1]), x.shape[3])
      x = jax.image.resize(x, shape, method="linear", antialias=True)
  in_channels = x.shape[-1]
  out_channels = in_channels if channels is None else int(channels)
  if out_channels != in_channels:
    if in_channels != 1:
      raise ValueError(
        f"channels={channels} for images with {in_channels} channels; expected grayscale "
        "(1 channel) input to expand, or channels=None"
      )
    x = jnp.broadcast_to(x, (*x.shape[:-1], out_channels))
  try:
    scale = np.broadcast_to(np.float32(1 / 255) / std, (out_channels,))
    offset = np.broadcast_to(-mean / std, (out_channels,))
  except ValueError:
    raise ValueError(
      f"mean {mean.tolist()} / std {std.tolist()} for {out_channels} channels; expected "
      "scalars or one value per channel"
    ) from None
  return x * scale + offset
