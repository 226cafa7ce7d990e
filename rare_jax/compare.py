r"""Runs the paper's comparisons: strategies x groups x seeds, then Figures 3-5 and a table.

    python -m rare_jax.compare --config=experiments/configs/compare_fmnist.py \
        --workdir=runs/compare [--report_only]

The config is a run config (see experiments/configs/demo.py) plus `groups` (tuples of rare
categories, one shared deep model each) and `seeds`. Every (group, seed) gets its own workdir,
WORKDIR/g{group}_s{seed}, made by `rare_jax.workdirs.prepare` from the config with
`categories` and `seed` set: its task, M_pre and cached features are built once and shared by
all its strategies; `python -m rare_jax.replay --workdir=WORKDIR/g0_s0 --strategies=ours,tropel`
replays its runs.

Started again with the same command, finished strategies are skipped and interrupted ones
resume from their checkpoints (see rare_jax.active.runner); strategies may be added to or dropped
from the config between starts. The report is rewritten after each strategy, so partial
results are always on disk; it holds finished runs only (a run under way or cut short is named
and left out, so every number of a strategy is over the same seeds):

    WORKDIR/results.md              mean F1 (+- std over seeds) per strategy and budget point,
                                    and the pseudo-positives' false-positive rate
    WORKDIR/results.json            the same numbers
    WORKDIR/paired_differences.json each strategy's F1 minus `config.baseline`'s (default
                                    tropel), paired by seed and category, 95% intervals
                                    (also in results.md and paired_differences.png)
    WORKDIR/fig3_baselines.png      F1 vs labels per category: Ours and the baselines
    WORKDIR/fig4_pseudo_label_fpr.png  FPR of KD-Semi's and DeepProp's pseudo-positives
    WORKDIR/fig5_ablations.png      F1 vs labels: Ours and the ablations
    WORKDIR/timings.jsonl           wall seconds per (workdir, strategy) session

The model evaluated at a budget point (docs/method.md): the deep model's main head after that
update for strategies with deep updates, the linear models for frozen-feature strategies.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from rare_jax import workdirs
from rare_jax.active import labelers, metrics, runner
from rare_jax.deep import strategies
from rare_jax.infra import cli_help, provenance, sharding

FIGURE_3 = ("ours", "ours_linear", "tropel", "tropel_deep", "kd_semi", "deep_prop", "random")
FIGURE_5 = ("ours", "no_pseudo_neg", "no_bg_split", "no_linear_updates")
COMPARE_KEYS = ("groups", "seeds", "evaluate_model", "baseline")  # the comparison's, not a run's
EVALUATE_MODELS = ("deep_head", "linear")
ALL_LABELS = 0  # the budget key of the fully supervised point (every pool label)


def run_name(group_index: int, seed: int) -> str:
  return f"g{group_index}_s{seed}"


def run_config(config: ml_collections.ConfigDict, group: Sequence[int], seed: int):
  """The plain run config of one (group, seed): `categories` and `seed` set, no sweep keys.

  Its `strategies` are empty: the workdir's config.json then does not change when strategies
  are added to or dropped from the comparison, so finished ones are kept (replay a workdir
  with `python -m rare_jax.replay --workdir=... --strategies=ours,tropel`).
  """
  sub = config.copy_and_resolve_references()
  with sub.unlocked():
    for key in COMPARE_KEYS:
      if key in sub:
        del sub[key]
    sub.categories = tuple(int(c) for c in group)
    sub.seed = int(seed)
    sub.strategies = ()
  return sub


def select_groups(
  train_labels: np.ndarray,
  *,
  num_groups: int,
  group_size: int,
  min_count: int,
  max_count: int,
  seed: int,
) -> tuple[tuple[int, ...], ...]:
  """Rare-category groups drawn from the classes with `min_count..max_count` train images.

  The paper's iNaturalist setting: 50 categories with 50-1,500 training images each, in 5
  groups of 10. Seeded; classes are drawn without replacement, groups sorted.
  """
  counts = np.bincount(np.asarray(train_labels, np.int64))
  candidates = np.flatnonzero((counts >= min_count) & (counts <= max_count))
  needed = num_groups * group_size
  if len(candidates) < needed:
    raise ValueError(
      f"{len(candidates)} classes have {min_count}-{max_count} train images; expected at least "
      f"{needed} ({num_groups} groups of {group_size})"
    )
  chosen = np.random.default_rng(seed).choice(candidates, needed, replace=False)
  return tuple(
    tuple(sorted(int(c) for c in chosen[i * group_size : (i + 1) * group_size]))
    for i in range(num_groups)
  )


def resolve_groups(config, workdir: str, *, log: Callable[[str], None] = print):
  """`config` with `groups` filled in: as given, or (empty groups) drawn once by
  `select_groups` from `config.group_selection` and the train split's labels, and kept in
  WORKDIR/groups.json so that a restarted run uses the same groups."""
  if tuple(config.groups):
    return config
  path = os.path.join(workdir, "groups.json")
  if os.path.exists(path):
    with open(path) as f:
      groups = tuple(tuple(g) for g in json.load(f))
  else:
    from rare_jax.data import sources

    source = sources.open_source(
      config.dataset, config.get("train_split", "train"), config.data_dir or None
    )
    groups = select_groups(source.labels(), **dict(config.group_selection))
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
      json.dump([list(g) for g in groups], f)
    log(f"selected groups {groups} ({path})")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.groups = groups
    config.categories = groups[0]
  return config


def check_config(config) -> None:
  """ValueError for a bad sweep before any work: groups, seeds, strategies."""
  groups = [tuple(g) for g in config.groups]
  if not groups or any(len(g) == 0 for g in groups):
    raise ValueError(f"config.groups must be non-empty tuples of categories, got {groups}")
  flat = [c for g in groups for c in g]
  if len(set(flat)) != len(flat):
    raise ValueError(f"config.groups must not share a category, got {groups}")
  if not tuple(config.seeds):
    raise ValueError("config.seeds must name at least one seed")
  baseline = config.get("baseline")
  if baseline is not None and baseline not in tuple(config.strategies):
    raise ValueError(
      f"config.baseline={baseline!r} is not one of config.strategies {tuple(config.strategies)}"
    )
  for strategy in config.strategies:
    spec = runner.strategy_spec(strategy)
    runner.loop_config(config, strategy)
    if spec["deep_updates"] and config.features != "m_pre":
      raise ValueError(
        f"strategy {strategy!r} trains the deep model: it needs config.features='m_pre', "
        f"got {config.features!r}"
      )


def is_finished(run_dir: str, config, strategy: str) -> bool:
  """Whether `run_dir` holds the last round's metrics (or, fully supervised, its record)."""
  records = metrics.read_metrics(os.path.join(run_dir, "metrics.jsonl"))
  if runner.strategy_spec(strategy)["kind"] == "fully_supervised":
    return bool(records)
  last = runner.num_rounds(runner.strategy_config(config, strategy))
  return any(r.get("round") == last for r in records)


