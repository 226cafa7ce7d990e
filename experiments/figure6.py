r"""Figure 6: F1 vs labels of Ours / Tropel from the self-supervised and the ImageNet start.

    python experiments/figure6.py --self_supervised=runs/compare_self_supervised \
        --imagenet=runs/compare_imagenet --out=fig6.png

Reads two finished (or partly finished) `rare_jax.compare` workdirs, keeps the groups of the
self-supervised comparison and the seeds both have, and plots the mean F1 over categories
per seed, averaged over seeds, with a 95% Student-t interval over seeds. Prints the numbers
as a Markdown table and writes them beside the figure (OUT.json: each curve's mean, interval
half-width and per-seed values at each budget).
"""

import json
import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rare_jax import compare
from rare_jax.active import metrics  # noqa: E402

CURVES = (  # (label, which workdir, strategy)
  ("Ours-Self", "self", "ours"),
  ("Tropel-Self", "self", "tropel"),
  ("Ours (ImageNet)", "imagenet", "ours"),
  ("Tropel (ImageNet)", "imagenet", "tropel"),
)


def per_seed_means(config, workdir: str) -> dict[str, dict[int, dict[int, float]]]:
  """{strategy: {budget: {seed: mean F1 over every category of every group}}}."""
  out: dict[str, dict[int, dict[int, float]]] = {}
  for strategy, by_seed in compare.collect(config, workdir).items():
    for seed, points in by_seed.items():
      for budget, groups in points.items():
        f1 = [v for p in groups for v in p["f1"]]
        out.setdefault(strategy, {}).setdefault(budget, {})[seed] = float(np.mean(f1))
  return out


def same_groups(imagenet_config, self_config):
  """The ImageNet comparison restricted to the self-supervised one's groups (workdirs g<i>_s*
  are numbered by group: those groups must come first, in the same order, in both)."""
  own = [tuple(g) for g in self_config.groups]
  theirs = [tuple(g) for g in imagenet_config.groups]
  if theirs[: len(own)] != own:
    raise ValueError(
      f"the self-supervised groups {own} must be the first groups of the ImageNet comparison, "
      f"which has {theirs}"
    )
  config = imagenet_config.copy_and_resolve_references()
  config.groups = tuple(own)
  return config


def positives_found(config, workdir: str, strategy: str, seed: int) -> int:
  """Positives among the labels of the last round, summed over the categories of every group."""
  total = 0
  for group_index in range(len(config.groups)):
    path = os.path.join(workdir, compare.run_name(group_index, seed), strategy, "metrics.jsonl")
    records = [r for r in metrics.read_metrics(path) if "positives_found" in r]
    if not records:
      raise ValueError(f"{path} holds no round with positives_found")
    total += int(sum(max(records, key=lambda r: r["round"])["positives_found"]))
  return total


def interval(values) -> tuple[float, float]:
  """(mean, half-width) of the comparison's 95% Student-t interval (NaN half for one value)."""
  t = metrics.t_interval(values)
  return t["mean"], t["high"] - t["mean"]


def main(argv):
  del argv
  self_dir, imagenet_dir = flags.FLAGS.self_supervised, flags.FLAGS.imagenet
  out = flags.FLAGS.out
  from experiments.configs import compare_imagenet, compare_self_supervised

  self_config = compare_self_supervised.get_config()
  imagenet_config = same_groups(compare_imagenet.get_config(), self_config)
  sources = {
    "self": per_seed_means(self_config, self_dir),
    "imagenet": per_seed_means(imagenet_config, imagenet_dir),
  }
  seeds = None
  for name, strategy in ((n, s) for _, n, s in CURVES):
    for by_seed in sources[name].get(strategy, {}).values():
      seeds = set(by_seed) if seeds is None else seeds & set(by_seed)
  if not seeds:
    raise SystemExit("no seed has results in both workdirs for every curve")
  figure, axes = compare._figure()
  rows = {}
  for index, (label, name, strategy) in enumerate(CURVES):
    points = sources[name].get(strategy, {})
    budgets = sorted(b for b, by_seed in points.items() if seeds <= set(by_seed))
    stats_ = [interval([points[b][s] for s in sorted(seeds)]) for b in budgets]
    mean = np.array([m for m, _ in stats_])
    half = np.array([h for _, h in stats_])
    rows[label] = dict(zip(budgets, stats_, strict=True))
    style = "-" if name == "self" else "--"
    shift = (index - (len(CURVES) - 1) / 2) * 0.8  # side by side at each budget
    axes.errorbar(
      np.add(budgets, shift), mean, yerr=half, marker="o", capsize=3, linestyle=style, label=label
    )
  axes.set_xlabel("labels per category")
  axes.set_ylabel(f"mean F1, 95% interval over {len(seeds)} seeds")
  axes.set_ylim(0, 1)
  axes.grid(alpha=0.3)
  axes.set_title("Figure 6: self-supervised vs ImageNet start")
  axes.legend(fontsize=8, loc="best")
  compare._save(figure, out)
  budgets = sorted({b for r in rows.values() for b in r})
  print(f"seeds {sorted(seeds)}; mean F1 ± half-width of the 95% interval over seeds")
  print("| curve | " + " | ".join(f"{b} labels" for b in budgets) + " |")
  print("|---|" + "---|" * len(budgets))
  for label, r in rows.items():
    cells = [f"{r[b][0]:.3f} ± {r[b][1]:.3f}" if b in r else "-" for b in budgets]
    print(f"| {label} | " + " | ".join(cells) + " |")
  print(
    "\npositives found in the pool after the last round, summed over categories, mean over seeds:"
  )
  configs = {"self": self_config, "imagenet": imagenet_config}
  dirs = {"self": self_dir, "imagenet": imagenet_dir}
  for label, name, strategy in CURVES:
    found = [positives_found(configs[name], dirs[name], strategy, seed) for seed in sorted(seeds)]
    print(f"- {label}: {np.mean(found):.1f} (per seed {found})")
  document = {
    label: {
      str(budget): {
        "mean": mean,
        "half_width": half,
        # Each seed's mean F1 over the categories: the interval recomputes from these.
        "per_seed": {str(seed): sources[name][strategy][budget][seed] for seed in sorted(seeds)},
      }
      for budget, (mean, half) in rows[label].items()
    }
    for label, name, strategy in CURVES
  }
  with open(os.path.splitext(out)[0] + ".json", "w") as f:
    json.dump(document, f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  flags.DEFINE_string("self_supervised", None, "compare workdir from the SimCLR start")
  flags.DEFINE_string("imagenet", None, "compare workdir from the ImageNet start")
  flags.DEFINE_string("out", "fig6_self_supervised.png", "PNG to write")
  flags.mark_flags_as_required(["self_supervised", "imagenet"])
  app.run(main)
