r"""The labels a person gave in a labeling workdir, or its ranked results, as CSV and JSON:
`python -m rare_jax.export`.

    python -m rare_jax.export --workdir=RUN --out=labels.csv [--format=csv|json]
    python -m rare_jax.export --workdir=RUN --results [--out_dir=DIR]

`--results` (the finish step; the page's finish action writes the same files): the ranked
results of the whole pool for every category, from the run's newest model (deep updates
included; no image is embedded again: the loop's own scores), written to
`RUN/results/ranked_results.csv` and `.json` (or `--out_dir`), and their paths printed. CSV
columns `category,rank,path,score,label,images` (rank 1 = highest score; `score` the model's
probability; `label` the answer given: `yes` (seeds included), `no` or `none`; `images` the
base folder, below); the JSON holds
the same per category, plus the audit's estimate of precision and recall where the run has an
audit. See `rare_jax.webapp.exports.write_results`. It reads a running run's newest checkpoint
as well (the server need not be stopped).

The labels (`--out`):

RUN is a workdir of `python -m rare_jax.label` (running or stopped: the files are only read).
One row per label: `path`, `category`, `answer` (`yes` or `no`), `round`: 0 for the seed
examples given with --seeds (all `yes`), then the round whose batch the person submitted,
oldest first; and `images`, the base folder. A batch submitted but not yet in the run's own
log (`answers.jsonl`; the server was killed in between) is included with the next round
number, as the restarted run will count it.

Paths, the seeds' and the pool's alike: relative to the base folder for a file inside it,
absolute for any other (a seed from elsewhere; an image of a list outside its base). The base
folder is the labeled folder (`rare-jax-label --images=DIR`), or a list's base
(`--images=@LIST --base=DIR`, by default the list file's folder). Every export records it: the
CSVs in their last column `images` (the same on every row), the JSONs as `images`, plus
`images_list` (the list file) for a run on a list. See `rare_jax.webapp.exports`.

The format is `--format`, else the out file's extension (`.json` -> JSON, anything else CSV).
The CSV has the header `path,category,answer,round,images` and is safe to open in a
spreadsheet (cells starting with `=`, `+`, `-`, `@`, a tab or CR get a leading `'`; file names
that are not valid UTF-8 get backslash escapes such as `\xff`: see
`rare_jax/infra/csvfile.py`). The JSON is an object `{"format", "images", ["images_list",]
"labels": [{path, category, answer, round}, ...]}`; its names are escaped the same way, not
quoted. Both are written atomically; the directories of --out are created if missing (checked
before anything is read).
Errors are one line on stderr: exit status 2 for a bad workdir, an `--out` that is a directory
or in a directory that cannot be created, an `--out_dir` that is a file, a run with no model
yet (`--results`) or a damaged run file (naming the file and line); 1 for a failed write.
One process only (it reads the run's files; `--results` restores the newest checkpoint on the
CPU): it takes no multi-host flags.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from rare_jax.infra import cli_help, csvfile
from rare_jax.infra.checkpoint import quiet_library_logging
from rare_jax.webapp.exports import (
  FORMATS,
  collect_labels,
  format_of,
  prepare_out_file,
  write_labels,
  write_results,
)
from rare_jax.webapp.labeler import describe_os_error


def _define_flags():
  """The command's flags, defined when it runs: importing this module for its functions (the
  tests, other tools) must not claim flag names that other commands define too."""
  global _WORKDIR, _OUT, _FORMAT, _RESULTS, _OUT_DIR
  _WORKDIR = flags.DEFINE_string("workdir", None, "A labeling workdir (rare-jax-label).")
  _OUT = flags.DEFINE_string("out", None, "The labels file to write (labels.csv or labels.json).")
  _FORMAT = flags.DEFINE_enum(
    "format", None, list(FORMATS), "csv or json (default: from --out's extension; .json or CSV)."
  )
  _RESULTS = flags.DEFINE_bool(
    "results",
    False,
    "Write the ranked results of the whole pool for every category (CSV and JSON) instead of "
    "the labels.",
  )
  _OUT_DIR = flags.DEFINE_string(
    "out_dir", None, "With --results: the folder to write them to (default: WORKDIR/results)."
  )
  flags.mark_flags_as_required(["workdir"])


def _results(log) -> None:
  """--results: writes the ranked results and says where they are."""
  if _OUT.value is not None or _FORMAT.value is not None:
    raise ValueError("--results writes both CSV and JSON to --out_dir; drop --out/--format")
  paths = write_results(_WORKDIR.value, _OUT_DIR.value, log=log)
  with open(paths[1], encoding="utf-8") as f:
    document = json.load(f)
  log(f"ranked results of {document['model']}:")
  for entry in document["categories"]:
    line = (
      f"  {entry['name']}: {len(entry['results'])} images ranked, "
      f"{entry['positives_labeled']} labeled yes, {entry['negatives_labeled']} no"
    )
    if "estimate" in entry:
      line += f"; audit: {_estimate_line(entry['estimate'])}"
    log(line)
  for path in paths:
    print(path, flush=True)  # stdout: the files, for scripts
  log(f"wrote {paths[0]} and {paths[1]}")


def _estimate_line(estimate) -> str:
  """One line of the audit's estimate: its own summary sentence."""
  summary = estimate.get("summary") if isinstance(estimate, dict) else None
  return summary if isinstance(summary, str) else json.dumps(estimate, ensure_ascii=False)[:500]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")

  def log(line: str) -> None:
    print(csvfile.printable(line), file=sys.stderr, flush=True)

  if _RESULTS.value:
    if not flags.FLAGS["verbosity"].present:
      quiet_library_logging()  # its own lines, not Orbax's INFO per checkpoint read
    try:
      _results(log)
    except ValueError as error:
      log(f"error: {error}")
      sys.exit(2)
    except OSError as error:
      log(f"error: {describe_os_error(error, error.filename)}; the results were not written")
      sys.exit(1)
    return
  if _OUT_DIR.value is not None:
    raise app.UsageError("--out_dir goes with --results")
  if _OUT.value is None:
    raise app.UsageError("pass --out=labels.csv (the labels) or --results (the ranked results)")
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
  cli_help.run(main)


if __name__ == "__main__":
  run()
