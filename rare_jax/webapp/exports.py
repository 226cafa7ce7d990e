"""A labeling workdir's labels as CSV or JSON: what `python -m rare_jax.export` and the labeling
page's download links write (the format is described in `rare_jax/export.py`)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from rare_jax.active import runner
from rare_jax.infra import csvfile
from rare_jax.infra.checkpoint import write_json_atomic
from rare_jax.webapp import folder_run
from rare_jax.webapp.labeler import read_journal

FORMAT = "rare_jax.Labels/1"
COLUMNS = ("path", "category", "answer", "round")
FORMATS = ("csv", "json")


def collect_labels(workdir: str) -> tuple[dict, list[dict[str, Any]]]:
  """(the run's manifest, its labels as {path, category, answer, round} dicts, oldest first).

  Raises:
    ValueError: not a directory, no labeling run in it, or damaged run files (naming them).
  """
  if not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir!r} is not a directory; expected a labeling workdir")
  manifest_path = os.path.join(workdir, folder_run.MANIFEST)
  if not os.path.exists(manifest_path):
    raise ValueError(
      f"{workdir} holds no labeling run: {manifest_path} is missing; expected a workdir of "
      "python -m rare_jax.label"
    )
  manifest = folder_run.read_json_object(manifest_path)
  if manifest.get("format") != folder_run.MANIFEST_FORMAT:
    raise ValueError(
      f"{manifest_path}: format {manifest.get('format')!r}; expected {folder_run.MANIFEST_FORMAT!r}"
    )
  paths, names = manifest["paths"], manifest["category_names"]
  run_dir = os.path.join(workdir, folder_run.STRATEGY)
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
  if fmt == "csv":
    csvfile.write_csv_atomic(out, COLUMNS, ([label[k] for k in COLUMNS] for label in labels))
  elif fmt == "json":
    printable = [
      {k: csvfile.printable(v) if isinstance(v, str) else v for k, v in label.items()}
      for label in labels
    ]
    images = csvfile.printable(manifest["root"])
    write_json_atomic(out, {"format": FORMAT, "images": images, "labels": printable})
  else:
    raise ValueError(f"format={fmt!r}; expected one of {FORMATS}")
