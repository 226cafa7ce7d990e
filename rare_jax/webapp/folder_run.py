"""The workdir of a run on a folder of one's own images (`python -m rare_jax.label`).

    WORKDIR/config.json         the run's config (`make_config`; a restart must match it)
    WORKDIR/folder_run.json     the pool: folder, image paths (ids), seeds, skipped files
    WORKDIR/features/pool.npy   [P, D] stand-in features of the pool
    WORKDIR/features/projection.npz   the pixel-PCA projection (mean, components, image size)
    WORKDIR/ours_linear/        the runner's directory (checkpoints, answers.jsonl, ...) and
                                submitted.jsonl, the web labeler's journal

Features: until a deep model exists for folder runs, images are resized to `image_size` x
`image_size` RGB and projected on the top `feature_dim` principal components of the folder's
own images (the pixel-PCA stand-in of `rare_jax.stand_in`, fitted here on the folder, on at
most `pca_fit_images` of them). These features are weak: good enough to rank images that look
alike, not a trained network's. The projection is saved so `rare_jax.predict` can score new
images exactly like the pool.

The pool is the folder's readable images (ids = sorted relative paths) followed by the seed
images that lie outside the folder. One category (C = 1): the person's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from concurrent import futures

import jax.numpy as jnp
import ml_collections
import numpy as np

from rare_jax import runner, workdirs
from rare_jax.checkpoint import write_json_atomic
from rare_jax.data import folder
from rare_jax.stand_in import PixelProjection

# Folder names that say nothing about the category: the default name looks past them.
GENERIC_FOLDER_NAMES = frozenset(
  {"seeds", "seed", "examples", "example", "positives", "positive", "samples", "sample", "pos"}
)
DEFAULT_CATEGORY_NAME = "the category"
MANIFEST = "folder_run.json"
MANIFEST_FORMAT = "rare_jax.FolderRun/1"
STRATEGY = "ours_linear"
JOURNAL = "submitted.jsonl"


def make_config(
  *,
  budget: int = 100,
  batch_size: int = 10,
  feature_dim: int = 64,
  image_size: int = 32,
  seed: int = 0,
  pseudo_negative_factor: float = 100.0,
  l2: float = 1.0,
  pca_fit_images: int = 5000,
) -> ml_collections.ConfigDict:
  """The config of a folder run: `budget` labels in rounds of `batch_size`.

  Raises:
    ValueError: a non-positive setting, or a budget that is not a multiple of batch_size.
  """
  for name, value in (
    ("budget", budget),
    ("batch_size", batch_size),
    ("feature_dim", feature_dim),
    ("image_size", image_size),
    ("pca_fit_images", pca_fit_images),
  ):
    if int(value) != value or value < 1:
      raise ValueError(f"{name}={value!r}; expected a positive int")
  if budget % batch_size:
    raise ValueError(
      f"budget={budget} is not a multiple of batch_size={batch_size}; expected whole rounds "
      f"(e.g. budget={budget - budget % batch_size or batch_size})"
    )
  config = ml_collections.ConfigDict()
  config.seed = int(seed)
  config.features = "pixel_pca_folder"
  config.feature_dim = int(feature_dim)
  config.image_size = int(image_size)
  config.pca_fit_images = int(pca_fit_images)
  config.strategies = (STRATEGY,)
  config.budget = int(budget)
  config.num_feature_updates = 1  # no deep update for folder runs yet
  config.rounds_per_update = int(budget) // int(batch_size)
  config.batch_size = int(batch_size)
  config.pseudo_negative_factor = float(pseudo_negative_factor)
  config.l2 = float(l2)
  config.solver_max_iters = 200
  config.solver_tol = 1e-6
  return config


@dataclasses.dataclass(frozen=True)
class FolderRun:
  """An opened folder run: what `runner.run_strategy` and the web app need."""

  workdir: str
  config: ml_collections.ConfigDict
  manifest: dict
  features: jnp.ndarray  # [P, D]
  val_features: jnp.ndarray  # [V, D]: the pool when evaluating against sub-folders, else [0, D]
  val_ground_truth: np.ndarray  # [1, V] bool
  seed_ids: np.ndarray  # [1, K] pool positions
  projection: PixelProjection

  @property
  def run_dir(self) -> str:
    return os.path.join(self.workdir, STRATEGY)

  @property
  def journal_path(self) -> str:
    return os.path.join(self.run_dir, JOURNAL)

  @property
  def category_names(self) -> list[str]:
    return list(self.manifest["category_names"])

  @property
  def pool_size(self) -> int:
    return len(self.manifest["paths"])

  def display_path(self, image_id: int) -> str:
    return self.manifest["paths"][int(image_id)]

  def file_path(self, image_id: int) -> str:
    """The file of pool image `image_id` (ids only: a request never names a path)."""
    image_id = int(image_id)
    if not 0 <= image_id < self.pool_size:
      raise IndexError(f"image id {image_id} out of range; expected 0 <= id < {self.pool_size}")
    path = self.manifest["paths"][image_id]
    if image_id >= self.manifest["num_folder_images"]:
      return path  # a seed outside the folder: stored absolute
    return os.path.join(self.manifest["root"], *path.split("/"))


def default_category_name(seeds: str) -> str:
  """The name the page asks about when none is given ("Is it NAME?").

  The seed folder's name, or its parent's when the folder's is generic (seeds, examples,
  positives, ...: `GENERIC_FOLDER_NAMES`); "the category" when both are generic, or when the
  seeds are a list of files.
  """
  if not os.path.isdir(seeds):
    return DEFAULT_CATEGORY_NAME
  directory = os.path.abspath(seeds)
  for _ in range(2):
    name = os.path.basename(directory)
    if not name:
      break
    if name.lower() not in GENERIC_FOLDER_NAMES:
      return name
    directory = os.path.dirname(directory)
  return DEFAULT_CATEGORY_NAME


def _seed_files(seeds: str) -> list[str]:
  """The seed files as sorted absolute paths, to compare a restart's --seeds with the first."""
  if os.path.isdir(seeds):
    found, _ = folder.list_image_files(seeds)
    return sorted(os.path.join(os.path.abspath(seeds), *p.split("/")) for p in found)
  return sorted(os.path.abspath(s.strip()) for s in seeds.split(",") if s.strip())


