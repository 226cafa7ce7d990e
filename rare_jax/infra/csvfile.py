"""CSV files that people open in spreadsheets: safe cells, atomic writes.

Every CSV the project writes goes through `write_csv_atomic`, which applies two rules to text
cells (numbers are written as given):
- Formula injection (OWASP, "CSV Injection"): a cell starting with `=`, `+`, `-`, `@`, a tab or
  a carriage return is one a spreadsheet may run as a formula (a file named
  `=HYPERLINK(...).png`), so it gets a leading single quote: `'=HYPERLINK(...).png`. Strip one
  leading `'` from such a cell to get the name back.
- File names that are not valid UTF-8 (Python holds their bytes as surrogate escapes) are
  written with backslash escapes: byte 0xff becomes the 4 characters `\\xff`. The file is
  always valid UTF-8.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence

from rare_jax.infra import atomic

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def printable(text: str) -> str:
  """`text` as valid Unicode: surrogate-escaped bytes (undecodable file names) become `\\xNN`."""
  return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def safe_cell(value):
  """A CSV cell a spreadsheet shows as text: see the module docstring. Non-strings unchanged."""
  if not isinstance(value, str):
    return value
  value = printable(value)
  return "'" + value if value.startswith(FORMULA_STARTS) else value


def write_csv_atomic(path: str, header: Sequence[str], rows: Iterable[Sequence]) -> None:
  """Writes a CSV with a header so that a reader sees the old file or the whole new one.

  The rows go to a temporary file renamed over `path` at the end (`atomic.replacing`); on any
  failure (a full disk, a bad row) it is removed and the error raised.

  Raises:
    ValueError: `path` is a directory.
    OSError: the file cannot be written.
  """
  if os.path.isdir(path):
    raise ValueError(f"out={path!r} is a directory; expected a file name (e.g. scores.csv)")
  with atomic.replacing(path, newline="") as f:
    writer = csv.writer(f)
    writer.writerow([safe_cell(name) for name in header])
    for row in rows:
      writer.writerow([safe_cell(value) for value in row])
