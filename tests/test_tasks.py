"""RareTask: invariants, determinism, JSON, bad input, and the task summary CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest

from rare_jax.data import sources, tasks

NAME = "rare_fashion_mnist"


def _balanced_labels(per_class, num_classes=10, seed=0):
  labels = np.repeat(np.arange(num_classes), per_class)
  return np.random.default_rng(seed).permutation(labels)


@pytest.fixture(scope="module")
def fm_labels():
  try:
    train = sources.open_source(NAME, "train")
    test = sources.open_source(NAME, "test")
  except ValueError as error:
    pytest.fail(f"{error}\nThe tests need `python -m rare_jax.data.prepare` run first.")
  return train.labels(), test.labels(), train.class_names


@pytest.fixture(scope="module")
def fm_task(fm_labels):
  train, test, names = fm_labels
  return tasks.make_task(train, test, dataset=NAME, categories=(0, 3, 7), seed=0, class_names=names)


@pytest.mark.parametrize("pool_fraction", [0.002, 0.001, 0.0027])
def test_fashion_mnist_task_invariants(fm_labels, pool_fraction):
  train, test, names = fm_labels
  task = tasks.make_task(
    train,
    test,
    dataset=NAME,
    categories=(0, 3, 7),
    seed=3,
    class_names=names,
    pool_fraction=pool_fraction,
  )
  # Pretraining split: disjoint from the pool, only non-rare classes, labels right.
  assert not np.intersect1d(task.pretrain_ids, task.pool_ids).size
  assert not np.isin(train[task.pretrain_ids], task.categories).any()
  np.testing.assert_array_equal(task.pretrain_labels, train[task.pretrain_ids])
  assert set(np.unique(task.pretrain_labels)) == set(task.related_classes)
  assert len(task.pretrain_ids) > 20_000  # About half of the 42,000 non-rare train images.
  # Validation comes from the other split: disjoint by construction; labels right.
  np.testing.assert_array_equal(task.val_labels, test[task.val_ids])
  np.testing.assert_array_equal(task.pool_labels, train[task.pool_ids])
  # Each category is pool_fraction of the pool and of validation, within one image.
  truth, val_truth = task.ground_truth(), task.val_ground_truth()
  assert truth.shape == (3, task.pool_size) and val_truth.shape == (3, len(task.val_ids))
  for c in range(3):
    assert abs(truth[c].sum() - pool_fraction * task.pool_size) <= 1
    assert abs(val_truth[c].sum() - pool_fraction * len(task.val_ids)) <= 1
    assert truth[c].sum() >= tasks.MIN_POOL_POSITIVES and val_truth[c].sum() >= 1
  # All non-rare pool-part images are in the pool.
  assert (~truth.any(axis=0)).sum() + len(task.pretrain_ids) == 42_000
  # Seed positives are true positives of the pool, distinct.
  assert task.seed_positives.shape == (3, 5)
  for c, category in enumerate(task.categories):
    assert (task.pool_labels[task.seed_positives[c]] == category).all()
    assert truth[c, task.seed_positives[c]].all()
    assert len(set(task.seed_positives[c].tolist())) == 5
  np.testing.assert_array_equal(task.seed_ids(), task.pool_ids[task.seed_positives])
  assert task.category_names == ("T-shirt/top", "Dress", "Sneaker")


def test_same_seed_same_task_other_seed_other_task(fm_labels, fm_task):
  train, test, names = fm_labels
  again = tasks.make_task(
    train, test, dataset=NAME, categories=(0, 3, 7), seed=0, class_names=names
  )
  assert again == fm_task and again.to_json() == fm_task.to_json()
  other = tasks.make_task(
    train, test, dataset=NAME, categories=(0, 3, 7), seed=1, class_names=names
  )
  assert other != fm_task
  assert not np.array_equal(other.seed_ids(), fm_task.seed_ids())
  assert set(other.pool_ids.tolist()) != set(fm_task.pool_ids.tolist())


def test_pool_order_hides_class_order():
  # A dataset sorted by class must not give positives a telltale position in the pool.
  labels = np.repeat(np.arange(10), 1000)
  task = tasks.make_task(labels, labels[::10], dataset="sorted", categories=(9,), seed=0)
  positions = np.flatnonzero(task.ground_truth()[0])
  assert positions.max() < task.pool_size - 10 or positions.min() > 10
  assert positions.mean() < 0.9 * task.pool_size


def test_json_round_trip_and_save_load(fm_task, tmp_path):
  again = tasks.RareTask.from_json(fm_task.to_json())
  assert again == fm_task
  for name in tasks._ARRAY_FIELDS:
    assert getattr(again, name).dtype == np.int64
  path = fm_task.save(tmp_path / "run")
  assert path == tmp_path / "run" / "task.json"
  assert not [p for p in path.parent.iterdir() if p.name != "task.json"]  # No temporary left.
  loaded = tasks.RareTask.load(tmp_path / "run", data_dir="/data")
  assert loaded == tasks.RareTask.from_json(fm_task.to_json(), data_dir="/data")
  assert loaded.data_dir == "/data" and "data_dir" not in json.loads(path.read_text())
  with pytest.raises(FileNotFoundError, match="task.json"):
    tasks.RareTask.load(tmp_path / "elsewhere")


def test_task_is_frozen(fm_task):
  with pytest.raises(AttributeError):
    fm_task.seed = 2
  with pytest.raises(ValueError):
    fm_task.pool_ids[0] = 1


def test_summary_counts(fm_task):
  text = fm_task.summary()
  assert f"pool: {fm_task.pool_size} images" in text
  assert "category 3 (Dress): 42 positives in pool" in text
  assert str(fm_task.seed_ids()[1].tolist()) in text
  assert f"related-domain (pretraining) split: {len(fm_task.pretrain_ids)} images" in text
  assert f"validation: {len(fm_task.val_ids)} images" in text


# Bad input.

_TRAIN = _balanced_labels(1000)
_EVAL = _balanced_labels(200, seed=1)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(categories=(10,)), "category id 10 is not in the dataset"),
    (dict(categories=(-1,)), "category id -1 is not in the dataset"),
    (dict(categories=(2, 2)), "duplicate categories"),
    (dict(categories=()), "at least one rare category"),
    (dict(pool_fraction=0.0005), "leaves 2 positives per category in the pool.*at least 6"),
    (dict(pool_fraction=0.0), "pool_fraction=0.0; expected 0 <"),
    (dict(pool_fraction=0.5, categories=(1, 2)), "pool_fraction=0.5"),
    (dict(pool_fraction=0.15), r"needs \d+ images of category 1 in the pool but only \d+"),
    (dict(num_seed_positives=9), "num_seed_positives=9 but category 1 has only 9 positives"),
    (dict(num_seed_positives=0), "num_seed_positives=0"),
    (dict(pretrain_fraction=1.0), "pretrain_fraction=1.0"),
  ],
)
def test_make_task_bad_input(kwargs, match):
  arguments = dict(dataset="synthetic", categories=(1,), seed=0, pool_fraction=0.002)
  arguments.update(kwargs)
  with pytest.raises(ValueError, match=match):
    tasks.make_task(_TRAIN, _EVAL, **arguments)


def test_validation_needs_one_positive():
  # The pool (3,600 non-rare images) gets 7 positives, validation (90 non-rare) none.
  with pytest.raises(ValueError, match="leaves 0 positives per category in the validation set"):
    tasks.make_task(_TRAIN, _EVAL[:100], dataset="s", categories=(1,), seed=0)


def test_unlabeled_split_is_rejected():
  with pytest.raises(ValueError, match=r"labels_eval holds labels in \[-1, 9\]"):
    tasks.make_task(_TRAIN, np.append(_EVAL, -1), dataset="s", categories=(1,), seed=0)


def _corrupt(task_json, change):
  record = json.loads(task_json)
  change(record)
  return json.dumps(record)


@pytest.mark.parametrize(
  "change, match",
  [
    (lambda r: r.pop("pool_ids"), r"misses keys \['pool_ids'\]"),
    (lambda r: r.update(seed="0"), "seed='0'; expected a int"),
    (lambda r: r.update(num_classes=True), "num_classes=True; expected a int"),
    (lambda r: r.update(format="other/9"), "format 'other/9'"),
    (lambda r: r.update(extra=1), r"unknown keys \['extra'\]"),
    (lambda r: r.update(categories=[0, 3, 70]), "category id 70 is not in the dataset"),
    (lambda r: r["pool_ids"].__setitem__(0, 60_000), r"pool_ids contains 60000; expected ids in"),
    (lambda r: r["val_ids"].__setitem__(0, -3), "val_ids contains -3"),
    (lambda r: r["pool_labels"].pop(), "pool_labels has shape"),
    (lambda r: r["pool_ids"].__setitem__(0, 1.5), "pool_ids has float64 values"),
    (lambda r: r["seed_positives"][0].pop(), "seed_positives is not a regular array|shape"),
    (
      lambda r: r.update(pretrain_ids=r["pool_ids"][:3], pretrain_labels=r["pool_labels"][:3]),
      "overlap|rare category",
    ),
    (lambda r: r.update(category_names=["a"]), "1 category_names for 3 categories"),
  ],
)
def test_malformed_task_json(fm_task, change, match):
  with pytest.raises(ValueError, match=match):
    tasks.RareTask.from_json(_corrupt(fm_task.to_json(), change))


def test_seed_positive_that_is_not_a_positive_is_rejected(fm_task):
  negative = int(np.flatnonzero(~fm_task.ground_truth().any(axis=0))[0])

  def change(record):
    record["seed_positives"][1][0] = negative

  with pytest.raises(ValueError, match=r"seed_positives\[1\].*not all of category 3"):
    tasks.RareTask.from_json(_corrupt(fm_task.to_json(), change))


def test_not_json_at_all():
  with pytest.raises(ValueError, match="does not parse"):
    tasks.RareTask.from_json("{pool_ids: [1,")
  with pytest.raises(ValueError, match="is a list; expected an object"):
    tasks.RareTask.from_json("[1, 2]")


# The weighted validation set.


@pytest.fixture(scope="module")
def fm_weighted(fm_labels):
  train, test, names = fm_labels
  return tasks.make_task(
    train,
    test,
    dataset=NAME,
    categories=(0, 3, 7),
    seed=0,
    class_names=names,
    validation="weighted",
  )


def test_weighted_validation_is_the_subsample_in_expectation(fm_labels, fm_task, fm_weighted):
  _, test, _ = fm_labels
  # Every eval image, sorted; the pool, seeds and pretraining split are the subsampled task's.
  np.testing.assert_array_equal(fm_weighted.val_ids, np.arange(len(test)))
  np.testing.assert_array_equal(fm_weighted.val_labels, test)
  for name in ("pool_ids", "pool_labels", "seed_positives", "pretrain_ids"):
    np.testing.assert_array_equal(getattr(fm_weighted, name), getattr(fm_task, name))
  assert fm_task.val_weights is None and fm_task.validation == "subsample"
  assert fm_weighted.validation == "weighted"
  weights = fm_weighted.val_weights
  assert weights.dtype == np.float64 and weights.shape == fm_weighted.val_ids.shape
  subsample_truth, truth = fm_task.val_ground_truth(), fm_weighted.val_ground_truth()
  for c in range(3):
    kept = int(subsample_truth[c].sum())  # 14 of Fashion-MNIST's 1,000 per class
    assert kept == 14 and truth[c].sum() == 1000
    assert weights[truth[c]].sum() == pytest.approx(kept)
    np.testing.assert_allclose(weights[truth[c]], kept / 1000)
  # Every other image weighs 1, as it is always in the subsample.
  np.testing.assert_array_equal(weights[~truth.any(axis=0)], 1.0)
  assert (~truth.any(axis=0)).sum() == (~subsample_truth.any(axis=0)).sum()
  with pytest.raises(ValueError, match="frozen|read-only"):
    weights[0] = 2.0


def test_weighted_task_json_round_trip(fm_weighted, tmp_path):
  record = json.loads(fm_weighted.to_json())
  assert len(record["val_weights"]) == 10_000
  again = tasks.RareTask.load(fm_weighted.save(tmp_path).parent)
  assert again == fm_weighted and again.val_weights.dtype == np.float64
  np.testing.assert_array_equal(again.val_weights, fm_weighted.val_weights)  # exact floats
  # Tasks of the two settings differ, also when only the weights do.
  assert again != tasks.RareTask.from_json(_corrupt(fm_weighted.to_json(), _drop_weights))


def _drop_weights(record):
  record.pop("val_weights")


def test_task_json_without_weights_loads_as_before(fm_task):
  # A subsampled task writes no val_weights (the task.json of before the field) ...
  record = json.loads(fm_task.to_json())
  assert "val_weights" not in record
  # ... and such a file, or one with null, loads with None.
  assert tasks.RareTask.from_json(json.dumps(record)).val_weights is None
  record["val_weights"] = None
  assert tasks.RareTask.from_json(json.dumps(record)) == fm_task


@pytest.mark.parametrize(
  "change, match",
  [
    (lambda r: r["val_weights"].pop(), r"val_weights has shape \(9999,\); expected \(10000,\)"),
    (
      lambda r: r["val_weights"].__setitem__(3, -1.0),
      "val_weights holds -1.0; expected weights >= 0",
    ),
    (lambda r: r["val_weights"].__setitem__(3, float("nan")), "1 non-finite values"),
    (lambda r: r["val_weights"].__setitem__(3, "a"), "val_weights has <U"),
    (lambda r: r["val_weights"].__setitem__(3, [1.0]), "val_weights is not a regular array"),
  ],
)
def test_malformed_val_weights(fm_weighted, change, match):
  with pytest.raises(ValueError, match=match):
    tasks.RareTask.from_json(_corrupt(fm_weighted.to_json(), change))


def test_weighted_validation_checks_like_the_subsample():
  with pytest.raises(ValueError, match="validation='uniform'; expected one of"):
    tasks.make_task(_TRAIN, _EVAL, dataset="s", categories=(1,), seed=0, validation="uniform")
  # The same refusal as the subsample when the eval split is too small for one positive.
  with pytest.raises(ValueError, match="leaves 0 positives per category in the validation set"):
    tasks.make_task(
      _TRAIN, _EVAL[:100], dataset="s", categories=(1,), seed=0, validation="weighted"
    )


def test_weighted_summary(fm_weighted):
  text = fm_weighted.summary()
  assert "1000 in validation (weight sum 14.00)" in text
  assert "validation: 10000 images" in text and "weighted to the pool's imbalance" in text


# The dataset-level builder and the CLI.


def test_task_from_dataset_equals_make_task(fm_labels, fm_task):
  task = tasks.task_from_dataset(NAME, (0, 3, 7), 0)
  assert task == fm_task
  with pytest.raises(ValueError, match="Unknown dataset name"):
    tasks.task_from_dataset("no_such_dataset", (0,), 0)


def test_task_summary_cli(tmp_path, fm_task):
  command = [
    sys.executable,
    "-m",
    "rare_jax.task_summary",
    "--dataset",
    NAME,
    "--categories=0,3,7",
    "--seed=0",
    "--pool_fraction=0.002",
    f"--workdir={tmp_path}",
  ]
  result = subprocess.run(command, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "category 7 (Sneaker): 42 positives in pool" in result.stdout
  assert tasks.RareTask.load(tmp_path) == fm_task
  bad = subprocess.run(
    command[:5] + ["--categories=0,11"], capture_output=True, text=True, timeout=120
  )
  assert bad.returncode != 0 and "category id 11 is not in the dataset" in bad.stderr


def test_task_summary_cli_weighted(tmp_path, fm_weighted):
  command = [
    sys.executable,
    "-m",
    "rare_jax.task_summary",
    f"--dataset={NAME}",
    "--categories=0,3,7",
    "--seed=0",
    "--validation=weighted",
    f"--workdir={tmp_path}",
  ]
  result = subprocess.run(command, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "1000 in validation (weight sum 14.00)" in result.stdout
  assert tasks.RareTask.load(tmp_path) == fm_weighted
