"""Checkpoints: the only module in rare_jax that imports orbax.

A `CheckpointStore` keeps numbered steps under one directory; each step holds a pytree of
arrays (restored into an abstract target, so shapes, dtypes and shardings are checked) and a
JSON-able metadata dict. Saves are synchronous: an asynchronous save that fails was measured to
hang the process at exit (measured with this Orbax), and a step is only visible once Orbax has
committed it, so a process killed mid-save leaves the previous steps intact.

Multi-host: every process calls `save` and `restore` (Orbax synchronises them; each process
writes its shards of global arrays). Host-local arrays, such as the loop state that every
process computes alike, are saved as NumPy (written by process 0) and restored onto the
devices of the `like` target.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class _OthersInfoFilter(std_logging.Filter):
  """Lets warnings through, and INFO lines of rare_jax itself; drops the INFO of the libraries
  (Orbax logs every save, JAX its backend probing)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    path = record.pathname.replace(os.sep, "/")
    return "/rare_jax/" in path and "/orbax/" not in path


def quiet_library_logging() -> None:
  """For the commands: keep absl logging at INFO for rare_jax's own progress lines (embedding
  rows, rate and ETA) while hiding Orbax's and JAX's INFO messages (a filter on the absl
  handler, which every logger's records reach). Idempotent."""
  from absl import logging as absl_logging

  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _OthersInfoFilter) for f in handler.filters):
    handler.addFilter(_OthersInfoFilter())
  absl_logging.set_verbosity(absl_logging.INFO)


class CheckpointStore:
  """Numbered checkpoints of (pytree of arrays, JSON metadata) in one directory.

  Args:
    directory: where the steps live; created if missing.
    max_to_keep: keep only the newest this many steps (None keeps all).
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = None):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "meta")
    )

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, tree: Any, metadata: dict | None = None) -> None:
    """Saves `tree` and `metadata` as `step`.

    Raises:
      ValueError: if `step` is negative or already saved (Orbax would silently skip it).
    """
    if step < 0:
      raise ValueError(f"checkpoint step must be >= 0, got {step}")
    if step in self._manager.all_steps():
      raise ValueError(
        f"checkpoint step {step} already exists in {self.directory}; refusing to overwrite"
      )
    if jax.process_count() > 1:  # host-local arrays as NumPy: Orbax saves them from process 0
      tree = jax.tree.map(lambda x: np.asarray(x) if _host_local(x) else x, tree)
    saved = self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(metadata or {})
      ),
    )
    if not saved:
      raise RuntimeError(f"Orbax did not save step {step} in {self.directory}")
    self._manager.wait_until_finished()

  def restore(self, step: int, like: Any) -> tuple[Any, dict]:
    """Restores `step` into the structure of `like` (arrays or `jax.ShapeDtypeStruct`s).

    Returns:
      (tree, metadata).

    Raises:
      ValueError: no such step, or one that cannot be restored (damaged files, another
        structure), naming the step and the directory.
    """
    if step not in self._manager.all_steps():
      raise ValueError(f"no checkpoint step {step} in {self.directory}; have {self.all_steps()}")
    abstract = jax.tree.map(_abstract, like)
    local = jax.tree.map(lambda _: False, abstract)
    if jax.process_count() > 1:  # saved as NumPy (see `save`): read as NumPy, then placed
      local = jax.tree.map(_host_local, abstract)
      abstract = jax.tree.map(lambda x, h: np.empty(x.shape, x.dtype) if h else x, abstract, local)
    try:
      restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
      )
    except Exception as error:  # Orbax and TensorStore raise many types for a damaged step
      raise ValueError(
        f"checkpoint step {step} in {self.directory} cannot be restored "
        f"({type(error).__name__}: {error}); expected an intact checkpoint of this run (move "
        "the step's folder away to resume from the previous one)"
      ) from error
    state = jax.tree.map(
      lambda x, a, h: jax.device_put(x, a.sharding) if h else x,
      restored.state,
      jax.tree.map(_abstract, like),
      local,
    )
    return state, dict(restored.meta or {})

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> CheckpointStore:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _host_local(x: Any) -> bool:
  """Whether `x` (an array or `ShapeDtypeStruct`) lives on this process's devices only.

  In a multi-host run such arrays (the loop's state, computed redundantly by every process)
  hold the same values everywhere; Orbax refuses to save them as `jax.Array`s.
  """
  sharding = getattr(x, "sharding", None)
  if sharding is None:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct))
  return sharding.is_fully_addressable


def _abstract(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  sharding = getattr(x, "sharding", None)
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """Writes JSON so that a reader sees the old file or the new one, never a torn one."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=1, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def record_or_check(
  path: str | os.PathLike,
  record: dict,
  *,
  what: str,
  refusal: Callable[[list[str]], str] | None = None,
) -> None:
  """Writes `record` as JSON at `path`, or, if the file exists, refuses a different record.

  `refusal(differing keys)` words the error instead of the default message.

  Raises:
    ValueError: the file is corrupt, or it records other values (naming the differing keys
      and `what` the file describes); the file is left as it was.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    write_json_atomic(path, record)
    return
  with open(path) as f:
    try:
      existing = json.load(f)
    except json.JSONDecodeError as error:
      raise ValueError(f"{path} is not valid JSON ({error}); refusing to reuse it") from None
  if existing != record:
    differing = sorted(k for k in set(existing) | set(record) if existing.get(k) != record.get(k))
    if refusal is not None:
      raise ValueError(refusal(differing))
    detail = ", ".join(f"{k}: {existing.get(k)!r} -> {record.get(k)!r}" for k in differing[:5])
    raise ValueError(f"{path} records another {what} (differs in {detail}); use a new workdir")
