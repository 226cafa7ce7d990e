"""`rare_jax.run --help` lists the config's fields with meanings and exits 0; other command-line
helpers of the install work (help exit codes, the dataset without apt-get, provenance)."""

import importlib
import json
import pkgutil
import subprocess
import sys

import ml_collections
import pytest

from experiments import configs
from rare_jax.configs import demo, fields
from rare_jax.data import fashion_mnist
from rare_jax.infra import cli_help, provenance

CONFIG_NAMES = sorted(m.name for m in pkgutil.iter_modules(configs.__path__))


def _all_configs():
  yield "rare_jax.configs.demo", demo.get_config()
  for name in CONFIG_NAMES:
    yield name, importlib.import_module(f"experiments.configs.{name}").get_config()


def test_every_config_field_has_a_meaning():
  missing = [
    f"{name}: {field}"
    for name, config in _all_configs()
    for field in fields.flatten(config)
    if field not in fields.MEANINGS
  ]
  assert not missing, "add these to rare_jax/configs/fields.py MEANINGS:\n" + "\n".join(missing)


def test_a_new_field_shows_as_undescribed():
  """The check above can fail: a field added to a config has no meaning until one is written."""
  config = demo.get_config()
  config.deep.new_knob = 3
  assert "deep.new_knob" in fields.flatten(config) and "deep.new_knob" not in fields.MEANINGS
  lines = fields.describe(config)
  assert any("deep.new_knob = 3" in line and "no description" in line for line in lines)
  assert any("deep.epochs = 4" in line and "E: epochs per deep update" in line for line in lines)


def test_the_experiments_demo_is_the_packaged_one():
  from experiments.configs import demo as experiments_demo

  assert experiments_demo.get_config().to_dict() == demo.get_config().to_dict()
  assert isinstance(demo.get_config(), ml_collections.ConfigDict)


def _command(*args, timeout=120):
  return subprocess.run(
    [sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, check=False
  )


def test_run_help_lists_the_config_fields_and_exits_0():
  result = _command("rare_jax.run", "--config.seed=3", "--help")
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert "--workdir" in out and "--config" in out  # the command's own flags
  assert "Config fields of" in out and "rare_jax/configs/demo.py" in out  # the default config
  assert "seed = 3" in out  # overrides apply
  for name, value in fields.flatten(demo.get_config()).items():
    if name != "seed":
      assert f"{name} = {value!r}" in out, name
  assert fields.MEANINGS["deep.frozen_blocks"] in out


def test_help_requests_exit_0_and_bad_flags_still_fail():
  helpshort = _command("rare_jax.data.prepare", "--helpshort")
  assert helpshort.returncode == 0, helpshort.stderr
  assert "--raw_dir" in helpshort.stdout and "--data_dir" in helpshort.stdout
  bad = _command("rare_jax.data.prepare", "--no_such_flag")
  assert bad.returncode == 1 and "no_such_flag" in bad.stderr


@pytest.mark.parametrize(
  "command, flag",
  [
    ("rare_jax.label", "--budget"),
    ("rare_jax.predict", "--pool"),
    ("rare_jax.export", "--results"),
  ],
)
def test_every_command_answers_help_with_its_flags_and_status_0(command, flag):
  # Before, absl's --help / --helpshort exited 1 for every command but run and prepare.
  result = _command(command, "--helpshort")
  assert result.returncode == 0, result.stderr
  assert flag in result.stdout, result.stdout[-1500:]


def test_help_request_parsing():
  assert cli_help.help_request(["x", "--helpfull"]) == "full"
  assert cli_help.help_request(["x", "--a=1", "-?"]) == "short"
  assert cli_help.help_request(["x", "--", "--help"]) is None  # after the separator: an argument
  assert cli_help.without_help(["x", "--help", "--a=1"]) == ["x", "--a=1"]


def test_without_apt_the_message_says_where_to_put_the_files(tmp_path, monkeypatch):
  monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "missing")
  monkeypatch.setattr(fashion_mnist, "_has_apt", lambda: False)
  monkeypatch.setattr(fashion_mnist, "_run", lambda command: pytest.fail(f"ran {command}"))
  with pytest.raises(RuntimeError) as error:
    fashion_mnist.ensure_raw_files(cache_dir=tmp_path / "cache")
  message = str(error.value)
  assert "no apt-get" in message and "--raw_dir=" in message
  assert str(tmp_path / "cache" / fashion_mnist.PACKAGE_SUBDIR) in message
  assert "github.com/zalandoresearch/fashion-mnist" in message
  for name in fashion_mnist.RAW_SHA256:
    assert name in message


def test_import_raw_files_checks_then_copies(tmp_path, monkeypatch):
  system = fashion_mnist.ensure_raw_files()  # the Debian package's files (make prepares them)
  given = tmp_path / "given"
  given.mkdir()
  for name in fashion_mnist.RAW_SHA256:
    (given / name).symlink_to(system / name)
  cache = tmp_path / "cache"
  target = fashion_mnist.import_raw_files(given, cache_dir=cache)
  assert target == cache / fashion_mnist.PACKAGE_SUBDIR
  monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "missing")
  assert fashion_mnist.ensure_raw_files(cache_dir=cache) == target
  for name in fashion_mnist.RAW_SHA256:
    assert (target / name).read_bytes() == (system / name).read_bytes()
  # Another file under a right name is refused, and the cache keeps its good copy.
  import gzip

  (given / "t10k-labels-idx1-ubyte.gz").unlink()
  with gzip.open(given / "t10k-labels-idx1-ubyte.gz", "wb") as f:
    f.write(b"\0\0\x08\x01" + (10_000).to_bytes(4, "big") + bytes(10_000))
  with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz: not Fashion-MNIST's"):
    fashion_mnist.import_raw_files(given, cache_dir=cache)
  (given / "train-images-idx3-ubyte.gz").unlink()
  with pytest.raises(ValueError, match="expected the regular file train-images"):
    fashion_mnist.import_raw_files(given, cache_dir=cache)
  assert (target / "t10k-labels-idx1-ubyte.gz").read_bytes() == (
    system / "t10k-labels-idx1-ubyte.gz"
  ).read_bytes()


def test_provenance_names_the_cpu_and_versions(tmp_path):
  import jax
  import numpy as np

  record = provenance.provenance()
  with open("/proc/cpuinfo") as f:
    model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  assert record["cpu"] == model
  assert record["packages"]["jax"] == jax.__version__
  assert record["packages"]["numpy"] == np.__version__
  assert len(record["environment_sha256"]) == 64
  line = provenance.one_line(record)
  assert model in line and f"jax {jax.__version__}" in line
  provenance.append_jsonl(tmp_path / "p.jsonl", record)
  provenance.append_jsonl(tmp_path / "p.jsonl", record)
  lines = (tmp_path / "p.jsonl").read_text().splitlines()
  assert len(lines) == 2 and json.loads(lines[1]) == record
