"""Batches of preprocessed images by index list: fixed shapes, deterministic order, on grain.

`iterate_batches(data, ids, batch_size=...)` yields, in the order of `ids`,
`{"image": float32[B, H, W, C], "mask": bool[B], "index": int64[B], "label": int64[B]}`.
Every batch has the same shape: the last one is padded (mask False, index and label -1,
image zeros) instead of dropped, so a jitted consumer compiles once. Batch i is element i of
a grain `MapDataset` (`batch_dataset`); `iterate_batches` reads it with a prefetching thread
or grain's spawned worker processes (batch i from worker i % n, so the output is identical
for any worker count), and its iterator's `get_state()` resumes at the next batch.
Preprocessing is plain NumPy: uint8 -> [0, 1], optional resize (linear with antialiasing,
the same weights as `jax.image.resize(..., "linear")`), optional grayscale -> 3 channels,
then `(x - mean) / std`. With `host_preprocess=False` the batches keep the decoded uint8
images and `rare_jax.data.on_device.preprocess` does the rest inside the consumer's jit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def num_batches(num_ids: int, batch_size: int) -> int:
  """How many (padded) batches `iterate_batches` yields for `num_ids` ids."""
  return -(-num_ids // batch_size)


@functools.lru_cache(maxsize=64)
def resize_matrix(input_size: int, output_size: int) -> np.ndarray:
  """float32 [output_size, input_size]: linear resize along one axis, antialiased when
  shrinking; the weights of `jax.image.resize(method="linear")`."""
  inv_scale = input_size / output_size
  kernel_scale = max(inv_scale, 1.0)  # Widen the kernel to low-pass filter when shrinking.
  sample = (np.arange(output_size, dtype=np.float64) + 0.5) * inv_scale - 0.5
  distance = np.abs(sample[:, None] - np.arange(input_size, dtype=np.float64)[None, :])
  weights = np.maximum(0.0, 1.0 - distance / kernel_scale)
  total = weights.sum(axis=1, keepdims=True)
  weights = np.where(total > 0, weights / np.where(total > 0, total, 1.0), 0.0)
  return weights.astype(np.float32)


def resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Resizes float images [B, H, W, C] to [B, size[0], size[1], C] (see `resize_matrix`)."""
  height, width = images.shape[1:3]
  if (height, width) == tuple(size):
    return images
  rows = resize_matrix(height, size[0])
  cols = resize_matrix(width, size[1])
  return np.einsum("oh,bhwc,pw->bopc", rows, images, cols, optimize=True).astype(np.float32)


def as_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
  """`image_size` as (height, width), None kept; ValueError for anything else."""
  if image_size is None:
    return None
  size = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
  if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
    raise ValueError(f"image_size={image_size!r}; expected a positive int or (height, width)")
  return int(size[0]), int(size[1])


def preprocess(
  images: np.ndarray,
  *,
  image_size: int | Sequence[int] | None = None,
  channels: int | None = None,
  mean: float | Sequence[float] = 0.0,
  std: float | Sequence[float] = 1.0,
) -> np.ndarray:
  """uint8 [B, H, W, C] -> float32 [B, h, w, c]: scale to [0, 1], resize, channels, normalise.

  Args:
    images: uint8 images of one shape.
    image_size: output (height, width) or an int for square; None keeps the size.
    channels: None keeps C; 3 repeats a grayscale channel (for ImageNet-style models).
    mean: subtracted after scaling to [0, 1] (scalar or per channel).
    std: divided by after subtracting the mean (scalar or per channel).
  """
  mean = np.asarray(mean, dtype=np.float32)
  std = np.asarray(std, dtype=np.float32)
  if np.any(std <= 0):
    raise ValueError(f"std={std.tolist()}; expected positive values")
  x = np.asarray(images, dtype=np.float32)
  size = as_size(image_size)
  if size is not None:
    x = resize(x, size)  # Linear, weights summing to 1: commutes with the affine map below.
  in_channels = x.shape[-1]
  out_channels = in_channels if channels is None else channels
  if out_channels != in_channels and in_channels != 1:
    raise ValueError(
      f"channels={channels} for images with {in_channels} channels; expected grayscale "
      "(1 channel) input to expand, or channels=None"
    )
  try:
    scale = np.broadcast_to(np.float32(1 / 255) / std, (out_channels,))
    offset = np.broadcast_to(-mean / std, (out_channels,))
  except ValueError:
    raise ValueError(
      f"mean {mean.tolist()} / std {std.tolist()} for {out_channels} channels; expected "
      "scalars or one value per channel"
    ) from None
  # (x / 255 - mean) / std, channel by channel: NumPy broadcasting over a last axis of 3 is
  # about 10x slower than these contiguous reads and strided writes.
  out = np.empty((*x.shape[:-1], out_channels), dtype=np.float32)
  for c in range(out_channels):
    np.multiply(x[..., 0 if in_channels == 1 else c], scale[c], out=out[..., c])
    out[..., c] += offset[c]
  return out


