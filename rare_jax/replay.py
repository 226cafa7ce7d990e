r"""Re-runs a workdir from its first checkpoint with its recorded answers (`rare_jax.replay`).

    python -m rare_jax.replay --workdir=runs/demo [--strategies=ours_linear,tropel]

For every strategy directory, starting from checkpoint 0, each round's query is recomputed and
compared with the answers log, the recorded answers are fed to the same jitted transition, and
the resulting LoopState is compared leaf by leaf, bit for bit, with that round's checkpoint.
Strategies with deep updates retrain every deep model (in a scratch directory) and also compare
the re-embedded features with the recorded ones.
Exits 0 when every round of every strategy is identical, 1 otherwise.

Multi-host (the flags of `rare_jax.infra.distributed_flags`): every process replays; deep updates
retrain collectively in a scratch folder under the workdir (removed afterwards); process 0
prints.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile

import jax
from absl import app, flags, logging

from rare_jax import workdirs
from rare_jax.active import runner
from rare_jax.infra import cli_help, distributed_flags, sharding

_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir (see rare_jax.run).")
_STRATEGIES = flags.DEFINE_list(
  "strategies", None, "Strategies to replay (default: all in the workdir's config)."
)
flags.mark_flag_as_required("workdir")
distributed_flags.define()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed_flags.initialize()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  workdir = _WORKDIR.value
  context = workdirs.load(workdir)
  strategies = _STRATEGIES.value or list(context.config.strategies)
  log = print if sharding.is_primary() else (lambda _: None)
  results = {}
  for strategy in strategies:
    run_dir = os.path.join(workdir, strategy)
    with _scratch(workdir, strategy) as scratch:
      results[strategy] = runner.replay_strategy(
        run_dir=run_dir,
        config=context.config,
        strategy=strategy,
        features=context.features,
        seed_ids=context.task.seed_positives,
        updater=context.updater(strategy, scratch, log=log),
        recorded=context.updater(strategy, run_dir, log=log),
        log=log,
      )
  for strategy, ok in results.items():
    log(f"{strategy}: {'identical' if ok else 'MISMATCH'}")
  sys.exit(0 if all(results.values()) else 1)


@contextlib.contextmanager
def _scratch(workdir: str, strategy: str):
  """Where retrained deep models go: a temporary folder, or in a multi-host run one folder
  under the workdir that every process sees (Orbax saves there collectively)."""
  if jax.process_count() == 1:
    with tempfile.TemporaryDirectory(prefix="replay-") as scratch:
      yield scratch
    return
  scratch = os.path.join(workdir, f".replay-scratch-{strategy}")
  if sharding.is_primary():
    shutil.rmtree(scratch, ignore_errors=True)
  sharding.barrier(f"replay:scratch:{scratch}")
  try:
    yield scratch
  finally:
    sharding.barrier(f"replay:done:{scratch}")
    if sharding.is_primary():
      shutil.rmtree(scratch, ignore_errors=True)


def run():
  cli_help.run(main)


if __name__ == "__main__":
  run()
