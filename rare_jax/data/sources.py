"""Any prepared TFDS dataset as a random-access source of (image, label) by index.

`open_source(name, split, data_dir)` returns a `Source`: `len`, `source[i] -> {"image":
uint8[H, W, C], "label": int}`, `source.labels()` (all labels, cached), `num_classes` and
`class_names`. No TensorFlow is needed: array_record (and parquet) datasets are read through
`builder.as_data_source` (what `tfds.data_source` calls), tfrecord datasets through a small
indexed reader of the tfrecord container (`TFRecordRecords`) and TFDS's NumPy decoding.

`open_source` never downloads or prepares: a registered dataset's download hangs for minutes
offline. A dataset that is not prepared in `data_dir` is an error saying how to prepare it.
`load_arrays` holds a whole (small) split in memory, with an `.npy` cache next to the prepared
files, named after a fingerprint of those files so that a rebuilt dataset is never served
stale arrays.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import pathlib
import re
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

# Registers `rare_fashion_mnist` with TFDS.
from rare_jax.data import fashion_mnist

# How to prepare the datasets this project builds itself (name -> command).
PREPARE_COMMANDS = {"rare_fashion_mnist": "python -m rare_jax.data.prepare"}
CACHE_FOLDER = "rare_jax_cache"
# Examples read per call when scanning a whole split.
_READ_CHUNK = 4096


def default_data_dir() -> str:
  """TFDS's default data folder: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return tfds.core.constants.get_default_data_dir()


class TFRecordRecords:
  """Random access to the serialized records of tfrecord shards, without TensorFlow.

  A tfrecord file is a sequence of (uint64 length, uint32 crc, data, uint32 crc). The offsets
  are found once by walking the length headers (no data is read); CRCs are not checked.

  Args:
    file_instructions: TFDS `FileInstruction`s (filename, skip, take) of one split.
  """

  def __init__(self, file_instructions: Sequence[Any]):
    self._instructions = [
      (str(fi.filename), int(fi.skip), int(fi.take)) for fi in file_instructions
    ]
    self._offsets: list[np.ndarray] | None = None
    self._starts = np.cumsum([0] + [take for _, _, take in self._instructions])

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getstate__(self):
    return {"_instructions": self._instructions, "_offsets": None, "_starts": self._starts}

  @staticmethod
  def _index_file(path: str) -> np.ndarray:
    offsets = []
    with open(path, "rb") as f:
      size = os.fstat(f.fileno()).st_size
      position = 0
      while position < size:
        header = f.read(12)
        if len(header) < 12:
          raise ValueError(f"{path}: truncated tfrecord header at byte {position}")
        (length,) = struct.unpack("<Q", header[:8])
        offsets.append(position)
        position += 12 + length + 4
        f.seek(position)
    return np.asarray(offsets, dtype=np.int64)

  def _record_offsets(self) -> list[np.ndarray]:
    if self._offsets is None:
      offsets = []
      for path, skip, take in self._instructions:
        file_offsets = self._index_file(path)[skip : skip + take]
        if len(file_offsets) != take:
          raise ValueError(f"{path}: expected {skip + take} records, found {len(file_offsets)}")
        offsets.append(file_offsets)
      self._offsets = offsets
    return self._offsets

  def __getitem__(self, index: int) -> bytes:
    return self.__getitems__([index])[0]

  def __getitems__(self, indices: Sequence[int]) -> list[bytes]:
    offsets = self._record_offsets()
    indices = np.asarray(indices, dtype=np.int64)
    shard_of = np.searchsorted(self._starts, indices, side="right") - 1
    records = []
    handles = {}
    try:
      for index, shard in zip(indices.tolist(), shard_of.tolist(), strict=True):
        if shard not in handles:
          handles[shard] = open(self._instructions[shard][0], "rb")
        f = handles[shard]
        f.seek(int(offsets[shard][index - self._starts[shard]]))
        (length,) = struct.unpack("<Q", f.read(12)[:8])
        records.append(f.read(length))
    finally:
      for f in handles.values():
        f.close()
    return records


class _DecodedRecords:
  """Serialized TFDS examples (any random-access records) decoded with NumPy."""

  def __init__(self, records, features, decoders=None):
    self._records = records
    self._features = features
    self._decoders = decoders

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.__getitems__([index])[0]

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [
      self._features.deserialize_example_np(record, decoders=self._decoders)
      for record in self._records.__getitems__(list(indices))
    ]


