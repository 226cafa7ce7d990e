"""Changing an answer of a submitted batch from the page, and continuing a run with a larger
budget (issue 26, item 4).

A correction is appended to corrections.jsonl (the batches' journal is never edited) and the
run is re-derived from the corrected answers: its state is then the loop replayed from
checkpoint 0 on the images as they were asked with the corrected answers, and a restart (also
one after a kill half-way through the re-derivation) gives that same state.
"""

import json
import os
import shutil
import time

import numpy as np
import pytest

from rare_jax.active import runner
from rare_jax.data import folder
from rare_jax.infra.checkpoint import CheckpointStore
from rare_jax.webapp import folder_run, server
from rare_jax.webapp import session as session_lib
from rare_jax.webapp.session import LabelingSession

TOKEN = "test-token-0123456789abcdef"


def wait_for(predicate, what, timeout=120.0, last=None):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    value = predicate()
    if value:
      return value
    time.sleep(0.05)
  raise AssertionError(f"timed out waiting for {what}" + (f": {last()}" if last else ""))


def truth(path):
  return path.startswith("Sandal/") or path.startswith("/")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
  out = tmp_path_factory.mktemp("example")
  return folder.write_example_folder(out, per_class=28, rare_count=20, num_seeds=5)


def open_run(workdir, example, budget=15):
  images, seed_files = example
  config = folder_run.make_config(budget=budget, batch_size=5, feature_dim=16, image_size=16)
  return folder_run.prepare_folder_run(
    str(workdir), images=images, seeds=",".join(seed_files), config=config, log=lambda _: None
  )


class Served:
  def __init__(self, run):
    self.run = run
    self.session = LabelingSession(run, log=lambda _: None)
    self.client = server.create_app(self.session, token=TOKEN).test_client()
    self.session.start()

  def state(self):
    response = self.client.get("/api/state", headers={"X-Token": TOKEN})
    assert response.status_code == 200
    return response.get_json()

  def post(self, path, body):
    return self.client.post(f"{path}?token={TOKEN}", json=body)

  def labeling(self, round_index):
    return wait_for(
      lambda: (s := self.state())["phase"] == "labeling" and s["round"] == round_index and s,
      f"round {round_index} open",
      last=lambda: {k: v for k, v in self.state().items() if k in ("phase", "message", "round")},
    )

  def answer_batch(self, state):
    serial = state["serial"]
    for q in state["categories"][0]["query"]:
      body = {"serial": serial, "category": 0, "id": q["id"], "answer": truth(q["path"])}
      assert self.post("/api/answer", body).status_code == 200
    assert self.post("/api/submit", {"serial": serial}).status_code == 200

  def stop(self):
    self.session.stop()


def checkpoint(run, step):
  like = runner.abstract_state(run.features, run.seed_ids, 0)
  with CheckpointStore(os.path.join(run.run_dir, "checkpoints")) as store:
    return store.restore(step, like)[0], store.all_steps()


def replayed(run, rounds):
  """The loop from checkpoint 0 on the recorded (query, answers) of `rounds`, by hand."""
  engine = runner.Engine(runner.loop_config(run.config, folder_run.STRATEGY))
  state = engine.init(run.features, run.seed_ids, seed=0)
  for query_ids, answers in rounds:
    state = engine.step(state, np.asarray(query_ids), np.asarray(answers, bool), run.features)
  return state