def run_all(config, workdir: str, *, log: Callable[[str], None] = print, report=None) -> None:
  """Runs every (seed, group, strategy) not finished yet; seeds outermost, so a run cut short
  holds whole seeds. `report()` is called after each strategy."""
  config = resolve_groups(config, workdir, log=log)
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  timings = os.path.join(workdir, "timings.jsonl") if sharding.is_primary() else None
  for seed in config.seeds:
    for group_index, group in enumerate(config.groups):
      sub = run_config(config, group, seed)
      directory = os.path.join(workdir, run_name(group_index, seed))
      pending = [
        s for s in config.strategies if not is_finished(os.path.join(directory, s), sub, s)
      ]
      if not pending:
        log(f"== {run_name(group_index, seed)}: all {len(config.strategies)} strategies finished")
        continue
      log(f"== {run_name(group_index, seed)}: categories {tuple(group)}, to run: {pending}")
      start = time.perf_counter()
      context = workdirs.prepare(directory, sub, log=log)
      with metrics.MetricsWriter(timings) as writer:
        writer.write(
          {"run": run_name(group_index, seed), "strategy": "prepare", "seconds": _since(start)}
        )
      for strategy in pending:
        start = time.perf_counter()
        run_strategy(context, directory, strategy, log=log)
        with metrics.MetricsWriter(timings) as writer:
          writer.write(
            {"run": run_name(group_index, seed), "strategy": strategy, "seconds": _since(start)}
          )
        if report is not None:
          report()
      # Every deep update and embedding compiles anew; without this, a driver process that ran
      # 4 workdirs died in LLVM with "Cannot allocate memory" (measured on the embedded default).
      del context
      _ENGINES.clear()
      jax.clear_caches()


