"""The self-supervised start (paper Sec. 4.4): SimCLR pretraining and k-means auxiliary labels.

Without a pretrained model for a domain, M_pre is trained without labels on the pool's images
and the auxiliary labels A_l of background splitting are k-means cluster ids of its features:

  model, state = pretrain_self_supervised(data, ids, deep_settings, ssl_settings, directory,
                                          seed=seed)                     # SimCLR, resumable
  features = updates.embed(model, state, data, pool_ids, store_dir, deep_settings).features
  aux_labels, centroids = cluster_aux_labels(features, ssl_settings.num_clusters, seed=seed)
  m_pre, m_pre_state = classifier_from_clusters(model, state, centroids)

`classifier_from_clusters` turns the trunk and the centroids into a `Classifier` whose head
predicts exactly the nearest centroid, so the rest of Algorithm 1 (embedding with the
auxiliary labels, `init_from_pretrained` giving the auxiliary head its start) runs unchanged.

Pure core: `nt_xent` (per-example losses with a padding mask) and `simclr_step` (same
`TrainState` and batch conventions as `train.pretrain_step`; batch keys `image`, `mask`). Its
randomness is `fold_in(key(seed), state.step)`, so a resumed run sees the same augmentations
and ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.typing import ArrayLike

from rare_jax.data import pipeline
from rare_jax.deep import augment as augment_lib
from rare_jax.deep import kmeans, losses, train, updates
from rare_jax.infra import sharding
from rare_jax.infra.checkpoint import record_or_check
from rare_jax.models import Classifier
from rare_jax.models.simclr import SimCLRModel

SIMCLR_BATCH_KEYS = ("image", "mask")


@dataclasses.dataclass(frozen=True)
class SelfSupSettings:
  """The self-supervised stage's settings (a `config.self_supervised` block).

  Defaults are SimCLR's small-image settings (Chen et al. 2020, CIFAR-10 appendix: temperature
  0.5, a 2-layer projection head) scaled to this project's CPU budget; the optimizer's
  momentum and weight decay come from `updates.DeepSettings`.
  """

  epochs: int = 20
  learning_rate: float = 0.3
  batch_size: int | None = None  # None: DeepSettings.batch_size
  temperature: float = 0.5
  projection_dim: int = 128
  hidden_dim: int | None = None  # None: the trunk's embedding size
  augment: augment_lib.AugmentConfig = augment_lib.DEFAULT_AUGMENT
  num_clusters: int = 100  # k of the auxiliary labels
  kmeans_iterations: int = 100
  kmeans_chunk_size: int = 65536
  # 0: SimCLR trains on each run's own pool, seeded with the run's seed. N > 0: it trains once
  # on N images of the training split drawn with `shared_seed` (independent of the run's seed
  # and categories, as the paper trains Self-ImageNet once), cached in `cache_dir` under a key
  # of its settings and reused by every run with the same ones (`shared_self_supervised`).
  shared_images: int = 0
  shared_seed: int = 0
  cache_dir: str = ""  # "" with shared_images > 0: inside the run's m_pre directory

  def __post_init__(self):
    for name in ("epochs", "projection_dim", "num_clusters", "kmeans_iterations"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"self_supervised.{name} must be >= 1, got {getattr(self, name)!r}")
    if self.num_clusters < 2:  # a Classifier head needs two classes
      raise ValueError(f"self_supervised.num_clusters must be >= 2, got {self.num_clusters}")
    if self.shared_images < 0 or (0 < self.shared_images < 2):
      raise ValueError(
        f"self_supervised.shared_images must be 0 (the pool) or >= 2, got {self.shared_images!r}"
      )
    if self.batch_size is not None and self.batch_size < 2:
      raise ValueError(f"self_supervised.batch_size must be >= 2, got {self.batch_size}")
    if self.temperature <= 0 or self.learning_rate <= 0:
      raise ValueError(
        f"self_supervised.temperature and learning_rate must be > 0, got {self.temperature} "
        f"and {self.learning_rate}"
      )

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> SelfSupSettings:
    values = dict(config)
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown config.self_supervised settings {sorted(unknown)}")
    if "augment" in values:
      crops = dict(values["augment"])
      for name in ("crop_scale", "crop_ratio"):
        if name in crops:
          crops[name] = tuple(crops[name])
      values["augment"] = augment_lib.AugmentConfig(**crops)
    return cls(**values)


def nt_xent(
  z1: ArrayLike, z2: ArrayLike, temperature: float, mask: ArrayLike | None = None
) -> jax.Array:
  """SimCLR's normalized-temperature cross-entropy, per example (Chen et al. 2020, eq. 1).

  Each of the 2B views is an anchor whose positive is the other view of the same image and
  whose negatives are the other 2B - 2 views of real (unmasked) images; similarities are
  cosines divided by `temperature`.

  Args:
    z1, z2: `[B, D]` projections of the two views (row i of both: image i).
    temperature: softmax temperature (> 0).
    mask: `[B]` true for real images; padding rows are neither anchors nor negatives.

  Returns:
    `[B]` float32: the mean of the two anchors' losses of each image, 0 on padding rows.
  """
  z1 = jnp.asarray(z1, jnp.float32)
  z2 = jnp.asarray(z2, jnp.float32)
  if z1.ndim != 2 or z1.shape != z2.shape:
    raise ValueError(f"z1 and z2 must both be [B, D], got {z1.shape} and {z2.shape}")
  batch = z1.shape[0]
  mask = jnp.ones(batch, bool) if mask is None else jnp.asarray(mask).astype(bool)
  if mask.shape != (batch,):
    raise ValueError(f"mask must have shape ({batch},), got {mask.shape}")
  z = jnp.concatenate([z1, z2])
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=1, keepdims=True), 1e-12)
  logits = jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST) / temperature
  valid = jnp.concatenate([mask, mask])
  candidates = valid[None, :] & ~jnp.eye(2 * batch, dtype=bool)
  logits = jnp.where(candidates, logits, -jnp.inf)
  positive = (jnp.arange(2 * batch) + batch) % (2 * batch)
  positive_logit = jnp.take_along_axis(logits, positive[:, None], axis=1)[:, 0]
  per_view = jax.nn.logsumexp(logits, axis=1) - positive_logit
  per_view = jnp.where(valid, per_view, 0.0)
  return jnp.where(mask, 0.5 * (per_view[:batch] + per_view[batch:]), 0.0)


def simclr_step(
  state: train.TrainState,
  batch: Mapping[str, jax.Array],
  *,
  model: Any,
  tx: optax.GradientTransformation,
  temperature: float = 0.5,
  seed: int = 0,
  augment_config: augment_lib.AugmentConfig = augment_lib.DEFAULT_AUGMENT,
) -> tuple[train.TrainState, dict[str, jax.Array]]:
  """One SimCLR step (pure): two augmented views of each image, NT-Xent on the projections.

  Both views go through the model as one batch of 2B rows (BatchNorm statistics over both,
  padding rows masked out of them and of the loss).

  Args:
    state: a `SimCLRModel`'s TrainState.
    batch: `image` [B, H, W, C] float, `mask` [B] bool.
    model: the `SimCLRModel`.
    tx: the optimizer.
    temperature: NT-Xent temperature.
    seed: the augmentations' key is `fold_in(key(seed), state.step)`.
    augment_config: the augmentations.

  Returns:
    (new state, metrics `loss`, `num_examples`, `positive_accuracy` (the positive is the
    most similar view), `grad_norm`).
  """
  train._check_batch(batch, SIMCLR_BATCH_KEYS)
  key = jax.random.fold_in(jax.random.key(seed), state.step)
  view1, view2 = augment_lib.simclr_views(key, batch["image"], augment_config)
  mask = batch["mask"].astype(bool)
  size = mask.shape[0]
  both = {"image": jnp.concatenate([view1, view2]), "mask": jnp.concatenate([mask, mask])}

  def loss_from_outputs(outputs):
    z1, z2 = outputs["projection"][:size], outputs["projection"][size:]
    per_example = nt_xent(z1, z2, temperature, mask)
    z1 = z1 / jnp.maximum(jnp.linalg.norm(z1, axis=1, keepdims=True), 1e-12)
    z2 = z2 / jnp.maximum(jnp.linalg.norm(z2, axis=1, keepdims=True), 1e-12)
    # Top-1 of view 1 among view 2's real rows: how often the positive is the nearest.
    similarity = jnp.where(mask[None, :], z1 @ z2.T, -jnp.inf)
    correct = jnp.argmax(similarity, axis=1) == jnp.arange(size)
    loss = losses.masked_mean(per_example, mask)
    return loss, {
      "loss": loss,
      "num_examples": jnp.sum(mask.astype(jnp.float32)),
      "positive_accuracy": losses.masked_mean(correct, mask),
    }

  return train._gradient_step(state, both, model=model, tx=tx, loss_from_outputs=loss_from_outputs)


def simclr_model(settings: updates.DeepSettings, ssl: SelfSupSettings) -> SimCLRModel:
  return SimCLRModel(
    trunk=settings.trunk(), projection_dim=ssl.projection_dim, hidden_dim=ssl.hidden_dim
  )


def pretrain_self_supervised(
  data: Any,
  ids: ArrayLike,
  settings: updates.DeepSettings,
  ssl: SelfSupSettings,
  directory: str,
  *,
  seed: int,
  log: Callable[[str], None] = print,
) -> tuple[SimCLRModel, train.TrainState]:
  """M_pre without labels: `ssl.epochs` epochs of SimCLR on the images `ids` of `data`.

  Resumable like `updates.pretrain`: per-epoch TrainState checkpoints in `directory`; a killed
  run restarted with the same arguments ends bit-identical to an uninterrupted one.

  Args:
    data: a `Source` or `(images, labels)` arrays (labels are not read), as `data.pipeline`.
    ids: image ids to train on (e.g. the pool's).
    settings: the deep settings (trunk, preprocessing, optimizer momentum/decay, mesh).
    ssl: the self-supervised settings.
    directory: checkpoint folder.
    seed: seeds the initialisation, the epoch order and the augmentations.

  Returns:
    (the `SimCLRModel`, its TrainState); `train.predict` gives its `embedding`.
  """
  ids = np.asarray(ids)
  if ids.ndim != 1 or len(ids) < 2:
    raise ValueError(f"ids must be 1-D with at least 2 images, got shape {ids.shape}")
  if ssl.batch_size is not None:
    settings = dataclasses.replace(settings, batch_size=ssl.batch_size)
  model = simclr_model(settings, ssl)

  def make_batch(indices, mask):
    batch = pipeline.make_batch(data, ids[indices], batch_size=len(indices), **settings.preprocess)
    return {"image": batch["image"], "mask": mask}

  state = updates._train(
    model=model,
    settings=settings,
    data=data,
    num_examples=len(ids),
    epochs=ssl.epochs,
    learning_rate=ssl.learning_rate,
    step_fn=functools.partial(
      simclr_step, temperature=ssl.temperature, seed=seed, augment_config=ssl.augment
    ),
    make_batch=make_batch,
    directory=directory,
    seed=seed,
    initial_variables=None,
    log=log,
    what="self-supervised M_pre",
  )
  return model, state


SHARED_FORMAT = "rare_jax.shared_simclr/1"
# DeepSettings fields that the SimCLR stage never reads (the deep updates' and the supervised
# pretraining's); every other field is part of a shared model's key.
_NOT_SSL_FIELDS = (
  "init",
  "embed_batch_size",
  "pretrain_epochs",
  "pretrain_learning_rate",
  "epochs",
  "learning_rate",
  "aux_weight",
  "main_head_init",
  "warm_start",
)
# SelfSupSettings fields that do not change the trained model (the clustering after it, where
# it is stored).
_NOT_TRAINING_FIELDS = ("num_clusters", "kmeans_iterations", "kmeans_chunk_size", "cache_dir")


def shared_image_ids(num_examples: int, ssl: SelfSupSettings) -> np.ndarray:
  """The `ssl.shared_images` training-split ids a shared SimCLR model trains on (sorted)."""
  if not 2 <= ssl.shared_images <= num_examples:
    raise ValueError(
      f"self_supervised.shared_images={ssl.shared_images}: expected 2..{num_examples} (the "
      "training split's size)"
    )
  rng = np.random.default_rng(ssl.shared_seed)
  return np.sort(rng.choice(num_examples, ssl.shared_images, replace=False))


def shared_settings(
  dataset: str, split: str, ids: np.ndarray, settings: updates.DeepSettings, ssl: SelfSupSettings
) -> dict:
  """Everything a shared SimCLR model depends on, as JSON data (its cache key's source)."""
  deep_fields = {k: v for k, v in dataclasses.asdict(settings).items() if k not in _NOT_SSL_FIELDS}
  ssl_fields = {k: v for k, v in dataclasses.asdict(ssl).items() if k not in _NOT_TRAINING_FIELDS}
  ids = np.ascontiguousarray(ids, np.int64)
  record = {
    "format": SHARED_FORMAT,
    "dataset": dataset,
    "split": split,
    "num_images": len(ids),
    "ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
    "deep": deep_fields,
    "self_supervised": ssl_fields,
  }
  return json.loads(json.dumps(record, sort_keys=True))  # tuples -> lists, as read back


def shared_key(record: Mapping) -> str:
  return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def shared_model_key(
  *,
  dataset: str,
  split: str,
  num_examples: int,
  settings: updates.DeepSettings,
  ssl: SelfSupSettings,
) -> str:
  """The cache key `shared_self_supervised` trains and stores these settings' model under."""
  ids = shared_image_ids(num_examples, ssl)
  return shared_key(shared_settings(dataset, split, ids, settings, ssl))


def shared_self_supervised(
  data: Any,
  *,
  dataset: str,
  split: str,
  num_examples: int,
  settings: updates.DeepSettings,
  ssl: SelfSupSettings,
  cache_dir: str,
  log: Callable[[str], None] = print,
) -> tuple[SimCLRModel, train.TrainState, str]:
  """One SimCLR M_pre for every run with these settings: trained once, cached, reused.

  Trains on `shared_image_ids` of the split `data` holds (`num_examples` images), seeded
  with `ssl.shared_seed`, in `cache_dir/<key>/`; the key hashes `shared_settings` (dataset,
  split, the image ids, every deep and self-supervised setting the training reads). A
  finished model is restored without training; an interrupted one resumes (bit-identical,
  as `pretrain_self_supervised`); other settings get another key, so another directory.
  `<key>/settings.json` records the settings; a directory recording others is refused.

  Returns:
    (the `SimCLRModel`, its TrainState, the key).

  Raises:
    ValueError: `shared_images` out of range, or the cached directory records other settings.
  """
  ids = shared_image_ids(num_examples, ssl)
  record = shared_settings(dataset, split, ids, settings, ssl)
  key = shared_key(record)
  directory = os.path.join(cache_dir, key)
  os.makedirs(directory, exist_ok=True)
  settings_json = os.path.join(directory, "settings.json")
  sharding.primary_first(
    lambda: record_or_check(settings_json, record, what="shared self-supervised M_pre"),
    f"selfsup:shared:{os.path.abspath(settings_json)}",
  )
  log(f"shared self-supervised M_pre {key}: {len(ids)} {dataset}/{split} images ({directory})")
  model, state = pretrain_self_supervised(
    data, ids, settings, ssl, os.path.join(directory, "simclr"), seed=ssl.shared_seed, log=log
  )
  return model, state, key


def cluster_aux_labels(
  features: ArrayLike,
  num_clusters: int,
  *,
  seed: int,
  max_iterations: int = 100,
  num_init: int = 1,
  chunk_size: int | None = 65536,
) -> tuple[np.ndarray, np.ndarray]:
  """The self-supervised start's auxiliary labels: k-means cluster ids of the pool's features.

  Clusters the raw embeddings (not normalised), so that `classifier_from_clusters`'s linear
  head reproduces the assignment exactly.

  Args:
    features: `[P, D]` embeddings of the pool (e.g. a `FeatureStore`'s `features`).
    num_clusters: k (number of auxiliary classes).
    seed: seeds k-means++.
    max_iterations, num_init, chunk_size: see `kmeans.kmeans`.

  Returns:
    (cluster ids int32 `[P]`, centroids float32 `[k, D]`) as host arrays.
  """
  features = np.asarray(features, np.float32)
  kmeans.check_inputs(features, num_clusters)
  cluster = jax.jit(
    functools.partial(
      kmeans.kmeans,
      num_clusters=num_clusters,
      max_iterations=max_iterations,
      num_init=num_init,
      chunk_size=chunk_size,
    )
  )
  result = cluster(jax.random.key(seed), features)
  return np.asarray(result.assignments, np.int32), np.asarray(result.centroids, np.float32)


def classifier_from_clusters(
  model: SimCLRModel, state: train.TrainState, centroids: ArrayLike
) -> tuple[Classifier, train.TrainState]:
  """A `Classifier` (M_pre) from the SimCLR trunk whose head picks the nearest centroid.

  The head's logits are `2 x.c_k - |c_k|^2 = |x|^2 - |x - c_k|^2`, so its argmax (the hard
  auxiliary labels of `train.predict`) is the k-means assignment, and `init_from_pretrained`
  starts the auxiliary head of background splitting from it as the paper starts it from
  M_pre's classifier. The projection head is dropped.

  Returns:
    (the `Classifier`, a TrainState of its variables at the SimCLR state's step, with an
    empty optimizer state: for `updates.embed` / `train.predict`, not for further training).
  """
  centroids = jnp.asarray(centroids, jnp.float32)
  if centroids.ndim != 2 or centroids.shape[0] < 2:
    raise ValueError(f"centroids must be [k, D] with k >= 2, got shape {centroids.shape}")
  trunk_params = state.params["trunk"]
  dim = int(state.params["hidden"]["kernel"].shape[0])
  if centroids.shape[1] != dim:
    raise ValueError(f"centroids have dimension {centroids.shape[1]}; the trunk's is {dim}")
  head = {"kernel": 2.0 * centroids.T, "bias": -jnp.sum(centroids**2, axis=1)}
  classifier = Classifier(trunk=model.trunk, num_classes=int(centroids.shape[0]))
  batch_stats = {"trunk": state.batch_stats["trunk"]} if "trunk" in state.batch_stats else {}
  return classifier, train.TrainState(
    step=state.step,
    params={"trunk": trunk_params, "head": head},
    batch_stats=batch_stats,
    opt_state=(),
  )
