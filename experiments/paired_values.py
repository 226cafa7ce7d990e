r"""Stores the values behind a comparison's paired differences, and their intervals at two levels.

    # From a comparison workdir (every run's metrics.jsonl): the per-(seed, group, category)
    # values of every strategy and of the baseline, and all intervals.
    python experiments/paired_values.py --results=docs/results/imagenet \
        --workdir=runs/compare_imagenet --config=experiments/configs/compare_imagenet.py

    # From a published results folder alone (its paired_differences.json): what the stored
    # per-seed means allow, the seed-level intervals.
    python experiments/paired_values.py --results=docs/results/imagenet

A paired difference compares two strategies on the same (seed, category): both runs share the
task, the seed images and M_pre. `rare_jax.compare` reports a Student-t interval over those
pairs ("pair level", n = seeds x categories). The categories of one workdir (one seed and one
group) share a deep model and a pool, so their pairs are not independent. The "seed level"
interval is a Student-t interval over the seeds' mean differences (n = seeds): seeds share
nothing, so it is the conservative one.

It rewrites `RESULTS/paired_differences.json` (keeping what `rare_jax.compare` wrote) with, per
strategy and budget:
- `per_seed`: the mean difference of each seed (as `rare_jax.compare` stores it);
- `pair_level` and `seed_level`: `{mean, low, high, n}` of a 95% t interval;
- `per_pair` (only with --workdir): `[{seed, group, category, value, baseline, difference}]`,
  from which every interval can be recomputed.
A comparison between two non-baseline strategies whose differences against the baseline are
both stored is added under `derived` ("A - B"), over the (seed, group, category) pairs both
have (from `per_pair`, else from the `pairs` that `rare_jax.compare` stores; `seeds` names the
seeds), so a strategy run on fewer seeds is compared on those. Files without either: per seed,
(A - base) - (B - base) = A - B exactly, only when both have as many seeds (nothing says which
seeds they are). The JSON holds each pair once (in the
order of `differences` in paired_differences.json, which this script rewrites with sorted
keys: alphabetical); `--derived` picks and orders the table's rows, in either direction.
It also writes `RESULTS/paired_values.md`, a table of both intervals.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

# Run as a script: the repository root on the path, for the configs' `experiments.configs`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIDENCE = 0.95


def t_interval(values) -> dict:
  """`{mean, low, high, n}`: the comparison's Student-t interval at CONFIDENCE."""
  from rare_jax.active import metrics  # numpy and scipy only: no JAX for a published folder

  return metrics.t_interval(values, CONFIDENCE)


def per_pair_values(config, workdir: str) -> dict:
  """{strategy: {budget: [{seed, group, category, value, baseline, difference}]}} of the
  headline F1, strategy against `config.baseline`, read from a comparison workdir."""
  from rare_jax import compare

  collected = compare.collect(config, workdir)
  baseline = config.get("baseline", "tropel")
  base = collected.get(baseline, {})
  out: dict = {}
  for strategy, by_seed in collected.items():
    if strategy == baseline:
      continue
    for seed, points in sorted(by_seed.items()):
      for budget, groups in sorted(points.items()):
        if budget not in base.get(seed, {}):
          continue
        for group_index, (ours, theirs) in enumerate(zip(groups, base[seed][budget], strict=True)):
          categories = config.groups[group_index]
          for category, a, b in zip(categories, ours["f1"], theirs["f1"], strict=True):
            out.setdefault(strategy, {}).setdefault(str(budget), []).append(
              {
                "seed": int(seed),
                "group": group_index,
                "category": int(category),
                "value": float(a),
                "baseline": float(b),
                "difference": float(a) - float(b),
              }
            )
  return out


def seed_means(pairs: list[dict]) -> list[float]:
  seeds = sorted({p["seed"] for p in pairs})
  return [float(np.mean([p["difference"] for p in pairs if p["seed"] == s])) for s in seeds]


