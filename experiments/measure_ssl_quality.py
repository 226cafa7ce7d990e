r"""How useful a self-supervised M_pre's pool embeddings are: k-means purity and a linear probe.

    python experiments/measure_ssl_quality.py --workdir=runs/compare_self_supervised/g0_s0

Reads a finished self-supervised run workdir (its task, M_pre's pool embeddings in
m_pre/pool_embedding and the k-means auxiliary labels in features/pool) and compares them
with the same trunk at its random initialisation and with raw pixels, on the pool's true
classes (read here only, never by the run):
- purity: the fraction of pool images whose class is their k-means cluster's majority class
  (k = config.self_supervised.num_clusters; the run's own clusters for SimCLR, k-means with
  the run's seed for the others);
- linear probe: logistic regression on standardised features, trained on the even pool
  rows and tested on the odd ones: accuracy and balanced accuracy (the rare classes count as
  much as the common ones).
"""

import json
import os
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rare_jax import workdirs
from rare_jax.data import sources, tasks  # noqa: E402
from rare_jax.deep import embed, selfsup, train, updates  # noqa: E402
from rare_jax.models import Classifier  # noqa: E402


def purity(clusters: np.ndarray, labels: np.ndarray) -> float:
  total = 0
  for cluster in np.unique(clusters):
    total += np.bincount(labels[clusters == cluster]).max()
  return total / len(labels)


def probe(features: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
  features = StandardScaler().fit_transform(np.asarray(features, np.float64))
  fit, test = slice(0, None, 2), slice(1, None, 2)
  model = LogisticRegression(max_iter=2000).fit(features[fit], labels[fit])
  predicted = model.predict(features[test])
  return float(np.mean(predicted == labels[test])), balanced_accuracy_score(labels[test], predicted)


def main(argv):
  del argv
  workdir = flags.FLAGS.workdir
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  task = tasks.RareTask.load(workdir)
  settings = updates.DeepSettings.from_config(config.deep)
  ssl = selfsup.SelfSupSettings.from_config(config.self_supervised)
  labels = np.asarray(task.pool_labels)
  train_split = sources.open_source(config.dataset, task.train_split, None)
  images, _ = sources.load_arrays(train_split, task.pool_ids)
  data = workdirs.image_data(config, task, None).train

  simclr = embed.FeatureStore.open(os.path.join(workdir, "m_pre", "pool_embedding")).features
  aux = np.asarray(embed.FeatureStore.open(os.path.join(workdir, "features", "pool"))["labels"])

  rows = {"SimCLR M_pre": (np.asarray(simclr), aux)}
  if flags.FLAGS.baselines:
    rows.update(baselines(config, task, settings, data, images))
  print(
    f"{workdir}: pool of {len(labels)} images, classes {np.bincount(labels).tolist()}, "
    f"k = {ssl.num_clusters}"
  )
  print("| features | dim | k-means purity | probe accuracy | probe balanced accuracy |")
  print("|---|---|---|---|---|")
  for name, (features, clusters) in rows.items():
    start = time.perf_counter()
    if clusters is None:
      clusters, _ = selfsup.cluster_aux_labels(
        features, ssl.num_clusters, seed=int(config.seed), max_iterations=ssl.kmeans_iterations
      )
    accuracy, balanced = probe(features, labels)
    print(
      f"| {name} | {features.shape[1]} | {purity(clusters, labels):.3f} | {accuracy:.3f} | "
      f"{balanced:.3f} |  ({time.perf_counter() - start:.0f} s)",
      flush=True,
    )


def baselines(config, task, settings, data, images) -> dict:
  """The same trunk at its random initialisation and raw pixels (no clusters yet)."""
  model = Classifier(trunk=settings.trunk(), num_classes=2)
  state, _ = train.init_sharded_state(
    jax.random.key(int(config.seed), impl="rbg"),
    model=model,
    tx=train.make_optimizer(momentum=0.9, weight_decay=0.0, total_steps=1),
    input_shape=updates.input_shape(settings, data),
    mesh=updates.make_mesh(settings),
  )
  with tempfile.TemporaryDirectory() as tmp:
    random_trunk = np.array(
      updates.embed(model, state, data, task.pool_ids, tmp, settings, log=lambda _: None).features
    )
  return {
    "same trunk, random init": (random_trunk, None),
    "raw pixels": (images.reshape(len(images), -1).astype(np.float32) / 255.0, None),
  }


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "a finished self-supervised run workdir")
  flags.DEFINE_bool("baselines", True, "also measure the random trunk and raw pixels")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
