"""End to end through the CLI: kill -9 mid-run and resume exactly; replay; tampering caught.

These run `python -m rare_jax.run` / `rare_jax.replay` in subprocesses on the embedded dataset
(prepared by `make test` before pytest starts) with experiments/configs/tiny.py.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from rare_jax import workdirs
from rare_jax.active import runner
from rare_jax.infra.checkpoint import CheckpointStore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "experiments", "configs", "tiny.py")


def _env():
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one plain CPU device, like a user's run
  return env


def _run(workdir, *extra, check=True):
  result = subprocess.run(
    [sys.executable, "-m", "rare_jax.run", f"--config={CONFIG}", f"--workdir={workdir}", *extra],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  if check and result.returncode != 0:
    raise AssertionError(f"run failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
  return result


def _replay(workdir):
  return subprocess.run(
    [sys.executable, "-m", "rare_jax.replay", f"--workdir={workdir}"],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )


def _final_state(workdir, strategy):
  context = workdirs.load(str(workdir))
  like = runner.abstract_state(
    context.features, context.task.seed_positives, int(context.config.seed)
  )
  with CheckpointStore(os.path.join(workdir, strategy, "checkpoints")) as store:
    return store.restore(store.latest_step(), like)[0]


def _lines(path, drop=("seconds",)):
  with open(path) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in f]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("runs") / "uninterrupted"
  result = _run(workdir)
  assert "round   6/6" in result.stdout
  return workdir


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_ends_identical(uninterrupted, tmp_path):
  workdir = tmp_path / "killed"
  process = subprocess.Popen(
    [sys.executable, "-m", "rare_jax.run", f"--config={CONFIG}", f"--workdir={workdir}"],
    cwd=REPO,
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  seen = []
  for line in process.stdout:
    seen.append(line)
    if "[ours_linear] round   2/6" in line:
      process.send_signal(signal.SIGKILL)  # mid-run: round 3 is under way
      break
  process.wait(timeout=60)
  assert process.returncode == -signal.SIGKILL, "".join(seen)
  result = _run(workdir)
  assert "[ours_linear] resuming from round" in result.stdout
  for strategy in ("ours_linear", "tropel"):
    a = _final_state(uninterrupted, strategy)
    b = _final_state(workdir, strategy)
    assert int(b.round) == 6
    assert runner.differing_leaves(a, b) == []
    assert _lines(uninterrupted / strategy / "answers.jsonl") == _lines(
      workdir / strategy / "answers.jsonl"
    )
    assert _lines(uninterrupted / strategy / "metrics.jsonl") == _lines(
      workdir / strategy / "metrics.jsonl"
    )


@pytest.mark.slow
def test_replay_reports_identical_and_detects_tampering(uninterrupted, tmp_path):
  result = _replay(uninterrupted)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "ours_linear: identical" in result.stdout and "tropel: identical" in result.stdout
  tampered = tmp_path / "tampered"
  shutil.copytree(uninterrupted, tampered)
  path = tampered / "ours_linear" / "answers.jsonl"
  records = [json.loads(line) for line in path.read_text().splitlines()]
  records[3]["answers"][0][0] = not records[3]["answers"][0][0]  # flip one answer of round 4
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  result = _replay(tampered)
  assert result.returncode == 1
  assert "[ours_linear] round 4: state differs" in result.stdout
  assert "ours_linear: MISMATCH" in result.stdout and "tropel: identical" in result.stdout


@pytest.mark.slow
def test_rerun_with_another_config_is_refused(uninterrupted):
  before = sorted(os.listdir(uninterrupted / "ours_linear" / "checkpoints"))
  result = _run(uninterrupted, "--config.batch_size=7", check=False)
  assert result.returncode != 0
  assert "holds a run of another config" in result.stderr
  assert sorted(os.listdir(uninterrupted / "ours_linear" / "checkpoints")) == before


def test_weighted_validation_end_to_end(uninterrupted):
  """tiny.py inherits the demo's config.validation = "weighted": every test image evaluated."""
  with open(uninterrupted / "task.json") as f:
    weights = json.load(f)["val_weights"]
  assert len(weights) == 10_000
  for strategy in ("ours_linear", "tropel"):
    for record in _lines(uninterrupted / strategy / "metrics.jsonl"):
      # All 1,000 test images of each rare category, weighing the subsample's 14.
      assert record["num_positive_images"] == [1000, 1000, 1000]
      assert record["num_positives"] == pytest.approx([14.0] * 3)
      # Weights are at most 1: the weighted predicted count is at most the image count.
      for weighted, images in zip(
        record["num_predicted"], record["num_predicted_images"], strict=True
      ):
        assert weighted <= images


