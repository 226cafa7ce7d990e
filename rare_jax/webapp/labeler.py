"""A person in a browser as a `Labeler`: the query is published, the answers come back by HTTP.

`WebLabeler.answer(query_ids)` is called by the run loop (`runner.run_strategy`, in a worker
thread): it publishes the `[C, B]` query and blocks until the person has answered every queried
id of every category once and submitted the batch. Meanwhile HTTP handlers call `set_answer`,
`undo` and `submit` (any thread). Each published query has a `serial`; a request for another
serial (a stale page) is refused, so an answer can never land on the wrong batch.

Durability: `submit` appends the batch to a journal (`submitted.jsonl`, fsynced) *before* it
acknowledges. The runner writes the answers to its own `answers.jsonl` right after `answer`
returns; if the process dies between the two, the restarted run asks the same query again and
`answer` finds it in the journal and returns it without asking the person. So a batch the
page was told is submitted is never lost; answers not yet submitted are. Opening the journal
repairs a last line torn by a killed writer or a full disk (it is cut off, as `MetricsWriter`
does for metrics.jsonl), so the next batch starts on its own line. A write that fails (disk
full) is undone and refused with a message that says so (`AnswerRejected`, 507 for ENOSPC);
the answers stay in the open batch, to submit again once there is room.

Corrections: an answer of a batch already submitted can be changed (`correct`, while a batch is
open or once the budget is used). Each change is appended to its own journal,
`corrections.jsonl` (`{"round", "category", "id", "answer"}` per line, fsynced before it is
acknowledged; the batches' journal is never edited), and wakes the loop thread: `answer` (or
`wait_for_correction`, after the budget is used) raises `AnswersCorrected`, and the session
re-derives the run from the corrected answers (`session.py`). Batches answered from the journal
after a restart get the corrections made since.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from typing import Any

import numpy as np

from rare_jax.active import answer_logs, labelers, metrics

# Where the run is, as shown to the page.
STARTING, LABELING, UPDATING, DONE, FAILED, STOPPED = (
  "starting",
  "labeling",
  "updating",
  "done",
  "failed",
  "stopped",
)


class AnswerRejected(ValueError):
  """A request the labeler refuses; `status` is the HTTP status that says why."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


class LabelingStopped(RuntimeError):
  """Raised in the loop thread by `answer` when the labeler is closed (server shutting down)."""


class AnswersCorrected(RuntimeError):
  """Raised in the loop thread by `answer` or `wait_for_correction` after `correct`: the run is
  to be re-derived from the corrected answers (the open batch is dropped)."""


def read_corrections(path: str | None) -> list[dict]:
  """The corrections journal's records, oldest first; a torn last line is dropped.

  Raises:
    ValueError: a damaged line (not JSON, or not a {round, category, id, answer} record),
      naming the file and the line.
  """
  return answer_logs.read_lines(
    path or None,
    problem=_correction_problem,
    expected='{"round": r, "category": c, "id": i, "answer": true/false}',
    advice=_FIX,
  )


def _correction_problem(record) -> str | None:
  ints = ("round", "category", "id")
  if (
    not isinstance(record, dict)
    or set(record) != {*ints, "answer"}
    or not all(isinstance(record[k], int) and not isinstance(record[k], bool) for k in ints)
    or min(record[k] for k in ints) < 0
    or not isinstance(record["answer"], bool)
  ):
    return f"{answer_logs.excerpt(record)} is not a correction"
  return None


_FIX = (
  "fix that line or delete it, then start the command again (deleting a line undoes that "
  "correction only)"
)


def apply_corrections(query_ids, answers, corrections: list[dict]) -> np.ndarray:
  """`answers` ([C, B] bool) of a batch asked `query_ids`, with `corrections` applied (later
  ones win)."""
  query_ids = np.asarray(query_ids)
  answers = np.array(answers, bool)
  for record in corrections:
    row = query_ids[record["category"]] if record["category"] < len(query_ids) else []
    for position in np.flatnonzero(np.asarray(row) == record["id"]):
      answers[record["category"], position] = record["answer"]
  return answers


def read_journal(path: str | None) -> list[dict]:
  """The submitted batches, oldest first; a torn last line (killed mid-write) is dropped.

  Raises:
    ValueError: a damaged line (not JSON, or not a {query_ids, answers} record of matching
      shapes), naming the file and the line and saying what to do (`rare_jax.active.answer_logs`).
  """
  return answer_logs.read_records(path or None, with_round=False, advice=answer_logs.JOURNAL_ADVICE)


def describe_os_error(error: OSError, path: str | None = None) -> str:
  """A one-line account of a failed file operation, that says "disk full" for ENOSPC."""
  path = path or error.filename
  if error.errno in (errno.ENOSPC, errno.EDQUOT):
    what = "disk full (ENOSPC)" if error.errno == errno.ENOSPC else "disk quota exceeded (EDQUOT)"
    return f"{what}{f' writing {path}' if path else ''}: free some space"
  return f"{error.strerror or error}{f' ({path})' if path else ''}"


