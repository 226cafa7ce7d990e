"""Training: sharded step == single-device step, padding, optimizer, checkpoints, resume."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from distributed_worker import (
  IMAGE_SHAPE,
  init_key,
  make_batch,
  tiny_model,
  tiny_optimizer,
)
from jax.sharding import NamedSharding

from rare_jax.deep import train
from rare_jax.infra import sharding
from rare_jax.infra.checkpoint import CheckpointStore
from rare_jax.models import Classifier, init_from_pretrained

INPUT_SHAPE = (1, *IMAGE_SHAPE)


def assert_trees_close(a, b, rtol=1e-4, atol=1e-5):
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol),
    a,
    b,
  )


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def setup():
  model, tx = tiny_model(), tiny_optimizer()
  init = jax.jit(
    functools.partial(train.create_train_state, model=model, tx=tx, input_shape=INPUT_SHAPE)
  )
  state0 = jax.device_get(init(init_key()))  # host copy: every use makes fresh buffers
  single_step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, aux_weight=0.1))
  mesh = sharding.make_mesh([("data", -1)])
  shardings = sharding.state_shardings(jax.eval_shape(lambda: state0), mesh)
  sharded_step = train.jit_step(
    train.train_step, mesh=mesh, state_shardings=shardings, model=model, tx=tx, aux_weight=0.1
  )

  def fresh_sharded():
    return jax.tree.map(jax.device_put, state0, shardings)

  return {
    "model": model,
    "tx": tx,
    "state0": state0,
    "single_step": single_step,
    "mesh": mesh,
    "shardings": shardings,
    "sharded_step": sharded_step,
    "fresh_sharded": fresh_sharded,
  }


def run_steps(step_fn, state, batches):
  history = []
  for batch in batches:
    state, metrics = step_fn(state, batch)
    history.append(jax.device_get(metrics))
  return state, history


def test_sharded_step_on_8_devices_matches_single_device(setup):
  assert len(setup["mesh"].devices.flat) == 8
  batches = [make_batch(seed=i, num_padding=i % 2) for i in range(3)]
  single, single_metrics = run_steps(setup["single_step"], setup["state0"], batches)
  global_batches = [sharding.global_batch_from_local(b, setup["mesh"]) for b in batches]
  assert len(global_batches[0]["image"].sharding.device_set) == 8
  sharded, sharded_metrics = run_steps(
    setup["sharded_step"], setup["fresh_sharded"](), global_batches
  )
  assert int(sharded.step) == 3
  assert_trees_close(single, sharded)
  assert_trees_close(single_metrics, sharded_metrics)
  # The parameters really moved (the comparison is not between two untouched states).
  moved = jax.tree.map(
    lambda a, b: float(np.max(np.abs(a - b))), single.params, setup["state0"].params
  )
  assert max(jax.tree.leaves(moved)) > 1e-3
  assert all(isinstance(x.sharding, NamedSharding) for x in jax.tree.leaves(sharded))


def test_state_born_sharded(setup):
  state, shardings = train.init_sharded_state(
    init_key(), model=setup["model"], tx=setup["tx"], input_shape=INPUT_SHAPE, mesh=setup["mesh"]
  )
  for leaf, expected in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
    assert leaf.sharding == expected and expected.spec == jax.sharding.PartitionSpec()
  assert_trees_close(state, setup["state0"], rtol=0, atol=0)


def test_fsdp_parameter_sharding_matches_single_device(setup):
  model, tx = setup["model"], setup["tx"]
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  abstract = jax.eval_shape(lambda: setup["state0"])
  shardings = sharding.state_shardings(abstract, mesh, param_axis="fsdp", min_shard_size=64)
  specs = [s.spec for s in jax.tree.leaves(shardings)]
  assert any("fsdp" in tuple(spec) for spec in specs)
  # The momentum follows its parameter's sharding.
  kernel = ("trunk", "stage1_block1", "conv1", "kernel")
  param_spec = functools.reduce(lambda t, k: t[k], kernel, shardings.params).spec
  trace = shardings.opt_state[1].trace  # (weight decay, momentum, schedule) states
  assert functools.reduce(lambda t, k: t[k], kernel, trace).spec == param_spec
  assert "fsdp" in tuple(param_spec)
  step = train.jit_step(
    train.train_step, mesh=mesh, state_shardings=shardings, model=model, tx=tx, aux_weight=0.1
  )
  batches = [make_batch(seed=i) for i in range(2)]
  state = jax.tree.map(jax.device_put, setup["state0"], shardings)
  sharded, _ = run_steps(step, state, [sharding.global_batch_from_local(b, mesh) for b in batches])
  single, _ = run_steps(setup["single_step"], setup["state0"], batches)
  assert_trees_close(single, sharded)


def test_padding_rows_do_not_change_the_step(setup):
  a = make_batch(seed=7, num_padding=3)
  b = dict(a)
  b["image"] = a["image"].copy()
  b["image"][-3:] = 50.0  # different garbage in the padding rows
  b["labels"] = a["labels"].copy()
  b["labels"][-3:] = 1.0 - a["labels"][-3:]
  b["aux_labels"] = a["aux_labels"].copy()
  b["aux_labels"][-3:] = 0
  state_a, metrics_a = setup["single_step"](setup["state0"], a)
  state_b, metrics_b = setup["single_step"](setup["state0"], b)
  assert_trees_close(state_a, state_b, rtol=1e-5, atol=1e-6)
  assert float(metrics_a["num_examples"]) == 5
  np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-6)


def test_training_lowers_the_loss(setup):
  batch = make_batch(seed=11)
  state, history = run_steps(setup["single_step"], setup["state0"], [batch] * 8)
  losses = [float(m["loss"]) for m in history]
  assert losses[-1] < losses[0] - 0.05, losses
  assert int(state.step) == 8


def test_predict_and_eval_step(setup):
  mesh, model = setup["mesh"], setup["model"]
  state = setup["fresh_sharded"]()
  predict = train.jit_predict(model=model, mesh=mesh, state_shardings=setup["shardings"])
  batch = make_batch(seed=3)
  out = predict(state, sharding.global_batch_from_local(batch, mesh))
  assert set(out) == {"embedding", "main_probs", "aux_labels"}
  assert out["embedding"].shape == (8, 4) and out["main_probs"].shape == (8, 3)
  raw = model.apply(jax.device_get(state).variables, batch["image"])
  np.testing.assert_allclose(out["main_probs"], jax.nn.sigmoid(raw["main_logits"]), atol=1e-6)
  np.testing.assert_array_equal(out["aux_labels"], np.argmax(raw["aux_logits"], -1))
  metrics = jax.jit(functools.partial(train.eval_step, model=model))(setup["state0"], batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["num_examples"]) == 8


def test_train_step_rejects_incomplete_batch(setup):
  batch = make_batch(seed=0)
  del batch["label_mask"]
  with pytest.raises(ValueError, match="label_mask"):
    setup["single_step"](setup["state0"], batch)


def test_checkpoint_round_trip_is_exact(setup, tmp_path):
  state, _ = setup["sharded_step"](
    setup["fresh_sharded"](), sharding.global_batch_from_local(make_batch(seed=5), setup["mesh"])
  )
  with CheckpointStore(tmp_path / "ckpt") as store:
    assert train.save_train_state(store, state, metadata={"note": "x"}) == 1
    restored, meta = train.restore_train_state(store, setup["fresh_sharded"]())
  assert meta == {"note": "x"}
  assert isinstance(restored, train.TrainState)
  assert_trees_equal(restored, state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
    assert a.dtype == b.dtype and a.sharding == b.sharding


def test_fit_resumed_equals_uninterrupted(setup, tmp_path):
  data = make_batch(seed=21, batch_size=20)

  def get_batch(step):
    indices, mask = train.step_batch_indices(20, 8, step, seed=3)
    batch = {k: v[indices] for k, v in data.items()}
    batch["mask"] = mask
    return batch

  kwargs = {"step_fn": setup["sharded_step"], "mesh": setup["mesh"], "save_every": 2}
  with CheckpointStore(tmp_path / "a") as store:
    full, history = train.fit(
      setup["fresh_sharded"](), get_batch, end_step=5, store=store, **kwargs
    )
    assert store.all_steps() == [2, 4, 5]
  assert len(history) == 5 and int(full.step) == 5
  with CheckpointStore(tmp_path / "b") as store:
    train.fit(setup["fresh_sharded"](), get_batch, end_step=3, store=store, **kwargs)  # "killed"
    resumed, resumed_history = train.fit(
      setup["fresh_sharded"](), get_batch, end_step=5, store=store, **kwargs
    )
  assert len(resumed_history) == 2  # only steps 4 and 5 ran after the restore
  assert_trees_equal(resumed, full)
  assert resumed_history[-1] == history[-1]


def test_step_batch_indices_covers_each_epoch_once():
  seen = []
  for step in range(3):
    indices, mask = train.step_batch_indices(10, 4, step, seed=1)
    assert indices.shape == mask.shape == (4,)
    seen.extend(indices[mask].tolist())
  assert sorted(seen) == list(range(10))
  _, last_mask = train.step_batch_indices(10, 4, 2, seed=1)
  assert last_mask.tolist() == [True, True, False, False]
  next_epoch = np.concatenate([train.step_batch_indices(10, 4, s, seed=1)[0] for s in (3, 4)])
  first_epoch = np.concatenate([train.step_batch_indices(10, 4, s, seed=1)[0] for s in (0, 1)])
  assert not np.array_equal(next_epoch, first_epoch)  # reshuffled per epoch
  np.testing.assert_array_equal(
    train.step_batch_indices(10, 4, 4, seed=1)[0], train.step_batch_indices(10, 4, 4, seed=1)[0]
  )
  with pytest.raises(ValueError, match="batch_size"):
    train.step_batch_indices(10, 0, 0, seed=1)


def test_optimizer_schedule_and_weight_decay_forms():
  schedule = train.learning_rate_schedule(learning_rate=0.01, warmup_steps=2, total_steps=10)
  np.testing.assert_allclose(
    [schedule(0), schedule(1), schedule(2), schedule(10)], [0.0, 0.005, 0.01, 0.0], atol=1e-8
  )
  with pytest.raises(ValueError, match="warmup_steps"):
    train.make_optimizer(warmup_steps=10, total_steps=10)
  g, wd, m = 0.5, 0.1, 0.9
  kwargs = {"learning_rate": 0.1, "momentum": m, "weight_decay": wd, "total_steps": 10}
  lr = train.learning_rate_schedule(learning_rate=0.1, total_steps=10)
  lr0, lr1 = float(lr(0)), float(lr(1))
  # L2 (PyTorch SGD): decay joins the gradient before momentum.
  p1 = 1.0 - lr0 * (g + wd)
  l2 = p1 - lr1 * (m * (g + wd) + g + wd * p1)
  # Decoupled: decay added after momentum.
  q1 = 1.0 - lr0 * (g + wd)
  decoupled = q1 - lr1 * (m * g + g + wd * q1)
  for flag, expected in ((False, l2), (True, decoupled)):
    tx = train.make_optimizer(decoupled_weight_decay=flag, **kwargs)
    params = {"w": jnp.array(1.0)}
    opt_state = tx.init(params)
    for _ in range(2):
      updates, opt_state = tx.update({"w": jnp.array(g)}, opt_state, params)
      params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(float(params["w"]), expected, rtol=1e-6)
  assert abs(l2 - decoupled) > 1e-5


def test_pretrain_step_and_transfer_to_bgsplit(setup):
  trunk = setup["model"].trunk
  classifier = Classifier(trunk.clone(), num_classes=5)
  tx = tiny_optimizer()
  pre_state = jax.jit(
    functools.partial(train.create_train_state, model=classifier, tx=tx, input_shape=INPUT_SHAPE)
  )(init_key())
  step = jax.jit(functools.partial(train.pretrain_step, model=classifier, tx=tx))
  data = make_batch(seed=4)
  batch = {"image": data["image"], "label": data["aux_labels"], "mask": data["mask"]}
  losses = []
  for _ in range(6):
    pre_state, metrics = step(pre_state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0], losses
  variables = init_from_pretrained(setup["state0"].variables, pre_state.variables)
  out = setup["model"].apply(variables, batch["image"])
  pre_out = classifier.apply(pre_state.variables, batch["image"])
  np.testing.assert_allclose(out["aux_logits"], pre_out["logits"], rtol=1e-5, atol=1e-6)
  state = train.transfer_from_pretrained(setup["state0"], pre_state, tx=setup["tx"])
  assert_trees_equal(state.params, variables["params"])
  assert int(state.step) == 0
  state, metrics = setup["single_step"](state, make_batch(seed=0))  # trains on from M_pre
  assert np.isfinite(float(metrics["loss"]))


def test_bf16_compute_with_f32_state():
  model, tx = tiny_model(dtype=jnp.bfloat16), tiny_optimizer()
  state = jax.jit(
    functools.partial(train.create_train_state, model=model, tx=tx, input_shape=INPUT_SHAPE)
  )(init_key())
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx))
  state, metrics = step(state, make_batch(seed=1))
  dtypes = {
    leaf.dtype for leaf in jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
  }
  assert dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}
  assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
