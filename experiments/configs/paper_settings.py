r"""The paper's settings for `ours`, `tropel` and `ours_linear` (experiments/paper_settings.py).

    python experiments/paper_settings.py --workdir=runs/paper_settings --init=resnet50.pth
    python -m rare_jax.compare --config=experiments/configs/paper_settings.py:i_naturalist2017 \
        --workdir=runs/paper_inat --config.deep.init=/path/to/resnet50.pth

`get_config(arg)`, arg one of:
- "rare_fashion_mnist" (the default): the embedded dataset, two groups of 5 rare categories that
  cover all 10 classes (as experiments/configs/compare_imagenet.py), about 30 positives per
  category in a pool of about 15,100 images, the weighted validation set;
- "i_naturalist2017", "places365": the datasets, groups, pool fractions and splits of
  experiments/configs/inat2017.py and places365.py (prepared TFDS datasets; never downloaded);
- "tiny": everything shrunk for a test on the CPU (slices of rare_fashion_mnist, resnet_tiny at
  28x28, E=1, N=1 x Q=2 x B=5, one group of 2 categories, one seed). Its numbers mean nothing.

The full-size settings are the paper's, not the demo's deviations (docs/reproducing.md): ResNet-50
at 224x224 (3 channels, ImageNet normalisation), E=15 epochs per deep update, N=10 updates x Q=5
rounds x B queries (B=10; Places B=20), f_a=100, 5 seed positives, background-splitting weight
0.1, full fine-tuning with BatchNorm trained, a fresh main head, update i continuing model i-1
(warm start), raw features, the deep main head as `ours`' evaluated model. Seeds 0-2, the
paired baseline `tropel`.

One departure from the paper in every variant: the weighted validation set (every eval image,
each rare one weighted to the pool's share; docs/method.md), which has the paper's imbalance in
expectation. `deep.init` is "" here (M_pre trained on the dataset's non-rare classes, as
inat2017.py does): the paper's ImageNet start needs a ResNet-50 weights file
(`--config.deep.init=FILE`, or experiments/paper_settings.py's `--init`), since no package on
PyPI ships ImageNet ResNet-50 weights. bfloat16 matrix products on the accelerator (parameters
stay float32): a speed setting the paper does not state.
Expected run time: printed by experiments/paper_settings.py for each device kind.
"""

from experiments.configs import compare_imagenet, inat2017, places365, tiny_deep
from rare_jax.data import pipeline

DATASETS = ("rare_fashion_mnist", "i_naturalist2017", "places365", "tiny")
STRATEGIES = ("ours", "tropel", "ours_linear")  # priority order


def get_config(arg=None):
  name = arg or "rare_fashion_mnist"
  if name not in DATASETS:
    raise ValueError(f"paper_settings config: expected one of {DATASETS}, got {name!r}")
  if name == "tiny":
    return _tiny()
  if name == "rare_fashion_mnist":
    config = compare_imagenet.get_config()
  elif name == "i_naturalist2017":
    config = inat2017.get_config()
  else:
    config = places365.get_config()
  config.seeds = (0, 1, 2)
  config.strategies = STRATEGIES
  config.baseline = "tropel"
  config.evaluate_model = "deep_head"  # docs/method.md: the deep main head for `ours`
  config.validation = "weighted"
  config.feature_normalization = "none"  # the paper's raw features
  config.num_seed_positives = 5
  config.num_feature_updates = 10  # N
  config.rounds_per_update = 5  # Q
  config.batch_size = 20 if name == "places365" else 10  # B
  config.pseudo_negative_factor = 100.0  # f_a
  _paper_recipe(config.deep)
  return config


def _paper_recipe(deep) -> None:
  """The paper's deep model and update recipe (ResNet-50 at 224x224, E=15, no deviations)."""
  deep.model = "resnet50"
  deep.init = ""  # M_pre trained here unless a weights file is given
  deep.image_size = 224
  deep.channels = 3
  with deep.ignore_type():  # per-channel tuples where the demo has None
    deep.mean = pipeline.IMAGENET_MEAN
    deep.std = pipeline.IMAGENET_STD
  deep.frozen_blocks = 0  # full fine-tuning
  deep.freeze_batchnorm = False
  deep.main_head_init = "random"  # a fresh main head
  deep.warm_start = True  # update i continues M_{i-1}
  deep.compute_dtype = "bfloat16"
  deep.batch_size = 128
  deep.embed_batch_size = 512
  deep.pretrain_epochs = 30
  deep.pretrain_learning_rate = 0.1
  deep.epochs = 15  # E
  deep.learning_rate = 0.01
  deep.momentum = 0.9
  deep.weight_decay = 1e-4
  deep.warmup_fraction = 0.1
  deep.aux_weight = 0.1


def _tiny():
  """The recipe of the full-size settings on shapes a 2-core CPU runs in seconds."""
  config = tiny_deep.get_config()  # train[:3000], test[:600], resnet_tiny at 28x28, E=1
  config.groups = ((1, 5),)
  config.categories = config.groups[0]
  config.seeds = (0,)
  config.strategies = STRATEGIES
  config.baseline = "tropel"
  config.evaluate_model = "deep_head"
  config.validation = "weighted"
  config.feature_normalization = "none"
  config.num_feature_updates = 1  # one deep update: each compiles its own training step
  config.rounds_per_update = 2
  config.batch_size = 5
  config.pseudo_negative_factor = 10.0
  deep = config.deep
  deep.main_head_init = "random"
  deep.warm_start = True
  deep.aux_weight = 0.1
  return config