def _read(data, batch_ids: np.ndarray) -> tuple[list[np.ndarray] | np.ndarray, np.ndarray]:
  """(uint8 images, int64 labels) of `batch_ids` from arrays or a source."""
  if isinstance(data, tuple):
    images, labels = data
    return images[batch_ids], (
      labels[batch_ids] if labels is not None else -np.ones_like(batch_ids)
    )
  examples = data.__getitems__(batch_ids)
  return [e["image"] for e in examples], np.asarray([e["label"] for e in examples], np.int64)


def make_batch(data, batch_ids: np.ndarray, *, batch_size: int, **options) -> dict[str, np.ndarray]:
  """One padded batch of `batch_ids` (at most `batch_size`); options go to `preprocess`."""
  images, labels = _read(data, batch_ids)
  if isinstance(images, list):
    shapes = {image.shape for image in images}
    if len(shapes) == 1:
      images = np.stack(images)
    elif options.get("image_size") is None:
      raise ValueError(
        f"images of batch have shapes {sorted(shapes)}; expected one shape, or pass image_size"
      )
    else:  # Resize one by one; then all share image_size.
      images = np.concatenate([preprocess(image[None], **options) for image in images])
  if images.dtype == np.uint8:
    images = preprocess(images, **options)
  count = len(batch_ids)
  if count == batch_size:
    out = np.ascontiguousarray(images, dtype=np.float32)
  else:
    out = np.zeros((batch_size, *images.shape[1:]), dtype=np.float32)
    out[:count] = images
  mask = np.arange(batch_size) < count
  index = np.full(batch_size, -1, dtype=np.int64)
  index[:count] = batch_ids
  label = np.full(batch_size, -1, dtype=np.int64)
  label[:count] = labels
  return {"image": out, "mask": mask, "index": index, "label": label}


def _normalise_data(source_or_arrays):
  if isinstance(source_or_arrays, np.ndarray):
    return (source_or_arrays, None), len(source_or_arrays)
  if isinstance(source_or_arrays, (tuple, list)):
    if len(source_or_arrays) != 2:
      raise ValueError(
        f"got a {type(source_or_arrays).__name__} of {len(source_or_arrays)} "
        "items; expected (images uint8[N, H, W, C], labels int[N])"
      )
    images, labels = (np.asarray(a) for a in source_or_arrays)
    if images.ndim != 4 or images.dtype != np.uint8 or len(labels) != len(images):
      raise ValueError(
        f"arrays of shapes {images.shape} ({images.dtype}) and {labels.shape}; expected "
        "images uint8[N, H, W, C] and labels [N]"
      )
    return (images, labels), len(images)
  if not hasattr(source_or_arrays, "__getitems__"):
    raise ValueError(
      f"got {type(source_or_arrays).__name__}; expected a Source (open_source) or "
      "(images, labels) arrays"
    )
  return source_or_arrays, len(source_or_arrays)


class _BatchMaker:
  """Batch `i` of `chunks` (a picklable grain map: spawned workers unpickle it)."""

  def __init__(self, data, chunks, batch_size, options, host_preprocess):
    self.data = data
    self.chunks = chunks
    self.batch_size = batch_size
    self.options = options
    self.host_preprocess = host_preprocess

  def __call__(self, i: int) -> dict[str, np.ndarray]:
    chunk = self.chunks[int(i)]
    if self.host_preprocess:
      return make_batch(self.data, chunk, batch_size=self.batch_size, **self.options)
    return make_raw_batch(self.data, chunk, batch_size=self.batch_size)


def make_raw_batch(data, batch_ids: np.ndarray, *, batch_size: int) -> dict[str, np.ndarray]:
  """`make_batch` without preprocessing: the decoded uint8 images, padded with zeros; for
  `rare_jax.data.on_device.preprocess` in the consumer's jitted step."""
  images, labels = _read(data, batch_ids)
  if isinstance(images, list):
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
      raise ValueError(
        f"images of batch have shapes {sorted(shapes)}; expected one shape for undecoded "
        "batches (host_preprocess=True resizes them on the host)"
      )
    images = np.stack(images)
  count = len(batch_ids)
  out = np.zeros((batch_size, *images.shape[1:]), dtype=np.uint8)
  out[:count] = images
  mask = np.arange(batch_size) < count
  index = np.full(batch_size, -1, dtype=np.int64)
  index[:count] = batch_ids
  label = np.full(batch_size, -1, dtype=np.int64)
  label[:count] = labels
  return {"image": out, "mask": mask, "index": index, "label": label}


