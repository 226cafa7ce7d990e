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

Corrections: `correct` changes an answer of a batch already submitted. The change is appended
to `corrections.jsonl` (the labeler's), and the loop thread re-derives the run from the
corrected answers, since the loop is a pure function of them (`_reconcile`): answers.jsonl is
rewritten with the corrected answers (it is the runner's derived log; the journals of batches
and of corrections are only ever appended to), the checkpoints from the corrected round on are
dropped (`runner.rewind`), and the runner replays the later rounds as they were asked (the same
images, `follow_recorded`) with the corrected answers. A deep update that followed the
corrected round or a later one was trained on the wrong label: its files are dropped too and
it is trained again in the replay, with its progress on the page (never kept silently). A
marker (`rederive.json`) written before anything is dropped makes a kill at any point finish
the same re-derivation on restart, so a restart gives the same state.
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from rare_jax.active import linear, runner
from rare_jax.infra.checkpoint import CheckpointStore, write_json_atomic
from rare_jax.webapp import folder_run, pool_images
from rare_jax.webapp.labeler import (
  DONE,
  FAILED,
  LABELING,
  STOPPED,
  UPDATING,
  AnswerRejected,
  AnswersCorrected,
  LabelingStopped,
  WebLabeler,
  apply_corrections,
  describe_os_error,
)

DEEP_REQUESTS = "deep_requests.json"
CORRECTIONS = "corrections.jsonl"
REDERIVE = "rederive.json"
_EPOCH = re.compile(r"^deep update (\d+): epoch (\d+)/(\d+)")
_EMBED_ROWS = re.compile(r"^embed: (\d+)/(\d+) rows .*ETA ([^)]+)\)")
_EMBED_RESUME = re.compile(r"^embed: resuming .* at row (\d+)/(\d+)")
TRAIN_SHARE = 0.8  # of a deep update's progress bar; re-embedding the pool is the rest

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
    self.labeler = WebLabeler(
      num_categories=len(run.category_names),
      journal_path=run.journal_path,
      corrections_path=os.path.join(run.run_dir, CORRECTIONS),
    )
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
    self._feature_version = 0  # of the newest checkpoint read
    self._results: dict | None = None  # the last ranked results written (Finish)
    self._results_lock = threading.Lock()
    self._epoch_clock: tuple[float, float | None, int, int] | None = None  # (start, s/epoch, k, E)
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
      while True:
        try:
          self._reconcile()
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
            follow_recorded=True,
          )
          self._refresh()
          self.labeler.finish(self.done_message())
          self.log("labeling done: the budget is used")
          self.labeler.wait_for_correction()  # returns only by AnswersCorrected
        except AnswersCorrected:
          self.log("an answer was changed: re-deriving the run from the corrected answers")
    except LabelingStopped:
      pass
    except OSError as error:  # a full or read-only disk: say so, without a traceback
      message = describe_os_error(error)
      self.log(f"error: {message}")
      self.labeler.fail(f"The run stopped: {message}; then start the same command again.")
    except Exception as error:  # Shown on the page; the run resumes on a restart.
      self.log(traceback.format_exc())
      self.labeler.fail(f"The run stopped: {type(error).__name__}: {error}")

  def done_message(self) -> str:
    """The page's line once the budget is used: what was done and what to do next."""
    per_category = self.total_rounds * self.batch_size
    return (
      f"Done: all {per_category} labels per category are used. Write the ranked results of "
      "every image below (Finish); score other images with rare-jax-predict "
      f"--workdir={self.run.workdir} --images=OTHER_FOLDER --out=scores.csv; to label more, "
      "start the same command again with a larger --budget."
    )

  # Finish.

  def write_results(self) -> dict:
    """Writes the ranked results of the whole pool for every category from the newest model
    (`exports.write_results`: WORKDIR/results/ranked_results.csv and .json); returns what the
    page shows of them ({csv, json, round, message}), also in `state()["results"]`.

    Raises:
      AnswerRejected: 409 while the run is busy (a batch being taken in, a deep update, a
        correction) or with no model yet; 507/500 a failed write (nothing partial is left).
    """
    from rare_jax.webapp import exports  # reads checkpoints and audits: only when asked

    phase = self.labeler.snapshot()["phase"]
    if phase not in (LABELING, DONE):
      raise AnswerRejected(
        409, f"the run is {phase} now; write the results once the next batch is shown"
      )
    with self._results_lock:
      try:
        csv_path, json_path = exports.write_results(self.run.workdir, log=self.log)
      except ValueError as error:
        raise AnswerRejected(409, f"no results yet: {error}") from None
      except OSError as error:
        status = 507 if error.errno in (errno.ENOSPC, errno.EDQUOT) else 500
        raise AnswerRejected(
          status, f"{describe_os_error(error)}; the results are NOT written"
        ) from None
      with open(json_path, encoding="utf-8") as f:
        written = json.load(f)
      names = [c["name"] for c in written["categories"]]
      results = {
        "csv": os.path.abspath(csv_path),
        "json": os.path.abspath(json_path),
        "round": int(written["round"]),
        "message": (
          f"The ranked results of all {self.run.pool_size} images for "
          f"{' and '.join(names) if len(names) < 3 else ', '.join(names)}, from the model of "
          f"batch {written['round']}, are in {os.path.abspath(csv_path)} (a table: category, "
          f"rank, path, score, label given) and {os.path.abspath(json_path)} (the same, with "
          "the audit's estimate where there is one). Write them again after more batches."
        ),
      }
      with self._lock:
        self._results = results
        self._deep_changes += 1  # the page re-renders
    self.log(f"results written: {csv_path} and {json_path}")
    return dict(results)

  # Corrections.

  def correct(self, category: int, image_id: int, answer: bool) -> dict:
    """Changes the answer given to `image_id` for `category` in a submitted batch; the loop
    re-derives the run from the corrected answers (see the module docstring). Returns the
    correction ({round, category, id, answer}).

    Raises:
      AnswerRejected: 422 a category out of range, or an image not answered in a submitted
        batch of that category (seeds included); 409 the same answer as now, or the run is
        busy (a batch being taken in, a deep update); 507 the journal cannot be written.
    """
    names = self.run.category_names
    if not 0 <= category < len(names):
      raise AnswerRejected(
        422, f"category {category} does not exist; expected 0 <= category < {len(names)}"
      )
    record: dict[str, Any] = {}

    def check() -> None:  # under the labeler's lock, once it waits for the person
      answers = runner.read_answers(os.path.join(self.run.run_dir, "answers.jsonl"))
      corrections = self.labeler.corrections()
      for round_index in sorted(answers):
        entry = answers[round_index]
        ids = entry["query_ids"][category]
        if image_id in ids:
          now = apply_corrections(entry["query_ids"], entry["answers"], corrections)
          current = bool(now[category][ids.index(image_id)])
          if current == answer:
            raise AnswerRejected(
              409,
              f"image {image_id} is answered {'yes' if answer else 'no'} for {names[category]} "
              "already; nothing to change",
            )
          record.update(round=round_index, category=category, id=image_id, answer=answer)
          return
      raise AnswerRejected(
        422,
        f"image {image_id} was not answered in a submitted batch of {names[category]}; only "
        "those answers can be changed (seeds and the open batch cannot: undo works there)",
      )

    self.labeler.correct(record, check)
    return dict(record)

  def _reconcile(self) -> None:
    """Brings answers.jsonl and the checkpoints in line with the corrections journal: a
    no-op when they are; else rewinds the run to the round before the first changed one
    (see the module docstring). Runs in the loop thread, before the runner."""
    run_dir = self.run.run_dir
    answers_path = os.path.join(run_dir, "answers.jsonl")
    marker = os.path.join(run_dir, REDERIVE)
    records = runner.read_answers(answers_path)
    corrections = self.labeler.corrections()
    changed = {}
    for round_index, entry in records.items():
      now = apply_corrections(entry["query_ids"], entry["answers"], corrections).tolist()
      if now != [[bool(a) for a in row] for row in entry["answers"]]:
        changed[round_index] = dict(entry, answers=now)
    starts = list(changed)
    if os.path.exists(marker):
      pending = folder_run.read_json_object(marker).get("from_round")
      if isinstance(pending, bool) or not isinstance(pending, int) or pending < 1:
        raise ValueError(f"{marker}: from_round={pending!r}; expected an int >= 1")
      starts.append(pending)
    if not starts:
      return
    start = min(starts)
    self.labeler.set_phase(
      UPDATING, f"Answer changed: recomputing the model from round {start} on."
    )
    write_json_atomic(marker, {"from_round": start})  # before anything is dropped
    if changed:
      records.update(changed)
      _write_lines(answers_path, [records[r] for r in sorted(records)])
    with CheckpointStore(os.path.join(run_dir, "checkpoints")) as store:
      latest = store.latest_step()
    keep = min(start - 1, latest) if latest is not None else None
    if keep is not None:
      meta = runner.rewind(run_dir, keep, self._abstract_state)
      if self.deep_available:
        from rare_jax.webapp import folder_deep

        dropped = folder_deep.discard_versions_after(
          self.run.run_dir, int(meta.get("feature_version", 0))
        )
        if dropped:
          self.log(
            f"deep updates {dropped} used a changed answer: they are trained again from the "
            "corrected answers"
          )
        with self._lock:
          if dropped:
            self._set_deep(status="idle", updates_done=None, message="", progress=0.0)
    os.remove(marker)
    self.log(f"answers corrected: replaying the run from round {start}")

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
    with self._lock:
      self._feature_version = version
      if version:
        idle = self._deep["status"] not in ("running", "queued")
        if idle and self._deep.get("updates_done") != version:
          self._set_deep(
            status="done",
            progress=1.0,
            version=version,
            updates_done=version,
            message=f"the batches are chosen with the retrained network (deep update {version})",
          )
    self._show(state)

  def _show(self, state) -> None:
    """What the page shows of a loop state: counts, the answers given, the top scores."""
    labels = np.asarray(state.labels)
    label_round = np.asarray(state.label_round)
    scores = np.asarray(state.scores, np.float64)
    seeds = (label_round == 0) & (labels == 1)
    has_model = bool(state.has_model)
    categories = []
    for c in range(labels.shape[0]):
      k = min(self.top_k, labels.shape[1])
      top = np.argpartition(-scores[c], k - 1)[:k]
      top = top[np.lexsort((top, -scores[c][top]))]
      given = np.flatnonzero((label_round[c] >= 1) & (labels[c] >= 0))
      given = given[np.lexsort((given, -label_round[c][given]))]  # newest round first
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
              "score": float(linear.sigmoid(scores[c, i]) if has_model else scores[c, i]),
              "label": "seed" if seeds[c, i] else {1: "yes", 0: "no"}.get(int(labels[c, i])),
            }
            for i in top
          ],
          # The answers of submitted batches (the page changes them: `correct`).
          "given": [
            {
              "id": int(i),
              "path": self.run.display_path(i),
              "answer": bool(labels[c, i] == 1),
              "round": int(label_round[c, i]),
            }
            for i in given
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
    """Follows an update's log lines; the page gets them in plain words (no internals)."""
    self.log(line)
    now = time.monotonic()
    with self._lock:
      if self._deep["status"] != "running":
        return
      epoch = _EPOCH.match(line)
      rows = _EMBED_ROWS.match(line) or _EMBED_RESUME.match(line)
      if "trainBGSplit on" in line and self._epoch_clock is not None:
        epochs = self._epoch_clock[3]
        self._epoch_clock = (now, None, 0, epochs)
        self._set_deep(
          progress=None, message=f"{self._deep.get('training', 'training')}: epoch 1 of {epochs}"
        )
      elif epoch:
        done, epochs = int(epoch.group(2)), int(epoch.group(3))
        started, per_epoch, before, _ = self._epoch_clock or (now, None, 0, epochs)
        if done > before:
          per_epoch = (now - started) / (done - before)
        self._epoch_clock = (now, per_epoch, done, epochs)
        progress = TRAIN_SHARE * done / epochs
        left = f", about {_duration(per_epoch * (epochs - done))} left" if per_epoch else ""
        message = (
          f"training: epoch {done} of {epochs} done{left}"
          if done < epochs
          else "training done; re-embedding the images with the retrained network"
        )
        self._set_deep(progress=round(progress, 3), message=message)
      elif rows and line.startswith("embed: resuming"):
        self._epoch_clock = None
        row, total = int(rows.group(1)), int(rows.group(2))
        self._set_deep(
          progress=round(TRAIN_SHARE + (1 - TRAIN_SHARE) * row / max(total, 1), 3),
          message=f"re-embedding the images with the retrained network: resuming at {row} of "
          f"{total}",
        )
      elif rows and total_rows(rows) > 1:  # the pool (not the 1-row placeholder of no validation)
        self._epoch_clock = None
        row, total = int(rows.group(1)), int(rows.group(2))
        self._set_deep(
          progress=round(TRAIN_SHARE + (1 - TRAIN_SHARE) * row / total, 3),
          message=f"re-embedding the images with the retrained network: {row} of {total} done, "
          f"about {rows.group(3)} left",
        )
      elif line.startswith(f"deep update {self._deep.get('version')}: re-embedded"):
        self._set_deep(progress=1.0, message="images re-embedded; refitting the linear model")
      else:
        return
      message = f"Deep update {self._deep.get('version')}: {self._deep['message']}."
    self.labeler.set_phase(UPDATING, message[:1].upper() + message[1:])

  def _deep_progress(self, deep: dict) -> float | None:
    """The progress bar's value now: within an epoch after the first, estimated from the
    last epoch's time (never past the epoch's end); None while unknown (the first epoch)."""
    clock = self._epoch_clock
    if deep.get("status") != "running" or clock is None:
      return deep.get("progress")
    started, per_epoch, done, epochs = clock
    if per_epoch is None or done >= epochs:
      return deep.get("progress")
    within = min((time.monotonic() - started) / per_epoch, 0.95)
    return round(TRAIN_SHARE * (done + within) / epochs, 3)

  def _deep_request_refusal(self, snapshot: dict) -> str | None:
    """Why the page cannot ask for a deep update now (None: it can). Under self._lock."""
    if not self.deep_available:
      return f"no deep updates: {self._unavailable_reason()}"
    if self._deep["status"] == "running":
      return "a deep update is running already"
    if self._deep["status"] == "queued":
      return "a deep update is queued already"
    if snapshot["phase"] in (DONE, FAILED, STOPPED):
      return "the labeling budget is used: no batch is left to use a new model"
    done = self._progress["rounds_done"] if self._progress else 0
    if max(done + 1, self._decided + 1) >= self.total_rounds:
      return "only the last batch is left: no batch would use the new model"
    return None

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
        "given": [],
      }
      if progress is not None:
        entry.update(progress["categories"][c])
      query = snapshot["query"][c] if snapshot["query"] else []
      entry["query"] = [dict(q, path=self.run.display_path(q["id"])) for q in query]
      categories.append(entry)
    rounds_done = progress["rounds_done"] if progress else 0
    with self._lock:
      deep_update = {k: v for k, v in self._deep.items() if k != "training"}
      deep_update["progress"] = self._deep_progress(self._deep)
      refusal = self._deep_request_refusal(snapshot)
      deep_changes = self._deep_changes
      version = self._feature_version
      results = None if self._results is None else dict(self._results)
    if not self.deep_available:
      deep_update = {
        "status": "unavailable",
        "message": self._unavailable_reason(),
        "progress": 0.0,
      }
    deep_update["can_request"] = refusal is None
    deep_update["why_not"] = refusal or ""
    return {
      # Changes of the deep update count too: the page re-renders on a new version.
      "version": snapshot["version"] + deep_changes,
      "phase": snapshot["phase"],
      "message": snapshot["message"],
      "serial": snapshot["serial"],
      # The batch being answered, or (between batches, during updates, once done) the last one
      # submitted and taken in.
      "round": min(rounds_done + 1, self.total_rounds)
      if snapshot["phase"] == LABELING
      else rounds_done,
      "rounds": self.total_rounds,
      "batch_size": self.batch_size,
      "budget": self.total_rounds * self.batch_size,
      "budget_per": "category",
      "answered": snapshot["answered"],
      "last_answer": snapshot["last_answer"],
      "categories": categories,
      "results": results,
      "model": {
        "kind": "linear (logistic regression), refitted after every batch",
        "features": folder_run.describe_features(self.run.config, deep_version=version),
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

  def large_image(self, image_id: int) -> tuple[bytes, str]:
    """(bytes, mimetype) of pool image `image_id` to see it large: its own resolution up to
    `pool_images.LARGE_SIZE` on its longest side; checked and bounded as `image`."""
    return self._images.large(image_id)


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
    session._show(state)  # the counters include the batch just submitted, during the update
    labels = np.asarray(state.labels)
    labeled = (labels >= 0).any(0)
    assumed = np.asarray(state.pseudo_negative).any(0) & ~labeled
    epochs = int(session.run.config.deep_epochs)
    with session._lock:
      session._epoch_clock = (time.monotonic(), None, 0, epochs)
      session._set_deep(
        status="running",
        version=version,
        progress=None,
        training=f"training the network on your {int(labeled.sum())} labeled images and "
        f"{int(assumed.sum())} others taken as negatives",
        message="starting: reading the images (a restart resumes it)",
      )
    session.labeler.set_phase(
      UPDATING, f"Deep update {version}: starting; labeling waits for it (a restart resumes it)."
    )
    try:
      result = self._updater.update(state, version)
    except BaseException:
      with session._lock:
        session._epoch_clock = None
        session._set_deep(status="failed", progress=0.0, message="stopped; a restart resumes it")
      raise
    with session._lock:
      session._epoch_clock = None
      session._feature_version = version
      session._set_deep(
        status="done",
        progress=1.0,
        message=f"the next batches are chosen with the retrained network (deep update {version})",
        updates_done=version,
      )
    session.labeler.set_phase(UPDATING, f"Deep update {version} done; refitting the linear model.")
    return result


class _RefreshingLabeler:
  """The session's labeler as the runner sees it: refresh the page's view, then ask."""

  def __init__(self, session: LabelingSession):
    self._session = session

  def answer(self, query_ids: np.ndarray) -> np.ndarray:
    self._session._after_round()
    return self._session.labeler.answer(query_ids)


def total_rows(match: re.Match) -> int:
  return int(match.group(2))


def _duration(seconds: float) -> str:
  """'12s', '3m05s', '1h02m': as the embedding's ETA is written."""
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _write_lines(path: str, records: list[dict]) -> None:
  """Replaces a JSON-lines file atomically (temporary file, fsync, rename)."""
  temporary = path + ".tmp"
  with open(temporary, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, path)
