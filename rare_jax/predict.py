r"""Score images with a run's linear model and write a CSV: `python -m rare_jax.predict`.

    python -m rare_jax.predict --workdir=RUN --images=DIR --out=scores.csv [--top_k=N]
    python -m rare_jax.predict --workdir=RUN --dataset=rare_fashion_mnist --split=test \
        --out=scores.csv [--threshold=0.5] [--strategy=ours_linear --category=Sandal]

The model is the newest checkpoint of the run (a finished run's last round, or the round a
running one is at). Images get the same stand-in features as the run's pool:
- runs of `python -m rare_jax.label` (a folder of images): the pixel-PCA projection the run
  saved (`features/projection.npz`), applied to images resized to the run's `image_size` RGB;
- runs of `python -m rare_jax.run` with `features="pixel_pca"` (a TFDS dataset): the
  projection is fitted again on the task's related-domain split (the same deterministic fit
  the run made), applied to images brought to the dataset's image shape.
Runs with other features (a deep model's embeddings) are not supported yet.

The CSV has a header and one row per image, highest score first: `id,path,score` for a folder
(id = position among the folder's readable images sorted by relative path) or `id,label,score`
for a dataset split (id = index in the split, label = its class name). `score` is the linear
model's probability that the image is of the category. `--top_k` keeps the best N rows,
`--threshold` the rows with score >= it; by default every image is written. Paths are safe to
open in a spreadsheet: a path starting with `=`, `+`, `-`, `@`, a tab or a carriage return gets
a leading `'` (formula injection), and a file name that is not valid UTF-8 is written with
backslash escapes (`\xff`); see `rare_jax/csvfile.py`.

Errors (a workdir that holds no run, a damaged checkpoint or config.json, `--out` a directory)
are one line on stderr naming the file: exit status 2; a failed write (disk full): exit status
1, and no partial CSV or temporary file is left.

Multi-host: it accepts the flags of `rare_jax.distributed_flags` (--coordinator_address, ...)
so that a launcher may start it in every process, but it does not split the work: every
process scores every image (a linear model on pixel features is cheap) and process 0 alone
writes the CSV and logs.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from PIL import Image

from rare_jax import csvfile, distributed_flags, linear, runner, sharding, stand_in
from rare_jax.checkpoint import CheckpointStore
from rare_jax.data import folder, sources, tasks
from rare_jax.webapp import folder_run
from rare_jax.webapp.labeler import describe_os_error

CHUNK = 1024


class Scorer:
  """Features and the linear model of one category of a run.

  Attributes:
    projection: the pixel-PCA projection of the run's features.
    to_model_input: uint8 [H, W, C] image (C = 1 or 3) or decoded RGB PIL image -> the uint8
      array the projection takes.
    weights, bias: the category's linear model.
    category: its name. round: the checkpoint's round.
  """

  def __init__(self, *, projection, to_model_input, weights, bias, category, round_index, kind):
    self.projection = projection
    self.to_model_input = to_model_input
    self.weights = np.asarray(weights, np.float32)
    self.bias = float(bias)
    self.category = category
    self.round = round_index
    self.kind = kind

  def score(self, images: np.ndarray) -> np.ndarray:
    """float32 [n] probabilities of prepared images [n, H, W, C] (as `to_model_input` gives)."""
    features = jnp.asarray(self.projection.project(images))
    model = linear.LinearModel(weights=jnp.asarray(self.weights), bias=jnp.asarray(self.bias))
    return np.asarray(jax.device_get(linear.predict_proba(features, model)), np.float32)


def _resizer(shape: tuple[int, int, int]) -> Callable:
  height, width, channels = shape

  def to_model_input(image):
    if isinstance(image, np.ndarray):
      if image.shape == shape:
        return image
      image = folder.image_to_pil(image)
    if channels == 1:
      image = image.convert("L")
    if image.size != (width, height):
      image = image.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array

  return to_model_input


def load_scorer(
  workdir: str,
  *,
  strategy: str | None = None,
  category: str | None = None,
  data_dir: str | None = None,
  log: Callable[[str], None] = print,
) -> Scorer:
  """The scorer of a run's newest checkpoint (see the module docstring for supported runs).

  Raises:
    ValueError: not a run, unsupported features, unknown strategy or category, no checkpoint.
  """
  if os.path.exists(os.path.join(workdir, folder_run.MANIFEST)):
    config, manifest, projection = folder_run.load_folder_run(workdir)
    seed_ids = np.asarray(manifest["seed_ids"], np.int64)
    names = list(manifest["category_names"])
    size = int(config.image_size)
    to_model_input = _resizer((size, size, 3))
    kind = "folder run"
  elif os.path.exists(os.path.join(workdir, tasks.TASK_FILE)):
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
      raise ValueError(f"{workdir} holds no run: {config_path} is missing")
    config = ml_collections.ConfigDict(folder_run.read_json_object(config_path))
    if config.features != "pixel_pca":
      raise ValueError(
        f"{workdir} uses features={config.features!r}; predict supports 'pixel_pca' runs and "
        "folder runs"
      )
    task = tasks.RareTask.load(workdir)
    seed_ids = task.seed_positives
    names = list(task.category_names)
    log(f"refitting the run's pixel PCA on {len(task.pretrain_ids)} related-domain images")
    train = sources.open_source(task.dataset, task.train_split, data_dir or config.data_dir or None)
    pretrain_images, _ = sources.load_arrays(train, task.pretrain_ids)
    projection = stand_in.PixelProjection.fit(pretrain_images, int(config.feature_dim))
    to_model_input = _resizer(projection.image_shape)
    kind = f"dataset run ({task.dataset})"
  else:
    raise ValueError(
      f"{workdir} holds no run: expected {folder_run.MANIFEST} (python -m rare_jax.label) or "
      f"{tasks.TASK_FILE} (python -m rare_jax.run)"
    )
  strategies = list(config.strategies)
  strategy = strategy or strategies[0]
  if strategy not in strategies:
    raise ValueError(f"strategy={strategy!r}; expected one of the run's {strategies}")
  index = _category_index(category, names)
  pool = np.load(os.path.join(workdir, "features", "pool.npy"), mmap_mode="r")
  _check_projection(projection, pool, workdir, log)
  like = runner.abstract_state(
    jax.ShapeDtypeStruct(pool.shape, jnp.float32), seed_ids, int(config.seed)
  )
  directory = os.path.join(workdir, strategy, "checkpoints")
  if not os.path.isdir(directory):
    raise ValueError(f"{workdir}: strategy {strategy!r} has no checkpoints in {directory}")
  with CheckpointStore(directory) as store:
    step = store.latest_step()
    if step is None:
      raise ValueError(f"{directory} holds no checkpoint; expected a started run")
    state, _ = store.restore(step, like)
  if not bool(state.has_model):
    raise ValueError(f"{workdir}: no batch labeled yet (round 0): no linear model to score with")
  return Scorer(
    projection=projection,
    to_model_input=to_model_input,
    weights=np.asarray(state.linear.weights)[index],
    bias=np.asarray(state.linear.bias)[index],
    category=names[index],
    round_index=int(state.round),
    kind=kind,
  )


def _category_index(category: str | None, names: list[str]) -> int:
  if category is None:
    if len(names) != 1:
      raise ValueError(f"the run has {len(names)} categories {names}; pass --category")
    return 0
  if category in names:
    return names.index(category)
  if category.isdigit() and int(category) < len(names):
    return int(category)
  raise ValueError(f"category={category!r}; expected one of {names} or an index")


def _check_projection(projection, pool, workdir, log) -> None:
  if pool.shape[1] != projection.dim:
    raise ValueError(
      f"{workdir}: pool features have {pool.shape[1]} dims, the projection {projection.dim}"
    )


def iter_folder(
  root: str, to_model_input: Callable, *, log: Callable[[str], None]
) -> Iterator[tuple[list[str], np.ndarray]]:
  """(relative paths, prepared images) of the readable images of `root`, in id order.

  Unreadable files are skipped (and logged), as `folder.open_folder` does, so ids agree.
  """
  candidates, refused = folder.list_image_files(root)
  for path, reason in refused:
    log(f"skipped {path}: {reason}")

  def read(relative):
    try:
      image = folder.decode_image(os.path.join(root, *relative.split("/")))
      return to_model_input(image), None
    except Exception as error:
      return None, f"{type(error).__name__}: {error}"

  with futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    for start in range(0, len(candidates), CHUNK):
      chunk = candidates[start : start + CHUNK]
      paths, images = [], []
      for relative, (image, error) in zip(chunk, pool.map(read, chunk), strict=True):
        if error is not None:
          log(f"skipped {relative}: {error}")
          continue
        paths.append(relative)
        images.append(image)
      if images:
        yield paths, np.stack(images)


def score_folder(scorer: Scorer, root: str, *, log: Callable[[str], None]) -> list[tuple]:
  """[(id, relative path, score)] of the readable images under `root`."""
  if not os.path.isdir(root):
    raise ValueError(f"--images={root!r} is not a directory; expected a folder of JPEG/PNG")
  candidates = len(folder.list_image_files(root)[0])
  rows, started = [], time.perf_counter()
  for paths, images in iter_folder(root, scorer.to_model_input, log=log):
    scores = scorer.score(images)
    rows += [
      (len(rows) + k, p, float(s)) for k, (p, s) in enumerate(zip(paths, scores, strict=True))
    ]
    _progress(log, len(rows), candidates, started)
  if not rows:
    raise ValueError(f"--images={root!r} holds no readable JPEG/PNG image")
  return rows


def score_dataset(
  scorer: Scorer, name: str, split: str, *, data_dir: str | None, log: Callable[[str], None]
) -> list[tuple]:
  """[(id, class name, score)] of every example of a prepared TFDS split."""
  source = sources.open_source(name, split, data_dir)
  rows, started = [], time.perf_counter()
  for start in range(0, len(source), CHUNK):
    examples = source.__getitems__(range(start, min(start + CHUNK, len(source))))
    images = np.stack([scorer.to_model_input(e["image"]) for e in examples])
    scores = scorer.score(images)
    for k, (example, score) in enumerate(zip(examples, scores, strict=True)):
      label = example["label"]
      name_of = source.class_names[label] if 0 <= label < source.num_classes else str(label)
      rows.append((start + k, name_of, float(score)))
    _progress(log, len(rows), len(source), started)
  return rows


def _progress(log, done: int, total: int, started: float) -> None:
  rate = done / max(time.perf_counter() - started, 1e-9)
  log(f"scored {done}/{total} images ({rate:.0f} images/s)")


def select_rows(rows: list[tuple], *, top_k: int | None, threshold: float | None) -> list[tuple]:
  """Rows sorted by score (highest first, ties by id), cut by `top_k` or `threshold`."""
  if top_k is not None and threshold is not None:
    raise ValueError("pass --top_k or --threshold, not both")
  if top_k is not None and top_k < 1:
    raise ValueError(f"top_k={top_k}; expected a positive int")
  if threshold is not None and not 0 <= threshold <= 1:
    raise ValueError(f"threshold={threshold}; expected a probability in [0, 1]")
  ordered = sorted(rows, key=lambda row: (-row[2], row[0]))
  if top_k is not None:
    return ordered[:top_k]
  if threshold is not None:
    return [row for row in ordered if row[2] >= threshold]
  return ordered


def write_csv(path: str, header: tuple[str, str, str], rows: list[tuple]) -> None:
  """Writes the CSV atomically (a reader never sees half a file; see `csvfile`)."""
  csvfile.write_csv_atomic(path, header, ((i, name, f"{score:.6f}") for i, name, score in rows))


_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir (rare_jax.label or rare_jax.run).")
_IMAGES = flags.DEFINE_string("images", None, "A folder of JPEG/PNG images to score.")
_DATASET = flags.DEFINE_string("dataset", None, "A prepared TFDS dataset to score instead.")
_SPLIT = flags.DEFINE_string("split", "test", "The split of --dataset (e.g. test, train[:10%]).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: TFDS's default).")
_OUT = flags.DEFINE_string("out", None, "The CSV to write.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Keep only the N highest-scoring images.")
_THRESHOLD = flags.DEFINE_float("threshold", None, "Keep only images with score >= this.")
_STRATEGY = flags.DEFINE_string("strategy", None, "Strategy of the run (default: its first).")
_CATEGORY = flags.DEFINE_string(
  "category", None, "Category name or index (needed when the run has several)."
)
flags.mark_flags_as_required(["workdir", "out"])
distributed_flags.define()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed_flags.initialize()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  primary = sharding.is_primary()

  def log(line: str) -> None:
    if primary:
      print(csvfile.printable(line), file=sys.stderr, flush=True)

  if (_IMAGES.value is None) == (_DATASET.value is None):
    raise app.UsageError("pass exactly one of --images=DIR or --dataset=NAME")
  started = time.perf_counter()
  try:
    select_rows([], top_k=_TOP_K.value, threshold=_THRESHOLD.value)  # fail early on bad cuts
    if os.path.isdir(_OUT.value):
      raise ValueError(f"--out={_OUT.value!r} is a directory; expected a CSV file name")
    if not os.path.isdir(_WORKDIR.value):
      raise ValueError(f"--workdir={_WORKDIR.value!r} is not a directory; expected a run's workdir")
    scorer = load_scorer(
      _WORKDIR.value,
      strategy=_STRATEGY.value,
      category=_CATEGORY.value,
      data_dir=_DATA_DIR.value,
      log=log,
    )
    log(f"model: {scorer.kind}, category {scorer.category!r}, round {scorer.round}")
    if _IMAGES.value is not None:
      rows = score_folder(scorer, _IMAGES.value, log=log)
      header = ("id", "path", "score")
    else:
      rows = score_dataset(scorer, _DATASET.value, _SPLIT.value, data_dir=_DATA_DIR.value, log=log)
      header = ("id", "label", "score")
  except ValueError as error:
    log(f"error: {error}")
    sys.exit(2)
  rows = select_rows(rows, top_k=_TOP_K.value, threshold=_THRESHOLD.value)
  if not primary:
    return
  try:
    write_csv(_OUT.value, header, rows)
  except ValueError as error:
    log(f"error: {error}")
    sys.exit(2)
  except OSError as error:
    log(f"error: {describe_os_error(error, error.filename or _OUT.value)}; nothing was written")
    sys.exit(1)
  log(f"wrote {len(rows)} rows to {_OUT.value} ({time.perf_counter() - started:.1f}s)")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
