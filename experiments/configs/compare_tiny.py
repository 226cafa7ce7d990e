r"""The comparison driver shrunk for tests: frozen pixel-PCA features, 2 groups x 2 seeds.

    python -m rare_jax.compare --config=experiments/configs/compare_tiny.py \
        --workdir=runs/compare_tiny

Frozen-feature strategies only (ours_linear, tropel): no deep model is needed. Expected run
time: about 30 s on a 2-core CPU (mostly start-up, compilation and the stand-in features).
"""

from experiments.configs import tiny


def get_config(arg=None):
  config = tiny.get_config(arg)
  config.groups = ((1, 5), (8,))
  config.seeds = (0, 1)
  config.strategies = ("ours_linear", "tropel")
  config.num_feature_updates = 2
  config.rounds_per_update = 2
  return config
