r"""The paper's settings (ResNet-50 at 224x224, E=15) for `ours`, `tropel` and `ours_linear`.

On a machine with an accelerator and a prepared TFDS dataset:

    python experiments/paper_settings.py --workdir=runs/paper_settings \
        --init=/path/to/resnet50_imagenet.pth [--dataset=rare_fashion_mnist] \
        [--seeds=0,1,2] [--max_groups=2] [--time_budget_hours=H] [--data_dir=DIR]

A check of the script itself on the CPU, in seconds (shrunk settings whose numbers mean
nothing):

    python experiments/paper_settings.py --workdir=/tmp/paper_check --tiny

It prints first what the run measures (which of the paper's claims and figures) and an estimate
of its run time per device kind, then runs the comparison driver (`rare_jax.compare.run_all`)
on experiments/configs/paper_settings.py: every (seed, group) workdir, `ours`, `tropel` and
`ours_linear` in it. Settings: N=10 deep updates x Q=5 rounds x B=10 queries per category (B=20
on Places), f_a=100, background-splitting weight 0.1, full fine-tuning from M_pre with a fresh
main head and warm-started updates (docs/method.md; none of the demo's deviations).

M_pre: `--init=FILE` is the paper's start, your ImageNet ResNet-50 weights (a torchvision `.pth`
state dict, or a timm or Hugging Face `.safetensors`; no PyPI package ships them).
`--init=related_split` trains M_pre here on the dataset's non-rare classes instead (30 epochs,
as experiments/configs/inat2017.py does), which is not the paper's start. Without `--init` the
full-size run is refused. Without an accelerator the full-size run is refused too (weeks on a
CPU); `--tiny` runs anywhere.

Budgets: `--seeds` and `--max_groups` choose how many (seed, group) workdirs; with
`--time_budget_hours` no new (workdir, strategy) session starts once that much time has passed
(one running session is not cut). Started again with the same command, finished sessions are
skipped and interrupted ones resume from their checkpoints.

Writes under WORKDIR: what `rare_jax.compare` writes (results.md, results.json,
paired_differences.json against `tropel`, fig3_baselines.png, paired_differences.png,
timings.jsonl, provenance.json, g<group>_s<seed>/ with each run), and
  paired_vs_ours_linear.json  ours minus ours_linear, paired by (seed, category), 95% intervals
  summary.md                  the statement, the headline differences, time taken vs estimate
  paper_settings.json         the statement, the estimate, the config, the weights file's
                              SHA-256, the devices, the code's commit, whether it finished
Single process (one host and all its accelerators).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.configs import paper_settings as paper_config  # noqa: E402
from rare_jax import compare, workdirs  # noqa: E402
from rare_jax.deep import trunk_features  # noqa: E402
from rare_jax.infra import atomic, provenance  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = ("rare_fashion_mnist", "i_naturalist2017", "places365")
RELATED_SPLIT = "related_split"  # --init value: train M_pre here on the non-rare classes
TINY_WARNING = (
  "TINY CHECK: shrunk settings (below) on slices of rare_fashion_mnist, to show that the "
  "script runs end to end; its numbers measure nothing about the paper."
)

# One GPU, ResNet-50 at 224x224, bfloat16 (images per second). Upper-bound work over these
# rates gives the estimate; loading and decoding images is not counted.
DEVICE_RATES = {
  "nvidia-h100-x1": {
    "train": 0.9 * 6725.0,
    "embed": 0.9 * 26048.0,
    "source": "not measured: assumed 0.9x the H200's (the same Hopper compute, slower memory)",
  },
  "nvidia-h200": {
    "train": 6725.0,
    "embed": 26048.0,
    "source": "measured 2026-11-27, benchmarks/resnet_throughput.py, batch 256, synthetic "
    "input (benchmarks/results/2026-11-27_h200_resnet50_224_bf16.txt)",
  },
}
# Assumed fixed costs (seconds), not measured as such: a deep update compiles its training
# step (20 s measured on the H200 for ResNet-50), the train state's initialisation, the
# embedding (2 s there) and the linear refit, and saves checkpoints; a workdir's start
# (M_pre, the loop's compilation); one loop round (0.02 s measured at a 1M-image pool on the
# H200, plus metrics and a checkpoint).
UPDATE_OVERHEAD_S = 45.0
WORKDIR_OVERHEAD_S = 60.0
ROUND_S = 1.0


class BudgetSpent(Exception):
  """Raised between sessions once --time_budget_hours has passed."""


# ----------------------------------------------------------------------------------------------
# The config.


def weights_file(path: str) -> str:
  """The absolute path of a ResNet-50 weights file; ValueError unless it is a regular file."""
  resolved = os.path.realpath(os.path.expanduser(path))
  try:
    mode = os.stat(resolved).st_mode
  except OSError as error:
    raise ValueError(
      f"--init={path!r}: no such file ({error.strerror}); expected your ImageNet ResNet-50 "
      f"weights (.pth or .safetensors) or --init={RELATED_SPLIT}"
    ) from None
  if not stat.S_ISREG(mode):
    raise ValueError(f"--init={path!r} is not a regular file; expected a .pth or .safetensors")
  if not resolved.endswith((".pth", ".pt", ".safetensors")):
    raise ValueError(f"--init={path!r}: expected a .pth, .pt or .safetensors file")
  return resolved


def build_config(
  dataset: str = "rare_fashion_mnist",
  *,
  tiny: bool = False,
  init: str = "",
  seeds: tuple[int, ...] = (),
  max_groups: int = 0,
  data_dir: str = "",
):
  """The comparison config of this command (experiments/configs/paper_settings.py + flags).

  Args:
    dataset: one of DATASETS (`tiny` runs on slices of rare_fashion_mnist only).
    tiny: the shrunk settings for a CPU check.
    init: full size: a weights file or RELATED_SPLIT (required); tiny: must be empty.
    seeds: seeds to run (empty: the config's).
    max_groups: run only the first groups (0: all; groups drawn from the dataset are cut by
      the caller once drawn).
    data_dir: where the TFDS datasets are ("" = TFDS's default).
  """
  if dataset not in DATASETS:
    raise ValueError(f"--dataset={dataset!r}: expected one of {DATASETS}")
  if max_groups < 0:
    raise ValueError(f"--max_groups={max_groups}: expected 0 (all groups) or more")
  if tiny:
    if dataset != "rare_fashion_mnist":
      raise ValueError(f"--tiny runs on slices of rare_fashion_mnist, not --dataset={dataset!r}")
    if init:
      raise ValueError(
        f"--init={init!r} with --tiny: the tiny check trains a small M_pre here; --init is the "
        "full-size run's ResNet-50"
      )
    config = paper_config.get_config("tiny")
  else:
    if not init:
      raise ValueError(
        "--init is required for the paper's settings: the path of your ImageNet ResNet-50 "
        "weights (a torchvision .pth, or a timm or Hugging Face .safetensors; no PyPI package "
        f"ships them), or --init={RELATED_SPLIT} to train M_pre here on the dataset's non-rare "
        "classes (not the paper's ImageNet start)"
      )
    config = paper_config.get_config(dataset)
    config.deep.init = "" if init == RELATED_SPLIT else weights_file(init)
  if seeds:
    config.seeds = tuple(int(s) for s in seeds)
  if len(set(config.seeds)) != len(config.seeds):
    raise ValueError(f"--seeds={list(config.seeds)}: a seed is repeated")
  if max_groups and tuple(config.groups):
    config.groups = tuple(config.groups)[:max_groups]
    config.categories = config.groups[0]
  config.data_dir = data_dir
  return config


def parse_seeds(raw) -> tuple[int, ...]:
  """--seeds' items as integers; ValueError naming the flag otherwise."""
  try:
    return tuple(int(item) for item in raw)
  except ValueError:
    raise ValueError(f"--seeds={','.join(raw)!r}: expected comma-separated integers") from None


def check_backend(backend: str, *, tiny: bool) -> None:
  """ValueError for the full-size settings without an accelerator."""
  if not tiny and backend == "cpu":
    raise ValueError(
      "no accelerator: JAX's backend is 'cpu'. ResNet-50 at 224x224 with E=15 would take "
      "weeks here; run this on a machine with a GPU, or add --tiny to check the script"
    )


def budget_points(config) -> list[int]:
  """Labels per category at each deep update: i * Q * B."""
  step = int(config.rounds_per_update) * int(config.batch_size)
  return [i * step for i in range(1, int(config.num_feature_updates) + 1)]


def settings_line(config) -> str:
  """The settings of `config` in one sentence."""
  deep = config.deep
  size = f"{deep.image_size}x{deep.image_size}" if deep.image_size else "the dataset's size"
  if deep.init == "":
    start = "M_pre trained here on the non-rare classes"
  elif deep.init == "imagenet":
    start = "M_pre from the packaged ImageNet weights"
  else:
    start = f"M_pre from your weights file {deep.init}"
  return (
    f"{deep.model} at {size}, E={deep.epochs} epochs per deep update, "
    f"N={config.num_feature_updates} updates x Q={config.rounds_per_update} rounds x "
    f"B={config.batch_size} queries per category, f_a={config.pseudo_negative_factor:g}, "
    f"{config.num_seed_positives} seed positives, background-splitting weight "
    f"{deep.aux_weight:g}, {'a fresh' if deep.main_head_init == 'random' else 'a folded'} main "
    f"head, {'warm-started' if deep.warm_start else 'restarted'} updates, "
    f"{'' if deep.frozen_blocks or deep.freeze_batchnorm else 'full fine-tuning, '}"
    f"{config.feature_normalization} feature normalisation; {start}; dataset {config.dataset}, "
    f"groups {[tuple(g) for g in config.groups] or 'drawn from the dataset'}, seeds "
    f"{list(config.seeds)}"
  )


def statement(config, *, full_config=None) -> str:
  """What the run measures, in plain words; with `full_config` (a tiny run) what the full run
  would measure and what this one runs instead."""
  measured = full_config if full_config is not None else config
  points = ", ".join(str(b) for b in budget_points(measured))
  lines = [
    "What this run measures:",
    "- The paper's main comparison (Mullapudi et al., ICCV 2021, Figure 3): F1 of `ours` "
    "(adaptive queries, pseudo-negatives, a background-splitting deep update every Q rounds) "
    "against `tropel` (asks for the most likely positives, no pseudo-negatives, frozen "
    "features). The paper's claim: Ours is ahead of Tropel on a tight labeling budget.",
    "- `ours` against `ours_linear` (the same loop on M_pre's frozen features, no deep "
    "updates): whether updating the deep features helps (docs/reproducing.md).",
    f"- At {points} labels per category: mean F1 at probability 0.5 (the deep main head for "
    "`ours`, the linear models for `tropel` and `ours_linear`), average precision, and the "
    "paired differences per (seed, category) with 95% t intervals (results.md, "
    "paired_differences.json, paired_vs_ours_linear.json, fig3_baselines.png, summary.md).",
    "- Not measured: Figures 4-6 and the rest of Figures 3 and 5 (Tropel-Deep, KD-Semi, "
    "DeepProp, Fully-Supervised, the ablations, the f_a sweep, the self-supervised start).",
    f"Settings: {settings_line(measured)}.",
  ]
  if measured.dataset == "rare_fashion_mnist":
    lines.append(
      "On rare_fashion_mnist each rare category has about 30 positives in the pool, so budgets "
      "past about 100 labels mostly measure how fast each strategy runs out of positives; the "
      "paper's budgets were chosen for iNaturalist and Places."
    )
  if full_config is not None:
    lines = [TINY_WARNING, "", "A full run (without --tiny) measures:"] + lines[1:]
    lines.append(f"This tiny run uses instead: {settings_line(config)}.")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The estimate.


@dataclasses.dataclass(frozen=True)
class TaskSize:
  """The sizes of one (group, seed) task that the work depends on."""

  pool: int
  validation: int
  related: int  # M_pre's pretraining images (the non-rare classes' split)
  positives: int  # the most pool positives of any rare category
  categories: int

  @classmethod
  def of(cls, task) -> TaskSize:
    positives = task.ground_truth().sum(axis=1)
    return cls(
      pool=int(task.pool_size),
      validation=len(task.val_ids),
      related=len(task.pretrain_ids),
      positives=int(positives.max()),
      categories=int(task.num_categories),
    )


def task_size(config, group, seed: int) -> TaskSize:
  """The sizes of the task `workdirs.prepare` builds for (group, seed): labels only."""
  from rare_jax.data import tasks

  task = tasks.task_from_dataset(
    config.dataset,
    tuple(int(c) for c in group),
    int(seed),
    data_dir=config.data_dir or None,
    pool_fraction=float(config.pool_fraction),
    num_seed_positives=int(config.num_seed_positives),
    train_split=config.get("train_split", "train"),
    eval_split=config.get("eval_split", "test"),
    validation=workdirs.validation_mode(config),
  )
  return TaskSize.of(task)


def update_training_bounds(config, size: TaskSize) -> list[int]:
  """An upper bound on each deep update's training set (docs/method.md): the union over
  categories of L_p, L_n and W_n, with every label so far a positive while the pool has
  positives left, |W_n| = ceil(f_a * (|L_p| + 0.1 |L_n|)) capped at half the pool."""
  bounds = []
  for budget in budget_points(config):
    labels = int(config.num_seed_positives) + budget
    positives = min(labels, size.positives)
    factor = float(config.pseudo_negative_factor)
    drawn = min(math.ceil(factor * (positives + 0.1 * (labels - positives))), size.pool // 2)
    bounds.append(min(size.pool, size.categories * (labels + drawn)))
  return bounds


def work(config, sizes: list[TaskSize]) -> dict:
  """Images trained and embedded over every workdir (one `TaskSize` per workdir): upper
  bounds, since every label is counted as a positive while the pool has positives."""
  deep = config.deep
  trains_m_pre = deep.init == ""
  out = {
    "workdirs": len(sizes),
    "deep_updates": 0,
    "rounds": 0,
    "pretrain_images": 0,
    "update_images": 0,
    "embed_images": 0,
    "update_bounds": [],
  }
  for size in sizes:
    bounds = update_training_bounds(config, size)
    out["update_bounds"].append(bounds)
    if trains_m_pre:
      out["pretrain_images"] += int(deep.pretrain_epochs) * size.related
    embeddings = 1  # M_pre's features, shared by the strategies
    for strategy in config.strategies:
      out["rounds"] += int(config.num_feature_updates) * int(config.rounds_per_update)
      if strategy == "ours":
        out["deep_updates"] += int(config.num_feature_updates)
        out["update_images"] += int(deep.epochs) * sum(bounds)
        embeddings += int(config.num_feature_updates)
    out["embed_images"] += embeddings * (size.pool + size.validation)
  return out


def seconds(amount: dict, rates: dict) -> dict:
  """Estimated seconds by part for one device kind's `rates`."""
  parts = {
    "M_pre pretraining": amount["pretrain_images"] / rates["train"],
    "deep updates": amount["update_images"] / rates["train"],
    "embedding": amount["embed_images"] / rates["embed"],
    "compilation and loop rounds": amount["deep_updates"] * UPDATE_OVERHEAD_S
    + amount["workdirs"] * WORKDIR_OVERHEAD_S
    + amount["rounds"] * ROUND_S,
  }
  parts["total"] = sum(parts.values())
  return parts


def _hours(value: float) -> str:
  return f"{value / 3600:.1f} h" if value >= 360 else f"{value / 60:.1f} min"


def estimate_text(config, amount: dict, *, what: str) -> str:
  """The estimate of `amount` per device kind, as lines of text."""
  seeds, groups = len(config.seeds), len(config.groups)
  lines = [
    f"Estimated run time of {what} ({amount['workdirs']} workdirs: {seeds} seeds x {groups} "
    "groups; upper bounds on the images trained):",
    f"  work: {amount['update_images']:,} training images in {amount['deep_updates']} deep "
    f"updates of `ours` (E={config.deep.epochs}; per workdir at most "
    f"{amount['update_bounds'][0]} images per update), {amount['pretrain_images']:,} for "
    f"M_pre's pretraining ({'none: weights file' if config.deep.init else 'trained here'}), "
    f"{amount['embed_images']:,} embedded",
  ]
  for kind, rates in DEVICE_RATES.items():
    parts = seconds(amount, rates)
    detail = ", ".join(f"{k} {_hours(v)}" for k, v in parts.items() if k != "total")
    lines.append(
      f"  {kind} (one GPU; ResNet-50 at 224x224 bfloat16 at {rates['train']:,.0f} img/s "
      f"training, {rates['embed']:,.0f} img/s embedding, {rates['source']}): about "
      f"{_hours(parts['total'])} ({detail})"
    )
  lines += [
    "  Datasets stored as JPEG files (i_naturalist2017, places365) may be bound by the host's "
    "decoding instead, which is not measured here.",
    "  cpu: not estimated; the full-size settings are refused without an accelerator.",
  ]
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Running and reporting.


def code_version() -> dict:
  """The repository's commit and whether the working tree differs from it (None: not a git
  checkout)."""
  try:
    commit = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    status = subprocess.run(
      ["git", "status", "--porcelain", "--untracked-files=no"],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=30,
    )
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "modified": None}
  if commit.returncode != 0:
    return {"commit": None, "modified": None}
  return {"commit": commit.stdout.strip(), "modified": bool(status.stdout.strip())}


def devices() -> dict:
  import jax

  listed = jax.devices()
  return {
    "backend": jax.default_backend(),
    "count": len(listed),
    "kinds": sorted({d.device_kind for d in listed}),
  }


def device_kind(found: dict) -> str | None:
  """The DEVICE_RATES key of this machine's accelerator, or None."""
  kinds = " ".join(found["kinds"]).lower()
  for key, name in (("nvidia-h200", "h200"), ("nvidia-h100-x1", "h100")):
    if name in kinds:
      return key
  return None


def all_finished(config, workdir: str) -> bool:
  for seed in config.seeds:
    for group_index, group in enumerate(config.groups):
      sub = compare.run_config(config, group, seed)
      directory = os.path.join(workdir, compare.run_name(group_index, seed))
      for strategy in config.strategies:
        if not compare.is_finished(os.path.join(directory, strategy), sub, strategy):
          return False
  return True


def session_seconds(workdir: str) -> float:
  from rare_jax.active import metrics

  return float(
    sum(r["seconds"] for r in metrics.read_metrics(os.path.join(workdir, "timings.jsonl")))
  )


def headline_table(config, workdir: str) -> tuple[str, dict]:
  """Markdown: ours minus tropel and minus ours_linear per budget (pair and seed level), and
  the paired differences against ours_linear."""
  collected = compare.collect(config, workdir)
  against = {
    "tropel": compare.paired_differences(collected, "tropel"),
    "ours_linear": compare.paired_differences(collected, "ours_linear"),
  }
  lines = [
    "| difference | labels | mean | 95% interval over pairs | pairs ahead / behind / n | "
    "95% interval over seeds |",
    "|---|---|---|---|---|---|",
  ]
  for baseline, paired in against.items():
    for budget, p in sorted(paired.get("ours", {}).items()):
      seeds = p["seed_level"]
      lines.append(
        f"| `ours` - `{baseline}` | {budget} | {p['mean']:+.3f} | "
        f"[{p['low']:+.3f}, {p['high']:+.3f}] | {p['better']} / {p['worse']} / {p['n']} | "
        f"[{seeds['low']:+.3f}, {seeds['high']:+.3f}] |"
      )
  return "\n".join(lines) + "\n", against["ours_linear"]


def _write_text(path: str, text: str) -> None:
  """Replaces `path` whole (a reader sees the old file or the new one)."""
  with atomic.replacing(path) as f:
    f.write(text)


def _write_json(path: str, document: dict) -> None:
  _write_text(path, json.dumps(document, indent=1, sort_keys=True, allow_nan=True) + "\n")


def run_within_budget(
  config, workdir: str, *, budget_s: float, started: float, log: Callable[[str], None] = print
) -> bool:
  """`compare.run_all`, starting no new (workdir, strategy) session once `budget_s` seconds
  have passed since `started` (0: no limit); the report is rewritten after each session.
  Returns whether the budget stopped it."""

  def after_session():
    compare.report(config, workdir, log=log)
    if budget_s and time.perf_counter() - started > budget_s:
      raise BudgetSpent

  try:
    compare.run_all(config, workdir, log=log, report=after_session)
  except BudgetSpent:
    log(f"time budget of {budget_s / 3600:g} h spent: no new session started")
    return True
  return False


def main(argv):
  from absl import app, flags, logging

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  values = flags.FLAGS
  if not values["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  started = time.perf_counter()
  try:
    config = build_config(
      values.dataset,
      tiny=values.tiny,
      init=values.init,
      seeds=parse_seeds(values.seeds or ()),
      max_groups=values.max_groups,
      data_dir=values.data_dir,
    )
    if values.time_budget_hours < 0:
      raise ValueError(f"--time_budget_hours={values.time_budget_hours}: expected >= 0")
    found = devices()
    check_backend(found["backend"], tiny=values.tiny)
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  workdir = values.workdir
  full = None
  if values.tiny:
    full = paper_config.get_config("rare_fashion_mnist")
    full.data_dir = values.data_dir
  text = statement(config, full_config=full)
  print(text, flush=True)
  print(flush=True)
  config = compare.resolve_groups(config, workdir)
  if values.max_groups:
    config.groups = tuple(config.groups)[: values.max_groups]
  compare.check_config(config)
  seed = int(config.seeds[0])
  sizes = [task_size(config, g, seed) for g in config.groups] * len(config.seeds)
  amount = work(config, sizes)
  estimate = estimate_text(config, amount, what="this run")
  if full is not None:
    full_sizes = [task_size(full, g, int(full.seeds[0])) for g in full.groups] * len(full.seeds)
    full_amount = work(full, full_sizes)
    estimate += "\n" + estimate_text(full, full_amount, what="the full run on rare_fashion_mnist")
  print(estimate, flush=True)
  kind = device_kind(found)
  budget_s = values.time_budget_hours * 3600
  if budget_s:
    print(
      f"Time budget: {values.time_budget_hours:g} h; no new session starts after it (rerun the "
      "same command to continue).",
      flush=True,
    )
  print(flush=True)
  weights = config.deep.init if config.deep.init not in ("", "imagenet") else None
  record = {
    "statement": text,
    "estimate": estimate,
    "work": amount,
    "tiny": bool(values.tiny),
    "dataset": config.dataset,
    "init": {"path": weights, "sha256": trunk_features.sha256(weights)}
    if weights
    else config.deep.init,
    "config": workdirs.config_to_dict(config),
    "devices": found,
    "device_kind": kind,
    "code": code_version(),
    "time_budget_hours": values.time_budget_hours,
    "provenance": provenance.provenance(),
    "finished": False,
    "stopped_by_time_budget": False,
  }
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, "paper_settings.json"), record)

  stopped = run_within_budget(config, workdir, budget_s=budget_s, started=started)
  compare.report(config, workdir)
  table, vs_linear = headline_table(config, workdir)
  _write_json(
    os.path.join(workdir, "paired_vs_ours_linear.json"),
    {
      "baseline": "ours_linear",
      "differences": {s: {str(b): v for b, v in p.items()} for s, p in vs_linear.items()},
    },
  )
  finished = all_finished(config, workdir)
  elapsed = time.perf_counter() - started
  sessions = session_seconds(workdir)
  timing = f"Sessions' time so far: {_hours(sessions)} (this start: {_hours(elapsed)})"
  if kind is not None:
    timing += f"; estimated for {kind}: {_hours(seconds(amount, DEVICE_RATES[kind])['total'])}"
  status = "finished" if finished else "not finished (rerun the same command to continue)"
  with open(os.path.join(workdir, "results.md"), encoding="utf-8") as f:
    results = f.read()
  summary = (
    "# The paper's settings: `ours` vs `tropel` and `ours_linear`\n\n"
    + text
    + "\n\n## Headline paired differences (headline F1)\n\n"
    + table
    + f"\nRun {status}. {timing}.\n\n"
    + results.replace("# Results", "## Every number", 1)
  )
  _write_text(os.path.join(workdir, "summary.md"), summary)
  record.update(
    finished=finished,
    stopped_by_time_budget=stopped,
    seconds_this_start=round(elapsed, 1),
    session_seconds=round(sessions, 1),
  )
  _write_json(os.path.join(workdir, "paper_settings.json"), record)
  print(summary)


def _define_flags():
  from absl import flags

  flags.DEFINE_string("workdir", None, "Directory of the comparison (created).")
  flags.DEFINE_enum("dataset", "rare_fashion_mnist", DATASETS, "Prepared TFDS dataset.")
  flags.DEFINE_string(
    "init",
    "",
    "Your ImageNet ResNet-50 weights (.pth / .safetensors), or 'related_split' to train M_pre "
    "here on the non-rare classes. Required unless --tiny.",
  )
  flags.DEFINE_bool("tiny", False, "Shrunk settings for a CPU check (numbers mean nothing).")
  flags.DEFINE_list("seeds", [], "Seeds to run (default: 0,1,2).")
  flags.DEFINE_integer("max_groups", 0, "Run only the first K groups (0: all).")
  flags.DEFINE_float(
    "time_budget_hours", 0.0, "Start no new session after this many hours (0: no limit)."
  )
  flags.DEFINE_string("data_dir", "", "TFDS data directory ('' = TFDS's default).")
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  from rare_jax.infra import cli_help

  _define_flags()
  cli_help.run(main)
