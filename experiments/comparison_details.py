r"""Per-category detail of a `rare_jax.compare` workdir: what the mean F1 hides.

    python experiments/comparison_details.py --config=experiments/configs/compare_imagenet.py \
        --workdir=runs/compare_imagenet

For each budget point and strategy: mean F1 and AP per category over seeds, positives found by
the queries (of the pool's positives), and the AP's paired difference against the baseline
with a 95% Student-t interval (AP ranks the whole validation set, so it is less coarse than F1
at p = 0.5 when a category has ~10 validation positives).
"""

import json
import math
import os
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rare_jax import compare
from rare_jax.active import metrics  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "The comparison's config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The comparison's workdir.")


def records_at(config, workdir: str, strategy: str, seed: int, group_index: int) -> dict:
  path = os.path.join(workdir, compare.run_name(group_index, seed), strategy, "metrics.jsonl")
  return {int(r["labels_per_category"]): r for r in metrics.read_metrics(path)}


def main(argv):
  del argv
  config = _CONFIG.value
  workdir = _WORKDIR.value
  baseline = config.get("baseline", "tropel")
  collected = compare.collect(config, workdir)
  seeds = sorted(set.intersection(*(set(by_seed) for by_seed in collected.values())))
  print(f"seeds with every strategy: {seeds}")
  budgets = sorted({b for by_seed in collected.values() for p in by_seed.values() for b in p})
  for budget in budgets:
    print(f"\n## {budget} labels per category")
    rows = {}
    for strategy in collected:
      f1, ap, found, val_pos, pool_pos = [], [], [], [], []
      for seed in seeds:
        points = collected[strategy][seed].get(budget)
        if points is None:
          break
        f1.append([v for p in points for v in p["f1"]])
        ap.append([v for p in points for v in p["ap"]])
        for g in range(len(config.groups)):
          record = records_at(config, workdir, strategy, seed, g)[budget]
          found += record["positives_found"]
          # Images, not weights: a weighted validation set reports its weight sums under
          # num_positives and its image counts under num_positive_images.
          val_pos += record.get("num_positive_images", record["num_positives"])
          with open(os.path.join(workdir, compare.run_name(g, seed), "task.json")) as f:
            task = json.load(f)
          pool_labels = np.asarray(task["pool_labels"])
          pool_pos += [int((pool_labels == c).sum()) for c in task["categories"]]
      if len(f1) == len(seeds):
        rows[strategy] = (np.array(f1), np.array(ap), np.array(found))
        pool_positives = np.array(pool_pos)
    categories = [c for g in config.groups for c in g]
    print("mean F1 per category over seeds (categories " + ", ".join(map(str, categories)) + ")")
    for strategy, (f1, ap, found) in rows.items():
      print(f"  {strategy:12s} F1 " + " ".join(f"{v:.2f}" for v in f1.mean(0)))
      print(f"  {strategy:12s} AP " + " ".join(f"{v:.2f}" for v in ap.mean(0)))
      print(
        f"  {strategy:12s} positives found per category (mean over seeds and categories): "
        f"{found.mean():.1f} of {pool_positives.mean():.1f} in the pool"
      )
    if rows:
      zero = np.all([f1 == 0 for f1, _, _ in rows.values()], axis=0)
      print(
        f"  pairs (seed, category) where every strategy has F1 0: {int(zero.sum())} of "
        f"{zero.size}; validation positives per category: {sorted(set(val_pos))}"
      )
    if baseline in rows:
      base_ap = rows[baseline][1].ravel()
      for strategy, (_, ap, _) in rows.items():
        if strategy == baseline:
          continue
        d = ap.ravel() - base_ap
        half = stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
        print(
          f"  AP {strategy} - {baseline}: {d.mean():+.3f} [{d.mean() - half:+.3f}, "
          f"{d.mean() + half:+.3f}] (n={d.size})"
        )


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
