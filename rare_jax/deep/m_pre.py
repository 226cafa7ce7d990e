"""Where M_pre comes from: one choice, made here (Algorithm 1's pretrained model).

`config.deep.init` decides:
- "" (empty): no pretrained weights for this trunk or domain: M_pre is trained on the task's
  related-domain split (the non-rare classes, disjoint images; `updates.pretrain`), and the
  auxiliary labels are its predictions over those classes.
- "imagenet": the trunk's packaged ImageNet weights (`models.pretrained`), as in the paper:
  the auxiliary labels are its ImageNet argmax over the pool and its classifier becomes the
  auxiliary head (1000 classes).
- a path: the user's own `.pth` / `.safetensors` file for the trunk (e.g. a torchvision
  ResNet-50), used like "imagenet".
- "self_supervised" (paper Sec. 4.4): the trunk is trained with SimCLR without labels
  (`selfsup.py`, settings in `config.self_supervised`) on the pool's images, or, with
  `shared_images`, once on a fixed sample of the training split and cached for every run with
  the same settings; the auxiliary labels are k-means cluster ids of its pool embeddings and
  the auxiliary head starts from the centroids.

`load(...)` returns `MPre` (the `Classifier`, its TrainState, its number of classes). A run's
workdir records which weights it started from (`m_pre/source.json`, with the file's SHA-256)
and refuses to reopen with other weights, since its cached features would no longer match.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import numpy as np

from rare_jax.data import tasks
from rare_jax.deep import selfsup, train, trunk_features, updates
from rare_jax.infra import sharding
from rare_jax.infra.checkpoint import record_or_check
from rare_jax.models import pretrained


@dataclasses.dataclass(frozen=True)
class MPre:
  """Algorithm 1's M_pre: a `Classifier`, its state and its number of (auxiliary) classes."""

  model: object
  state: train.TrainState
  num_classes: int
  source: str  # "related_split", "pretrained" or "self_supervised"


SELF_SUPERVISED = "self_supervised"  # the config.deep.init value of the self-supervised start


def source(settings: updates.DeepSettings) -> str:
  """ "related_split" (trained here on labels), "self_supervised" (trained here without
  labels) or "pretrained" (weights from a package or a file)."""
  if settings.init == SELF_SUPERVISED:
    return "self_supervised"
  return "pretrained" if settings.init else "related_split"


def load_pretrained(settings: updates.DeepSettings, input_shape: tuple[int, ...], directory: str):
  """M_pre from pretrained weights, as a TrainState on the settings' mesh."""
  weights = (
    pretrained.weights_path(settings.model) if settings.init == "imagenet" else settings.init
  )
  # The cached features were made with these weights: a changed file must not be mixed in.
  source_json = os.path.join(directory, "source.json")
  sharding.primary_first(  # process 0 records, the others check
    lambda: record_or_check(
      source_json,
      {"model": settings.model, "init": settings.init, "sha256": trunk_features.sha256(weights)},
      what="M_pre (pretrained weights)",
    ),
    f"m_pre:source:{os.path.abspath(source_json)}",
  )
  model, variables = pretrained.load_classifier(
    settings.model, weights, dtype=settings.dtype, **settings.trunk_kwargs()
  )
  tx = train.make_optimizer(
    momentum=settings.momentum, weight_decay=settings.weight_decay, total_steps=1
  )
  state, shardings = train.init_sharded_state(
    jax.random.key(0, impl="rbg"),
    model=model,
    tx=tx,
    input_shape=input_shape,
    mesh=updates.make_mesh(settings),
  )
  state = state.replace(
    params=jax.device_put(variables["params"], shardings.params),
    batch_stats=jax.device_put(variables["batch_stats"], shardings.batch_stats),
  )
  return model, state


def load(
  task: tasks.RareTask,
  data: updates.ImageData,
  settings: updates.DeepSettings,
  directory: str,
  *,
  seed: int,
  log: Callable[[str], None] = print,
  ssl: selfsup.SelfSupSettings | None = None,
) -> MPre:
  """Algorithm 1's M_pre for `settings` (see the module docstring); resumable.

  `ssl` holds the self-supervised stage's settings (defaults when None).
  """
  if source(settings) == "pretrained":
    log(f"M_pre: {settings.model} with weights {settings.init!r} (no pretraining here)")
    model, state = load_pretrained(settings, updates.input_shape(settings, data.train), directory)
    return MPre(model, state, pretrained.spec(settings.model).num_classes, "pretrained")
  if source(settings) == "self_supervised":
    ssl = ssl or selfsup.SelfSupSettings()
    if ssl.shared_images:
      where = dict(
        dataset=task.dataset,
        split=task.train_split,
        num_examples=task.num_train_examples,
        settings=settings,
        ssl=ssl,
      )
      # The cached features were made with this model: a run refuses another one (checked
      # before any training).
      source_json = os.path.join(directory, "source.json")
      record = {"shared_self_supervised": selfsup.shared_model_key(**where)}
      sharding.primary_first(
        lambda: record_or_check(source_json, record, what="M_pre (shared SimCLR model)"),
        f"m_pre:source:{os.path.abspath(source_json)}",
      )
      model, state, _ = selfsup.shared_self_supervised(
        data.train, cache_dir=ssl.cache_dir or os.path.join(directory, "shared"), log=log, **where
      )
    else:
      model, state = selfsup.pretrain_self_supervised(
        data.train, task.pool_ids, settings, ssl, directory, seed=seed, log=log
      )
    features = updates.embed(
      model,
      state,
      data.train,
      task.pool_ids,
      os.path.join(directory, "pool_embedding"),
      settings,
      log=log,
    )
    aux_labels, centroids = selfsup.cluster_aux_labels(
      features.features,
      ssl.num_clusters,
      seed=seed,
      max_iterations=ssl.kmeans_iterations,
      chunk_size=ssl.kmeans_chunk_size,
    )
    log(
      f"M_pre: SimCLR trunk, k-means auxiliary labels: {ssl.num_clusters} clusters, "
      f"{len(np.unique(aux_labels))} non-empty"
    )
    classifier, classifier_state = selfsup.classifier_from_clusters(model, state, centroids)
    return MPre(classifier, classifier_state, ssl.num_clusters, "self_supervised")
  model, state = updates.pretrain(task, data, settings, directory, seed=seed, log=log)
  return MPre(model, state, len(np.asarray(task.related_classes)), "related_split")
