"""experiments/paired_values.py and the published ImageNet comparison's stored pairs."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "docs", "results")
PUBLISHED = os.path.join(RESULTS, "imagenet", "paired_differences.json")
EVERY_PUBLISHED = ("imagenet", "imagenet/all_strategies", "self_supervised")


def _t95(values):
  values = np.asarray(values, float)
  half = stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size)
  return values.mean() - half, values.mean() + half


@pytest.mark.parametrize("folder", EVERY_PUBLISHED)
def test_published_intervals_recompute_from_the_stored_pairs(folder):
  """Every pair-level and seed-level interval of a published comparison follows from its
  per-(seed, category) values, recomputed here with scipy, not with the script's code."""
  with open(os.path.join(RESULTS, folder, "paired_differences.json")) as f:
    document = json.load(f)
  checked = 0
  for strategy, budgets in document["differences"].items():
    for budget, entry in budgets.items():
      pairs = entry["per_pair"]
      assert len(pairs) == entry["n"], (strategy, budget)
      differences = [p["value"] - p["baseline"] for p in pairs]
      low, high = _t95(differences)
      assert (entry["pair_level"]["low"], entry["pair_level"]["high"]) == pytest.approx(
        (low, high), abs=1e-9
      ), (strategy, budget)
      seeds = sorted({p["seed"] for p in pairs})
      by_seed = {
        s: [d for p, d in zip(pairs, differences, strict=True) if p["seed"] == s] for s in seeds
      }
      per_seed = [np.mean(by_seed[s]) for s in seeds]
      if len(seeds) > 1:
        low, high = _t95(per_seed)
        assert (entry["seed_level"]["low"], entry["seed_level"]["high"]) == pytest.approx(
          (low, high), abs=1e-9
        ), (strategy, budget)
      checked += 1
  assert checked >= 2  # every strategy against the baseline at 50 and 100 labels


@pytest.mark.parametrize("workdir", ["missing", "empty"])
def test_a_workdir_without_runs_is_refused_and_nothing_written(tmp_path, workdir):
  results = tmp_path / "results"
  results.mkdir()
  shutil.copy(PUBLISHED, results / "paired_differences.json")
  before = (results / "paired_differences.json").read_bytes()
  path = tmp_path / workdir
  if workdir == "empty":
    path.mkdir()
  result = subprocess.run(
    [
      sys.executable,
      "experiments/paired_values.py",  # the documented command, from the repository root
      f"--results={results}",
      f"--workdir={path}",
      "--config=experiments/configs/compare_imagenet.py",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
  )
  assert result.returncode != 0
  said = "is not a directory" if workdir == "missing" else "holds no finished point"
  assert said in result.stderr and "Traceback" not in result.stderr, result.stderr
  assert (results / "paired_differences.json").read_bytes() == before
  assert not (results / "paired_values.md").exists()
