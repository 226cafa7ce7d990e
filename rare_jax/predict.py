r"""Score images with a run's newest model, to CSV or COCO-style JSON: `python -m rare_jax.predict`.

    python -m rare_jax.predict --workdir=RUN --images=DIR --out=scores.csv [--top_k=N]
    python -m rare_jax.predict --workdir=RUN --images=DIR --out=scores.json [--head=deep]
    python -m rare_jax.predict --workdir=RUN --dataset=rare_fashion_mnist --split=test \
        --out=scores.csv [--threshold=0.5] [--strategy=ours_linear --category=Sandal]

The model is the newest checkpoint of the run (a finished run's last round, or the round a
running one is at), of any run:
- runs of `python -m rare_jax.label` (a folder of images): with pretrained features, the same
  trunk and weights embed the images (squeezed to the run's `image_size`), z-scored with the
  statistics of the run's cached pool embeddings; with `--features=pixel_pca`, the pixel-PCA
  projection the run saved (`features/projection.npz`);
- runs of `python -m rare_jax.run` with `features="m_pre"` (a deep model, e.g. strategy `ours`
  with background-splitting updates): the linear model of round r lives on the features of
  model version v = r // rounds_per_update (0: M_pre, i: the deep model after update i), so
  images are embedded with that model (the dataset's preprocessing, images first brought to
  the dataset's image shape) and normalised like the run's pool; `--head=deep` scores with the
  deep model's main head instead (runs with deep updates, after the first);
- runs of `python -m rare_jax.run` with `features="pixel_pca"`: the projection is fitted again
  on the task's related-domain split (the same deterministic fit the run made).

Outputs, highest score first (`--format`, or `--out`'s suffix):
- CSV: a header and one row per image: `id,path,score` for a folder (id = position among the
  folder's readable images sorted by relative path) or `id,label,score` for a dataset split
  (id = index in the split, label = its class name). Paths are safe to open in a spreadsheet:
  a path starting with `=`, `+`, `-`, `@`, a tab or a carriage return gets a leading `'`
  (formula injection), and a file name that is not valid UTF-8 is written with backslash
  escapes (`\xff`); see `rare_jax/infra/csvfile.py`.
- JSON (COCO-style): `info`, `categories`, `images` (`id` and `file_name`, or `label` for a
  split) and one `annotations` entry per image with `image_id`, `score` and `label` ("yes"
  when score >= 0.5); see `write_json`.
`score` is the model's probability that the image is of the category. `--top_k` keeps the best
N images, `--threshold` those with score >= it; by default every image is written. Progress
(images, rate, ETA) goes to stderr.

The directories of `--out` are created if missing, for every format, before any image is read
(`rare_jax.webapp.exports.prepare_out_file`). Image files are read as `rare_jax.data.folder` reads
them: only regular files (a FIFO, socket or device named `*.png` is skipped and listed, never
opened for a blocking read), JPEG/PNG of at most `folder.MAX_IMAGE_PIXELS` pixels; every file
skipped is a line "skipped PATH: REASON" on stderr.

Errors (a workdir that holds no run, a damaged checkpoint or config.json, unusable weights,
`--out` a directory or in a folder that cannot be created) are one line on stderr naming the
file: exit status 2; a failed write (disk full): exit status 1, and no partial CSV or temporary
file is left.

Multi-host: it accepts the flags of `rare_jax.infra.distributed_flags` (--coordinator_address, ...)
so that a launcher may start it in every process, but it does not split the work: every
process scores every image (a linear model on pixel features is cheap) and process 0 alone
writes the CSV and logs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from PIL import Image

from rare_jax import models, workdirs
from rare_jax.active import linear, runner
from rare_jax.data import folder, pipeline, sources, tasks
from rare_jax.deep import embed as embed_lib
from rare_jax.deep import stand_in, trunk_features
from rare_jax.infra import csvfile, distributed_flags, sharding, teardown_noise
from rare_jax.infra.checkpoint import CheckpointStore, quiet_library_logging
from rare_jax.webapp import folder_run
from rare_jax.webapp.exports import prepare_out_file
from rare_jax.webapp.labeler import describe_os_error

CHUNK = 1024


class Scorer:
  """The model of one category of a run, on the features the run used.

  Attributes:
    probabilities: prepared images [n, H, W, C] (as `to_model_input` gives) -> float32 [n].
    to_model_input: uint8 [H, W, C] image (C = 1 or 3) or decoded RGB PIL image -> the uint8
      array the model takes.
    category: its name. round: the checkpoint's round. kind: what run it is. head: "linear"
      (the loop's logistic regression) or "deep" (the deep model's main head).
  """

  def __init__(self, *, probabilities, to_model_input, category, round_index, kind, head):
    self.probabilities = probabilities
    self.to_model_input = to_model_input
    self.category = category
    self.round = round_index
    self.kind = kind
    self.head = head

  def score(self, images: np.ndarray) -> np.ndarray:
    """float32 [n] probabilities of prepared images [n, H, W, C] (as `to_model_input` gives)."""
    return np.asarray(self.probabilities(np.asarray(images)), np.float32)


def _linear_probabilities(features_of: Callable, weights, bias) -> Callable:
  model = linear.LinearModel(
    weights=jnp.asarray(np.asarray(weights, np.float32)), bias=jnp.asarray(float(bias))
  )

  def probabilities(images):
    features = jnp.asarray(features_of(images), jnp.float32)
    return np.asarray(jax.device_get(linear.predict_proba(features, model)))

  return probabilities


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


HEADS = ("linear", "deep")


def load_scorer(
  workdir: str,
  *,
  strategy: str | None = None,
  category: str | None = None,
  head: str = "linear",
  data_dir: str | None = None,
  log: Callable[[str], None] = print,
) -> Scorer:
  """The scorer of a run's newest checkpoint (see the module docstring for supported runs).

  Raises:
    ValueError: not a run, unknown strategy, category or head, no checkpoint, no model yet,
      or head="deep" for a run without deep updates.
  """
  if head not in HEADS:
    raise ValueError(f"head={head!r}; expected one of {HEADS}")
  if os.path.exists(os.path.join(workdir, folder_run.MANIFEST)):
    config, manifest, projection = folder_run.load_folder_run(workdir)
    seed_ids = np.asarray(manifest["seed_ids"], np.int64)
    names = list(manifest["category_names"])
    kind = f"folder run ({folder_run.describe_features(config)})"
  elif os.path.exists(os.path.join(workdir, tasks.TASK_FILE)):
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
      raise ValueError(f"{workdir} holds no run: {config_path} is missing")
    config = ml_collections.ConfigDict(folder_run.read_json_object(config_path))
    if config.features not in ("pixel_pca", "m_pre"):
      raise ValueError(
        f"{workdir} uses features={config.features!r}; expected 'pixel_pca' or 'm_pre'"
      )
    task = tasks.RareTask.load(workdir)
    projection = None
    seed_ids = task.seed_positives
    names = list(task.category_names)
    kind = f"dataset run ({task.dataset}, features {config.features})"
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
  pool_shape = _pool_shape(workdir, config)
  like = runner.abstract_state(
    jax.ShapeDtypeStruct(pool_shape, jnp.float32), seed_ids, int(config.seed)
  )
  directory = os.path.join(workdir, strategy, "checkpoints")
  if not os.path.isdir(directory):
    raise ValueError(f"{workdir}: strategy {strategy!r} has no checkpoints in {directory}")
  with CheckpointStore(directory) as store:
    step = store.latest_step()
    if step is None:
      raise ValueError(f"{directory} holds no checkpoint; expected a started run")
    state, meta = store.restore(step, like)
  if config.get("features") == "pretrained" and int(meta.get("feature_version", 0)):
    raise ValueError(
      f"{workdir}: the labeling run's model lives on the features of deep update "
      f"v{meta['feature_version']}, which predict cannot compute yet; expected a run without "
      "deep updates (the labels: python -m rare_jax.export)"
    )
  if head == "linear" and not bool(state.has_model):
    raise ValueError(f"{workdir}: no batch labeled yet (round 0): no linear model to score with")
  weights = np.asarray(state.linear.weights)[index]
  bias = np.asarray(state.linear.bias)[index]
  common = dict(category=names[index], round_index=int(state.round), head=head)
  if config.get("features") == "m_pre":
    probabilities, to_model_input, version = _deep_run(
      workdir, config, strategy, int(state.round), index, head, weights, bias, log
    )
    what = "M_pre" if version == 0 else f"deep model v{version}"
    return Scorer(
      probabilities=probabilities,
      to_model_input=to_model_input,
      kind=f"{kind}, {head} head on {what}",
      **common,
    )
  if head == "deep":
    raise ValueError(
      f"{workdir}: head='deep' needs a run with deep updates (python -m rare_jax.run with "
      f"features='m_pre'); this run has features={config.features!r}: use head='linear'"
    )
  if config.features == "pretrained":
    embedder = folder_run.embedder(config)
    trunk_features.check_source(embedder, folder_run.pool_store_dir(workdir))  # same weights?
    raw_pool = embed_lib.FeatureStore.open(folder_run.pool_store_dir(workdir)).features
    mean, std = workdirs.feature_statistics(raw_pool, config.feature_normalization)
    size = int(config.image_size)
    return Scorer(
      probabilities=_linear_probabilities(
        lambda images: (embedder.embed(images) - mean) / std, weights, bias
      ),
      to_model_input=_resizer((size, size, 3)),
      kind=kind,
      **common,
    )
  if projection is None:  # a dataset run: refit the PCA
    log(f"refitting the run's pixel PCA on {len(task.pretrain_ids)} related-domain images")
    train = sources.open_source(task.dataset, task.train_split, data_dir or config.data_dir or None)
    pretrain_images, _ = sources.load_arrays(train, task.pretrain_ids)
    projection = stand_in.PixelProjection.fit(pretrain_images, int(config.feature_dim))
  if pool_shape[1] != projection.dim:
    raise ValueError(
      f"{workdir}: pool features have {pool_shape[1]} dims, the projection {projection.dim}"
    )
  return Scorer(
    probabilities=_linear_probabilities(projection.project, weights, bias),
    to_model_input=_resizer(projection.image_shape),
    kind=kind,
    **common,
  )


def _pool_shape(workdir: str, config) -> tuple[int, int]:
  """[P, D] of the features the run's loop started from (without reading them)."""
  directory = os.path.join(workdir, "features")
  if config.features in ("pretrained", "m_pre"):
    store = embed_lib.FeatureStore.open(os.path.join(directory, "pool"))
    return (store.num_rows, store.dim)
  path = os.path.join(directory, "pool.npy")
  if not os.path.exists(path):
    raise ValueError(f"{workdir}: {path} is missing; the run never computed features")
  return tuple(np.load(path, mmap_mode="r").shape)