def _since(start: float) -> float:
  return round(time.perf_counter() - start, 1)


_ENGINES: dict = {}  # LoopConfig -> runner.Engine: strategies sharing one compile once


def run_strategy(context, directory: str, strategy: str, *, log=print) -> list[dict]:
  """One strategy of one workdir (resumes; returns its metrics records)."""
  run_dir = os.path.join(directory, strategy)
  if runner.strategy_spec(strategy)["kind"] == "fully_supervised":
    return strategies.run_fully_supervised(run_dir=run_dir, context=context, log=log)
  return runner.run_strategy(
    run_dir=run_dir,
    config=context.config,
    strategy=strategy,
    features=context.features,
    val_features=context.val_features,
    seed_ids=context.task.seed_positives,
    val_ground_truth=context.task.val_ground_truth(),
    val_weights=context.task.val_weights,
    labeler=labelers.SimulatedLabeler(context.task.ground_truth()),
    updater=context.updater(strategy, log=log),
    log=log,
    engine=_ENGINES.setdefault(
      runner.loop_config(context.config, strategy),
      runner.Engine(runner.loop_config(context.config, strategy)),
    ),
  )


# ----------------------------------------------------------------------------------------------
# Collecting and aggregating.


def evaluation_points(
  records: Sequence[Mapping], config, strategy: str, *, headline: str = "deep_head"
) -> dict[int, dict]:
  """{labels per category: point} of one strategy's run at its budget points.

  A point has per-category lists: `linear_f1` (the linear models after that round, on the
  features of the latest deep update), for deep strategies `deep_f1` (the deep main head after
  that update) and the pseudo-label error rates (`pseudo_positive_fpr`,
  `num_pseudo_positives`), and `f1`, the headline: with `headline` "deep_head" (docs/method.md's
  choice, the default) the deep main head for deep strategies and the linear models for
  frozen-feature ones; with "linear" the linear models for every strategy.

  Args:
    records: the run's metrics records.
    config: the run config (the comparison's, or one workdir's).
    strategy: the run's strategy.
    headline: the comparison's `config.evaluate_model`.
  """
  spec = runner.strategy_spec(strategy)
  if headline not in EVALUATE_MODELS:
    raise ValueError(f"config.evaluate_model must be one of {EVALUATE_MODELS}, got {headline!r}")
  points = {}
  if spec["kind"] == "fully_supervised":
    for record in records:
      point = {"linear_f1": record["f1"], "f1": record["f1"], "ap": _ap(record)}
      if "deep" in record:
        point["deep_f1"] = record["deep"]["f1"]
        if headline == "deep_head":
          point["f1"], point["ap"] = point["deep_f1"], _ap(record["deep"])
      points[ALL_LABELS] = point  # the pool size differs between groups: one key for all
    return points
  per_update = int(runner.strategy_config(config, strategy).rounds_per_update)
  for record in records:
    if int(record["round"]) % per_update:
      continue
    point = {"linear_f1": record["f1"], "f1": record["f1"], "ap": _ap(record)}
    if spec["deep_updates"]:
      if "deep" not in record:
        continue
      point["deep_f1"] = record["deep"]["f1"]
      if headline == "deep_head":
        point["f1"], point["ap"] = point["deep_f1"], _ap(record["deep"])
      pseudo = record["deep"].get("pseudo_labels")
      if pseudo is not None:
        point["pseudo_positive_fpr"] = pseudo["pseudo_positive_fpr"]
        point["num_pseudo_positives"] = pseudo["num_pseudo_positives"]
    points[int(record["labels_per_category"])] = point
  return points


def _ap(record: Mapping) -> list:
  return record.get("average_precision", [])


def unfinished_runs(config, workdir: str) -> list[str]:
  """`g<group>_s<seed>/<strategy>` of every run that started and has not finished."""
  out = []
  for strategy in config.strategies:
    for seed in config.seeds:
      for group_index, group in enumerate(config.groups):
        name = os.path.join(run_name(group_index, seed), strategy)
        run_dir = os.path.join(workdir, name)
        started = os.path.exists(os.path.join(run_dir, "metrics.jsonl"))
        if started and not is_finished(run_dir, run_config(config, group, seed), strategy):
          out.append(name)
  return out