def batch_dataset(
  source_or_arrays,
  ids: Sequence[int] | np.ndarray,
  *,
  batch_size: int,
  image_size: int | Sequence[int] | None = None,
  channels: int | None = None,
  mean: float | Sequence[float] = 0.0,
  std: float | Sequence[float] = 1.0,
  host_preprocess: bool = True,
) -> grain.MapDataset:
  """The padded batches of `iterate_batches` as a grain `MapDataset` (element i = batch i)."""
  data, size = _normalise_data(source_or_arrays)
  ids = np.asarray(ids, dtype=np.int64).reshape(-1)
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r}; expected a positive int")
  if ids.size and (ids.min() < 0 or ids.max() >= size):
    bad = ids[(ids < 0) | (ids >= size)][0]
    raise ValueError(f"id {bad} out of range; expected 0 <= id < {size} (the data's length)")
  options = {"image_size": as_size(image_size), "channels": channels, "mean": mean, "std": std}
  if host_preprocess and np.any(np.asarray(std, dtype=np.float32) <= 0):
    raise ValueError(f"std={np.asarray(std).tolist()}; expected positive values")
  chunks = [ids[start : start + batch_size] for start in range(0, len(ids), batch_size)]
  maker = _BatchMaker(data, chunks, int(batch_size), options, host_preprocess)
  return grain.MapDataset.range(len(chunks)).map(maker)


def _let_grain_read_its_flag() -> None:
  """grain 0.2.18's `mp_prefetch` reads the absl flag `grain_enable_multiprocess_worker_profiling`,
  which raises before flags are parsed (pytest, scripts without absl.app). Marking that one
  flag present keeps its default, as grain's own workers do for their flags."""
  name = "grain_enable_multiprocess_worker_profiling"
  if not flags.FLAGS.is_parsed() and name in flags.FLAGS:
    flags.FLAGS[name].present = True


class BatchIterator:
  """Iterates a grain pipeline of batches; checks they share one shape.

  `get_state()` is `{"next_batch": k}` (JSON-able): `set_state` on a new iterator over the same
  ids resumes at batch k with any worker count (grain's own iterator state depends on the
  pipeline's structure, hence on the worker count, so it is not what gets saved).
  """

  def __init__(self, dataset: grain.MapDataset, start: Callable[[grain.MapDataset], Any]):
    self._dataset = dataset
    self._start = start
    self._next = 0
    self._iterator = None
    self._shape = None

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._start(self._dataset[self._next :])
    try:
      batch = next(self._iterator)
    except StopIteration:
      self.close()
      raise
    if self._shape is None:
      self._shape = batch["image"].shape
    elif batch["image"].shape != self._shape:
      self.close()
      raise ValueError(
        f"batch of images {batch['image'].shape} after batches of {self._shape}; expected one "
        "shape: pass image_size"
      )
    self._next += 1
    return batch

  def __len__(self) -> int:
    """Batches left."""
    return len(self._dataset) - self._next

  def get_state(self) -> dict:
    return {"next_batch": self._next}

  def set_state(self, state: dict) -> None:
    """Continues at `state["next_batch"]` (from `get_state`)."""
    position = state.get("next_batch") if isinstance(state, dict) else None
    if not isinstance(position, int) or not 0 <= position <= len(self._dataset):
      raise ValueError(
        f"state {state!r}; expected {{'next_batch': k}} with 0 <= k <= {len(self._dataset)}"
      )
    self.close()
    self._next = position

  def close(self) -> None:
    """Stops grain's threads and worker processes (also done when the batches run out)."""
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None


