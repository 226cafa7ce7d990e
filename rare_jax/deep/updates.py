"""The deep half of Algorithm 1: M_pre, cached features and auxiliary labels, trainBGSplit.

Lines 1-2: `pretrain` trains `M_pre` (a `Classifier`) on the task's related-domain split;
`embed` caches pool and validation embeddings (and M_pre's hard predictions, the auxiliary
labels A_l) in on-disk feature stores. Lines 19-20: `bgsplit_update` continues the deep model
from M_{i-1} for E epochs on the union over categories of L_p, L_n and W_n, with the auxiliary
head's cross-entropy on A_l; `DeepUpdater` then re-embeds the pool and validation set.

Everything resumes: training from its per-epoch TrainState checkpoints, embedding from the
store's recorded progress, so a killed run loses at most an epoch or a chunk of rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rare_jax import models
from rare_jax.active import metrics
from rare_jax.data import pipeline, tasks
from rare_jax.deep import embed as embed_lib
from rare_jax.deep import inference, train
from rare_jax.infra import sharding
from rare_jax.infra.checkpoint import CheckpointStore, write_json_atomic
from rare_jax.models import efficientnet, pretrained

MAIN_HEAD_INITS = ("linear", "linear_first", "random")


@dataclasses.dataclass(frozen=True)
class DeepSettings:
  """The deep model's settings (config.deep); defaults are the authors' trainer (docs/method.md)."""

  model: str = "resnet50"
  # Where M_pre comes from (rare_jax.deep.m_pre): "" trains it on the related-domain split,
  # "imagenet" loads the trunk's packaged ImageNet weights, a path loads a .pth/.safetensors,
  # "self_supervised" trains it with SimCLR on the pool (config.self_supervised).
  init: str = ""
  image_size: int | None = None  # None: the dataset's size
  channels: int | None = None  # 3 expands grayscale; None: 3 for pretrained trunks
  mean: float | tuple | None = None  # None: the pretrained trunk's, else 0
  std: float | tuple | None = None  # None: the pretrained trunk's, else 1
  depthwise: str = "auto"  # EfficientNet-Lite depthwise convs: auto / native / shifted
  # EfficientNet-Lite: the stem and the first `frozen_blocks` blocks are not trained by the
  # deep updates (0: full fine-tuning, the paper's; see docs/reproducing.md for the demo's).
  frozen_blocks: int = 0
  # EfficientNet-Lite: BatchNorm keeps its running statistics during the deep updates.
  freeze_batchnorm: bool = False
  compute_dtype: str = "float32"  # or "bfloat16" (parameters stay float32)
  batch_size: int = 128
  embed_batch_size: int = 512
  pretrain_epochs: int = 10
  pretrain_learning_rate: float = 0.1
  epochs: int = 15  # E
  learning_rate: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 1e-4
  warmup_fraction: float = 0.1
  aux_weight: float = 0.1
  # The main head at the start of an update (`folds_linear_head`). An update that starts
  # from M_pre (the first; every one without `warm_start`) gets:
  #   "random": a freshly initialised head (the paper's; it leaves the head predicting no
  #     positive after a few epochs at ~1% positives);
  #   "linear" or "linear_first": the loop's linear models fitted on M_pre's features,
  #     folded onto the embedding (docs/reproducing.md).
  # An update that continues M_{i-1} (`warm_start`, after the first) keeps M_{i-1}'s own head,
  # except with "linear", which re-folds the loop's current linear models (fitted on M_{i-1}'s
  # features) into it.
  main_head_init: str = "linear"
  # Algorithm 1 line 19 continues M_{i-1} (True, the paper's). False starts every update
  # from M_pre again, on all the labels so far (docs/reproducing.md; cf. Ash & Adams, "On
  # Warm-Starting Neural Network Training", NeurIPS 2020).
  warm_start: bool = True
  mesh: tuple = (("data", -1),)

  def __post_init__(self):
    if self.model not in models.MODELS:
      raise ValueError(f"deep.model must be one of {sorted(models.MODELS)}, got {self.model!r}")
    if self.has_pretrained_weights:
      if self.model not in pretrained.PRETRAINED:
        raise ValueError(
          f"deep.init={self.init!r} needs a trunk with pretrained weights, one of "
          f"{sorted(pretrained.PRETRAINED)}; got deep.model={self.model!r}"
        )
      if self.init != "imagenet" and not os.path.isfile(self.init):
        raise ValueError(
          f"deep.init={self.init!r}: expected 'imagenet', 'self_supervised', '' (train M_pre "
          "on the related split) or an existing .pth / .safetensors file"
        )
      if self.channels not in (None, 3):
        raise ValueError(f"deep.channels={self.channels!r}: pretrained trunks take 3 channels")
    if self.depthwise not in efficientnet.DEPTHWISE_MODES:
      raise ValueError(
        f"deep.depthwise must be one of {efficientnet.DEPTHWISE_MODES}, got {self.depthwise!r}"
      )
    if self.compute_dtype not in ("float32", "bfloat16"):
      raise ValueError(
        f"deep.compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}"
      )
    for name in ("batch_size", "embed_batch_size", "pretrain_epochs", "epochs"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"deep.{name} must be >= 1, got {getattr(self, name)!r}")
    if not 0 <= self.warmup_fraction < 1:
      raise ValueError(f"deep.warmup_fraction must be in [0, 1), got {self.warmup_fraction!r}")
    if (self.frozen_blocks or self.freeze_batchnorm) and not self.model.startswith("efficientnet"):
      raise ValueError(
        "deep.frozen_blocks / deep.freeze_batchnorm are supported for EfficientNet-Lite trunks "
        f"only, got deep.model={self.model!r}"
      )
    if self.main_head_init not in MAIN_HEAD_INITS:
      raise ValueError(
        f"deep.main_head_init must be one of {MAIN_HEAD_INITS}, got {self.main_head_init!r}"
      )
    if self.aux_weight < 0:
      raise ValueError(f"deep.aux_weight must be >= 0, got {self.aux_weight!r}")
    if not isinstance(self.warm_start, bool):
      raise ValueError(f"deep.warm_start must be True or False, got {self.warm_start!r}")

  @classmethod
  def from_config(cls, deep: ml_collections.ConfigDict) -> DeepSettings:
    values = dict(deep)
    values["mesh"] = tuple(tuple(axis) for axis in values.get("mesh", cls.mesh))
    for name in ("mean", "std"):
      if isinstance(values.get(name), list | tuple):
        values[name] = tuple(float(v) for v in values[name])
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown config.deep settings {sorted(unknown)}")
    return cls(**values)

  @property
  def has_pretrained_weights(self) -> bool:
    """True when M_pre's weights come from a package or a file ("imagenet" or a path)."""
    return self.init not in ("", "self_supervised")

  @property
  def dtype(self):
    return jnp.bfloat16 if self.compute_dtype == "bfloat16" else jnp.float32

  def trunk_kwargs(self) -> dict:
    if self.model.startswith("efficientnet"):
      return {
        "depthwise": self.depthwise,
        "frozen_blocks": int(self.frozen_blocks),
        "freeze_batchnorm": bool(self.freeze_batchnorm),
      }
    return {}

  def trunk(self):
    return models.get_trunk(self.model, dtype=self.dtype, **self.trunk_kwargs())

  @property
  def preprocess(self) -> dict:
    """Options of `pipeline.preprocess`; a pretrained trunk's own mean/std unless set."""
    spec = pretrained.spec(self.model) if self.has_pretrained_weights else None
    mean, std, channels = self.mean, self.std, self.channels
    if mean is None:
      mean = spec.mean if spec else 0.0
    if std is None:
      std = spec.std if spec else 1.0
    if channels is None and spec is not None:
      channels = 3
    return dict(image_size=self.image_size, channels=channels, mean=mean, std=std)


