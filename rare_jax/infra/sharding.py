"""Meshes, shardings of parameters and batches, and the multi-host start (big_vision style).

- `make_mesh([("data", -1)])`: a `Mesh` over all devices (of all processes); -1 takes what
  the other axes leave.
- `state_shardings(abstract_state, mesh)`: `NamedSharding`s for a pytree of
  `jax.ShapeDtypeStruct` (from `jax.eval_shape`): replicated by default; with `param_axis`,
  every large enough array is split along its largest dimension divisible by that axis
  (FSDP-style). The rule depends on shapes only, so optimizer states follow their parameters.
- `batch_sharding(mesh)`: the leading (batch) dimension split over the data axes.
- `global_batch_from_local(local_batch, mesh)`: each process passes only its own rows; the
  result is one global `jax.Array` per leaf (`jax.make_array_from_process_local_data`), rows
  ordered by process index.
- `process_shard(ids, process_index, process_count)`: the contiguous block of a sequence of
  ids that one process loads.
- `initialize_distributed(...)`: a thin wrapper around `jax.distributed.initialize`.
- `is_primary()`, `barrier(name)`, `primary_first(fn, name)`: process 0 writes the run's
  files (the others compute the same replicated values and write nothing); a barrier orders
  "process 0 wrote" before "the others read".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Mesh axes that never split the batch (tensor-parallel style); every other axis does.
NON_BATCH_AXES = ("model",)


def make_mesh(
  axes: Sequence[tuple[str, int]] | Mapping[str, int] = (("data", -1),),
  *,
  devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """Builds a `Mesh` from an axis spec such as `[("data", -1)]` or `{"data": 2, "fsdp": 4}`.

  Args:
    axes: (name, size) pairs in mesh order; at most one size may be -1 (the rest).
    devices: defaults to `jax.devices()` (all processes).

  Returns:
    The mesh.

  Raises:
    ValueError: on an empty spec, repeated names, bad sizes or a product that does not match
      the number of devices.
  """
  pairs = list(axes.items()) if isinstance(axes, Mapping) else [tuple(a) for a in axes]
  if not pairs or any(len(p) != 2 for p in pairs):
    raise ValueError(f"mesh axes must be a non-empty list of (name, size) pairs, got {axes!r}")
  names = [str(name) for name, _ in pairs]
  sizes = [int(size) for _, size in pairs]
  if len(set(names)) != len(names):
    raise ValueError(f"mesh axis names must be distinct, got {names}")
  devices = list(jax.devices() if devices is None else devices)
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes must be positive with at most one -1, got {sizes}")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % known:
      raise ValueError(f"mesh sizes {sizes} do not divide the {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh sizes {sizes} need {math.prod(sizes)} devices, have {len(devices)}")
  try:  # a topology-aware order where the platform has one (TPU/GPU)
    device_array = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
  except (AssertionError, NotImplementedError, ValueError, TypeError):
    device_array = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(device_array, tuple(names))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes that split the batch: all but `NON_BATCH_AXES`."""
  return tuple(name for name in mesh.axis_names if name not in NON_BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, axes: Sequence[str] | None = None) -> NamedSharding:
  """Leading dimension split over `axes` (default: `batch_axes(mesh)`), the rest replicated."""
  axes = batch_axes(mesh) if axes is None else tuple(axes)
  unknown = [a for a in axes if a not in mesh.axis_names]
  if unknown:
    raise ValueError(f"batch axes {unknown} not in mesh axes {mesh.axis_names}")
  return NamedSharding(mesh, P(axes if axes else None))


