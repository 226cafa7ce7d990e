"""A stand-in embedding: PCA of pixels, fitted on the related-domain split.

Until `M_pre` exists for a run (config.features = "m_pre", see `rare_jax.pretrain`), the loop can
run end to end on these features. They are deterministic (PCA by SVD of the centred images) and
much weaker than a trained network's: use them for quick runs and tests, not for paper figures.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np


@dataclasses.dataclass(frozen=True)
class PixelProjection:
  """The pixel-PCA projection `(pixels / 255 - mean) @ components.T`, fitted by SVD.

  Kept (and saved) so that new images can be projected later without the images it was fitted
  on (folder runs, `rare_jax.predict`).
  """

  mean: np.ndarray  # float64 [H * W * C]
  components: np.ndarray  # float64 [D, H * W * C]
  image_shape: tuple[int, int, int]

  @classmethod
  def fit(cls, images: np.ndarray, dim: int) -> PixelProjection:
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ValueError(f"images of {images.dtype} {images.shape}; expected uint8 [N, H, W, C]")
    pixels = int(np.prod(images.shape[1:]))
    if not 1 <= dim <= min(pixels, len(images)):
      raise ValueError(f"dim must be in [1, {min(pixels, len(images))}], got {dim}")
    flat = images.reshape(len(images), -1).astype(np.float64) / 255.0
    mean = flat.mean(axis=0)
    _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
    components = vt[:dim]
    # Fix each component's sign so the result does not depend on the LAPACK build.
    components *= np.where(components[np.arange(dim), np.abs(components).argmax(1)] < 0, -1, 1)[
      :, None
    ]
    return cls(mean=mean, components=components, image_shape=tuple(images.shape[1:]))

  @property
  def dim(self) -> int:
    return self.components.shape[0]

  def project(self, images: np.ndarray) -> np.ndarray:
    """float32 [n, D] features of uint8 images [n, H, W, C] of `image_shape`."""
    if tuple(images.shape[1:]) != self.image_shape:
      raise ValueError(
        f"images to project of shape {images.shape}; expected [n, {self.image_shape}]"
      )
    flat = images.reshape(len(images), -1).astype(np.float64) / 255.0
    return ((flat - self.mean) @ self.components.T).astype(np.float32)

  def save(self, path: str) -> None:
    tmp = path + ".tmp.npz"
    np.savez(
      tmp, mean=self.mean, components=self.components, image_shape=np.array(self.image_shape)
    )
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> PixelProjection:
    with np.load(path) as data:
      return cls(
        mean=data["mean"],
        components=data["components"],
        image_shape=tuple(int(x) for x in data["image_shape"]),
      )


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
  projection = PixelProjection.fit(fit_images, dim)
  return [projection.project(array) for array in images]