def _deep_run(workdir, config, strategy, round_index, index, head, weights, bias, log):
  """(probabilities, to_model_input, model version) of a `features="m_pre"` run's newest model.

  The loop's linear model after round r lives on the features of model version
  v = r // rounds_per_update (0: M_pre; i: the deep model after update i), z-scored with that
  version's pool statistics when the run standardises; the deep head is version v's main head.
  """
  context = workdirs.load(workdir, log=log)
  parts = context.deep_parts
  settings = parts["settings"]
  spec = runner.strategy_spec(strategy)
  version = round_index // int(runner.strategy_config(config, strategy).rounds_per_update)
  if not spec["deep_updates"]:
    version = 0
  if head == "deep" and version == 0:
    raise ValueError(
      f"{workdir}: strategy {strategy!r} has no deep model yet (round {round_index}"
      f"{'' if spec['deep_updates'] else ', and it makes none'}); expected head='linear'"
    )
  if version == 0:
    model = models.Classifier(trunk=settings.trunk(), num_classes=parts["num_aux_classes"])
    variables = parts["m_pre_variables"]
    raw_pool = parts["raw_pool"]
  else:
    updater = context.updater(strategy, os.path.join(workdir, strategy), log=log)
    model = updater.model
    variables = updater.trained_variables(version)
    raw_pool = updater.pool_store(version).features
  mode = config.get("feature_normalization", "none")
  mean, std = workdirs.feature_statistics(raw_pool, mode)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  batch_size = int(settings.embed_batch_size)
  preprocess = settings.preprocess

  def outputs(images):
    results = []
    for start in range(0, len(images), batch_size):
      chunk = images[start : start + batch_size]
      batch = pipeline.make_batch(
        (chunk, np.zeros(len(chunk), np.int64)),
        np.arange(len(chunk)),
        batch_size=batch_size,
        **preprocess,
      )
      out = apply(variables, jnp.asarray(batch["image"]))
      results.append({k: np.asarray(v)[: len(chunk)] for k, v in out.items()})
    return {k: np.concatenate([r[k] for r in results]) for k in results[0]}

  if head == "deep":

    def probabilities(images):
      logits = outputs(images)["main_logits"][:, index]
      return 1 / (1 + np.exp(-logits.astype(np.float64)))

  else:
    probabilities = _linear_probabilities(
      lambda images: (outputs(images)["embedding"] - mean) / std, weights, bias
    )
  sample = context.deep_parts["data"].train
  shape = sample[0].shape[1:] if isinstance(sample, tuple) else sample[0]["image"].shape
  return probabilities, _resizer(tuple(shape)), version


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
  eta = embed_lib.format_eta(max(total - done, 0) / rate if rate > 0 else None)
  log(f"scored {done}/{total} images ({rate:.1f} images/s, ETA {eta})")


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


