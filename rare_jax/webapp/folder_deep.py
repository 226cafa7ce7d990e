"""Deep updates of a folder run: background splitting on a person's own images.

A "pretrained" folder run (`folder_run.py`) can retrain its trunk from the labels given so far
(Algorithm 1 lines 19-20, `updates.DeepUpdater`): M_pre is the run's pretrained trunk with its
ImageNet classifier, the auxiliary labels A_l are that classifier's ImageNet argmax over the
pool (computed from the cached pool embeddings: the head is one Dense layer), and the training
set is the union over categories of L_p, L_n and W_n. The images are the pool squeezed to the
run's `image_size` (the size of its features), cached as uint8 in
`WORKDIR/features/pixels_{S}.npy`. Update i is saved like a TFDS run's: TrainState checkpoints
per epoch in `WORKDIR/labeling/deep/v{i}`, the re-embedded pool in
`WORKDIR/labeling/features/v{i}/pool`, so a killed update resumes from its last epoch and
embedded chunk (deterministic: seeded epochs, `seed * 1000 + i`).

Without `eval_subfolder` there is no validation set; the updater embeds one pool image as a
placeholder (a feature store holds at least one row) and reports no deep-head metrics.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable

import ml_collections
import numpy as np

from rare_jax import workdirs
from rare_jax.deep import trunk_features, updates
from rare_jax.models import pretrained
from rare_jax.webapp import folder_run


class FolderTask:
  """What `updates.DeepUpdater` reads of a task, for a folder run's pool."""

  def __init__(self, names: list[str], pool_size: int, truth: np.ndarray | None):
    self.categories = tuple(names)
    self.pool_ids = np.arange(pool_size)
    self._truth = None if truth is None else np.asarray(truth, bool)
    # At least one validation row (see the module docstring); sliced off when there is no truth.
    self.val_ids = np.arange(pool_size if truth is not None else 1)
    self.val_weights = None  # A folder's validation images all weigh 1.

  def ground_truth(self) -> np.ndarray:
    if self._truth is None:  # pseudo-label error rates: nothing known, all zero
      return np.zeros((len(self.categories), len(self.pool_ids)), bool)
    return self._truth

  def val_ground_truth(self) -> np.ndarray:
    if self._truth is None:
      return np.zeros((len(self.categories), 0), bool)
    return self._truth


class FolderDeepUpdater(updates.DeepUpdater):
  """`updates.DeepUpdater` on a folder run (see the module docstring)."""

  def __init__(self, *, has_validation: bool, load_pixels: Callable[[], np.ndarray], **kwargs):
    super().__init__(data=None, **kwargs)
    self.has_validation = has_validation
    self._load_pixels = load_pixels

  def _ensure_data(self) -> None:
    # The pool's pixels are read when an update first needs them, not at start-up.
    if self.data is None:
      images = self._load_pixels()
      labels = np.zeros(len(images), np.int64)
      self.data = updates.ImageData(train=(images, labels), eval=(images, labels))

  def update(self, state, version: int):
    self._ensure_data()
    return super().update(state, version)

  def trained_variables(self, version: int) -> dict:
    self._ensure_data()
    return super().trained_variables(version)

  def features(self, version: int):
    pool, val = super().features(version)
    return (pool, val) if self.has_validation else (pool, val[:0])

  def evaluate(self, version: int) -> dict:
    if not self.has_validation:
      return {}
    return super().evaluate(version)


def settings(config: ml_collections.ConfigDict) -> updates.DeepSettings:
  """The deep model of a folder run's config (`folder_run.make_config`: deep_epochs, ...)."""
  lite = config.model.startswith("efficientnet")
  return updates.DeepSettings(
    model=config.model,
    init=config.init,
    image_size=None,  # the cached pixels are at the features' size already
    channels=3,
    batch_size=int(config.deep_batch_size),
    embed_batch_size=int(config.embed_batch_size),
    epochs=int(config.deep_epochs),
    learning_rate=float(config.deep_learning_rate),
    frozen_blocks=int(config.deep_frozen_blocks) if lite else 0,
    freeze_batchnorm=lite,
    warmup_fraction=0.0,
  )


