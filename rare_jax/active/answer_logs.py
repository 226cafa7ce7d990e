"""The logs of answers, read line by line and checked: `answers.jsonl` and `submitted.jsonl`.

A run's `answers.jsonl` (written by `runner.run_strategy`) holds one JSON object per round,
`{"round": r, "query_ids": [[id, ...], ...], "answers": [[true, ...], ...]}`: r >= 1, the
queried pool ids [C, B] and the answers [C, B]. A labeling run's `submitted.jsonl` (the web
labeler's journal, `webapp/labeler.py`) holds the same without `round`, one line per batch
submitted from the page.

A last line that does not parse is a writer killed mid-line: it is dropped. Any other line
that is not such a record (not JSON, a list, a missing key, ids that are not ints, answers of
another shape) is damage, refused with a `ValueError` naming the file, the line number, what is
wrong, and what to do about it, so that the commands that read these files (`label`, `export`,
the runner on a restart) say it in one line instead of a traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

ANSWERS_ADVICE = (
  "fix that line or delete it, then start the command again (nothing is lost by deleting it: "
  "the run's checkpoints hold the labels of every saved round, and a labeling run's "
  "submitted.jsonl every batch submitted from the page)"
)
JOURNAL_ADVICE = (
  "fix that line or delete it, then start the command again (deleting it loses nothing the run "
  "saved: its answers.jsonl and checkpoints hold every batch it took in; a batch submitted just "
  "before the server stopped that is not there yet is asked again)"
)


def read_records(path: str | os.PathLike | None, *, with_round: bool, advice: str) -> list[dict]:
  """The records of an answers log, in file order ([] if `path` is None or missing).

  Args:
    path: the file.
    with_round: records carry a `round` (answers.jsonl) or not (submitted.jsonl).
    advice: what to do about a damaged line, appended to the error.

  Raises:
    ValueError: a line that is not JSON (other than the last) or not a record (see the module
      docstring), naming the file and the line.
  """
  return read_lines(
    path,
    problem=lambda record: record_problem(record, with_round=with_round),
    expected=_expected(with_round),
    advice=advice,
  )


def read_lines(
  path: str | os.PathLike | None,
  *,
  problem: Callable[[Any], str | None],
  expected: str,
  advice: str,
) -> list[Any]:
  """The parsed lines of an append-only JSON-lines journal, in file order ([] if `path` is None
  or missing); a last line that does not parse (a writer killed mid-line) is dropped.

  Args:
    path: the file.
    problem: what is wrong with one parsed line, or None if it is a record.
    expected: the record format, for the error.
    advice: what to do about a damaged line, appended to the error.

  Raises:
    ValueError: a line that is not JSON (other than the last) or that `problem` refuses,
      naming the file and the line.
  """
  if path is None or not os.path.exists(path):
    return []
  path = os.fspath(path)
  with open(path, encoding="utf-8", errors="replace") as f:  # bytes of garbage: not JSON
    lines = f.read().split("\n")
  last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
  records = []
  for index, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      if index == last:
        break  # torn by a writer killed mid-line
      raise ValueError(
        f"{path} line {index + 1} is not JSON ({error.msg}: {_cut(line)!r}); expected "
        f"{expected}; {advice}"
      ) from None
    found = problem(record)
    if found is not None:
      raise ValueError(f"{path} line {index + 1}: {found}; expected {expected}; {advice}")
    records.append(record)
  return records


def record_problem(record: Any, *, with_round: bool) -> str | None:
  """What is wrong with one parsed line as an answers record, or None if it is one."""
  if not isinstance(record, dict):
    return f"a JSON {type(record).__name__}, not an object"
  keys = ("round", "query_ids", "answers") if with_round else ("query_ids", "answers")
  missing = [key for key in keys if key not in record]
  if missing:
    return f"no {', '.join(repr(k) for k in missing)} in the object"
  if with_round and (not _is_int(record["round"]) or record["round"] < 1):
    return f"round={excerpt(record['round'])}"
  ids, answers = record["query_ids"], record["answers"]
  shape = _shape(ids)
  if shape is None or not all(_is_int(i) and i >= 0 for row in ids for i in row):
    return f"query_ids={excerpt(ids)}"
  if _shape(answers) != shape or not all(_is_answer(a) for row in answers for a in row):
    return f"answers={excerpt(answers)} for query_ids of shape {list(shape)}"
  return None


def _expected(with_round: bool) -> str:
  round_ = '"round": r >= 1, ' if with_round else ""
  return (
    f'one object per line, {{{round_}"query_ids": [[pool ids]] per category, "answers": '
    "[[true/false]] of the same shape}"
  )


def _shape(rows: Any) -> tuple[int, int] | None:
  """(C, B) of a non-empty list of equally long non-empty lists, else None."""
  if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
    return None
  widths = {len(r) for r in rows}
  if len(widths) != 1 or 0 in widths:
    return None
  return len(rows), widths.pop()


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_answer(value: Any) -> bool:
  return isinstance(value, bool) or (_is_int(value) and value in (0, 1))


def excerpt(value: Any) -> str:
  """`value` as JSON, cut to 60 characters (for error messages)."""
  return _cut(json.dumps(value))


def _cut(text: str, limit: int = 60) -> str:
  return text if len(text) <= limit else text[: limit - 3] + "..."