@dataclasses.dataclass(frozen=True)
class ImageData:
  """The task's images: each a `Source` or `(images, labels)` arrays (see data.pipeline)."""

  train: Any
  eval: Any


@dataclasses.dataclass(frozen=True)
class TrainingSet:
  """One deep update's examples: the union over categories of L_p, L_n and W_n.

  Attributes:
    pool_positions: `[n]` pool positions.
    labels: `[n, C]` float: 1 for L_p, 0 for L_n and W_n.
    label_mask: `[n, C]` bool: where image n has a (human or pseudo) label for category c.
    aux_labels: `[n]` int, A_l of each image.
    label_weights: optional `[n, C]` float BCE weight of each label (None: all 1); set for
      strategies whose pseudo-labels carry a certainty (DeepProp).
  """

  pool_positions: np.ndarray
  labels: np.ndarray
  label_mask: np.ndarray
  aux_labels: np.ndarray
  label_weights: np.ndarray | None = None


def training_set(
  labels: np.ndarray,
  pseudo_negative: np.ndarray,
  aux_labels: np.ndarray,
  *,
  pseudo_positive: np.ndarray | None = None,
  pseudo_weights: np.ndarray | None = None,
):
  """`TrainingSet` from a LoopState's `[C, P]` labels and pseudo-labels.

  Args:
    labels: `[C, P]` int: 1 positive, 0 negative, -1 unknown (human labels).
    pseudo_negative: `[C, P]` bool (W_n); ignored on labeled images.
    aux_labels: `[P]` A_l.
    pseudo_positive: optional `[C, P]` bool pseudo-positives (KD-Semi, DeepProp); ignored on
      labeled images, and they win over a pseudo-negative of the same (image, category).
    pseudo_weights: optional `[C, P]` float weights of the pseudo-labels (human labels always
      weigh 1); None weighs every label 1 and leaves `label_weights` None.
  """
  labels = np.asarray(labels)
  unlabeled = labels < 0
  positive = np.zeros_like(unlabeled) if pseudo_positive is None else np.asarray(pseudo_positive)
  positive = positive.astype(bool) & unlabeled
  negative = np.asarray(pseudo_negative).astype(bool) & unlabeled & ~positive
  member = ~unlabeled | positive | negative
  positions = np.flatnonzero(member.any(axis=0))
  weights = None
  if pseudo_weights is not None:
    weights = np.where(unlabeled, np.asarray(pseudo_weights, np.float32), 1.0)
    weights = np.where(member, weights, 0.0)[:, positions].T.astype(np.float32)
  return TrainingSet(
    pool_positions=positions,
    labels=((labels == 1) | positive)[:, positions].T.astype(np.float32),
    label_mask=member[:, positions].T.copy(),
    aux_labels=np.asarray(aux_labels)[positions].astype(np.int32),
    label_weights=weights,
  )


