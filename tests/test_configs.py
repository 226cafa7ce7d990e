"""Every shipped experiment config builds valid settings (no run needed to find a bad one)."""

import importlib
import pkgutil

import pytest

from experiments import configs
from rare_jax import compare, workdirs
from rare_jax.active import runner
from rare_jax.deep import selfsup, updates

NAMES = sorted(m.name for m in pkgutil.iter_modules(configs.__path__))


def test_every_config_module_is_checked():
  assert {"demo", "self_supervised", "compare_imagenet", "compare_self_supervised"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_config_builds_its_settings(name):
  config = importlib.import_module(f"experiments.configs.{name}").get_config()
  updates.DeepSettings.from_config(config.deep)  # raises ValueError on an invalid combination
  workdirs.validation_mode(config)  # a known validation setting
  if "self_supervised" in config:
    selfsup.SelfSupSettings.from_config(config.self_supervised)
  for strategy in config.strategies:
    runner.strategy_spec(strategy)  # a known strategy
  if "groups" in config:
    if not tuple(config.groups):  # drawn at run time from the dataset (paper configs)
      return
    compare.check_config(config)


def test_validation_settings():
  """The demo and what builds on it evaluate on the weighted validation set, except the
  first release's comparison (docs/results/), kept on the subsampled one."""
  modes = {
    name: workdirs.validation_mode(
      importlib.import_module(f"experiments.configs.{name}").get_config()
    )
    for name in NAMES
  }
  for name in ("demo", "compare_imagenet", "self_supervised", "compare_self_supervised", "tiny"):
    assert modes[name] == "weighted", name
  for name in ("compare_fmnist", "inat2017", "places365"):
    assert modes[name] == "subsample", name


def test_warm_start_settings():
  """The demo restarts every deep update from M_pre (a deviation, README); the configs of
  published results measured with warm-started updates, and the paper's, keep the paper's."""
  warm = {
    name: importlib.import_module(f"experiments.configs.{name}").get_config().deep.warm_start
    for name in NAMES
  }
  for name in ("demo", "compare_imagenet", "tiny_deep"):
    assert warm[name] is False, name
  for name in ("compare_fmnist", "inat2017", "places365", "self_supervised"):
    assert warm[name] is True, name


def test_feature_normalization_settings():
  """The demo uses the paper's raw features; the configs of published results keep the
  z-scoring they were measured with, and the test configs theirs."""
  mode = {
    name: importlib.import_module(f"experiments.configs.{name}").get_config().feature_normalization
    for name in NAMES
  }
  for name in ("demo", "compare_imagenet"):
    assert mode[name] == "none", name
  for name in ("compare_fmnist", "self_supervised", "compare_self_supervised", "tiny", "tiny_deep"):
    assert mode[name] == "standardize", name


def test_all_strategies_config_picks_strategies_and_keeps_the_baseline():
  from experiments.configs import compare_imagenet, compare_imagenet_all

  full = compare_imagenet_all.get_config()
  assert tuple(full.strategies) == tuple(runner.STRATEGIES)
  assert [tuple(g) for g in full.groups] == [tuple(compare_imagenet.get_config().groups[0])]
  assert tuple(compare_imagenet_all.get_config("kd_semi, deep_prop").strategies) == (
    "kd_semi",
    "deep_prop",
    "tropel",
  )
  assert tuple(compare_imagenet_all.get_config("tropel,ours").strategies) == ("tropel", "ours")
  with pytest.raises(ValueError, match=r"unknown strategies \['kd'\]"):
    compare_imagenet_all.get_config("kd")
  with pytest.raises(ValueError, match="no strategy named"):
    compare_imagenet_all.get_config(",")
