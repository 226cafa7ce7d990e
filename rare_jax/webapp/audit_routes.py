"""The audit's HTTP routes (a Flask Blueprint) and its page script, for the labeling server.

To serve them, `server.create_app` registers the Blueprint after defining its own routes:

    from rare_jax.webapp import audit_routes
    app.register_blueprint(audit_routes.blueprint(session, json_body=_json_body))

and static/index.html loads the script after app.js (it adds its own section to the page,
before the footer, or fills an element with id "audit-section" if the page has one):

    <script src="audit.js?token=__TOKEN__" defer></script>

The app's token check, security headers and error handlers apply to these routes as to the
others. Routes:

    GET  /audit.js            the audit panel's script (static/audit.js)
    GET  /api/audit           {"categories": [{index, name, has_model, audit, next, pending}],
                               "default_size", "max_size"}: `audit` is the estimate
                               (`rare_jax.webapp.audit.estimate`) or null, `next` the image to
                               ask next ({id, path}) or null
    POST /api/audit/start     {"category": int, "size": int, "replace": bool}: draws an audit
                               (409 if one exists and replace is false, or no model yet)
    POST /api/audit/answer    {"category": int, "id": int, "answer": bool}: 422 for an image
                               not in the audit

Each POST answers with the body of GET /api/audit. Bodies are checked by the server's
`json_body` (exactly these fields, their types, the size limit); sizes are bounded to
[1, audit.MAX_SIZE] and categories to the run's. The audit reads the newest checkpoint (the
model of the last submitted batch) and never writes training labels.
"""

from __future__ import annotations

import os
import pathlib
import threading
from collections.abc import Callable
from typing import Any

import flask
import numpy as np

from rare_jax.active import linear, loop, runner
from rare_jax.infra.checkpoint import CheckpointStore
from rare_jax.webapp import audit
from rare_jax.webapp.labeler import AnswerRejected

SCRIPT = pathlib.Path(__file__).parent / "static" / "audit.js"


def blueprint(
  session, *, json_body: Callable[[dict[str, type]], dict[str, Any]]
) -> flask.Blueprint:
  """The audit routes for `session` (a `LabelingSession`); `json_body(fields)` parses and
  checks a request's JSON body (the server's `_json_body`)."""
  run = session.run
  model = _NewestModel(run)
  names = run.category_names
  script = SCRIPT.read_bytes()
  bp = flask.Blueprint("audit", __name__)

  def category(value: int) -> int:
    if not 0 <= value < len(names):
      raise AnswerRejected(422, f"category={value}; expected 0 <= category < {len(names)}")
    return value

  cache: dict[str, Any] = {"key": None, "value": None}
  cache_lock = threading.Lock()

  def overview() -> dict[str, Any]:
    """GET /api/audit's body; recomputed only when the model or an audit file changed (the
    page polls it)."""
    probabilities, labels, fitted = model.read()
    key = (model.key, _stamp(os.path.join(audit.audit_dir(run.workdir), audit.ANSWERS)))
    key += tuple(_stamp(audit.design_path(run.workdir, c)) for c in range(len(names)))
    with cache_lock:
      if cache["key"] == key:
        return cache["value"]
    categories = []
    for c, name in enumerate(names):
      entry = {"index": c, "name": name, "has_model": bool(fitted is not None and fitted[c])}
      entry["audit"] = None
      if entry["has_model"]:
        entry["audit"] = audit.estimate(run.workdir, c, probabilities[c], labels[c])
      left = audit.pending(run.workdir, c)
      entry["pending"] = len(left)
      entry["next"] = {"id": left[0], "path": run.display_path(left[0])} if left else None
      categories.append(entry)
    value = {
      "categories": categories,
      "default_size": audit.DEFAULT_SIZE,
      "max_size": audit.MAX_SIZE,
    }
    with cache_lock:
      cache["key"], cache["value"] = key, value
    return value

  @bp.get("/audit.js")
  def audit_script():
    return flask.Response(script, content_type="text/javascript; charset=utf-8")

  @bp.get("/api/audit")
  def get_audit():
    return flask.jsonify(_checked(overview))

  @bp.post("/api/audit/start")
  def start_audit():
    body = json_body({"category": int, "size": int, "replace": bool})
    c = category(body["category"])
    if not 1 <= body["size"] <= audit.MAX_SIZE:
      raise AnswerRejected(400, f"size={body['size']}; expected 1 <= size <= {audit.MAX_SIZE}")
    probabilities, labels, fitted = model.read()
    if fitted is None or not fitted[c]:
      raise AnswerRejected(
        409, f"{names[c]} has no classifier yet: submit a batch first, then start the audit"
      )
    try:
      audit.start(
        run.workdir, c, probabilities[c], labels[c], size=body["size"], replace=body["replace"]
      )
    except audit.AuditExists as error:
      raise AnswerRejected(409, str(error)) from None
    except ValueError as error:
      raise AnswerRejected(409, str(error)) from None
    return flask.jsonify(_checked(overview))

  @bp.post("/api/audit/answer")
  def answer_audit():
    body = json_body({"category": int, "id": int, "answer": bool})
    c = category(body["category"])
    try:
      audit.record(run.workdir, c, body["id"], body["answer"])
    except ValueError as error:
      raise AnswerRejected(422, str(error)) from None
    return flask.jsonify(_checked(overview))

  return bp


def _stamp(path: str) -> tuple[int, int, int, int] | None:
  """What changes when a file is written (inode, size, mtime and ctime in ns), or None if it
  is absent."""
  try:
    st = os.stat(path)
  except FileNotFoundError:
    return None
  return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _checked(make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
  """`make()`, with a damaged audit file or checkpoint said as a 500 with its message."""
  try:
    return make()
  except (ValueError, OSError) as error:
    raise AnswerRejected(500, f"cannot read the audit: {error}") from None


class _NewestModel:
  """The newest checkpoint's probabilities `[C, P]`, training labels `[C, P]` and which
  categories have a classifier `[C]`; re-read only when the newest checkpoint changes: a newer
  step, or the same step written again (a correction rewinds the run and replays it to the
  same round numbers with other answers)."""

  def __init__(self, run):
    self._directory = os.path.join(run.run_dir, "checkpoints")
    self._abstract = runner.abstract_state(run.features, run.seed_ids, int(run.config.seed))
    self._lock = threading.Lock()
    self._key = None
    self._value: tuple[Any, Any, Any] = (None, None, None)

  @property
  def key(self) -> tuple | None:
    """The checkpoint of the last `read`: (step, its directory's `_stamp`)."""
    return self._key

  def read(self):
    with self._lock:
      if not os.path.isdir(self._directory):
        return self._value
      with CheckpointStore(self._directory) as store:
        step = store.latest_step()
        if step is None:
          return self._value
        key = (step, _stamp(os.path.join(self._directory, str(step))))
        if key == self._key:
          return self._value
        state, _ = store.restore(step, self._abstract)
      scores = np.asarray(state.scores, np.float64)
      fitted = np.asarray(loop.fitted(state))
      # Logits of the linear models; categories without one keep cosines (not probabilities).
      probabilities = np.where(fitted[:, None], linear.sigmoid(scores), 0.0)
      self._value = (probabilities, np.asarray(state.labels).astype(np.int64), fitted)
      self._key = key
      return self._value