def prepare_folder_run(
  workdir: str,
  *,
  images: str,
  seeds: str,
  config: ml_collections.ConfigDict,
  category_name: str | None = None,
  eval_subfolder: str | None = None,
  log: Callable[[str], None] = print,
) -> FolderRun:
  """Creates (or reopens, checking it is the same run) the workdir of a folder run.

  Args:
    workdir: the run's directory (created).
    images: the folder of images to label.
    seeds: seed positives: a folder or comma-separated image paths (in `images` or not).
    config: from `make_config`.
    category_name: shown in the app (default: `default_category_name(seeds)`).
    eval_subfolder: a top-level sub-folder of `images` whose images are the true positives:
      metrics.jsonl then scores the linear model on the pool against it (evaluation only).
    log: progress lines.

  Raises:
    ValueError: another run's workdir (or a workdir that is a file), a bad folder or seeds, or
      a budget the pool cannot take.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"workdir={workdir!r} is a file; expected a directory (new or of this run)")
  os.makedirs(workdir, exist_ok=True)
  runner.loop_config(config, STRATEGY)  # fail on bad settings before any work
  runner.write_config(workdir, workdirs.config_to_dict(config))
  path = os.path.join(workdir, MANIFEST)
  seed_files = _seed_files(seeds)
  resized = None  # the pool resized for features, when read in this call
  if os.path.exists(path):
    manifest = _read_manifest(path)
    if manifest["root"] != os.path.abspath(images):
      raise ValueError(
        f"workdir {workdir} is a run on {manifest['root']!r}, not --images={images!r}; use the "
        "same folder or a new --workdir"
      )
    if manifest["seed_files"] != seed_files:
      raise ValueError(
        f"workdir {workdir} was started with other seeds ({len(manifest['seed_files'])} files); "
        "use the same --seeds or a new --workdir"
      )
    if manifest["eval_subfolder"] != eval_subfolder:
      raise ValueError(
        f"workdir {workdir} was started with eval_subfolder={manifest['eval_subfolder']!r}, "
        f"got {eval_subfolder!r}"
      )
    current, _ = folder.list_image_files(images)
    known = set(manifest["paths"][: manifest["num_folder_images"]])
    new = len(set(current) - known - {p for p, _ in manifest["skipped"]})
    if new:
      log(f"{new} image files were added to {images} since the run started: not in this run")
  else:
    manifest, resized = _new_manifest(
      images, seeds, seed_files, config, category_name, eval_subfolder, log
    )
    _check_budget(config, len(manifest["paths"]), len(manifest["seed_ids"][0]))
    write_json_atomic(path, manifest)
  features, projection = _features(workdir, manifest, config, resized, log)
  seed_ids = np.asarray(manifest["seed_ids"], np.int64)
  if manifest["eval_subfolder"] is not None:
    val_features = features
    val_ground_truth = np.asarray(manifest["ground_truth"], bool)[None, :]
  else:
    val_features = features[:0]
    val_ground_truth = np.zeros((1, 0), bool)
  return FolderRun(
    workdir=workdir,
    config=config,
    manifest=manifest,
    features=features,
    val_features=val_features,
    val_ground_truth=val_ground_truth,
    seed_ids=seed_ids,
    projection=projection,
  )


def load_folder_run(workdir: str) -> tuple[ml_collections.ConfigDict, dict, PixelProjection]:
  """(config, manifest, projection) of a folder run, without loading its features."""
  path = os.path.join(workdir, MANIFEST)
  if not os.path.exists(path):
    raise ValueError(f"{workdir} holds no folder run: {path} is missing")
  config = ml_collections.ConfigDict(read_json_object(os.path.join(workdir, "config.json")))
  projection_path = os.path.join(workdir, "features", "projection.npz")
  if not os.path.exists(projection_path):
    raise ValueError(f"{workdir}: {projection_path} is missing; the run never computed features")
  try:
    projection = PixelProjection.load(projection_path)
  except Exception as error:  # numpy raises several types for a damaged .npz
    raise ValueError(
      f"{projection_path} cannot be read ({type(error).__name__}: {error}); expected the run's "
      "saved projection"
    ) from None
  return config, _read_manifest(path), projection


def read_json_object(path: str) -> dict:
  """A JSON object from `path`.

  Raises:
    ValueError: a missing file, invalid JSON or not an object, naming the file.
  """
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except FileNotFoundError:
    raise ValueError(f"{path} is missing; expected the run's JSON file") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f"{path} is not valid JSON ({error}); expected the run's file") from None
  if not isinstance(value, dict):
    raise ValueError(f"{path} holds a {type(value).__name__}; expected a JSON object")
  return value


def _read_manifest(path: str) -> dict:
  manifest = read_json_object(path)
  if manifest.get("format") != MANIFEST_FORMAT:
    raise ValueError(f"{path}: format {manifest.get('format')!r}; expected {MANIFEST_FORMAT!r}")
  return manifest


def _new_manifest(images, seeds, seed_files, config, category_name, eval_subfolder, log):
  log(f"reading the images under {images}")
  source = folder.open_folder(
    images,
    labels_from_subfolders=eval_subfolder is not None,
    image_size=int(config.image_size),
    log=log,
  )
  if source.skipped:
    log(source.report())
  seed_ids, outside = folder.resolve_seeds(source, seeds)
  paths = list(source.paths) + outside
  seed_ids = seed_ids + list(range(len(source), len(paths)))
  if category_name is None:
    category_name = default_category_name(seeds)
  manifest = {
    "format": MANIFEST_FORMAT,
    "root": source.root,
    "paths": paths,
    "num_folder_images": len(source),
    "seed_files": seed_files,
    "seed_ids": [seed_ids],
    "skipped": [list(s) for s in source.skipped],
    "category_names": [category_name],
    "eval_subfolder": eval_subfolder,
    "image_size": int(config.image_size),
  }
  if eval_subfolder is not None:
    if eval_subfolder not in source.class_names:
      raise ValueError(
        f"eval_subfolder={eval_subfolder!r} is not a top-level sub-folder of {images}; "
        f"expected one of {list(source.class_names)}"
      )
    truth = source.labels() == source.class_names.index(eval_subfolder)
    truth = np.concatenate([truth, np.ones(len(outside), bool)])  # outside seeds are positives
    manifest["ground_truth"] = truth.tolist()
  log(
    f"pool: {len(paths)} images ({len(outside)} seeds from outside the folder), "
    f"{len(seed_ids)} seed positives, {len(source.skipped)} files skipped"
  )
  resized = np.concatenate([source.resized, read_resized(outside, int(config.image_size))])
  return manifest, resized


def _check_budget(config, pool_size: int, num_seeds: int) -> None:
  needed = 2 * (num_seeds + int(config.budget))
  if needed > pool_size:
    raise ValueError(
      f"budget={config.budget} with {num_seeds} seeds needs a pool of at least {needed} images "
      f"(half of it left unlabeled for pseudo-negatives), got {pool_size}; expected a smaller "
      "--budget or more images"
    )


def _features(workdir, manifest, config, resized, log):
  directory = os.path.join(workdir, "features")
  pool_path = os.path.join(directory, "pool.npy")
  projection_path = os.path.join(directory, "projection.npz")
  size = int(config.image_size)
  if not (os.path.exists(pool_path) and os.path.exists(projection_path)):
    log(f"computing stand-in features: pixel PCA of {size}x{size} RGB images")
    if resized is None:  # killed before the features were written: read the pool again
      num_folder = manifest["num_folder_images"]
      files = [
        os.path.join(manifest["root"], *p.split("/")) for p in manifest["paths"][:num_folder]
      ]
      resized = read_resized(files + manifest["paths"][num_folder:], size, log=log)
    fit = resized
    if len(resized) > int(config.pca_fit_images):
      order = np.random.default_rng([int(config.seed), 7]).permutation(len(resized))
      fit = resized[np.sort(order[: int(config.pca_fit_images)])]
    dim = min(int(config.feature_dim), len(fit), size * size * 3)
    if dim < int(config.feature_dim):
      log(f"feature_dim {config.feature_dim} lowered to {dim}: only {len(fit)} images to fit")
    projection = PixelProjection.fit(fit, dim)
    pool = projection.project(resized)
    os.makedirs(directory, exist_ok=True)
    projection.save(projection_path)
    np.save(pool_path + ".tmp.npy", pool)
    os.replace(pool_path + ".tmp.npy", pool_path)
  projection = PixelProjection.load(projection_path)
  pool = np.load(pool_path, mmap_mode="r")
  workdirs.check_features(pool, len(manifest["paths"]), "pool")
  return jnp.asarray(pool), projection


def read_resized(
  files: list[str], size: int, *, log: Callable[[str], None] | None = None
) -> np.ndarray:
  """uint8 [N, size, size, 3] of image files, decoded like `folder.open_folder` does.

  Raises:
    ValueError: a file that does not decode (naming it).
  """

  def read(file):
    try:
      return folder.resize_image(folder.decode_image(file), size)
    except Exception as error:
      raise ValueError(f"image {file!r} does not decode ({error}); expected a JPEG/PNG") from None

  out = np.empty((len(files), size, size, 3), np.uint8)
  with futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    for start in range(0, len(files), 4096):
      for offset, image in enumerate(pool.map(read, files[start : start + 4096])):
        out[start + offset] = image
      if log:
        log(f"resized {min(start + 4096, len(files))}/{len(files)} images")
  return out
