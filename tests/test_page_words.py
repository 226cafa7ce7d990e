"""What the labeling page says, in plain words (issue 26, item 7), asserted on the server's JSON
state: the deep update's progress and status (no internals, no bar moving in thirds), the
counters during an update, the deep-update button once no batch would use it, the footer after
an update, the done line, and `--budget`'s help."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from rare_jax.active import runner
from rare_jax.data import folder
from rare_jax.webapp import folder_run
from rare_jax.webapp import session as session_lib
from rare_jax.webapp.session import LabelingSession, _ProgressUpdater

INTERNALS = ("trainBGSplit", "->", "ours_linear", "(image, category)", "features/v1", "rows/s")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A pretrained run of a tiny folder (embedded at 32 px), whose session is never started."""
  tmp = tmp_path_factory.mktemp("words")
  images, seed_files = folder.write_example_folder(tmp, per_class=4, rare_count=6, num_seeds=3)
  config = folder_run.make_config(
    budget=15, batch_size=5, features="pretrained", image_size=32, embed_batch_size=16
  )
  return folder_run.prepare_folder_run(
    str(tmp / "run"), images=images, seeds=",".join(seed_files), config=config, log=lambda _: None
  )


class _Updater:
  """Stands for the deep updater: logs what a real update logs, and looks at the page meanwhile."""

  def __init__(self, session, clock):
    self.session = session
    self.clock = clock
    self.seen = []

  def update(self, state, version):
    log = self.session._deep_log
    self.seen.append(self.session.state())
    log(
      f"deep update {version}: trainBGSplit on 170 images (170 (image, category) labels), 2 epochs"
    )
    self.seen.append(self.session.state())
    self.clock[0] += 30.0
    log(f"deep update {version}: epoch 1/2 | loss 0.5000 | 40 img/s")
    self.seen.append(self.session.state())
    self.clock[0] += 15.0  # half of the second epoch, by the first one's time
    self.seen.append(self.session.state())
    self.clock[0] += 15.0
    log(f"deep update {version}: epoch 2/2 | loss 0.4000 | 40 img/s")
    log("embed: 12/48 rows (6.0 rows/s, ETA 6s)")
    self.seen.append(self.session.state())
    log("embed: done, 48 rows in 8.0s (6.0 rows/s) -> /x/run/ours_linear/features/v1/pool")
    log(f"deep update {version}: re-embedded 48 pool and 1 validation images")
    self.seen.append(self.session.state())
    return "features", "val", {}


def test_a_deep_update_in_plain_words(run, monkeypatch):
  clock = [1000.0]
  monkeypatch.setattr(session_lib.time, "monotonic", lambda: clock[0])
  session = LabelingSession(run, log=lambda _: None)
  assert "ImageNet weights" in session.state()["model"]["features"]
  engine = runner.Engine(runner.loop_config(run.config, folder_run.STRATEGY))
  state = engine.init(run.features, run.seed_ids, seed=0)
  query = np.asarray(engine.query(state))
  state = engine.step(state, query, np.zeros_like(query, bool), run.features)
  inner = _Updater(session, clock)
  assert _ProgressUpdater(session, inner).update(state, 1) == ("features", "val", {})
  starting, training, epoch_1, half, embedding, embedded = inner.seen
  # The counters include the batch just submitted while the update runs (before: the round
  # and labels used of the batch before it).
  assert starting["round"] == 1 and starting["categories"][0]["labels_used"] == 5
  # Progress: unknown during the first epoch (an animated bar), then by epochs and rows, with
  # the second epoch estimated from the first one's time: never in thirds.
  progress = [s["model"]["deep_update"]["progress"] for s in inner.seen]
  assert progress == [None, None, 0.4, 0.6, 0.85, 1.0]
  messages = [s["model"]["deep_update"]["message"] for s in inner.seen]
  assert messages[1] == (
    f"training the network on your {int((np.asarray(state.labels) >= 0).any(0).sum())} labeled "
    f"images and {int(np.asarray(state.pseudo_negative).any(0).sum())} others taken as negatives: "
    "epoch 1 of 2"
  )
  assert messages[2] == "training: epoch 1 of 2 done, about 30s left"
  assert (
    messages[4]
    == "re-embedding the images with the retrained network: 12 of 48 done, about 6s left"
  )
  assert messages[5] == "images re-embedded; refitting the linear model"
  for s in inner.seen:
    for text in (s["message"], s["model"]["deep_update"]["message"]):
      assert not any(word in text for word in INTERNALS), text
  after = session.state()
  assert after["model"]["deep_update"]["status"] == "done"
  features = after["model"]["features"]
  assert "retrained on your labels (deep update 1)" in features
  assert "(ImageNet weights)" not in features


def test_the_deep_update_button_is_off_when_no_batch_would_use_it(run):
  session = LabelingSession(run, log=lambda _: None)
  deep = session.state()["model"]["deep_update"]
  assert deep["can_request"] is True and deep["why_not"] == ""
  session._update_after(2)  # round 2 decided: only round 3, the last, is left
  deep = session.state()["model"]["deep_update"]
  assert deep["can_request"] is False and "only the last batch" in deep["why_not"]
  done = LabelingSession(run, log=lambda _: None)
  done.labeler.finish(done.done_message())
  state = done.state()
  assert state["model"]["deep_update"]["can_request"] is False
  assert "budget is used" in state["model"]["deep_update"]["why_not"]
  assert state["message"].startswith("Done: all 15 labels per category are used.")


def test_budget_help_says_per_category():
  # In a child process: rare_jax.label and rare_jax.predict both define --images, so they cannot
  # share one process's flags (other tests of this worker may have imported predict).
  out = subprocess.run(
    [sys.executable, "-m", "rare_jax.label", "--helpfull"],
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  ).stdout
  text = re.search(r"--budget: (.*?)\n\s+\(default", out, re.S)
  assert text, out[-2000:]
  text = " ".join(text.group(1).split())
  assert "per category" in text and "in all" not in text, text


def test_a_restart_without_budget_keeps_the_runs_own(tmp_path):
  """Without --budget a restart keeps the budget in config.json (before, the default 100 was
  taken, and refused as another config); `rare_jax.label` passes --budget instead when given."""
  (tmp_path / "config.json").write_text('{"budget": 40, "batch_size": 10}')
  assert folder_run.started_budget(str(tmp_path)) == 40
  assert folder_run.started_budget(str(tmp_path / "new")) is None
  (tmp_path / "config.json").write_text('{"budget": true}')
  assert folder_run.started_budget(str(tmp_path)) is None
