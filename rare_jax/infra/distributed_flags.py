"""The multi-host flags every command shares, and the `jax.distributed` start they ask for.

An entry point calls `define()` where it defines its other flags and `initialize()` first
thing in `main` (before any JAX computation):

    --coordinator_address=HOST:PORT --num_processes=N --process_id=I   explicit cluster
    --coordinator_address=auto                                         JAX detects it
                                                                       (Cloud TPU, SLURM,
                                                                       Open MPI, ...)
    (none of them)                                                     one process

`auto` calls `jax.distributed.initialize()` without arguments; `--num_processes` and
`--process_id`, if given, are passed on. CPU devices use gloo collectives.
"""

from __future__ import annotations

from absl import flags

from rare_jax.infra import sharding

AUTO = "auto"
_NAMES = ("coordinator_address", "num_processes", "process_id")


def define() -> None:
  """Defines --coordinator_address, --num_processes and --process_id (idempotent)."""
  if _NAMES[0] in flags.FLAGS:
    return
  flags.DEFINE_string(
    "coordinator_address",
    None,
    "Multi-host runs: HOST:PORT of process 0's coordinator, or 'auto' to let JAX detect the "
    "cluster (Cloud TPU, SLURM, Open MPI). Unset: one process. Every process runs the same "
    "command with its own --process_id; process 0 writes the files.",
  )
  flags.DEFINE_integer(
    "num_processes", None, "Multi-host runs: the number of processes.", lower_bound=1
  )
  flags.DEFINE_integer(
    "process_id",
    None,
    "Multi-host runs: this process's index in [0, num_processes).",
    lower_bound=0,
  )


def settings() -> dict:
  """The flags as keyword arguments of `sharding.initialize_distributed`.

  Raises:
    ValueError: on a process count or id without a coordinator, or a process id outside
      [0, num_processes).
  """
  address, count, index = (flags.FLAGS[name].value for name in _NAMES)
  auto = address == AUTO
  if address is None and (count is not None or index is not None) and count != 1:
    raise ValueError(
      f"--num_processes={count} --process_id={index} need --coordinator_address=HOST:PORT "
      "(or 'auto')"
    )
  if address is not None and not auto and (count is None or index is None):
    raise ValueError(
      f"--coordinator_address={address!r} needs --num_processes and --process_id (or use "
      "--coordinator_address=auto)"
    )
  if count is not None and index is not None and not 0 <= index < count:
    raise ValueError(f"--process_id={index}; expected 0 <= process_id < --num_processes={count}")
  return dict(
    coordinator_address=None if auto else address,
    num_processes=count,
    process_id=index,
    auto_detect=auto,
  )


def initialize() -> None:
  """Starts `jax.distributed` as the flags say (nothing for one process)."""
  sharding.initialize_distributed(**settings())
