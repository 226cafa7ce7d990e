"""experiments/sweep_pool_budget.py: the pool size x budget sweep (issue 29, item 2).

The end-to-end tests run the script as a user does (a subprocess) with its config's "tiny"
version: pixel-PCA features, pools of 600 and 900 images, 2 seeds, 2 categories, `ours_linear`
and `tropel`, 3 rounds of B = 5. They check the files, that every stored F1 value is the
runner's, that the paired differences and their intervals equal a NumPy computation on the
stored values, that the pseudo-negative counts read back from the checkpoints follow the
method's rule, and that a lost unit is recomputed, the same, while finished ones are skipped.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from experiments import sweep_pool_budget as sweep
from experiments.configs import sweep_pool_budget as sweep_config
from rare_jax.active import metrics
from rare_jax.data import tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _labels(per_class: int, seed: int) -> np.ndarray:
  labels = np.repeat(np.arange(10), per_class)
  return np.random.default_rng(seed).permutation(labels)


def test_pools_are_exact_nested_and_keep_the_prevalence():
  train, test = _labels(300, 0), _labels(100, 1)
  names = [f"class {c}" for c in range(10)]
  made = {
    (size, seed): sweep.sweep_task(
      train,
      test,
      dataset="d",
      categories=(2, 7),
      class_names=names,
      pool_size=size,
      seed=seed,
      pool_fraction=0.01,
      num_seed_positives=5,
    )
    for size in (700, 1400)
    for seed in (0, 1)
  }
  for (size, _), task in made.items():
    assert task.pool_size == size
    assert task.ground_truth().sum(1).tolist() == [round(0.01 * size)] * 2
    assert task.ground_truth()[np.arange(2)[:, None], task.seed_positives].all()
    np.testing.assert_array_equal(task.val_ids, np.arange(len(test)))
    np.testing.assert_array_equal(
      task.val_weights,
      tasks.rare_weights(test, (2, 7), 0.01, what="validation set", minimum=1),
    )
  for seed in (0, 1):
    small, large = made[(700, seed)], made[(1400, seed)]
    assert set(small.pool_ids) < set(large.pool_ids)  # nested pools
    np.testing.assert_array_equal(np.sort(small.seed_ids()), np.sort(large.seed_ids()))
  assert set(made[(700, 0)].pool_ids) != set(made[(700, 1)].pool_ids)
  with pytest.raises(ValueError, match=r"pool size 400 holds 4 positives .* at least 550"):
    sweep.sweep_task(
      train, test, dataset="d", categories=(2, 7), class_names=names, pool_size=400, seed=0,
      pool_fraction=0.01, num_seed_positives=5,
    )  # fmt: skip
  with pytest.raises(ValueError, match="pool size 2500 needs 2450 non-rare images"):
    sweep.sweep_task(
      train, test, dataset="d", categories=(2, 7), class_names=names, pool_size=2500, seed=0,
      pool_fraction=0.01, num_seed_positives=5,
    )  # fmt: skip


def test_check_config_refuses_bad_sweeps():
  config = sweep_config.get_config()
  sweep.check_config(config)
  for key, value, message in (
    ("strategies", ("ours", "tropel"), "trains the deep model"),
    ("baseline", "ours", "is not one of"),
    ("report_budgets", (10, 15), "report budget 15"),
    ("report_budgets", (210,), "report budget 210"),
    ("pool_sizes", (5000, 5000), "distinct pool sizes"),
  ):
    bad = sweep_config.get_config()
    setattr(bad, key, value)
    with pytest.raises(ValueError, match=message):
      sweep.check_config(bad)
  bad = sweep_config.get_config()
  bad.deep.init = ""
  with pytest.raises(ValueError, match="pretrained trunk"):
    sweep.check_config(bad)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sweep") / "tiny")
  env = dict(os.environ)  # conftest's compilation cache; one CPU device, as users run it
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
    [
      sys.executable,
      "experiments/sweep_pool_budget.py",
      "--config=experiments/configs/sweep_pool_budget.py:tiny",
      f"--workdir={workdir}",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  with open(os.path.join(workdir, "sweep_raw.json")) as f:
    document = json.load(f)
  return workdir, document, result.stdout


def test_writes_every_file_and_the_runners_values(finished):
  workdir, document, stdout = finished
  config = sweep_config.get_config("tiny")
  for name in ("sweep_raw.json", "sweep_paired.md", "sweep_paired.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "sweep_paired.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  rows = document["rows"]
  rounds = int(config.num_feature_updates)
  assert len(rows) == 2 * 2 * 2 * len(config.strategies) * rounds  # pools, seeds, categories
  assert sorted(document["units"]) == ["p600_s0", "p600_s1", "p900_s0", "p900_s1"]
  for row in rows:
    assert row["pool_positives"] == round(0.01 * row["pool_size"])
    run_dir = os.path.join(workdir, f"p{row['pool_size']}_s{row['seed']}", row["strategy"])
    record = next(
      r
      for r in metrics.read_metrics(os.path.join(run_dir, "metrics.jsonl"))
      if r["labels_per_category"] == row["labels"]
    )
    position = list(config.categories).index(row["category"])
    assert row["f1"] == record["f1"][position]
    assert row["pseudo_negatives"] == record["num_pseudo_negative"][position]
  assert "| 600 | 6 | 5 |" in stdout  # the table is printed at the end


def _t_interval(values):
  values = np.asarray(values, float)
  n = len(values)
  half = stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n)
  return values.mean(), values.mean() - half, values.mean() + half


def test_paired_differences_equal_numpy_on_the_stored_values(finished):
  workdir, document, _ = finished
  config = sweep_config.get_config("tiny")
  f1 = {
    (r["pool_size"], r["seed"], r["category"], r["strategy"], r["labels"]): r["f1"]
    for r in document["rows"]
  }
  with open(os.path.join(workdir, "sweep_paired.md")) as f:
    table = f.read()
  checked = 0
  for pool_size in config.pool_sizes:
    for strategy in ("ours_linear",):
      stored = document["paired"][str(pool_size)][f"{strategy} - tropel"]
      assert sorted(int(b) for b in stored) == [5, 10, 15]
      for budget, entry in stored.items():
        differences = np.array(
          [
            [
              f1[(pool_size, seed, category, strategy, int(budget))]
              - f1[(pool_size, seed, category, "tropel", int(budget))]
              for category in config.categories
            ]
            for seed in config.seeds
          ]
        )
        mean, low, high = _t_interval(differences.ravel())
        pair = entry["pair_level"]
        np.testing.assert_allclose([pair["mean"], pair["low"], pair["high"]], [mean, low, high])
        assert pair["n"] == 4
        assert entry["better"] == int((differences > 0).sum())
        assert entry["worse"] == int((differences < 0).sum())
        np.testing.assert_allclose(entry["per_seed"], differences.mean(1))
        seed_mean, seed_low, seed_high = _t_interval(differences.mean(1))
        seeds = entry["seed_level"]
        np.testing.assert_allclose(
          [seeds["mean"], seeds["low"], seeds["high"]], [seed_mean, seed_low, seed_high]
        )
        if int(budget) in config.report_budgets:
          line = next(
            x for x in table.splitlines() if x.startswith(f"| {pool_size} | ") and
            x.split(" | ")[2] == budget
          )  # fmt: skip
          assert f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]" in line
          assert f"{seed_mean:+.3f} [{seed_low:+.3f}, {seed_high:+.3f}]" in line
          checked += 1
  assert checked == 2 * 2


def test_pseudo_negative_diagnostics_follow_the_rule(finished):
  _, document, _ = finished
  seen_capped = False
  for row in document["rows"]:
    drawn, wanted, cap = (
      row["pseudo_negatives"],
      row["pseudo_negative_wanted"],
      row["pseudo_negative_cap"],
    )
    if row["strategy"] == "tropel":
      assert drawn == wanted == row["positives_in_pseudo_negatives"] == 0
    else:
      # docs/method.md: min(round(f_a (|L_p| + 0.1 |L_n|)), floor(U / 2)) are drawn; f_a = 2,
      # |L_p| = 5 seeds + found, |L_n| = labels - found (no ties to round: 2 (10 |L_p| + |L_n|)
      # is even, a tie needs 10 k + 5).
      found = row["positives_found"]
      assert wanted == round(2 * (10 * (5 + found) + row["labels"] - found) / 10)
      assert drawn == min(wanted, cap)
      seen_capped |= wanted > cap
    # Unlabeled images after `labels` queries and 5 seeds: half of them is the cap.
    assert cap == (row["pool_size"] - 5 - row["labels"]) // 2
    assert row["unfound_positives"] == row["pool_positives"] - 5 - row["positives_found"]
    assert 0 <= row["positives_in_pseudo_negatives"] <= row["unfound_positives"]
  assert not seen_capped  # f_a = 2 asks for fewer than half of these pools


def test_a_lost_unit_is_recomputed_the_same_and_finished_ones_skipped(finished, tmp_path):
  workdir, document, _ = finished
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  lost = os.path.join(copy, "p900_s1", sweep.UNIT_FILE)
  with open(lost) as f:
    before = json.load(f)
  os.remove(lost)
  lines = []
  sweep.run_sweep(sweep_config.get_config("tiny"), copy, log=lines.append)
  with open(lost) as f:
    after = json.load(f)
  assert after["strategies"] == before["strategies"]
  assert sum(line.endswith(": finished") for line in lines) == 3
  with open(os.path.join(copy, "sweep_raw.json")) as f:
    assert json.load(f)["rows"] == document["rows"]
