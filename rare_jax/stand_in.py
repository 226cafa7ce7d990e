"""A stand-in embedding: PCA of pixels, fitted on the related-domain split.

Until `M_pre` exists for a run (see `rare_jax.pretrain`), the loop can run end to end on these
features. They are deterministic (PCA by SVD of the centred related-domain images) and much
weaker than a trained network's: use them for quick runs and tests, not for paper figures.
"""

from __future__ import annotations

import numpy as np


def pixel_pca_features(
  fit_images: np.ndarray, *images: np.ndarray, dim: int = 64
) -> list[np.ndarray]:
  """Projects `images` onto the top `dim` principal components of `fit_images`.

  Args:
    fit_images: `[N, H, W, C]` uint8 images the PCA is fitted on (the related domain).
    *images: arrays of the same image shape to project (e.g. the pool, the validation set).
    dim: number of components.

  Returns:
    One float32 `[n, dim]` array per entry of `images`.
  """
  if fit_images.ndim != 4:
    raise ValueError(f"fit_images must be [N, H, W, C], got shape {fit_images.shape}")
  pixels = fit_images.shape[1] * fit_images.shape[2] * fit_images.shape[3]
  if not 1 <= dim <= min(pixels, len(fit_images)):
    raise ValueError(f"dim must be in [1, {min(pixels, len(fit_images))}], got {dim}")
  flat = fit_images.reshape(len(fit_images), -1).astype(np.float64) / 255.0
  mean = flat.mean(axis=0)
  _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
  components = vt[:dim]
  # Fix the sign of each component so the result does not depend on the LAPACK build.
  components *= np.where(components[np.arange(dim), np.abs(components).argmax(1)] < 0, -1, 1)[
    :, None
  ]
  out = []
  for array in images:
    if array.shape[1:] != fit_images.shape[1:]:
      raise ValueError(
        f"images to project must have shape [n, {fit_images.shape[1:]}], got {array.shape}"
      )
    projected = (array.reshape(len(array), -1).astype(np.float64) / 255.0 - mean) @ components.T
    out.append(projected.astype(np.float32))
  return out
