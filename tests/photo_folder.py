"""A small folder of real photographs for the browser test and the README screenshot: seeded
random crops of the photos that scikit-image (astronaut, chelsea the cat, coffee, rocket, ...)
and scikit-learn (china, flower) ship, one sub-folder per photo, plus seed folders of other
crops of the cat and of the rocket. No download: both packages bundle the files."""

import os

import numpy as np
from PIL import Image


def _photos() -> dict[str, np.ndarray]:
  import skimage.data
  from sklearn.datasets import load_sample_images

  photos = {
    "astronaut": skimage.data.astronaut(),
    "cat": skimage.data.chelsea(),
    "coffee": skimage.data.coffee(),
    "rocket": skimage.data.rocket(),
  }
  china, flower = load_sample_images().images
  photos["china"], photos["flower"] = china, flower
  return photos


def _crop(photo: np.ndarray, rng: np.random.Generator, size: int) -> Image.Image:
  height, width = photo.shape[:2]
  side = int(rng.uniform(0.45, 0.8) * min(height, width))
  top = int(rng.integers(0, height - side + 1))
  left = int(rng.integers(0, width - side + 1))
  image = Image.fromarray(np.ascontiguousarray(photo[top : top + side, left : left + side, :3]))
  return image.resize((size, size), Image.Resampling.LANCZOS)


def write_photo_folder(
  out, *, per_photo: int = 12, num_seeds: int = 3, size: int = 96, seed: int = 0
):
  """Writes OUT/images/<photo>/<photo>_<k>.jpg and OUT/seeds/{cat,rocket}/ (crops not in the
  folder); returns (images dir, {"cat": seed dir, "rocket": seed dir}). Another `seed` gives
  other crops (a new folder to score)."""
  rng = np.random.default_rng(seed)
  images = os.path.join(out, "images")
  seeds = {}
  for name, photo in _photos().items():
    os.makedirs(os.path.join(images, name), exist_ok=True)
    for k in range(per_photo):
      _crop(photo, rng, size).save(os.path.join(images, name, f"{name}_{k:02d}.jpg"), quality=90)
    if name in ("cat", "rocket"):
      seeds[name] = os.path.join(out, "seeds", name)
      os.makedirs(seeds[name], exist_ok=True)
      for k in range(num_seeds):
        _crop(photo, rng, size).save(os.path.join(seeds[name], f"seed_{k}.jpg"), quality=90)
  return images, seeds
