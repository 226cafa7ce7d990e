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
  run_dir = workdir / folder_run.STRATEGY
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


def test_csv_and_json(workdir, tmp_path):
  _, labels = exports.collect_labels(workdir)
  manifest = {"root": "/data/images"}
  out = str(tmp_path / "labels.csv")
  exports.write_labels(out, manifest, labels, exports.format_of(out, None))
  with open(out, newline="", encoding="utf-8") as f:  # valid UTF-8
    rows = list(csv.reader(f))
  assert rows[0] == ["path", "category", "answer", "round"]
  safe = [("'" + p if p[0] in "=-" else p, c, a, str(r)) for p, c, a, r in EXPECTED]
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
  open(os.path.join(workdir, folder_run.STRATEGY, "answers.jsonl"), "w").close()
  open(os.path.join(workdir, folder_run.STRATEGY, folder_run.JOURNAL), "w").close()
  _, labels = exports.collect_labels(workdir)
  assert [(x["path"], x["category"]) for x in labels] == [
    ("/seeds/s.png", "Sandal"),
    ("a/1.png", "Sandal"),
    ("c/3.png", "Bag"),
  ]
