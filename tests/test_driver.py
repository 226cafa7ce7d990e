"""The comparison driver (rare_jax.compare): runs, skips, resumes, aggregates, reports.

The end-to-end test runs experiments/configs/compare_tiny.py (frozen pixel-PCA features, no
deep model) in process on the embedded dataset, prepared by `make test` before pytest starts.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments.configs import compare_tiny
from rare_jax import compare
from rare_jax.active import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def record(round_index, labels, f1, deep_f1=None, fpr=None, num=None):
  out = {"round": round_index, "labels_per_category": labels, "f1": f1, "mean_f1": np.mean(f1)}
  if deep_f1 is not None:
    out["deep"] = {"f1": deep_f1, "mean_f1": np.mean(deep_f1)}
    if fpr is not None:
      out["deep"]["pseudo_labels"] = {"pseudo_positive_fpr": fpr, "num_pseudo_positives": num}
  return out


def test_evaluation_points_take_the_deep_head_after_each_update():
  config = compare_tiny.get_config()  # Q = 2, B = 5
  linear = [record(r, 5 * r, [0.1 * r]) for r in (1, 2, 3, 4)]
  points = compare.evaluation_points(linear, config, "tropel")
  assert sorted(points) == [10, 20] and points[20]["f1"] == [0.4]
  deep = [
    record(1, 5, [0.1]),
    record(2, 10, [0.2], deep_f1=[0.5], fpr=[0.25], num=[4]),
    record(3, 15, [0.3]),
    record(4, 20, [0.4], deep_f1=[0.7], fpr=[None], num=[0]),
  ]
  points = compare.evaluation_points(deep, config, "kd_semi")
  assert points[10]["f1"] == [0.5] and points[10]["linear_f1"] == [0.2]
  linear_headline = compare.evaluation_points(deep, config, "kd_semi", headline="linear")
  assert linear_headline[10]["f1"] == [0.2] and linear_headline[10]["deep_f1"] == [0.5]
  with pytest.raises(ValueError, match="evaluate_model must be one of"):
    compare.evaluation_points(deep, config, "kd_semi", headline="both")
  assert points[10]["pseudo_positive_fpr"] == [0.25] and points[20]["f1"] == [0.7]
  # No-Linear-Updates (Q=1, B=Q*B): one update per round, at the same budgets.
  ablation = [record(1, 10, [0.3], deep_f1=[0.6]), record(2, 20, [0.4], deep_f1=[0.8])]
  assert sorted(compare.evaluation_points(ablation, config, "no_linear_updates")) == [10, 20]


def test_fully_supervised_points_of_groups_with_other_pool_sizes_aggregate(tmp_path):
  config = compare_tiny.get_config()
  config.seeds = (0,)
  for group_index, (pool_size, f1) in enumerate(((1000, [0.2, 0.4]), (990, [0.9]))):
    directory = tmp_path / compare.run_name(group_index, 0) / "fully_supervised"
    directory.mkdir(parents=True)
    with metrics.MetricsWriter(directory / "metrics.jsonl") as writer:
      writer.write(dict(record(1, pool_size, f1), deep={"f1": [0.0] * len(f1)}))
  with config.unlocked():
    config.strategies = ("fully_supervised",)
    config.evaluate_model = "linear"
  out = compare.aggregate(compare.collect(config, str(tmp_path)))
  np.testing.assert_allclose(out["fully_supervised"][compare.ALL_LABELS]["mean_f1"], 0.5)
  np.testing.assert_allclose(out["fully_supervised"][compare.ALL_LABELS]["deep_mean_f1"], 0.0)
  assert "| fully_supervised | 0.500 ± 0.000 | 1 |" in compare.markdown_table(out)


def test_aggregate_means_over_categories_then_seeds():
  collected = {
    "ours": {
      0: {50: [{"f1": [0.2, 0.4], "linear_f1": [0.0, 0.0], "ap": [0.3]}, {"f1": [0.6]}]},
      1: {50: [{"f1": [0.6, 0.6], "linear_f1": [1.0, 1.0]}, {"f1": [0.6]}]},  # mean 0.6
    },
    "deep_prop": {
      0: {50: [{"f1": [0.1], "pseudo_positive_fpr": [0.5, None], "num_pseudo_positives": [4, 0]}]}
    },
  }
  out = compare.aggregate(collected)
  assert out["ours"][50]["n"] == 2
  np.testing.assert_allclose(out["ours"][50]["mean_f1"], 0.5)
  np.testing.assert_allclose(out["ours"][50]["std_f1"], 0.1)  # over seeds, ddof 0
  np.testing.assert_allclose(out["ours"][50]["linear_mean_f1"], 0.5)
  np.testing.assert_allclose(out["ours"][50]["mean_ap"], 0.3)  # the one seed that has it
  np.testing.assert_allclose(out["deep_prop"][50]["fpr"], 0.5)  # None (no pseudo-positives) out
  np.testing.assert_allclose(out["deep_prop"][50]["num_pseudo_positives"], 2.0)
  table = compare.markdown_table(out)
  assert "| ours | 0.500 ± 0.100 | - | 2 |" in table
  assert "| deep_prop | 0.500 (2) |" in table  # the FPR table


def test_details_pair_each_budget_with_the_fully_supervised_point():
  from experiments import comparison_details

  full = compare.ALL_LABELS
  point = lambda f1, ap: [{"f1": f1[:2], "ap": ap[:2]}, {"f1": f1[2:], "ap": ap[2:]}]  # 2 groups
  collected = {
    "fully_supervised": {
      0: {full: point([0.5, 0.5, 0.2], [0.6, 0.6, 0.6])},
      2: {full: point([0.4, 0.4, 0.4], [0.5, 0.5, 0.5])},
    },
    "ours": {
      0: {50: point([0.3, 0.5, 0.4], [0.6, 0.6, 0.6]), 100: point([0.5] * 3, [0.7] * 3)},
      1: {50: point([0.9] * 3, [0.9] * 3)},  # no fully supervised seed 1: left out
      2: {50: point([0.4, 0.6, 0.5], [0.5, 0.5, 0.5])},
    },
    "tropel": {1: {50: point([0.1] * 3, [0.1] * 3)}},  # no seed in common: no row
  }
  rows = comparison_details.minus_all_labels(collected, "fully_supervised")
  assert [(r["strategy"], r["budget"], r["metric"], r["seeds"]) for r in rows] == [
    ("ours", 50, "f1", [0, 2]),
    ("ours", 50, "ap", [0, 2]),
    ("ours", 100, "f1", [0]),
    ("ours", 100, "ap", [0]),
  ]
  f1_50 = rows[0]
  # Pairs: -0.2, 0, +0.2 (seed 0) and 0, +0.2, +0.1 (seed 2); seed means +0 and +0.1.
  assert f1_50["pairs"]["n"] == 6 and f1_50["over_seeds"]["n"] == 2
  np.testing.assert_allclose(f1_50["pairs"]["mean"], 0.3 / 6)
  np.testing.assert_allclose(f1_50["over_seeds"]["mean"], 0.05)
  assert f1_50["pairs"]["low"] < 0 < f1_50["pairs"]["high"]
  np.testing.assert_allclose(rows[1]["pairs"]["mean"], 0.0, atol=1e-12)  # AP equal
  np.testing.assert_allclose(rows[2]["pairs"]["mean"], 0.1)  # 0.5 - (0.5, 0.5, 0.2)
  assert rows[2]["over_seeds"]["n"] == 1 and np.isnan(rows[2]["over_seeds"]["low"])


def test_check_config_refuses_bad_sweeps():
  config = compare_tiny.get_config()
  with config.unlocked():
    config.groups = ((1, 5), (5, 8))
  with pytest.raises(ValueError, match="must not share a category"):
    compare.check_config(config)
  config = compare_tiny.get_config()
  with config.unlocked():
    config.baseline = "kd_semi"
  with pytest.raises(ValueError, match="config.baseline='kd_semi' is not one of"):
    compare.check_config(config)
  config = compare_tiny.get_config()
  config.strategies = ("ours",)
  with pytest.raises(ValueError, match="needs config.features='m_pre'"):
    compare.check_config(config)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  config = compare_tiny.get_config()
  config.seeds = (0,)  # one seed keeps the test short; test_aggregate covers several
  workdir = str(tmp_path_factory.mktemp("compare") / "tiny")
  lines = []
  compare.run_all(config, workdir, log=lines.append)
  compare.report(config, workdir, log=lines.append)
  return config, workdir, lines


def test_driver_runs_every_group_seed_and_strategy(finished):
  config, workdir, lines = finished
  for seed in config.seeds:
    for group_index, group in enumerate(config.groups):
      directory = os.path.join(workdir, compare.run_name(group_index, seed))
      with open(os.path.join(directory, "config.json")) as f:
        sub = json.load(f)
      assert sub["categories"] == list(group) and sub["seed"] == seed and "groups" not in sub
      for strategy in config.strategies:
        records = metrics.read_metrics(os.path.join(directory, strategy, "metrics.jsonl"))
        assert [r["round"] for r in records] == [1, 2, 3, 4]
        assert len(records[-1]["f1"]) == len(group)
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert sorted(results) == ["ours_linear", "tropel"]
  assert sorted(results["tropel"], key=int) == ["10", "20"]  # i * Q * B, Q=2, B=5
  with open(os.path.join(workdir, "paired_differences.json")) as f:
    paired = json.load(f)
  assert paired["baseline"] == "tropel" and set(paired["differences"]) == {"ours_linear"}
  assert results["tropel"]["20"]["n"] == 1
  with open(os.path.join(workdir, "results.md")) as f:
    assert "| tropel |" in f.read()
  assert os.path.getsize(os.path.join(workdir, "fig3_baselines.png")) > 1000
  timings = metrics.read_metrics(os.path.join(workdir, "timings.jsonl"))
  assert len(timings) == 2 * (1 + len(config.strategies))


def test_driver_skips_finished_and_resumes_interrupted_runs(finished, tmp_path):
  config, workdir, _ = finished
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  run_dir = os.path.join(copy, "g1_s0", "tropel")
  # Killed during round 3, after its answers were logged: no later checkpoint or metrics.
  for step in ("3", "4"):
    shutil.rmtree(os.path.join(run_dir, "checkpoints", step))
  metrics.rewrite_up_to(os.path.join(run_dir, "metrics.jsonl"), 2)
  metrics.rewrite_up_to(os.path.join(run_dir, "answers.jsonl"), 3)
  # A report now leaves the unfinished run out (its round-2 point would change n at 10 labels).
  assert compare.unfinished_runs(config, copy) == [os.path.join("g1_s0", "tropel")]
  collected = compare.collect(config, copy)
  assert 0 not in collected.get("tropel", {}) and 0 in collected["ours_linear"]
  lines = []
  compare.run_all(config, copy, log=lines.append)
  text = "\n".join(lines)
  assert "g0_s0: all 2 strategies finished" in text
  assert "g1_s0: categories (8,), to run: ['tropel']" in text
  assert "[tropel] resuming from round 2 of 4" in text
  resumed = metrics.read_metrics(os.path.join(run_dir, "metrics.jsonl"))
  original = metrics.read_metrics(os.path.join(workdir, "g1_s0", "tropel", "metrics.jsonl"))
  drop = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]
  assert drop(resumed) == drop(original)


def test_cli_report_only(finished, tmp_path):
  _, workdir, _ = finished
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  os.remove(os.path.join(copy, "results.md"))

  def run(*command, expect=0):
    """`command` (after `python`) on the tiny comparison's copy, from the repository root."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    config = ["--config=experiments/configs/compare_tiny.py", f"--workdir={copy}"]
    result = subprocess.run(
      [sys.executable, *command, *config],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert result.returncode == expect, result.stdout + result.stderr
    return result

  result = run("-m", "rare_jax.compare", "--report_only")
  assert "| ours_linear |" in result.stdout and "| tropel |" in result.stdout
  assert os.path.exists(os.path.join(copy, "results.md"))

  # Per-category details of a partial comparison: each strategy over the seeds it finished
  # (here tropel has a second seed, a copy of the first), paired AP over the seeds both have.
  for group in (0, 1):
    shutil.copytree(
      os.path.join(copy, compare.run_name(group, 0)),
      os.path.join(copy, compare.run_name(group, 1)),
      ignore=shutil.ignore_patterns("ours_linear"),
    )
  result = run("experiments/comparison_details.py")
  assert "ours_linear: seeds [0]\ntropel: seeds [0, 1]" in result.stdout
  assert "(2 seeds)" in result.stdout and "(1 seed)" in result.stdout
  assert "AP ours_linear - tropel: " in result.stdout and "seeds [0])" in result.stdout
  # A workdir without finished runs is named, not reported as empty.
  shutil.rmtree(copy)
  os.makedirs(copy)
  result = run("experiments/comparison_details.py", expect=1)
  assert f"--workdir={copy!r} holds no finished run" in result.stderr


@pytest.mark.parametrize(
  "module_name, dataset", [("inat2017", "i_naturalist2017"), ("places365", "places365_small")]
)
def test_paper_configs_select_groups_and_read_mocked_data(module_name, dataset, tmp_path):
  import importlib

  import tensorflow_datasets as tfds

  from rare_jax.active import runner
  from rare_jax.data import pipeline, sources
  from rare_jax.deep import updates

  config = importlib.import_module(f"experiments.configs.{module_name}").get_config()
  assert config.dataset == dataset and config.deep.model == "resnet50"
  assert (config.num_feature_updates, config.rounds_per_update) == (10, 5)
  assert config.batch_size == (10 if dataset == "i_naturalist2017" else 20)
  assert config.pseudo_negative_factor == 100.0 and config.deep.epochs == 15
  assert runner.loop_config(config, "no_linear_updates").batch_size == 5 * config.batch_size
  # Mocked data (USE_CODE: the real builder's features, no files, never a download).
  with config.unlocked():
    config.data_dir = str(tmp_path / "no_tfds_here")
    config.group_selection = dict(num_groups=2, group_size=3, min_count=1, max_count=40, seed=0)
  workdir = str(tmp_path / "run")
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    resolved = compare.resolve_groups(config, workdir, log=lambda _: None)
    compare.check_config(resolved)
    groups = resolved.groups
    assert len(groups) == 2 and all(len(g) == 3 for g in groups)
    assert len({c for g in groups for c in g}) == 6
    source = sources.open_source(dataset, "train", config.data_dir)
    labels = source.labels()
    assert all(np.isin(list(g), labels).all() for g in groups)  # classes with train images
    settings = updates.DeepSettings.from_config(config.deep)
    batch = pipeline.make_batch(source, np.arange(3), batch_size=4, **settings.preprocess)
  assert batch["image"].shape == (4, 224, 224, 3) and batch["mask"].tolist() == [1, 1, 1, 0]
  assert np.isfinite(batch["image"]).all()
  # The groups are kept: a restart (even without the data) uses the same ones.
  assert compare.resolve_groups(config, workdir).groups == groups
  with pytest.raises(ValueError, match="expected at least 600"):
    compare.select_groups(labels, num_groups=50, group_size=12, min_count=1, max_count=40, seed=0)


def test_paired_differences_pair_seed_and_category_with_t_intervals():
  def points(*groups):
    return [{"f1": list(g)} for g in groups]

  collected = {
    "tropel": {0: {50: points([0.1, 0.2], [0.3])}, 1: {50: points([0.0, 0.5], [0.5])}},
    "ours": {
      0: {50: points([0.3, 0.2], [0.4]), 100: points([1.0, 1.0], [1.0])},
      1: {50: points([0.2, 0.4], [0.9])},
    },
  }
  out = compare.paired_differences(collected, "tropel")
  assert set(out) == {"ours"} and set(out["ours"]) == {50}  # no tropel point at 100
  diffs = np.array([0.2, 0.0, 0.1, 0.2, -0.1, 0.4])  # seed 0 then 1, group by group
  p = out["ours"][50]
  np.testing.assert_allclose(p["mean"], diffs.mean())
  half = 2.5705818366147395 * diffs.std(ddof=1) / np.sqrt(6)  # t(0.975, 5)
  np.testing.assert_allclose([p["low"], p["high"]], [diffs.mean() - half, diffs.mean() + half])
  assert (p["n"], p["better"], p["worse"]) == (6, 4, 1)
  np.testing.assert_allclose(p["per_seed"], [0.1, 0.5 / 3])
  # Every value behind the intervals is stored: the pairs give back the differences.
  assert [(q["seed"], q["group"], q["position"]) for q in p["pairs"]] == [
    (0, 0, 0),
    (0, 0, 1),
    (0, 1, 0),
    (1, 0, 0),
    (1, 0, 1),
    (1, 1, 0),
  ]
  np.testing.assert_allclose([q["value"] - q["baseline"] for q in p["pairs"]], diffs)
  np.testing.assert_allclose([q["baseline"] for q in p["pairs"]], [0.1, 0.2, 0.3, 0.0, 0.5, 0.5])
  seeds = np.array([0.1, 0.5 / 3])  # seed level: t(0.975, 1) = 12.706 over 2 seed means
  half = 12.706204736174707 * seeds.std(ddof=1) / np.sqrt(2)
  np.testing.assert_allclose(
    [p["seed_level"]["low"], p["seed_level"]["high"]], [seeds.mean() - half, seeds.mean() + half]
  )
  assert p["seed_level"]["n"] == 2
  assert "| ours | +0.133 [" in compare.paired_table(out, "tropel")
  assert "(4/1/6; seeds [" in compare.paired_table(out, "tropel")
  # One seed: no interval over seeds (not "[+nan, +nan]").
  one = compare.paired_differences({s: {0: by[0]} for s, by in collected.items()}, "tropel")
  assert one["ours"][50]["seed_level"]["n"] == 1
  assert "(2/0/3; 1 seed) |" in compare.paired_table(one, "tropel")
  # A float residue (a mean of -2e-17 over pairs that cancel) prints +0.000, not -0.000; a
  # real small difference keeps its sign.
  residue = {"mean": -2e-17, "low": -0.015, "high": 0.015, "n": 25, "better": 1, "worse": 1}
  row = compare.paired_table({"a": {50: residue}}, "b")
  assert "| a | +0.000 [-0.015, +0.015] (1/1/25) |" in row
  row = compare.paired_table({"a": {50: {**residue, "mean": -5e-5}}}, "b")
  assert "| a | -0.000 [-0.015, +0.015] (1/1/25) |" in row
  assert compare.paired_differences(collected, "random") == {}  # no such baseline: no table