def state_shardings(
  abstract_tree: Any,
  mesh: Mesh,
  *,
  param_axis: str | None = None,
  min_shard_size: int = 2**18,
) -> Any:
  """`NamedSharding`s for every leaf of `abstract_tree` (arrays or `ShapeDtypeStruct`s).

  Args:
    abstract_tree: e.g. `jax.eval_shape(init, rng)`.
    mesh: the mesh.
    param_axis: None replicates everything; a mesh axis name splits each array of at least
      `min_shard_size` elements along its largest dimension divisible by that axis's size
      (arrays with no such dimension stay replicated).
    min_shard_size: smaller arrays (biases, BatchNorm, scalars) stay replicated.

  Returns:
    A tree of `NamedSharding` with the structure of `abstract_tree`.
  """
  if param_axis is not None and param_axis not in mesh.axis_names:
    raise ValueError(f"param_axis {param_axis!r} not in mesh axes {mesh.axis_names}")

  def leaf_sharding(x: Any) -> NamedSharding:
    shape = tuple(np.shape(x))
    if param_axis is None or math.prod(shape) < min_shard_size:
      return replicated(mesh)
    axis_size = mesh.shape[param_axis]
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if shape[dim] % axis_size == 0:
        spec = [None] * len(shape)
        spec[dim] = param_axis
        return NamedSharding(mesh, P(*spec))
    return replicated(mesh)

  return jax.tree.map(leaf_sharding, abstract_tree)


def global_batch_from_local(
  local_batch: Any, mesh: Mesh, sharding: NamedSharding | None = None
) -> Any:
  """Global arrays from this process's rows of the batch.

  Args:
    local_batch: pytree of host arrays with leading dimension `global_batch / process_count`
      (in a single process: the whole batch).
    mesh: the mesh.
    sharding: defaults to `batch_sharding(mesh)`.

  Returns:
    The same pytree of global `jax.Array`s, rows of process 0 first.
  """
  sharding = batch_sharding(mesh) if sharding is None else sharding
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )


def process_shard(
  ids: Sequence[Any] | np.ndarray,
  process_index: int | None = None,
  process_count: int | None = None,
  *,
  drop_remainder: bool = False,
) -> np.ndarray:
  """The contiguous block of `ids` this process loads (sizes differ by at most one).

  Args:
    ids: all ids (same order in every process).
    process_index: defaults to `jax.process_index()`.
    process_count: defaults to `jax.process_count()`.
    drop_remainder: give every process exactly `len(ids) // process_count` ids (the tail is
      dropped), so that processes step in lockstep.

  Returns:
    The process's ids as an array.
  """
  ids = np.asarray(ids)
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
      f"need 0 <= process_index < process_count, got {process_index} and {process_count}"
    )
  if drop_remainder:
    size = len(ids) // process_count
    return ids[process_index * size : (process_index + 1) * size]
  return np.array_split(ids, process_count)[process_index]


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  local_device_ids: Sequence[int] | None = None,
  cpu_collectives: str | None = "gloo",
  auto_detect: bool = False,
) -> None:
  """Starts multi-process JAX (`jax.distributed.initialize`); call before any other JAX use.

  Does nothing for one process (`num_processes` of 1, or no coordinator and no process count
  given) unless `auto_detect`, which lets JAX find the cluster (Cloud TPU, SLURM, ...).

  Args:
    coordinator_address: "host:port" of process 0.
    num_processes: the number of processes.
    process_id: this process's index.
    local_device_ids: restrict this process to these local devices.
    cpu_collectives: collectives implementation for CPU devices ("gloo"); None leaves JAX's
      default (which cannot run cross-process computations on CPU).
    auto_detect: call `jax.distributed.initialize` even without an address or count.
  """
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes must be >= 1, got {num_processes}")
  if num_processes == 1 or (
    coordinator_address is None and num_processes is None and not auto_detect
  ):
    return
  if num_processes is not None and process_id is not None and not (0 <= process_id < num_processes):
    raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
  if cpu_collectives is not None:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    local_device_ids=local_device_ids,
  )


def is_primary() -> bool:
  """Whether this is process 0, the one that writes files and logs progress."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing to do in one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def primary_first(fn: Callable[[], Any], name: str) -> Any:
  """`fn()` on process 0, then, after the barrier `name`, on the others.

  For create-or-reuse steps (a task file, a config record): process 0 creates the file, the
  others then find it (on a shared filesystem) and only read or check it.
  """
  result = fn() if is_primary() else None
  barrier(name)
  return result if is_primary() else fn()
