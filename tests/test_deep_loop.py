"""Algorithm 1 with deep updates on a tiny synthetic image task, in process.

M_pre is pretrained, the pool embedded, and `ours` runs N=2 feature updates x Q=2 rounds: each
update trains the background-splitting model, re-embeds and refits the linear models. Checks
that updates happen and change the features, that a run stopped mid-way and resumed ends
bit-identical to an uninterrupted one (deep checkpoints and feature stores included), and that
replay retrains the deep models and reports equality.
"""

import dataclasses
import functools
import os

import jax
import ml_collections
import numpy as np
import pytest
from synthetic import synthetic_images

from rare_jax import models, workdirs
from rare_jax.active import labelers, runner
from rare_jax.data import tasks
from rare_jax.deep import embed as embed_lib
from rare_jax.deep import updates

quiet = lambda _: None


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
  root = tmp_path_factory.mktemp("deep_loop")
  train_labels = np.repeat(np.arange(10), 60)
  eval_labels = np.repeat(np.arange(10), 20)
  task = tasks.make_task(
    train_labels, eval_labels, dataset="synthetic", categories=(3,), seed=0, pool_fraction=0.03
  )
  data = updates.ImageData(
    train=(synthetic_images(train_labels, 1), train_labels),
    eval=(synthetic_images(eval_labels, 2), eval_labels),
  )
  settings = updates.DeepSettings(
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
    pretrain=functools.partial(updates.pretrain, task, data, settings, str(root / "m_pre"), seed=0),
    m_pre_variables=context.deep_parts["m_pre_variables"],
    # The variables update 1 starts from before its head is chosen (M_pre's trunk).
    m_pre_like=lambda u: models.init_from_pretrained(u._like().variables, u.m_pre_variables),
    engine=runner.Engine(runner.loop_config(config, "ours")),
    like=runner.abstract_state(features, task.seed_positives, 0),
  )


def final_state(setting, run_dir):
  from rare_jax.infra.checkpoint import CheckpointStore

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
  updater = setting["updater"](setting["root"] / "uninterrupted")
  chance = updater.task.val_ground_truth().mean()  # the AP of a random ranking
  for record in records:
    if "deep" in record:
      assert 0.5 < record["deep"]["mean_ap"] <= 1.0 and chance < 0.05
  v0, v1, v2 = (updater.features(v)[0] for v in range(3))
  assert v1.shape == v0.shape and not np.array_equal(v0, v1) and not np.array_equal(v1, v2)
  for version in (1, 2):
    assert os.path.isdir(setting["root"] / "uninterrupted" / "deep" / f"v{version}")


def test_deep_update_learns_the_loop_labels(setting, tmp_path):
  """An update trained on the loop's labels (L_p, L_n, W_n) ranks held-out validation
  positives above negatives. Its main head starts fresh ("random"), so the ranking comes from
  the update's training, not from folded linear models; with its labels flipped the same
  update gives AP ~0.02 (chance ~0.03) and positives below negatives (measured)."""
  state = final_state(setting, setting["root"] / "uninterrupted")
  updater = setting["updater"](tmp_path / "fresh_head")
  updater.settings = dataclasses.replace(
    updater.settings, main_head_init="random", epochs=10, learning_rate=0.1
  )
  _, _, result = updater.update(state, 1)
  truth = updater.task.val_ground_truth()[0]
  val = embed_lib.FeatureStore.open(str(tmp_path / "fresh_head" / "features" / "v1" / "val"))
  probabilities = np.asarray(val["main_probs"])[:, 0]
  assert result["mean_ap"] > 0.5 > 10 * truth.mean()  # measured 0.81 (0.02 on flipped labels)
  assert probabilities[truth].mean() > probabilities[~truth].mean() + 0.05


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


class _Started(Exception):
  """Raised by a stand-in `bgsplit_update` to hand back the variables an update starts from."""


@pytest.mark.parametrize("init", updates.MAIN_HEAD_INITS)
def test_main_head_start_of_each_update(setting, monkeypatch, init):
  """ "linear" folds the linear models into the head at every update, "linear_first" at the
  first only, then (like "random") continues M_{i-1}'s own head (Algorithm 1 line 19)."""

  def started(**kwargs):
    raise _Started(kwargs["start_variables"])

  monkeypatch.setattr(updates, "bgsplit_update", started)
  run_dir = setting["root"] / "uninterrupted"
  updater = setting["updater"](run_dir)
  updater.settings = dataclasses.replace(updater.settings, main_head_init=init)
  state = final_state(setting, run_dir)
  heads = {}
  for version in (1, 2):
    with pytest.raises(_Started) as started_with:
      updater.update(state, version)
    heads[version] = started_with.value.args[0]["params"]["main_head"]
  folded = {
    version: updater._linear_main_head(
      updater.trained_variables(1) if version == 2 else setting["m_pre_like"](updater),
      state,
      version - 1,
    )["params"]["main_head"]
    for version in (1, 2)
  }
  same = lambda a, b: runner.differing_leaves(a, b) == []  # noqa: E731
  trained_v1 = updater.trained_variables(1)["params"]["main_head"]
  assert same(heads[1], folded[1]) == (init != "random")
  assert same(heads[2], folded[2]) == (init == "linear")
  assert same(heads[2], trained_v1) == (init != "linear")


def test_update_without_warm_start_restarts_from_m_pre(setting, monkeypatch):
  """deep.warm_start=False: update 2 starts from M_pre's trunk again, its head folded from
  linear models refitted on M_pre's features (not the loop's, which live on update 1's)."""

  def started(**kwargs):
    raise _Started(kwargs["start_variables"])

  monkeypatch.setattr(updates, "bgsplit_update", started)
  run_dir = setting["root"] / "uninterrupted"
  updater = setting["updater"](run_dir)
  updater.settings = dataclasses.replace(updater.settings, warm_start=False)
  state = final_state(setting, run_dir)
  with pytest.raises(ValueError, match="needs the loop's refit"):
    updater.update(state, 2)
  refits = []

  def refit(state, features):
    refits.append(features)
    return setting["engine"].refit_on(state, features)

  updater.refit = refit
  with pytest.raises(_Started) as started_with:
    updater.update(state, 2)
  start = started_with.value.args[0]
  assert len(refits) == 1 and refits[0] is updater.base_features[0]
  m_pre = setting["m_pre_like"](updater)
  assert runner.differing_leaves(start["params"]["trunk"], m_pre["params"]["trunk"]) == []
  v1 = updater.trained_variables(1)
  assert runner.differing_leaves(start["params"]["trunk"], v1["params"]["trunk"]) != []
  expected = updater._linear_main_head(m_pre, refit(state, updater.base_features[0]), 0)
  assert (
    runner.differing_leaves(start["params"]["main_head"], expected["params"]["main_head"]) == []
  )
