"""One process of the multi-host deep test: M_pre, its features and one deep update.

Run by tests/test_distributed.py as
  python tests/distributed_deep_worker.py PORT PROCESS_ID NUM_PROCESSES WORKDIR
(NUM_PROCESSES 1 without a coordinator). On the synthetic task of tests/test_deep_loop.py with
a tiny ResNet: pretrains M_pre, embeds the pool and validation set, and runs `ours` for one
deep update of one round; every process loads only its rows of each batch, process 0 writes.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(port: int, process_id: int, num_processes: int, workdir: str) -> None:
  from rare_jax.infra import sharding

  if num_processes > 1:
    sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)

  import ml_collections
  from synthetic import synthetic_images

  from rare_jax import workdirs
  from rare_jax.active import labelers, runner
  from rare_jax.data import tasks
  from rare_jax.deep import updates

  train_labels = np.repeat(np.arange(10), 24)
  eval_labels = np.repeat(np.arange(10), 8)
  task = tasks.make_task(
    train_labels, eval_labels, dataset="synthetic", categories=(3,), seed=0, pool_fraction=0.05
  )
  data = updates.ImageData(
    train=(synthetic_images(train_labels, 1), train_labels),
    eval=(synthetic_images(eval_labels, 2), eval_labels),
  )
  settings = updates.DeepSettings(
    model="resnet_tiny", batch_size=16, embed_batch_size=36, pretrain_epochs=1, epochs=1
  )
  config = ml_collections.ConfigDict(
    dict(
      seed=0,
      batch_size=2,
      pseudo_negative_factor=2.0,
      l2=1.0,
      solver_max_iters=50,
      solver_tol=1e-6,
      num_feature_updates=1,
      rounds_per_update=1,
      feature_normalization="standardize",
    )
  )
  log = print if sharding.is_primary() else (lambda _: None)
  context = workdirs.m_pre_context(workdir, config, task, data, settings, log=log)
  runner.run_strategy(
    run_dir=os.path.join(workdir, "ours"),
    config=config,
    strategy="ours",
    features=context.features,
    val_features=context.val_features,
    seed_ids=task.seed_positives,
    val_ground_truth=task.val_ground_truth(),
    labeler=labelers.SimulatedLabeler(task.ground_truth()),
    updater=context.updater("ours", os.path.join(workdir, "ours"), log=log),
    log=log,
  )


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
