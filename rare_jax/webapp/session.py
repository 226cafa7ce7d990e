"""One labeling session: the run loop in a worker thread, the person answering through the app.

`LabelingSession(run)` owns a `WebLabeler`; `start()` runs `runner.run_strategy` in a daemon
thread with it, so the loop is exactly the research loop (query -> answers logged -> observe ->
checkpoint -> metrics, resumed from the newest checkpoint on a restart). Before each query is
published the session reads the newest checkpoint (the state the query was computed from) for
what the page shows: labels used, positives found, the current top-scoring images.

Model updates: after a submitted batch the linear model is refitted at once (the loop's
`observe`). Runs on pretrained features can also update the deep model (background
splitting, `folder_deep.py`): asked from the page (`request_deep_update`: after the batch
being labeled is submitted) or every `config.deep_every` rounds. The update runs in the loop
thread between two rounds, so labeling waits for it (the page shows its progress), and the
next round is queried on the new features. Requests are written to `deep_requests.json`
before they are acknowledged, and the runner's `update_after` reads them, so a run killed
during an update redoes that round's update on restart (resuming from its last epoch and
embedded chunk) and gives the same features.
"""

from __future__ import annotations

import os
import re
import threading
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from rare_jax.active import runner
from rare_jax.infra.checkpoint import CheckpointStore, write_json_atomic
from rare_jax.webapp import folder_run, pool_images
from rare_jax.webapp.labeler import (
  DONE,
  LABELING,
  UPDATING,
  AnswerRejected,
  LabelingStopped,
  WebLabeler,
  describe_os_error,
)

DEEP_REQUESTS = "deep_requests.json"
_EPOCH = re.compile(r"^deep update (\d+): epoch (\d+)/(\d+)")

THUMBNAIL_SIZE = pool_images.THUMBNAIL_SIZE  # longest side of the images the app serves