def _values_by_pair(entry: dict) -> tuple[str, dict] | None:
  """(kind, {pair key: value}) of an entry: its per-pair values keyed by (seed, group,
  category), else `rare_jax.compare`'s `pairs` keyed by (seed, group, position in the group);
  None when it holds neither."""
  if "per_pair" in entry:
    return "category", {
      (p["seed"], p["group"], p["category"]): p["value"] for p in entry["per_pair"]
    }
  pairs = entry.get("pairs")
  if pairs and "seed" in pairs[0]:
    return "position", {(p["seed"], p["group"], p["position"]): p["value"] for p in pairs}
  return None


def _derived(one: dict, other: dict) -> dict | None:
  """A - B from A's and B's entries against the same baseline, over the (seed, group,
  category) pairs both have (matched by key, so strategies run on different seeds compare on
  the seeds they share). Entries without pair values (older files): per seed by position,
  only when both have the same number of seeds. None when nothing is shared."""
  mine, theirs = _values_by_pair(one), _values_by_pair(other)
  if mine is not None and theirs is not None and mine[0] == theirs[0]:
    shared = sorted(set(mine[1]) & set(theirs[1]))
    if not shared:
      return None
    pairs = [{"seed": key[0], "difference": mine[1][key] - theirs[1][key]} for key in shared]
    per_seed = seed_means(pairs)
    return {
      "per_seed": per_seed,
      "seeds": sorted({p["seed"] for p in pairs}),
      "seed_level": t_interval(per_seed),
      "pair_level": t_interval([p["difference"] for p in pairs]),
    }
  if mine is not None or theirs is not None or len(one["per_seed"]) != len(other["per_seed"]):
    return None
  per_seed = [x - y for x, y in zip(one["per_seed"], other["per_seed"], strict=True)]
  return {"per_seed": per_seed, "seed_level": t_interval(per_seed)}


def enrich(document: dict, pairs: dict | None) -> dict:
  """`paired_differences.json`'s content with per-pair values and both intervals added."""
  differences = document["differences"]
  for strategy, budgets in differences.items():
    for budget, entry in budgets.items():
      if pairs is not None and budget in pairs.get(strategy, {}):
        entry["per_pair"] = pairs[strategy][budget]
        entry["per_seed"] = seed_means(entry["per_pair"])
        entry["pair_level"] = t_interval([p["difference"] for p in entry["per_pair"]])
      else:
        entry["pair_level"] = {k: entry[k] for k in ("mean", "low", "high", "n")}
      entry["seed_level"] = t_interval(entry["per_seed"])
  derived = {}
  names = list(differences)  # the comparison's order of strategies
  for i, a in enumerate(names):
    for b in names[i + 1 :]:
      for budget in differences[a]:
        if budget not in differences[b]:
          continue
        entry = _derived(differences[a][budget], differences[b][budget])
        if entry is not None:
          derived.setdefault(f"{a} - {b}", {})[budget] = entry
  document["derived"] = derived
  if pairs is None and not any(
    "per_pair" in entry for budgets in differences.values() for entry in budgets.values()
  ):
    document["per_pair_values"] = (
      "not stored: this file was written from the per-seed means alone; the pair-level "
      "intervals are the driver's and cannot be recomputed from it"
    )
  else:
    document.pop("per_pair_values", None)
  return document


def _interval(entry: dict | None) -> str:
  """One interval as the comparison's tables write it (`metrics.signed`: no -0.000 from a
  float residue)."""
  from rare_jax.active.metrics import interval_text

  return "not stored" if entry is None else interval_text(entry)


def table(document: dict, wanted_derived=None) -> str:
  """Markdown: both intervals per comparison and budget."""
  baseline = document["baseline"]
  lines = [
    "Paired differences of the headline F1, 95% t intervals. Pair level: over (seed,"
    " category) pairs. Seed level: over the seeds' mean differences.",
    "",
    "| comparison | labels | pair level | seed level |",
    "|---|---|---|---|",
  ]
  for strategy, budgets in document["differences"].items():
    for budget in sorted(budgets, key=int):
      entry = budgets[budget]
      lines.append(
        f"| `{strategy}` - `{baseline}` | {budget} | {_interval(entry['pair_level'])} |"
        f" {_interval(entry['seed_level'])} |"
      )
  derived = document.get("derived", {})
  for name in list(derived) if wanted_derived is None else wanted_derived:
    a, b = name.split(" - ")
    budgets = derived[name] if name in derived else derived[f"{b} - {a}"]
    sign = 1 if name in derived else -1
    for budget in sorted(budgets, key=int):
      entry = budgets[budget]
      lines.append(
        f"| `{a}` - `{b}` | {budget} | {_interval(_signed(entry.get('pair_level'), sign))} |"
        f" {_interval(_signed(entry['seed_level'], sign))} |"
      )
  return "\n".join(lines) + "\n"


