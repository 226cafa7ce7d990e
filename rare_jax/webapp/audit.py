"""A labeling run's audit: stored in its workdir, kept apart from the training labels.

    WORKDIR/audit/category_{c}.json   the audit of category c: its id, when it was drawn, and the
                                      design (`rare_jax.active.audit.AuditDesign.to_json`)
    WORKDIR/audit/answers.jsonl       every audit answer, one JSON object a line, append-only:
                                      {"category": c, "audit": id, "index": i, "answer": bool}

The loop never reads these files: audit answers never become training labels, and the audit
only asks images that had no training label when it was drawn (`start`). Answering an image
again records the new answer after the old one; the last one counts (a correction). Answers of
an earlier audit of the same category (replaced by `start(..., replace=True)`) stay in the
file under their own id and are not counted.

`estimate` gives the page and the finish output the audit's estimate of precision, recall and
positives still unfound for the current model (docs/audit.md says how, and what the intervals
mean).
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from typing import Any

import numpy as np

from rare_jax.active import audit
from rare_jax.infra.checkpoint import write_json_atomic

AUDIT_DIR = "audit"
ANSWERS = "answers.jsonl"
DEFAULT_SIZE = 50
MAX_SIZE = 1000  # images in one audit
MAX_CATEGORIES = 1000
MAX_ANSWERS_BYTES = 64 * 1024 * 1024  # answers.jsonl larger than this is refused as damage
FORMAT = "rare_jax.Audit/1"
THRESHOLD = 0.5

_lock = threading.Lock()  # start and record: one writer at a time within the process


class AuditExists(ValueError):
  """`start` without `replace` where the category has an audit already."""


def audit_dir(workdir: str) -> str:
  return os.path.join(workdir, AUDIT_DIR)


def design_path(workdir: str, category_index: int) -> str:
  return os.path.join(audit_dir(workdir), f"category_{_category(category_index)}.json")


def start(
  workdir: str,
  category_index: int,
  scores: np.ndarray,
  labels: np.ndarray,
  *,
  size: int = DEFAULT_SIZE,
  seed: int | None = None,
  replace: bool = False,
) -> dict[str, Any]:
  """Draws an audit of category `category_index` and saves it under WORKDIR/audit/.

  Args:
    workdir: the labeling run's workdir.
    category_index: the category.
    scores: the current model's probabilities, `[P]` for this category or `[C, P]`.
    labels: the training labels (1 yes, 0 no, -1 none), `[P]` or `[C, P]` like `scores`:
      only images without one are drawn.
    size: images to ask, in [1, MAX_SIZE] (all unlabeled images if fewer).
    seed: the draw's seed; None draws one at random (it is saved with the design).
    replace: draw a new audit where one exists (the old answers are kept, not counted).

  Returns:
    {"audit": id, "size": n, "planned": per-stratum sizes}.

  Raises:
    AuditExists: an audit exists and `replace` is False.
    ValueError: bad arguments (named), or no image without a training label.
  """
  category_index = _category(category_index)
  scores, labels = _category_arrays(scores, labels, category_index)
  if not audit._is_int(size) or not 1 <= size <= MAX_SIZE:
    raise ValueError(f"size={size!r}; expected an int in [1, {MAX_SIZE}]")
  if seed is None:
    seed = secrets.randbits(62)
  if not isinstance(replace, bool):
    raise ValueError(f"replace={replace!r}; expected true or false")
  design = audit.draw(scores, labels == -1, size=size, threshold=THRESHOLD, seed=seed)
  path = design_path(workdir, category_index)
  with _lock:
    if os.path.exists(path) and not replace:
      raise AuditExists(
        f"category {category_index} has an audit already; expected replace=true to draw a new one"
      )
    record = {
      "format": FORMAT,
      "audit": secrets.token_hex(8),
      "category": category_index,
      "drawn_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "known_positives_at_draw": int((labels == 1).sum()),
      "design": design.to_json(),
    }
    write_json_atomic(path, record)
  return {"audit": record["audit"], "size": design.size, "planned": list(design.planned)}


def load(workdir: str, category_index: int) -> tuple[str, audit.AuditDesign] | None:
  """(audit id, design) of the category's audit, or None if it has none.

  Raises:
    ValueError: a damaged design file, naming it.
  """
  path = design_path(workdir, category_index)
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as error:
    raise ValueError(f"{path} cannot be read ({error}); expected the audit's design") from None
  if not isinstance(record, dict) or record.get("format") != FORMAT:
    raise ValueError(f"{path}: not an audit (format {FORMAT!r} expected); delete it to start anew")
  audit_id = record.get("audit")
  if not isinstance(audit_id, str) or not 1 <= len(audit_id) <= 64:
    raise ValueError(f"{path}: audit id {audit_id!r}; expected a short string")
  try:
    design = audit.AuditDesign.from_json(record.get("design"))
  except ValueError as error:
    raise ValueError(f"{path}: {error}; delete it to start anew") from None
  return audit_id, design


def answers(workdir: str, category_index: int) -> dict[int, bool]:
  """The current audit's answers {pool index: answer} (the last answer of an image counts);
  {} without an audit."""
  loaded = load(workdir, category_index)
  if loaded is None:
    return {}
  return _answers(workdir, category_index, *loaded)


def pending(workdir: str, category_index: int) -> list[int]:
  """Pool indices of the audit still to answer, in the audit's random order ([] without one).

  Every prefix of the audit's order is a stratified random sample (`rare_jax.active.audit`),
  so the estimate is valid after any number of answers given in this order.
  """
  loaded = load(workdir, category_index)
  if loaded is None:
    return []
  given = _answers(workdir, category_index, *loaded)
  return [int(i) for i in loaded[1].sample if int(i) not in given]


def record(workdir: str, category_index: int, index: int, answer: bool) -> None:
  """Appends an answer for pool image `index` of the category's audit.

  Raises:
    ValueError: no audit for the category, an index that is not in it, an answer that is not
      a bool (nothing is written then).
  """
  category_index = _category(category_index)
  if not isinstance(answer, bool):
    raise ValueError(f"answer={answer!r}; expected true or false")
  with _lock:
    loaded = load(workdir, category_index)
    if loaded is None:
      raise ValueError(f"category {category_index} has no audit; expected one started first")
    audit_id, design = loaded
    if not audit._is_int(index) or int(index) not in set(design.sample.tolist()):
      raise ValueError(f"image {index!r} is not in category {category_index}'s audit")
    line = json.dumps(
      {"category": category_index, "audit": audit_id, "index": int(index), "answer": answer},
      sort_keys=True,
    )
    path = os.path.join(audit_dir(workdir), ANSWERS)
    os.makedirs(audit_dir(workdir), exist_ok=True)
    # One write of one short line with O_APPEND: a reader sees it whole or not at all.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      data = (line + "\n").encode()
      if os.write(fd, data) != len(data):
        raise OSError(f"short write to {path}")
      os.fsync(fd)
    finally:
      os.close(fd)


def estimate(
  workdir: str, category_index: int, scores: np.ndarray, labels: np.ndarray
) -> dict[str, Any] | None:
  """The audit's estimate for the current model, JSON-ready; None without an audit.

  Args:
    scores: the current model's probabilities, `[P]` for this category or `[C, P]` (may be a
      newer model than the audit was drawn with: the design stays valid).
    labels: the training labels now (1 yes, 0 no, -1 none), shaped like `scores`: images
      labeled since the draw leave the estimate and count among the known positives.

  Returns:
    `AuditEstimate.to_json()` (precision, recall, unfound: {value, low, high} or None until
    every stratum has an answer; labeled, planned, threshold, summary: a sentence for the
    page; ...) plus "audit" (its id), "category" and "pending" (images left to answer).
  """
  category_index = _category(category_index)
  loaded = load(workdir, category_index)
  if loaded is None:
    return None
  audit_id, design = loaded
  scores, labels = _category_arrays(scores, labels, category_index)
  if len(scores) != design.pool_size:
    raise ValueError(
      f"scores of {len(scores)} images; the audit was drawn on a pool of {design.pool_size}"
    )
  given = _answers(workdir, category_index, audit_id, design)
  result = audit.estimate(
    design,
    given,
    scores=scores,
    threshold=THRESHOLD,
    known_positives=int((labels == 1).sum()),
    unlabeled=labels == -1,
  )
  out = result.to_json()
  out.update(audit=audit_id, category=category_index, pending=design.size - len(given))
  return out


def _answers(
  workdir: str, category_index: int, audit_id: str, design: audit.AuditDesign
) -> dict[int, bool]:
  path = os.path.join(audit_dir(workdir), ANSWERS)
  try:
    size = os.stat(path).st_size
  except FileNotFoundError:
    return {}
  if size > MAX_ANSWERS_BYTES:
    raise ValueError(f"{path} holds {size} bytes; expected at most {MAX_ANSWERS_BYTES}")
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = f.read().split("\n")
  in_sample = set(design.sample.tolist())
  given: dict[int, bool] = {}
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      entry = json.loads(line)
    except ValueError:
      if number == len(lines):  # a last line without its newline: a writer killed mid-line
        continue
      raise ValueError(
        f"{path} line {number} is not JSON; expected an audit answer (delete that line)"
      ) from None
    if not (
      isinstance(entry, dict)
      and set(entry) == {"category", "audit", "index", "answer"}
      and audit._is_int(entry["category"])
      and audit._is_int(entry["index"])
      and isinstance(entry["answer"], bool)
      and isinstance(entry["audit"], str)
    ):
      raise ValueError(
        f"{path} line {number}: {line[:80]!r}; expected "
        '{"category": int, "audit": str, "index": int, "answer": bool} (delete that line)'
      )
    if entry["category"] != category_index or entry["audit"] != audit_id:
      continue
    if entry["index"] not in in_sample:
      raise ValueError(
        f"{path} line {number}: image {entry['index']} is not in the audit {audit_id} "
        "(delete that line)"
      )
    given[entry["index"]] = entry["answer"]
  return given


def _category(category_index: Any) -> int:
  if not audit._is_int(category_index) or not 0 <= category_index < MAX_CATEGORIES:
    raise ValueError(f"category={category_index!r}; expected a category index")
  return int(category_index)


def _category_arrays(scores: Any, labels: Any, category_index: int):
  scores, labels = np.asarray(scores), np.asarray(labels)
  if scores.ndim == 2:
    if not category_index < scores.shape[0]:
      raise ValueError(f"category {category_index} of scores for {scores.shape[0]} categories")
    scores = scores[category_index]
  if labels.ndim == 2:
    if not category_index < labels.shape[0]:
      raise ValueError(f"category {category_index} of labels for {labels.shape[0]} categories")
    labels = labels[category_index]
  if labels.shape != scores.shape or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
      f"labels of {labels.dtype} {labels.shape}; expected int [P] (1, 0, -1) like the scores "
      f"{scores.shape}"
    )
  if not np.isin(labels, (-1, 0, 1)).all():
    raise ValueError("labels hold values other than 1 (yes), 0 (no) and -1 (none)")
  return scores, labels
