r"""Pool size x budget: where the frozen-feature Ours (`ours_linear`) gains over Tropel.

    nice -n 10 .venv/bin/python experiments/sweep_pool_budget.py \
        --config=experiments/configs/sweep_pool_budget.py --workdir=runs/sweep_pool_budget \
        [--report_only]

For every pool size of `config.pool_sizes` and seed of `config.seeds` (seeds outermost, so a
sweep cut short holds whole seeds), the frozen-feature strategies of `config.strategies` run
the loop of `rare_jax.compare` (`compare.run_strategy`: the same runner, checkpoints and
resumption) on one pool, F1 recorded after every round. The trunk embeds every image of the
train and test splits once (WORKDIR/features/: M_pre's feature stores, or pixel-PCA features
for tests), and each pool takes its rows from there.

The pools (`sweep_task`): `round(pool_fraction * P)` positives per rare category and the rest
non-rare images, taken from one seeded order of the train split per seed, so that for one seed
the pools are nested (the 5,000-image pool is part of the 10,000-image one) and share their
seed positives; the prevalence of each rare category stays `pool_fraction` (the demo's 0.2%)
for every pool size, so the validation set (the whole test split, rare images weighted to that
prevalence) is the same for all. With a pretrained trunk the pretraining split is not used:
the tasks have none.

Started again with the same command, finished (pool size, seed) units are skipped and an
interrupted one resumes from its strategies' checkpoints. Files:

    WORKDIR/features/                the trunk's features of every image (made once)
    WORKDIR/p{P}_s{seed}/            one unit: config.json, task.json, one run directory per
                                     strategy (rare_jax.active.runner), unit.json (its results,
                                     written when all its strategies are done)
    WORKDIR/sweep_raw.json           every F1 value per (pool size, seed, category, strategy,
                                     labels) with the diagnostics below, and the intervals
    WORKDIR/sweep_paired.md          paired differences (strategy minus `config.baseline`, same
                                     seed and category) at `config.report_budgets`, 95% t
                                     intervals over pairs and over seeds; diagnostics
    WORKDIR/sweep_paired.png         the differences vs labels, one line per pool size
    WORKDIR/timings.jsonl            wall seconds per unit and strategy

The diagnostics, per round and category (read back from each round's checkpoint): positives
in the pool, positives found, the pseudo-negatives W_n drawn, the number the rule asks for
(`round(f_a (|L_p| + 0.1 |L_n|))`), its cap (half the unlabeled pool: W_n is drawn from the
lower half of the ranking), and how many of W_n are true positives.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rare_jax import compare, workdirs  # noqa: E402
from rare_jax.active import metrics, runner, select  # noqa: E402
from rare_jax.data import sources, tasks  # noqa: E402
from rare_jax.deep import m_pre, stand_in, updates  # noqa: E402
from rare_jax.infra import provenance  # noqa: E402
from rare_jax.infra.checkpoint import CheckpointStore, record_or_check, write_json_atomic  # noqa: E402

FORMAT = "rare_jax.sweep_pool_budget/1"
SWEEP_KEYS = ("seeds", "pool_sizes", "report_budgets", "baseline")  # the sweep's, not a run's
UNIT_FILE = "unit.json"
FEATURE_KINDS = ("m_pre", "pixel_pca")
PIXEL_FIT_IMAGES = 5000  # pixel-PCA features: fitted on this many train images (seeded)
# np.random.default_rng([seed, stream]): the train split's order, the pool's order
# (rare_jax.data.tasks uses streams 0-3).
_ORDER_STREAM, _POOL_STREAM = 29, 30


def unit_name(pool_size: int, seed: int) -> str:
  return f"p{pool_size}_s{seed}"


def positives_per_category(pool_size: int, pool_fraction: float) -> int:
  """Positives of each rare category in a pool of `pool_size`: `round(pool_fraction * P)`."""
  return int(round(pool_fraction * pool_size))


def sweep_task(
  train_labels: np.ndarray,
  eval_labels: np.ndarray,
  *,
  dataset: str,
  categories: Sequence[int],
  class_names: Sequence[str],
  pool_size: int,
  seed: int,
  pool_fraction: float,
  num_seed_positives: int,
) -> tasks.RareTask:
  """A `RareTask` whose pool holds exactly `pool_size` train images.

  Each rare category has `k = round(pool_fraction * pool_size)` images, the rest are non-rare.
  Both are the first ones of one seeded order of the train split (the same for every pool
  size), so a smaller pool of the same seed is part of a larger one; the seed positives are
  the first `num_seed_positives` of each category in that order (the same for every pool size).
  The pool's order is shuffled (seeded). The validation set is the whole eval split, each rare
  image weighted `k_val / n_r` as `tasks.rare_weights` does for `pool_fraction`. No
  pretraining split (a pretrained trunk needs none).

  Raises:
    ValueError: a pool too small for the seeds plus one positive to find, or larger than the
      split's images allow.
  """
  train_labels = np.asarray(train_labels, np.int64)
  eval_labels = np.asarray(eval_labels, np.int64)
  categories = tuple(int(c) for c in categories)
  if isinstance(pool_size, bool) or int(pool_size) != pool_size or pool_size < 1:
    raise ValueError(f"pool size {pool_size!r}; expected a positive int")
  pool_size = int(pool_size)
  k = positives_per_category(pool_size, pool_fraction)
  needed = max(tasks.MIN_POOL_POSITIVES, num_seed_positives + 1)
  if k < needed:
    raise ValueError(
      f"pool size {pool_size} holds {k} positives per category at pool_fraction="
      f"{pool_fraction}; expected at least {needed} ({num_seed_positives} seeds and one to "
      f"find): a pool of at least {math.ceil((needed - 0.5) / pool_fraction)} images"
    )
  rng = np.random.default_rng([seed, _ORDER_STREAM])
  order = rng.permutation(len(train_labels))
  ordered = train_labels[order]
  num_nonrare = pool_size - len(categories) * k
  nonrare = order[~np.isin(ordered, categories)]
  if num_nonrare < 0 or len(nonrare) < num_nonrare:
    raise ValueError(
      f"pool size {pool_size} needs {num_nonrare} non-rare images but the train split has "
      f"{len(nonrare)} outside categories {categories}; expected at most "
      f"{int(len(nonrare) / (1 - len(categories) * pool_fraction))} images"
    )
  members = []
  for category in categories:
    of_category = order[ordered == category]
    if len(of_category) < k:
      raise ValueError(
        f"pool size {pool_size} needs {k} images of category {category}; the train split has "
        f"{len(of_category)}"
      )
    members.append(of_category[:k])
  pool_ids = np.concatenate([nonrare[:num_nonrare], *members])
  shuffle = np.random.default_rng([seed, _POOL_STREAM, pool_size]).permutation(pool_size)
  pool_ids = pool_ids[shuffle]
  position = np.full(len(train_labels), -1, np.int64)
  position[pool_ids] = np.arange(pool_size)
  seed_positives = np.stack([np.sort(position[m[:num_seed_positives]]) for m in members])
  weights = tasks.rare_weights(
    eval_labels, categories, pool_fraction, what="validation set", minimum=1
  )
  empty = np.zeros(0, np.int64)
  return tasks.RareTask(
    dataset=dataset,
    train_split="train",
    eval_split="test",
    categories=categories,
    category_names=tuple(class_names[c] for c in categories),
    num_classes=len(class_names),
    num_train_examples=len(train_labels),
    num_eval_examples=len(eval_labels),
    seed=int(seed),
    pool_fraction=float(pool_fraction),
    num_seed_positives=int(num_seed_positives),
    pretrain_fraction=0.0,
    pool_ids=pool_ids,
    pool_labels=train_labels[pool_ids],
    seed_positives=seed_positives,
    val_ids=np.arange(len(eval_labels)),
    val_labels=eval_labels,
    pretrain_ids=empty,
    pretrain_labels=empty,
    val_weights=weights,
  )


def check_config(config) -> None:
  """ValueError for a bad sweep before any work."""
  strategies = tuple(config.strategies)
  if not strategies:
    raise ValueError("config.strategies is empty; expected frozen-feature strategies")
  for strategy in strategies:
    spec = runner.strategy_spec(strategy)
    if spec["kind"] != "loop" or spec["deep_updates"]:
      raise ValueError(
        f"strategy {strategy!r} trains the deep model; the sweep runs frozen-feature "
        "strategies only (ours_linear, tropel, random, ...)"
      )
    runner.loop_config(config, strategy)
  if config.baseline not in strategies:
    raise ValueError(f"config.baseline={config.baseline!r} is not one of {strategies}")
  if config.features not in FEATURE_KINDS:
    raise ValueError(f"config.features={config.features!r}; expected one of {FEATURE_KINDS}")
  if config.features == "m_pre":
    settings = updates.DeepSettings.from_config(config.deep)
    if m_pre.source(settings) != "pretrained":
      raise ValueError(
        f"config.deep.init={config.deep.init!r}: the sweep embeds every image once with a "
        "pretrained trunk ('imagenet' or a weights file); an M_pre trained here depends on the "
        "task (use features='pixel_pca' for a stand-in)"
      )
  sizes = tuple(config.pool_sizes)
  if not sizes or len(set(sizes)) != len(sizes):
    raise ValueError(f"config.pool_sizes={sizes}; expected distinct pool sizes")
  if not tuple(config.seeds) or len(set(config.seeds)) != len(tuple(config.seeds)):
    raise ValueError(f"config.seeds={tuple(config.seeds)}; expected distinct seeds")
  rounds = runner.num_rounds(config)
  batch = int(config.batch_size)
  for budget in config.report_budgets:
    if budget % batch or not 1 <= budget // batch <= rounds:
      raise ValueError(
        f"report budget {budget}; expected a multiple of B={batch} up to {rounds * batch} "
        "labels per category"
      )


def unit_config(config, pool_size: int, seed: int) -> ml_collections.ConfigDict:
  """The run config of one (pool size, seed): no sweep keys, `seed` and `pool_size` set.

  Its `strategies` are empty (as `compare.run_config`'s), so strategies can be added later.
  """
  sub = config.copy_and_resolve_references()
  with sub.unlocked():
    for key in SWEEP_KEYS:
      if key in sub:
        del sub[key]
    sub.seed = int(seed)
    sub.pool_size = int(pool_size)
    sub.strategies = ()
  return sub


# ----------------------------------------------------------------------------------------------
# The features of every image, made once.


@dataclasses.dataclass(frozen=True)
class Features:
  """Features of every image of the train and test splits (rows = the splits' ids)."""

  train: np.ndarray  # [N, D]
  test: np.ndarray  # [M, D]
  train_labels: np.ndarray
  test_labels: np.ndarray
  class_names: tuple[str, ...]


def feature_settings(config) -> dict:
  """What the cached features depend on (recorded in WORKDIR/features/settings.json)."""
  record = {"dataset": config.dataset, "features": config.features}
  if config.features == "pixel_pca":
    record.update(feature_dim=int(config.feature_dim), fit_images=PIXEL_FIT_IMAGES)
  else:
    deep = config.deep
    record.update(
      model=deep.model,
      init=deep.init,
      image_size=deep.image_size,
      channels=deep.channels,
      mean=deep.mean,
      std=deep.std,
    )
  return json.loads(json.dumps(record))


def cached_features(config, workdir: str, *, log: Callable[[str], None] = print) -> Features:
  """The trunk's (or the pixel-PCA stand-in's) features of every train and test image.

  Made once in WORKDIR/features/ (the trunk's embedding resumes if interrupted); a workdir
  made with other feature settings is refused.
  """
  directory = os.path.join(workdir, "features")
  os.makedirs(directory, exist_ok=True)
  record_or_check(
    os.path.join(directory, "settings.json"), feature_settings(config), what="feature settings"
  )
  data_dir = config.data_dir or None
  train_source = sources.open_source(config.dataset, "train", data_dir)
  test_source = sources.open_source(config.dataset, "test", data_dir)
  train_images, train_labels = sources.load_arrays(train_source)
  test_images, test_labels = sources.load_arrays(test_source)
  if config.features == "pixel_pca":
    paths = [os.path.join(directory, f"{split}.npy") for split in ("train", "test")]
    if not all(os.path.exists(p) for p in paths):
      log(f"pixel-PCA features (dim {config.feature_dim}) of every image")
      rng = np.random.default_rng(0)
      fit = np.sort(rng.choice(len(train_images), min(PIXEL_FIT_IMAGES, len(train_images)), False))
      projection = stand_in.PixelProjection.fit(train_images[fit], int(config.feature_dim))
      for path, images in zip(paths, (train_images, test_images), strict=True):
        np.save(path + ".tmp.npy", projection.project(images))
        os.replace(path + ".tmp.npy", path)
    train, test = (np.load(p, mmap_mode="r") for p in paths)
  else:
    settings = updates.DeepSettings.from_config(config.deep)
    data = updates.ImageData(train=(train_images, train_labels), eval=(test_images, test_labels))
    model, state = m_pre.load_pretrained(
      settings, updates.input_shape(settings, data.train), os.path.join(directory, "m_pre")
    )
    log(f"embedding the train and test splits with {settings.model} ({settings.init})")
    train, test = (
      updates.embed(
        model,
        state,
        split,
        np.arange(len(split[1])),
        os.path.join(directory, name),
        settings,
        log=log,
      ).features
      for name, split in (("train", data.train), ("test", data.eval))
    )
  workdirs.check_features(np.asarray(train), len(train_labels), "train split")
  workdirs.check_features(np.asarray(test), len(test_labels), "test split")
  return Features(
    train=train,
    test=test,
    train_labels=np.asarray(train_labels, np.int64),
    test_labels=np.asarray(test_labels, np.int64),
    class_names=tuple(train_source.class_names),
  )


# ----------------------------------------------------------------------------------------------
# One (pool size, seed).


def pseudo_negative_diagnostics(
  run_dir: str, config, strategy: str, features, task: tasks.RareTask
) -> dict[int, dict]:
  """{round: per-category lists} read from each round's checkpoint: `pseudo_negatives` (W_n
  drawn), `pseudo_negative_wanted` (`round(f_a (|L_p| + 0.1 |L_n|))`, 0 without W_n),
  `pseudo_negative_cap` (floor of half the unlabeled images: W_n comes from the lower half of
  the ranking), `positives_in_pseudo_negatives` (true positives in W_n) and `unfound_positives`
  (positives without a label)."""
  truth = task.ground_truth()
  factor = runner.loop_config(config, strategy).pseudo_negative_factor
  like = runner.abstract_state(features, task.seed_positives, int(config.seed))
  out = {}
  with CheckpointStore(os.path.join(run_dir, "checkpoints")) as store:
    for step in store.all_steps():
      if step == 0:
        continue
      state, _ = store.restore(step, like)
      labels = np.asarray(state.labels)
      drawn = np.asarray(state.pseudo_negative)
      unlabeled = labels < 0
      wanted = select.num_pseudo_negatives(
        jnp.asarray((labels == 1).sum(1)), jnp.asarray((labels == 0).sum(1)), factor
      )
      out[int(step)] = {
        "pseudo_negatives": drawn.sum(1).tolist(),
        "pseudo_negative_wanted": np.asarray(wanted).tolist(),
        "pseudo_negative_cap": (unlabeled.sum(1) // 2).tolist(),
        "positives_in_pseudo_negatives": (drawn & truth).sum(1).tolist(),
        "unfound_positives": (unlabeled & truth).sum(1).tolist(),
      }
  return out


def _unit_finished(path: str, strategies: Sequence[str]) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    unit = json.load(f)
  if unit.get("format") != FORMAT or not set(strategies) <= set(unit.get("strategies", {})):
    return None
  return unit


def run_unit(
  config, workdir: str, features: Features, pool_size: int, seed: int, *, log=print
) -> dict:
  """Runs (or resumes) every strategy on one pool; writes and returns its unit.json record
  (a unit.json already there is rewritten)."""
  directory = os.path.join(workdir, unit_name(pool_size, seed))
  path = os.path.join(directory, UNIT_FILE)
  sub = unit_config(config, pool_size, seed)
  task = sweep_task(
    features.train_labels,
    features.test_labels,
    dataset=config.dataset,
    categories=config.categories,
    class_names=features.class_names,
    pool_size=pool_size,
    seed=seed,
    pool_fraction=float(config.pool_fraction),
    num_seed_positives=int(config.num_seed_positives),
  )
  os.makedirs(directory, exist_ok=True)
  runner.write_config(directory, workdirs.config_to_dict(sub))  # refuses another config
  if os.path.exists(os.path.join(directory, tasks.TASK_FILE)):
    if tasks.RareTask.load(directory) != task:
      raise ValueError(f"{directory}/task.json holds another pool; use a new workdir")
  else:
    task.save(directory)
  positives = task.ground_truth().sum(1).tolist()
  log(f"== {unit_name(pool_size, seed)}: {pool_size} images, positives per category {positives}")
  pool, val = workdirs.normalize_features(
    features.train[task.pool_ids],
    features.test[task.val_ids],
    workdirs.normalization_mode(sub),
  )
  context = workdirs.RunContext(sub, directory, task, pool, val)
  unit = {
    "format": FORMAT,
    "pool_size": pool_size,
    "seed": int(seed),
    "categories": list(task.categories),
    "category_names": list(task.category_names),
    "pool_positives": positives,
    "num_seed_positives": task.num_seed_positives,
    "seconds": {},
    "strategies": {},
  }
  for strategy in config.strategies:
    start = time.perf_counter()
    records = compare.run_strategy(context, directory, strategy, log=log)
    run_dir = os.path.join(directory, strategy)
    diagnostics = pseudo_negative_diagnostics(run_dir, sub, strategy, pool, task)
    rounds = []
    for record in records:
      if int(record["round"]) < 1:
        continue
      rounds.append(
        {
          "round": int(record["round"]),
          "labels": int(record["labels_per_category"]),
          "f1": record["f1"],
          "average_precision": record["average_precision"],
          "positives_found": record["positives_found"],
          **diagnostics[int(record["round"])],
        }
      )
    if [r["round"] for r in rounds] != list(range(1, runner.num_rounds(sub) + 1)):
      raise ValueError(f"{run_dir}: rounds {[r['round'] for r in rounds]} recorded; expected all")
    unit["strategies"][strategy] = rounds
    unit["seconds"][strategy] = round(time.perf_counter() - start, 1)
    with metrics.MetricsWriter(os.path.join(workdir, "timings.jsonl")) as writer:
      writer.write(
        {
          "unit": unit_name(pool_size, seed),
          "strategy": strategy,
          **{"seconds": unit["seconds"][strategy]},
        }
      )
  write_json_atomic(path, unit)
  return unit


def run_sweep(config, workdir: str, *, log=print) -> None:
  """Every unit not finished yet, seeds outermost; the report is rewritten after each."""
  check_config(config)
  features = cached_features(config, workdir, log=log)
  ran = False
  for seed in config.seeds:
    for pool_size in sorted(config.pool_sizes):
      path = os.path.join(workdir, unit_name(pool_size, seed), UNIT_FILE)
      if _unit_finished(path, config.strategies) is not None:
        log(f"== {unit_name(pool_size, seed)}: finished")
        continue
      run_unit(config, workdir, features, pool_size, seed, log=log)
      report(config, workdir, log=log)
      ran = True
  if not ran:
    report(config, workdir, log=log)


# ----------------------------------------------------------------------------------------------
# Collecting and reporting.


def read_units(config, workdir: str) -> list[dict]:
  """The finished units of the configured pool sizes and seeds."""
  units = []
  for pool_size in sorted(config.pool_sizes):
    for seed in config.seeds:
      path = os.path.join(workdir, unit_name(pool_size, seed), UNIT_FILE)
      unit = _unit_finished(path, config.strategies)
      if unit is not None:
        units.append(unit)
  return units


ROW_KEYS = (
  "f1",
  "average_precision",
  "positives_found",
  "unfound_positives",
  "pseudo_negatives",
  "pseudo_negative_wanted",
  "pseudo_negative_cap",
  "positives_in_pseudo_negatives",
)


def flat_rows(units: Sequence[Mapping], strategies: Sequence[str]) -> list[dict]:
  """One row per (pool size, seed, category, strategy, labels per category)."""
  rows = []
  for unit in units:
    for strategy in strategies:
      for record in unit["strategies"][strategy]:
        for c, category in enumerate(unit["categories"]):
          rows.append(
            {
              "pool_size": unit["pool_size"],
              "seed": unit["seed"],
              "category": category,
              "category_name": unit["category_names"][c],
              "strategy": strategy,
              "labels": record["labels"],
              "pool_positives": unit["pool_positives"][c],
              **{key: record[key][c] for key in ROW_KEYS},
            }
          )
  return rows


def paired(rows: Sequence[Mapping], strategies: Sequence[str], baseline: str) -> dict:
  """{pool size: {"A - baseline": {labels: {pair_level, seed_level, per_seed, better, worse}}}}:
  F1 of A minus the baseline's on the same (seed, category), with 95% t intervals over the
  pairs and over the seeds' mean differences (`compare.paired_differences`)."""
  out: dict = {}
  for pool_size in sorted({r["pool_size"] for r in rows}):
    collected: dict = {}
    for row in rows:
      if row["pool_size"] != pool_size:
        continue
      point = (
        collected.setdefault(row["strategy"], {})
        .setdefault(row["seed"], {})
        .setdefault(row["labels"], [{"f1": {}}])[0]
      )
      point["f1"][row["category"]] = row["f1"]
    for by_seed in collected.values():  # categories in one order: compare pairs by position
      for points in by_seed.values():
        for budget, (point,) in points.items():
          points[budget] = [{"f1": [point["f1"][c] for c in sorted(point["f1"])]}]
    differences = compare.paired_differences(collected, baseline)
    for strategy in strategies:
      if strategy == baseline or strategy not in differences:
        continue
      out.setdefault(str(pool_size), {})[f"{strategy} - {baseline}"] = {
        str(budget): {
          "pair_level": {k: entry[k] for k in ("mean", "low", "high", "n")},
          "seed_level": entry["seed_level"],
          "per_seed": entry["per_seed"],
          "better": entry["better"],
          "worse": entry["worse"],
        }
        for budget, entry in sorted(differences[strategy].items())
      }
  return out


def _interval(entry: Mapping) -> str:
  if math.isnan(entry["low"]):
    return f"{entry['mean']:+.3f} (n = {entry['n']})"
  return f"{entry['mean']:+.3f} [{entry['low']:+.3f}, {entry['high']:+.3f}]"


def _mean(rows, key: str, **where) -> float:
  values = [r[key] for r in rows if all(r[k] == v for k, v in where.items())]
  return float(np.mean(values)) if values else math.nan


def markdown(config, rows, differences, units) -> str:
  """The tables: paired differences per pool size and labels, then the diagnostics."""
  baseline = config.baseline
  others = [s for s in config.strategies if s != baseline]
  budgets = [int(b) for b in config.report_budgets]
  seeds = sorted({u["seed"] for u in units})
  lines = [
    "# Pool size x budget: frozen-feature strategies against " + f"`{baseline}`",
    "",
    f"Dataset {config.dataset}, categories {tuple(config.categories)}, seeds {seeds}, "
    f"features {config.features}"
    + (
      f" ({config.deep.model}, {config.deep.init}, {config.deep.image_size}x"
      f"{config.deep.image_size})"
      if config.features == "m_pre"
      else f" (dim {config.feature_dim})"
    )
    + f", B={config.batch_size}, f_a={config.pseudo_negative_factor}, prevalence "
    f"{config.pool_fraction:.2%} per category in every pool, weighted validation set.",
    "",
    f"Paired differences of F1 (strategy minus `{baseline}`, same seed and category), mean "
    "[95% t interval]: over the (seed, category) pairs, and over the seeds' mean differences.",
    "",
    "| pool images | positives per category | labels | F1 "
    + " / ".join(f"`{s}`" for s in config.strategies)
    + " | "
    + " | ".join(f"`{s}` - `{baseline}` pairs | seeds" for s in others)
    + " |",
    "|---|---|---|---|" + "---|---|" * len(others),
  ]
  for pool_size in sorted({r["pool_size"] for r in rows}):
    positives = _mean(rows, "pool_positives", pool_size=pool_size)
    for budget in budgets:
      f1 = " / ".join(
        f"{_mean(rows, 'f1', pool_size=pool_size, strategy=s, labels=budget):.3f}"
        for s in config.strategies
      )
      cells = []
      for s in others:
        entry = differences.get(str(pool_size), {}).get(f"{s} - {baseline}", {}).get(str(budget))
        if entry is None:
          cells += ["-", "-"]
        else:
          cells += [_interval(entry["pair_level"]), _interval(entry["seed_level"])]
      lines.append(
        f"| {pool_size} | {positives:.0f} | {budget} | {f1} | " + " | ".join(cells) + " |"
      )
  with_pseudo = [
    s for s in config.strategies if runner.loop_config(config, s).pseudo_negative_factor > 0
  ]
  lines += [
    "",
    "What could explain it, mean per category over seeds: average precision (the ranking, "
    "without the threshold at probability 0.5 that F1 needs); positives found beyond the seeds; "
    "for each strategy with pseudo-negatives, W_n drawn / asked for by the rule / its cap "
    "(half the unlabeled pool), the share of (seed, category) pairs whose W_n the cap "
    "limited, and the true positives among W_n out of the positives still unfound.",
    "",
    "| pool images | labels | AP "
    + " / ".join(f"`{s}`" for s in config.strategies)
    + " | found "
    + " / ".join(f"`{s}`" for s in config.strategies)
    + " | "
    + " | ".join(
      f"`{s}` W_n drawn / asked / cap | capped | positives in W_n / unfound" for s in with_pseudo
    )
    + " |",
    "|---|---|---|---|" + "---|---|---|" * len(with_pseudo),
  ]
  for pool_size in sorted({r["pool_size"] for r in rows}):
    for budget in budgets:
      where = dict(pool_size=pool_size, labels=budget)
      average_precision = " / ".join(
        f"{_mean(rows, 'average_precision', strategy=s, **where):.3f}" for s in config.strategies
      )
      found = " / ".join(
        f"{_mean(rows, 'positives_found', strategy=s, **where):.1f}" for s in config.strategies
      )
      cells = []
      for s in with_pseudo:
        chosen = [
          r for r in rows if r["strategy"] == s and all(r[k] == v for k, v in where.items())
        ]
        capped = np.mean([r["pseudo_negative_wanted"] > r["pseudo_negative_cap"] for r in chosen])
        cells += [
          f"{_mean(chosen, 'pseudo_negatives'):.0f} / {_mean(chosen, 'pseudo_negative_wanted'):.0f}"
          f" / {_mean(chosen, 'pseudo_negative_cap'):.0f}",
          f"{capped:.0%}",
          f"{_mean(chosen, 'positives_in_pseudo_negatives'):.1f} / "
          f"{_mean(chosen, 'unfound_positives'):.1f}",
        ]
      lines.append(
        f"| {pool_size} | {budget} | {average_precision} | {found} | " + " | ".join(cells) + " |"
      )
  return "\n".join(lines) + "\n"


def plot(config, differences, path: str) -> str | None:
  """Difference vs labels per category, one line per pool size with its pair-level 95% band
  (seed-level intervals as error bars at the report budgets); one panel per strategy."""
  import matplotlib
  import matplotlib.ticker
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global state
  from matplotlib.figure import Figure

  baseline = config.baseline
  others = [s for s in config.strategies if s != baseline]
  if not differences or not others:
    return None
  figure = Figure(figsize=(6 * len(others), 4.5), dpi=100)
  FigureCanvasAgg(figure)
  sizes = sorted(int(p) for p in differences)
  colors = [matplotlib.colormaps["viridis"](x) for x in np.linspace(0.0, 0.85, len(sizes))]
  for index, strategy in enumerate(others):
    axes = figure.add_subplot(1, len(others), index + 1)
    name = f"{strategy} - {baseline}"
    for color, pool_size in zip(colors, sizes, strict=True):
      points = differences[str(pool_size)].get(name, {})
      budgets = sorted(int(b) for b in points)
      if not budgets:
        continue
      mean = np.array([points[str(b)]["pair_level"]["mean"] for b in budgets])
      low = np.array([points[str(b)]["pair_level"]["low"] for b in budgets])
      high = np.array([points[str(b)]["pair_level"]["high"] for b in budgets])
      axes.plot(budgets, mean, color=color, marker=".", label=f"{pool_size} images")
      axes.fill_between(budgets, low, high, color=color, alpha=0.15)
      marked = [b for b in budgets if b in set(config.report_budgets)]
      seed_mean = np.array([points[str(b)]["seed_level"]["mean"] for b in marked])
      seed_low = np.array([points[str(b)]["seed_level"]["low"] for b in marked])
      seed_high = np.array([points[str(b)]["seed_level"]["high"] for b in marked])
      if marked and not np.isnan(seed_low).any():
        axes.errorbar(
          marked,
          seed_mean,
          yerr=[seed_mean - seed_low, seed_high - seed_mean],
          fmt="none",
          ecolor=color,
          capsize=3,
          alpha=0.7,
        )
    axes.axhline(0.0, color="k", linewidth=0.8)
    axes.set_xscale("log")
    axes.set_xticks(list(config.report_budgets), [str(b) for b in config.report_budgets])
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.set_xlabel("labels per category")
    axes.set_ylabel(f"F1 minus {baseline}'s (same seed, category)")
    axes.set_title(f"{strategy} - {baseline}: band 95% over pairs, bars over seeds", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
  temporary = path + ".tmp.png"
  figure.savefig(temporary, format="png", bbox_inches="tight")
  os.replace(temporary, path)
  return path


def report(config, workdir: str, *, log=print) -> dict:
  """Writes sweep_raw.json, sweep_paired.md and sweep_paired.png from the finished units."""
  units = read_units(config, workdir)
  rows = flat_rows(units, config.strategies)
  differences = paired(rows, config.strategies, config.baseline)
  machine = provenance.provenance()
  document = {
    "format": FORMAT,
    "settings": workdirs.config_to_dict(config),
    "units": [unit_name(u["pool_size"], u["seed"]) for u in units],
    "rows": rows,
    "paired": differences,
    "provenance": machine,
  }
  raw = os.path.join(workdir, "sweep_raw.json")
  with open(raw + ".tmp", "w") as f:
    json.dump(document, f, indent=None, allow_nan=True)
    f.write("\n")
  os.replace(raw + ".tmp", raw)
  table = markdown(config, rows, differences, units)
  table += f"\nReported {provenance.one_line(machine)}.\n"
  with open(os.path.join(workdir, "sweep_paired.md.tmp"), "w") as f:
    f.write(table)
  os.replace(os.path.join(workdir, "sweep_paired.md.tmp"), os.path.join(workdir, "sweep_paired.md"))
  figure = plot(config, differences, os.path.join(workdir, "sweep_paired.png"))
  log(f"report: {len(units)} units, {raw}, sweep_paired.md, {figure}")
  return document


def main(argv):
  from absl import app

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from absl import flags, logging

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save and restore at INFO
  config, workdir = _CONFIG.value, _WORKDIR.value
  check_config(config)
  started = time.perf_counter()
  log = lambda line: print(line, flush=True)  # noqa: E731
  if _REPORT_ONLY.value:
    report(config, workdir, log=log)
  else:
    run_sweep(config, workdir, log=log)  # reports after each unit
  with open(os.path.join(workdir, "sweep_paired.md")) as f:
    print(f.read())
  print(f"{time.perf_counter() - started:.0f}s in all", flush=True)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/sweep_pool_budget.py", "The sweep's config file."
  )
  _WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the sweep (created).")
  _REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rewrite the report files.")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
