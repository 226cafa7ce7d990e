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
UTF-8 get backslash escapes such as `\xff`: see `rare_jax/infra/csvfile.py`). The JSON is an object
`{"format", "images", "labels": [{path, category, answer, round}, ...]}` with `images` the
labeled folder; its names are escaped the same way, not quoted. Both are written atomically;
the directories of --out are created if missing (checked before anything is read).
Errors are one line on stderr: exit status 2 for a bad workdir or --out (a directory, or in a
directory that cannot be created) or a damaged run file (naming the file and line), 1 for a
failed write.
One process only (it reads files, no JAX work): it takes no multi-host flags.
"""

from __future__ import annotations

import sys

from absl import app, flags

from rare_jax.infra import csvfile
from rare_jax.webapp.exports import (
  FORMATS,
  collect_labels,
  format_of,
  prepare_out_file,
  write_labels,
)
from rare_jax.webapp.labeler import describe_os_error


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