def collect(config, workdir: str) -> dict[str, dict[int, dict[int, list[dict]]]]:
  """{strategy: {seed: {budget: [point per group]}}}, only budgets every group reached, and only
  (strategy, seed)s whose runs all finished: a run under way or cut short adds nothing (its
  early budgets would change n between budgets and mix seeds); `unfinished_runs` names them."""
  out: dict[str, dict[int, dict[int, list[dict]]]] = {}
  headline = config.get("evaluate_model", "deep_head")
  for strategy in config.strategies:
    for seed in config.seeds:
      by_group = []
      for group_index, group in enumerate(config.groups):
        sub = run_config(config, group, seed)
        run_dir = os.path.join(workdir, run_name(group_index, seed), strategy)
        records = metrics.read_metrics(os.path.join(run_dir, "metrics.jsonl"))
        if records and not is_finished(run_dir, sub, strategy):
          by_group = []
          break
        by_group.append(evaluation_points(records, sub, strategy, headline=headline))
      budgets = set.intersection(*(set(points) for points in by_group)) if by_group else set()
      if budgets:
        out.setdefault(strategy, {})[int(seed)] = {
          budget: [points[budget] for points in by_group] for budget in sorted(budgets)
        }
  return out


def _mean_over_categories(points: Sequence[dict], key: str) -> float:
  """Mean over every category of every group (NaN entries, e.g. an empty FPR, skipped)."""
  values = np.array(
    [np.nan if v is None else v for p in points for v in p.get(key, [])], dtype=float
  )
  values = values[~np.isnan(values)]
  return float(values.mean()) if values.size else math.nan


def aggregate(collected: Mapping) -> dict[str, dict[int, dict[str, Any]]]:
  """{strategy: {budget: {mean_f1, std_f1, linear_mean_f1, deep_mean_f1, mean_ap, fpr,
  num_pseudo_positives, n}}}.

  Per seed, F1 is the mean over all categories of all groups; mean and std (population, ddof
  0) are over seeds; n is the number of seeds. `fpr` is the mean over seeds of the mean over
  categories with pseudo-positives; `num_pseudo_positives` the mean per category.
  """
  out: dict[str, dict[int, dict[str, Any]]] = {}
  for strategy, by_seed in collected.items():
    budgets = sorted({b for points in by_seed.values() for b in points})
    for budget in budgets:
      seeds = [points[budget] for points in by_seed.values() if budget in points]
      f1 = [_mean_over_categories(p, "f1") for p in seeds]
      linear = [_mean_over_categories(p, "linear_f1") for p in seeds]
      deep_head = [_mean_over_categories(p, "deep_f1") for p in seeds]
      average_precision = [_mean_over_categories(p, "ap") for p in seeds]
      fpr = [_mean_over_categories(p, "pseudo_positive_fpr") for p in seeds]
      count = [_mean_over_categories(p, "num_pseudo_positives") for p in seeds]
      out.setdefault(strategy, {})[budget] = {
        "mean_f1": float(np.mean(f1)),
        "std_f1": float(np.std(f1)),
        "linear_mean_f1": _nanmean(linear),
        "deep_mean_f1": _nanmean(deep_head),
        "mean_ap": _nanmean(average_precision),
        "fpr": _nanmean(fpr),
        "num_pseudo_positives": _nanmean(count),
        "n": len(seeds),
      }
  return out