class _OneByOne:
  """Serves `__getitems__` by `__getitem__` calls. For `tfds.testing.mock_data` sources, whose
  `__getitems__` is broken in TFDS 4.9.10 (an unbound partial: TypeError on every call)."""

  def __init__(self, examples):
    self._examples = examples

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, index: int):
    return self._examples[index]

  def __getitems__(self, indices: Sequence[int]) -> list:
    return [self._examples[i] for i in indices]


class Source:
  """One split of a dataset as random-access (image, label) examples.

  Built by `open_source`; picklable (worker processes reopen the files).

  Attributes:
    name: the TFDS name.
    split: the split (as given, e.g. "train" or "train[:10%]").
    class_names: one name per class id.
    num_classes: `len(class_names)`.
    dataset_dir: the prepared dataset's folder (for caches), or None (e.g. mocked data).
  """

  def __init__(
    self,
    examples,
    *,
    name: str,
    split: str,
    class_names: Sequence[str],
    image_key: str = "image",
    label_key: str = "label",
    dataset_dir: str | None = None,
    fingerprint: str | None = None,
    label_examples=None,
  ):
    self._examples = examples
    self._label_examples = label_examples if label_examples is not None else examples
    self.name = name
    self.split = split
    self.class_names = tuple(class_names)
    self.image_key = image_key
    self.label_key = label_key
    self.dataset_dir = dataset_dir
    self._fingerprint = fingerprint
    self._labels: np.ndarray | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self._examples)

  def __repr__(self) -> str:
    return f"Source({self.name!r}, split={self.split!r}, size={len(self)})"

  def _check_indices(self, indices: np.ndarray) -> None:
    if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
      bad = indices[(indices < 0) | (indices >= len(self))][0]
      raise IndexError(f"index {bad} out of range for {self!r}; expected 0 <= index < {len(self)}")

  def _convert(self, example: dict[str, Any]) -> dict[str, Any]:
    image = np.asarray(example[self.image_key])
    if image.ndim == 2:
      image = image[..., None]
    return {"image": image, "label": int(example[self.label_key])}

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.__getitems__([index])[0]

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    """Reads several examples in one call (faster than one by one for array_record)."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    self._check_indices(indices)
    if not indices.size:
      return []
    return [self._convert(e) for e in self._examples.__getitems__(indices.tolist())]

  def cache_path(self, kind: str) -> pathlib.Path | None:
    """Where the `kind` ("labels", "images") cache of this split lives, or None if uncached."""
    if self.dataset_dir is None or self._fingerprint is None:
      return None
    split = re.sub(r"[^A-Za-z0-9_-]+", "_", self.split)
    if split != self.split:  # Slices like "train[:10%]" and "train[10%:]" stay apart.
      split += "-" + hashlib.sha1(self.split.encode()).hexdigest()[:8]
    return pathlib.Path(self.dataset_dir) / CACHE_FOLDER / f"{split}.{kind}.{self._fingerprint}.npy"

  def set_labels(self, labels: np.ndarray) -> None:
    """Records all labels of the split (read by someone else) and caches them on disk."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(self),):
      raise ValueError(f"labels of shape {labels.shape} for {self!r}; expected ({len(self)},)")
    if _read_cache(self.cache_path("labels")) is None:
      _write_cache(self.cache_path("labels"), labels)
    self._labels = labels

  def labels(self) -> np.ndarray:
    """All labels of the split, int64 [N] (images are not decoded; cached on disk)."""
    if self._labels is None:
      path = self.cache_path("labels")
      labels = _read_cache(path)
      if labels is None or labels.shape != (len(self),):
        labels = np.empty(len(self), dtype=np.int64)
        for start in range(0, len(self), _READ_CHUNK):
          chunk = list(range(start, min(start + _READ_CHUNK, len(self))))
          examples = self._label_examples.__getitems__(chunk)
          labels[chunk[0] : chunk[-1] + 1] = [int(e[self.label_key]) for e in examples]
        _write_cache(path, labels)
      self._labels = labels
    return self._labels.copy()


def _read_cache(path: pathlib.Path | None) -> np.ndarray | None:
  if path is None or not path.is_file():
    return None
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError) as error:  # A damaged cache is rebuilt, not fatal.
    logging.warning("Ignoring unreadable cache %s: %s", path, error)
    return None


