"""experiments/paper_settings.py: the paper's settings as one command.

The full-size run (ResNet-50 at 224x224, E=15) needs an accelerator; here the script runs end
to end with `--tiny` on slices of the embedded dataset (prepared by `make test`), and the rest
(refusals, the estimate's arithmetic, the time budget) is checked without a run.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from experiments import paper_settings
from rare_jax import compare
from rare_jax.active import metrics
from rare_jax.deep import updates

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "paper_settings.py")


def _run(*args, timeout=600):
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's machine
  return subprocess.run(
    [sys.executable, SCRIPT, *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("paper") / "tiny")
  result = _run(f"--workdir={workdir}", "--tiny")
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return workdir, result.stdout


def _json(workdir, name):
  with open(os.path.join(workdir, name), encoding="utf-8") as f:
    return json.load(f)


def test_tiny_run_says_first_what_the_full_run_measures(tiny):
  _, out = tiny
  assert out.startswith(paper_settings.TINY_WARNING)
  work_starts = out.index("== g0_s0")
  statement = out[:work_starts]
  for words in (
    "A full run (without --tiny) measures:",
    "Figure 3",
    "Ours is ahead of Tropel on a tight labeling budget",
    "`ours` against `ours_linear`",
    "resnet50 at 224x224, E=15 epochs per deep update, N=10 updates x Q=5 rounds x B=10",
    "f_a=100",
    "background-splitting weight 0.1",
    "At 50, 100, 150, 200, 250, 300, 350, 400, 450, 500 labels per category",
    "Not measured: Figures 4-6",
    "This tiny run uses instead: resnet_tiny",
  ):
    assert words in statement, words
  # The estimate for each device kind, for the full run too, before any work.
  full = statement[statement.index("Estimated run time of the full run on rare_fashion_mnist") :]
  assert "6 workdirs: 3 seeds x 2 groups" in full
  for kind in paper_settings.DEVICE_RATES:
    assert re.search(rf"  {kind} \(one GPU.*\): about \d+\.\d h ", full), kind


def test_tiny_run_writes_results_and_provenance(tiny):
  workdir, out = tiny
  results = _json(workdir, "results.json")
  assert sorted(results) == ["ours", "ours_linear", "tropel"]
  assert sorted(results["ours"]) == ["10"]  # i * Q * B with N=1, Q=2, B=5
  against_tropel = _json(workdir, "paired_differences.json")
  against_linear = _json(workdir, "paired_vs_ours_linear.json")
  assert against_tropel["baseline"] == "tropel" and against_linear["baseline"] == "ours_linear"
  # Both files pair the same `ours` values; the baseline values are ours_linear's own F1.
  linear_records = metrics.read_metrics(
    os.path.join(workdir, "g0_s0", "ours_linear", "metrics.jsonl")
  )
  mine = against_linear["differences"]["ours"]["10"]
  theirs = against_tropel["differences"]["ours"]["10"]
  assert mine["n"] == 2 and [p["value"] for p in mine["pairs"]] == [
    p["value"] for p in theirs["pairs"]
  ]
  assert [p["baseline"] for p in mine["pairs"]] == linear_records[1]["f1"]  # round 2
  summary = open(os.path.join(workdir, "summary.md"), encoding="utf-8").read()
  assert paper_settings.TINY_WARNING in summary and "Run finished." in summary
  assert "| `ours` - `tropel` | 10 |" in summary and "| `ours` - `ours_linear` | 10 |" in summary
  record = _json(workdir, "paper_settings.json")
  assert record["tiny"] is True and record["finished"] is True
  assert record["stopped_by_time_budget"] is False
  assert record["statement"] in out and record["config"]["deep"]["model"] == "resnet_tiny"
  assert record["devices"]["backend"] == "cpu" and record["device_kind"] is None
  assert re.fullmatch(r"[0-9a-f]{40}", record["code"]["commit"])
  assert record["provenance"]["cpu"] and os.path.exists(os.path.join(workdir, "provenance.json"))
  # Each deep update trained on no more images than the estimate's upper bound.
  trained = [int(n) for n in re.findall(r"deep update \d+: trainBGSplit on (\d+) images", out)]
  bounds = record["work"]["update_bounds"][0]
  assert len(trained) == len(bounds) == 1
  assert all(0 < n <= bound for n, bound in zip(trained, bounds, strict=True)), (trained, bounds)


def test_full_size_is_refused_without_an_accelerator(tmp_path):
  workdir = tmp_path / "full"
  result = _run(f"--workdir={workdir}", "--init=related_split")
  assert result.returncode != 0
  assert "no accelerator" in result.stderr and "--tiny" in result.stderr
  assert "Traceback" not in result.stderr and not workdir.exists()


def test_weights_are_required_and_checked(tmp_path):
  with pytest.raises(ValueError, match="--init is required"):
    paper_settings.build_config("rare_fashion_mnist")
  with pytest.raises(ValueError, match="no such file"):
    paper_settings.build_config(init=str(tmp_path / "missing.pth"))
  with pytest.raises(ValueError, match="not a regular file"):
    paper_settings.build_config(init=str(tmp_path))
  (tmp_path / "weights.npz").write_bytes(b"x")
  with pytest.raises(ValueError, match="expected a .pth, .pt or .safetensors"):
    paper_settings.build_config(init=str(tmp_path / "weights.npz"))
  with pytest.raises(ValueError, match="with --tiny"):
    paper_settings.build_config(tiny=True, init="related_split")
  with pytest.raises(ValueError, match="slices of rare_fashion_mnist"):
    paper_settings.build_config("places365", tiny=True)
  with pytest.raises(ValueError, match="--dataset='imagenet'"):
    paper_settings.build_config("imagenet", init="related_split")
  with pytest.raises(ValueError, match="a seed is repeated"):
    paper_settings.build_config(init="related_split", seeds=(1, 1))
  assert paper_settings.parse_seeds(["0", "2"]) == (0, 2)
  with pytest.raises(ValueError, match="--seeds='0,x': expected comma-separated integers"):
    paper_settings.parse_seeds(["0", "x"])
  with pytest.raises(ValueError, match="no accelerator"):
    paper_settings.check_backend("cpu", tiny=False)
  paper_settings.check_backend("cpu", tiny=True)
  paper_settings.check_backend("gpu", tiny=False)


def test_full_size_config_is_the_papers(tmp_path):
  weights = tmp_path / "resnet50.pth"
  weights.write_bytes(b"not read here")
  for dataset, b in (("rare_fashion_mnist", 10), ("i_naturalist2017", 10), ("places365", 20)):
    config = paper_settings.build_config(dataset, init=str(weights), seeds=(4,), max_groups=1)
    assert config.deep.init == str(weights.resolve())
    settings = updates.DeepSettings.from_config(config.deep)
    assert (settings.model, settings.image_size, settings.epochs) == ("resnet50", 224, 15)
    assert (settings.frozen_blocks, settings.freeze_batchnorm, settings.warm_start) == (
      0,
      False,
      True,
    )
    assert settings.main_head_init == "random" and settings.aux_weight == 0.1
    assert (config.num_feature_updates, config.rounds_per_update, config.batch_size) == (10, 5, b)
    assert config.pseudo_negative_factor == 100.0 and config.num_seed_positives == 5
    assert config.strategies == ("ours", "tropel", "ours_linear") and config.seeds == (4,)
    assert config.evaluate_model == "deep_head" and config.feature_normalization == "none"
  fashion = paper_settings.build_config(init="related_split", max_groups=1)
  assert fashion.deep.init == "" and fashion.groups == ((0, 1, 4, 5, 8),)
  compare.check_config(fashion)


def test_estimate_follows_the_pseudo_negative_rule():
  config = paper_settings.build_config(init="related_split")
  size = paper_settings.TaskSize(
    pool=100_000, validation=10_000, related=15_000, positives=30, categories=5
  )
  bounds = paper_settings.update_training_bounds(config, size)
  # Update 1: 5 seeds + 50 labels, 30 of them positives: |W_n| = 100 * (30 + 0.1 * 25).
  assert bounds[0] == 5 * (55 + 3250)
  assert bounds[-1] == 5 * (505 + 100 * 30 + 10 * 475)  # update 10
  small = paper_settings.TaskSize(pool=4000, validation=1, related=1, positives=30, categories=5)
  assert paper_settings.update_training_bounds(config, small) == [4000] * 10  # the whole pool
  work = paper_settings.work(config, [size, size])
  assert work["update_images"] == 2 * 15 * sum(bounds)
  assert work["pretrain_images"] == 2 * 30 * 15_000  # M_pre trained here: 30 epochs
  assert work["embed_images"] == 2 * 11 * 110_000  # M_pre's features and 10 re-embeddings
  assert work["deep_updates"] == 20 and work["rounds"] == 2 * 3 * 50
  seconds = paper_settings.seconds(work, paper_settings.DEVICE_RATES["nvidia-h200"])
  assert seconds["deep updates"] == pytest.approx(work["update_images"] / 6725)
  assert seconds["total"] == pytest.approx(sum(v for k, v in seconds.items() if k != "total"))


def test_time_budget_stops_between_sessions(monkeypatch, tmp_path):
  sessions, reports = [], []

  def run_all(config, workdir, *, log, report):
    for strategy in ("ours", "tropel", "ours_linear"):
      sessions.append(strategy)
      report()

  monkeypatch.setattr(compare, "run_all", run_all)
  monkeypatch.setattr(compare, "report", lambda *a, **k: reports.append(1))
  lines = []
  stopped = paper_settings.run_within_budget(
    None,
    str(tmp_path),
    budget_s=1.0,
    started=paper_settings.time.perf_counter() - 2.0,
    log=lines.append,
  )
  assert stopped and sessions == ["ours"] and len(reports) == 1
  assert "no new session started" in lines[-1]
  sessions.clear()
  stopped = paper_settings.run_within_budget(
    None, str(tmp_path), budget_s=0.0, started=0.0, log=lines.append
  )
  assert not stopped and sessions == ["ours", "tropel", "ours_linear"]
