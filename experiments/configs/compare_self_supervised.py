r"""Figure 6 (paper Sec. 4.4): Ours-Self and Tropel-Self on the embedded default.

    python -m rare_jax.compare --config=experiments/configs/compare_self_supervised.py \
        --workdir=runs/compare_self_supervised
    python experiments/figure6.py --self_supervised=runs/compare_self_supervised \
        --imagenet=runs/compare_imagenet --out=docs/results/imagenet/fig6_self_supervised.png

The groups of experiments/configs/compare_imagenet.py, each workdir starting from a SimCLR
M_pre trained on its own pool without labels and k-means auxiliary labels
(experiments/configs/self_supervised.py); `ours` here is Ours-Self, `tropel` Tropel-Self.
"""

from experiments.configs import compare_imagenet, self_supervised


def get_config(arg=None):
  config = self_supervised.get_config(arg)
  sweep = compare_imagenet.get_config(arg)
  config.groups = sweep.groups
  config.seeds = (0, 1, 2)
  config.categories = config.groups[0]
  config.strategies = ("ours", "tropel")
  config.evaluate_model = "deep_head"
  config.baseline = "tropel"
  return config