def input_shape(settings: DeepSettings, data) -> tuple[int, ...]:
  """`(1, H, W, C)` of the model's input after preprocessing."""
  sample = pipeline.make_batch(data, np.array([0]), batch_size=1, **settings.preprocess)
  return (1, *sample["image"].shape[1:])


def make_mesh(settings: DeepSettings):
  return sharding.make_mesh(settings.mesh)


def _train(
  *,
  model,
  settings: DeepSettings,
  data,
  num_examples: int,
  epochs: int,
  learning_rate: float,
  step_fn,
  make_batch: Callable[[np.ndarray, np.ndarray], dict],  # rows of a batch (this process's)
  directory: str,
  seed: int,
  initial_variables: dict | None,
  log: Callable[[str], None],
  what: str,
  step_model=None,
):
  """Shared driver of pretraining and BG-split updates: seeded epochs, resumable, logged.

  The variables are `model`'s (made for `data`'s images); the steps apply `step_model`
  (default `model`), e.g. its trainable part reading cached frozen activations."""
  mesh = make_mesh(settings)
  steps_per_epoch = math.ceil(num_examples / settings.batch_size)
  total = epochs * steps_per_epoch
  tx = train.make_optimizer(
    learning_rate=learning_rate,
    momentum=settings.momentum,
    weight_decay=settings.weight_decay,
    warmup_steps=int(settings.warmup_fraction * total),
    total_steps=total,
    frozen=train.frozen_mask(model),
  )
  state, shardings = train.init_sharded_state(
    # RBG keys: threefry initialisers were measured to compile ~2.5 s per call on CPU.
    jax.random.key(seed, impl="rbg"),
    model=model,
    tx=tx,
    input_shape=input_shape(settings, data),
    mesh=mesh,
  )
  if initial_variables is not None:
    # Copies: the step donates its state, and device_put may alias the caller's buffers
    # (M_pre's variables, which every update and replay starts from again).
    state = state.replace(
      params=jax.device_put(jax.tree.map(jnp.copy, initial_variables["params"]), shardings.params),
      batch_stats=jax.device_put(
        jax.tree.map(jnp.copy, initial_variables["batch_stats"]), shardings.batch_stats
      ),
    )
  step = train.jit_step(
    step_fn, mesh=mesh, state_shardings=shardings, model=step_model or model, tx=tx
  )

  local = sharding.process_shard(np.arange(settings.batch_size))

  def get_batch(step_index: int) -> dict:
    indices, mask = train.step_batch_indices(
      num_examples, settings.batch_size, step_index, seed=seed
    )
    # Multi-host: this process loads only its rows of the global batch.
    return make_batch(indices[local], mask[local])

  # The next steps' batches are read and decoded in a grain thread while this one trains.
  get_batch = pipeline.StepBatches(get_batch, end=total)
  with CheckpointStore(directory) as store, contextlib.closing(get_batch):
    latest = store.latest_step()
    if latest is not None:
      if latest > total:
        raise ValueError(
          f"{directory} holds training step {latest}, beyond this run's {total} steps "
          f"({epochs} epochs of {steps_per_epoch}); it belongs to other settings"
        )
      state, _ = train.restore_train_state(store, state, step=latest)
    # Epochs already done (a finished or interrupted earlier run) are not trained again.
    for epoch in range(int(jax.device_get(state.step)) // steps_per_epoch, epochs):
      start = time.perf_counter()
      done_before = int(jax.device_get(state.step))
      state, history = train.fit(
        state,
        get_batch,
        step_fn=step,
        mesh=mesh,
        end_step=(epoch + 1) * steps_per_epoch,
        store=store,
        save_every=steps_per_epoch,
        log_every=None,
      )
      if history:
        seconds = time.perf_counter() - start
        images = (int(jax.device_get(state.step)) - done_before) * settings.batch_size
        summary = " ".join(
          f"{k} {np.mean([h[k] for h in history]):.4f}"
          for k in sorted(history[0])
          if k in ("loss", "accuracy", "main_loss", "aux_loss")
        )
        log(f"{what}: epoch {epoch + 1}/{epochs} | {summary} | {images / seconds:.0f} img/s")
  return state


def pretrain(
  task: tasks.RareTask,
  data: ImageData,
  settings: DeepSettings,
  directory: str,
  *,
  seed: int,
  log: Callable[[str], None] = print,
) -> tuple[models.Classifier, train.TrainState]:
  """Algorithm 1's M_pre: supervised training on the related-domain split (non-rare classes).

  Returns:
    (the `Classifier`, its TrainState). Labels are the positions of `task.related_classes`.
  """
  classes = np.asarray(task.related_classes)
  remap = np.full(task.num_classes, -1, np.int64)
  remap[classes] = np.arange(len(classes))
  labels = remap[task.pretrain_labels]
  model = models.Classifier(trunk=settings.trunk(), num_classes=len(classes))
  ids = task.pretrain_ids

  def make_batch(indices, mask):
    batch = pipeline.make_batch(
      data.train, ids[indices], batch_size=len(indices), **settings.preprocess
    )
    return {"image": batch["image"], "label": labels[indices], "mask": mask}

  state = _train(
    model=model,
    settings=settings,
    data=data.train,
    num_examples=len(ids),
    epochs=settings.pretrain_epochs,
    learning_rate=settings.pretrain_learning_rate,
    step_fn=train.pretrain_step,
    make_batch=make_batch,
    directory=directory,
    seed=seed,
    initial_variables=None,
    log=log,
    what="pretrain M_pre",
  )
  return model, state


def bgsplit_model(settings: DeepSettings, num_categories: int, num_aux_classes: int):
  return models.BGSplitModel(
    trunk=settings.trunk(), num_categories=num_categories, num_aux_classes=num_aux_classes
  )


def bgsplit_update(
  *,
  model: models.BGSplitModel,
  start_variables: dict,
  examples: TrainingSet,
  pool_ids: np.ndarray,
  data: ImageData,
  settings: DeepSettings,
  directory: str,
  seed: int,
  log: Callable[[str], None] = print,
  what: str = "trainBGSplit",
  frozen: np.ndarray | None = None,
) -> train.TrainState:
  """Algorithm 1 line 19: E epochs of background splitting from `start_variables` (M_{i-1}).

  `frozen`: the pool's cached frozen activations (`frozen_inputs`, row = pool position); the
  steps then run `model`'s trainable part on them instead of the whole network on images
  (the same values: the frozen part is a fixed function of the image).
  """
  if len(examples.pool_positions) == 0:
    raise ValueError("trainBGSplit needs at least one labeled or pseudo-labeled image")
  image_ids = np.asarray(pool_ids)[examples.pool_positions]
  step_model = model if frozen is None else trainable_part(model)

  def make_batch(indices, mask):
    if frozen is None:
      images = pipeline.make_batch(
        data.train, image_ids[indices], batch_size=len(indices), **settings.preprocess
      )["image"]
    else:
      images = np.asarray(frozen[examples.pool_positions[indices]], np.float32)
    batch = {
      "image": images,
      "labels": examples.labels[indices],
      "label_mask": examples.label_mask[indices] & mask[:, None],
      "aux_labels": examples.aux_labels[indices],
      "mask": mask,
    }
    if examples.label_weights is not None:
      batch["label_weights"] = examples.label_weights[indices]
    return batch

  return _train(
    model=model,
    settings=settings,
    data=data.train,
    num_examples=len(image_ids),
    epochs=settings.epochs,
    learning_rate=settings.learning_rate,
    step_fn=functools.partial(train.train_step, aux_weight=settings.aux_weight),
    make_batch=make_batch,
    directory=directory,
    seed=seed,
    initial_variables=start_variables,
    log=log,
    what=what,
    step_model=step_model,
  )


def caches_frozen_part(settings: DeepSettings) -> bool:
  """Whether updates train and re-embed from cached frozen activations: an EfficientNet-Lite
  trunk with `frozen_blocks` > 0, whose stem and first blocks are a fixed function of the image
  in every update (no gradient, BatchNorm on its running statistics)."""
  return settings.model.startswith("efficientnet") and int(settings.frozen_blocks) > 0


def trainable_part(model: models.BGSplitModel) -> models.BGSplitModel:
  """`model` reading the frozen blocks' output instead of images (same variables)."""
  return model.clone(trunk=model.trunk.clone(part="trainable"))


def frozen_inputs(
  settings: DeepSettings,
  variables: dict,
  data,
  ids: np.ndarray,
  store_dir: str,
  *,
  log: Callable[[str], None] | None = None,
) -> np.ndarray:
  """`[N, h, w, c]` float32 (memory-mapped): the output of the trunk's frozen part (stem and
  the first `frozen_blocks` blocks) on images `ids` of `data`, computed once into `store_dir`
  (resumable) from `variables` (any model's `{"params", "batch_stats"}` with a "trunk")."""
  if not caches_frozen_part(settings):
    raise ValueError(
      f"deep.model={settings.model!r} with frozen_blocks={settings.frozen_blocks} has no "
      "frozen part to cache; expected an EfficientNet-Lite trunk with frozen_blocks >= 1"
    )
  trunk = settings.trunk().clone(part="frozen")
  tree = {k: {"trunk": variables[k]["trunk"]} for k in ("params", "batch_stats")}
  shape = jax.eval_shape(
    functools.partial(trunk.apply, {k: v["trunk"] for k, v in tree.items()}),
    jax.ShapeDtypeStruct(input_shape(settings, data), jnp.float32),
  ).shape[1:]
  mesh = make_mesh(settings)
  state = jax.device_put(
    train.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=tree["params"],
      batch_stats=tree["batch_stats"],
      opt_state=(),
    ),
    sharding.replicated(mesh),
  )
  embed(models.TrunkOutput(trunk=trunk), state, data, ids, store_dir, settings, log=log)
  store = embed_lib.FeatureStore.open(store_dir)
  if not store.complete or store.num_rows != len(ids):
    raise ValueError(f"{store_dir}: incomplete frozen activations ({store.num_rows} rows)")
  return store.features.reshape(len(ids), *shape)


