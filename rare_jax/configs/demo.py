r"""The embedded default: full Algorithm 1 on 3 rare Fashion-MNIST categories.

Launch (or simply `make demo`); the demo is `rare-jax-run`'s default config, and
`experiments/configs/demo.py` (what other configs import) is this file:

    rare-jax-run --workdir=runs/demo

Pool: half of the 60,000 training images; Trouser, Sandal and Bag are made rare (0.2% of the
pool each, about 42 images). M_pre is EfficientNet-Lite0 with its ImageNet weights (the paper's
setting: an ImageNet model, here applied to another dataset), on the 28x28 images upsampled to
48x48 as 3 channels; each deep update starts from M_pre on all the labels so far and trains its
last 5 blocks with BatchNorm statistics kept and the main head started from the linear models
(docs/reproducing.md, "Deviations from the paper"). The validation set is every test image,
the rare ones weighted to the pool's 0.2%. Strategies: `ours` (adaptive queries, pseudo-negatives, a
background-splitting deep update every Q=5 rounds with re-embedding), `ours_linear` (the same
on M_pre's frozen features) and `tropel`. N=2 feature updates x Q=5 rounds x B=10 queries per
category, E=4 epochs per deep update (the frozen blocks' output is computed once and cached).
Expected run time: see README, "The demo" (about 12 minutes on the 2-core CPU after set-up).
Every field's meaning: `rare_jax.configs.fields.MEANINGS` (`rare-jax-run --help`).
"""

import ml_collections


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Task (rare_jax.data.tasks).
  config.dataset = "rare_fashion_mnist"
  config.data_dir = ""  # "" = TFDS's default data dir (honours TFDS_DATA_DIR)
  config.images_in_memory = True  # 55 MB of images: decode once
  config.categories = (1, 5, 8)  # Trouser, Sandal, Bag
  config.pool_fraction = 0.002
  config.num_seed_positives = 5
  # The validation set at the pool's imbalance: every test image, each rare one weighted k/n
  # (14 of 1,000 per category), instead of a subsample keeping 14 positives per category.
  config.validation = "weighted"
  # Features the loop starts from: "m_pre" (pretrained here) or "pixel_pca" (a stand-in).
  config.features = "m_pre"
  config.feature_dim = 64  # pixel_pca only
  # "none" (the paper's) or "standardize" (z-score with pool statistics: better on the first
  # release's small M_pre, worse at 40-100 labels on the ImageNet features; docs/reproducing.md)
  config.feature_normalization = "none"
  # The loop (docs/method.md): N feature updates x Q rounds of B queries per category.
  config.strategies = ("ours", "ours_linear", "tropel")
  config.num_feature_updates = 2  # N
  config.rounds_per_update = 5  # Q
  config.batch_size = 10  # B
  config.pseudo_negative_factor = 100.0  # f_a
  # Logistic regression (sklearn's C = 1 / l2).
  config.l2 = 1.0
  config.solver_max_iters = 200
  config.solver_tol = 1e-6
  # The deep model (rare_jax.deep.updates.DeepSettings).
  config.deep = ml_collections.ConfigDict()
  config.deep.model = "efficientnet_lite0"
  config.deep.init = "imagenet"  # M_pre = the ImageNet classifier ("" trains one here)
  config.deep.image_size = 48  # 28x28 grayscale upsampled, as 3 channels
  config.deep.channels = None  # None: 3 for a pretrained trunk
  config.deep.mean = None  # None: the pretrained trunk's own preprocessing
  config.deep.std = None
  config.deep.depthwise = "auto"
  config.deep.frozen_blocks = 11  # train blocks 11-15 and the head conv (Lite0 has 16)
  config.deep.freeze_batchnorm = True  # BatchNorm keeps its ImageNet statistics
  config.deep.main_head_init = "linear"
  config.deep.warm_start = False  # each update from M_pre on all labels so far (paper: True)
  config.deep.compute_dtype = "float32"
  config.deep.batch_size = 128
  config.deep.embed_batch_size = 256
  config.deep.pretrain_epochs = 2
  config.deep.pretrain_learning_rate = 0.1
  config.deep.epochs = 4  # E (paper: 15)
  config.deep.learning_rate = 0.01
  config.deep.momentum = 0.9
  config.deep.weight_decay = 1e-4
  config.deep.warmup_fraction = 0.1
  config.deep.aux_weight = 0.1
  config.deep.mesh = (("data", -1),)
  return config
