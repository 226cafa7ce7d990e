"""One labeling session: the run loop in a worker thread, the person answering through the app.

`LabelingSession(run)` owns a `WebLabeler`; `start()` runs `runner.run_strategy` in a daemon
thread with it, so the loop is exactly the research loop (query -> answers logged -> observe ->
checkpoint -> metrics, resumed from the newest checkpoint on a restart). Before each query is
published the session reads the newest checkpoint (the state the query was computed from) for
what the page shows: labels used, positives found, the current top-scoring images.

Model updates: after a submitted batch the linear model is refitted at once (the loop's
`observe`). A background deep update (retrain the network, re-embed, keep labeling on the
current ranking meanwhile) does not exist yet; its seam is `_after_round` plus the `model`
entry of `state()`, which the page shows as is.
"""

from __future__ import annotations

import functools
import io
import os
import threading
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from rare_jax import runner
from rare_jax.checkpoint import CheckpointStore
from rare_jax.data import folder
from rare_jax.webapp import folder_run
from rare_jax.webapp.labeler import LABELING, LabelingStopped, WebLabeler, describe_os_error

# Longest side of the images the app serves (re-encoded; the originals are never sent).
THUMBNAIL_SIZE = 256


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
    """Reads the newest checkpoint now, so a damaged one is refused before serving.

    Raises:
      ValueError: a checkpoint that cannot be restored (naming it).
    """
    self._refresh()

  def _after_round(self) -> None:
    """Called before each query is published. The seam for a background deep update."""
    self._refresh()

  def _refresh(self) -> None:
    """Reads the newest checkpoint into what the page shows."""
    with CheckpointStore(os.path.join(self.run.run_dir, "checkpoints")) as store:
      step = store.latest_step()
      if step is None:
        return
      state, _ = store.restore(step, self._abstract_state)
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
    return {
      "version": snapshot["version"],
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
        "deep_update": "not available yet",
        "has_model": bool(progress and progress["has_model"]),
      },
    }

  def image(self, image_id: int) -> tuple[bytes, str]:
    """(bytes, mimetype) of pool image `image_id`, re-encoded at most THUMBNAIL_SIZE wide.

    Raises:
      IndexError: no such image id in this run's pool.
      ValueError: the file no longer decodes.
    """
    return _thumbnail(self.run.file_path(image_id))


@functools.lru_cache(maxsize=1024)
def _thumbnail(path: str) -> tuple[bytes, str]:
  try:
    image = folder.decode_image(path)
  except Exception as error:
    raise ValueError(f"{path} no longer decodes: {error}") from None
  image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
  buffer = io.BytesIO()
  if max(image.size) <= 128:  # small images (icons, MNIST-like): lossless
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "image/png"
  image.save(buffer, format="JPEG", quality=88)
  return buffer.getvalue(), "image/jpeg"


class _RefreshingLabeler:
  """The session's labeler as the runner sees it: refresh the page's view, then ask."""

  def __init__(self, session: LabelingSession):
    self._session = session

  def answer(self, query_ids: np.ndarray) -> np.ndarray:
    self._session._after_round()
    return self._session.labeler.answer(query_ids)