def embed(
  model,
  state: train.TrainState,
  data,
  ids: np.ndarray,
  store_dir: str,
  settings: DeepSettings,
  *,
  outputs: tuple[str, ...] = ("embedding",),
  log: Callable[[str], None] | None = None,
  inputs: np.ndarray | None = None,
  folded: bool = True,
) -> embed_lib.FeatureStore:
  """Cached features of `ids` (resumable), with the model's other `outputs` per row; progress
  goes to `log` (None: absl logging).

  `inputs`: the model's float inputs `[N, ...]` (e.g. cached frozen activations for the
  trainable part), indexed by `ids` instead of reading images from `data`.
  `folded`: EfficientNet-Lite models run with BatchNorm folded, in micro-batches on the CPU
  (`rare_jax.deep.inference`: the same outputs up to float32 rounding, about 2x faster at the
  demo's setting); False, or a model it does not serve, runs the Flax model (`train.predict`)."""
  mesh = make_mesh(settings)
  predict = inference.folded_predict(model, state, mesh) if folded else None
  if predict is None:
    shardings = jax.tree.map(lambda x: x.sharding, state)
    predict = train.jit_predict(model=model, mesh=mesh, state_shardings=shardings)
  predict_fn = embed_lib.make_predict_fn(state, predict=predict, mesh=mesh, outputs=outputs)
  ids = np.asarray(ids)
  size = settings.embed_batch_size

  def batches(first_batch: int):
    if inputs is not None:
      return _array_batches(inputs, ids, size, first_batch)
    if jax.process_count() == 1:
      return pipeline.iterate_batches(
        data, ids[first_batch * size :], batch_size=size, **settings.preprocess
      )
    # Multi-host: this process loads only its rows of each batch (make_predict_fn gathers).
    return pipeline.process_batches(
      data,
      ids[first_batch * size :],
      batch_size=size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      **settings.preprocess,
    )

  shape = input_shape(settings, data) if inputs is None else (1, *inputs.shape[1:])
  dim = int(
    jax.eval_shape(lambda: model.apply(state.variables, jnp.zeros(shape)))["embedding"].shape[-1]
  )
  return embed_lib.embed_to_store(predict_fn, batches, store_dir, len(ids), dim, log=log)