def paired_differences(
  collected: Mapping, baseline: str, *, confidence: float = 0.95
) -> dict[str, dict[int, dict[str, Any]]]:
  """{strategy: {budget: {mean, low, high, n, better, worse}}}: headline F1 of `strategy`
  minus `baseline`'s, paired by (seed, group, category), with a Student-t interval.

  Each (seed, category) is one pair: both runs share the task, the seeds and M_pre, so the
  pairing removes what the category and the draw of the pool contribute. `better` / `worse`
  count the pairs where the strategy is ahead / behind. The interval treats pairs as
  independent; categories of one workdir share its deep model, so it is somewhat optimistic
  when deep updates correlate categories. Beside it: `per_seed` (each seed's mean difference),
  `seed_level` (`{mean, low, high, n}`, a t interval over those: seeds share nothing) and
  `pairs` (`[{seed, group, position, value, baseline}]`: the headline F1 of both strategies
  per pair, `position` the category's index within `config.groups[group]`), so every interval
  can be recomputed from the stored file.
  """
  if baseline not in collected:
    return {}
  base = collected[baseline]
  out: dict[str, dict[int, dict[str, Any]]] = {}
  for strategy, by_seed in collected.items():
    if strategy == baseline or runner.strategy_spec(strategy)["kind"] != "loop":
      continue
    budgets = sorted({b for points in by_seed.values() for b in points})
    for budget in budgets:
      pairs, per_seed = [], []
      for seed, points in by_seed.items():
        if budget not in points or budget not in base.get(seed, {}):
          continue
        seed_pairs = [
          {"seed": int(seed), "group": g, "position": c, "value": float(a), "baseline": float(b)}
          for g, (ours, theirs) in enumerate(zip(points[budget], base[seed][budget], strict=True))
          for c, (a, b) in enumerate(zip(ours["f1"], theirs["f1"], strict=True))
        ]
        pairs += seed_pairs
        per_seed.append(float(np.mean([p["value"] - p["baseline"] for p in seed_pairs])))
      if not pairs:
        continue
      d = np.asarray([p["value"] - p["baseline"] for p in pairs])
      out.setdefault(strategy, {})[budget] = {
        **metrics.t_interval(d, confidence),
        "better": int((d > 0).sum()),
        "worse": int((d < 0).sum()),
        "per_seed": per_seed,
        "seed_level": metrics.t_interval(per_seed, confidence),
        "pairs": pairs,
      }
  return out


def paired_table(paired: Mapping, baseline: str, *, confidence: float = 0.95) -> str:
  """Markdown: mean paired difference [interval] per strategy and budget."""
  if not paired:
    return ""
  signed = metrics.signed
  budgets = sorted({b for points in paired.values() for b in points})
  lines = [
    "",
    f"Paired differences of the headline F1, strategy minus `{baseline}` (same seed and "
    f"category), mean [{confidence:.0%} interval over pairs] (pairs ahead / behind / n; "
    "the interval over the seeds' mean differences):",
    "",
    "| strategy | " + " | ".join(f"{b} labels" for b in budgets) + " |",
    "|---|" + "---|" * len(budgets),
  ]
  for strategy, points in paired.items():
    cells = []
    for b in budgets:
      p = points.get(b)
      if p is None:
        cells.append("-")
      else:
        seeds = p.get("seed_level")
        if not seeds:
          seed_cell = ""
        elif seeds["n"] < 2:  # one seed's mean: no interval over seeds
          seed_cell = f"; {seeds['n']} seed"
        else:
          seed_cell = f"; seeds [{signed(seeds['low'])}, {signed(seeds['high'])}]"
        cells.append(
          f"{signed(p['mean'])} [{signed(p['low'])}, {signed(p['high'])}] "
          f"({p['better']}/{p['worse']}/{p['n']}{seed_cell})"
        )
    lines.append("| " + " | ".join([strategy, *cells]) + " |")
  return "\n".join(lines) + "\n"


def plot_paired(paired: Mapping, baseline: str, path: str) -> str | None:
  """Mean paired difference vs labels per category with its interval as error bars."""
  if not paired:
    return None
  figure, axes = _figure()
  offsets = np.linspace(-1.5, 1.5, len(paired)) if len(paired) > 1 else [0.0]
  for offset, (strategy, points) in zip(offsets, paired.items(), strict=True):
    budgets = sorted(points)
    mean = np.array([points[b]["mean"] for b in budgets])
    low = np.array([points[b]["low"] for b in budgets])
    high = np.array([points[b]["high"] for b in budgets])
    axes.errorbar(
      np.asarray(budgets) + offset,
      mean,
      yerr=[mean - low, high - mean],
      marker="o",
      capsize=3,
      color=_color(strategy),
      label=strategy,
    )
  axes.axhline(0.0, color="k", linewidth=0.8)
  axes.set_xlabel("labels per category")
  axes.set_ylabel(f"F1 minus {baseline}'s (same seed, category)")
  axes.grid(alpha=0.3)
  axes.set_title(f"Paired differences against {baseline}, 95% intervals")
  axes.legend(fontsize=8, loc="best")
  return _save(figure, path)


def _nanmean(values) -> float:
  values = np.asarray(values, float)
  values = values[~np.isnan(values)]
  return float(values.mean()) if values.size else math.nan


