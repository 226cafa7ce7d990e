"""`runner.run_strategy(update_after=...)`: deep updates after the rounds a caller chooses (the
labeling page's button), resumed exactly after a kill during an update or after it."""

import numpy as np
import pytest

from rare_jax.active import runner
from rare_jax.infra.checkpoint import CheckpointStore
from rare_jax.webapp import folder_run

POOL, DIM = 60, 8


class FakeUpdater:
  """Version v's features are the base plus v times a fixed perturbation; `fail` raises in the
  first update (a kill during it)."""

  def __init__(self, base, *, fail=False):
    self.base = base
    self.fail = fail
    self.calls = []

  def features(self, version):
    noise = np.random.default_rng(version).normal(size=self.base.shape).astype(np.float32)
    return self.base + version * noise, self.base[:0]

  def update(self, state, version):
    self.calls.append((int(state.round), version))
    if self.fail:
      self.fail = False
      raise RuntimeError("killed during the update")
    pool, val = self.features(version)
    return pool, val, {}

  def evaluate(self, version):
    return {}


class Labeler:
  def __init__(self, truth):
    self.truth = truth
    self.asked = 0

  def answer(self, query_ids):
    self.asked += 1
    return self.truth[np.asarray(query_ids)][None, :][0]


def _run(run_dir, base, truth, updater, labeler, **kwargs):
  return runner.run_strategy(
    run_dir=str(run_dir),
    config=folder_run.make_config(budget=15, batch_size=5),
    strategy=folder_run.STRATEGY,
    features=base,
    val_features=base[:0],
    seed_ids=np.array([[0, 1]]),
    val_ground_truth=np.zeros((1, 0), bool),
    labeler=labeler,
    updater=updater,
    update_after=lambda r: r == 1,
    log=lambda _: None,
    **kwargs,
  )


def _final(run_dir, base):
  like = runner.abstract_state(base, np.array([[0, 1]]), 0)
  with CheckpointStore(str(run_dir / "checkpoints")) as store:
    return store.restore(store.latest_step(), like)


def test_update_after_resumes_a_killed_update_and_its_features(tmp_path):
  rng = np.random.default_rng(0)
  base = rng.normal(size=(POOL, DIM)).astype(np.float32)
  truth = np.zeros(POOL, bool)
  truth[:12] = True
  base[:12] += 1.5  # the positives lie apart

  reference = FakeUpdater(base)
  _run(tmp_path / "a", base, truth, reference, Labeler(truth))
  assert reference.calls == [(1, 1)]
  state_a, meta_a = _final(tmp_path / "a", base)
  assert meta_a["feature_version"] == 1 and int(state_a.round) == 3

  # Killed during the update after round 1: round 1's answers are logged, its checkpoint not.
  killed = FakeUpdater(base, fail=True)
  labeler = Labeler(truth)
  with pytest.raises(RuntimeError, match="killed"):
    _run(tmp_path / "b", base, truth, killed, labeler)
  assert labeler.asked == 1
  # The restart redoes round 1's update from the logged answers (round 1 is not asked again),
  # then stops after round 2; the next restart reads feature version 1 back from checkpoint 2.
  restarted = FakeUpdater(base)
  labeler = Labeler(truth)
  _run(tmp_path / "b", base, truth, restarted, labeler, stop_after=2)
  assert restarted.calls == [(1, 1)] and labeler.asked == 1
  _, meta = _final(tmp_path / "b", base)
  assert meta["feature_version"] == 1
  last = FakeUpdater(base)
  _run(tmp_path / "b", base, truth, last, Labeler(truth))
  assert last.calls == []
  state_b, _ = _final(tmp_path / "b", base)
  assert runner.differing_leaves(state_a, state_b) == []


def test_update_after_needs_an_updater(tmp_path):
  base = np.zeros((POOL, DIM), np.float32)
  with pytest.raises(ValueError, match="update_after without an updater"):
    _run(tmp_path, base, np.zeros(POOL, bool), None, Labeler(np.zeros(POOL, bool)))
