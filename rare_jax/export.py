r"""The labels a person gave in a labeling workdir, as CSV or JSON: `python -m rare_jax.export`.

    python -m rare_jax.export --workdir=RUN --out=labels.csv [--format=csv|json]

RUN is a workdir of `python -m rare_jax.label` (running or stopped: the files are only read).
One row per label: `path` (relative to the labeled folder, or absolute for a seed outside
it), `category`, `answer` (`yes` or `no`) and `round`: 0 for the seed examples given with
--seeds (all `yes`), then the round whose batch the person submitted, oldest first. A batch
submitted but not yet in the run's own log (`answers.jsonl`; the server was killed in
between) is included with the next round number, as the restarted run will count it.

The format is `--format`, else the out file's extension (`.json` -> JSON, anything else CSV).
The CSV has the header `path,category,answer,round` and is safe to open in a spreadsheet (cells
starting with `=`, `+`, `-`, `@`, a tab or CR get a leading `'`; file names that are not valid
UTF-8 get backslash escapes such as `\xff`: see `rare_jax/csvfile.py`). The JSON is an object
`{"format", "images", "labels": [{path, category, answer, round}, ...]}` with `images` the
labeled folder; its names are escaped the same way, not quoted. Both are written atomically;
the directories of --out are created if missing (checked before anything is read).
Errors are one line on stderr: exit status 2 for a bad workdir or --out (a directory, or in a
directory that cannot be created) or a damaged run file (naming the file and line), 1 for a
failed write.
One process only (it reads files, no JAX work): it takes no multi-host flags.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
from absl import app, flags

from rare_jax import csvfile, runner
from rare_jax.checkpoint import write_json_atomic
from rare_jax.webapp import folder_run
from rare_jax.webapp.labeler import describe_os_error, read_journal

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


def _define_flags():
  """The command's flags, defined when it runs: importing this module for its functions (the
  tests, other tools) must not claim flag names that other commands define too."""
  global _WORKDIR, _OUT, _FORMAT
  _WORKDIR = flags.DEFINE_string("workdir", None, "A labeling workdir (python -m rare_jax.label).")
  _OUT = flags.DEFINE_string("out", None, "The file to write (labels.csv or labels.json).")
  _FORMAT = flags.DEFINE_enum(
    "format", None, list(FORMATS), "csv or json (default: from --out's extension; .json or CSV)."
  )
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")

  def log(line: str) -> None:
    print(csvfile.printable(line), file=sys.stderr, flush=True)

  try:
    fmt = format_of(_OUT.value, _FORMAT.value)
    prepare_out_file(_OUT.value)
    manifest, labels = collect_labels(_WORKDIR.value)
    write_labels(_OUT.value, manifest, labels, fmt)
  except ValueError as error:
    log(f"error: {error}")
    sys.exit(2)
  except OSError as error:
    log(f"error: {describe_os_error(error, error.filename or _OUT.value)}; nothing was written")
    sys.exit(1)
  answered = sum(label["round"] > 0 for label in labels)
  positives = sum(label["round"] > 0 and label["answer"] == "yes" for label in labels)
  log(
    f"wrote {len(labels)} labels to {_OUT.value} ({fmt}): {answered} answers "
    f"({positives} yes) and {len(labels) - answered} seed examples"
  )


def run():
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
