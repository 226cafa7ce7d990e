r"""The self-supervised start (paper Sec. 4.4, Ours-Self / Tropel-Self) on the embedded default.

    python -m rare_jax.run --config=experiments/configs/self_supervised.py \
        --workdir=runs/self_supervised

M_pre is trained without labels on the pool's own images with SimCLR (rare_jax/deep/selfsup.py),
the auxiliary labels of background splitting are k-means cluster ids (k = 50) of its pool
embeddings, and the auxiliary head starts from the centroids. `ours` is Ours-Self, `tropel`
Tropel-Self. The trunk is the small ResNet for 28x28 inputs (SimCLR of an EfficientNet on
this 2-core CPU would take hours). Expected run time: about 15 minutes on a 2-core CPU
(not measured yet).
"""

import ml_collections

from experiments.configs import demo


def get_config(arg=None):
  config = demo.get_config(arg)
  config.strategies = ("ours", "tropel")
  config.deep.model = "resnet_tiny"
  config.deep.init = "self_supervised"
  config.deep.image_size = None
  config.deep.mean = 0.286  # Fashion-MNIST pixel mean / std (after scaling to [0, 1])
  config.deep.std = 0.353
  config.deep.frozen_blocks = 0
  config.deep.epochs = 2  # E of docs/results/self_supervised (the demo now trains 4)
  config.deep.warm_start = True  # as measured there (the demo restarts from M_pre)
  config.feature_normalization = "standardize"  # as measured there (the demo: "none")
  config.deep.freeze_batchnorm = False  # frozen BatchNorm is for the EfficientNet-Lite trunks
  config.self_supervised = ml_collections.ConfigDict()
  config.self_supervised.epochs = 5
  config.self_supervised.learning_rate = 0.3
  config.self_supervised.batch_size = 256
  config.self_supervised.temperature = 0.5
  config.self_supervised.num_clusters = 50
  return config
