"""A tiny synthetic image task shared by the deep-model tests (not a test module)."""

import numpy as np


def synthetic_images(labels, seed):
  """8x8 grayscale images: class c lights a 2x2 block at its own place, plus noise."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 60, size=(len(labels), 8, 8, 1)).astype(np.uint8)
  for i, label in enumerate(labels):
    row, col = divmod(int(label), 4)
    images[i, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2, 0] = 230
  return images
