"""Data: TFDS sources, the embedded Fashion-MNIST builder, rare-category tasks, batching.

Importing this package registers the TFDS dataset `rare_fashion_mnist`.
"""

from rare_jax.data import fashion_mnist
from rare_jax.data.pipeline import IMAGENET_MEAN, IMAGENET_STD, iterate_batches, num_batches
from rare_jax.data.sources import Source, default_data_dir, load_arrays, open_source
from rare_jax.data.tasks import RareTask, make_task, task_from_dataset

__all__ = [
  "IMAGENET_MEAN",
  "IMAGENET_STD",
  "RareTask",
  "Source",
  "default_data_dir",
  "fashion_mnist",
  "iterate_batches",
  "load_arrays",
  "make_task",
  "num_batches",
  "open_source",
  "task_from_dataset",
]
