"""The pip route: a wheel of the package, installed with `[pretrained]` into a fresh virtual
environment outside the repository (not editable), runs its console scripts.

One slow test (about 1-3 minutes, most of it pip): it builds the wheel from a copy of the
sources, installs it with setup.py's version ranges from the configured package index, then
from a folder outside the repository runs `rare-jax-run --help`, `rare-jax-prepare` (finds the
embedded dataset in the TFDS data folder that make prepared), a short demo (`rare-jax-run` with
its packaged default config, cut to the frozen pixel-PCA features and `ours_linear`, 2 rounds
of 5 labels per category) and `rare-jax-classify` (the packaged ImageNet weights load). It is
skipped only when pip cannot reach the package index, and says so.

It installs a fresh copy of JAX and every dependency (hundreds of MB from the index or pip's
cache), so `make test` leaves it out (skipped, saying why) and CI runs it as its own step after
`make test` (`.ci/run`: `RARE_JAX_WHEEL_TEST=1 pytest tests/test_install.py`).
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
# pip's words when it cannot reach the index (then the test is skipped, not failed).
UNREACHABLE = (
  "NewConnectionError",
  "Failed to establish a new connection",
  "Temporary failure in name resolution",
  "Network is unreachable",
  "No route to host",
  "ConnectTimeoutError",
  "ReadTimeoutError",
)
DEMO_OVERRIDES = (
  "--config.features=pixel_pca",
  "--config.feature_dim=16",
  "--config.feature_normalization=standardize",
  "--config.strategies=('ours_linear',)",
  "--config.num_feature_updates=1",
  "--config.rounds_per_update=2",
  "--config.batch_size=5",
)


def _run(command, *, cwd, env, timeout=900):
  return subprocess.run(
    command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
  )


def _output(result) -> str:
  return f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.skipif(
  os.environ.get("RARE_JAX_WHEEL_TEST") != "1",
  reason="installs JAX and every dependency into a fresh venv: run by .ci/run after make test, "
  "or set RARE_JAX_WHEEL_TEST=1",
)
def test_wheel_installs_outside_the_repo_and_runs_the_demo(tmp_path):
  started = time.perf_counter()
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  source = tmp_path / "source"  # a copy: building in the checkout would leave build/ there
  shutil.copytree(
    ROOT / "rare_jax", source / "rare_jax", ignore=shutil.ignore_patterns("__pycache__")
  )
  for name in ("setup.py", "pyproject.toml"):
    shutil.copy(ROOT / name, source / name)
  built = _run(
    [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(source)],
    cwd=tmp_path,
    env=env,
  )
  if built.returncode != 0 and any(marker in built.stderr for marker in UNREACHABLE):
    pytest.skip(f"the package index is unreachable (building the wheel):\n{built.stderr[-500:]}")
  assert built.returncode == 0, _output(built)
  (wheel,) = (tmp_path / "dist").glob("rare_jax-*.whl")

  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
  bin_dir = venv / "bin"
  installed = _run(
    [str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-compile", f"{wheel}[pretrained]"],
    cwd=tmp_path,
    env=env,
  )
  if installed.returncode != 0 and any(marker in installed.stderr for marker in UNREACHABLE):
    pytest.skip(f"the package index is unreachable:\n{installed.stderr[-500:]}")
  assert installed.returncode == 0, _output(installed)
  install_s = time.perf_counter() - started

  work = tmp_path / "elsewhere"  # nothing of the repository is importable from here
  work.mkdir()
  where = _run(
    [str(bin_dir / "python"), "-c", "import rare_jax.configs.demo as d; print(d.__file__)"],
    cwd=work,
    env=env,
  )
  assert where.returncode == 0, _output(where)
  assert where.stdout.strip().startswith(str(venv)), where.stdout  # the wheel's, not the repo's

  helped = _run([str(bin_dir / "rare-jax-run"), "--help"], cwd=work, env=env)
  assert helped.returncode == 0, _output(helped)
  assert "deep.frozen_blocks = 11" in helped.stdout and str(venv) in helped.stdout

  prepared = _run([str(bin_dir / "rare-jax-prepare")], cwd=work, env=env)
  assert prepared.returncode == 0, _output(prepared)
  assert "rare_fashion_mnist already prepared" in prepared.stdout, prepared.stdout

  demo = _run(
    [str(bin_dir / "rare-jax-run"), f"--workdir={work / 'demo'}", *DEMO_OVERRIDES],
    cwd=work,
    env=env,
  )
  assert demo.returncode == 0, _output(demo)
  assert "ours_linear: mean F1 by labels/category: 5:" in demo.stdout, demo.stdout
  assert "round   2/2 | labels/category   10" in demo.stdout, demo.stdout
  assert (work / "demo" / "f1_vs_labels.png").stat().st_size > 1000
  record = json.loads((work / "demo" / "provenance.jsonl").read_text().splitlines()[-1])
  assert record["packages"]["rare_jax"] == "0.1.0" and record["packages"]["jax"]
  assert record["cpu"]

  Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(work / "grey.png")
  classified = _run(
    [str(bin_dir / "rare-jax-classify"), "--model=efficientnet_lite0", str(work / "grey.png")],
    cwd=work,
    env=env,
  )
  assert classified.returncode == 0, _output(classified)
  print(
    f"wheel + install {install_s:.0f} s, all {time.perf_counter() - started:.0f} s; "
    f"demo tail: {demo.stdout.strip().splitlines()[-1]}"
  )
