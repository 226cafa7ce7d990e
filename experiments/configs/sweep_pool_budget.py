r"""Pool size x budget sweep of the frozen-feature strategies (issue 29, item 2).

    nice -n 10 .venv/bin/python experiments/sweep_pool_budget.py \
        --config=experiments/configs/sweep_pool_budget.py --workdir=runs/sweep_pool_budget

The demo's trunk and loop (experiments/configs/demo.py: EfficientNet-Lite0 with ImageNet
weights at 48x48, raw features, f_a = 100, B = 10, the weighted validation set) for
`ours_linear`, `tropel` and `random` on group 0 of `compare_imagenet.py` (T-shirt/top,
Trouser, Coat, Sandal, Bag), seeds 0-4, up to 200 labels per category (20 rounds of 10; F1
recorded after every round), in pools of 5,000, 10,000, 20,000 and 30,000 images.

Every pool keeps the demo's prevalence, 0.2% per rare category (10, 20, 40 and 60 positives
per category), so the weighted validation set, and with it what F1 at probability 0.5
measures, is the same for every pool size. 2,000 images would hold 4 positives per category
(the task needs 5 seeds and one to find) and 60,000 more non-rare images than Fashion-MNIST's
training split has (30,000 outside the 5 rare classes: 30,303 images at most).

`get_config("tiny")`: the test's version (pixel-PCA features, pools of 600 and 900 images, 2
categories, 2 seeds, `ours_linear` and `tropel`, 3 rounds of B = 5).
"""

from experiments.configs import demo


def get_config(arg=None):
  config = demo.get_config()
  config.categories = (0, 1, 4, 5, 8)  # group 0 of compare_imagenet.py
  config.seeds = (0, 1, 2, 3, 4)
  config.pool_sizes = (5000, 10000, 20000, 30000)  # images per pool (exact)
  config.strategies = ("ours_linear", "tropel", "random")
  config.baseline = "tropel"  # paired differences: strategy minus this, same seed and category
  config.report_budgets = (10, 20, 50, 100, 200)  # labels per category in the table
  # The loop: frozen features, so the rounds are not grouped into deep updates; every round is
  # a budget point (20 rounds x B = 10: 200 labels per category).
  config.num_feature_updates = 20
  config.rounds_per_update = 1
  if arg == "tiny":
    config.features = "pixel_pca"
    config.feature_dim = 16
    config.feature_normalization = "standardize"
    config.categories = (1, 8)
    config.seeds = (0, 1)
    config.pool_sizes = (600, 900)
    config.pool_fraction = 0.01  # 6 and 9 positives per category
    config.num_feature_updates = 3
    config.batch_size = 5
    # Two strategies and f_a = 2 (every training set fits the smallest bucket): the test's time
    # is XLA compiling the loop once per strategy and pool size.
    config.strategies = ("ours_linear", "tropel")
    config.pseudo_negative_factor = 2.0
    config.report_budgets = (5, 15)
  elif arg:
    raise ValueError(f"config argument {arg!r}; expected none or 'tiny'")
  return config
