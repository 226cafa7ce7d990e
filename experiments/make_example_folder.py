r"""Writes the example folder of the README's measurement, deterministically.

    python experiments/make_example_folder.py --out=runs/example_folder

From the embedded Fashion-MNIST (prepared by `make`; nothing is downloaded): `OUT/images/<class>/`
holds 150 training images of each of 7 common classes and 20 of each of the 3 rare ones
(Trouser, Sandal, Bag: 1.8% of the 1,110 images each), and `OUT/seeds/<class>/` 5 other
images of each rare class (examples from outside the pool). The sub-folder names are the
ground truth of `experiments/measure_folder_features.py`. Same arguments, same files (the
draw is seeded). Fashion-MNIST rather than photographs: scikit-image ships only about ten
colour photographs, too few for categories of 20 images plus a background.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags
from PIL import Image

if __package__ in (None, ""):  # run as a script: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rare_jax.data import sources  # noqa: E402

RARE = ("Trouser", "Sandal", "Bag")


def folder_name(class_name: str) -> str:
  return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in class_name)


def write(
  out: str,
  *,
  common_count: int = 150,
  rare_count: int = 20,
  num_seeds: int = 5,
  seed: int = 0,
  data_dir: str | None = None,
) -> tuple[str, dict[str, str]]:
  """Writes the folder; returns (the images folder, {rare class: its seeds folder})."""
  source = sources.open_source("rare_fashion_mnist", "train", data_dir)
  labels = source.labels()
  rng = np.random.default_rng(seed)
  images_dir = os.path.join(out, "images")
  seeds = {}
  for class_id, class_name in enumerate(source.class_names):
    name = folder_name(class_name)
    rare = name in RARE
    count = rare_count + num_seeds if rare else common_count
    ids = np.sort(rng.choice(np.flatnonzero(labels == class_id), count, replace=False))
    chosen = rng.permutation(len(ids))
    os.makedirs(os.path.join(images_dir, name), exist_ok=True)
    if rare:
      seeds[name] = os.path.join(out, "seeds", name)
      os.makedirs(seeds[name], exist_ok=True)
    for k, example in zip(chosen, source.__getitems__(ids), strict=True):
      array = example["image"]
      image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
      target = seeds[name] if rare and k < num_seeds else os.path.join(images_dir, name)
      image.save(os.path.join(target, f"{ids[k]:06d}.png"))
  return images_dir, seeds


def main(argv):
  del argv
  images, seeds = write(flags.FLAGS.out, data_dir=flags.FLAGS.data_dir)
  print(f"wrote {images} and seeds in {sorted(seeds.values())}")


if __name__ == "__main__":
  flags.DEFINE_string("out", "runs/example_folder", "Where to write images/ and seeds/.")
  flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: TFDS's default).")
  app.run(main)