class LabelingSession:
  """The loop of one folder run, labeled through the web app.

  Args:
    run: from `folder_run.prepare_folder_run`.
    top_k: how many top-scoring images `state()` lists per category.
    log: receives the runner's lines.
  """

  def __init__(
    self, run: folder_run.FolderRun, *, top_k: int = 24, log: Callable[[str], None] = print
  ):
    self.run = run
    self.top_k = top_k
    self.log = log
    self.labeler = WebLabeler(num_categories=len(run.category_names), journal_path=run.journal_path)
    self.batch_size = int(run.config.batch_size)
    self.total_rounds = runner.num_rounds(run.config)
    self._progress: dict[str, Any] | None = None
    self._lock = threading.Lock()
    self._thread: threading.Thread | None = None
    self._abstract_state = runner.abstract_state(run.features, run.seed_ids, int(run.config.seed))
    # Pretrained runs; not those started before deep updates existed (no deep settings).
    self.deep_available = run.config.features == "pretrained" and "deep_epochs" in run.config
    self.deep_every = int(run.config.get("deep_every", 0)) if self.deep_available else 0
    self._requests_path = os.path.join(run.run_dir, DEEP_REQUESTS)
    self._requests = self._read_requests()
    self._decided = 0  # the newest round whose update_after was answered
    self._deep: dict[str, Any] = {"status": "idle", "message": "", "progress": 0.0}
    self._deep_changes = 0
    # Served images: where the folder resolves to is taken now (checked again per request).
    self._images = pool_images.PoolImages(run)

  # The loop.

  def start(self) -> None:
    """Starts the loop thread (it creates checkpoint 0, then publishes the first query)."""
    if self._thread is not None:
      raise ValueError("the session is started already; expected one start()")
    self._thread = threading.Thread(target=self._loop, name="rare_jax-loop", daemon=True)
    self._thread.start()

  def stop(self, timeout: float = 60.0) -> None:
    """Stops asking; waits for a round in progress to be checkpointed."""
    self.labeler.close()
    if self._thread is not None:
      self._thread.join(timeout)

  @property
  def running(self) -> bool:
    return self._thread is not None and self._thread.is_alive()

  def _loop(self) -> None:
    try:
      updater = None
      if self.deep_available:
        from rare_jax.webapp import folder_deep  # jax model code: only for pretrained runs

        updater = _ProgressUpdater(self, folder_deep.make_updater(self.run, log=self._deep_log))
      runner.run_strategy(
        run_dir=self.run.run_dir,
        config=self.run.config,
        strategy=folder_run.STRATEGY,
        features=self.run.features,
        val_features=self.run.val_features,
        seed_ids=self.run.seed_ids,
        val_ground_truth=self.run.val_ground_truth,
        labeler=_RefreshingLabeler(self),
        log=self.log,
        updater=updater,
        update_after=None if updater is None else self._update_after,
      )
      self._refresh()
      self.labeler.finish(
        f"Budget used. Score images with: python -m rare_jax.predict "
        f"--workdir={self.run.workdir} --images={self.run.manifest['root']} --out=scores.csv"
      )
      self.log("labeling done: the budget is used")
    except LabelingStopped:
      pass
    except OSError as error:  # a full or read-only disk: say so, without a traceback
      message = describe_os_error(error)
      self.log(f"error: {message}")
      self.labeler.fail(f"the run stopped: {message}; then start the same command again")
    except Exception as error:  # Shown on the page; the run resumes on a restart.
      self.log(traceback.format_exc())
      self.labeler.fail(f"the run stopped: {type(error).__name__}: {error}")

  def check(self) -> None:
    """Reads the newest checkpoint and the answers log now, so that damage is refused before
    serving (one clear error), not in the loop thread after the page opened.

    Raises:
      ValueError: a checkpoint that cannot be restored, or a damaged line of answers.jsonl
        (naming the file and line; the journal was read when the session was made).
    """
    self._refresh()
    runner.read_answers(os.path.join(self.run.run_dir, "answers.jsonl"))

  def _after_round(self) -> None:
    """Called before each query is published. The seam for a background deep update."""
    self._refresh()

  def _refresh(self) -> None:
    """Reads the newest checkpoint into what the page shows."""
    with CheckpointStore(os.path.join(self.run.run_dir, "checkpoints")) as store:
      step = store.latest_step()
      if step is None:
        return
      state, meta = store.restore(step, self._abstract_state)
    version = int(meta.get("feature_version", 0))
    if version:
      with self._lock:
        idle = self._deep["status"] not in ("running", "queued")
        if idle and self._deep.get("updates_done") != version:
          self._set_deep(
            status="done",
            progress=1.0,
            version=version,
            updates_done=version,
            message=f"the rounds use the features of deep model v{version}",
          )
    labels = np.asarray(state.labels)
    scores = np.asarray(state.scores, np.float64)
    seeds = (np.asarray(state.label_round) == 0) & (labels == 1)
    has_model = bool(state.has_model)
    categories = []
    for c in range(labels.shape[0]):
      k = min(self.top_k, labels.shape[1])
      top = np.argpartition(-scores[c], k - 1)[:k]
      top = top[np.lexsort((top, -scores[c][top]))]
      categories.append(
        {
          "labels_used": int(state.round) * self.batch_size,
          "seeds": int(seeds[c].sum()),
          "positives_found": int((labels[c] == 1).sum() - seeds[c].sum()),
          "negatives": int((labels[c] == 0).sum()),
          "top": [
            {
              "id": int(i),
              "path": self.run.display_path(i),
              # Probability under the linear model; cosine to the seeds before the first fit.
              "score": float(1 / (1 + np.exp(-scores[c, i])) if has_model else scores[c, i]),
              "label": "seed" if seeds[c, i] else {1: "yes", 0: "no"}.get(int(labels[c, i])),
            }
            for i in top
          ],
        }
      )
    with self._lock:
      self._progress = {
        "rounds_done": int(state.round),
        "has_model": has_model,
        "categories": categories,
      }

  # Deep updates.

  def _read_requests(self) -> set[int]:
    if not os.path.exists(self._requests_path):
      return set()
    data = folder_run.read_json_object(self._requests_path)
    rounds = data.get("after_rounds")
    if not isinstance(rounds, list) or not all(isinstance(r, int) for r in rounds):
      raise ValueError(f"{self._requests_path}: after_rounds={rounds!r}; expected a list of ints")
    return set(rounds)

  def _update_after(self, round_index: int) -> bool:
    """The runner's `update_after`: the page's requests, or every `deep_every` rounds."""
    with self._lock:
      self._decided = max(self._decided, round_index)
      if round_index >= self.total_rounds:
        return False  # no round left to use new features
      every = self.deep_every and round_index % self.deep_every == 0
      return bool(every or round_index in self._requests)

  def request_deep_update(self) -> int:
    """Asks for a deep update after the batch being labeled (or the next one, while the loop
    is between batches); returns that round. Written to disk before it returns.

    Raises:
      AnswerRejected: 409 for a pixel-PCA run, an update running, or no round left after it.
    """
    if not self.deep_available:
      raise AnswerRejected(409, f"no deep updates: {self._unavailable_reason()}")
    snapshot = self.labeler.snapshot()
    with self._lock:
      if self._deep["status"] == "running":
        raise AnswerRejected(409, "a deep update is running already")
      done = self._progress["rounds_done"] if self._progress else 0
      target = max(done + 1, self._decided + 1)
      if snapshot["phase"] == DONE or target >= self.total_rounds:
        raise AnswerRejected(
          409, "no round is left after this batch to use new features; expected an earlier request"
        )
      if target not in self._requests:
        write_json_atomic(self._requests_path, {"after_rounds": sorted(self._requests | {target})})
        self._requests.add(target)
      self._set_deep(
        status="queued",
        message=f"starts when round {target}'s batch is submitted",
        progress=0.0,
      )
    return target

  def _unavailable_reason(self) -> str:
    if self.run.config.features != "pretrained":
      return "they need pretrained features (this run uses the pixel-PCA stand-in)"
    return "this run was started before deep updates existed (start a new --workdir for them)"

  def _set_deep(self, **values) -> None:
    self._deep.update(values)
    self._deep_changes += 1

  def _deep_log(self, line: str) -> None:
    self.log(line)
    match = _EPOCH.match(line)
    with self._lock:
      if self._deep["status"] != "running":
        return
      epochs = int(match.group(3)) if match else None
      if match:
        done = int(match.group(2))
        self._set_deep(
          progress=round(done / (epochs + 1), 3), message=f"training: epoch {done}/{epochs} done"
        )
      elif line.startswith("embed:") or "trainBGSplit on" in line:
        self._set_deep(message=line)
      message = f"Deep update {self._deep.get('version')}: {self._deep['message']}"
    self.labeler.set_phase(UPDATING, message)

  # What the server calls.

  def state(self) -> dict[str, Any]:
    """Everything the page shows, as plain JSON data."""
    snapshot = self.labeler.snapshot()
    with self._lock:
      progress = self._progress
    names = self.run.category_names
    categories = []
    for c, name in enumerate(names):
      entry = {
        "index": c,
        "name": name,
        "labels_used": 0,
        "seeds": self.run.seed_count(c),
        "positives_found": 0,
        "negatives": 0,
        "top": [],
      }
      if progress is not None:
        entry.update(progress["categories"][c])
      query = snapshot["query"][c] if snapshot["query"] else []
      entry["query"] = [dict(q, path=self.run.display_path(q["id"])) for q in query]
      categories.append(entry)
    rounds_done = progress["rounds_done"] if progress else 0
    with self._lock:
      deep_update = dict(self._deep)
      deep_changes = self._deep_changes
    if not self.deep_available:
      deep_update = {
        "status": "unavailable",
        "message": self._unavailable_reason(),
        "progress": 0.0,
      }
    return {
      # Changes of the deep update count too: the page re-renders on a new version.
      "version": snapshot["version"] + deep_changes,
      "phase": snapshot["phase"],
      "message": snapshot["message"],
      "serial": snapshot["serial"],
      "round": rounds_done + 1 if snapshot["phase"] == LABELING else rounds_done,
      "rounds": self.total_rounds,
      "batch_size": self.batch_size,
      "budget": self.total_rounds * self.batch_size,
      "answered": snapshot["answered"],
      "last_answer": snapshot["last_answer"],
      "categories": categories,
      "model": {
        "kind": "linear (logistic regression), refitted after every batch",
        "features": folder_run.describe_features(self.run.config),
        "deep_update": deep_update,
        "has_model": bool(progress and progress["has_model"]),
      },
    }

  def image(self, image_id: int) -> tuple[bytes, str]:
    """(bytes, mimetype) of pool image `image_id`, re-encoded at most THUMBNAIL_SIZE wide;
    checked and bounded as it is served (`pool_images`).

    Raises:
      IndexError: no such image id in this run's pool.
      ValueError: the file is refused (moved out of the folder, not a regular file, too big)
        or no longer decodes.
    """
    return self._images.thumbnail(image_id)


