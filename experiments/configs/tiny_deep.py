r"""A seconds-long run with a deep update: `ours` with one background-splitting update.

    python -m rare_jax.run --config=experiments/configs/tiny_deep.py --workdir=runs/tiny_deep

Slices of the embedded Fashion-MNIST (train[:3000], test[:600]), one rare category (Sandal),
M_pre a 77k-parameter ResNet trained here for one epoch on the related split, 2 rounds of B=5
then one deep update (one epoch). For tests (`tests/test_predict.py`), not for figures.
Expected run time: about a minute on a 2-core CPU (mostly compilation).
"""

from experiments.configs import demo


def get_config(arg=None):
  config = demo.get_config(arg)
  config.train_split = "train[:3000]"
  config.eval_split = "test[:600]"
  config.categories = (5,)
  config.pool_fraction = 0.01
  config.strategies = ("ours",)
  config.num_feature_updates = 1
  config.rounds_per_update = 2
  config.batch_size = 5
  config.pseudo_negative_factor = 10.0
  config.feature_normalization = "standardize"  # the small trunk trained here
  config.deep.model = "resnet_tiny"
  config.deep.init = ""  # M_pre trained here on the related split
  config.deep.image_size = None  # 28x28, one channel
  config.deep.frozen_blocks = 0
  config.deep.freeze_batchnorm = False
  config.deep.batch_size = 64
  config.deep.embed_batch_size = 256
  config.deep.pretrain_epochs = 1
  config.deep.epochs = 1
  return config
