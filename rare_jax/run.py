r"""Runs the active loop on a rare-category task: `rare-jax-run` (`python -m rare_jax.run`).

    rare-jax-run --workdir=runs/demo [--config=experiments/configs/demo.py] \
        [--config.seed=1 --config.strategies='("tropel",)' ...]

--config defaults to the demo shipped with the package (rare_jax/configs/demo.py); --help lists
the config's fields with their values and meanings, and any field can be set with
--config.FIELD=VALUE.

Builds (or reloads) the task, the cached features and, per strategy of `config.strategies`,
runs N*Q rounds with the simulated labeler, writing `WORKDIR/<strategy>/{checkpoints,
answers.jsonl,metrics.jsonl}`, `WORKDIR/f1_vs_labels.png` and a line per start in
`WORKDIR/provenance.jsonl` (versions, CPU model: rare_jax.infra.provenance). Started again
with the same command, it resumes every strategy from its newest checkpoint; a workdir holding
another config is refused.

Multi-host: start the same command in every process with --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (or --coordinator_address=auto); the workdir must be on a
filesystem all processes see. Every process computes the (small, replicated) loop state and
the sharded deep steps; process 0 alone writes files and prints progress.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from rare_jax import workdirs
from rare_jax.active import labelers, metrics, runner
from rare_jax.configs import demo as demo_config
from rare_jax.configs import fields
from rare_jax.deep import strategies
from rare_jax.infra import cli_help, distributed_flags, provenance, sharding

DEMO_CONFIG = os.path.abspath(demo_config.__file__)
_CONFIG = config_flags.DEFINE_config_file(
  "config",
  DEMO_CONFIG,
  "Run config file (ml_collections); default: the demo shipped with the package.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run (created).")
flags.mark_flags_as_required(["workdir"])
distributed_flags.define()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed_flags.initialize()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  log = print if sharding.is_primary() else _quiet
  config = _CONFIG.value
  workdir = _WORKDIR.value
  started = time.perf_counter()
  try:
    context = workdirs.prepare(workdir, config, log=log)
  except ValueError as error:  # a bad config, weights file or workdir: one line, status 2
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  if sharding.is_primary():
    provenance.append_jsonl(os.path.join(workdir, "provenance.jsonl"))
  log(context.task.summary())
  records_by_strategy = {}
  for strategy in config.strategies:
    if runner.strategy_spec(strategy)["kind"] == "fully_supervised":
      # One model on every pool label: a level, not a curve (printed, not plotted).
      strategies.run_fully_supervised(
        run_dir=os.path.join(workdir, strategy), context=context, log=log
      )
      continue
    records_by_strategy[strategy] = runner.run_strategy(
      run_dir=os.path.join(workdir, strategy),
      config=config,
      strategy=strategy,
      features=context.features,
      val_features=context.val_features,
      seed_ids=context.task.seed_positives,
      val_ground_truth=context.task.val_ground_truth(),
      val_weights=context.task.val_weights,
      labeler=labelers.SimulatedLabeler(context.task.ground_truth()),
      updater=context.updater(strategy, log=log),
      log=log,
    )
    deep_records = [
      dict(r["deep"], labels_per_category=r["labels_per_category"])
      for r in records_by_strategy[strategy]
      if "deep" in r
    ]
    if deep_records:
      records_by_strategy[f"{strategy} (deep head)"] = deep_records
  plot = os.path.join(workdir, "f1_vs_labels.png")
  if sharding.is_primary():
    metrics.plot_f1_vs_labels(
      records_by_strategy, plot, category_names=list(context.task.category_names)
    )
  for strategy, records in records_by_strategy.items():
    curve = ", ".join(f"{r['labels_per_category']}:{r['mean_f1']:.3f}" for r in records)
    log(f"{strategy}: mean F1 by labels/category: {curve}")
  log(f"wrote {plot} ({time.perf_counter() - started:.0f}s in all)")


def _quiet(_: str) -> None:
  """The progress log of processes other than 0: nothing."""


def describe_config(argv: list[str]) -> None:
  """Prints the fields of the config argv selects (with its overrides), values and meanings."""
  try:  # --workdir is required for a run, not for help; a --workdir in argv comes later.
    flags.FLAGS([argv[0], "--workdir=.", *argv[1:]])
  except flags.Error as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  print()
  print(
    f"Config fields of {flags.FLAGS['config'].config_filename} (set any with --config.FIELD=VALUE):"
  )
  print("\n".join(fields.describe(_CONFIG.value)))


def run():
  cli_help.run(main, describe=describe_config)


if __name__ == "__main__":
  run()
