"""Prints (and optionally saves) a rare-category task.

  python -m rare_jax.task_summary --dataset=rare_fashion_mnist --categories=0,3,7 --seed=0 \
      --pool_fraction=0.002 [--data_dir=DIR] [--workdir=runs/task]

Shows the pool size, positives per category and their fraction, the seed ids, validation
counts and the related-domain (pretraining) split size; with --workdir writes task.json there.
Console script: `rare-jax-task`.
"""

from __future__ import annotations

import sys

from absl import app, flags

from rare_jax.data import tasks
from rare_jax.infra import cli_help

_DATASET = flags.DEFINE_string("dataset", "rare_fashion_mnist", "TFDS dataset name.")
_CATEGORIES = flags.DEFINE_list("categories", ["0", "3", "7"], "Rare category ids.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every random choice of the task.")
_POOL_FRACTION = flags.DEFINE_float(
  "pool_fraction", 0.002, "Each rare category's fraction of the pool and validation set."
)
_NUM_SEED_POSITIVES = flags.DEFINE_integer("num_seed_positives", 5, "Seed positives per category.")
_PRETRAIN_FRACTION = flags.DEFINE_float(
  "pretrain_fraction", 0.5, "Share of the train split cut off as the related domain."
)
_TRAIN_SPLIT = flags.DEFINE_string("train_split", "train", "Split of the pool and pretraining.")
_EVAL_SPLIT = flags.DEFINE_string("eval_split", "test", "Split of the validation set.")
_VALIDATION = flags.DEFINE_enum(
  "validation",
  "subsample",
  list(tasks.VALIDATION_MODES),
  "Validation set at the pool's imbalance: the eval split with its rare categories subsampled, "
  "or all of it with rare images weighted k/n (rare_jax.data.tasks).",
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data folder (default: TFDS's).")
_WORKDIR = flags.DEFINE_string("workdir", None, "If set, write task.json into this folder.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    categories = [int(c) for c in _CATEGORIES.value]
  except ValueError:
    sys.exit(f"error: --categories={','.join(_CATEGORIES.value)}; expected integer class ids")
  try:
    task = tasks.task_from_dataset(
      _DATASET.value,
      categories,
      _SEED.value,
      _DATA_DIR.value,
      train_split=_TRAIN_SPLIT.value,
      eval_split=_EVAL_SPLIT.value,
      pool_fraction=_POOL_FRACTION.value,
      num_seed_positives=_NUM_SEED_POSITIVES.value,
      pretrain_fraction=_PRETRAIN_FRACTION.value,
      validation=_VALIDATION.value,
    )
  except ValueError as error:
    sys.exit(f"error: {error}")
  print(task.summary())
  if _WORKDIR.value:
    print(f"saved {task.save(_WORKDIR.value)}")


def run() -> None:
  """Console-script entry point (`rare-jax-task`)."""
  cli_help.run(main)


if __name__ == "__main__":
  run()