class _ProgressUpdater:
  """A `DeepUpdater` whose updates the page follows (status, epoch progress, re-embedding)."""

  def __init__(self, session: LabelingSession, updater):
    self._session = session
    self._updater = updater

  def features(self, version: int):
    return self._updater.features(version)

  def evaluate(self, version: int) -> dict:
    return self._updater.evaluate(version)

  def update(self, state, version: int):
    session = self._session
    with session._lock:
      session._set_deep(
        status="running", version=version, progress=0.0, message="starting (a restart resumes it)"
      )
    session.labeler.set_phase(UPDATING, f"Deep update {version} running: labeling waits for it.")
    try:
      result = self._updater.update(state, version)
    except BaseException:
      with session._lock:
        session._set_deep(status="failed", message="stopped; a restart resumes it")
      raise
    with session._lock:
      session._set_deep(
        status="done",
        progress=1.0,
        message=f"the next rounds use the features of deep model v{version}",
        updates_done=version,
      )
    session.labeler.set_phase(UPDATING, f"Deep update {version} done; refitting.")
    return result


class _RefreshingLabeler:
  """The session's labeler as the runner sees it: refresh the page's view, then ask."""

  def __init__(self, session: LabelingSession):
    self._session = session

  def answer(self, query_ids: np.ndarray) -> np.ndarray:
    self._session._after_round()
    return self._session.labeler.answer(query_ids)
