r"""The paper's Places365 setting (Sec. 4.1) through TFDS `places365_small` (256x256 images).

    tfds build places365_small   # once, where the data may be downloaded
    python -m rare_jax.compare --config=experiments/configs/places365.py \
        --workdir=runs/places365 [--config.data_dir=/path/to/tensorflow_datasets]

Runnable where the dataset is prepared (the driver never downloads). 20 rare categories, drawn
once (seeded, kept in WORKDIR/groups.json) in 2 groups of 10, each subsampled to 0.0002 of the
pool (about 180 images each); evaluation on the labeled `validation` split (100 images per
class, subsampled alike). B=20, otherwise as experiments/configs/inat2017.py: N=10, Q=5,
f_a=100, E=15, ResNet-50 at 224x224, and inat2017.py's inherited non-paper choices (linear
models evaluated, z-scored features; paper_settings.py:places365 evaluates the deep head on raw
features). Expected run time: days on one accelerator.
"""

from experiments.configs import inat2017


def get_config(arg=None):
  config = inat2017.get_config(arg)
  config.dataset = "places365_small"
  config.group_selection = dict(num_groups=2, group_size=10, min_count=1, max_count=10**9, seed=0)
  config.pool_fraction = 0.0002
  config.batch_size = 20  # B
  return config