FORMATS = ("csv", "json")


def output_format(path: str, format_: str | None) -> str:
  """ "csv" or "json": `format_` if given, else from the file's extension (default csv)."""
  if format_ is not None:
    if format_ not in FORMATS:
      raise ValueError(f"format={format_!r}; expected one of {FORMATS}")
    return format_
  return "json" if path.lower().endswith(".json") else "csv"


def write_json(
  path: str,
  header: tuple[str, str, str],
  rows: list[tuple],
  *,
  scorer: Scorer,
  workdir: str,
  source: str,
) -> None:
  """Writes a COCO-style JSON of per-image labels and scores, atomically.

  `{"info": {...}, "categories": [{"id": 1, "name": CATEGORY}], "images": [{"id", "file_name"}
  (folders) or {"id", "label"} (dataset splits: the true class)], "annotations": [{"id",
  "image_id", "category_id": 1, "score", "label": "yes" | "no"}]}`: one annotation per image,
  `label` "yes" when score >= 0.5, in the order of `rows` (highest score first).
  """
  key = "file_name" if header[1] == "path" else "label"
  document = {
    "info": {
      "description": f"rare_jax.predict scores of {scorer.category!r}",
      "workdir": os.path.abspath(workdir),
      "source": source,
      "model": scorer.kind,
      "head": scorer.head,
      "round": scorer.round,
      "date_created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    },
    "categories": [{"id": 1, "name": scorer.category}],
    "images": [{"id": int(i), key: csvfile.printable(name)} for i, name, _ in rows],
    "annotations": [
      {
        "id": k + 1,
        "image_id": int(i),
        "category_id": 1,
        "score": round(float(score), 6),
        "label": "yes" if score >= 0.5 else "no",
      }
      for k, (i, _, score) in enumerate(rows)
    ],
  }
  if os.path.isdir(path):
    raise ValueError(f"--out={path!r} is a directory; expected a file name")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # as write_csv does
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(document, f, ensure_ascii=False, indent=1)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir (rare_jax.label or rare_jax.run).")
_IMAGES = flags.DEFINE_string("images", None, "A folder of JPEG/PNG images to score.")
_DATASET = flags.DEFINE_string("dataset", None, "A prepared TFDS dataset to score instead.")
_SPLIT = flags.DEFINE_string("split", "test", "The split of --dataset (e.g. test, train[:10%]).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: TFDS's default).")
_OUT = flags.DEFINE_string("out", None, "The file to write (.csv, or .json for COCO-style).")
_FORMAT = flags.DEFINE_enum("format", None, list(FORMATS), "csv or json (default: --out's suffix).")
_HEAD = flags.DEFINE_enum(
  "head", "linear", list(HEADS), "linear: the loop's model; deep: the deep model's main head."
)
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
    quiet_library_logging()  # rare_jax's progress lines, not Orbax's INFO per save
  teardown_noise.ignore_closed_event_loop_callbacks()  # after a damaged checkpoint's error
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
      raise ValueError(f"--out={_OUT.value!r} is a directory; expected a file name")
    if primary:  # the one process that writes: its folder exists before any work
      prepare_out_file(_OUT.value)
    if not os.path.isdir(_WORKDIR.value):
      raise ValueError(f"--workdir={_WORKDIR.value!r} is not a directory; expected a run's workdir")
    scorer = load_scorer(
      _WORKDIR.value,
      strategy=_STRATEGY.value,
      category=_CATEGORY.value,
      head=_HEAD.value,
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
    if output_format(_OUT.value, _FORMAT.value) == "json":
      source = _IMAGES.value or f"{_DATASET.value}:{_SPLIT.value}"
      write_json(_OUT.value, header, rows, scorer=scorer, workdir=_WORKDIR.value, source=source)
    else:
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