def pixels(run: folder_run.FolderRun, log: Callable[[str], None] = print) -> np.ndarray:
  """uint8 [P, S, S, 3]: the pool at the run's image size (cached in the workdir)."""
  size = int(run.config.image_size)
  path = os.path.join(run.workdir, "features", f"pixels_{size}.npy")
  if not os.path.exists(path):
    log(f"deep update: reading the {run.pool_size} pool images at {size}x{size}")
    images = folder_run.read_resized(folder_run.pool_files(run.manifest), size)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path + ".tmp.npy", images)
    os.replace(path + ".tmp.npy", path)
  images = np.load(path, mmap_mode="r")
  if images.shape != (run.pool_size, size, size, 3):
    raise ValueError(
      f"{path} holds images {images.shape}; expected {(run.pool_size, size, size, 3)} (delete "
      "it to read the pool again)"
    )
  return images


def make_updater(
  run: folder_run.FolderRun, *, log: Callable[[str], None] = print
) -> FolderDeepUpdater:
  """The deep updater of a "pretrained" folder run.

  Raises:
    ValueError: a pixel-PCA run (no network to update), or missing weights.
  """
  config = run.config
  if config.features != "pretrained":
    raise ValueError(
      f"deep updates need features='pretrained', got {folder_run.features_of(config)!r}"
    )
  deep_settings = settings(config)
  weights = trunk_features.weights_file(config.model, config.init)
  _, m_pre = pretrained.load_classifier(config.model, weights, **deep_settings.trunk_kwargs())
  store = trunk_features.embed_lib.FeatureStore.open(folder_run.pool_store_dir(run.workdir))
  raw_pool = np.asarray(store.features, np.float32)
  head = m_pre["params"]["head"]
  logits = raw_pool @ np.asarray(head["kernel"], np.float32) + np.asarray(head["bias"], np.float32)
  aux_labels = np.argmax(logits, axis=1)  # ImageNet argmax: A_l, as m_pre.py for TFDS runs
  truth = None
  if run.manifest.get("eval_subfolder") is not None:
    truth = np.asarray(run.manifest["ground_truth"], bool)[None, :]
  task = FolderTask(run.category_names, run.pool_size, truth)
  mode = config.feature_normalization
  return FolderDeepUpdater(
    has_validation=truth is not None,
    run_dir=run.run_dir,
    settings=deep_settings,
    task=task,
    load_pixels=lambda: pixels(run, log),
    m_pre_variables=m_pre,
    num_aux_classes=pretrained.spec(config.model).num_classes,
    aux_labels=aux_labels,
    base_features=(run.features, run.val_features),
    seed=int(config.seed),
    normalize=lambda pool, val: workdirs.normalize_features(pool, val, mode),
    statistics=lambda pool: workdirs.feature_statistics(pool, mode),
    base_raw_pool=raw_pool,
    log=log,
  )


def discard_versions_after(run_dir: str, version: int) -> list[int]:
  """Deletes the files of deep updates after `version` (trained models, re-embedded pools,
  pseudo-label records) of a folder run's directory: after a corrected answer they were
  trained on a wrong label, and the replay trains them again. Returns the versions dropped.
  """
  found = set()
  for parent, pattern in (("deep", r"v(\d+)(_pseudo_labels\.json)?"), ("features", r"v(\d+)")):
    directory = os.path.join(run_dir, parent)
    if not os.path.isdir(directory):
      continue
    for name in os.listdir(directory):
      match = re.fullmatch(pattern, name)
      if match and int(match.group(1)) > version:
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
          shutil.rmtree(path)
        else:
          os.remove(path)
        found.add(int(match.group(1)))
  return sorted(found)
