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
EVERY_PUBLISHED = (
  "imagenet",
  "imagenet/all_strategies",
  "imagenet/ablations",
  "imagenet/baselines_and_f_a",
  "self_supervised",
)


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
  for name, budgets in document.get("derived", {}).items():
    a, b = name.split(" - ")
    for budget, entry in budgets.items():
      if "pair_level" not in entry:
        continue
      theirs = {_key(p): p["value"] for p in document["differences"][b][budget]["per_pair"]}
      differences = [
        p["value"] - theirs[_key(p)]
        for p in document["differences"][a][budget]["per_pair"]
        if _key(p) in theirs
      ]
      assert (entry["pair_level"]["low"], entry["pair_level"]["high"]) == pytest.approx(
        _t95(differences), abs=1e-9
      ), (name, budget)


def _key(pair):
  return pair["seed"], pair["group"], pair["category"]


def _pairs(seeds, values):
  return [
    {"seed": s, "group": 0, "category": c, "value": v, "baseline": 0.0, "difference": v}
    for s, (c, v) in zip(seeds, values, strict=True)
  ]


def test_derived_differences_match_pairs_by_seed_and_category():
  """A - B pairs A's and B's values of the same (seed, group, category), whatever the order
  the pairs are stored in, over the seeds both have (B run on seeds 0-1 only)."""
  from experiments import paired_values
  from rare_jax import predict  # defines --workdir too: importing the script must not clash

  assert "workdir" in paired_values.FLAGS and predict.main
  a_pairs = _pairs([0, 0, 1, 1, 2, 2], [(3, 0.5), (7, 0.2), (3, 0.6), (7, 0.1), (3, 0.9), (7, 0.9)])
  b_pairs = _pairs([1, 0, 1, 0], [(7, 0.0), (7, 0.1), (3, 0.4), (3, 0.3)])
  document = {
    "differences": {
      name: {"50": {"per_pair": pairs, "per_seed": [0.0] * len({p["seed"] for p in pairs})}}
      for name, pairs in (("a", a_pairs), ("b", b_pairs))
    }
  }
  for entry in document["differences"].values():
    entry["50"].update(mean=0.0, low=0.0, high=0.0, n=len(entry["50"]["per_pair"]))
  derived = paired_values.enrich(document, None)["derived"]["a - b"]["50"]
  # seed 0: 0.5 - 0.3, 0.2 - 0.1; seed 1: 0.6 - 0.4, 0.1 - 0.0
  np.testing.assert_allclose(derived["per_seed"], [0.15, 0.15])
  assert derived["seeds"] == [0, 1] and derived["pair_level"]["n"] == 4
  assert derived["pair_level"]["mean"] == pytest.approx(0.15)
  # The driver's own `pairs` (seed, group, position) are matched the same way.
  for entry in document["differences"].values():
    entry["50"]["pairs"] = [
      dict(p, position=[3, 7].index(p.pop("category"))) for p in entry["50"].pop("per_pair")
    ]
  again = paired_values.enrich(document, None)["derived"]["a - b"]["50"]
  assert again["seeds"] == [0, 1] and again["pair_level"] == derived["pair_level"]
  # The table lists B - A as A - B negated; a pair the results lack is named.
  document = {"baseline": "t", "differences": {}, "derived": {"a - b": {"50": derived}}}
  pair = derived["pair_level"]  # seed 0: 0.2, 0.1; seed 1: 0.2, 0.1: low < high
  row = paired_values.table(document, ["b - a"]).splitlines()[-1]
  assert f"| `b` - `a` | 50 | -0.150 [{-pair['high']:+.3f}, {-pair['low']:+.3f}] (n = 4) |" in row
  assert pair["low"] < pair["high"] - 0.05
  # Identical runs negated print +0.000 (not -0.000); one seed has no interval (not [nan, nan]).
  zero = {"mean": 0.0, "low": 0.0, "high": 0.0, "n": 5}
  one = {"mean": 0.0, "low": math.nan, "high": math.nan, "n": 1}
  document["derived"]["a - b"]["50"] = dict(derived, pair_level=zero, seed_level=one)
  row = paired_values.table(document, ["b - a"]).splitlines()[-1]
  assert row == "| `b` - `a` | 50 | +0.000 [+0.000, +0.000] (n = 5) | +0.000 (n = 1, no interval) |"
  # A float residue (A - B = 2e-17, negated) prints +0.000 too; a real -0.00005 keeps its sign.
  residue = {"mean": 2e-17, "low": -0.0149, "high": 0.0151, "n": 25}
  document["derived"]["a - b"]["50"] = dict(derived, pair_level=residue, seed_level=one)
  row = paired_values.table(document, ["b - a"]).splitlines()[-1]
  assert row.startswith("| `b` - `a` | 50 | +0.000 [-0.015, +0.015] (n = 25) |"), row
  small = dict(residue, mean=5e-5)
  document["derived"]["a - b"]["50"] = dict(derived, pair_level=small, seed_level=one)
  row = paired_values.table(document, ["b - a"]).splitlines()[-1]
  assert row.startswith("| `b` - `a` | 50 | -0.000 [-0.015, +0.015] (n = 25) |"), row
  with pytest.raises(ValueError, match="'a - c' is not a derived comparison.*\\['a - b'\\]"):
    paired_values.check_derived(document, ["a - b", "b - a", "a - c"])


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
