r"""Pretrains M_pre and caches its features: `python -m rare_jax.pretrain`.

    python -m rare_jax.pretrain --config=experiments/configs/demo.py --workdir=runs/demo

Algorithm 1 lines 1-2 on their own: builds (or reloads) the task, gets M_pre as
config.deep.init says (rare_jax/deep/m_pre.py: pretrained weights, training on the task's related-
domain split, or the self-supervised stage), and embeds the pool (with M_pre's hard
predictions, the auxiliary labels) and the validation set into WORKDIR/features. `rare_jax.run`
with the same config and workdir then starts from these files instead of training again.
Interrupted, it resumes from the last epoch's checkpoint and the feature stores' recorded
progress.

Multi-host: the same command in every process with the flags of `rare_jax.infra.distributed_flags`
(--coordinator_address, --num_processes, --process_id); each process loads its rows of every
batch, Orbax saves collectively, process 0 writes the feature stores and prints.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rare_jax import workdirs
from rare_jax.infra import cli_help, distributed_flags, sharding

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Run config file (ml_collections).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run (created).")
flags.mark_flags_as_required(["config", "workdir"])
distributed_flags.define()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed_flags.initialize()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  config = _CONFIG.value
  if config.features != "m_pre":
    raise app.UsageError(f"config.features is {config.features!r}; pretraining needs 'm_pre'")
  log = print if sharding.is_primary() else (lambda _: None)
  try:
    context = workdirs.prepare(_WORKDIR.value, config, log=log)
  except ValueError as error:  # a bad config, weights file or workdir: one line, status 2
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  log(context.task.summary())
  log(
    f"M_pre features: pool {tuple(context.features.shape)}, validation "
    f"{tuple(context.val_features.shape)}, {len(set(context.aux_labels.tolist()))} distinct "
    f"auxiliary labels on the pool -> {_WORKDIR.value}/features"
  )


def run():
  cli_help.run(main)


if __name__ == "__main__":
  run()