# ----------------------------------------------------------------------------------------------
# Reporting.


def _loop_budgets(aggregated: Mapping) -> list[int]:
  return sorted(
    {
      b
      for strategy, points in aggregated.items()
      if runner.strategy_spec(strategy)["kind"] == "loop"
      for b in points
    }
  )


def _cell(point: Mapping | None, key: str = "mean_f1", spread: str | None = "std_f1") -> str:
  if point is None or point.get(key) is None or math.isnan(point[key]):
    return "-"
  text = f"{point[key]:.3f}"
  if spread is not None:
    text += f" ± {point[spread]:.3f}"
  return text


def markdown_table(aggregated: Mapping, *, title: str = "") -> str:
  """Mean F1 (± std over seeds) per strategy and labels per category; the FPR table below."""
  budgets = _loop_budgets(aggregated)
  lines = [f"## {title}", ""] if title else []
  header = ["strategy", *(f"{b} labels" for b in budgets), "all labels", "seeds"]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for strategy, points in aggregated.items():
    if runner.strategy_spec(strategy)["kind"] == "fully_supervised":
      point = next(iter(points.values()))
      cells = ["-"] * len(budgets) + [_cell(point)]
    else:
      cells = [_cell(points.get(b)) for b in budgets] + ["-"]
    seeds = max((p["n"] for p in points.values()), default=0)
    lines.append("| " + " | ".join([strategy, *cells, str(seeds)]) + " |")
  deep_rows = [
    (strategy, points)
    for strategy, points in aggregated.items()
    if runner.strategy_spec(strategy)["kind"] == "loop"
    and runner.strategy_spec(strategy)["deep_updates"]
  ]
  lines += [
    "",
    "Average precision of the same (headline) models, mean over seeds:",
    "",
    "| strategy | " + " | ".join(f"{b} labels" for b in budgets) + " | all labels |",
    "|---|" + "---|" * (len(budgets) + 1),
  ]
  for strategy, points in aggregated.items():
    if runner.strategy_spec(strategy)["kind"] == "fully_supervised":
      cells = ["-"] * len(budgets) + [_cell(next(iter(points.values())), "mean_ap", None)]
    else:
      cells = [_cell(points.get(b), "mean_ap", None) for b in budgets] + ["-"]
    lines.append("| " + " | ".join([strategy, *cells]) + " |")
  both_rows = deep_rows + [
    (strategy, points)
    for strategy, points in aggregated.items()
    if runner.strategy_spec(strategy)["kind"] == "fully_supervised"
  ]
  for key, what in (
    ("deep_mean_f1", "The deep main head"),
    ("linear_mean_f1", "The linear models on the updated features"),
  ):
    if not both_rows:
      break
    lines += [
      "",
      f"{what} at the same points (mean F1 over seeds):",
      "",
      "| strategy | " + " | ".join(f"{b} labels" for b in budgets) + " | all labels |",
      "|---|" + "---|" * (len(budgets) + 1),
    ]
    for strategy, points in both_rows:
      if runner.strategy_spec(strategy)["kind"] == "fully_supervised":
        cells = ["-"] * len(budgets) + [_cell(next(iter(points.values())), key, None)]
      else:
        cells = [_cell(points.get(b), key, None) for b in budgets] + ["-"]
      lines.append("| " + " | ".join([strategy, *cells]) + " |")
  pseudo_rows = [
    (strategy, points)
    for strategy, points in deep_rows
    if runner.strategy_spec(strategy)["pseudo_positives"] is not None
  ]
  if pseudo_rows:
    lines += [
      "",
      "False-positive rate of the pseudo-positives used by each deep update (Figure 4), with",
      "their mean number per category in brackets (`-`: none that update):",
      "",
      "| strategy | " + " | ".join(f"{b} labels" for b in budgets) + " |",
      "|---|" + "---|" * len(budgets),
    ]
    for strategy, points in pseudo_rows:
      cells = []
      for b in budgets:
        point = points.get(b)
        if point is None:
          cells.append("-")
        else:
          cells.append(f"{_cell(point, 'fpr', None)} ({point['num_pseudo_positives']:.0f})")
      lines.append("| " + " | ".join([strategy, *cells]) + " |")
  return "\n".join(lines) + "\n"


