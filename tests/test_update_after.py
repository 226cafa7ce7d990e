"""`runner.run_strategy(update_after=...)`: deep updates after the rounds a caller chooses (the
labeling page's button), resumed exactly after a kill during an update or after it."""

import json

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


def test_a_corrected_answer_before_an_update_redoes_the_update(tmp_path):
  """The labeling app's rule for corrections: rewind to the round before the changed answer
  and replay the rounds as asked (`follow_recorded`); the deep update that followed the changed
  round is trained again on the corrected labels (never kept), and nobody is asked again."""
  rng = np.random.default_rng(1)
  base = rng.normal(size=(POOL, DIM)).astype(np.float32)
  truth = np.zeros(POOL, bool)
  truth[:12] = True
  base[:12] += 1.5
  first = FakeUpdater(base)
  first.labels = []
  first.update = _recording(first)
  _run(tmp_path, base, truth, first, Labeler(truth))
  answers_path = tmp_path / "answers.jsonl"
  lines = [json.loads(line) for line in answers_path.read_text().splitlines()]
  query, given = lines[0]["query_ids"][0], lines[0]["answers"][0]
  changed = query[0]
  given[0] = not given[0]
  answers_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
  like = runner.abstract_state(base, np.array([[0, 1]]), 0)
  meta = runner.rewind(str(tmp_path), 0, like)
  assert meta["feature_version"] == 0
  with CheckpointStore(str(tmp_path / "checkpoints")) as store:
    assert store.all_steps() == [0]
  again = FakeUpdater(base)
  again.labels = []
  again.update = _recording(again)
  labeler = Labeler(truth)
  _run(tmp_path, base, truth, again, labeler, follow_recorded=True)
  assert labeler.asked == 0  # rounds 2 and 3 replayed as asked
  assert again.calls == [(1, 1)]
  assert again.labels[0][0, changed] == int(given[0]) != first.labels[0][0, changed]
  # The state: the loop replayed by hand on the recorded queries with the corrected answers.
  engine = runner.Engine(
    runner.loop_config(folder_run.make_config(budget=15, batch_size=5), "ours_linear")
  )
  state = engine.init(base, np.array([[0, 1]]), seed=0)
  for r, line in enumerate(lines, start=1):
    state = engine.step(
      state,
      np.asarray(line["query_ids"]),
      np.asarray(line["answers"]),
      base if r == 1 else again.features(1)[0],
    )
    if r == 1:
      state = engine.refit_on(state, again.features(1)[0])
  final, meta = _final(tmp_path, base)
  assert meta["feature_version"] == 1
  assert runner.differing_leaves(final, state) == []


def _recording(updater):
  plain = updater.update

  def update(state, version):
    updater.labels.append(np.asarray(state.labels).copy())
    return plain(state, version)

  return update
