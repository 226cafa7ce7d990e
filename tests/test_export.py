"""`python -m rare_jax.export`: the labels of a labeling workdir, as CSV or JSON.

The workdir is written by hand (a manifest, the run's answers log and the web labeler's
journal), as `python -m rare_jax.label` leaves them: no loop or features are needed.
"""

import csv
import json
import os
import subprocess
import sys

import pytest

from rare_jax.active import metrics
from rare_jax.webapp import exports, folder_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNDECODABLE = os.fsdecode(b"b/\xff.png")  # a file name that is not UTF-8
PATHS = ["a/1.png", "=cmd|' /C calc'!A0.png", UNDECODABLE, "c/3.png", "-4.png", "/seeds/s.png"]


@pytest.fixture
def workdir(tmp_path):
  """Seeds 5 (outside the folder) and 0; round 1 logged; round 2 submitted, not yet logged."""
  workdir = tmp_path / "run"
  run_dir = workdir / folder_run.RUN_DIR
  run_dir.mkdir(parents=True)
  manifest = {
    "format": folder_run.MANIFEST_FORMAT,
    "root": "/data/images",
    "paths": PATHS,
    "num_folder_images": 5,
    "seed_ids": [[5, 0]],
    "category_names": ["Sandal"],
  }
  (workdir / folder_run.MANIFEST).write_text(json.dumps(manifest))
  round_1 = {"round": 1, "query_ids": [[1, 2]], "answers": [[True, False]]}
  round_2 = {"query_ids": [[3, 4]], "answers": [[False, True]]}
  with metrics.MetricsWriter(run_dir / "answers.jsonl") as log:
    log.write(round_1)
  with open(run_dir / folder_run.JOURNAL, "w") as f:
    for record in ({k: round_1[k] for k in ("query_ids", "answers")}, round_2):
      f.write(json.dumps(record) + "\n")
  return str(workdir)


EXPECTED = [
  ("/seeds/s.png", "Sandal", "yes", 0),
  ("a/1.png", "Sandal", "yes", 0),
  ("=cmd|' /C calc'!A0.png", "Sandal", "yes", 1),
  ("b/\\xff.png", "Sandal", "no", 1),
  ("c/3.png", "Sandal", "no", 2),
  ("-4.png", "Sandal", "yes", 2),
]


def test_labels_of_a_workdir(workdir):
  manifest, labels = exports.collect_labels(workdir)
  assert manifest["root"] == "/data/images"
  got = [(x["path"], x["category"], x["answer"], x["round"]) for x in labels]
  raw = [(UNDECODABLE if p.startswith("b/") else p, c, a, r) for p, c, a, r in EXPECTED]
  assert got == raw


def test_a_run_started_by_an_earlier_release_keeps_its_directory(workdir):
  """Workdirs started before the runner's directory was named `labeling` hold it in
  `ours_linear/`: the labels are read from there, and a new workdir uses `labeling/`."""
  os.rename(os.path.join(workdir, "labeling"), os.path.join(workdir, "ours_linear"))
  assert folder_run.run_dir(workdir) == os.path.join(workdir, "ours_linear")
  _, labels = exports.collect_labels(workdir)
  assert len(labels) == len(EXPECTED)
  os.mkdir(os.path.join(workdir, "labeling"))  # both: the current name wins
  assert folder_run.run_dir(workdir) == os.path.join(workdir, "labeling")
  assert folder_run.run_dir(os.path.join(workdir, "new")) == os.path.join(
    workdir, "new", "labeling"
  )


