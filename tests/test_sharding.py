"""Meshes, sharding rules, global batches from local data, process shards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rare_jax.infra import sharding


def test_make_mesh_from_specs():
  mesh = sharding.make_mesh([("data", -1)])
  assert mesh.axis_names == ("data",) and mesh.shape["data"] == 8
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  mesh = sharding.make_mesh([["data", 4]], devices=jax.devices()[:4])
  assert mesh.devices.size == 4


@pytest.mark.parametrize(
  "axes, match",
  [
    ([("data", 3)], "need 3 devices"),
    ([("data", -1), ("fsdp", -1)], "at most one -1"),
    ([("data", 2), ("data", 4)], "distinct"),
    ([("data", 3), ("fsdp", -1)], "divide"),
    ([], "non-empty"),
  ],
)
def test_make_mesh_rejects_bad_specs(axes, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(axes)


def test_batch_sharding_splits_over_data_axes_only():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("model", 2)])
  assert sharding.batch_axes(mesh) == ("data", "fsdp")
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
  assert sharding.batch_sharding(mesh, ["data"]).spec == P(("data",))
  with pytest.raises(ValueError, match="not in mesh"):
    sharding.batch_sharding(mesh, ["batch"])


def test_state_shardings_rule():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  tree = {
    "kernel": jax.ShapeDtypeStruct((3, 3, 64, 128), jnp.float32),
    "odd": jax.ShapeDtypeStruct((3, 3, 7, 9), jnp.float32),
    "bias": jax.ShapeDtypeStruct((128,), jnp.float32),
    "step": jax.ShapeDtypeStruct((), jnp.int32),
  }
  replicated = sharding.state_shardings(tree, mesh)
  assert all(s.spec == P() for s in jax.tree.leaves(replicated))
  fsdp = sharding.state_shardings(tree, mesh, param_axis="fsdp", min_shard_size=500)
  assert fsdp["kernel"].spec == P(None, None, None, "fsdp")  # the largest divisible dim
  assert fsdp["odd"].spec == P()  # no dimension divisible by 4
  assert fsdp["bias"].spec == P() and fsdp["step"].spec == P()  # too small
  with pytest.raises(ValueError, match="param_axis"):
    sharding.state_shardings(tree, mesh, param_axis="model")


def test_global_batch_from_local_in_one_process():
  mesh = sharding.make_mesh([("data", -1)])
  local = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "mask": np.ones(16, bool)}
  batch = sharding.global_batch_from_local(local, mesh)
  assert batch["image"].shape == (16, 3)
  assert batch["image"].sharding.spec == P(("data",))
  assert len(batch["image"].addressable_shards) == 8
  assert batch["image"].addressable_shards[1].data.shape == (2, 3)
  np.testing.assert_array_equal(np.asarray(batch["image"]), local["image"])


def test_process_shard():
  ids = np.arange(10)
  shards = [sharding.process_shard(ids, i, 3) for i in range(3)]
  np.testing.assert_array_equal(np.concatenate(shards), ids)  # contiguous, complete
  assert [len(s) for s in shards] == [4, 3, 3]
  even = [sharding.process_shard(ids, i, 3, drop_remainder=True) for i in range(3)]
  assert [len(s) for s in even] == [3, 3, 3]
  np.testing.assert_array_equal(sharding.process_shard(ids), ids)  # one process: everything
  with pytest.raises(ValueError, match="process_index"):
    sharding.process_shard(ids, 3, 3)


def test_initialize_distributed_single_process_is_a_no_op():
  sharding.initialize_distributed()  # nothing given: one process
  sharding.initialize_distributed("127.0.0.1:1", num_processes=1, process_id=0)
  assert jax.process_count() == 1
  with pytest.raises(ValueError, match="process_id"):
    sharding.initialize_distributed("127.0.0.1:1", num_processes=2, process_id=2)