def read_lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_a_corrected_answer_rederives_the_run_and_a_restart_keeps_it(example, tmp_path):
  run = open_run(tmp_path / "run", example)
  served = Served(run)
  try:
    served.answer_batch(served.labeling(1))
    served.answer_batch(served.labeling(2))
    before = served.labeling(3)
    given = before["categories"][0]["given"]
    assert sorted(g["round"] for g in given) == [1] * 5 + [2] * 5
    assert all(g["answer"] == truth(g["path"]) for g in given)
    answers_before = runner.read_answers(os.path.join(run.run_dir, "answers.jsonl"))
    journal_before = open(run.journal_path).read()
    # A copy of the run as it is now, for the kill half-way through below.
    shutil.copytree(run.workdir, tmp_path / "copy")
    wrong = next(g for g in given if g["round"] == 1)
    flip = {"category": 0, "id": wrong["id"], "answer": not wrong["answer"]}
    # Refused: an image never answered in a batch, the same answer as now, a seed.
    seed = int(run.seed_ids[0, 0])
    unanswered = next(
      i for i in range(run.pool_size) if i not in {g["id"] for g in given} and i != seed
    )
    assert served.post("/api/correct", dict(flip, id=unanswered)).status_code == 422
    assert served.post("/api/correct", dict(flip, id=seed)).status_code == 422
    same = served.post("/api/correct", dict(flip, answer=wrong["answer"]))
    assert same.status_code == 409 and "nothing to change" in same.get_json()["error"]
    assert served.post("/api/correct", dict(flip, category=1)).status_code == 422
    response = served.post("/api/correct", flip)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["corrected"] == dict(flip, round=1)
    after = served.labeling(3)
    # The open batch was asked again from the re-derived state; the answers given list the fix.
    entry = {g["id"]: g for g in after["categories"][0]["given"]}[wrong["id"]]
    assert entry["answer"] == flip["answer"] and entry["round"] == 1
    found = after["categories"][0]["positives_found"]
    assert found == before["categories"][0]["positives_found"] + (1 if flip["answer"] else -1)
  finally:
    served.stop()
  # The journals: the batches' is unchanged, the correction appended to its own.
  assert open(run.journal_path).read() == journal_before
  corrections = os.path.join(run.run_dir, session_lib.CORRECTIONS)
  assert read_lines(corrections) == [dict(flip, round=1)]
  assert not os.path.exists(os.path.join(run.run_dir, session_lib.REDERIVE))
  # answers.jsonl: the same images asked in rounds 1 and 2, round 1's answer corrected.
  answers = runner.read_answers(os.path.join(run.run_dir, "answers.jsonl"))
  assert sorted(answers) == [1, 2]
  for r in (1, 2):
    assert answers[r]["query_ids"] == answers_before[r]["query_ids"]
  position = answers[1]["query_ids"][0].index(wrong["id"])
  expected_1 = [list(answers_before[1]["answers"][0])]
  expected_1[0][position] = flip["answer"]
  assert answers[1]["answers"] == expected_1
  assert answers[2]["answers"] == answers_before[2]["answers"]
  # The state is the loop replayed from checkpoint 0 with the corrected answers.
  reference = replayed(run, [(answers[r]["query_ids"], answers[r]["answers"]) for r in (1, 2)])
  state, steps = checkpoint(run, 2)
  assert steps == [0, 1, 2]
  assert runner.differing_leaves(state, reference) == []

  # A restart gives the same state and asks the same third batch.
  restarted = Served(open_run(tmp_path / "run", example))
  try:
    again = restarted.labeling(3)
    assert [q["id"] for q in again["categories"][0]["query"]] == [
      q["id"] for q in after["categories"][0]["query"]
    ]
  finally:
    restarted.stop()
  assert runner.differing_leaves(checkpoint(run, 2)[0], reference) == []

  # Killed half-way through the re-derivation: the correction saved, the marker written,
  # checkpoint 2 dropped but not checkpoint 1, answers.jsonl not rewritten yet. The restart
  # finishes it: the same state.
  copy = tmp_path / "copy" / folder_run.RUN_DIR
  with open(copy / session_lib.CORRECTIONS, "w") as f:
    f.write(json.dumps(dict(flip, round=1)) + "\n")
  (copy / session_lib.REDERIVE).write_text(json.dumps({"from_round": 1}))
  shutil.rmtree(copy / "checkpoints" / "2")
  copied = open_run(tmp_path / "copy", example)
  resumed = Served(copied)
  try:
    assert [q["id"] for q in resumed.labeling(3)["categories"][0]["query"]] == [
      q["id"] for q in after["categories"][0]["query"]
    ]
  finally:
    resumed.stop()
  assert runner.differing_leaves(checkpoint(copied, 2)[0], reference) == []
  assert not (copy / session_lib.REDERIVE).exists()


def test_a_larger_budget_continues_the_run_and_a_smaller_one_is_refused(example, tmp_path):
  run = open_run(tmp_path / "run", example, budget=10)
  served = Served(run)
  try:
    served.answer_batch(served.labeling(1))
    served.answer_batch(served.labeling(2))
    done = wait_for(lambda: (s := served.state())["phase"] == "done" and s, "the budget used")
    assert done["budget"] == 10 and done["round"] == 2
    assert done["message"].startswith(
      "Done: all 10 labels per category are used. Write the ranked results of every image"
    )
    assert done["model"]["deep_update"]["can_request"] is False
  finally:
    served.stop()
  with pytest.raises(ValueError, match=r"--budget=5 is below the 10 labels per category"):
    open_run(tmp_path / "run", example, budget=5)
  assert json.load(open(tmp_path / "run" / "config.json"))["budget"] == 10
  more = open_run(tmp_path / "run", example, budget=20)
  assert json.load(open(tmp_path / "run" / "config.json"))["budget"] == 20
  served = Served(more)
  try:
    state = served.labeling(3)
    assert state["budget"] == 20 and state["rounds"] == 4
    assert state["categories"][0]["labels_used"] == 10
    assert len(state["categories"][0]["given"]) == 10
  finally:
    served.stop()
  assert checkpoint(more, 2)[1] == [0, 1, 2]