def _array_batches(inputs: np.ndarray, ids: np.ndarray, batch_size: int, first_batch: int):
  """`pipeline.iterate_batches`' batches of float `inputs[ids]`: this process's rows of each
  padded global batch (`sharding.process_shard`)."""
  rows = sharding.process_shard(np.arange(batch_size))
  for start in range(first_batch * batch_size, len(ids), batch_size):
    chunk = np.full(batch_size, -1, np.int64)
    count = min(batch_size, len(ids) - start)
    chunk[:count] = ids[start : start + count]
    chunk = chunk[rows]
    real = chunk >= 0
    images = np.zeros((len(chunk), *inputs.shape[1:]), np.float32)
    images[real] = inputs[chunk[real]]
    yield {"image": images, "mask": real, "index": chunk}


def load_variables(directory: str, like_state: train.TrainState) -> dict:
  """The final `{"params", "batch_stats"}` saved in a training directory."""
  with CheckpointStore(directory) as store:
    state, _ = train.restore_train_state(store, like_state)
  return state.variables


DEAD_FEATURE_STD = 1e-3  # relative to the median std: a dimension constant over the pool


def linear_main_head(variables: dict, linear_model, *, mean=None, std=None) -> dict:
  """`variables` with the main head set to the loop's linear models.

  The linear models were fitted on normalised features `(x - mean) / std` of this model's
  embedding x; `w . (x - mean) / std + b` is folded into the head's kernel `[D, C]` and bias,
  so the deep update starts from what the linear models already know.

  Dimensions that are constant over the pool (`std <= DEAD_FEATURE_STD * median std`, e.g.
  channels a previous update switched off) get weight 0: they add nothing to the linear
  models' scores on the pool, but folded as `w / std` (std ~1e-6) their weights are ~1e6
  times the others, so the first step that moves such a channel made the update diverge
  (measured in `make demo`: 125 of 1,280 dims of update 1's features were constant, update 2's
  loss rose and its head stopped predicting positives, F1 0.000).

  Args:
    variables: a `BGSplitModel`'s `{"params", "batch_stats"}`.
    linear_model: `linear.LinearModel` with weights `[C, D]` and bias `[C]`.
    mean, std: `[D]` normalisation statistics, or None for unnormalised features.
  """
  weights = np.asarray(jax.device_get(linear_model.weights), np.float64)
  bias = np.asarray(jax.device_get(linear_model.bias), np.float64)
  if mean is not None:
    std = np.asarray(std, np.float64)
    live = std > DEAD_FEATURE_STD * np.median(std)
    weights = np.where(live, weights / std, 0.0)
    bias = bias - (weights * np.asarray(mean, np.float64)).sum(axis=1)
  params = dict(variables["params"])
  if params["main_head"]["kernel"].shape != weights.T.shape:
    raise ValueError(
      f"linear models of shape {weights.shape} do not fit the main head "
      f"{params['main_head']['kernel'].shape}"
    )
  params["main_head"] = {
    "kernel": jnp.asarray(weights.T, jnp.float32),
    "bias": jnp.asarray(bias, jnp.float32),
  }
  return {**variables, "params": params}


