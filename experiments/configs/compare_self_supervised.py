r"""Figure 6 (paper Sec. 4.4): Ours-Self and Tropel-Self on the embedded default.

    python -m rare_jax.compare --config=experiments/configs/compare_self_supervised.py \
        --workdir=runs/compare_self_supervised
    python experiments/figure6.py --self_supervised=runs/compare_self_supervised \
        --imagenet=runs/compare_imagenet --out=docs/results/self_supervised/fig6_self_supervised.png

The settings of experiments/configs/self_supervised.py (resnet_tiny on 28x28, SimCLR M_pre,
k-means auxiliary labels with k = 50, the auxiliary head started from the centroids; `ours`
here is Ours-Self, `tropel` Tropel-Self) on group 0 of experiments/configs/compare_imagenet.py
(T-shirt, Trouser, Coat, Sandal, Bag rare), seeds 0-2, N=2 Q=5 B=10, E=2.
The validation set is the demo's weighted one, as in compare_imagenet.py (figure6.py sets the
two side by side).

Reduced against the paper to fit about an hour on a shared 2-core CPU:
- M_pre is trained ONCE, like the paper's Self-ImageNet / Self-iNat, on 10,000 images of the
  training split drawn with a fixed seed (not the run's seed; classes at their natural,
  uniform frequency, no labels read), for 12 SimCLR epochs (batch 256; 5 epochs gave a trunk
  below raw pixels, docs/results/self_supervised/README.md), and shared by all
  workdirs through the cache `runs/shared_simclr/<key>/` (`selfsup.shared_self_supervised`;
  rerun from the repository root so that it is found). The paper trains for hundreds of
  epochs on millions of images. Each workdir still clusters its own pool (k-means, its seed).
- One group of five rare categories and three seeds (the fewest that give an interval);
  figure6.py compares it with the same group and seeds of the ImageNet comparison.
Measured: 52 minutes of driver time on the shared 2-core CPU (2026-12-07), 28 of them
preparing the first workdir (mostly the SimCLR training); docs/results/self_supervised.
"""

from experiments.configs import compare_imagenet, self_supervised

SHARED_IMAGES = 10_000
CACHE_DIR = "runs/shared_simclr"


def get_config(arg=None):
  config = self_supervised.get_config(arg)
  sweep = compare_imagenet.get_config(arg)
  config.groups = sweep.groups[:1]
  config.seeds = (0, 1, 2)
  config.categories = config.groups[0]
  config.strategies = ("ours", "tropel")
  config.evaluate_model = "deep_head"
  config.baseline = "tropel"
  config.self_supervised.shared_images = SHARED_IMAGES
  config.self_supervised.shared_seed = 0
  config.self_supervised.cache_dir = CACHE_DIR
  config.self_supervised.epochs = 12
  return config
