r"""Positives found by a folder run with pretrained features vs the pixel-PCA stand-in.

    python experiments/measure_folder_features.py --workdir=runs/measure_folder

Writes the example folder (`experiments/make_example_folder.py`: 1,110 Fashion-MNIST images,
3 rare categories of 20), then for each features kind (`pixel_pca`, the baseline, and
`pretrained`, the command's default: EfficientNet-Lite0 with its ImageNet weights at 128x128)
and each rare category runs the folder loop of `python -m rare_jax.label` (its config, its
workdir, the same runner) with a simulated labeler answering from the sub-folder names, for
`--budget` labels per category in batches of `--batch_size`, and prints the positives found
(beyond the 5 seeds; 20 findable per category), the wall time and peak resident memory.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time

from absl import app, flags

if __package__ in (None, ""):  # run as a script: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import make_example_folder  # noqa: E402
from rare_jax.active import labelers, runner  # noqa: E402
from rare_jax.infra.checkpoint import quiet_library_logging  # noqa: E402
from rare_jax.webapp import folder_run  # noqa: E402


def measure(workdir: str, *, budget: int, batch_size: int, features: tuple[str, ...]) -> dict:
  """{features: {category: (positives found per round, seconds)}}."""
  images, seeds = make_example_folder.write(os.path.join(workdir, "example"))
  results = {}
  for kind in features:
    results[kind] = {}
    for category, seed_dir in sorted(seeds.items()):
      started = time.perf_counter()
      config = folder_run.make_config(budget=budget, batch_size=batch_size, features=kind)
      run = folder_run.prepare_folder_run(
        os.path.join(workdir, f"{kind}_{category}"),
        images=images,
        seeds=seed_dir,
        config=config,
        category_name=category,
        eval_subfolder=category,
        log=lambda line: print(f"  {line}", flush=True),
      )
      records = runner.run_strategy(
        run_dir=run.run_dir,
        config=run.config,
        strategy=folder_run.STRATEGY,
        features=run.features,
        val_features=run.val_features,
        seed_ids=run.seed_ids,
        val_ground_truth=run.val_ground_truth,
        labeler=labelers.SimulatedLabeler(run.val_ground_truth),
        log=lambda line: print(f"  {line}", flush=True),
      )
      found = [r["positives_found"][0] for r in records]
      results[kind][category] = (found, time.perf_counter() - started)
      print(f"{kind:10s} {category:8s} positives found per round {found}", flush=True)
  return results


def main(argv):
  del argv
  quiet_library_logging()
  flags_ = flags.FLAGS
  kinds = tuple(flags_.features)
  results = measure(
    flags_.workdir, budget=flags_.budget, batch_size=flags_.batch_size, features=kinds
  )
  categories = sorted(results[kinds[0]])
  print(
    f"\n{time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} CPUs; "
    f"{flags_.budget} labels per category, batches of {flags_.batch_size}; positives found "
    "beyond the 5 seeds (of 20 in the pool per category)"
  )
  print("| features | " + " | ".join(categories) + " | total | wall time |")
  print("|---|" + "---|" * (len(categories) + 2))
  for kind in kinds:
    found = [results[kind][c][0][-1] for c in categories]
    seconds = sum(results[kind][c][1] for c in categories)
    print(f"| {kind} | " + " | ".join(map(str, found)) + f" | {sum(found)} | {seconds:.0f} s |")
  if len(kinds) == 2:
    a = sum(results[kinds[0]][c][0][-1] for c in categories)
    b = sum(results[kinds[1]][c][0][-1] for c in categories)
    print(f"{kinds[1]} / {kinds[0]}: {b / max(a, 1):.2f}x the positives")
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"peak resident memory {peak:.2f} GiB")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", "runs/measure_folder", "Where the folder and runs go.")
  flags.DEFINE_integer("budget", 50, "Labels per category.")
  flags.DEFINE_integer("batch_size", 10, "Labels per batch.")
  flags.DEFINE_list("features", ["pixel_pca", "pretrained"], "Features kinds, baseline first.")
  app.run(main)
