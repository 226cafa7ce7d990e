"""A labeling workdir's labels, and its ranked results, as CSV or JSON: what
`python -m rare_jax.export` and the labeling page's download links and finish action write (the
formats are described in `rare_jax/export.py`).

`collect_labels` / `write_labels`: the labels given. `pool_scores`: the newest checkpoint's
scores of the whole pool (what `rare_jax.predict --pool` writes). `write_results`: the ranked
results of the whole pool for every category (the finish action), with the audit's estimate
of precision and recall when the run has an audit (`rare_jax.webapp.audit`).

Paths, one convention for the seeds and the pool (the run's own, `rare_jax.data.folder.
stored_path`): relative to the base folder (POSIX `/`) for a file inside it, absolute for any
other file (a seed from elsewhere, an image of a list outside its base). The base folder is the
labeled folder (`--images=DIR`), or the base of a list (`--images=@LIST --base=DIR`: the list
file's folder by default). Every export records it: the JSONs as `images` (with `images_list`,
the list file, for a run on a list), the CSVs in their last column `images`, the same on every
row, so a path of any row is found as `os.path.join(images, path)` (an absolute path stays
itself).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rare_jax.active import linear, loop, runner
from rare_jax.deep import embed as embed_lib
from rare_jax.infra import csvfile
from rare_jax.infra.checkpoint import CheckpointStore, write_json_atomic
from rare_jax.webapp import audit, folder_run
from rare_jax.webapp.labeler import read_journal

FORMAT = "rare_jax.Labels/1"
COLUMNS = ("path", "category", "answer", "round")  # of each label
CSV_COLUMNS = (*COLUMNS, "images")  # the labels CSV: the base folder last, on every row
FORMATS = ("csv", "json")


def collect_labels(workdir: str) -> tuple[dict, list[dict[str, Any]]]:
  """(the run's manifest, its labels as {path, category, answer, round} dicts, oldest first).

  Raises:
    ValueError: not a directory, no labeling run in it, or damaged run files (naming them).
  """
  manifest, _ = collect_labels_manifest(workdir)
  paths, names = manifest["paths"], manifest["category_names"]
  run_dir = folder_run.run_dir(workdir)
  logged = runner.read_answers(os.path.join(run_dir, "answers.jsonl"))
  batches = [(r, logged[r]["query_ids"], logged[r]["answers"]) for r in sorted(logged) if r > 0]
  next_round = max(logged, default=0) + 1
  for record in read_journal(os.path.join(run_dir, folder_run.JOURNAL)):
    if not any(np.array_equal(record["query_ids"], ids) for _, ids, _ in batches):
      batches.append((next_round, record["query_ids"], record["answers"]))
      next_round += 1
  labels = [
    {"path": paths[i], "category": names[c], "answer": "yes", "round": 0}
    for c, seeds in enumerate(manifest["seed_ids"])
    for i in dict.fromkeys(seeds)  # several categories pad short seed lists by repeating
  ]
  for round_index, query_ids, answers in batches:
    for c, (ids, given) in enumerate(zip(query_ids, answers, strict=True)):
      for i, answer in zip(ids, given, strict=True):
        if not 0 <= int(i) < len(paths):
          raise ValueError(
            f"{run_dir}: round {round_index} labels image {i}; expected ids below {len(paths)}"
          )
        labels.append(
          {
            "path": paths[int(i)],
            "category": names[c],
            "answer": "yes" if answer else "no",
            "round": int(round_index),
          }
        )
  return manifest, labels


def prepare_out_file(out: str) -> None:
  """Checks an `--out` file name before any work, and creates its directory (any format).

  Shared by the commands that write a file (`export`, `predict`): a missing directory is
  created, the same for CSV and JSON, so a long run never fails only at its last step.

  Raises:
    ValueError: `out` is empty or a directory, or its directory cannot be created or written
      (a path component is a file, no permission), naming it.
  """
  if not out:
    raise ValueError("--out is empty; expected a file name (e.g. scores.csv)")
  if os.path.isdir(out):
    raise ValueError(f"--out={out!r} is a directory; expected a file name (e.g. labels.csv)")
  directory = os.path.dirname(os.path.abspath(out))
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as error:
    raise ValueError(
      f"--out={out!r}: its folder {directory!r} cannot be created ({error.strerror or error}); "
      "expected a file in a folder that exists or can be created"
    ) from None
  if not os.access(directory, os.W_OK | os.X_OK):
    raise ValueError(f"--out={out!r}: its folder {directory!r} is not writable")


def format_of(out: str, format_flag: str | None) -> str:
  """`format_flag`, else `json` for a `.json` out file and `csv` otherwise."""
  if format_flag is not None:
    if format_flag not in FORMATS:
      raise ValueError(f"format={format_flag!r}; expected one of {FORMATS}")
    return format_flag
  return "json" if out.lower().endswith(".json") else "csv"


def write_labels(out: str, manifest: dict, labels: list[dict[str, Any]], fmt: str) -> None:
  """Writes `labels` to `out` as `fmt` (see the module docstring), atomically.

  Raises:
    ValueError: `out` is a directory, or an unknown format.
    OSError: the file cannot be written.
  """
  if os.path.isdir(out):
    raise ValueError(f"--out={out!r} is a directory; expected a file name (e.g. labels.csv)")
  root = manifest["root"]
  if fmt == "csv":
    csvfile.write_csv_atomic(
      out, CSV_COLUMNS, ([*(label[k] for k in COLUMNS), root] for label in labels)
    )
  elif fmt == "json":
    printable = [
      {k: csvfile.printable(v) if isinstance(v, str) else v for k, v in label.items()}
      for label in labels
    ]
    document = {"format": FORMAT, **base_fields(manifest), "labels": printable}
    write_json_atomic(out, document)
  else:
    raise ValueError(f"format={fmt!r}; expected one of {FORMATS}")


def base_fields(manifest: dict) -> dict[str, str]:
  """What an export's JSON says of where its paths are: `images`, the base folder, and for a
  run on a list `images_list`, the list file (printable: see `rare_jax.infra.csvfile`)."""
  fields = {"images": csvfile.printable(manifest["root"])}
  if manifest.get("images_list") is not None:
    fields["images_list"] = csvfile.printable(manifest["images_list"])
  return fields


RESULTS_FORMAT = "rare_jax.Results/1"
RESULTS_COLUMNS = ("category", "rank", "path", "score", "label", "images")
RESULTS_DIR = "results"  # under the workdir, unless another folder is given
RESULTS_NAME = "ranked_results"  # .csv and .json


def pool_feature_shape(workdir: str, config) -> tuple[int, int]:
  """[P, D] of the features a run's loop started from (without reading them): the cached
  embeddings (`features/pool/`) or the pixel-PCA features (`features/pool.npy`).

  Raises:
    ValueError: the run never computed them.
  """
  directory = os.path.join(workdir, "features")
  if config.features in ("pretrained", "m_pre"):
    store_dir = os.path.join(directory, "pool")
    if not embed_lib.FeatureStore.exists(store_dir):
      raise ValueError(f"{workdir}: {store_dir} is missing; the run never computed features")
    store = embed_lib.FeatureStore.open(store_dir)
    return (store.num_rows, store.dim)
  path = os.path.join(directory, "pool.npy")
  if not os.path.exists(path):
    raise ValueError(f"{workdir}: {path} is missing; the run never computed features")
  return tuple(np.load(path, mmap_mode="r").shape)


@dataclasses.dataclass(frozen=True)
class PoolScores:
  """The newest checkpoint of a labeling run: its model's scores of the whole pool.

  logits: float64 [C, P], the linear model's logit per category and pool image (the loop's own
  scores on the features of the checkpoint's feature version, so no image is embedded again);
  `probabilities` their sigmoid. labels: int8 [C, P], 1 yes (seeds included), 0 no, -1 none.
  seeds: bool [C, P]. paths: the pool's paths (relative to the base folder for files inside
  it, else absolute: the module docstring).
  """

  workdir: str
  manifest: dict
  config: Any
  category_names: list[str]
  paths: list[str]
  logits: np.ndarray
  labels: np.ndarray
  seeds: np.ndarray
  round: int
  feature_version: int

  @property
  def probabilities(self) -> np.ndarray:
    """float64 [C, P]: the sigmoid of `logits`."""
    return linear.sigmoid(self.logits)

  @property
  def model(self) -> str:
    """One line for people: which model gave the scores."""
    features = folder_run.describe_features(self.config)
    if self.feature_version:
      features += f", after deep update v{self.feature_version}"
    return f"the linear model of round {self.round} on {features}"


def pool_scores(workdir: str) -> PoolScores:
  """The newest checkpoint's scores of a labeling run's pool (see `PoolScores`).

  Raises:
    ValueError: not a labeling run, a damaged checkpoint or run file (named), no batch
      labeled yet (no model), or a category without a linear model yet.
  """
  manifest, _ = collect_labels_manifest(workdir)
  config = ml_collections.ConfigDict(
    folder_run.read_json_object(os.path.join(workdir, "config.json"))
  )
  seed_ids = np.asarray(manifest["seed_ids"], np.int64)
  like = runner.abstract_state(
    jax.ShapeDtypeStruct(pool_feature_shape(workdir, config), jnp.float32),
    seed_ids,
    int(config.seed),
  )
  directory = os.path.join(folder_run.run_dir(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise ValueError(f"{workdir}: {directory} is missing; expected a started labeling run")
  with CheckpointStore(directory) as store:
    step = store.latest_step()
    if step is None:
      raise ValueError(f"{directory} holds no checkpoint; expected a started labeling run")
    state, meta = store.restore(step, like)
  names = list(manifest["category_names"])
  if not bool(state.has_model):
    raise ValueError(
      f"{workdir}: no batch labeled yet (round 0): no model to rank the pool with; expected "
      "at least one submitted batch"
    )
  fitted = np.asarray(loop.fitted(state))
  if not fitted.all():
    missing = [n for n, f in zip(names, fitted, strict=True) if not f]
    raise ValueError(
      f"{workdir}: categories {missing} have no linear model yet (no negative or no positive "
      "label); expected another batch labeled"
    )
  logits = np.asarray(state.scores, np.float64)
  labels = np.asarray(state.labels, np.int8)
  return PoolScores(
    workdir=workdir,
    manifest=manifest,
    config=config,
    category_names=names,
    paths=list(manifest["paths"]),
    logits=logits,
    labels=labels,
    seeds=(np.asarray(state.label_round) == 0) & (labels == 1),
    round=int(state.round),
    feature_version=int(meta.get("feature_version", 0)),
  )


def collect_labels_manifest(workdir: str) -> tuple[dict, str]:
  """(manifest, its path) of a labeling workdir, checked.

  Raises:
    ValueError: not a directory, no labeling run in it, or a damaged manifest.
  """
  if not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir!r} is not a directory; expected a labeling workdir")
  path = os.path.join(workdir, folder_run.MANIFEST)
  if not os.path.exists(path):
    raise ValueError(
      f"{workdir} holds no labeling run: {path} is missing; expected a workdir of rare-jax-label"
    )
  manifest = folder_run.read_json_object(path)
  if manifest.get("format") != folder_run.MANIFEST_FORMAT:
    raise ValueError(
      f"{path}: format {manifest.get('format')!r}; expected {folder_run.MANIFEST_FORMAT!r}"
    )
  return manifest, path


def ranking(scores: np.ndarray) -> np.ndarray:
  """Pool ids from the highest score to the lowest (ties: lower id first)."""
  scores = np.asarray(scores)
  return np.lexsort((np.arange(len(scores)), -scores))


def write_results(
  workdir: str,
  out_dir: str | None = None,
  *,
  estimate: Callable[[str, int, np.ndarray, np.ndarray], Any] = audit.estimate,
  log: Callable[[str], None] = lambda _: None,
) -> list[str]:
  """Writes the ranked results of the whole pool for every category, from the run's newest
  model; returns the paths written ([CSV, JSON]).

  Files: `OUT_DIR/ranked_results.csv` and `.json` (OUT_DIR: `WORKDIR/results` by default),
  written atomically (a reader sees the previous results or the new ones). The CSV has one
  row per (category, pool image): `category,rank,path,score,label,images`, by category (the
  run's order) then rank (1 = highest score); `score` is the model's probability (6 decimals; the
  rank follows the logits, so images whose probabilities round to 1.0 keep their order; exact
  ties by pool id), `label` the answer given: `yes` (seeds included), `no`, or
  `none`, `images` the base folder (the module docstring). The JSON: `{"format":
  "rare_jax.Results/1", "workdir", "images" (the base folder), "images_list" (a list's file),
  "round", "feature_version", "model", "date_created", "categories": [{"name",
  "positives_labeled", "negatives_labeled", "estimate" (only where the category has an audit:
  `rare_jax.webapp.audit.estimate` of the current model's probabilities and labels, with its
  one-line "summary"), "results": [{"rank", "path", "score", "label", "seed"}]}]}`. Paths that
  are not valid UTF-8 are written with backslash escapes, CSV cells are safe in a spreadsheet
  (`rare_jax.infra.csvfile`).

  Raises:
    ValueError: as `pool_scores`, or an `out_dir` that is a file or cannot be created.
    OSError: a failed write (nothing partial is left).
  """
  scores = pool_scores(workdir)
  out_dir = os.path.join(workdir, RESULTS_DIR) if out_dir is None else out_dir
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f"out_dir={out_dir!r} is a file; expected a folder for the results")
  prepare_out_file(os.path.join(out_dir, f"{RESULTS_NAME}.csv"))
  categories = []
  probabilities = scores.probabilities
  for c, name in enumerate(scores.category_names):
    # By logit: probabilities of logits above ~37 are all 1.0 in float64.
    order = ranking(scores.logits[c])
    labels = scores.labels[c]
    results = [
      {
        "rank": rank + 1,
        "path": scores.paths[i],
        "score": round(float(probabilities[c, i]), 6),
        "label": {1: "yes", 0: "no"}.get(int(labels[i]), "none"),
        "seed": bool(scores.seeds[c, i]),
      }
      for rank, i in enumerate(order)
    ]
    entry = {
      "name": name,
      "positives_labeled": int((labels == 1).sum()),
      "negatives_labeled": int((labels == 0).sum()),
    }
    found = estimate(workdir, c, probabilities[c], labels)
    if found is not None:
      entry["estimate"] = found
      log(f"{name}: audit: {found.get('summary') or json.dumps(found)[:300]}")
    entry["results"] = results
    categories.append(entry)
  csv_path = os.path.join(out_dir, f"{RESULTS_NAME}.csv")
  json_path = os.path.join(out_dir, f"{RESULTS_NAME}.json")
  root = scores.manifest["root"]
  csvfile.write_csv_atomic(
    csv_path,
    RESULTS_COLUMNS,
    (
      (entry["name"], r["rank"], r["path"], f"{r['score']:.6f}", r["label"], root)
      for entry in categories
      for r in entry["results"]
    ),
  )
  for entry in categories:
    for r in entry["results"]:
      r["path"] = csvfile.printable(r["path"])
  document = {
    "format": RESULTS_FORMAT,
    "workdir": os.path.abspath(workdir),
    **base_fields(scores.manifest),
    "round": scores.round,
    "feature_version": scores.feature_version,
    "model": scores.model,
    "date_created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "categories": [
      {k: csvfile.printable(v) if k == "name" else v for k, v in entry.items()}
      for entry in categories
    ],
  }
  write_json_atomic(json_path, document)
  return [csv_path, json_path]
