r"""Ours vs Tropel (and the frozen-feature and random floors) from the ImageNet start.

    python -m rare_jax.compare --config=experiments/configs/compare_imagenet.py \
        --workdir=runs/compare_imagenet

The demo's settings (experiments/configs/demo.py: EfficientNet-Lite0 from ImageNet at 48x48,
N=2, Q=5, B=10, f_a=100, E=4, each deep update from M_pre with the main head started from
linear models, raw features, the weighted validation set: every test image, rare ones
weighted k/n) on two groups of 5 rare Fashion-MNIST categories that cover all 10 classes (the
other group's classes are the pool's common background), over seeds 0-4. The headline model
is docs/method.md's: the deep main head for `ours`, the linear models for the frozen-feature
strategies. The report adds paired differences (strategy minus `tropel`, same seed and
category) with 95% intervals. docs/results/imagenet holds this config's results; its caveats
name the earlier run (E=2, warm-started updates, z-scored features, subsampled validation).
Run time: see docs/reproducing.md, "Ours vs Tropel from the ImageNet start".
"""

from experiments.configs import demo


def get_config(arg=None):
  config = demo.get_config(arg)
  config.groups = ((0, 1, 4, 5, 8), (2, 3, 6, 7, 9))
  config.seeds = (0, 1, 2, 3, 4)
  config.categories = config.groups[0]  # set per workdir by the driver
  config.strategies = ("ours", "tropel", "ours_linear", "random")  # priority order
  config.evaluate_model = "deep_head"
  config.baseline = "tropel"  # paired differences are taken against this strategy
  return config
