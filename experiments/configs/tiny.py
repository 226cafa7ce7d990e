r"""The demo shrunk for tests: frozen pixel-PCA features, ours_linear and tropel, 6 rounds of B=5.

    python -m rare_jax.run --config=experiments/configs/tiny.py --workdir=runs/tiny

Expected run time: about 20 s on a 2-core CPU (mostly start-up and compilation).
"""

from experiments.configs import demo


def get_config(arg=None):
  config = demo.get_config(arg)
  config.features = "pixel_pca"
  config.feature_dim = 16
  config.feature_normalization = "standardize"  # pixel-PCA components differ in scale
  config.strategies = ("ours_linear", "tropel")
  config.num_feature_updates = 2
  config.rounds_per_update = 3
  config.batch_size = 5
  config.pseudo_negative_factor = 10.0
  return config
