"""Cached features: batched (sharded) inference of an index set into an on-disk feature store.

A `FeatureStore` is a directory:
  meta.json         {"num_rows", "dim", "fields": {name: {"shape", "dtype", "file"}},
                     "rows_done", "batches_done", "complete"}
  features.npy      the embeddings [P, D] (float32, or bfloat16 stored as uint16)
  <field>.npy       other per-row outputs, e.g. main_probs [P, C], aux_labels [P], index [P]
Arrays are `np.lib.format.open_memmap` files, read back memory-mapped.

`embed_to_store` writes rows in the order the batches give them (padding rows dropped),
flushes and records progress (rows and batches done) after every `commit_every` batches, and
on a restart with the same batches resumes after the recorded batch instead of starting over.
Progress is logged with absl logging, or to `log=` (rows, rows/s, ETA).

Batches are dicts with `image` [B,H,W,C], `mask` bool [B] (false = padding) and `index`
int64 [B] of fixed shape. `predict_fn(batch)` returns a dict with `embedding` [B', D] and
optionally other per-row outputs; in a multi-process run it returns the gathered global
outputs plus the global `mask` and `index` (`make_predict_fn` does all of this); only
process 0 touches the files, the others learn the resume point from it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rare_jax.infra import sharding
from rare_jax.infra.checkpoint import write_json_atomic

META = "meta.json"
_STORAGE = {"float32": np.float32, "bfloat16": np.uint16}


def _file_name(name: str) -> str:
  return "features.npy" if name == "embedding" else f"{name}.npy"


class FeatureStore:
  """Per-row arrays (memory-mapped .npy files) and progress metadata in one directory.

  Use `FeatureStore.create(...)` or `FeatureStore.open(directory)`; `store["embedding"]` (or
  `store.features`) returns the [P, D] array, `store[name]` any other field.
  """

  def __init__(self, directory: str | os.PathLike, meta: dict, mode: str):
    self.directory = os.fspath(directory)
    self.meta = meta
    self._mode = mode
    self._arrays: dict[str, np.ndarray] = {}

  @classmethod
  def create(
    cls,
    directory: str | os.PathLike,
    *,
    num_rows: int,
    fields: Mapping[str, tuple[tuple[int, ...], str]],
  ) -> FeatureStore:
    """Creates an empty store; `fields` maps name -> (per-row shape, dtype name).

    `embedding` must be among the fields with shape (D,). Float fields may be "float32" or
    "bfloat16"; others use their numpy dtype name (e.g. "int32", "int64").
    """
    if num_rows < 1:
      raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    if "embedding" not in fields or len(fields["embedding"][0]) != 1:
      raise ValueError(f"fields need 'embedding' with a (D,) row shape, got {dict(fields)}")
    os.makedirs(directory, exist_ok=True)
    spec = {}
    for name, (shape, dtype) in fields.items():
      dtype = str(np.dtype(dtype)) if dtype not in _STORAGE else dtype
      spec[name] = {"shape": [int(s) for s in shape], "dtype": dtype, "file": _file_name(name)}
      np.lib.format.open_memmap(
        os.path.join(directory, spec[name]["file"]),
        mode="w+",
        dtype=_STORAGE.get(dtype, dtype),
        shape=(num_rows, *shape),
      ).flush()
    meta = {
      "num_rows": int(num_rows),
      "dim": spec["embedding"]["shape"][0],
      "fields": spec,
      "rows_done": 0,
      "batches_done": 0,
      "complete": False,
    }
    write_json_atomic(os.path.join(directory, META), meta)
    return cls(directory, meta, "r+")

  @classmethod
  def open(cls, directory: str | os.PathLike, mode: str = "r") -> FeatureStore:
    """Opens an existing store ("r" read-only, "r+" to continue writing)."""
    path = os.path.join(directory, META)
    if not os.path.exists(path):
      raise ValueError(f"no feature store in {directory} (missing {META})")
    if mode not in ("r", "r+"):
      raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
    with open(path) as f:
      return cls(directory, json.load(f), mode)

  @staticmethod
  def exists(directory: str | os.PathLike) -> bool:
    return os.path.exists(os.path.join(directory, META))

  @property
  def num_rows(self) -> int:
    return self.meta["num_rows"]

  @property
  def dim(self) -> int:
    return self.meta["dim"]

  @property
  def rows_done(self) -> int:
    return self.meta["rows_done"]

  @property
  def batches_done(self) -> int:
    return self.meta["batches_done"]

  @property
  def complete(self) -> bool:
    return self.meta["complete"]

  @property
  def fields(self) -> dict[str, dict]:
    return self.meta["fields"]

  @property
  def features(self) -> np.ndarray:
    return self["embedding"]

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self.fields:
      raise KeyError(f"no field {name!r} in {self.directory}; have {sorted(self.fields)}")
    if name not in self._arrays:
      spec = self.fields[name]
      array = np.load(os.path.join(self.directory, spec["file"]), mmap_mode=self._mode)
      if spec["dtype"] == "bfloat16":
        array = array.view(ml_dtypes.bfloat16)
      self._arrays[name] = array
    return self._arrays[name]

  def write(self, start: int, rows: Mapping[str, np.ndarray]) -> None:
    """Writes `rows` (name -> [n, ...]) into rows [start, start + n)."""
    if self._mode != "r+":
      raise ValueError(f"feature store {self.directory} is open read-only")
    for name, values in rows.items():
      target = self[name]
      values = np.asarray(values)
      if start + len(values) > self.num_rows:
        raise ValueError(
          f"writing rows [{start}, {start + len(values)}) past num_rows={self.num_rows}"
        )
      if values.shape[1:] != target.shape[1:]:
        raise ValueError(
          f"field {name!r}: row shape {values.shape[1:]}, expected {target.shape[1:]}"
        )
      target[start : start + len(values)] = values.astype(target.dtype)

  def commit(self, *, rows_done: int, batches_done: int, complete: bool = False) -> None:
    """Flushes the arrays, then records the progress (atomically)."""
    for array in self._arrays.values():
      if isinstance(array, np.memmap) or isinstance(getattr(array, "base", None), np.memmap):
        (array if isinstance(array, np.memmap) else array.base).flush()
    self.meta = dict(
      self.meta, rows_done=int(rows_done), batches_done=int(batches_done), complete=bool(complete)
    )
    write_json_atomic(os.path.join(self.directory, META), self.meta)


def _to_host(x: Any) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def make_predict_fn(
  state: Any, *, predict: Callable, mesh: Mesh, outputs: Sequence[str] | None = None
) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
  """Wraps a jitted `predict(state, batch)` (e.g. `train.jit_predict(...)`) for `embed_to_store`.

  Builds the global batch from this process's rows, runs `predict`, and returns host numpy
  arrays of the global batch: the selected `outputs` (default all) plus `mask` and `index`.
  """

  def predict_fn(local_batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    # mask and index travel with the images so that their global row order is the outputs'.
    host_fields = {k: np.asarray(local_batch[k]) for k in ("mask", "index") if k in local_batch}
    if "index" in host_fields:
      index = host_fields["index"]
      if index.size and (index.max() >= 2**31 or index.min() < -(2**31)):
        raise ValueError(f"index values must fit int32, got range [{index.min()}, {index.max()}]")
      host_fields["index"] = index.astype(np.int32)
    batch = sharding.global_batch_from_local({"image": local_batch["image"], **host_fields}, mesh)
    result = predict(state, batch)
    names = list(result) if outputs is None else list(outputs)
    missing = [n for n in names if n not in result]
    if missing:
      raise ValueError(f"predict has no outputs {missing}; it returns {sorted(result)}")
    wanted = {n: result[n] for n in names}
    wanted.update({k: batch[k] for k in host_fields})
    return {k: _to_host(v) for k, v in wanted.items()}

  return predict_fn


def embed_to_store(
  predict_fn: Callable[[Mapping[str, np.ndarray]], Mapping[str, Any] | Any],
  batches: Iterable[Mapping[str, np.ndarray]] | Callable[[int], Iterable],
  store_dir: str | os.PathLike,
  num_rows: int,
  dim: int,
  *,
  progress: bool = True,
  dtype: str = "float32",
  commit_every: int = 1,
  log_every_s: float = 10.0,
  overwrite: bool = False,
  log: Callable[[str], None] | None = None,
) -> FeatureStore | None:
  """Embeds all rows into the store at `store_dir`, resuming an interrupted run.

  Args:
    predict_fn: batch -> dict with `embedding` [B, dim] (+ other per-row outputs, and in
      multi-process runs the global `mask`/`index`), or just the embedding array.
    batches: the fixed-shape batches in order (the same sequence on every restart), or a
      function `first_batch -> iterable` that starts at that batch (skips loading).
    store_dir: the store's directory.
    num_rows: the number of real (unmasked) rows the batches hold.
    dim: the embedding width.
    progress: log progress (absl logging) every `log_every_s` seconds and at the end.
    dtype: "float32" or "bfloat16" for the embedding (other float outputs stay float32).
    commit_every: flush and record progress every this many batches.
    overwrite: start over even if the store exists (else a store of another shape raises).
    log: where progress goes (e.g. `print` in the commands); None: absl logging at INFO.

  Returns:
    The complete store opened read-only (on processes other than 0: None unless they share
    process 0's filesystem).

  Raises:
    ValueError: on a store of other shape, or batches holding more or fewer rows than
      `num_rows`.
  """
  if dtype not in _STORAGE:
    raise ValueError(f"dtype must be one of {sorted(_STORAGE)}, got {dtype!r}")
  if commit_every < 1:
    raise ValueError(f"commit_every must be >= 1, got {commit_every}")
  writer = jax.process_index() == 0

  def say(message: str, *args) -> None:
    if log is None:
      logging.info(message, *args)
    else:
      log(message % args)

  store, first_batch, row, complete = None, 0, 0, False
  # Only process 0 touches the files; the others learn where to resume from it.
  if writer and FeatureStore.exists(store_dir) and not overwrite:
    store = FeatureStore.open(store_dir, mode="r+")
    if (
      store.num_rows != num_rows
      or store.dim != dim
      or (store.fields["embedding"]["dtype"] != dtype)
    ):
      raise ValueError(
        f"feature store {store_dir} holds {store.num_rows} x {store.dim} "
        f"{store.fields['embedding']['dtype']}, expected {num_rows} x {dim} {dtype}; "
        "pass overwrite=True to start over"
      )
    first_batch, row, complete = store.batches_done, store.rows_done, store.complete
  if jax.process_count() > 1:
    first_batch, row, complete = (
      int(v)
      for v in multihost_utils.broadcast_one_to_all(
        np.array([first_batch, row, int(complete)], np.int64)
      )
    )
  if complete:
    return _open_if_visible(store_dir)
  if progress and row:
    say("embed: resuming %s at row %d/%d (batch %d)", store_dir, row, num_rows, first_batch)
  if callable(batches):
    iterator, skip = iter(batches(first_batch)), 0
  else:
    iterator, skip = iter(batches), first_batch

  t_start = t_log = time.time()
  rows_at_start, batch_number = row, first_batch
  for batch in iterator:
    if skip:
      skip -= 1
      continue
    outputs = predict_fn(batch)
    if not isinstance(outputs, Mapping):
      outputs = {"embedding": outputs}
    outputs = {k: _to_host(v) for k, v in outputs.items()}
    mask = outputs.pop("mask", np.asarray(batch["mask"])).astype(bool)
    index = outputs.pop("index", np.asarray(batch["index"]) if "index" in batch else None)
    if "embedding" not in outputs or outputs["embedding"].shape[1:] != (dim,):
      got = outputs.get("embedding", np.zeros(0)).shape
      raise ValueError(f"predict_fn must return 'embedding' [B, {dim}], got {got}")
    rows = {k: v[mask] for k, v in outputs.items()}
    if index is not None:
      rows["index"] = np.asarray(index)[mask].astype(np.int64)
    if row + len(rows["embedding"]) > num_rows:
      raise ValueError(f"the batches hold more than num_rows={num_rows} rows")
    if writer:
      if store is None:
        fields = {k: (v.shape[1:], _field_dtype(k, v, dtype)) for k, v in rows.items()}
        store = FeatureStore.create(store_dir, num_rows=num_rows, fields=fields)
      store.write(row, rows)
    row += len(rows["embedding"])
    batch_number += 1
    if writer and batch_number % commit_every == 0:
      store.commit(rows_done=row, batches_done=batch_number)
    if progress and time.time() - t_log >= log_every_s:
      t_log = time.time()
      rate = (row - rows_at_start) / max(t_log - t_start, 1e-9)
      say(
        "embed: %d/%d rows (%.1f rows/s, ETA %s)",
        row,
        num_rows,
        rate,
        format_eta((num_rows - row) / rate if rate > 0 else None),
      )
  if row != num_rows:
    raise ValueError(f"the batches held {row} rows, expected num_rows={num_rows}")
  if writer:
    store.commit(rows_done=row, batches_done=batch_number, complete=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"embed_to_store:{os.fspath(store_dir)}")
  if progress:
    elapsed = time.time() - t_start
    say(
      "embed: done, %d rows in %.1fs (%.1f rows/s) -> %s",
      num_rows,
      elapsed,
      (row - rows_at_start) / max(elapsed, 1e-9),
      store_dir,
    )
  return _open_if_visible(store_dir)


def format_eta(seconds: float | None) -> str:
  """'1h02m', '3m05s', '12s'; '?' when unknown (no rate yet)."""
  if seconds is None or not np.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  if seconds >= 60:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds}s"


def _open_if_visible(store_dir) -> FeatureStore | None:
  """The finished store, read-only; None on a process that cannot see process 0's files."""
  return FeatureStore.open(store_dir) if FeatureStore.exists(store_dir) else None


def _field_dtype(name: str, values: np.ndarray, embedding_dtype: str) -> str:
  if name == "embedding":
    return embedding_dtype
  if np.issubdtype(values.dtype, np.floating):
    return "float32"
  return str(values.dtype)
