"""Algorithm 1 with deep updates on a tiny synthetic image task, in process.

M_pre is pretrained, the pool embedded, and `ours` runs N=2 feature updates x Q=2 rounds: each
update trains the background-splitting model, re-embeds and refits the linear models. Checks
that updates happen and change the features, that a run stopped mid-way and resumed ends
bit-identical to an uninterrupted one (deep checkpoints and feature stores included), and that
replay retrains the deep models and reports equality.
"""

import functools
import os

import jax
import ml_collections
import numpy as np
import pytest
from synthetic import synthetic_images

from rare_jax import deep, labelers, runner, workdirs
from rare_jax.data import tasks

quiet = lambda _: None


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
  root = tmp_path_factory.mktemp("deep_loop")
  train_labels = np.repeat(np.arange(10), 60)
  eval_labels = np.repeat(np.arange(10), 20)
  task = tasks.make_task(
    train_labels, eval_labels, dataset="synthetic", categories=(3,), seed=0, pool_fraction=0.03
  )
  data = deep.ImageData(
    train=(synthetic_images(train_labels, 1), train_labels),
    eval=(synthetic_images(eval_labels, 2), eval_labels),
  )
  settings = deep.DeepSettings(
    model="resnet_tiny", batch_size=32, embed_batch_size=64, pretrain_epochs=2, epochs=1
  )
  config = ml_collections.ConfigDict(
    dict(
      seed=0,
      batch_size=3,
      pseudo_negative_factor=2.0,
      l2=1.0,
      solver_max_iters=100,
      solver_tol=1e-6,
      num_feature_updates=2,
      rounds_per_update=2,
      feature_normalization="standardize",
    )
  )
  context = workdirs.m_pre_context(str(root), config, task, data, settings, log=quiet)
  features, val_features = context.features, context.val_features

  def updater(run_dir):
    return context.updater("ours", str(run_dir), log=quiet)

  def run(run_dir, stop_after=None):
    return runner.run_strategy(
      run_dir=str(run_dir),
      config=config,
      strategy="ours",
      features=features,
      val_features=val_features,
      seed_ids=task.seed_positives,
      val_ground_truth=task.val_ground_truth(),
      labeler=labelers.SimulatedLabeler(task.ground_truth()),
      updater=updater(run_dir),
      log=quiet,
      stop_after=stop_after,
    )

  def replay(run_dir, scratch):
    return runner.replay_strategy(
      run_dir=str(run_dir),
      config=config,
      strategy="ours",
      features=features,
      seed_ids=task.seed_positives,
      updater=updater(scratch),
      recorded=updater(run_dir),
      log=quiet,
    )

  records = run(root / "uninterrupted")
  return dict(
    root=root,
    run=run,
    replay=replay,
    updater=updater,
    records=records,
    features=features,
    pretrain=functools.partial(deep.pretrain, task, data, settings, str(root / "m_pre"), seed=0),
    m_pre_variables=context.deep_parts["m_pre_variables"],
    like=runner.abstract_state(features, task.seed_positives, 0),
  )


def final_state(setting, run_dir):
  from rare_jax.checkpoint import CheckpointStore

  with CheckpointStore(os.path.join(run_dir, "checkpoints")) as store:
    return store.restore(store.latest_step(), setting["like"])[0]


def test_pretraining_again_restores_the_finished_model(setting):
  calls = []
  _, again = setting["pretrain"](log=calls.append)
  assert calls == []  # no epoch trained again
  assert runner.differing_leaves(again.variables, setting["m_pre_variables"]) == []


def test_deep_updates_every_q_rounds_change_features(setting):
  records = setting["records"]
  assert [r["round"] for r in records] == [1, 2, 3, 4]
  assert ["deep" in r for r in records] == [False, True, False, True]
  for record in records:
    if "deep" in record:
      assert 0.0 <= record["deep"]["mean_ap"] <= 1.0
  updater = setting["updater"](setting["root"] / "uninterrupted")
  v0, v1, v2 = (updater.features(v)[0] for v in range(3))
  assert v1.shape == v0.shape and not np.array_equal(v0, v1) and not np.array_equal(v1, v2)
  for version in (1, 2):
    assert os.path.isdir(setting["root"] / "uninterrupted" / "deep" / f"v{version}")


def test_stopped_and_resumed_run_is_identical(setting):
  run_dir = setting["root"] / "resumed"
  setting["run"](run_dir, stop_after=3)  # one deep update done, the next one pending
  setting["run"](run_dir)
  a = final_state(setting, setting["root"] / "uninterrupted")
  b = final_state(setting, run_dir)
  assert int(b.round) == 4
  assert runner.differing_leaves(a, b) == []
  updater_a = setting["updater"](setting["root"] / "uninterrupted")
  updater_b = setting["updater"](run_dir)
  assert runner.differing_leaves(updater_a.features(2), updater_b.features(2)) == []


def test_replay_retrains_the_deep_models_and_reports_equality(setting, tmp_path):
  # Tampering is caught by the same comparison (tests/test_run.py shows it on a CLI run).
  assert setting["replay"](setting["root"] / "uninterrupted", tmp_path / "scratch")


def test_strategy_and_updater_must_match(setting):
  with pytest.raises(ValueError, match="needs deep updater"):
    runner.run_strategy(
      run_dir=str(setting["root"] / "x"),
      config=ml_collections.ConfigDict(),
      strategy="ours",
      features=setting["features"],
      val_features=None,
      seed_ids=None,
      val_ground_truth=None,
      labeler=None,
    )
  assert jax.device_count() == 8  # conftest's fake devices: the deep model's mesh spans them