def test_a_correction_after_the_budget_is_used(example, tmp_path):
  """Once done, a change re-derives the run and the page is done again with the fix."""
  run = open_run(tmp_path / "run", example, budget=10)
  served = Served(run)
  try:
    served.answer_batch(served.labeling(1))
    served.answer_batch(served.labeling(2))
    done = wait_for(lambda: (s := served.state())["phase"] == "done" and s, "the budget used")
    last = next(g for g in done["categories"][0]["given"] if g["round"] == 2)
    flip = {"category": 0, "id": last["id"], "answer": not last["answer"]}
    assert served.post("/api/correct", flip).status_code == 200
    again = wait_for(
      lambda: (s := served.state())["phase"] == "done" and s["version"] > done["version"] and s,
      "done again",
    )
    entry = {g["id"]: g for g in again["categories"][0]["given"]}[last["id"]]
    assert entry["answer"] == flip["answer"]
  finally:
    served.stop()
  answers = runner.read_answers(os.path.join(run.run_dir, "answers.jsonl"))
  reference = replayed(run, [(answers[r]["query_ids"], answers[r]["answers"]) for r in (1, 2)])
  assert runner.differing_leaves(checkpoint(run, 2)[0], reference) == []


def test_corrections_journal_damage_is_named(tmp_path):
  from rare_jax.webapp.labeler import read_corrections

  path = tmp_path / "corrections.jsonl"
  path.write_text('{"round": 1, "category": 0, "id": 3, "answer": "yes"}\n{"round": 1')
  with pytest.raises(ValueError, match="line 1: .* is not a correction"):
    read_corrections(str(path))
  path.write_text('{"round": 1, "category": 0, "id": 3, "answer": true}\n{"round": 1')
  assert read_corrections(str(path)) == [{"round": 1, "category": 0, "id": 3, "answer": True}]


def test_a_correction_before_a_deep_update_drops_that_update(example, tmp_path):
  """The rule: an update trained after the changed round (its labels included the wrong
  answer) is dropped, files and all, and the checkpoints go back to the round before the
  change; one trained before it is kept. (The replay then trains it again:
  tests/test_update_after.py.)"""
  run = open_run(tmp_path / "run", example)
  truth_of = np.array([truth(p) for p in run.manifest["paths"]])

  class Updater:
    def features(self, version):
      return run.features + version, run.val_features

    def update(self, state, version):
      for parent in ("deep", "features"):
        os.makedirs(os.path.join(run.run_dir, parent, f"v{version}"), exist_ok=True)
      return run.features + version, run.val_features, {}

    def evaluate(self, version):
      return {}

  class Labeler:
    def answer(self, query_ids):
      return truth_of[np.asarray(query_ids)]

  runner.run_strategy(
    run_dir=run.run_dir,
    config=run.config,
    strategy=folder_run.STRATEGY,
    features=run.features,
    val_features=run.val_features,
    seed_ids=run.seed_ids,
    val_ground_truth=run.val_ground_truth,
    labeler=Labeler(),
    updater=Updater(),
    update_after=lambda r: r in (1, 2),  # v1 after round 1, v2 after round 2
    log=lambda _: None,
  )
  answers = runner.read_answers(os.path.join(run.run_dir, "answers.jsonl"))
  changed = answers[2]["query_ids"][0][0]
  with open(os.path.join(run.run_dir, session_lib.CORRECTIONS), "w") as f:
    record = {"round": 2, "category": 0, "id": changed, "answer": not truth_of[changed]}
    f.write(json.dumps(record) + "\n")
  session = LabelingSession(run, log=lambda _: None)
  session.deep_available = True  # as a pretrained run's (no updater is built here)
  session._reconcile()
  assert checkpoint(run, 1)[1] == [0, 1]  # back to the round before the change
  assert sorted(os.listdir(os.path.join(run.run_dir, "deep"))) == ["v1"]  # v2 dropped
  assert sorted(os.listdir(os.path.join(run.run_dir, "features"))) == ["v1"]
  corrected = runner.read_answers(os.path.join(run.run_dir, "answers.jsonl"))
  assert corrected[2]["answers"][0][0] == (not truth_of[changed])
  assert corrected[3] == answers[3] and corrected[1] == answers[1]
  session._reconcile()  # a second pass (a restart): nothing left to do
  assert checkpoint(run, 1)[1] == [0, 1]
