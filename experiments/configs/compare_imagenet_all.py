r"""Every strategy of the paper from the ImageNet start (issue 29, item 1): Figures 3-5.

    # All strategies (finished ones are skipped), seeds outermost:
    python -m rare_jax.compare --config=experiments/configs/compare_imagenet_all.py \
        --workdir=runs/compare_imagenet_all
    # Only some (and the baseline tropel), seeds outermost; one invocation per strategy runs
    # one strategy over every seed before the next:
    python -m rare_jax.compare --config=experiments/configs/compare_imagenet_all.py:tropel_deep \
        --workdir=runs/compare_imagenet_all
    # The report of every finished strategy (a run with an argument reports only its own):
    python -m rare_jax.compare --config=experiments/configs/compare_imagenet_all.py \
        --workdir=runs/compare_imagenet_all --report_only

`compare_imagenet.py`'s settings (the demo's loop and trunk: EfficientNet-Lite0 from ImageNet
at 48x48, N=2, Q=5, B=10, f_a=100, E=4) on its group 0 (T-shirt/top, Trouser, Coat, Sandal,
Bag) over seeds 0-4, for every entry of `rare_jax.active.runner.STRATEGIES`: Ours and its
frozen-feature and random floors, the baselines of the paper's Figure 3 (Tropel, Tropel-Deep,
KD-Semi at three thresholds, DeepProp, Fully-Supervised), and the ablations of Figures 4-5
(No-Pseudo-Neg, No-BG-Split, No-Linear-Updates, f_a in 10, 30, 300, 1000).

The workdirs `g0_s<seed>` are those of `compare_imagenet.py` (same task, seeds and M_pre), so
a copy of that comparison's group-0 workdirs starts this one with ours, tropel, ours_linear and
random finished. Paired differences are against `tropel`; experiments/paired_values.py derives
those against `ours_linear`. A deep strategy costs about as much as `ours` (two deep updates:
about 7 minutes per seed on this project's 2-core CPU).
"""

from experiments.configs import compare_imagenet
from rare_jax.active import runner


def get_config(arg=None):
  config = compare_imagenet.get_config()
  config.groups = config.groups[:1]
  config.categories = config.groups[0]
  config.strategies = tuple(runner.STRATEGIES)
  if arg:
    chosen = tuple(s.strip() for s in arg.split(",") if s.strip())
    unknown = [s for s in chosen if s not in runner.STRATEGIES]
    if unknown or not chosen:
      what = f"unknown strategies {unknown}" if unknown else "no strategy named"
      raise ValueError(
        f"config argument {arg!r}: {what}; expected a comma-separated subset of "
        f"{sorted(runner.STRATEGIES)}"
      )
    # The baseline of the paired differences must be among them (finished: skipped).
    config.strategies = chosen + tuple(s for s in ("tropel",) if s not in chosen)
  return config