def _write_cache(path: pathlib.Path | None, array: np.ndarray) -> None:
  """Writes atomically and removes caches of older versions of the files; best effort."""
  if path is None:
    return
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = path.name.rsplit(".", 2)[0] + "."  # "<split>.<kind>."
    for old in path.parent.glob(prefix + "*.npy"):
      if old != path:
        old.unlink(missing_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as f:  # Not tempfile: its 0600 mode would hide a shared cache.
      np.save(f, array, allow_pickle=False)
    os.replace(temporary, path)
  except OSError as error:  # A read-only data_dir just goes without a cache.
    logging.info("Not caching %s: %s", path, error)


def _fingerprint(file_instructions) -> str:
  """Changes whenever a file of the split is rewritten (name, size, inode, times) or the slice
  moves."""
  digest = hashlib.sha1()
  for fi in file_instructions:
    stat = os.stat(fi.filename)
    digest.update(
      f"{fi.filename}|{fi.skip}|{fi.take}|{stat.st_size}|{stat.st_ino}|{stat.st_mtime_ns}|"
      f"{stat.st_ctime_ns};".encode()
    )
  return digest.hexdigest()[:16]


def _builder(name: str, data_dir: str | None):
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    known = tfds.list_builders(with_community_datasets=False)
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(
      f"Unknown dataset name {name!r}: expected a TFDS registered dataset (see "
      f"tfds.list_builders()), e.g. 'rare_fashion_mnist'.{hint}"
    ) from None


def _not_prepared_error(name: str, data_dir: str) -> ValueError:
  how = PREPARE_COMMANDS.get(name)
  if how:
    how = f"run `{how} --data_dir={data_dir}`" if data_dir != default_data_dir() else f"run `{how}`"
  else:
    how = (
      f"prepare it in array_record format first, e.g. `tfds build {name} --data_dir={data_dir} "
      "--file_format=array_record` (this downloads it), or pass the data_dir it was prepared in"
    )
  return ValueError(f"Dataset {name!r} is not prepared in data_dir={data_dir!r}: {how}.")


def _check_features(name: str, features, image_key: str, label_key: str) -> list[str]:
  for key in (image_key, label_key):
    if key not in features:
      raise ValueError(
        f"Dataset {name!r} has no feature {key!r}; expected an image and a label feature among "
        f"{sorted(features.keys())} (pass image_key/label_key)"
      )
  label_feature = features[label_key]
  if not isinstance(label_feature, tfds.features.ClassLabel):
    raise ValueError(
      f"Dataset {name!r}: feature {label_key!r} is {type(label_feature).__name__}; expected a "
      "ClassLabel"
    )
  names = label_feature.names
  return list(names) if names else [str(i) for i in range(label_feature.num_classes)]


def open_source(
  name: str,
  split: str,
  data_dir: str | None = None,
  *,
  image_key: str = "image",
  label_key: str = "label",
) -> Source:
  """Opens one split of a prepared TFDS dataset for random access; never downloads.

  Args:
    name: a registered TFDS name (`rare_fashion_mnist`, `i_naturalist2017`, ...), optionally
      with config/version (`name/config:1.0.0`).
    split: a split of the prepared dataset ("train", "test", or a slice like "train[:10%]").
    data_dir: where it was prepared (default: TFDS's default, honouring $TFDS_DATA_DIR).
    image_key: the image feature's name.
    label_key: the ClassLabel feature's name.

  Returns:
    A `Source`.

  Raises:
    ValueError: unknown name, not prepared in data_dir (says how), unknown split, missing
      features, or a file format with no reader.
  """
  data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
  builder = _builder(name, data_dir)
  if not builder.is_prepared():
    # Only mocked data (tfds.testing.mock_data) serves an unprepared builder.
    try:
      examples = builder.as_data_source(split=split)
    except Exception as error:
      raise _not_prepared_error(name, data_dir) from error
    class_names = _check_features(name, builder.info.features, image_key, label_key)
    return Source(
      _OneByOne(examples),
      name=name,
      split=split,
      class_names=class_names,
      image_key=image_key,
      label_key=label_key,
    )
  info = builder.info
  class_names = _check_features(name, info.features, image_key, label_key)
  base_split = split.split("[")[0]
  if base_split not in info.splits:
    raise ValueError(
      f"Unknown split {split!r} of dataset {name!r}; expected one of {sorted(info.splits)}"
    )
  try:
    file_instructions = info.splits[split].file_instructions
  except (ValueError, KeyError, AssertionError) as error:
    raise ValueError(f"Bad split {split!r} of dataset {name!r}: {error}") from None
  formats = info.available_file_formats() or {info.file_format}
  random_access = set(tfds.core.file_adapters.FileFormat.with_random_access())
  label_decoders = {image_key: tfds.decode.SkipDecoding()}
  if formats & random_access:
    examples = builder.as_data_source(split=split)
    label_examples = builder.as_data_source(split=split, decoders=label_decoders)
  elif tfds.core.file_adapters.FileFormat.TFRECORD in formats:
    records = TFRecordRecords(file_instructions)
    examples = _DecodedRecords(records, info.features)
    label_examples = _DecodedRecords(records, info.features, decoders=label_decoders)
  else:
    raise ValueError(
      f"Dataset {name!r} in {builder.data_dir} is stored as {sorted(f.value for f in formats)}; "
      "expected array_record, parquet or tfrecord"
    )
  return Source(
    examples,
    name=name,
    split=split,
    class_names=class_names,
    image_key=image_key,
    label_key=label_key,
    dataset_dir=os.fspath(builder.data_dir),
    fingerprint=_fingerprint(file_instructions),
    label_examples=label_examples,
  )


def load_arrays(
  source: Source, ids: Sequence[int] | np.ndarray | None = None, *, max_bytes: int = 4 << 30
) -> tuple[np.ndarray, np.ndarray]:
  """Reads examples into memory: (images uint8 [N, H, W, C], labels int64 [N]).

  For datasets small enough to hold in memory (Fashion-MNIST: 47 MB). The whole split is read
  once and cached as .npy next to the prepared files (reading 60k Fashion-MNIST examples
  through the data source takes about 3 s, the cache about 0.05 s).

  Args:
    source: from `open_source`.
    ids: the indices to read, in this order (default: all of the split).
    max_bytes: refuse splits whose images would take more memory than this.

  Returns:
    images, labels, in the order of `ids`.

  Raises:
    ValueError: images of different shapes (stream them with `pipeline.iterate_batches` and
      an `image_size` instead), a split over `max_bytes`, or ids out of range.
  """
  num = len(source)
  if ids is not None:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= num):
      raise ValueError(f"ids out of range for {source!r}: expected 0 <= id < {num}")
  first = source[0]["image"] if num else np.zeros((0, 0, 0), np.uint8)
  split_bytes = num * first.nbytes
  if split_bytes > max_bytes:
    raise ValueError(
      f"{source!r} needs about {split_bytes / 2**30:.1f} GiB as arrays, over max_bytes="
      f"{max_bytes}; expected a split that fits in memory (use pipeline.iterate_batches)"
    )
  path = source.cache_path("images")
  if path is None:  # Nothing to cache into (e.g. mocked data): read only what is asked.
    return _read_examples(source, np.arange(num) if ids is None else ids, first.shape)
  images = _read_cache(path)
  if images is None or images.shape != (num, *first.shape):
    # One pass gives the labels too (decoding dominates the cost).
    images, labels = _read_examples(source, np.arange(num), first.shape)
    _write_cache(path, images)
    source.set_labels(labels)
  labels = source.labels()
  if ids is None:
    return images, labels
  return images[ids], labels[ids]


def _read_examples(
  source: Source, ids: np.ndarray, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
  images = np.empty((len(ids), *shape), dtype=np.uint8)
  labels = np.empty(len(ids), dtype=np.int64)
  for start in range(0, len(ids), _READ_CHUNK):
    chunk = ids[start : start + _READ_CHUNK]
    for offset, example in enumerate(source.__getitems__(chunk)):
      if example["image"].shape != shape:
        raise ValueError(
          f"{source!r}: image {chunk[offset]} has shape {example['image'].shape}, image 0 has "
          f"{shape}; expected one shape (use pipeline.iterate_batches with image_size)"
        )
      images[start + offset] = example["image"]
      labels[start + offset] = example["label"]
  return images, labels


__all__ = [
  "PREPARE_COMMANDS",
  "Source",
  "TFRecordRecords",
  "default_data_dir",
  "fashion_mnist",
  "load_arrays",
  "open_source",
]