def _color(strategy: str) -> str:
  """One color per strategy in every figure (matplotlib's tab20, by table order)."""
  import matplotlib

  index = list(runner.STRATEGIES).index(strategy)
  return matplotlib.colormaps["tab20"](index % 20)


def _figure():
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global state
  from matplotlib.figure import Figure

  figure = Figure(figsize=(7, 4.5), dpi=100)
  FigureCanvasAgg(figure)
  return figure, figure.add_subplot(1, 1, 1)


def _save(figure, path: str) -> str:
  temporary = path + ".tmp.png"
  figure.savefig(temporary, format="png", bbox_inches="tight")
  os.replace(temporary, path)
  return path


def plot_f1_curves(
  aggregated: Mapping, names: Sequence[str], path: str, *, title: str, key: str = "mean_f1"
) -> str | None:
  """Mean F1 vs labels per category with a band of ± std over seeds; fully supervised as a
  dashed level. None (nothing written) when no strategy of `names` has results."""
  present = [n for n in names if n in aggregated]
  if not present:
    return None
  figure, axes = _figure()
  top = 0.0
  seeds = {s: max(p["n"] for p in aggregated[s].values()) for s in present}
  for strategy in present:
    points = aggregated[strategy]
    top = max(top, *(p[key] + p["std_f1"] for p in points.values()))
    # Strategies over fewer seeds than others (a comparison under way) say how many.
    notes = ["all labels"] if runner.strategy_spec(strategy)["kind"] == "fully_supervised" else []
    if len(set(seeds.values())) > 1:
      notes.append(f"{seeds[strategy]} seed{'' if seeds[strategy] == 1 else 's'}")
    label = f"{strategy} ({', '.join(notes)})" if notes else strategy
    if runner.strategy_spec(strategy)["kind"] == "fully_supervised":
      point = next(iter(points.values()))
      axes.axhline(point["mean_f1"], color="k", linestyle="--", label=label)
      continue
    budgets = sorted(points)
    mean = np.array([points[b][key] for b in budgets])
    std = np.array([points[b]["std_f1"] for b in budgets])
    color = _color(strategy)
    axes.plot(budgets, mean, marker="o", color=color, label=label)
    axes.fill_between(budgets, mean - std, mean + std, color=color, alpha=0.15)
  axes.set_xlabel("labels per category")
  axes.set_ylabel("mean F1 (p >= 0.5), ± std over seeds")
  axes.set_ylim(0, min(1.0, 1.15 * top + 0.02))
  axes.grid(alpha=0.3)
  axes.set_title(title)
  axes.legend(fontsize=8, loc="best")
  return _save(figure, path)


def plot_fpr(aggregated: Mapping, path: str, *, title: str) -> str | None:
  """Figure 4: false-positive rate of the pseudo-positives per deep update."""
  present = [
    s
    for s in aggregated
    if runner.strategy_spec(s)["kind"] == "loop"
    and runner.strategy_spec(s)["pseudo_positives"] is not None
  ]
  if not present:
    return None
  figure, axes = _figure()
  for strategy in present:
    points = aggregated[strategy]
    budgets = [b for b in sorted(points) if not math.isnan(points[b]["fpr"])]
    fpr = [points[b]["fpr"] for b in budgets]
    label = strategy if budgets else f"{strategy} (no pseudo-positives at any update)"
    axes.plot(budgets, fpr, marker="o", color=_color(strategy), label=label)
    for b, value in zip(budgets, fpr, strict=True):
      axes.annotate(
        f"{points[b]['num_pseudo_positives']:.0f}",
        (b, value),
        textcoords="offset points",
        xytext=(4, 4),
        fontsize=7,
        color=_color(strategy),
      )
  axes.set_xlabel("labels per category (the update's training set)")
  axes.set_ylabel("false-positive rate of pseudo-positives")
  axes.set_ylim(0, 1.02)
  axes.grid(alpha=0.3)
  axes.set_title(title + "\n(numbers: pseudo-positives per category)")
  axes.legend(fontsize=8, loc="best")
  return _save(figure, path)


_HEADLINES = {
  "deep_head": "the deep main head after each update for deep strategies, the linear models "
  "for frozen-feature ones",
  "linear": "the linear models (on the latest deep update's features) for every strategy",
}


