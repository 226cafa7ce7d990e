"""What every config field means, one line each: `rare-jax-run --help` prints them.

`MEANINGS` covers every field of every shipped config (the demo's and those of
`experiments/configs/`); tests/test_run_help.py fails when a config gains a field without a
meaning here. `describe(config)` lists a config's fields with their values and meanings.
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections

MEANINGS = {
  "seed": "seed of the task draw (rare images, seeds) and of every random choice of the run",
  # The task (rare_jax.data.tasks).
  "dataset": "TFDS dataset name (prepared, array_record); the demo's is embedded",
  "data_dir": 'TFDS data folder; "" = TFDS\'s default ($TFDS_DATA_DIR or ~/tensorflow_datasets)',
  "images_in_memory": "decode every image once into memory (False: read from the files)",
  "categories": "class ids made rare: the categories the loop labels",
  "pool_fraction": "share of the pool each rare category is cut down to (0.002 = 0.2%)",
  "num_seed_positives": "positives of each category given at the start (the user's examples)",
  "validation": '"weighted": every eval image, rare ones weighted to the pool\'s rate; "subsample"',
  "train_split": "split the pool is drawn from",
  "eval_split": "split the validation set comes from",
  "features": 'what the loop starts from: "m_pre" (the deep model\'s) or "pixel_pca"',
  "feature_dim": "dimension of the pixel-PCA features (features='pixel_pca' only)",
  "feature_normalization": '"none" or "standardize" (z-score with pool statistics)',
  # The loop.
  "strategies": "strategies run one after another, each in WORKDIR/<strategy> (docs/method.md)",
  "num_feature_updates": "N: deep feature updates (rounds = N x Q)",
  "rounds_per_update": "Q: rounds between two deep updates",
  "batch_size": "B: images queried per category and round",
  "pseudo_negative_factor": "f_a: pseudo-negatives drawn per labeled image",
  "l2": "L2 penalty of the logistic regressions (sklearn's C = 1 / l2)",
  "solver_max_iters": "iteration cap of the logistic-regression solver",
  "solver_tol": "convergence tolerance of the logistic-regression solver",
  # The deep model (rare_jax.deep.updates.DeepSettings).
  "deep.model": "trunk architecture (rare_jax.models.MODELS)",
  "deep.init": 'M_pre: "imagenet" (packaged weights), "" (trained here), a weights file, '
  'or "self_supervised"',
  "deep.image_size": "input size the images are resized to; None: the dataset's",
  "deep.channels": "input channels (3 expands grayscale); None: 3 for a pretrained trunk",
  "deep.mean": "input mean after scaling to [0, 1]; None: the pretrained trunk's, else 0",
  "deep.std": "input std after scaling to [0, 1]; None: the pretrained trunk's, else 1",
  "deep.depthwise": "EfficientNet-Lite depthwise convolutions: auto / native / shifted",
  "deep.frozen_blocks": "EfficientNet-Lite blocks (after the stem) the deep updates do not train",
  "deep.freeze_batchnorm": "BatchNorm keeps its pretrained statistics during deep updates",
  "deep.main_head_init": 'main head at an update\'s start: "linear" (the linear models) '
  'or "random"',
  "deep.warm_start": "each update continues the previous model (False: restarts from M_pre)",
  "deep.compute_dtype": '"float32" or "bfloat16" activations (parameters stay float32)',
  "deep.batch_size": "training batch size of deep updates and pretraining",
  "deep.embed_batch_size": "batch size when embedding the pool",
  "deep.pretrain_epochs": 'epochs of M_pre\'s training when deep.init is ""',
  "deep.pretrain_learning_rate": "learning rate of M_pre's training",
  "deep.epochs": "E: epochs per deep update",
  "deep.learning_rate": "learning rate of the deep updates (SGD with momentum)",
  "deep.momentum": "SGD momentum",
  "deep.weight_decay": "weight decay",
  "deep.warmup_fraction": "share of an update's steps with a linear learning-rate warm-up",
  "deep.aux_weight": "weight of the background-splitting auxiliary loss (0: off)",
  "deep.mesh": "device mesh of the deep steps: (axis name, size) pairs, -1 = every device",
  # The comparison driver (rare_jax.compare).
  "groups": "tuples of categories made rare together, one task per group and seed",
  "seeds": "seeds each group runs with",
  "baseline": "strategy the paired differences are taken against",
  "evaluate_model": 'headline F1 from "deep_head" or "linear" (the linear models)',
  "fully_supervised_epochs": "epochs of the fully supervised baseline",
  "max_pseudo_positives": "cap on KD-Semi / DeepProp pseudo-positives per category (0: none)",
  "deep_prop_k": "DeepProp: neighbours in the k-NN graph",
  "deep_prop_alpha": "DeepProp: propagation weight alpha",
  "deep_prop_iterations": "DeepProp: propagation iterations",
  "group_selection.num_groups": "groups drawn from the dataset when `groups` is empty",
  "group_selection.group_size": "categories per drawn group",
  "group_selection.min_count": "fewest training images a drawn category may have",
  "group_selection.max_count": "most training images a drawn category may have",
  "group_selection.seed": "seed of the group draw",
  # The pool size x budget sweep (experiments/sweep_pool_budget.py).
  "pool_sizes": "images per pool, one sweep cell per size (exact)",
  "report_budgets": "labels per category shown in the sweep's table",
  # The self-supervised start (rare_jax.deep.selfsup.SelfSupSettings).
  "self_supervised.epochs": "SimCLR epochs",
  "self_supervised.learning_rate": "SimCLR learning rate",
  "self_supervised.batch_size": "SimCLR batch size (None: deep.batch_size)",
  "self_supervised.temperature": "NT-Xent temperature",
  "self_supervised.num_clusters": "k of the k-means auxiliary labels",
  "self_supervised.shared_images": "0: SimCLR on each run's pool; N: once on N training images",
  "self_supervised.shared_seed": "seed drawing the shared images",
  "self_supervised.cache_dir": 'where the shared model is cached ("": in the run\'s m_pre)',
}


def flatten(config: Mapping, prefix: str = "") -> dict[str, object]:
  """The config's leaf fields by dotted name (`deep.epochs`), in the config's order."""
  out = {}
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict | Mapping):
      out.update(flatten(value, f"{prefix}{name}."))
    else:
      out[f"{prefix}{name}"] = value
  return out


def describe(config: Mapping) -> list[str]:
  """One line per field: `  name = value    meaning` (a field missing from MEANINGS says so)."""
  fields = flatten(config)
  width = max((len(f"{name} = {value!r}") for name, value in fields.items()), default=0)
  width = min(width, 48)
  lines = []
  for name, value in fields.items():
    meaning = MEANINGS.get(name, "(no description: add one to rare_jax/configs/fields.py)")
    lines.append(f"  {f'{name} = {value!r}':<{width}}  {meaning}")
  return lines