def _signed(interval: dict | None, sign: int) -> dict | None:
  """B - A's interval from A - B's (sign -1): the mean negated, the ends swapped."""
  if interval is None or sign == 1:
    return interval
  return dict(interval, mean=-interval["mean"], low=-interval["high"], high=-interval["low"])


def check_derived(document: dict, wanted) -> None:
  """ValueError naming a wanted derived comparison ("A - B") that the document lacks in
  either order."""
  derived = document.get("derived", {})
  for name in wanted or ():
    parts = name.split(" - ")
    if len(parts) != 2 or (name not in derived and f"{parts[1]} - {parts[0]}" not in derived):
      raise ValueError(
        f"--derived: {name!r} is not a derived comparison of these results; expected "
        f"'A - B' (either order) with A and B two strategies sharing pairs, one of "
        f"{sorted(derived)}"
      )


FLAGS = flags.FLAGS


def _define_flags():
  """The script's flags, defined only when it runs (importing it, as the tests do, must not
  define --workdir a second time beside another command's)."""
  flags.DEFINE_string("results", None, "A results folder holding paired_differences.json.")
  flags.DEFINE_string("workdir", None, "Optional: the comparison's workdir (per-pair values).")
  flags.DEFINE_list(
    "derived",
    None,
    "Derived comparisons to list in the table, in this order (default: all). Either order of "
    "a pair: 'ours - no_bg_split' lists 'no_bg_split - ours' negated.",
  )
  flags.mark_flag_as_required("results")
  return config_flags.DEFINE_config_file("config", None, "With --workdir: its config.")


def main(argv):
  del argv
  path = os.path.join(FLAGS.results, "paired_differences.json")
  with open(path) as f:
    document = json.load(f)
  pairs = None
  if FLAGS.workdir:
    if _CONFIG.value is None:
      raise app.UsageError("--workdir needs the comparison's --config")
    if not os.path.isdir(FLAGS.workdir):
      raise app.UsageError(f"--workdir={FLAGS.workdir!r} is not a directory")
    pairs = per_pair_values(_CONFIG.value, FLAGS.workdir)
    if not pairs:
      raise app.UsageError(
        f"--workdir={FLAGS.workdir!r} holds no finished point of a strategy and its baseline "
        f"{_CONFIG.value.get('baseline', 'tropel')!r} under this --config; nothing was written"
      )
    incomplete = [
      f"{strategy} at {budget} labels: {len(pairs.get(strategy, {}).get(budget, []))} pairs, "
      f"the results hold n = {entry['n']}"
      for strategy, budgets in document["differences"].items()
      for budget, entry in budgets.items()
      if len(pairs.get(strategy, {}).get(budget, [])) != entry["n"]
    ]
    if incomplete:
      raise app.UsageError(
        f"--workdir={FLAGS.workdir!r} is not the run behind --results={FLAGS.results!r} (or "
        "is not finished): " + "; ".join(incomplete) + "; nothing was written"
      )
  document = enrich(document, pairs)
  try:
    check_derived(document, FLAGS.derived)
  except ValueError as error:
    raise app.UsageError(f"{error}; nothing was written") from None
  with open(path + ".tmp", "w") as f:
    json.dump(document, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(path + ".tmp", path)
  with open(os.path.join(FLAGS.results, "paired_values.md"), "w") as f:
    f.write(table(document, FLAGS.derived))
  print(table(document, FLAGS.derived))


if __name__ == "__main__":
  _CONFIG = _define_flags()
  app.run(main)
