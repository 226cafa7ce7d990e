"""`--images=@LIST`: a text or CSV file of image paths instead of a folder (issue 26, item 8).

What is checked: the two list formats (one path a line; a `.csv` with a `path` column), paths
relative to the base folder, absolute, and outside it (`..` included); hostile entries skipped
and listed, never opened (a FIFO, a directory, a symlink loop, a missing file, another
extension, the same file twice, a file that does not decode) while a non-UTF-8 name is an image
like any other; bounded list files; a labeling run on a list (its pool, seeds in and out of the
list, every image served), restarted with the same list or refused with another; the exports'
one path convention with the base folder recorded; and `predict --images=@LIST` scoring exactly
as the folder. Tiny random PNGs and pixel-PCA features, as tests/test_folder.py.
"""

import csv
import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from rare_jax import predict
from rare_jax.active import linear, loop
from rare_jax.data import folder
from rare_jax.infra import csvfile
from rare_jax.infra.checkpoint import CheckpointStore
from rare_jax.webapp import exports, folder_run
from rare_jax.webapp.pool_images import PoolImages
from tests.test_input_security import LIMIT_S, _within

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ODD = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name: not valid UTF-8


def _png(path, seed):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)


def _write_list(path, lines: list[str], *, end=b"\n"):
  with open(path, "wb") as f:
    f.write(b"".join(os.fsencode(line) + end for line in lines))


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
  """photos/ (the base: a/0-7.png, b/8-15.png, an odd name, a name with a comma, extra.png not
  listed, and hostile entries), elsewhere/ (x.png, y.png: listed, outside the base),
  more_seeds/z.png (a seed outside everything), clean/ (16 images, for predict)."""
  out = tmp_path_factory.mktemp("lists")
  photos, elsewhere, seeds, clean = (
    out / n for n in ("photos", "elsewhere", "more_seeds", "clean")
  )
  for d in (photos / "a", photos / "b", elsewhere, seeds, clean / "a", clean / "b"):
    d.mkdir(parents=True)
  for k in range(16):
    _png(photos / "ab"[k // 8] / f"{k}.png", k)
    _png(clean / "ab"[k // 8] / f"{k}.png", 100 + k)
  _png(os.path.join(os.fsencode(photos), os.fsencode(ODD)), 16)
  _png(photos / "a" / "with,comma.png", 17)
  _png(photos / "extra.png", 18)
  _png(elsewhere / "x.png", 19)
  _png(elsewhere / "y.png", 20)
  _png(seeds / "z.png", 21)
  os.mkfifo(photos / "fifo.png")
  (photos / "dir.png").mkdir()
  os.symlink(photos / "loop2.png", photos / "loop.png")
  os.symlink(photos / "loop.png", photos / "loop2.png")
  (photos / "bad.png").write_bytes(b"garbage" * 10)
  (photos / "notes.txt").write_text("not an image")
  os.symlink(photos / "a" / "4.png", photos / "alias.png")  # another path to a/4.png
  entries = [f"{'ab'[k // 8]}/{k}.png" for k in range(16)] + [ODD, "a/with,comma.png"]
  hostile = [
    "fifo.png",
    "dir.png",
    "loop.png",
    "bad.png",
    "notes.txt",
    "nope.png",
    "a/0.png",  # listed twice
    "./a/1.png",  # the same path, written otherwise
    "sub/../a/2.png",  # '..' inside the base: a/2.png again
    str(photos / "a" / "3.png"),  # absolute, inside the base: a/3.png again
    "alias.png",  # another path to a/4.png
    "nul\0.png",  # no file name has a NUL
  ]
  outside = ["../elsewhere/x.png", str(elsewhere / "y.png")]  # '..' out of the base; absolute
  return out, photos, elsewhere, seeds, clean, entries, hostile, outside


def _expected(elsewhere, entries):
  """The candidates of the lists below: relative paths sorted (bad.png too: it is decoded only
  later), then the absolute ones sorted."""
  relative = sorted([*entries, "bad.png"])
  return [*relative, str(elsewhere / "x.png"), str(elsewhere / "y.png")]


def _check_refused(refused: dict):
  assert "FIFO" in refused["fifo.png"]
  assert "a directory" in refused["dir.png"]
  assert "symbolic links" in refused["loop.png"]  # ELOOP, found by stat: never opened
  assert "not a .jpg/.jpeg/.png file name" in refused["notes.txt"]
  assert "cannot stat it" in refused["nope.png"]
  assert "the same file as a/4.png" in refused["alias.png"]
  assert refused["nul\0.png"] == "a NUL character in the path"


def test_a_text_list_relative_absolute_outside_and_hostile_entries(layout, tmp_path):
  out, photos, elsewhere, _, _, entries, hostile, outside = layout
  listed_file = out / "list.txt"
  lines = [*entries[:5], "", "   ", *hostile, *entries[5:], *outside]
  _write_list(listed_file, lines)
  listed = _within(LIMIT_S, folder.read_image_list, f"@{listed_file}", base=str(photos))
  assert listed.kind == "text" and listed.base == str(photos) and listed.file == str(listed_file)
  assert list(listed.candidates) == _expected(elsewhere, entries)
  refused = dict(listed.refused)
  _check_refused(refused)
  again = [reason for path, reason in listed.refused if path in ("a/0.png", "a/1.png", "a/2.png")]
  assert len(again) == 3 and all("listed again on line" in r for r in again)
  assert "a/3.png" in refused and "listed again" in refused["a/3.png"]
  # Decoding: bad.png is skipped too; the odd name is an image; the report lists every one.
  source = _within(LIMIT_S, folder.open_images, f"@{listed_file}", base=str(photos))
  assert ODD in source.paths and "bad.png" not in source.paths
  assert len(source) == len(entries) + 2 and source.root == str(photos)
  skipped = dict(source.skipped)
  assert "not a JPEG or PNG image" in skipped["bad.png"]
  assert set(skipped) == {*refused, "bad.png"}
  report = source.report()
  assert report.startswith(f"{listed_file} (paths relative to {photos}): {len(source)} images")
  assert "  skipped fifo.png: a FIFO" in report
  np.testing.assert_array_equal(
    source[source.paths.index(str(elsewhere / "x.png"))]["image"],
    np.asarray(folder.decode_image(str(elsewhere / "x.png"))),
  )
  # CRLF line ends; the default base is the list file's folder (then '..' is needed for photos).
  crlf = photos / "crlf.txt"
  _write_list(crlf, ["a/0.png", "b/9.png", "../elsewhere/y.png"], end=b"\r\n")
  assert folder.read_image_list(f"@{crlf}").candidates == (
    "a/0.png",
    "b/9.png",
    str(elsewhere / "y.png"),
  )
  # Sub-folder labels (--eval_subfolder) come from the relative paths; absolute ones have none.
  labeled = folder.open_images(f"@{listed_file}", base=str(photos), labels_from_subfolders=True)
  assert labeled.class_names == ("a", "b")
  assert labeled.labels()[labeled.paths.index(str(elsewhere / "y.png"))] == folder.UNLABELED


def test_a_csv_list_with_a_path_column(layout, tmp_path):
  out, photos, elsewhere, _, _, entries, hostile, outside = layout
  rows = [["id", "Path ", "note"]]  # the header names the column (case and spaces ignored)
  rows += [[str(k), entry, "x,y"] for k, entry in enumerate([*entries, *hostile, *outside])]
  rows += [["99", "", "an empty cell"], [], ["100"]]  # an empty cell, a blank line, a short row
  listed_file = tmp_path / "list.CSV"
  with open(listed_file, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
    f.write("\ufeff")  # a spreadsheet's byte order mark
    csv.writer(f).writerows(rows)
  listed = _within(LIMIT_S, folder.read_image_list, f"@{listed_file}", base=str(photos))
  assert listed.kind == "csv"
  assert list(listed.candidates) == _expected(elsewhere, entries)
  refused = dict(listed.refused)
  _check_refused(refused)
  empty = [(p, r) for p, r in listed.refused if r == "an empty path cell"]
  assert [p for p, _ in empty] == sorted(p for p in refused if p.startswith("<line "))
  assert len(empty) == 2  # the empty cell and the short row; the blank line is no entry
  # The same entries as a text list give the same files and the same run identity.
  text = tmp_path / "same.txt"
  _write_list(text, [*entries, *hostile, *outside])
  as_text = folder.read_image_list(f"@{text}", base=str(photos))
  assert as_text.candidates == listed.candidates
  no_path = tmp_path / "no_path.csv"
  no_path.write_text("file,label\na/0.png,1\n")
  with pytest.raises(ValueError, match=r"header \['file', 'label'\] has no 'path' column"):
    folder.read_image_list(f"@{no_path}", base=str(photos))
  huge_cell = tmp_path / "huge_cell.csv"
  huge_cell.write_text("path\n" + "a" * 200_000 + ".png\n")
  with pytest.raises(ValueError, match="not valid CSV at line"):
    folder.read_image_list(f"@{huge_cell}")


def test_list_files_that_are_refused_whole(layout, tmp_path, monkeypatch):
  out, photos, *_ = layout
  assert (folder.MAX_IMAGE_LIST_BYTES, folder.MAX_IMAGE_LIST_LINES) == (64 << 20, 1_000_000)
  fifo = tmp_path / "list_fifo"
  os.mkfifo(fifo)
  with pytest.raises(ValueError, match="list file cannot be read.*FIFO"):
    _within(LIMIT_S, folder.read_image_list, f"@{fifo}", fifos=[str(fifo)])
  with pytest.raises(ValueError, match="list file cannot be read"):
    folder.read_image_list(f"@{tmp_path / 'missing.txt'}")
  with pytest.raises(ValueError, match="list file cannot be read.*a directory"):
    folder.read_image_list(f"@{photos}")
  _write_list(tmp_path / "one.txt", ["a/0.png"])
  with pytest.raises(ValueError, match="base=.* is not a directory"):
    folder.read_image_list(f"@{tmp_path / 'one.txt'}", base=str(tmp_path / "nowhere"))
  monkeypatch.setattr(folder, "MAX_IMAGE_LIST_BYTES", 1000)
  monkeypatch.setattr(folder, "MAX_IMAGE_LIST_LINES", 20)
  big = tmp_path / "big.txt"
  big.write_bytes(b"a/0.png\n" * 125 + b"x")  # 1001 bytes
  with pytest.raises(ValueError, match=r"big\.txt' is over 1000 bytes"):
    folder.read_image_list(f"@{big}")
  many = tmp_path / "many.txt"
  many.write_text("a.png\n" * 21)
  with pytest.raises(ValueError, match=r"many\.txt' has 21 lines; expected at most 20"):
    folder.read_image_list(f"@{many}")
  many.write_text("a.png\n" * 20)
  refused = folder.read_image_list(f"@{many}").refused  # 20 lines: read, each listed
  assert sorted(refused) == sorted(
    [
      ("a.png", "cannot stat it (No such file or directory)"),
      *(("a.png", f"listed again on line {n} (first on line 1)") for n in range(2, 21)),
    ]
  )
  # An existing folder named like a list is a folder (the first rule that applies).
  at_folder = tmp_path / "@photos"
  shutil.copytree(photos / "b", at_folder)
  assert not folder.is_image_list(str(at_folder)) and folder.is_image_list(f"@{many}")
  assert len(folder.open_images(str(at_folder))) == 8


def _save_round_1(run, answers: dict[int, bool], weights):
  """Checkpoint 1 of `run` as a round would leave it: `answers` (pool id -> yes/no) labeled in
  round 1, this linear model, its logits as the scores; and the batch in the page's journal."""
  state = loop.init(run.features, np.asarray(run.seed_ids), seed=0)
  ids = jnp.asarray(list(answers))
  state = state.replace(
    round=jnp.ones((), jnp.int32),
    has_model=jnp.ones((), bool),
    labels=state.labels.at[0, ids].set(jnp.asarray(list(answers.values()), jnp.int8)),
    label_round=state.label_round.at[0, ids].set(1),
    linear=linear.LinearModel(weights=jnp.asarray(weights), bias=jnp.zeros(1, jnp.float32)),
    scores=(run.features @ jnp.asarray(weights).T).T,
  )
  with CheckpointStore(os.path.join(run.run_dir, "checkpoints")) as store:
    store.save(1, state, {"round": 1})
  with open(os.path.join(run.run_dir, folder_run.JOURNAL), "w") as f:
    record = {"query_ids": [list(answers)], "answers": [list(answers.values())]}
    f.write(json.dumps(record) + "\n")


@pytest.fixture(scope="module")
def list_run(layout):
  """A pixel-PCA labeling run on the text list of `layout`, with seeds in the list (by another
  path), under the base but not listed, and outside everything; a linear model in checkpoint 1
  and one submitted batch."""
  out, photos, elsewhere, seeds, _, entries, hostile, outside = layout
  listed_file = out / "run_list.txt"
  _write_list(listed_file, [*entries, *hostile, *outside])
  seed_spec = ",".join([str(photos / "alias.png"), str(photos / "extra.png"), str(seeds / "z.png")])
  config = folder_run.make_config(budget=4, batch_size=2, feature_dim=4, image_size=8)
  lines = []
  workdir = str(out / "run")
  run = folder_run.prepare_folder_run(
    workdir,
    images=f"@{listed_file}",
    base=str(photos),
    seeds=seed_spec,
    config=config,
    category_name="Thing",
    log=lines.append,
  )
  weights = np.linspace(-1, 1, run.features.shape[1], dtype=np.float32)[None, :]
  paths = run.manifest["paths"]
  answers = {paths.index(str(elsewhere / "x.png")): False, paths.index("b/9.png"): True}
  _save_round_1(run, answers, weights)
  return run, listed_file, seed_spec, config, lines


def test_a_labeling_run_on_a_list(layout, list_run):
  out, photos, elsewhere, seeds, _, entries, _, _ = layout
  run, listed_file, _, _, lines = list_run
  manifest = run.manifest
  assert manifest["root"] == str(photos) and manifest["images_list"] == str(listed_file)
  listed = sorted(entries)
  absolute = [str(elsewhere / "x.png"), str(elsewhere / "y.png")]
  # The pool: listed files inside the base, then outside it, then the seeds not listed.
  assert manifest["paths"] == [*listed, *absolute, "extra.png", str(seeds / "z.png")]
  assert manifest["num_folder_images"] == len(listed)
  assert manifest["num_list_images"] == len(listed) + 2
  assert sorted(manifest["seed_ids"][0]) == [
    manifest["paths"].index(p) for p in ("a/4.png", "extra.png", str(seeds / "z.png"))
  ]
  assert {p for p, _ in manifest["skipped"]} >= {"fifo.png", "bad.png", "alias.png", "nope.png"}
  assert f"reading the images listed in {listed_file}" in lines
  assert "\n  skipped dir.png: a directory" in "\n".join(lines), lines  # source.report()
  assert any("pool: 22 images (2 seeds not in the list)" in line for line in lines), lines
  # Every pool image is a file that is served (inside the base: checked to be there).
  images = PoolImages(run)
  for i in range(run.pool_size):
    path = manifest["paths"][i]
    expected = path if os.path.isabs(path) else os.path.join(str(photos), path)
    assert run.file_path(i) == expected and os.path.isfile(expected)
    data, mimetype = images.thumbnail(i)
    assert mimetype.startswith("image/") and data
  assert folder_run.pool_files(manifest) == [run.file_path(i) for i in range(run.pool_size)]


def test_a_restart_with_the_same_list_is_the_same_run_and_another_is_refused(
  layout, list_run, tmp_path
):
  out, photos, _, _, clean, entries, hostile, outside = layout
  run, listed_file, seed_spec, config, _ = list_run

  def restart(images, base=str(photos), workdir=run.workdir):
    return folder_run.prepare_folder_run(
      workdir,
      images=images,
      base=base,
      seeds=seed_spec,
      config=config,
      category_name="Thing",
      log=lambda _: None,
    )

  again = restart(f"@{listed_file}")
  assert again.manifest == run.manifest
  np.testing.assert_array_equal(np.asarray(again.features), np.asarray(run.features))
  # The same files listed in another order, from another list file: the same list.
  copy = tmp_path / "reordered.txt"
  _write_list(copy, list(reversed([*entries, *hostile, *outside])))
  assert restart(f"@{copy}").manifest == run.manifest
  fewer = tmp_path / "fewer.txt"
  _write_list(fewer, [*(e for e in entries if e != "b/15.png"), *hostile, *outside])
  with pytest.raises(ValueError, match=r"lists other files; use --images=@.*run_list\.txt"):
    restart(f"@{fewer}")
  with pytest.raises(ValueError, match="another base folder"):
    restart(f"@{listed_file}", base=str(out))
  with pytest.raises(ValueError, match="--base=.* goes with --images=@LIST"):
    restart(str(photos))
  with pytest.raises(ValueError, match="is a run on the image list .*, not on the folder"):
    restart(str(photos), base=None)
  # A folder run refuses a list.
  folder_work = str(tmp_path / "folder_run")
  seeds = f"{clean / 'a' / '0.png'},{clean / 'b' / '8.png'}"
  folder_run.prepare_folder_run(
    folder_work, images=str(clean), seeds=seeds, config=config, log=lambda _: None
  )
  clean_list = tmp_path / "clean.txt"
  _write_list(clean_list, [str(clean / "a" / "0.png")])
  with pytest.raises(ValueError, match="is a run on the folder .*, not on the image list"):
    folder_run.prepare_folder_run(
      folder_work, images=f"@{clean_list}", seeds=seeds, config=config, log=lambda _: None
    )
  assert json.load(open(os.path.join(run.workdir, folder_run.MANIFEST))) == run.manifest


def _one_convention(paths, base):
  """Relative paths name files inside `base`; absolute ones files outside it."""
  real_base = os.path.realpath(base)
  for path in paths:
    full = folder.join_path(base, path)
    inside = os.path.commonpath([os.path.realpath(full), real_base]) == real_base
    assert os.path.isfile(full) and inside == (not os.path.isabs(path)), path


def test_exports_use_one_path_convention_and_record_the_base(layout, list_run, tmp_path):
  out, photos, elsewhere, seeds, *_ = layout
  run, listed_file, *_ = list_run
  manifest, labels = exports.collect_labels(run.workdir)
  got = [(x["path"], x["answer"], x["round"]) for x in labels]
  assert got == [
    ("a/4.png", "yes", 0),  # a listed seed given by another path: the list's path
    ("extra.png", "yes", 0),  # a seed inside the base, not listed: relative, like the pool
    (str(seeds / "z.png"), "yes", 0),  # outside the base: absolute
    (str(elsewhere / "x.png"), "no", 1),  # a listed image outside the base: absolute
    ("b/9.png", "yes", 1),
  ]
  _one_convention([p for p, _, _ in got], str(photos))
  out_csv = str(tmp_path / "labels.csv")
  exports.write_labels(out_csv, manifest, labels, "csv")
  with open(out_csv, newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["path"] for r in rows] == [p for p, _, _ in got]
  assert {r["images"] for r in rows} == {str(photos)}
  out_json = str(tmp_path / "labels.json")
  exports.write_labels(out_json, manifest, labels, "json")
  document = json.load(open(out_json))
  assert (document["images"], document["images_list"]) == (str(photos), str(listed_file))
  # The ranked results: the whole pool, the same paths, the base on every row.
  csv_path, json_path = exports.write_results(
    run.workdir, str(tmp_path / "results"), estimate=lambda *a: None
  )
  with open(csv_path, newline="") as f:
    rows = list(csv.DictReader(f))
  assert sorted(r["path"] for r in rows) == sorted(map(csvfile.printable, manifest["paths"]))
  assert {r["images"] for r in rows} == {str(photos)}
  assert "caf\\xe9.png" in {r["path"] for r in rows}  # not UTF-8: escaped, not dropped
  results = json.load(open(json_path))
  assert (results["images"], results["images_list"]) == (str(photos), str(listed_file))
  _one_convention([p for p in manifest["paths"]], str(photos))


def test_predict_scores_a_list_as_the_folder(layout, list_run, tmp_path):
  out, photos, elsewhere, _, clean, *_ = layout
  run, *_ = list_run
  scorer = predict.load_scorer(run.workdir, log=lambda _: None)
  by_folder = predict.score_folder(scorer, str(clean), log=lambda _: None)
  every = tmp_path / "every.csv"
  with open(every, "w", newline="") as f:
    csv.writer(f).writerows([["path"], *([p] for p in reversed(by_folder.names))])
  lines = []
  by_list = predict.score_folder(scorer, f"@{every}", base=str(clean), log=lines.append)
  assert by_list.names == by_folder.names and by_list.ids == by_folder.ids
  np.testing.assert_array_equal(by_list.scores, by_folder.scores)
  assert by_list.base == by_folder.base == str(clean)
  # Absolute, relative and outside paths mixed, with a file skipped and listed.
  mixed = tmp_path / "mixed.txt"
  _write_list(mixed, [str(clean / "b" / "9.png"), "a/0.png", str(elsewhere / "x.png"), "gone.png"])
  lines = []
  scored = predict.score_folder(scorer, f"@{mixed}", base=str(clean), log=lines.append)
  assert scored.names == ["a/0.png", "b/9.png", str(elsewhere / "x.png")]
  index = {p: i for i, p in enumerate(by_folder.names)}
  np.testing.assert_array_equal(
    scored.scores[:2], by_folder.scores[[index["a/0.png"], index["b/9.png"]]]
  )
  assert any(line.startswith("skipped gone.png: cannot stat it") for line in lines), lines
  with pytest.raises(ValueError, match="--base=.* with the folder"):
    predict.score_folder(scorer, str(clean), base=str(clean), log=lambda _: None)


def test_the_commands_take_a_list(layout, list_run, tmp_path):
  """predict --images=@LIST --base writes the folder's CSV; label --images=@LIST --base reads
  the list (its skipped entries listed) and refuses a budget the pool cannot take, exit 2."""
  out, photos, _, _, clean, entries, hostile, outside = layout
  run, *_ = list_run
  every = tmp_path / "every.txt"
  _write_list(every, sorted(folder.list_image_files(str(clean))[0]))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)
  listed_file = tmp_path / "label_list.txt"
  _write_list(listed_file, [*entries, *hostile, *outside])

  def start(module, *args):
    return subprocess.Popen(
      [sys.executable, "-m", module, *args],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      errors="replace",
    )

  scores = tmp_path / "scores.csv"
  processes = [
    start(
      "rare_jax.predict",
      f"--workdir={run.workdir}",
      f"--images=@{every}",
      f"--base={clean}",
      f"--out={scores}",
    ),
    start(
      "rare_jax.label",
      f"--images=@{listed_file}",
      f"--base={photos}",
      f"--seeds={photos / 'a' / '0.png'}",
      f"--workdir={tmp_path / 'label_run'}",
      "--features=pixel_pca",
      "--feature_dim=4",
      "--image_size=8",
      "--budget=900",
    ),
  ]
  try:
    outputs = [p.communicate(timeout=240)[0] for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  assert processes[0].returncode == 0, outputs[0]
  scorer = predict.load_scorer(run.workdir, log=lambda _: None)
  expected = predict.select_rows(
    predict.score_folder(scorer, str(clean), log=lambda _: None).rows(), top_k=None, threshold=None
  )
  with open(scores, newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["id", "path", "score"]
  assert [(int(i), p) for i, p, _ in rows[1:]] == [(i, p) for i, p, _ in expected]
  np.testing.assert_allclose([float(s) for *_, s in rows[1:]], [s for *_, s in expected], atol=2e-6)
  assert processes[1].returncode == 2, outputs[1]
  assert "needs a pool of at least" in outputs[1] and "Traceback" not in outputs[1]
  assert f"reading the images listed in {listed_file}" in outputs[1]
  assert "  skipped fifo.png: a FIFO" in outputs[1]