def iterate_batches(
  source_or_arrays,
  ids: Sequence[int] | np.ndarray,
  *,
  batch_size: int,
  image_size: int | Sequence[int] | None = None,
  channels: int | None = None,
  mean: float | Sequence[float] = 0.0,
  std: float | Sequence[float] = 1.0,
  num_workers: int = 0,
  prefetch: int = 2,
  num_threads: int = 1,
  host_preprocess: bool = True,
) -> BatchIterator:
  """Yields fixed-shape batches of the examples `ids`, in the order of `ids`, through grain.

  Args:
    source_or_arrays: a `Source` (or anything with `__len__` and `__getitems__` returning
      `{"image", "label"}` dicts), or `(images uint8[N, H, W, C], labels[N])`, or images alone.
    ids: indices into it; may repeat; the order of the output.
    batch_size: rows per batch; the last batch is padded to it.
    image_size: resize to this (int or (height, width)); None keeps the images' size (which
      must then be one size).
    channels: 3 turns grayscale into 3 channels; None keeps them.
    mean: normalisation after scaling to [0, 1], e.g. `IMAGENET_MEAN`.
    std: normalisation, e.g. `IMAGENET_STD`.
    num_workers: grain worker processes (spawned; batch i is made by worker i % num_workers,
      same output); 0 makes batches in this process.
    prefetch: batches buffered (per worker with workers; else in this process).
    num_threads: threads making batches in this process when num_workers is 0 (0: made on
      `next`, in the caller's thread).
    host_preprocess: False leaves resize/normalisation to the consumer: images stay uint8 as
      decoded (one shape per batch), for `on_device.preprocess` inside a jitted step.

  Returns:
    A `BatchIterator` over `{"image": float32[B, H, W, C], "mask": bool[B], "index": int64[B],
    "label": int64[B]}`; padding rows have mask False, index -1, label -1 and a zero image.
  """
  if num_workers < 0:
    raise ValueError(f"num_workers={num_workers}; expected >= 0")
  if num_threads < 0 or prefetch < 0:
    raise ValueError(f"num_threads={num_threads}, prefetch={prefetch}; expected >= 0")
  dataset = batch_dataset(
    source_or_arrays,
    ids,
    batch_size=batch_size,
    image_size=image_size,
    channels=channels,
    mean=mean,
    std=std,
    host_preprocess=host_preprocess,
  )
  if num_workers > 0:
    _let_grain_read_its_flag()

  def start(batches: grain.MapDataset):
    if num_workers == 0:
      threads = num_threads if prefetch else 0
      read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch if threads else 0)
      return iter(batches.to_iter_dataset(read))
    # Workers make whole batches; no extra reading threads inside them.
    read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    options = grain.MultiprocessingOptions(
      num_workers=num_workers, per_worker_buffer_size=max(prefetch, 1)
    )
    return iter(batches.to_iter_dataset(read).mp_prefetch(options))

  return BatchIterator(dataset, start)


def process_batches(
  source_or_arrays,
  ids: Sequence[int] | np.ndarray,
  *,
  batch_size: int,
  process_index: int,
  process_count: int,
  **options,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of every batch `iterate_batches` yields, loading only those rows.

  Rows `np.array_split(range(batch_size), process_count)[process_index]` of each batch (the
  block `rare_jax.infra.sharding.process_shard` gives), with the same padding: a process whose rows
  of the last batch are all padding gets a batch of padding rows. Options as for
  `iterate_batches` (image_size, channels, mean, std).
  """
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
      f"need 0 <= process_index < process_count, got {process_index} and {process_count}"
    )
  if int(batch_size) != batch_size or batch_size < process_count:
    raise ValueError(f"batch_size={batch_size!r}; expected an int >= process_count")
  rows = np.array_split(np.arange(batch_size), process_count)[process_index]
  lo, hi = int(rows[0]), int(rows[-1]) + 1
  ids = np.asarray(ids, dtype=np.int64).reshape(-1)
  for start in range(0, len(ids), batch_size):
    chunk = ids[start : start + batch_size]
    mine = chunk[lo:hi]
    if len(mine):
      yield from iterate_batches(source_or_arrays, mine, batch_size=hi - lo, **options)
      continue
    # All padding: the shapes of one real image, then blanked as make_batch pads.
    batch = next(iterate_batches(source_or_arrays, chunk[:1], batch_size=hi - lo, **options))
    batch["image"][:] = 0
    batch["mask"][:] = False
    batch["index"][:] = -1
    batch["label"][:] = -1
    yield batch


class StepBatches:
  """`get_batch(step)` for `train.fit`, with the batches of the following steps made ahead by
  grain (a prefetch thread: `make` may be a closure). Steps asked in order come from the
  prefetched stream; any other step restarts it there, so the batch of a step is always
  `make(step)` (exact resumption). `close()` stops the thread.

  Args:
    make: step -> batch (host arrays), a function of the step only.
    end: one past the last step.
    prefetch: batches made ahead.
  """

  def __init__(self, make: Callable[[int], dict], *, end: int, prefetch: int = 2):
    if prefetch < 1:
      raise ValueError(f"prefetch={prefetch}; expected >= 1")
    self._make = make
    self._end = int(end)
    self._prefetch = int(prefetch)
    self._iterator = None
    self._expected = None

  def __call__(self, step: int) -> dict:
    step = int(step)
    if not 0 <= step < self._end:
      raise ValueError(f"step {step}; expected 0 <= step < {self._end}")
    if self._iterator is None or step != self._expected:
      self.close()
      read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=self._prefetch)
      steps = grain.MapDataset.range(step, self._end).map(self._make)
      self._iterator = iter(steps.to_iter_dataset(read))
    self._expected = step + 1
    return next(self._iterator)

  def close(self) -> None:
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None