@pytest.mark.slow
def test_rerun_with_the_other_validation_is_refused(uninterrupted):
  result = _run(uninterrupted, "--config.validation=subsample", check=False)
  assert result.returncode != 0
  assert "holds a run of another config" in result.stderr and "validation" in result.stderr


def test_task_of_the_other_validation_is_refused(tmp_path):
  from experiments.configs import tiny
  from rare_jax.data import tasks

  config = tiny.get_config()
  labels = [0] * 1000 + [1] * 50
  task = tasks.make_task(labels, labels, dataset="s", categories=(1,), seed=0, pool_fraction=0.02)
  task.save(tmp_path)  # a subsampled task.json, config.validation = "weighted"
  with pytest.raises(ValueError, match="'subsample' validation set but config.validation='weig"):
    workdirs._task(str(tmp_path), config, None, print)
  config.validation = "everything"
  with pytest.raises(ValueError, match="config.validation='everything'; expected one of"):
    workdirs.validation_mode(config)


@pytest.mark.parametrize(
  "field, value, match",
  [
    ("validation", "weigthed", "config.validation='weigthed'; expected one of"),
    ("deep.warm_start", "no", "deep.warm_start must be True or False, got 'no'"),
    ("feature_normalization", "zscore", "feature_normalization must be one of .*'zscore'"),
  ],
)
def test_bad_settings_are_refused_before_config_json(tmp_path, field, value, match):
  """A typo must not be recorded in config.json, or the corrected config would be refused."""
  from experiments.configs import tiny

  config = tiny.get_config()
  with config.unlocked():
    section, _, name = field.rpartition(".")
    target = config[section] if section else config
    with target.ignore_type():
      target[name] = value
  with pytest.raises(ValueError, match=match):
    workdirs.prepare(str(tmp_path), config, log=lambda _: None)
  assert not os.path.exists(tmp_path / "config.json")


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_write_the_metrics_of_one(uninterrupted, tmp_path):
  """`rare_jax.run` as 2 jax.distributed processes x 4 CPU devices: process 0 alone writes,
  and the run's answers, metrics and final states are those of the 1-process run."""
  workdir, port = tmp_path / "two", _free_port()
  env = dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "rare_jax.run",
        f"--config={CONFIG}",
        f"--workdir={workdir}",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  logs = []
  try:
    for proc in procs:
      logs.append(proc.communicate(timeout=400)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for proc, log in zip(procs, logs, strict=True):
    assert proc.returncode == 0, log[-3000:]
  assert "[ours_linear] round   6/6" in logs[0]
  assert "] round" not in logs[1] and "wrote" not in logs[1]  # process 1 logs no progress
  assert (workdir / "f1_vs_labels.png").exists()
  for strategy in ("ours_linear", "tropel"):
    for name in ("answers.jsonl", "metrics.jsonl"):  # one writer: 6 lines, not 12
      assert _lines(workdir / strategy / name) == _lines(uninterrupted / strategy / name)
    a = _final_state(uninterrupted, strategy)
    b = _final_state(workdir, strategy)  # saved by 2 processes, restored by 1
    assert int(b.round) == 6
    assert runner.differing_leaves(a, b) == []
