r"""Per-category detail of a `rare_jax.compare` workdir: what the mean F1 hides.

    python experiments/comparison_details.py --config=experiments/configs/compare_imagenet.py \
        --workdir=runs/compare_imagenet

For each budget point and strategy: mean F1 and AP per category over seeds, positives found by
the queries (of the pool's positives), and the AP's paired difference against the baseline
with a 95% Student-t interval (AP ranks the whole validation set, so it is less coarse than F1
at p = 0.5 when a category has ~10 validation positives). With a fully supervised strategy,
every other strategy's F1 and AP at each budget minus it, over pairs and over seeds.
"""

import json
import os
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rare_jax import compare
from rare_jax.active import metrics, runner  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags():
  """The script's flags, defined only when it runs (importing it, as the tests do, must not
  define --config and --workdir a second time beside another command's)."""
  flags.DEFINE_string("workdir", None, "The comparison's workdir.")
  config = config_flags.DEFINE_config_file("config", None, "The comparison's config file.")
  flags.mark_flags_as_required(["config", "workdir"])
  return config


def records_at(config, workdir: str, strategy: str, seed: int, group_index: int) -> dict:
  """{budget: metrics record} of one run; the fully supervised record under `compare.ALL_LABELS`
  (its labels_per_category is the pool size, which differs between groups)."""
  path = os.path.join(workdir, compare.run_name(group_index, seed), strategy, "metrics.jsonl")
  records = metrics.read_metrics(path)
  if runner.strategy_spec(strategy)["kind"] == "fully_supervised":
    return {compare.ALL_LABELS: records[-1]} if records else {}
  return {int(r["labels_per_category"]): r for r in records}


def minus_all_labels(collected: dict, upper: str) -> list[dict]:
  """Every other strategy at each of its budgets minus `upper`'s one point (a fully supervised
  run, under `compare.ALL_LABELS`), F1 and AP paired over (seed, category) of the seeds both
  finished: `{strategy, budget, metric, seeds, pairs, over_seeds}`, the last two
  `metrics.t_interval`s over the pairs and over the seeds' means over categories."""
  upper_points = {s: p[compare.ALL_LABELS] for s, p in collected[upper].items() if p}
  rows = []
  for strategy, by_seed in collected.items():
    if strategy == upper:
      continue
    budgets = sorted({b for points in by_seed.values() for b in points} - {compare.ALL_LABELS})
    for budget in budgets:
      seeds = sorted(s for s, points in by_seed.items() if budget in points and s in upper_points)
      if not seeds:
        continue
      for metric in ("f1", "ap"):
        d = np.array([_values(by_seed[s][budget], metric) for s in seeds], float) - np.array(
          [_values(upper_points[s], metric) for s in seeds], float
        )
        rows.append(
          dict(
            strategy=strategy,
            budget=budget,
            metric=metric,
            seeds=seeds,
            pairs=metrics.t_interval(d),
            over_seeds=metrics.t_interval(d.mean(axis=1)),
          )
        )
  return rows


def _values(points: list[dict], metric: str) -> list[float]:
  """One value per category of every group."""
  return [v for p in points for v in p[metric]]


