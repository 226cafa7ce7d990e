r"""Top-5 ImageNet classes of image files with a pretrained trunk: `python -m rare_jax.classify`.

    python -m rare_jax.classify --model=efficientnet_lite0 photo.jpg other.png
    python -m rare_jax.classify --model=resnet50 --init=/path/to/resnet50.pth photo.jpg

A quick check that weights loaded: for each image it prints the five most probable classes
with their probabilities. Images are decoded as everywhere in rare_jax
(`rare_jax.data.folder.decode_image`: JPEG/PNG, EXIF orientation applied, transparency on
white, at most `folder.MAX_IMAGE_PIXELS` pixels), resized (shorter side to image_size / 0.875,
bicubic) and center-cropped to the trunk's resolution, then normalised as its weights expect
(`rare_jax.models.pretrained`).

A file that cannot be classified (missing, not a regular file such as a FIFO, not a JPEG/PNG,
damaged, too many pixels) is reported on stderr by name and the others are still classified;
the exit status is then 1. An unknown `--model` or unusable `--init` weights are one line on
stderr, exit status 2.

One process only (a few images): it takes no multi-host flags.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from PIL import Image

from rare_jax.data import folder
from rare_jax.infra import cli_help
from rare_jax.infra.csvfile import printable
from rare_jax.models import pretrained

CROP_FRACTION = 0.875  # the usual ImageNet evaluation crop


def center_crop(image: Image.Image, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: shorter side to size / 0.875 (bicubic), then the center square."""
  image = image.convert("RGB")
  width, height = image.size
  scale = round(size / CROP_FRACTION) / min(width, height)
  # Only the center is kept: a very long image (1 x 100000) is first cut to its middle, so
  # the resize below makes at most about 4 x size by size / 0.875 pixels, not gigabytes.
  longest = math.ceil(4 * size / scale)
  if width > longest or height > longest:
    left, top = max(0, (width - longest) // 2), max(0, (height - longest) // 2)
    image = image.crop((left, top, left + min(width, longest), top + min(height, longest)))
    width, height = image.size
  image = image.resize(
    (max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC
  )
  width, height = image.size
  left, top = (width - size) // 2, (height - size) // 2
  return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def normalize(images: np.ndarray, trunk: pretrained.TrunkSpec) -> np.ndarray:
  """uint8 [B, H, W, 3] -> float32, scaled to [0, 1] then `(x - mean) / std` per channel."""
  x = np.asarray(images, np.float32) / 255.0
  return (x - np.asarray(trunk.mean, np.float32)) / np.asarray(trunk.std, np.float32)


def load_image(path: str) -> Image.Image:
  """The decoded RGB image at `path` (`folder.decode_image`: never blocks on a FIFO, bounded
  pixels); ValueError naming the file if it is missing, not a regular file or unreadable."""
  try:
    return folder.decode_image(path)
  except FileNotFoundError:
    raise ValueError(f"{path}: no such file") from None
  except folder.NotRegularFileError as error:
    raise ValueError(f"{path}: is {error.kind}, expected an image file") from None
  except Exception as error:  # PIL raises many types for a damaged file; each is reported
    raise ValueError(f"{path}: not a readable image ({error})") from None


class ImageNetClassifier:
  """A pretrained trunk with its ImageNet head, jitted once; `top_k(images)` per image."""

  def __init__(self, name: str, init: str = "imagenet"):
    self.trunk = pretrained.spec(name)
    self.model, self.variables = pretrained.load_classifier(name, init)
    self.names = pretrained.class_names()
    self._probs = jax.jit(lambda v, x: jax.nn.softmax(self.model.apply(v, x)["logits"], axis=-1))

  def probabilities(self, images: np.ndarray) -> np.ndarray:
    """float32 [B, 1000] class probabilities of uint8 crops [B, size, size, 3]."""
    x = jnp.asarray(normalize(images, self.trunk))
    return np.asarray(self._probs(self.variables, x))

  def top_k(self, images: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
    """Per image, the `k` most probable (class name, probability), most probable first."""
    probs = self.probabilities(images)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
      [(self.names[i], float(p[i])) for i in row] for p, row in zip(probs, order, strict=True)
    ]


def classify_files(paths: Sequence[str], *, model: str, init: str = "imagenet", top: int = 5):
  """Prints the `top` classes of each image file; returns the exit status: 0, 1 if an image
  could not be classified (the others are), 2 for an unknown model or unusable weights."""
  try:
    classifier = ImageNetClassifier(model, init)
  except ValueError as error:
    print(f"error: {printable(str(error))}", file=sys.stderr)
    return 2
  size = classifier.trunk.image_size
  failed = 0
  for path in paths:
    try:
      crop = center_crop(load_image(path), size)
    except ValueError as error:
      print(f"error: {printable(str(error))}", file=sys.stderr)
      failed += 1
      continue
    (best,) = classifier.top_k(crop[None], k=top)
    print(printable(path))
    for name, prob in best:
      print(f"  {prob:6.1%}  {name}")
  return 1 if failed else 0


def main(argv: Sequence[str]) -> int:
  logging.set_verbosity(logging.WARNING)  # JAX's backend probing logs at INFO
  paths = list(argv[1:])
  if not paths:
    raise app.UsageError("give one or more image files: python -m rare_jax.classify IMAGE...")
  return classify_files(paths, model=flags.FLAGS.model, init=flags.FLAGS.init, top=flags.FLAGS.top)


def run():
  # Flags are defined when the command runs, not on import (see rare_jax.export).
  flags.DEFINE_string(
    "model", "efficientnet_lite0", "Pretrained trunk: " + ", ".join(sorted(pretrained.PRETRAINED))
  )
  flags.DEFINE_string(
    "init", "imagenet", "'imagenet' (the packaged weights) or a .pth / .safetensors file."
  )
  flags.DEFINE_integer("top", 5, "How many classes to print per image.", lower_bound=1)
  cli_help.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
