"""One process of the 2-process `jax.distributed` test, and the tiny set-up the tests share.

Run by tests/test_distributed.py as
  python tests/distributed_worker.py PORT PROCESS_ID NUM_PROCESSES OUT.npz
with XLA_FLAGS giving each process 2 CPU devices. Every process loads only its rows of each
global batch (`process_shard`), builds global arrays from them, runs `NUM_STEPS` sharded
train steps on a mesh over all processes' devices, and process 0 writes the final parameters
and the per-step losses. The test compares them with one process running the same global
batches.
"""

from __future__ import annotations

import sys

import numpy as np

IMAGE_SHAPE = (8, 8, 3)
NUM_CATEGORIES = 3
NUM_AUX_CLASSES = 5
GLOBAL_BATCH = 8
NUM_STEPS = 3


def tiny_model(dtype=None):
  import jax.numpy as jnp

  from rare_jax.models import BasicBlock, BGSplitModel, ResNet

  trunk = ResNet(
    stage_sizes=(1,),
    block_cls=BasicBlock,
    num_filters=4,
    small_stem=True,
    dtype=dtype or jnp.float32,
  )
  return BGSplitModel(trunk, num_categories=NUM_CATEGORIES, num_aux_classes=NUM_AUX_CLASSES)


def tiny_optimizer():
  from rare_jax.deep import train

  return train.make_optimizer(learning_rate=0.1, warmup_steps=0, total_steps=20)


def init_key():
  import jax

  # RBG keys: threefry initialisers compile very slowly on XLA CPU.
  return jax.random.key(0, impl="rbg")


def make_batch(seed: int, batch_size: int = GLOBAL_BATCH, num_padding: int = 0) -> dict:
  """A deterministic train batch; the last `num_padding` rows are padding filled with noise."""
  rng = np.random.default_rng(seed)
  mask = np.arange(batch_size) < batch_size - num_padding
  return {
    "image": rng.normal(size=(batch_size, *IMAGE_SHAPE)).astype(np.float32),
    "labels": (rng.random((batch_size, NUM_CATEGORIES)) > 0.5).astype(np.float32),
    "label_mask": rng.random((batch_size, NUM_CATEGORIES)) > 0.3,
    "aux_labels": rng.integers(0, NUM_AUX_CLASSES, batch_size).astype(np.int32),
    "mask": mask,
  }


def main(port: int, process_id: int, num_processes: int, out_path: str) -> None:
  from rare_jax.infra import sharding

  sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)

  import jax

  from rare_jax.deep import train

  assert jax.process_count() == num_processes, jax.process_count()
  mesh = sharding.make_mesh([("data", -1)])
  model, tx = tiny_model(), tiny_optimizer()
  state, shardings = train.init_sharded_state(
    init_key(), model=model, tx=tx, input_shape=(1, *IMAGE_SHAPE), mesh=mesh
  )
  step = train.jit_step(
    train.train_step, mesh=mesh, state_shardings=shardings, model=model, tx=tx, aux_weight=0.1
  )
  rows = sharding.process_shard(np.arange(GLOBAL_BATCH), process_id, num_processes)
  losses = []
  for i in range(NUM_STEPS):
    global_rows = make_batch(seed=100 + i, num_padding=1)
    local = {k: v[rows] for k, v in global_rows.items()}  # this process's rows only
    batch = sharding.global_batch_from_local(local, mesh)
    assert batch["image"].shape == (GLOBAL_BATCH, *IMAGE_SHAPE)
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.params)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}
  if process_id == 0:
    np.savez(out_path, losses=np.array(losses), num_devices=jax.device_count(), **flat)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
