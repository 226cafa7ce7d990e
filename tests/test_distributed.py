"""Two `jax.distributed` processes on localhost (gloo CPU collectives, 2 devices each) run
sharded train steps from process-local data and agree with one process on the same batches."""

import functools
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from distributed_worker import (
  IMAGE_SHAPE,
  NUM_STEPS,
  init_key,
  make_batch,
  tiny_model,
  tiny_optimizer,
)

from rare_jax.deep import train

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def single_process_reference():
  model, tx = tiny_model(), tiny_optimizer()
  state = jax.jit(
    functools.partial(train.create_train_state, model=model, tx=tx, input_shape=(1, *IMAGE_SHAPE))
  )(init_key())
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, aux_weight=0.1))
  losses = []
  for i in range(NUM_STEPS):
    state, metrics = step(state, make_batch(seed=100 + i, num_padding=1))
    losses.append(float(metrics["loss"]))
  params = jax.device_get(state.params)
  return losses, {
    jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(params)
  }


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
  port, num_processes = free_port(), 2
  out = tmp_path / "result.npz"
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env.update(
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
  )
  worker = os.path.join(HERE, "distributed_worker.py")
  procs = [
    subprocess.Popen(
      [sys.executable, worker, str(port), str(i), str(num_processes), str(out)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(num_processes)
  ]
  logs = []
  try:
    for proc in procs:
      logs.append(proc.communicate(timeout=150)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for proc, log in zip(procs, logs, strict=True):
    assert proc.returncode == 0, log[-3000:]

  result = np.load(out)
  assert int(result["num_devices"]) == 4  # 2 processes x 2 devices in one mesh
  losses, params = single_process_reference()
  np.testing.assert_allclose(result["losses"], losses, rtol=1e-5, atol=1e-6)
  assert set(params) <= set(result.files)
  for name, value in params.items():
    np.testing.assert_allclose(result[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
  assert losses[-1] != losses[0]  # the steps did train


def _deep_run(workdir, num_processes: int, devices_per_process: int) -> None:
  port = free_port()
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env.update(
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
  )
  worker = os.path.join(HERE, "distributed_deep_worker.py")
  procs = [
    subprocess.Popen(
      [sys.executable, worker, str(port), str(i), str(num_processes), str(workdir)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(num_processes)
  ]
  logs = []
  try:
    for proc in procs:
      logs.append(proc.communicate(timeout=900)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for proc, log in zip(procs, logs, strict=True):
    assert proc.returncode == 0, log[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(
  os.environ.get("RARE_JAX_DEEP_MULTIHOST") != "1",
  reason="minutes of CPU (5.5 min on the shared 2-core machine): set RARE_JAX_DEEP_MULTIHOST=1",
)
def test_deep_path_on_two_processes_matches_one(tmp_path):
  """M_pre pretraining, embedding and one deep update as 2 processes x 2 devices (each loads
  its rows of every batch) against 1 process x 4 devices: the same mesh size, so only the
  cross-process (gloo) reductions differ: features agree to float rounding."""
  from rare_jax.deep import embed

  _deep_run(tmp_path / "one", 1, 4)
  _deep_run(tmp_path / "two", 2, 2)
  for store in ("features/pool", "features/val", "ours/features/v1/pool", "ours/features/v1/val"):
    a = embed.FeatureStore.open(tmp_path / "one" / store)
    b = embed.FeatureStore.open(tmp_path / "two" / store)
    assert a.fields.keys() == b.fields.keys()
    for field in a.fields:
      np.testing.assert_allclose(b[field], a[field], atol=1e-5, err_msg=f"{store} {field}")
    np.testing.assert_array_equal(b["index"], a["index"])
  for name in ("answers.jsonl", "metrics.jsonl"):
    lines = [(tmp_path / run / "ours" / name).read_text().splitlines() for run in ("one", "two")]
    assert len(lines[0]) == len(lines[1]) == 1  # one writer