def test_csv_and_json(workdir, tmp_path):
  _, labels = exports.collect_labels(workdir)
  manifest = {"root": "/data/images"}
  out = str(tmp_path / "labels.csv")
  exports.write_labels(out, manifest, labels, exports.format_of(out, None))
  with open(out, newline="", encoding="utf-8") as f:  # valid UTF-8
    rows = list(csv.reader(f))
  assert rows[0] == ["path", "category", "answer", "round", "images"]  # the base folder last
  safe = [("'" + p if p[0] in "=-" else p, c, a, str(r), "/data/images") for p, c, a, r in EXPECTED]
  assert [tuple(r) for r in rows[1:]] == safe  # formulas neutralised
  out = str(tmp_path / "labels.json")
  assert exports.format_of(out, None) == "json" and exports.format_of(out, "csv") == "csv"
  exports.write_labels(out, manifest, labels, "json")
  data = json.loads(open(out, encoding="utf-8").read())
  assert data["format"] == exports.FORMAT and data["images"] == "/data/images"
  assert [(x["path"], x["category"], x["answer"], x["round"]) for x in data["labels"]] == EXPECTED
  with pytest.raises(ValueError, match="format='xml'"):
    exports.format_of(out, "xml")
  with pytest.raises(ValueError, match="is a directory"):
    exports.write_labels(str(tmp_path), manifest, labels, "csv")
  assert sorted(os.listdir(tmp_path)) == ["labels.csv", "labels.json", "run"]


def test_command_line(workdir, tmp_path):
  def run(*args):
    return subprocess.run(
      [sys.executable, "-m", "rare_jax.export", *args],
      cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
      capture_output=True,
      text=True,
      timeout=300,
    )

  out = tmp_path / "labels.txt"
  result = run(f"--workdir={workdir}", f"--out={out}", "--format=json")
  assert result.returncode == 0, result.stderr
  assert (
    "wrote 6 labels" in result.stderr and "4 answers (2 yes) and 2 seed examples" in result.stderr
  )
  assert len(json.loads(out.read_text())["labels"]) == 6
  result = run(f"--workdir={tmp_path}", f"--out={tmp_path / 'x.csv'}")
  assert result.returncode == 2 and "holds no labeling run" in result.stderr
  assert "Traceback" not in result.stderr and not (tmp_path / "x.csv").exists()


def test_padded_seeds_of_several_categories_are_exported_once(workdir):
  """Several categories pad shorter seed lists by repeating their seeds ([C, K] for the loop)."""
  path = os.path.join(workdir, folder_run.MANIFEST)
  manifest = json.loads(open(path).read())
  manifest.update(seed_ids=[[5, 0], [3, 3]], category_names=["Sandal", "Bag"])
  open(path, "w").write(json.dumps(manifest))
  open(os.path.join(workdir, folder_run.RUN_DIR, "answers.jsonl"), "w").close()
  open(os.path.join(workdir, folder_run.RUN_DIR, folder_run.JOURNAL), "w").close()
  _, labels = exports.collect_labels(workdir)
  assert [(x["path"], x["category"]) for x in labels] == [
    ("/seeds/s.png", "Sandal"),
    ("a/1.png", "Sandal"),
    ("c/3.png", "Bag"),
  ]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A labeling run of two categories (pixel-PCA features) after its 2 rounds, answered from
  the folder's classes (Sandal, and Bag)."""
  import numpy as np

  from rare_jax.active import labelers, runner
  from rare_jax.data import folder

  out = tmp_path_factory.mktemp("finish")
  images, sandal_seeds = folder.write_example_folder(out, per_class=8, rare_count=10, num_seeds=3)
  bag_seeds = sorted(
    os.path.join(images, "Bag", p) for p in os.listdir(os.path.join(images, "Bag"))
  )
  config = folder_run.make_config(budget=10, batch_size=5, feature_dim=12, image_size=16)
  run = folder_run.prepare_folder_run(
    str(out / "run"),
    images=images,
    categories=[("Sandal", ",".join(sandal_seeds)), ("Bag", ",".join(bag_seeds[:2]))],
    config=config,
    log=lambda _: None,
  )
  paths = run.manifest["paths"]
  truth = np.array(
    [
      [p.startswith("Sandal/") or p.startswith("/") for p in paths],
      [p.startswith("Bag/") for p in paths],
    ]
  )
  runner.run_strategy(
    run_dir=run.run_dir,
    config=config,
    strategy=folder_run.STRATEGY,
    features=run.features,
    val_features=run.val_features,
    seed_ids=run.seed_ids,
    val_ground_truth=run.val_ground_truth,
    labeler=labelers.SimulatedLabeler(truth),
    log=lambda _: None,
  )
  like = runner.abstract_state(run.features, run.seed_ids, int(config.seed))
  from rare_jax.infra.checkpoint import CheckpointStore

  with CheckpointStore(os.path.join(run.run_dir, "checkpoints")) as store:
    state, _ = store.restore(store.latest_step(), like)
  assert int(state.round) == 2
  return run, state


