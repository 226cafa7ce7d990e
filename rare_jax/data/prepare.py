"""Prepares the embedded dataset: `rare-jax-prepare [--data_dir=DIR] [--raw_dir=DIR]`.

(or `python -m rare_jax.data.prepare`.)

Finds (or fetches from the Debian package) the Fashion-MNIST idx files, builds the TFDS
dataset `rare_fashion_mnist` into `data_dir` (default: TFDS's, honouring $TFDS_DATA_DIR)
unless it is already there, and fills the label and image caches that `open_source` and
`load_arrays` use. Idempotent: a second run only checks, in well under a second of work.
Without apt-get, download the four idx .gz files (the error message says from where) and pass
their folder as --raw_dir: they are checked against Debian's and copied to the user cache.
"""

from __future__ import annotations

import os
import sys
import time

import tensorflow_datasets as tfds
from absl import app, flags

from rare_jax.data import fashion_mnist, sources
from rare_jax.infra import cli_help

NAME = "rare_fashion_mnist"


def prepare_fashion_mnist(data_dir: str | None = None, *, log=print) -> bool:
  """Builds `rare_fashion_mnist` into data_dir if needed and warms its caches.

  Args:
    data_dir: TFDS data folder (default `sources.default_data_dir()`).
    log: where progress lines go.

  Returns:
    True if the dataset was built now, False if it was already prepared.
  """
  data_dir = os.fspath(data_dir) if data_dir is not None else sources.default_data_dir()
  builder = fashion_mnist.RareFashionMnist(data_dir=data_dir)
  built = not builder.is_prepared()
  if built:
    start = time.perf_counter()
    raw = fashion_mnist.ensure_raw_files()
    log(f"Building {NAME} from {raw} into {builder.data_dir} ...")
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    log(f"Built {NAME} in {time.perf_counter() - start:.1f} s.")
  start = time.perf_counter()
  counts = []
  for split in fashion_mnist.RAW_FILES:
    source = sources.open_source(NAME, split, data_dir)
    images, labels = sources.load_arrays(source)  # Writes the caches if missing.
    expected = fashion_mnist.SPLIT_SIZES[split]
    if len(labels) != expected or images.shape[1:] != fashion_mnist.IMAGE_SHAPE:
      raise RuntimeError(
        f"{NAME} {split} in {builder.data_dir} has {len(labels)} images of shape "
        f"{images.shape[1:]}; expected {expected} of {fashion_mnist.IMAGE_SHAPE}: delete the "
        "folder and run this again"
      )
    counts.append(f"{split} {len(labels)}")
  state = "built" if built else "already prepared"
  log(
    f"{NAME} {state} in {builder.data_dir} ({', '.join(counts)} images; arrays cached, "
    f"checked in {time.perf_counter() - start:.1f} s)."
  )
  return built


_DATA_DIR = flags.DEFINE_string(
  "data_dir", None, "TFDS data folder (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)."
)
_RAW_DIR = flags.DEFINE_string(
  "raw_dir",
  None,
  "A folder holding the four Fashion-MNIST idx .gz files, for machines without apt-get: "
  "checked, then copied to the user cache.",
)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    if _RAW_DIR.value:
      print(f"Copied the checked idx files to {fashion_mnist.import_raw_files(_RAW_DIR.value)}")
    prepare_fashion_mnist(_DATA_DIR.value)
  except (ValueError, RuntimeError) as error:  # no files, or bad ones: what to do, status 2
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def run() -> None:
  cli_help.run(main)


if __name__ == "__main__":
  run()