def main(argv):
  del argv
  config = _CONFIG.value
  workdir = FLAGS.workdir
  baseline = config.get("baseline", "tropel")
  collected = compare.collect(config, workdir)
  if not collected:
    raise app.UsageError(
      f"--workdir={workdir!r} holds no finished run of the strategies "
      f"{list(config.strategies)}; expected a rare_jax.compare workdir of this config"
    )
  # Each strategy over the seeds it finished (a comparison may be partial, and strategies can
  # have different seeds); a paired difference over the seeds both strategies have.
  for strategy, by_seed in collected.items():
    print(f"{strategy}: seeds {sorted(by_seed)}")
  budgets = sorted({b for by_seed in collected.values() for p in by_seed.values() for b in p})
  for budget in budgets:
    title = "every pool label (fully supervised)" if budget == compare.ALL_LABELS else ""
    print(f"\n## {title or f'{budget} labels per category'}")
    rows = {}  # strategy: (seeds, F1 [seeds, categories], AP, positives found)
    pool_positives = None
    val_pos = []
    for strategy, by_seed in collected.items():
      seeds = sorted(s for s, points in by_seed.items() if budget in points)
      if not seeds:
        continue
      f1, ap, found, pool_pos = [], [], [], []
      for seed in seeds:
        points = by_seed[seed][budget]
        f1.append([v for p in points for v in p["f1"]])
        ap.append([v for p in points for v in p["ap"]])
        for g in range(len(config.groups)):
          record = records_at(config, workdir, strategy, seed, g)[budget]
          found += record.get("positives_found", [])
          # Images, not weights: a weighted validation set reports its weight sums under
          # num_positives and its image counts under num_positive_images.
          val_pos += record.get("num_positive_images", record["num_positives"])
          with open(os.path.join(workdir, compare.run_name(g, seed), "task.json")) as f:
            task = json.load(f)
          pool_labels = np.asarray(task["pool_labels"])
          pool_pos += [int((pool_labels == c).sum()) for c in task["categories"]]
      rows[strategy] = (seeds, np.array(f1), np.array(ap), np.array(found, float))
      pool_positives = np.array(pool_pos)
    categories = [c for g in config.groups for c in g]
    print("mean F1 per category over seeds (categories " + ", ".join(map(str, categories)) + ")")
    for strategy, (seeds, f1, ap, found) in rows.items():
      print(
        f"  {strategy:12s} F1 "
        + " ".join(f"{v:.2f}" for v in f1.mean(0))
        + f" ({len(seeds)} seed{'' if len(seeds) == 1 else 's'})"
      )
      print(f"  {strategy:12s} AP " + " ".join(f"{v:.2f}" for v in ap.mean(0)))
      if found.size:
        print(
          f"  {strategy:12s} positives found per category (mean over seeds and categories): "
          f"{found.mean():.1f} of {pool_positives.mean():.1f} in the pool"
        )
    common = sorted(set.intersection(*(set(seeds) for seeds, *_ in rows.values()))) if rows else []
    if common:
      zero = np.all(
        [f1[[seeds.index(s) for s in common]] == 0 for seeds, f1, _, _ in rows.values()], axis=0
      )
      print(
        f"  pairs (seed, category) of seeds {common} where every strategy has F1 0: "
        f"{int(zero.sum())} of {zero.size}; validation positives per category: "
        f"{sorted(set(val_pos))}"
      )
    if baseline in rows:
      base_seeds, _, base_ap, _ = rows[baseline]
      for strategy, (seeds, _, ap, _) in rows.items():
        shared = [s for s in seeds if s in base_seeds]
        if strategy == baseline or not shared:
          continue
        d = (
          ap[[seeds.index(s) for s in shared]] - base_ap[[base_seeds.index(s) for s in shared]]
        ).ravel()
        t = metrics.t_interval(d)
        print(
          f"  AP {strategy} - {baseline}: {t['mean']:+.3f} [{t['low']:+.3f}, "
          f"{t['high']:+.3f}] (n={t['n']}, seeds {shared})"
        )

  for upper in collected:
    if runner.strategy_spec(upper)["kind"] != "fully_supervised":
      continue
    print(f"\n## minus {upper} (every pool label), paired over the seeds both finished")
    for row in minus_all_labels(collected, upper):
      print(
        f"  {row['metric'].upper()} {row['strategy']} at {row['budget']} - {upper}: "
        f"pairs {metrics.interval_text(row['pairs'])}; "
        f"seed means {metrics.interval_text(row['over_seeds'])}; "
        f"seeds {row['seeds']}"
      )


if __name__ == "__main__":
  _CONFIG = _define_flags()
  app.run(main)