def _append_line(path: str, line: str) -> None:
  """Appends `line` and a newline, fsynced; on failure cuts the file back to where it was."""
  data = (line + "\n").encode("utf-8")
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    start = os.lseek(fd, 0, os.SEEK_END)
    try:
      view = memoryview(data)
      while view:  # unbuffered: nothing is left to be written later, after the cut below
        view = view[os.write(fd, view) :]
      os.fsync(fd)
    except OSError:
      try:  # a partial line would tear the journal: take it back (frees the space too)
        os.ftruncate(fd, start)
      except OSError:
        pass  # then the torn tail is cut when the journal is next opened
      raise
  finally:
    os.close(fd)


class WebLabeler:
  """Answers queries with what a person submits through the web app (see the module docstring).

  Args:
    num_categories: C, rows of every query.
    journal_path: the submitted-batches journal (None: no journal, e.g. in unit tests).
    corrections_path: the corrections journal (None: no corrections).
  """

  def __init__(
    self,
    *,
    num_categories: int,
    journal_path: str | None = None,
    corrections_path: str | None = None,
  ):
    if num_categories < 1:
      raise ValueError(f"num_categories={num_categories}; expected >= 1")
    self.num_categories = num_categories
    self.journal_path = journal_path
    self._condition = threading.Condition()
    self._query: np.ndarray | None = None
    self._serial = 0
    self._draft: list[tuple[int, int, bool]] = []  # (category, id, answer), in answer order
    self._result: np.ndarray | None = None
    self._closed = False
    self._phase = STARTING
    self._message = ""
    self._version = 0
    self._corrected = False  # a correction the loop thread has not taken up yet
    if journal_path:
      metrics.drop_torn_tail(journal_path)
    self._journal = read_journal(journal_path)
    self.corrections_path = corrections_path
    if corrections_path:
      metrics.drop_torn_tail(corrections_path)
    self._corrections = read_corrections(corrections_path)

  # The loop thread's side.

  def answer(self, query_ids: np.ndarray) -> np.ndarray:
    """Publishes `query_ids` ([C, B] pool positions) and blocks until the batch is submitted.

    Raises:
      LabelingStopped: the labeler was closed while waiting.
    """
    query_ids = np.asarray(query_ids, np.int64)
    if query_ids.ndim != 2 or query_ids.shape[0] != self.num_categories:
      raise ValueError(
        f"query_ids of shape {query_ids.shape}; expected [C={self.num_categories}, B]"
      )
    for record in self._journal:
      if np.array_equal(np.asarray(record["query_ids"]), query_ids):
        with self._condition:
          corrections = list(self._corrections)
        answers = apply_corrections(query_ids, record["answers"], corrections)
        # Submitted before a restart, not yet in the runner's log.
        return labelers.check_answers(query_ids, query_ids, answers)
    with self._condition:
      if self._closed:
        raise LabelingStopped("the labeler is closed")
      self._take_correction()
      self._query = query_ids
      self._serial += 1
      self._draft = []
      self._result = None
      self._set_phase(LABELING)
      while self._result is None and not self._closed and not self._corrected:
        self._condition.wait()
      if self._result is None and not self._closed:
        self._take_correction()
      if self._result is None:
        raise LabelingStopped("the labeler was closed before the batch was submitted")
      answers, self._result = self._result, None  # `submit` closed the batch already
      return answers

  def wait_for_correction(self) -> None:
    """After the budget is used: blocks until a correction arrives (raises `AnswersCorrected`)
    or the labeler is closed (raises `LabelingStopped`)."""
    with self._condition:
      while not self._closed and not self._corrected:
        self._condition.wait()
      if self._closed:
        raise LabelingStopped("the labeler is closed")
      self._take_correction()

  def _take_correction(self) -> None:
    if self._corrected:
      self._corrected = False
      self._query, self._draft, self._result = None, [], None
      raise AnswersCorrected("an answer was corrected")

  def corrections(self) -> list[dict]:
    """The corrections so far, oldest first."""
    with self._condition:
      return [dict(record) for record in self._corrections]

  def finish(self, message: str = "") -> None:
    """The run has used its budget."""
    with self._condition:
      self._set_phase(DONE, message)

  def fail(self, message: str) -> None:
    """The loop thread died; the page shows `message`."""
    with self._condition:
      self._set_phase(FAILED, message)

  def close(self) -> None:
    """Wakes a waiting `answer` with `LabelingStopped`; later calls raise it at once."""
    with self._condition:
      self._closed = True
      if self._phase in (STARTING, LABELING, UPDATING):
        self._set_phase(STOPPED)
      self._condition.notify_all()

  def set_phase(self, phase: str, message: str = "") -> None:
    with self._condition:
      self._set_phase(phase, message)

  def _set_phase(self, phase: str, message: str = "") -> None:
    self._phase, self._message = phase, message
    self._version += 1
    self._condition.notify_all()

  # The HTTP side (any thread).

  def snapshot(self) -> dict[str, Any]:
    """The published query, the answers given so far, the phase; plain JSON data."""
    with self._condition:
      draft = {(c, i): a for c, i, a in self._draft}
      query = None
      if self._query is not None:
        query = [
          [{"id": int(i), "answer": draft.get((c, int(i)))} for i in row]
          for c, row in enumerate(self._query.tolist())
        ]
      last = self._draft[-1] if self._draft else None
      return {
        "version": self._version,
        "phase": self._phase,
        "message": self._message,
        "serial": self._serial if self._query is not None else None,
        "query": query,
        "answered": len(self._draft),
        "last_answer": None if last is None else {"category": last[0], "id": last[1]},
      }

  def set_answer(self, serial: int, category: int, image_id: int, answer: bool) -> None:
    """Records one answer of the open batch.

    Raises:
      AnswerRejected: 409 no open batch / a stale serial / an id answered already (undo it
        first); 422 a category or id that is not in the open query.
    """
    with self._condition:
      self._check_serial(serial)
      if not 0 <= category < self.num_categories:
        raise AnswerRejected(
          422, f"category {category} is not queried; expected 0 <= category < {self.num_categories}"
        )
      row = self._query[category].tolist()
      if image_id not in row:
        raise AnswerRejected(
          422,
          f"image {image_id} is not in the current query of category {category} "
          f"(queried: {sorted(row)})",
        )
      if any(c == category and i == image_id for c, i, _ in self._draft):
        raise AnswerRejected(
          409, f"image {image_id} of category {category} is answered already; undo it first"
        )
      self._draft.append((category, image_id, bool(answer)))
      self._version += 1

  def undo(self, serial: int) -> dict[str, Any]:
    """Takes back the last answer of the open batch; returns it ({category, id, answer})."""
    with self._condition:
      self._check_serial(serial)
      if not self._draft:
        raise AnswerRejected(409, "nothing to undo: no answer in this batch yet")
      category, image_id, answer = self._draft.pop()
      self._version += 1
      return {"category": category, "id": image_id, "answer": answer}

  def submit(self, serial: int) -> None:
    """Hands the complete batch to the loop, after writing it to the journal.

    Raises:
      AnswerRejected: 409 no open batch / a stale serial / unanswered ids left.
    """
    with self._condition:
      self._check_serial(serial)
      missing = self._query.size - len(self._draft)
      if missing:
        raise AnswerRejected(
          409, f"{missing} queried images have no answer yet; answer all before submitting"
        )
      categories = np.array([c for c, _, _ in self._draft])
      order = np.argsort(categories, kind="stable")
      ids = np.array([i for _, i, _ in self._draft])[order].reshape(self._query.shape)
      given = np.array([a for _, _, a in self._draft], bool)[order].reshape(self._query.shape)
      answers = labelers.check_answers(self._query, ids, given)
      record = {"query_ids": self._query.tolist(), "answers": answers.tolist()}
      if self.journal_path:
        try:
          _append_line(self.journal_path, json.dumps(record))
        except OSError as error:
          status = 507 if error.errno == errno.ENOSPC else 500
          raise AnswerRejected(
            status,
            f"{describe_os_error(error, self.journal_path)}; the batch is NOT saved: your "
            "answers are kept on this page, submit again once the problem is fixed",
          ) from error
      self._journal.append(record)
      self._result = answers
      self._query = None
      self._draft = []
      self._set_phase(UPDATING)

  def correct(self, record: dict, check=None) -> None:
    """Appends a correction ({round, category, id, answer}) to the corrections journal, then
    wakes the loop thread to re-derive the run (the open batch, if any, is dropped: its query
    was computed from the uncorrected answers).

    `check()`, called under the labeler's lock before anything is written, may raise
    `AnswerRejected` (the session checks the answer it changes there).

    Raises:
      AnswerRejected: 409 while the run is not waiting for the person (a batch being taken
        in, a deep update, a correction being applied); 507/500 the journal cannot be written.
    """
    with self._condition:
      if self._closed or self._phase not in (LABELING, DONE) or self._corrected:
        raise AnswerRejected(
          409,
          f"answers can be changed while a batch is open or once the budget is used; the run "
          f"is {self._phase} now: try again in a moment",
        )
      if check is not None:
        check()
      if not self.corrections_path:
        raise AnswerRejected(409, "this labeler keeps no corrections journal")
      try:
        _append_line(self.corrections_path, json.dumps(record, sort_keys=True))
      except OSError as error:
        status = 507 if error.errno == errno.ENOSPC else 500
        raise AnswerRejected(
          status,
          f"{describe_os_error(error, self.corrections_path)}; the correction is NOT saved",
        ) from error
      self._corrections.append(dict(record))
      self._corrected = True
      self._query, self._draft = None, []
      self._set_phase(UPDATING, "Answer changed: recomputing the model from the corrected answers.")

  def _check_serial(self, serial: int) -> None:
    if self._query is None:
      raise AnswerRejected(409, f"no batch is open for answers (the run is {self._phase})")
    if serial != self._serial:
      raise AnswerRejected(
        409, f"batch {serial} is not the open batch {self._serial}; reload the page"
      )