def test_finish_writes_the_ranked_pool_of_every_category(finished_run, tmp_path):
  import numpy as np

  run, state = finished_run
  written = exports.write_results(run.workdir, str(tmp_path / "out"), estimate=lambda *a: None)
  assert written == [
    str(tmp_path / "out" / "ranked_results.csv"),
    str(tmp_path / "out" / "ranked_results.json"),
  ]
  probabilities = 1 / (1 + np.exp(-np.asarray(state.scores, np.float64)))
  labels = np.asarray(state.labels)
  with open(written[0], newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["category", "rank", "path", "score", "label", "images"]
  assert {r[5] for r in rows[1:]} == {run.manifest["root"]}  # the base folder, on every row
  rows = rows[1:]
  pool = run.pool_size
  assert len(rows) == 2 * pool
  index = {p: i for i, p in enumerate(run.manifest["paths"])}
  for c, name in enumerate(["Sandal", "Bag"]):
    mine = rows[c * pool : (c + 1) * pool]
    assert {r[0] for r in mine} == {name}
    assert [int(r[1]) for r in mine] == list(range(1, pool + 1))
    ids = [index[r[2]] for r in mine]
    assert sorted(ids) == list(range(pool))  # every pool image once
    scores = [float(r[3]) for r in mine]
    assert scores == sorted(scores, reverse=True)
    np.testing.assert_allclose(scores, probabilities[c, ids], atol=5e-7)
    expected = [{1: "yes", 0: "no"}.get(int(labels[c, i]), "none") for i in ids]
    assert [r[4] for r in mine] == expected
  # The labels given are the ones the labels export lists.
  _, given = exports.collect_labels(run.workdir)
  assert {(x["path"], x["category"], x["answer"]) for x in given} == {
    (r[2], r[0], r[4]) for r in rows if r[4] != "none"
  }
  document = json.loads(open(written[1], encoding="utf-8").read())
  assert document["format"] == exports.RESULTS_FORMAT and document["round"] == 2
  assert [c["name"] for c in document["categories"]] == ["Sandal", "Bag"]
  for c, entry in enumerate(document["categories"]):
    assert "estimate" not in entry  # no audit: no estimate, not a made-up one
    assert [(r["rank"], r["path"], f"{r['score']:.6f}", r["label"]) for r in entry["results"]] == [
      (int(r[1]), r[2], r[3], r[4]) for r in rows[c * pool : (c + 1) * pool]
    ]
    assert entry["positives_labeled"] == int((labels[c] == 1).sum())
  # The audit's estimate goes into the JSON as given (the hook's contract).
  calls = []

  def estimate(workdir, category, scores, labels_row):
    calls.append((workdir, category, scores.shape, labels_row.dtype))
    return {"precision": 0.5} if category == 1 else None

  written = exports.write_results(run.workdir, estimate=estimate)
  assert written[0] == os.path.join(run.workdir, "results", "ranked_results.csv")
  assert calls == [(run.workdir, c, (pool,), np.dtype(np.int8)) for c in (0, 1)]
  document = json.loads(open(written[1], encoding="utf-8").read())
  assert "estimate" not in document["categories"][0]
  assert document["categories"][1]["estimate"] == {"precision": 0.5}


def test_finish_command_and_its_errors(finished_run, tmp_path):
  import shutil

  run, _ = finished_run

  def export(*args):
    return subprocess.run(
      [sys.executable, "-m", "rare_jax.export", *args],
      cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
      capture_output=True,
      text=True,
      timeout=300,
    )

  out = tmp_path / "done"
  result = export(f"--workdir={run.workdir}", "--results", f"--out_dir={out}")
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == [
    str(out / "ranked_results.csv"),
    str(out / "ranked_results.json"),
  ]
  assert "Sandal:" in result.stderr and "Bag:" in result.stderr and "Traceback" not in result.stderr
  assert "images ranked" in result.stderr and "audit" not in result.stderr
  # A run with no batch labeled yet: no model to rank with.
  fresh = tmp_path / "fresh"
  shutil.copytree(run.workdir, fresh, ignore=shutil.ignore_patterns("results"))
  for step in os.listdir(fresh / folder_run.RUN_DIR / "checkpoints"):
    if step != "0":
      shutil.rmtree(fresh / folder_run.RUN_DIR / "checkpoints" / step)
  result = export(f"--workdir={fresh}", "--results")
  assert result.returncode == 2 and "no batch labeled yet" in result.stderr, result.stderr
  assert not (fresh / "results").exists()
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  with pytest.raises(ValueError, match="is a file"):
    exports.write_results(run.workdir, str(a_file))
  with pytest.raises(ValueError, match="holds no labeling run"):
    exports.write_results(str(tmp_path))


def test_finish_includes_the_audit_estimate_where_the_run_has_an_audit(finished_run, tmp_path):
  """A recorded audit of Sandal (20 images drawn from the unlabeled ones, answered from the
  folder's classes): its estimate is in the results' JSON and the command's output; Bag, with
  no audit, gets none."""
  import shutil

  import numpy as np

  from rare_jax.webapp import audit

  run, state = finished_run
  workdir = str(tmp_path / "run")
  shutil.copytree(run.workdir, workdir, ignore=shutil.ignore_patterns("results"))
  probabilities = 1 / (1 + np.exp(-np.asarray(state.scores, np.float64)))
  labels = np.asarray(state.labels, np.int8)
  audit.start(workdir, 0, probabilities, labels, size=20, seed=3)
  for i in audit.pending(workdir, 0):
    path = run.manifest["paths"][i]
    audit.record(workdir, 0, i, path.startswith("Sandal/") or path.startswith("/"))
  expected = audit.estimate(workdir, 0, probabilities[0], labels[0])
  assert expected is not None and expected["labeled"] == 20 and expected["recall"] is not None
  assert audit.estimate(workdir, 1, probabilities[1], labels[1]) is None
  result = subprocess.run(
    [sys.executable, "-m", "rare_jax.export", f"--workdir={workdir}", "--results"],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  assert f"Sandal: {run.pool_size} images ranked" in result.stderr
  assert f"audit: {expected['summary']}" in result.stderr
  document = json.loads(
    open(os.path.join(workdir, "results", "ranked_results.json"), encoding="utf-8").read()
  )
  sandal, bag = document["categories"]
  assert "estimate" not in bag
  got = dict(sandal["estimate"])
  assert got == json.loads(json.dumps(expected))  # the estimate as the audit gives it


def test_finish_ranks_by_logit_where_probabilities_round_to_one(
  finished_run, tmp_path, monkeypatch
):
  """Logits above ~37 all give probability 1.0 in float64; the ranking keeps their order."""
  import dataclasses

  import numpy as np

  run, _ = finished_run
  scores = exports.pool_scores(run.workdir)
  logits = np.full_like(scores.logits, -5.0)
  logits[:, :3] = [40.0, 60.0, 50.0]  # pool ids 0, 1, 2: ranked 1, 2, 0
  assert (1 / (1 + np.exp(-logits[:, :3])) == 1.0).all()
  saturated = dataclasses.replace(scores, logits=logits)
  monkeypatch.setattr(exports, "pool_scores", lambda _: saturated)
  csv_path, _ = exports.write_results(run.workdir, str(tmp_path / "out"))
  with open(csv_path, newline="") as f:
    rows = [r for r in csv.DictReader(f) if r["category"] == scores.category_names[0]]
  assert [r["path"] for r in rows[:3]] == [scores.paths[1], scores.paths[2], scores.paths[0]]
  assert [r["score"] for r in rows[:3]] == ["1.000000"] * 3
