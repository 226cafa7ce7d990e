"""Feature store: sharded batched inference to disk, interrupted runs resume exactly."""

import json
import logging

import jax
import ml_dtypes
import numpy as np
import pytest
from distributed_worker import IMAGE_SHAPE, init_key, tiny_model, tiny_optimizer

from rare_jax.deep import embed, train
from rare_jax.infra import sharding

NUM_ROWS, BATCH = 21, 8  # 3 batches, the last one padded with 3 masked rows


def make_batches():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(NUM_ROWS, *IMAGE_SHAPE)).astype(np.float32)
  batches = []
  for start in range(0, NUM_ROWS, BATCH):
    rows = np.arange(start, start + BATCH)
    mask = rows < NUM_ROWS
    rows = np.where(mask, rows, 0)
    batches.append({"image": images[rows], "mask": mask, "index": np.where(mask, 1000 + rows, -1)})
  return images, batches


@pytest.fixture(scope="module")
def setup():
  model, tx = tiny_model(), tiny_optimizer()
  mesh = sharding.make_mesh([("data", -1)])
  state, shardings = train.init_sharded_state(
    init_key(), model=model, tx=tx, input_shape=(1, *IMAGE_SHAPE), mesh=mesh
  )
  predict = train.jit_predict(model=model, mesh=mesh, state_shardings=shardings)
  calls = []

  def predict_fn(batch):
    calls.append(1)
    return embed.make_predict_fn(state, predict=predict, mesh=mesh)(batch)

  images, batches = make_batches()
  expected = model.apply(jax.device_get(state).variables, images)
  return {"predict_fn": predict_fn, "calls": calls, "batches": batches, "expected": expected}


def interrupted(batches, after):
  for i, batch in enumerate(batches):
    if i == after:
      raise RuntimeError("killed")
    yield batch


def run(setup, directory, batches=None, **kwargs):
  setup["calls"].clear()
  store = embed.embed_to_store(
    setup["predict_fn"],
    setup["batches"] if batches is None else batches,
    directory,
    NUM_ROWS,
    4,
    **kwargs,
  )
  return store, len(setup["calls"])


def test_store_holds_the_model_outputs(setup, tmp_path):
  store, calls = run(setup, tmp_path / "full")
  assert calls == 3 and store.complete and store.rows_done == NUM_ROWS
  assert sorted(store.fields) == ["aux_labels", "embedding", "index", "main_probs"]
  assert (tmp_path / "full" / "features.npy").exists()
  assert isinstance(store.features, np.memmap) and store.features.shape == (NUM_ROWS, 4)
  np.testing.assert_allclose(store.features, setup["expected"]["embedding"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    store["main_probs"], jax.nn.sigmoid(setup["expected"]["main_logits"]), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_array_equal(store["index"], 1000 + np.arange(NUM_ROWS))
  assert store["aux_labels"].dtype == np.int32
  # A finished store is not recomputed.
  again, calls = run(setup, tmp_path / "full")
  assert calls == 0 and again.complete


def test_interrupted_run_resumes_to_identical_features(setup, tmp_path):
  full, _ = run(setup, tmp_path / "full")
  with pytest.raises(RuntimeError, match="killed"):
    run(setup, tmp_path / "part", batches=interrupted(setup["batches"], after=2))
  meta = json.loads((tmp_path / "part" / "meta.json").read_text())
  assert meta["rows_done"] == 16 and meta["batches_done"] == 2 and not meta["complete"]
  resumed, calls = run(setup, tmp_path / "part")
  assert calls == 1  # only the batch that was not done
  for name in full.fields:
    np.testing.assert_array_equal(resumed[name], full[name], err_msg=name)


def test_resume_with_a_batch_source_that_starts_mid_way(setup, tmp_path):
  with pytest.raises(RuntimeError):
    run(setup, tmp_path / "s", batches=interrupted(setup["batches"], after=1))
  starts = []

  def source(first_batch):
    starts.append(first_batch)
    return iter(setup["batches"][first_batch:])

  store, calls = run(setup, tmp_path / "s", batches=source)
  assert starts == [1] and calls == 2
  np.testing.assert_allclose(store.features, setup["expected"]["embedding"], rtol=1e-5, atol=1e-6)


def test_bfloat16_store(setup, tmp_path):
  full, _ = run(setup, tmp_path / "f32")
  store, _ = run(setup, tmp_path / "bf16", dtype="bfloat16")
  assert store.features.dtype == ml_dtypes.bfloat16
  assert np.load(tmp_path / "bf16" / "features.npy", mmap_mode="r").dtype == np.uint16
  np.testing.assert_array_equal(
    np.asarray(store.features), np.asarray(full.features).astype(ml_dtypes.bfloat16)
  )


def test_mismatches_raise(setup, tmp_path):
  run(setup, tmp_path / "x")
  with pytest.raises(ValueError, match="overwrite"):
    embed.embed_to_store(setup["predict_fn"], setup["batches"], tmp_path / "x", NUM_ROWS, 8)
  with pytest.raises(ValueError, match="held 16 rows"):
    run(setup, tmp_path / "y", batches=setup["batches"][:2])
  with pytest.raises(ValueError, match=r"embedding' \[B, 8\]"):
    embed.embed_to_store(setup["predict_fn"], setup["batches"], tmp_path / "z", NUM_ROWS, 8)
  with pytest.raises(ValueError, match="no feature store"):
    embed.FeatureStore.open(tmp_path / "nothing")


def test_plain_array_predict_fn(tmp_path):
  _, batches = make_batches()
  predict_fn = lambda batch: batch["image"].mean(axis=(1, 2))  # [B, H, W, C] -> [B, C]
  store = embed.embed_to_store(predict_fn, batches, tmp_path / "p", NUM_ROWS, 3, progress=False)
  images = np.concatenate([b["image"][b["mask"]] for b in batches])
  np.testing.assert_allclose(store.features, images.mean(axis=(1, 2)), rtol=1e-6)
  assert sorted(store.fields) == ["embedding", "index"]


def test_progress_is_logged_with_a_rate(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  _, batches = make_batches()
  embed.embed_to_store(
    lambda b: b["image"].mean(axis=(1, 2)), batches, tmp_path / "p", NUM_ROWS, 3, log_every_s=0
  )
  messages = [r.getMessage() for r in caplog.records]
  assert any("16/21 rows" in m and "rows/s" in m for m in messages), messages
  assert any("done, 21 rows" in m for m in messages), messages