class DeepUpdater:
  """Feature updates of one strategy's run (Algorithm 1 lines 19-20).

  Version 0 is M_pre's features; version i is the deep model after the i-th update, saved in
  `run_dir/deep/v{i}` (TrainState checkpoints) and `run_dir/features/v{i}/{pool,val}`.
  """

  def __init__(
    self,
    *,
    run_dir: str,
    settings: DeepSettings,
    task: tasks.RareTask,
    data: ImageData,
    m_pre_variables: dict,
    num_aux_classes: int,
    aux_labels: np.ndarray,
    base_features,
    seed: int,
    normalize: Callable = lambda pool, val: (pool, val),
    statistics: Callable | None = None,
    base_raw_pool=None,
    log: Callable[[str], None] = print,
    pseudo_labeler: Callable | None = None,
    pool_outputs: tuple[str, ...] = ("embedding",),
    refit: Callable | None = None,
  ):
    self.run_dir = run_dir
    self.settings = settings
    self.task = task
    self.data = data
    self.m_pre_variables = m_pre_variables
    self.aux_labels = np.asarray(aux_labels)
    self.base_features = base_features
    self.seed = seed
    self.normalize = normalize
    # statistics(raw pool features) -> (mean, std) of `normalize`: the linear models live on
    # normalised features; folding them back gives a main head on the raw embedding.
    self.statistics = statistics
    self.base_raw_pool = base_raw_pool
    self.log = log
    # pseudo_labeler(updater, state, version) -> PseudoLabels (rare_jax.deep.strategies) for the
    # baselines that add pseudo-positives; None trains on L_p, L_n and W_n (ours).
    self.pseudo_labeler = pseudo_labeler
    self.pool_outputs = tuple(pool_outputs)
    # refit(state, pool features) -> the state with its linear models fitted on those features
    # (runner.Engine.refit_on): with warm_start=False the head of every update is folded from
    # models on M_pre's features, while the loop's live on the previous version's.
    self.refit = refit
    self.model = bgsplit_model(settings, len(task.categories), num_aux_classes)
    self._frozen = None  # frozen_activations(), computed when an update first needs them

  def frozen_activations(self) -> tuple[np.ndarray, np.ndarray] | None:
    """(pool, validation) outputs of the trunk's frozen part (`frozen_inputs`), computed once
    per run from M_pre's trunk into `run_dir/features/frozen/`; None without a frozen part.

    Every update starts from M_pre's frozen parameters and leaves them unchanged (checked in
    `update`), so these are the frozen part's outputs in every version.
    """
    if not caches_frozen_part(self.settings):
      return None
    if self._frozen is None:
      directory = os.path.join(self.run_dir, "features", "frozen")
      self._frozen = tuple(
        frozen_inputs(
          self.settings,
          self.m_pre_variables,
          data,
          ids,
          os.path.join(directory, name),
          log=self.log,
        )
        for name, data, ids in (
          ("pool", self.data.train, self.task.pool_ids),
          ("val", self.data.eval, self.task.val_ids),
        )
      )
    return self._frozen

  def _check_frozen_unchanged(self, variables: dict) -> None:
    names = self.model.trunk.frozen_modules()
    for kind in ("params", "batch_stats"):
      ours, pre = variables[kind]["trunk"], self.m_pre_variables[kind]["trunk"]
      for name in sorted(names & set(pre)):
        same = jax.tree.map(
          lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), ours[name], pre[name]
        )
        if not all(jax.tree.leaves(same)):
          raise ValueError(
            f"the frozen trunk module {name!r} ({kind}) differs from M_pre's; the cached "
            f"frozen activations in {self.run_dir}/features/frozen do not apply"
          )

  def _paths(self, version: int) -> tuple[str, str, str]:
    features = os.path.join(self.run_dir, "features", f"v{version}")
    return (
      os.path.join(self.run_dir, "deep", f"v{version}"),
      os.path.join(features, "pool"),
      os.path.join(features, "val"),
    )

  def _like(self) -> train.TrainState:
    mesh = make_mesh(self.settings)
    tx = train.make_optimizer(
      momentum=self.settings.momentum,
      weight_decay=self.settings.weight_decay,
      total_steps=1,
      frozen=train.frozen_mask(self.model),  # the optimizer state's structure depends on it
    )
    state, _ = train.init_sharded_state(
      jax.random.key(0, impl="rbg"),
      model=self.model,
      tx=tx,
      input_shape=input_shape(self.settings, self.data.train),
      mesh=mesh,
    )
    return state

  def trained_variables(self, version: int) -> dict:
    """`{"params", "batch_stats"}` of the deep model after update `version` >= 1 (for
    `rare_jax.predict`)."""
    if version < 1:
      raise ValueError(f"version={version}; expected a deep update >= 1 (0 is M_pre)")
    return load_variables(self._paths(version)[0], self._like())

  def _pseudo_label_path(self, version: int) -> str:
    return os.path.join(self.run_dir, "deep", f"v{version}_pseudo_labels.json")

  def pool_store(self, version: int) -> embed_lib.FeatureStore:
    """The pool's feature store of update `version` >= 1 (with `pool_outputs`)."""
    store = embed_lib.FeatureStore.open(self._paths(version)[1])
    if not store.complete:
      raise ValueError(f"pool features of update {version} in {self.run_dir} are incomplete")
    return store

  def features(self, version: int):
    """(pool `[P, D]`, validation `[V, D]`) features of a version, as device arrays."""
    if version == 0:
      return self.base_features
    _, pool_dir, val_dir = self._paths(version)
    pool = embed_lib.FeatureStore.open(pool_dir)
    val = embed_lib.FeatureStore.open(val_dir)
    if not (pool.complete and val.complete):
      raise ValueError(f"features of update {version} in {self.run_dir} are incomplete")
    return self.normalize(pool.features, val.features)

  def _raw_pool(self, version: int):
    if version == 0:
      if self.base_raw_pool is None:
        raise ValueError(
          f"main_head_init={self.settings.main_head_init!r} needs the raw M_pre pool features"
        )
      return self.base_raw_pool
    return embed_lib.FeatureStore.open(self._paths(version)[1]).features

  def _linear_main_head(self, variables: dict, state, version: int) -> dict:
    mean = std = None
    if self.statistics is not None:
      mean, std = self.statistics(self._raw_pool(version))
    return linear_main_head(variables, state.linear, mean=mean, std=std)

  def starts_from_m_pre(self, version: int) -> bool:
    """Whether update `version` starts from M_pre (the first, or every one without
    `warm_start`) rather than from M_{version-1}."""
    return version == 1 or not self.settings.warm_start

  def folds_linear_head(self, version: int) -> bool:
    """Whether update `version` starts its main head from linear models (else from the
    model it starts from: M_{version-1}'s head, or a fresh one from M_pre)."""
    init = self.settings.main_head_init
    if init == "random":
      return False
    return init == "linear" or self.starts_from_m_pre(version)

  def update(self, state, version: int):
    """Trains M_version on `state`'s training set, re-embeds, evaluates.

    It starts from M_{version-1}, or from M_pre for the first update and for every one without
    `warm_start` (`starts_from_m_pre`); its main head as `folds_linear_head` says.

    Returns:
      (pool features, validation features, the deep main head's validation metrics).
    """
    train_dir, pool_dir, val_dir = self._paths(version)
    like = self._like()
    if self.starts_from_m_pre(version):
      start, start_version = models.init_from_pretrained(like.variables, self.m_pre_variables), 0
    else:
      start, start_version = load_variables(self._paths(version - 1)[0], like), version - 1
    # The fully supervised baseline has no linear models (no loop): its head starts fresh.
    if self.folds_linear_head(version) and hasattr(state, "linear"):
      head_state = state  # its linear models live on version - 1's features
      if start_version != version - 1:
        if self.refit is None:
          raise ValueError(
            "deep.warm_start=False needs the loop's refit (DeepUpdater(refit=...)) to fold "
            "linear models on M_pre's features into the main head"
          )
        head_state = self.refit(state, self.base_features[0])
      start = self._linear_main_head(start, head_state, start_version)
    frozen = self.frozen_activations()
    if frozen is not None:
      self._check_frozen_unchanged(start)
    labels = np.asarray(jax.device_get(state.labels))
    pseudo_negative = np.asarray(jax.device_get(state.pseudo_negative))
    pseudo_positive = pseudo_weights = None
    if self.pseudo_labeler is not None:
      extra = self.pseudo_labeler(self, state, version)
      pseudo_positive, pseudo_negative = extra.positive, extra.negative
      pseudo_weights = extra.weights
    examples = training_set(
      labels,
      pseudo_negative,
      self.aux_labels,
      pseudo_positive=pseudo_positive,
      pseudo_weights=pseudo_weights,
    )
    unlabeled = labels < 0
    # How wrong the pseudo-labels are (the paper's Figure 4): ground truth used for the record
    # only, never for training.
    error_rates = metrics.pseudo_label_error_rates(
      np.zeros_like(unlabeled) if pseudo_positive is None else pseudo_positive & unlabeled,
      pseudo_negative & unlabeled,
      self.task.ground_truth(),
    )
    if sharding.is_primary():
      os.makedirs(os.path.dirname(self._pseudo_label_path(version)), exist_ok=True)
      write_json_atomic(self._pseudo_label_path(version), error_rates)
    self.log(
      f"deep update {version}: trainBGSplit on {len(examples.pool_positions)} images "
      f"({int(examples.label_mask.sum())} (image, category) labels), "
      f"{self.settings.epochs} epochs"
    )
    deep_state = bgsplit_update(
      model=self.model,
      start_variables=start,
      examples=examples,
      pool_ids=self.task.pool_ids,
      data=self.data,
      settings=self.settings,
      directory=train_dir,
      seed=self.seed * 1000 + version,
      log=self.log,
      what=f"deep update {version}",
      frozen=None if frozen is None else frozen[0],
    )
    start_time = time.perf_counter()
    # From the cached frozen activations (rows in pool / validation order) or from images.
    model = self.model if frozen is None else trainable_part(self.model)
    pool = embed(
      model,
      deep_state,
      self.data.train,
      self.task.pool_ids if frozen is None else np.arange(len(self.task.pool_ids)),
      pool_dir,
      self.settings,
      outputs=self.pool_outputs,
      log=self.log,
      inputs=None if frozen is None else frozen[0],
    )
    val = embed(
      model,
      deep_state,
      self.data.eval,
      self.task.val_ids if frozen is None else np.arange(len(self.task.val_ids)),
      val_dir,
      self.settings,
      outputs=("embedding", "main_probs"),
      log=self.log,
      inputs=None if frozen is None else frozen[1],
    )
    self.log(
      f"deep update {version}: re-embedded {pool.num_rows} pool and {val.num_rows} "
      f"validation images in {time.perf_counter() - start_time:.1f}s"
    )
    pool_features, val_features = self.features(version)
    return pool_features, val_features, self.evaluate(version)

  def evaluate(self, version: int) -> dict:
    """The deep main head's validation metrics after update `version` (F1 at 0.5, AP, ...)."""
    val = embed_lib.FeatureStore.open(self._paths(version)[2])
    result = metrics.category_metrics(
      np.asarray(val["main_probs"]).T,
      self.task.val_ground_truth(),
      sample_weight=self.task.val_weights,
    )
    if os.path.exists(self._pseudo_label_path(version)):
      with open(self._pseudo_label_path(version)) as f:
        result["pseudo_labels"] = json.load(f)
    return result