def report(config, workdir: str, *, log: Callable[[str], None] = print) -> dict:
  """Collects every finished point, writes the table, results.json and the figures."""
  config = resolve_groups(config, workdir, log=log)
  unfinished = unfinished_runs(config, workdir)
  if unfinished:
    log(f"report: left out (not finished): {', '.join(unfinished)}")
  collected = collect(config, workdir)
  aggregated = aggregate(collected)
  baseline = config.get("baseline", "tropel")
  paired = paired_differences(collected, baseline)
  table = markdown_table(aggregated) + paired_table(paired, baseline)
  context = (
    f"Dataset {config.dataset}, groups {[tuple(g) for g in config.groups]}, seeds "
    f"{list(config.seeds)}, N={config.num_feature_updates} Q={config.rounds_per_update} "
    f"B={config.batch_size} f_a={config.pseudo_negative_factor}, deep model "
    f"{config.deep.model} E={config.deep.epochs}. Mean F1 over all categories, ± std over "
    f"seeds. Headline model: {_HEADLINES[config.get('evaluate_model', 'deep_head')]}.\n\n"
  )
  # The machine and versions of this report (provenance.json has them in full).
  machine = provenance.write_json(os.path.join(workdir, "provenance.json"))
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write("# Results\n\n" + context + table + f"\nReported {provenance.one_line(machine)}.\n")
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(
      {s: {str(b): v for b, v in p.items()} for s, p in aggregated.items()},
      f,
      indent=1,
      sort_keys=True,
      allow_nan=True,
    )
  with open(os.path.join(workdir, "paired_differences.json"), "w") as f:
    json.dump(
      {
        "baseline": baseline,
        "differences": {s: {str(b): v for b, v in p.items()} for s, p in paired.items()},
      },
      f,
      indent=1,
      sort_keys=True,
      allow_nan=True,
    )
  sweep = tuple(s for s in config.strategies if s.startswith("f_a_"))
  figures = [
    plot_f1_curves(
      aggregated,
      (*FIGURE_3, *[s for s in config.strategies if s.startswith("kd_semi_")], "fully_supervised"),
      os.path.join(workdir, "fig3_baselines.png"),
      title="Figure 3: baselines",
    ),
    plot_fpr(
      aggregated,
      os.path.join(workdir, "fig4_pseudo_label_fpr.png"),
      title="Figure 4: pseudo-positives of KD-Semi and DeepProp",
    ),
    plot_f1_curves(
      aggregated,
      (*FIGURE_5, *sweep, "fully_supervised"),
      os.path.join(workdir, "fig5_ablations.png"),
      title="Figure 5: ablations",
    ),
    plot_paired(paired, baseline, os.path.join(workdir, "paired_differences.png")),
  ]
  log(f"report: {os.path.join(workdir, 'results.md')}, {[f for f in figures if f]}")
  return aggregated


def main(argv):
  from absl import app, flags, logging

  from rare_jax.infra import distributed_flags, sharding

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed_flags.initialize()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  config = _CONFIG.value
  workdir = _WORKDIR.value
  started = time.perf_counter()
  # Multi-host: every process runs the strategies (collective deep steps and checkpoints);
  # process 0 alone draws the groups (the others read groups.json), reports and prints.
  primary = sharding.is_primary()
  log = print if primary else (lambda _: None)
  config = sharding.primary_first(
    lambda: resolve_groups(config, workdir, log=log), f"compare:groups:{workdir}"
  )
  if not _REPORT_ONLY.value:
    run_all(config, workdir, log=log, report=(lambda: report(config, workdir)) if primary else None)
  if not primary:
    return
  report(config, workdir)
  with open(os.path.join(workdir, "results.md")) as f:
    print(f.read())
  print(f"{time.perf_counter() - started:.0f}s in all")


def _define_flags():
  from absl import flags
  from ml_collections import config_flags

  config = config_flags.DEFINE_config_file(
    "config", None, "Comparison config file (ml_collections).", lock_config=True
  )
  workdir = flags.DEFINE_string("workdir", None, "Directory of the comparison (created).")
  report_only = flags.DEFINE_bool("report_only", False, "Only rewrite the table and figures.")
  flags.mark_flags_as_required(["config", "workdir"])
  from rare_jax.infra import distributed_flags

  distributed_flags.define()
  return config, workdir, report_only


def run():

  cli_help.run(main)


if __name__ == "__main__":
  _CONFIG, _WORKDIR, _REPORT_ONLY = _define_flags()
  run()
