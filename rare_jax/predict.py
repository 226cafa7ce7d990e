r"""Score images with a run's newest model: `python -m rare_jax.predict`, to CSV, COCO-style JSON,
FiftyOne or Label Studio.

    python -m rare_jax.predict --workdir=RUN --images=DIR --out=scores.csv [--top_k=N]
    python -m rare_jax.predict --workdir=RUN --pool --out=scores.csv
    python -m rare_jax.predict --workdir=RUN --images=DIR --out=scores.json [--head=deep]
    python -m rare_jax.predict --workdir=RUN --images=DIR --format=label-studio --out=FOLDER
    python -m rare_jax.predict --workdir=RUN --dataset=rare_fashion_mnist --split=test \
        --out=scores.csv [--threshold=0.5] [--strategy=ours_linear --category=Sandal]

The model is the newest checkpoint of the run (a finished run's last round, or the round a
running one is at), of any run:
- runs of `python -m rare_jax.label` (a folder of images): with pretrained features, the same
  trunk embeds the images (squeezed to the run's `image_size`), z-scored with the statistics of
  the run's cached pool embeddings under that trunk. After deep updates from the labeling page
  (or `--deep_every`) the trunk is the newest update's (`labeling/deep/v{i}`) and the
  statistics those of the pool it re-embedded (`labeling/features/v{i}/pool`): the
  embedding of an image is the one the run computed for its pool (to float32 rounding). With
  `--features=pixel_pca`, the pixel-PCA projection the run saved (`features/projection.npz`).
  `--pool` scores the run's own pool instead: the newest checkpoint's scores (the loop's own,
  on the features of its newest deep update, if any), so nothing is read or embedded;
- runs of `python -m rare_jax.run` with `features="m_pre"` (a deep model, e.g. strategy `ours`
  with background-splitting updates): the linear model of round r lives on the features of
  model version v = r // rounds_per_update (0: M_pre, i: the deep model after update i), so
  images are embedded with that model (the dataset's preprocessing, images first brought to
  the dataset's image shape) and normalised like the run's pool; `--head=deep` scores with the
  deep model's main head instead (runs with deep updates, after the first);
- runs of `python -m rare_jax.run` with `features="pixel_pca"`: the projection is fitted again
  on the task's related-domain split (the same deterministic fit the run made).

Every category of the run is scored in one pass over the images (one embedding per image, one
score per category); `--category=NAME` scores one.

Embedding cache (labeling runs on pretrained features; `--nocache` turns it off): the
embeddings of the images scored are kept in `RUN/predict_cache/` and reused for a file with the
same absolute path, size and modification time under the same trunk, so a second call embeds
only new or changed files; the run's own pool embeddings count as cached for pool files not
modified since the run started (read from the run's store, not copied). Bounded: one file per
trunk (the others are deleted when it is written), holding only files that still exist
unchanged. See `EmbeddingCache`.

Outputs, highest score first (`--format`, or `--out`'s suffix):
- CSV: a header and one row per image: `id,path,score` for a folder or the pool (id = position
  among the folder's readable images sorted by relative path; for `--pool` the pool id, and
  the path relative to the folder or absolute for a seed outside it) or `id,label,score` for a
  dataset split (id = index in the split, label = its class name). Several categories:
  `id,path,category,score`, one row per image and category, by category (the run's order),
  each highest score first. For `--images=@LIST` (a file of paths, see `rare_jax.label`):
  paths relative to `--base` (absolute for files outside it), ids the relative paths sorted
  then the absolute ones. Paths are safe to open in a spreadsheet:
  a path starting with `=`, `+`, `-`, `@`, a tab or a carriage return gets a leading `'`
  (formula injection), and a file name that is not valid UTF-8 is written with backslash
  escapes (`\xff`); see `rare_jax/infra/csvfile.py`.
- JSON (COCO-style): `info`, `categories` (ids 1, 2, ... in the run's order), `images` (`id`
  and `file_name`, or `label` for a split) and one `annotations` entry per image and category
  with `image_id`, `category_id`, `score` and `label` ("yes" when score >= 0.5); see
  `write_json`.
- FiftyOne (`--format=fiftyone`) and Label Studio (`--format=label-studio`): `--out` is a
  folder for the files those tools import, in their documented classification formats
  (`rare_jax.infra.interchange`): labels.json and human_labels.json, or label_config.xml and
  tasks.json; every image, "yes" for a category from `--threshold` on (default 0.5); for
  `--pool` also the answers given. The import code or steps are printed, paths filled in.
`score` is the model's probability that the image is of the category. Rows are ranked by the
model's logit, highest first (images whose probabilities print alike, 1.0 among them, keep the
model's order). `--top_k` keeps the best N images of each category, `--threshold` those with
score >= it; by default every image is written. Progress (images, rate, ETA) goes to stderr.

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
writes the CSV and logs (the embedding cache too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
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
from rare_jax.deep import stand_in, train, trunk_features, updates
from rare_jax.infra import (
  atomic,
  cli_help,
  csvfile,
  distributed_flags,
  interchange,
  sharding,
  teardown_noise,
)
from rare_jax.infra.checkpoint import CheckpointStore, quiet_library_logging
from rare_jax.models import pretrained
from rare_jax.webapp import exports, folder_deep, folder_run
from rare_jax.webapp.exports import prepare_out_file
from rare_jax.webapp.labeler import describe_os_error

CHUNK = 1024
CACHE_DIR = "predict_cache"  # under a labeling run's workdir: see EmbeddingCache
_CACHE_FILE = re.compile(r"embeddings_[0-9a-f]+\.npz")  # a finished cache file's name
# A save under way (`EmbeddingCache.save`): the finished name, the writer's pid, .tmp.npz.
_CACHE_TEMPORARY = re.compile(r"embeddings_[0-9a-f]+\.npz\.(\d+)\.tmp\.npz")
# A temporary file left this long by a process that no longer runs is a killed save's.
STALE_TEMPORARY_SECONDS = 3600


class Scorer:
  """The model of a run's categories, on the features the run used.

  Attributes:
    features: prepared images [n, H, W, C] (as `to_model_input` gives) -> float32 [n, D]: the
      features the model reads (a trunk's raw embeddings for pretrained folder runs).
    from_features: float32 [n, D] -> [n, C] logits, one column per category (the rows are
      ranked by them: float32 probabilities of logits above ~17 are all 1.0).
    to_model_input: uint8 [H, W, C] image (C = 1 or 3) or decoded RGB PIL image -> the uint8
      array the model takes.
    categories: the names of the scored categories (the columns); category: the first one.
    round: the checkpoint's round. kind: what run it is. head: "linear" (the loop's logistic
      regression) or "deep" (the deep model's main head).
    cache_key: for pretrained folder runs, a hash of the trunk that makes `features` (its
      weights, architecture and image size): embeddings are reused under this key
      (`EmbeddingCache`); None where features are not cached.
    pool_store: (pool files, their feature rows [P, D], the time the run started) of the run's
      own cached pool embeddings under this trunk, or None: `EmbeddingCache` takes a pool
      file's row instead of embedding it again (see there).
  """

  def __init__(
    self,
    *,
    features,
    from_features,
    to_model_input,
    categories,
    round_index,
    kind,
    head,
    cache_key=None,
    pool_store=None,
  ):
    self.features = features
    self.from_features = from_features
    self.to_model_input = to_model_input
    self.categories = list(categories)
    self.category = self.categories[0]
    self.round = round_index
    self.kind = kind
    self.head = head
    self.cache_key = cache_key
    self.pool_store = pool_store
    self.images_embedded = 0  # images passed through `features` (not taken from a cache)

  def logits(self, images: np.ndarray) -> np.ndarray:
    """float64 [n, C] logits of prepared images [n, H, W, C] (as `to_model_input` gives), one
    column per category of `categories`."""
    images = np.asarray(images)
    self.images_embedded += len(images)
    return self.logits_of_features(self.features(images))

  def logits_of_features(self, features: np.ndarray) -> np.ndarray:
    return np.asarray(self.from_features(np.asarray(features, np.float32)), np.float64)


def probabilities(logits: np.ndarray) -> np.ndarray:
  """float32 sigmoid of logits (`linear.sigmoid`, computed in float64)."""
  return linear.sigmoid(logits).astype(np.float32)


def _linear_logits(weights, bias, mean=None, std=None) -> Callable:
  """features [n, D] -> [n, C] logits of linear models `weights` [C, D], `bias` [C], on
  `(features - mean) / std` when given."""
  model = linear.LinearModel(
    weights=jnp.asarray(np.asarray(weights, np.float32)),
    bias=jnp.asarray(np.asarray(bias, np.float32)),
  )

  def logits(features):
    features = np.asarray(features, np.float32)
    if mean is not None:
      features = (features - mean) / std
    return np.asarray(jax.device_get(linear.decision_function(jnp.asarray(features), model)))

  return logits


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

  `category`: a name or index to score that category only; None scores every category of the
  run (one column each).

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
      f"{workdir} holds no run: expected {folder_run.MANIFEST} (rare-jax-label) or "
      f"{tasks.TASK_FILE} (rare-jax-run)"
    )
  strategies = list(config.strategies)
  strategy = strategy or strategies[0]
  if strategy not in strategies:
    raise ValueError(f"strategy={strategy!r}; expected one of the run's {strategies}")
  indices = _category_indices(category, names)
  pool_shape = exports.pool_feature_shape(workdir, config)
  like = runner.abstract_state(
    jax.ShapeDtypeStruct(pool_shape, jnp.float32), seed_ids, int(config.seed)
  )
  is_folder_run = os.path.exists(os.path.join(workdir, folder_run.MANIFEST))
  run_dir = folder_run.run_dir(workdir) if is_folder_run else os.path.join(workdir, strategy)
  directory = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(directory):
    raise ValueError(f"{workdir}: strategy {strategy!r} has no checkpoints in {directory}")
  with CheckpointStore(directory) as store:
    step = store.latest_step()
    if step is None:
      raise ValueError(f"{directory} holds no checkpoint; expected a started run")
    state, meta = store.restore(step, like)
  if head == "linear" and not bool(state.has_model):
    raise ValueError(f"{workdir}: no batch labeled yet (round 0): no linear model to score with")
  weights = np.asarray(state.linear.weights)[indices]
  bias = np.asarray(state.linear.bias)[indices]
  common = dict(categories=[names[i] for i in indices], round_index=int(state.round), head=head)
  if config.get("features") == "m_pre":
    features, from_features, to_model_input, version = _deep_run(
      workdir, config, strategy, int(state.round), indices, head, weights, bias, log
    )
    what = "M_pre" if version == 0 else f"deep model v{version}"
    return Scorer(
      features=features,
      from_features=from_features,
      to_model_input=to_model_input,
      kind=f"{kind}, {head} head on {what}",
      **common,
    )
  if head == "deep":
    raise ValueError(
      f"{workdir}: head='deep' needs a run with deep updates (rare-jax-run with "
      f"features='m_pre'); this run has features={config.features!r}: use head='linear'"
    )
  if config.features == "pretrained":
    version = int(meta.get("feature_version", 0))
    embedder, store_dir, key = _folder_trunk(workdir, config, manifest, version, log)
    store = embed_lib.FeatureStore.open(store_dir)
    if not store.complete:
      raise ValueError(f"{store_dir}: the run's pool embeddings are incomplete")
    raw_pool = np.asarray(store.features, np.float32)
    mean, std = workdirs.feature_statistics(raw_pool, config.feature_normalization)
    started = os.stat(os.path.join(workdir, folder_run.MANIFEST)).st_mtime_ns
    size = int(config.image_size)
    return Scorer(
      features=embedder.embed,
      from_features=_linear_logits(weights, bias, mean, std),
      to_model_input=_resizer((size, size, 3)),
      kind=kind if version == 0 else f"{kind}, after deep update v{version}",
      cache_key=key,
      pool_store=(folder_run.pool_files(manifest), raw_pool, started),
      **common,
    )
  if projection is None:  # a dataset run: refit the PCA
    log(f"refitting the run's pixel PCA on {len(task.pretrain_ids)} related-domain images")
    train_source = sources.open_source(
      task.dataset, task.train_split, data_dir or config.data_dir or None
    )
    pretrain_images, _ = sources.load_arrays(train_source, task.pretrain_ids)
    projection = stand_in.PixelProjection.fit(pretrain_images, int(config.feature_dim))
  if pool_shape[1] != projection.dim:
    raise ValueError(
      f"{workdir}: pool features have {pool_shape[1]} dims, the projection {projection.dim}"
    )
  return Scorer(
    features=projection.project,
    from_features=_linear_logits(weights, bias),
    to_model_input=_resizer(projection.image_shape),
    kind=kind,
    **common,
  )


def _folder_trunk(workdir, config, manifest, version, log):
  """(TrunkEmbedder, the pool's feature store dir, cache key) of a pretrained folder run whose
  newest model lives on the features of `version` (0: the pretrained trunk; i: the trunk after
  the i-th deep update from the labeling page, `folder_deep.py`)."""
  base = folder_run.embedder(config)
  if version == 0:
    trunk_features.check_source(base, folder_run.pool_store_dir(workdir))  # same weights?
    identity = {"weights_sha256": trunk_features.sha256(base.weights)}
    embedder, store_dir = base, folder_run.pool_store_dir(workdir)
  else:
    log(f"loading the trunk of deep update v{version}")
    variables = deep_trunk_variables(workdir, config, len(manifest["category_names"]), version)
    embedder = trunk_features.TrunkEmbedder(
      config.model,
      config.init,
      int(config.image_size),
      batch_size=int(config.embed_batch_size),
      trunk_variables=variables,
    )
    identity = {"trunk_sha256": variables_sha256(variables)}
    store_dir = os.path.join(folder_run.run_dir(workdir), "features", f"v{version}", "pool")
    if not embed_lib.FeatureStore.exists(store_dir):
      raise ValueError(
        f"{store_dir} is missing; expected the pool features of deep update v{version}"
      )
  key = hashlib.sha256(
    json.dumps(
      {"model": config.model, "image_size": int(config.image_size), **identity}, sort_keys=True
    ).encode()
  ).hexdigest()
  return embedder, store_dir, key


def deep_trunk_variables(workdir: str, config, num_categories: int, version: int) -> dict:
  """`{"params", "batch_stats"}` of a folder run's deep model after update `version` (its
  newest TrainState checkpoint in `labeling/deep/v{version}`), restored without building
  the training pipeline.

  Raises:
    ValueError: a missing or damaged checkpoint (named).
  """
  settings = folder_deep.settings(config)
  model = updates.bgsplit_model(settings, num_categories, pretrained.spec(config.model).num_classes)
  tx = train.make_optimizer(
    momentum=settings.momentum,
    weight_decay=settings.weight_decay,
    total_steps=1,
    frozen=train.frozen_mask(model),  # the optimizer state's structure depends on it
  )
  size = int(config.image_size)
  init = functools.partial(
    train.create_train_state, model=model, tx=tx, input_shape=(1, size, size, 3)
  )
  like = jax.eval_shape(init, jax.random.key(0, impl="rbg"))
  directory = os.path.join(folder_run.run_dir(workdir), "deep", f"v{version}")
  if not os.path.isdir(directory):
    raise ValueError(f"{directory} is missing; expected the checkpoints of deep update v{version}")
  with CheckpointStore(directory) as store:
    state, _ = train.restore_train_state(store, like)
  return jax.device_get(state.variables)


def variables_sha256(variables: dict) -> str:
  """SHA-256 of a model's trunk variables (paths, shapes, dtypes and bytes, in tree order)."""
  digest = hashlib.sha256()
  for kind in ("params", "batch_stats"):
    leaves = jax.tree_util.tree_leaves_with_path(variables[kind]["trunk"])
    for path, leaf in leaves:
      array = np.ascontiguousarray(np.asarray(leaf))
      digest.update(f"{kind}{jax.tree_util.keystr(path)}{array.shape}{array.dtype}".encode())
      digest.update(array.tobytes())
  return digest.hexdigest()


def _deep_run(workdir, config, strategy, round_index, indices, head, weights, bias, log):
  """(features, from_features, to_model_input, model version) of a `features="m_pre"` run's
  newest model.

  The loop's linear model after round r lives on the features of model version
  v = r // rounds_per_update (0: M_pre; i: the deep model after update i), z-scored with that
  version's pool statistics when the run standardises; the deep head is version v's main head
  (its features are then the main head's logits).
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
  output = "main_logits" if head == "deep" else "embedding"

  def features(images):
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
      results.append(np.asarray(out[output])[: len(chunk)])
    return np.concatenate(results)

  if head == "deep":

    def from_features(logits):
      return np.asarray(logits, np.float64)[:, indices]

  else:
    from_features = _linear_logits(weights, bias, mean, std)
  sample = context.deep_parts["data"].train
  shape = sample[0].shape[1:] if isinstance(sample, tuple) else sample[0]["image"].shape
  return features, from_features, _resizer(tuple(shape)), version


def _category_indices(category: str | None, names: list[str]) -> list[int]:
  if category is None:
    return list(range(len(names)))
  if category in names:
    return [names.index(category)]
  if category.isdigit() and int(category) < len(names):
    return [int(category)]
  raise ValueError(f"category={category!r}; expected one of {names} or an index")


class EmbeddingCache:
  """Embeddings of image files already embedded, reused by `score_folder`.

  One file per trunk, `WORKDIR/predict_cache/embeddings_<key>.npz` (`key`: `Scorer.cache_key`,
  a hash of the trunk's weights, architecture and image size), mapping an image file's
  absolute path, size and modification time (ns) to its raw embedding. A file whose size or
  modification time changed is embedded again. Bounded: on `save`, entries of files that no
  longer exist or changed are dropped, and the cache files of other trunks are deleted (a run
  only moves forward: predict always uses its newest trunk), so the cache holds at most one
  row per image file scored that still exists; a killed save's temporary file is deleted by
  the next save (`_stale_temporary`).

  A labeling run's own pool embeddings under this trunk (`Scorer.pool_store`) count as cached
  for the pool files last modified before the run started (its `folder_run.json`): the run
  embedded those very contents (at the start, or from the pixels a deep update read later).
  Those rows are read from the run's store, not copied into the cache file.

  A damaged or foreign cache file is ignored (and replaced on `save`), never an error; a
  workdir that cannot be written keeps predict working without a cache (logged).
  """

  def __init__(
    self,
    workdir: str,
    scorer: Scorer,
    *,
    log: Callable[[str], None] = print,
    writable: bool = True,
  ):
    if scorer.cache_key is None:
      raise ValueError("this run's features are not cached (no Scorer.cache_key)")
    self.directory = os.path.join(workdir, CACHE_DIR)
    self.key = scorer.cache_key
    self.path = os.path.join(self.directory, f"embeddings_{self.key[:32]}.npz")
    self.log = log
    self.writable = writable  # multi-host: process 0 alone writes
    self._entries: dict[str, tuple[int, int, np.ndarray]] = {}
    self._pool: dict[str, int] = {}
    self._pool_rows = None
    self._started = None
    self.added = 0
    if scorer.pool_store is not None:
      files, rows, started = scorer.pool_store
      self._pool = {os.path.abspath(f): i for i, f in enumerate(files)}
      self._pool_rows, self._started = rows, started
    self._load()

  def _load(self) -> None:
    if not os.path.exists(self.path):
      return
    try:
      with np.load(self.path, allow_pickle=False) as data:
        meta = json.loads(bytes(data["meta"]).decode("utf-8"))
        rows = np.asarray(data["embeddings"], np.float32)
      if meta.get("key") != self.key or len(meta["paths"]) != len(rows):
        raise ValueError("another trunk's cache")
      width = None if self._pool_rows is None else np.shape(self._pool_rows)[1]
      if len(rows) and (
        rows.ndim != 2 or width not in (None, rows.shape[1]) or not np.isfinite(rows).all()
      ):
        raise ValueError(
          f"embeddings of shape {rows.shape} (or not finite); expected finite rows of "
          f"{f'{width} values' if width else 'one width'}"
        )
      for path, size, mtime, row in zip(
        meta["paths"], meta["sizes"], meta["mtimes"], rows, strict=True
      ):
        self._entries[path] = (int(size), int(mtime), row)
    except Exception as error:  # numpy and json raise several types for a damaged file
      self.log(f"ignoring the embedding cache {self.path} ({type(error).__name__}: {error})")
      self._entries = {}

  def get(self, path: str, stat: os.stat_result) -> np.ndarray | None:
    """The cached embedding of `path` (absolute) as of `stat`, or None."""
    entry = self._entries.get(path)
    if entry is not None and entry[:2] == (stat.st_size, stat.st_mtime_ns):
      return entry[2]
    pool_id = self._pool.get(path)
    if pool_id is not None and stat.st_mtime_ns < self._started:
      # Not copied into the cache file: the run's pool store keeps it.
      return np.asarray(self._pool_rows[pool_id], np.float32)
    return None

  def put(self, path: str, stat: os.stat_result, row: np.ndarray) -> None:
    self._entries[path] = (stat.st_size, stat.st_mtime_ns, np.asarray(row, np.float32))
    self.added += 1

  def save(self) -> None:
    """Writes the cache (atomically), dropping entries of files gone or changed, and deletes
    other trunks' cache files and killed saves' temporary files. A failure to write is
    logged, not raised."""
    if not self.writable:
      return
    kept = {}
    for path, (size, mtime, row) in self._entries.items():
      try:
        stat = os.stat(path)
      except OSError:
        continue
      if (stat.st_size, stat.st_mtime_ns) == (size, mtime):
        kept[path] = (size, mtime, row)
    self._entries = kept
    tmp = f"{self.path}.{os.getpid()}.tmp.npz"
    try:
      os.makedirs(self.directory, exist_ok=True)
      self._remove_leftovers(other_trunks=False)  # killed saves' files first: they take disk
      paths = list(kept)
      meta = {
        "key": self.key,
        "paths": paths,  # json escapes undecodable names' surrogates: read back the same
        "sizes": [kept[p][0] for p in paths],
        "mtimes": [kept[p][1] for p in paths],
      }
      rows = np.stack([kept[p][2] for p in paths]) if paths else np.zeros((0, 0), np.float32)
      with open(tmp, "wb") as f:
        np.savez(f, meta=np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8), embeddings=rows)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.path)
    except OSError as error:
      self.log(f"the embedding cache was not saved: {describe_os_error(error, self.path)}")
      return
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    self._remove_leftovers(other_trunks=True)

  def _remove_leftovers(self, *, other_trunks: bool) -> None:
    """Deletes killed saves' temporary files (`_stale_temporary`) and, with `other_trunks`
    (once this trunk's file is written), other trunks' finished cache files; never a save
    under way. A file that cannot be removed (another user's, a read-only folder) is left as
    it is: it costs disk, not correctness."""
    try:
      names = os.listdir(self.directory)
    except OSError:
      return
    for name in names:
      other_trunk = (
        other_trunks and _CACHE_FILE.fullmatch(name) and name != os.path.basename(self.path)
      )
      if other_trunk or _stale_temporary(self.directory, name):
        with contextlib.suppress(OSError):  # FileNotFoundError: another process removed it
          os.remove(os.path.join(self.directory, name))


def _stale_temporary(directory: str, name: str) -> bool:
  """Whether `name` is a cache save's temporary file left by a killed process: its writer's
  pid runs no process here and it is older than `STALE_TEMPORARY_SECONDS` (both, so that a
  save under way, even by a process on another host sharing the folder, is kept as long as
  the hosts' clocks agree within that time)."""
  match = _CACHE_TEMPORARY.fullmatch(name)
  if match is None:
    return False
  try:
    age = time.time() - os.stat(os.path.join(directory, name)).st_mtime
  except FileNotFoundError:
    return False
  if age < STALE_TEMPORARY_SECONDS:
    return False
  try:
    os.kill(int(match.group(1)), 0)
  except ProcessLookupError:
    return True
  except (PermissionError, OverflowError, ValueError):
    return False  # a live process of another user, or not a pid: keep it
  return False


def iter_folder(
  root: str, to_model_input: Callable, *, log: Callable[[str], None]
) -> Iterator[tuple[list[str], np.ndarray]]:
  """(relative paths, prepared images) of the readable images of `root`, in id order.

  Unreadable files are skipped (and logged), as `folder.open_folder` does, so ids agree.
  """
  candidates, refused = folder.list_image_files(root)
  yield from _read_images(os.path.abspath(root), candidates, to_model_input, refused, log=log)


@dataclasses.dataclass
class Scored:
  """Scores of images: ids [n], names [n] (relative paths, or class names for a dataset
  split: `key`), probabilities float32 [n, C] (one column per `Scorer.categories`); `base`:
  the folder relative paths are relative to (`score_folder`), else None; `logits` [n, C]:
  they order the rows, since float32 probabilities of logits above ~17 are all 1.0 (None
  only where a caller has probabilities alone)."""

  ids: list[int]
  names: list[str]
  scores: np.ndarray
  key: str  # "path" or "label"
  base: str | None = None
  logits: np.ndarray | None = None

  def rows(self, category: int = 0) -> list[tuple]:
    """[(id, name, score)] of one category: in id order, or with `logits` from the highest
    logit to the lowest (ties by id)."""
    column = self.scores[:, category]
    rows = [(i, n, float(s)) for i, n, s in zip(self.ids, self.names, column, strict=True)]
    if self.logits is None:
      return rows
    order = np.lexsort((np.asarray(self.ids), -np.asarray(self.logits)[:, category]))
    return [rows[k] for k in order]


def score_folder(
  scorer: Scorer,
  root: str,
  *,
  log: Callable[[str], None],
  cache: EmbeddingCache | None = None,
  base: str | None = None,
) -> Scored:
  """Scores of the readable images under `root` (ids: positions among them, sorted by relative
  path), or of the files `root="@LIST"` lists (`folder.read_image_list`, relative paths from
  `base`, by default the list file's folder; ids: positions among the readable ones, relative
  paths sorted then absolute ones sorted, so a list of a folder's images with the folder as
  base scores as the folder). With `cache`, images whose embedding it holds are neither read
  nor embedded again, and the new ones are added to it (saved at the end).

  Raises:
    ValueError: not a folder nor @LIST, a list that cannot be read, `base` with a folder, or no
      readable image.
  """
  if folder.is_image_list(root):
    listed = folder.read_image_list(root, base=base)
    candidates, refused, base = list(listed.candidates), list(listed.refused), listed.base
  else:
    if not os.path.isdir(root):
      raise ValueError(
        f"--images={root!r} is not a directory; expected a folder of JPEG/PNG or @LIST, a file "
        "listing them"
      )
    if base is not None:
      raise ValueError(f"--base={base!r} with the folder --images={root!r}; it goes with @LIST")
    candidates, refused = folder.list_image_files(root)
    base = os.path.abspath(root)
  found: dict[str, np.ndarray] = {}  # relative path -> cached features
  stats: dict[str, os.stat_result] = {}
  if cache is not None:
    for relative in candidates:
      full = folder.join_path(base, relative)
      try:
        stats[relative] = os.stat(full)
      except OSError:
        continue  # read (and skipped with its reason) below
      row = cache.get(full, stats[relative])
      if row is not None:
        found[relative] = row
  missing = [p for p in candidates if p not in found]
  if cache is not None:
    log(
      f"{len(found)} of {len(candidates)} images already embedded with this trunk (cache "
      f"{cache.path}); embedding {len(missing)}"
    )
  features: dict[str, np.ndarray] = dict(found)
  done, started = len(found), time.perf_counter()
  for paths, images in _read_images(base, missing, scorer.to_model_input, refused, log=log):
    rows = scorer.features(images)
    scorer.images_embedded += len(images)
    for relative, row in zip(paths, rows, strict=True):
      features[relative] = np.asarray(row, np.float32)
      if cache is not None and relative in stats:
        full = folder.join_path(base, relative)
        try:
          after = os.stat(full)
        except OSError:
          continue
        if (after.st_size, after.st_mtime_ns) == (
          stats[relative].st_size,
          stats[relative].st_mtime_ns,
        ):
          cache.put(full, after, row)  # unchanged while it was read
    done += len(images)
    _progress(log, done, len(candidates), started, len(found))
  names = [p for p in candidates if p in features]
  if not names:
    raise ValueError(f"--images={root!r} holds no readable JPEG/PNG image")
  logits = np.concatenate(
    [
      scorer.logits_of_features(np.stack([features[p] for p in names[start : start + CHUNK]]))
      for start in range(0, len(names), CHUNK)
    ]
  )
  if cache is not None:
    cache.save()
  if found and not missing:
    log(f"scored {len(names)}/{len(candidates)} images (all from the cache)")
  return Scored(
    ids=list(range(len(names))),
    names=names,
    scores=probabilities(logits),
    key="path",
    base=base,
    logits=logits,
  )


def _read_images(base, relatives, to_model_input, refused, *, log):
  """`iter_folder` over given paths relative to `base` or absolute (refused files logged
  first)."""
  for path, reason in refused:
    log(f"skipped {path}: {reason}")

  def read(relative):
    try:
      image = folder.decode_image(folder.join_path(base, relative))
      return to_model_input(image), None
    except Exception as error:
      return None, f"{type(error).__name__}: {error}"

  with futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    for start in range(0, len(relatives), CHUNK):
      chunk = relatives[start : start + CHUNK]
      paths, images = [], []
      for relative, (image, error) in zip(chunk, pool.map(read, chunk), strict=True):
        if error is not None:
          log(f"skipped {relative}: {error}")
          continue
        paths.append(relative)
        images.append(image)
      if images:
        yield paths, np.stack(images)


def score_pool(pool: exports.PoolScores, categories: Sequence[str]) -> Scored:
  """A labeling run's own pool, scored by its newest model from the checkpoint's scores
  (`exports.pool_scores`): nothing is read or embedded. Ids are pool ids, names the pool's
  paths (relative to the folder; absolute for seeds outside it)."""
  indices = [pool.category_names.index(n) for n in categories]
  return Scored(
    ids=list(range(len(pool.paths))),
    names=list(pool.paths),
    scores=np.asarray(pool.probabilities[indices].T, np.float32),
    key="path",
    logits=np.asarray(pool.logits[indices].T),
  )


def score_dataset(
  scorer: Scorer, name: str, split: str, *, data_dir: str | None, log: Callable[[str], None]
) -> Scored:
  """Scores of every example of a prepared TFDS split (names: their class names)."""
  source = sources.open_source(name, split, data_dir)
  ids, labels, logits, started = [], [], [], time.perf_counter()
  for start in range(0, len(source), CHUNK):
    examples = source.__getitems__(range(start, min(start + CHUNK, len(source))))
    images = np.stack([scorer.to_model_input(e["image"]) for e in examples])
    logits.append(scorer.logits(images))
    for k, example in enumerate(examples):
      label = example["label"]
      labels.append(source.class_names[label] if 0 <= label < source.num_classes else str(label))
      ids.append(start + k)
    _progress(log, len(ids), len(source), started)
  logits = np.concatenate(logits)
  return Scored(ids=ids, names=labels, scores=probabilities(logits), key="label", logits=logits)


def _progress(log, done: int, total: int, started: float, cached: int = 0) -> None:
  rate = (done - cached) / max(time.perf_counter() - started, 1e-9)
  eta = embed_lib.format_eta(max(total - done, 0) / rate if rate > 0 else None)
  log(f"scored {done}/{total} images ({rate:.1f} images/s, ETA {eta})")


def select_rows(rows: list[tuple], *, top_k: int | None, threshold: float | None) -> list[tuple]:
  """Rows sorted by score, highest first (a stable sort: ties keep the order of `rows`, which
  `Scored.rows` gives by id, or by logit where it has them), cut by `top_k` or `threshold`."""
  if top_k is not None and threshold is not None:
    raise ValueError("pass --top_k or --threshold, not both")
  if top_k is not None and top_k < 1:
    raise ValueError(f"top_k={top_k}; expected a positive int")
  if threshold is not None and not 0 <= threshold <= 1:
    raise ValueError(f"threshold={threshold}; expected a probability in [0, 1]")
  ordered = sorted(rows, key=lambda row: -row[2])
  if top_k is not None:
    return ordered[:top_k]
  if threshold is not None:
    return [row for row in ordered if row[2] >= threshold]
  return ordered


def write_csv(path: str, header: tuple[str, str, str], rows: list[tuple]) -> None:
  """Writes one category's CSV atomically (a reader never sees half a file; see `csvfile`)."""
  csvfile.write_csv_atomic(path, header, ((i, name, f"{score:.6f}") for i, name, score in rows))


def write_csv_categories(
  path: str, header: tuple[str, str, str], categories: list[tuple[str, list[tuple]]]
) -> None:
  """Writes the CSV of several categories atomically: header `id,path,category,score` (or
  `id,label,...`), one row per image and category, by category then as `rows` are ordered."""
  csvfile.write_csv_atomic(
    path,
    (header[0], header[1], "category", header[2]),
    (
      (i, name, category, f"{score:.6f}")
      for category, rows in categories
      for i, name, score in rows
    ),
  )


FILE_FORMATS = ("csv", "json")
FOLDER_FORMATS = ("fiftyone", "label-studio")  # --out is a folder (rare_jax.infra.interchange)
FORMATS = FILE_FORMATS + FOLDER_FORMATS


def output_format(path: str, format_: str | None) -> str:
  """One of `FORMATS`: `format_` if given, else "json" or "csv" from the file's extension
  (default csv)."""
  if format_ is not None:
    if format_ not in FORMATS:
      raise ValueError(f"format={format_!r}; expected one of {FORMATS}")
    return format_
  return "json" if path.lower().endswith(".json") else "csv"


def check_folder_output(out: str, fmt: str, *, top_k: int | None, dataset: str | None) -> None:
  """Refuses what --format=fiftyone / label-studio cannot do, before any work."""
  if not out:
    raise ValueError(f"--out is empty; expected a folder for --format={fmt}")
  if top_k is not None:
    raise ValueError(
      f"--top_k={top_k} cuts CSV and JSON rows; --format={fmt} writes every image (its "
      "--threshold says where 'yes' starts)"
    )
  if dataset is not None:
    raise ValueError(
      f"--format={fmt} names image files; --dataset={dataset!r} has none: use csv or json"
    )
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out={out!r} is a file; expected a folder for --format={fmt}")


def interchange_table(
  scored: Scored,
  categories: Sequence[str],
  pool: exports.PoolScores | None,
  base: str,
  threshold: float | None,
) -> interchange.Table:
  """The scores as `rare_jax.infra.interchange` takes them: every image, paths relative to
  `base`; for `--pool` also the logits and the answers given (seeds as "yes")."""
  logits = human = None
  if pool is not None:
    rows = [pool.category_names.index(name) for name in categories]
    logits = pool.logits[rows].T
    human = pool.labels[rows].T
  return interchange.table(
    categories,
    scored.names,
    scored.scores,
    base=base,
    logits=logits,
    human=human,
    threshold=0.5 if threshold is None else threshold,
  )


def write_json(
  path: str,
  header: tuple[str, str, str],
  rows: list[tuple],
  *,
  scorer,
  workdir: str,
  source: str,
  categories: list[tuple[str, list[tuple]]] | None = None,
) -> None:
  """Writes a COCO-style JSON of per-image labels and scores, atomically.

  `{"info": {...}, "categories": [{"id": 1, "name": CATEGORY}, ...], "images": [{"id",
  "file_name"} (folders) or {"id", "label"} (dataset splits: the true class)], "annotations":
  [{"id", "image_id", "category_id", "score", "label": "yes" | "no"}]}`: one annotation per
  image and category, `label` "yes" when score >= 0.5, by category then in the order of its
  rows (highest score first). One category: `rows`; several: `categories` = [(name, rows)]
  (category ids 1, 2, ... in that order; `rows` is then ignored).
  """
  if categories is None:
    categories = [(scorer.category, rows)]
  key = "file_name" if header[1] == "path" else "label"
  images, seen = [], set()
  for _, category_rows in categories:
    for i, name, _ in category_rows:
      if i not in seen:
        seen.add(i)
        images.append({"id": int(i), key: csvfile.printable(name)})
  annotations = []
  for c, (_, category_rows) in enumerate(categories):
    for i, _, score in category_rows:
      annotations.append(
        {
          "id": len(annotations) + 1,
          "image_id": int(i),
          "category_id": c + 1,
          "score": round(float(score), 6),
          "label": "yes" if score >= 0.5 else "no",
        }
      )
  names = [name for name, _ in categories]
  document = {
    "info": {
      "description": f"rare_jax.predict scores of {', '.join(repr(n) for n in names)}",
      "workdir": os.path.abspath(workdir),
      "source": source,
      "model": scorer.kind,
      "head": scorer.head,
      "round": scorer.round,
      "date_created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    },
    "categories": [{"id": c + 1, "name": name} for c, name in enumerate(names)],
    "images": images,
    "annotations": annotations,
  }
  if os.path.isdir(path):
    raise ValueError(f"--out={path!r} is a directory; expected a file name")
  with atomic.replacing(path) as f:
    json.dump(document, f, ensure_ascii=False, indent=1)


_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir (rare_jax.label or rare_jax.run).")
_IMAGES = flags.DEFINE_string(
  "images",
  None,
  "A folder of JPEG/PNG images to score, or @LIST: a file of image paths (one per line, or a "
  ".csv file with a path column; rare_jax/data/folder.py).",
)
_BASE = flags.DEFINE_string(
  "base",
  None,
  "With --images=@LIST: the folder its relative paths are relative to (default: the list "
  "file's folder).",
)
_POOL = flags.DEFINE_bool(
  "pool",
  False,
  "Score the labeling run's own pool from its newest checkpoint (nothing is embedded again).",
)
_DATASET = flags.DEFINE_string("dataset", None, "A prepared TFDS dataset to score instead.")
_SPLIT = flags.DEFINE_string("split", "test", "The split of --dataset (e.g. test, train[:10%]).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: TFDS's default).")
_OUT = flags.DEFINE_string("out", None, "The file to write (.csv, or .json for COCO-style).")
_FORMAT = flags.DEFINE_enum(
  "format",
  None,
  list(FORMATS),
  "csv or json (default: --out's suffix); fiftyone or label-studio: --out is a folder for the "
  "files those tools import.",
)
_HEAD = flags.DEFINE_enum(
  "head", "linear", list(HEADS), "linear: the loop's model; deep: the deep model's main head."
)
_TOP_K = flags.DEFINE_integer(
  "top_k", None, "Keep only the N highest-scoring images (per category)."
)
_THRESHOLD = flags.DEFINE_float(
  "threshold",
  None,
  "Keep only images with score >= this; fiftyone and label-studio keep every image and say "
  "'yes' from this score on (default 0.5).",
)
_STRATEGY = flags.DEFINE_string("strategy", None, "Strategy of the run (default: its first).")
_CATEGORY = flags.DEFINE_string(
  "category", None, "Category name or index (default: every category of the run, one pass)."
)
_CACHE = flags.DEFINE_bool(
  "cache",
  True,
  "Labeling runs on pretrained features: reuse the embeddings of files already embedded "
  "(WORKDIR/predict_cache) and add the new ones.",
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

  given = [_IMAGES.value is not None, _DATASET.value is not None, _POOL.value]
  pool = None
  if sum(given) != 1:
    raise app.UsageError("pass exactly one of --images=DIR, --dataset=NAME or --pool")
  if _BASE.value is not None and not folder.is_image_list(_IMAGES.value or ""):
    raise app.UsageError("--base goes with --images=@LIST (the folder its paths are relative to)")
  started = time.perf_counter()
  try:
    select_rows([], top_k=_TOP_K.value, threshold=_THRESHOLD.value)  # fail early on bad cuts
    fmt = output_format(_OUT.value, _FORMAT.value)
    if fmt in FOLDER_FORMATS:
      check_folder_output(_OUT.value, fmt, top_k=_TOP_K.value, dataset=_DATASET.value)
      if primary:  # the folder exists and is writable before any work
        try:
          os.makedirs(_OUT.value, exist_ok=True)
        except OSError as error:
          raise ValueError(
            f"--out={_OUT.value!r}: the folder cannot be created ({describe_os_error(error)})"
          ) from None
        if not os.access(_OUT.value, os.W_OK | os.X_OK):
          raise ValueError(f"--out={_OUT.value!r}: the folder is not writable")
    else:
      if os.path.isdir(_OUT.value):
        raise ValueError(f"--out={_OUT.value!r} is a directory; expected a file name")
      if primary:  # the one process that writes: its folder exists before any work
        prepare_out_file(_OUT.value)
    if not os.path.isdir(_WORKDIR.value):
      raise ValueError(f"--workdir={_WORKDIR.value!r} is not a directory; expected a run's workdir")
    if _POOL.value:
      if _HEAD.value != "linear" or _STRATEGY.value is not None:
        raise ValueError(
          "--pool scores with the labeling run's linear model; drop --head/--strategy"
        )
      pool = exports.pool_scores(_WORKDIR.value)
      names = pool.category_names
      chosen = [names[i] for i in _category_indices(_CATEGORY.value, names)]
      scorer = Scorer(
        features=None,
        from_features=None,
        to_model_input=None,
        categories=chosen,
        round_index=pool.round,
        kind=f"labeling run's pool: {pool.model}",
        head="linear",
      )
      log(f"model: {scorer.kind}; the pool's scores from its newest checkpoint (no embedding)")
      scored = score_pool(pool, chosen)
      source = f"the labeling pool of {pool.manifest['root']}"
    else:
      scorer = load_scorer(
        _WORKDIR.value,
        strategy=_STRATEGY.value,
        category=_CATEGORY.value,
        head=_HEAD.value,
        data_dir=_DATA_DIR.value,
        log=log,
      )
      log(f"model: {scorer.kind}, categories {scorer.categories}, round {scorer.round}")
      if _IMAGES.value is not None:
        cache = None
        if _CACHE.value and scorer.cache_key is not None:
          cache = EmbeddingCache(_WORKDIR.value, scorer, log=log, writable=primary)
        scored = score_folder(scorer, _IMAGES.value, log=log, cache=cache, base=_BASE.value)
        source = _IMAGES.value
        if folder.is_image_list(_IMAGES.value):
          source = f"{_IMAGES.value} (paths relative to {scored.base})"
      else:
        scored = score_dataset(
          scorer, _DATASET.value, _SPLIT.value, data_dir=_DATA_DIR.value, log=log
        )
        source = f"{_DATASET.value}:{_SPLIT.value}"
    header = ("id", scored.key, "score")
    if fmt in FOLDER_FORMATS:
      base = pool.manifest["root"] if pool is not None else scored.base
      data = interchange_table(scored, scorer.categories, pool, base, _THRESHOLD.value)
    else:
      categories = [
        (name, select_rows(scored.rows(c), top_k=_TOP_K.value, threshold=_THRESHOLD.value))
        for c, name in enumerate(scorer.categories)
      ]
  except ValueError as error:
    log(f"error: {error}")
    sys.exit(2)
  if not primary:
    return
  try:
    if fmt in FOLDER_FORMATS:
      if fmt == "fiftyone":
        written = interchange.write_fiftyone(_OUT.value, data)
      else:
        # Label Studio serves the files under one folder: the images' own (the folder or the
        # list's base), never a parent found from the paths (it could be / or a home folder);
        # seeds outside it are left out and listed.
        written = interchange.write_label_studio(
          _OUT.value,
          data,
          model_version=f"rare_jax: {scorer.kind}, round {scorer.round}",
          document_root=base,
        )
    elif fmt == "json":
      write_json(
        _OUT.value,
        header,
        categories[0][1],
        scorer=scorer,
        workdir=_WORKDIR.value,
        source=source,
        categories=categories,
      )
    elif len(categories) == 1:
      write_csv(_OUT.value, header, categories[0][1])
    else:
      write_csv_categories(_OUT.value, header, categories)
  except ValueError as error:
    log(f"error: {error}")
    sys.exit(2)
  except OSError as error:
    done = (
      f"the files in {_OUT.value} may be partly updated: run again"
      if fmt in FOLDER_FORMATS
      else "nothing was written"
    )
    log(f"error: {describe_os_error(error, error.filename or _OUT.value)}; {done}")
    sys.exit(1)
  if fmt in FOLDER_FORMATS:
    for path, reason in written.left_out:
      log(f"left out {path}: {reason}")
    log(f"to import into {'FiftyOne' if fmt == 'fiftyone' else 'Label Studio'}:")
    for line in written.how_to_import.splitlines():
      log(f"  {line}")
    log(
      f"wrote {len(data.paths)} images x {len(data.categories)} categories to "
      f"{', '.join(written.files)} ({time.perf_counter() - started:.1f}s)"
    )
    return
  count = sum(len(rows) for _, rows in categories)
  log(f"wrote {count} rows to {_OUT.value} ({time.perf_counter() - started:.1f}s)")


def run():
  cli_help.run(main)


if __name__ == "__main__":
  run()
