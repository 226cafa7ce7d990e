"""What image folders and command inputs are refused, and how: never a hang, never a traceback.

- Only regular files are images: a FIFO named `*.png` (or a symlink to one) is skipped by the
  folder scan, by `predict` and by `classify` without being opened for a blocking read, and a
  file swapped for a FIFO after the scan is refused when opened. Every such test runs under a
  time limit and unblocks the FIFO afterwards, so a regression fails instead of hanging.
- One pixel bound (`folder.MAX_IMAGE_PIXELS`) for every decode, checked from the header: a tiny
  PNG claiming 30000x30000 pixels is one reported image, and the others are still classified.
- `--seeds`: an existing file is taken whole (commas in its name), `@LIST` reads one path a line.
- `--out` in a folder that does not exist yet: created up front for CSV and JSON alike; one
  under a file: refused before any image is read.
- A damaged line of answers.jsonl / submitted.jsonl: one error naming file, line and what to
  do; wrong shapes too. A damaged checkpoint: no "Event loop is closed" noise after the error.
- Bad input (an unknown model, unusable --init weights) exits with status 2.

Folders are a few random 12x12 PNGs and runs use the pixel-PCA stand-in (seconds); command-line
cases run as subprocesses only where the exit status or stderr is what is checked.
"""

import asyncio
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import types
import zlib

import numpy as np
import pytest
from PIL import Image

from rare_jax import classify, predict
from rare_jax.active import runner
from rare_jax.data import folder
from rare_jax.webapp import exports, folder_run
from rare_jax.webapp.labeler import read_journal
from tests.test_predict import _save_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT_S = 20  # far above what any of these scans needs; a FIFO read would wait forever


# --- helpers --------------------------------------------------------------------------------


def _png(path, seed=0, size=12):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def _png_claiming(width: int, height: int) -> bytes:
  """A valid-looking PNG of a few dozen bytes whose header claims width x height RGB pixels."""

  def chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (
    b"\x89PNG\r\n\x1a\n"
    + chunk(b"IHDR", header)
    + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    + chunk(b"IEND", b"")
  )


def _unblock(fifo: str) -> None:
  """Lets readers blocked opening `fifo` go (a writer opens and closes it): a regression must
  not leave a thread blocked that would stop the test process from exiting."""
  for _ in range(100):
    try:
      fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: nobody is waiting to read
      return
    os.close(fd)
    time.sleep(0.02)


def _within(seconds, fn, *args, fifos=(), **kwargs):
  """fn(*args, **kwargs), failing the test if it has not returned after `seconds`."""
  result = {}

  def target():
    try:
      result["value"] = fn(*args, **kwargs)
    except BaseException as error:  # re-raised in the test's thread
      result["error"] = error

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(seconds)
  if thread.is_alive():
    for fifo in fifos:
      _unblock(fifo)
    thread.join(10)
    pytest.fail(f"{getattr(fn, '__name__', fn)} still running after {seconds}s (a FIFO read?)")
  if "error" in result:
    raise result["error"]
  return result["value"]


def _env(devices: int = 1):
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


@pytest.fixture
def images(tmp_path):
  """A folder of 6 PNGs: a/0..2.png, b/3..5.png."""
  root = tmp_path / "images"
  for k in range(6):
    (root / "ab"[k // 3]).mkdir(parents=True, exist_ok=True)
    _png(root / "ab"[k // 3] / f"{k}.png", seed=k)
  return root


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
  """A pixel-PCA folder run of 40 PNGs with a linear model in checkpoint 1 (as a round saves)."""
  out = tmp_path_factory.mktemp("mini")
  root = out / "images"
  (root / "pos").mkdir(parents=True)
  for k in range(40):
    _png(root / ("pos" if k < 10 else "") / f"{k:03d}.png", seed=k)
  seeds = f"{root / 'pos' / '000.png'},{root / 'pos' / '001.png'}"
  workdir = str(out / "run")
  config = folder_run.make_config(budget=4, batch_size=2, feature_dim=4, image_size=8)
  run = folder_run.prepare_folder_run(
    workdir, images=str(root), seeds=seeds, config=config, log=lambda _: None
  )
  features = np.asarray(run.features)
  weights = np.full((1, features.shape[1]), 0.1, np.float32)
  _save_model(workdir, features, run.seed_ids, weights, np.zeros(1, np.float32))
  flags = ["--features=pixel_pca", "--budget=4", "--batch_size=2", "--feature_dim=4"]
  return str(root), seeds, workdir, [*flags, "--image_size=8"]


# --- 6: FIFOs and other non-regular files ---------------------------------------------------


def test_a_fifo_named_png_is_skipped_by_the_folder_scan_without_being_opened(images):
  fifo = str(images / "a" / "pipe.png")
  os.mkfifo(fifo)
  os.symlink(fifo, images / "b" / "to_pipe.png")  # a symlink inside the folder, to a FIFO
  os.symlink(images / "gone.png", images / "b" / "broken.png")
  source = _within(LIMIT_S, folder.open_folder, images, fifos=[fifo])
  assert len(source) == 6
  skipped = dict(source.skipped)
  assert set(skipped) == {"a/pipe.png", "b/to_pipe.png", "b/broken.png"}
  assert "FIFO" in skipped["a/pipe.png"] and "FIFO" in skipped["b/to_pipe.png"]
  assert "broken symlink" in skipped["b/broken.png"]
  assert "skipped a/pipe.png: a FIFO" in source.report()


def test_files_of_other_formats_are_skipped_with_a_reason_that_says_so(images):
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(images / "a" / "gif.png", format="GIF")
  (images / "a" / "empty.png").write_bytes(b"")
  skipped = dict(folder.open_folder(images).skipped)
  for name in ("a/gif.png", "a/empty.png"):
    assert "not a JPEG or PNG image" in skipped[name], skipped


def test_a_file_swapped_for_a_fifo_after_the_scan_is_refused_when_opened(images):
  source = folder.open_folder(images)
  path = source.file_path(0)
  os.remove(path)
  os.mkfifo(path)
  with pytest.raises(ValueError, match="FIFO"):  # folder.NotRegularFileError
    _within(LIMIT_S, folder.decode_image, path, fifos=[path])
  with pytest.raises(ValueError, match="no longer decodes.*FIFO"):
    _within(LIMIT_S, source.__getitem__, 0, fifos=[path])
  with pytest.raises(folder.NotRegularFileError, match="a directory"):
    folder.decode_image(str(images / "a"))


def test_predict_skips_a_fifo_and_lists_it(images):
  fifo = str(images / "b" / "pipe.png")
  os.mkfifo(fifo)
  lines = []

  def scan():
    return list(predict.iter_folder(str(images), lambda image: np.asarray(image), log=lines.append))

  batches = _within(LIMIT_S, scan, fifos=[fifo])
  assert sum(len(paths) for paths, _ in batches) == 6
  assert any(line.startswith("skipped b/pipe.png: a FIFO") for line in lines), lines


def test_seeds_that_are_fifos_are_refused_not_read(images):
  source = folder.open_folder(images)
  fifo = str(images.parent / "seed.png")
  os.mkfifo(fifo)
  with pytest.raises(ValueError, match="FIFO"):
    _within(LIMIT_S, folder.resolve_seeds, source, [fifo], fifos=[fifo])
  listed = images.parent / "list_fifo"
  os.mkfifo(listed)
  with pytest.raises(ValueError, match="list file cannot be read"):
    _within(LIMIT_S, folder.seed_paths, f"@{listed}", fifos=[str(listed)])


class _StubClassifier:
  """Stands in for the ImageNet classifier: classify_files' reading and reporting is tested."""

  def __init__(self, model, init="imagenet"):
    self.trunk = types.SimpleNamespace(image_size=16)

  def top_k(self, crops, k=5):
    assert crops.shape == (1, 16, 16, 3) and crops.dtype == np.uint8
    return [[("a class", 1.0)] * k]


def test_classify_reports_a_fifo_and_a_bomb_and_classifies_the_others(
  images, tmp_path, monkeypatch, capsys
):
  monkeypatch.setattr(classify, "ImageNetClassifier", _StubClassifier)
  fifo = str(tmp_path / "pipe.png")
  os.mkfifo(fifo)
  bomb = tmp_path / "bomb.png"
  bomb.write_bytes(_png_claiming(30000, 30000))
  first, last = str(images / "a" / "0.png"), str(images / "b" / "5.png")
  status = _within(
    LIMIT_S, classify.classify_files, [first, fifo, str(bomb), last], model="x", top=2, fifos=[fifo]
  )
  out, err = capsys.readouterr()
  assert status == 1  # some images could not be classified
  top = ["  100.0%  a class"] * 2
  assert out.splitlines() == [first, *top, last, *top]
  errors = err.splitlines()
  assert len(errors) == 2, err
  assert errors[0] == f"error: {fifo}: is a FIFO (named pipe), expected an image file"
  assert errors[1].startswith(f"error: {bomb}: not a readable image (") and "pixels" in errors[1]


# --- 7: one pixel bound for every decode -----------------------------------------------------


def test_a_png_claiming_30000x30000_pixels_is_refused_before_decoding(images, monkeypatch):
  bomb = images / "a" / "bomb.png"
  bomb.write_bytes(_png_claiming(30000, 30000))
  assert bomb.stat().st_size < 200
  with pytest.raises(ValueError, match="pixels"):
    folder.decode_image(bomb)
  skipped = dict(folder.open_folder(images).skipped)
  assert "pixels" in skipped["a/bomb.png"]
  # The bound is rare_jax's own: it holds where PIL checks nothing (MAX_IMAGE_PIXELS = None,
  # as some libraries set it) and applies to any image over it, before a pixel is decoded.
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
  with pytest.raises(ValueError, match="900000000 pixels; expected at most"):
    folder.decode_image(bomb)
  monkeypatch.setattr(folder, "MAX_IMAGE_PIXELS", 12 * 12 - 1)
  with pytest.raises(ValueError, match="12x12 = 144 pixels"):
    folder.decode_image(images / "a" / "0.png")
  with pytest.raises(ValueError, match="pixels"):
    classify.load_image(str(images / "a" / "0.png"))


def test_center_crop_of_a_very_long_image_resizes_only_its_middle(monkeypatch):
  resize = Image.Image.resize

  def bounded_resize(image, size, *args, **kwargs):  # refuses before allocating
    assert size[0] * size[1] <= 5 * 224 * 256, f"a resize to {size}"
    return resize(image, size, *args, **kwargs)

  monkeypatch.setattr(Image.Image, "resize", bounded_resize)
  long = Image.fromarray(np.zeros((2, 40000, 3), np.uint8))  # a 5 GB resize, uncut
  assert classify.center_crop(long, 224).shape == (224, 224, 3)
  photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 500, 3), np.uint8))
  assert classify.center_crop(photo, 224).shape == (224, 224, 3)


# --- 9: --out in a folder that does not exist yet -------------------------------------------


def test_out_folders_are_created_up_front_for_every_format(tmp_path):
  for name in ("x.csv", "x.json"):
    out = tmp_path / name.split(".")[1] / "missing" / name
    exports.prepare_out_file(str(out))
    assert out.parent.is_dir() and not out.exists()
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  with pytest.raises(ValueError, match="cannot be created"):
    exports.prepare_out_file(str(a_file / "x.json"))
  with pytest.raises(ValueError, match="is a directory"):
    exports.prepare_out_file(str(tmp_path))
  # The JSON writer, like the CSV one, makes its folder when called directly.
  scorer = types.SimpleNamespace(category="c", kind="k", head="linear", round=1)
  out = tmp_path / "deep" / "er" / "scores.json"
  predict.write_json(
    str(out), ("id", "path", "score"), [(0, "a.png", 0.5)], scorer=scorer, workdir="w", source="s"
  )
  assert json.loads(out.read_text())["annotations"][0]["score"] == 0.5


def test_predict_writes_json_into_a_new_folder_and_refuses_one_under_a_file(mini_run, tmp_path):
  root, _, workdir, _ = mini_run
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  runs = {}
  for name, out in (("new", tmp_path / "new" / "dir" / "x.json"), ("file", a_file / "x.json")):
    runs[name] = subprocess.Popen(
      [sys.executable, "-m", "rare_jax.predict", f"--workdir={workdir}", f"--images={root}"]
      + [f"--out={out}"],
      cwd=REPO,
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
  results = {name: (p.communicate(timeout=300)[1], p.returncode) for name, p in runs.items()}
  err, status = results["new"]
  assert status == 0, err
  document = json.loads((tmp_path / "new" / "dir" / "x.json").read_text())
  assert len(document["annotations"]) == 40
  err, status = results["file"]
  assert status == 2 and "cannot be created" in err, err
  assert "Traceback" not in err and "scored" not in err  # refused before any image was read


# --- 10: damaged answers logs, checkpoint teardown noise, bad --init -------------------------

GOOD = {"round": 1, "query_ids": [[3, 4]], "answers": [[True, False]]}
DAMAGED_LINES = {
  "not JSON": ("this is garbage", "is not JSON"),
  "a list": (json.dumps([1, 2]), "a JSON list, not an object"),
  "missing keys": (json.dumps({"round": 2}), "no 'query_ids', 'answers'"),
  "round a string": (json.dumps({**GOOD, "round": "2"}), 'round="2"'),
  "ragged ids": (json.dumps({**GOOD, "query_ids": [[3, 4], [5]]}), "query_ids="),
  "float ids": (json.dumps({**GOOD, "query_ids": [[3.5, 4]]}), "query_ids="),
  "answers of another shape": (json.dumps({**GOOD, "answers": [[True]]}), "answers="),
  "answers not bools": (json.dumps({**GOOD, "answers": [["yes", "no"]]}), "answers="),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_LINES))
def test_a_damaged_answers_line_is_named_with_what_to_do(case, tmp_path):
  line, problem = DAMAGED_LINES[case]
  path = tmp_path / "answers.jsonl"
  later = {**GOOD, "round": 3}
  path.write_text("\n".join([json.dumps(GOOD), line, json.dumps(later)]) + "\n")
  with pytest.raises(ValueError) as caught:
    runner.read_answers(str(path))
  message = str(caught.value)
  assert f"{path} line 2" in message and problem in message, message
  assert "fix that line or delete it" in message and "nothing is lost" in message
  # The journal: the same checks without `round`.
  journal = tmp_path / "submitted.jsonl"
  journal.write_text("\n".join([json.dumps(GOOD), line, json.dumps(GOOD)]) + "\n")
  if case == "round a string":
    assert len(read_journal(str(journal))) == 3  # the journal has no round to check
    return
  with pytest.raises(ValueError, match=f"{journal} line 2.*fix that line or delete it"):
    read_journal(str(journal))


def test_a_torn_last_line_is_still_dropped(tmp_path):
  from rare_jax.active import answer_logs

  path = tmp_path / "answers.jsonl"
  path.write_text(json.dumps(GOOD) + '\n{"round": 2, "query_i')
  assert list(runner.read_answers(str(path))) == [1]
  assert answer_logs.read_records(None, with_round=True, advice="") == []


def test_export_refuses_a_wrong_shape_answers_line_with_one_clear_error(tmp_path):
  workdir = tmp_path / "run"
  run_dir = workdir / folder_run.RUN_DIR
  run_dir.mkdir(parents=True)
  manifest = {
    "format": folder_run.MANIFEST_FORMAT,
    "root": "/data",
    "paths": ["a.png", "b.png", "c.png", "d.png", "e.png"],
    "num_folder_images": 5,
    "seed_ids": [[0]],
    "category_names": ["c"],
  }
  (workdir / folder_run.MANIFEST).write_text(json.dumps(manifest))
  (run_dir / "answers.jsonl").write_text(json.dumps({"round": 1}) + "\n" + json.dumps(GOOD) + "\n")
  with pytest.raises(ValueError, match="answers.jsonl line 1: no 'query_ids', 'answers'"):
    exports.collect_labels(str(workdir))


def _run_label(args):
  return subprocess.Popen(
    [sys.executable, "-m", "rare_jax.label", "--port=0", *args],
    cwd=REPO,
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    errors="replace",
  )


def test_label_refuses_damaged_logs_and_bad_weights_in_one_line_with_status_2(mini_run, tmp_path):
  root, seeds, workdir, flags = mini_run
  base = [f"--images={root}", f"--seeds={seeds}", *flags]
  copies = {}
  for name, file, text in (
    ("answers", "answers.jsonl", json.dumps(GOOD) + "\ngarbage\n" + json.dumps(GOOD) + "\n"),
    ("journal", folder_run.JOURNAL, "[1, 2]\n" + json.dumps(GOOD) + "\n"),
  ):
    copies[name] = tmp_path / name
    shutil.copytree(workdir, copies[name])
    (copies[name] / folder_run.RUN_DIR / file).write_text(text)
  garbage_weights = tmp_path / "weights.pth"
  garbage_weights.write_bytes(b"garbage")
  weights = ["--features=pretrained", "--model=resnet50", "--image_size=32"]
  cases = {
    "answers": ([*base, f"--workdir={copies['answers']}"], "answers.jsonl line 2 is not JSON"),
    "journal": ([*base, f"--workdir={copies['journal']}"], "submitted.jsonl line 1: a JSON list"),
    "missing init": (
      [*base, f"--workdir={tmp_path / 'w1'}", *weights, f"--init={tmp_path / 'nope.pth'}"],
      "nope.pth' is not a file",
    ),
    "garbage init": (
      [*base, f"--workdir={tmp_path / 'w2'}", *weights, f"--init={garbage_weights}"],
      "weights.pth",
    ),
  }
  processes = {name: _run_label(args) for name, (args, _) in cases.items()}
  try:
    outputs = {name: p.communicate(timeout=300)[0] for name, p in processes.items()}
  finally:
    for p in processes.values():
      if p.poll() is None:
        p.kill()
  for name, (_, expected) in cases.items():
    out = outputs[name]
    assert processes[name].returncode == 2, (name, out)
    assert "Traceback" not in out and "Labeling page" not in out, (name, out)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], (name, out)
  for name in ("answers", "journal"):
    assert "fix that line or delete it" in outputs[name]


def _damaged_copy(workdir, tmp_path):
  """A copy of the run whose checkpoint 1 has a damaged array file (metadata intact): the
  restore fails in TensorStore while the reads of the other arrays are still pending."""
  copy = tmp_path / "damaged"
  shutil.copytree(workdir, copy)
  data = sorted((copy / folder_run.RUN_DIR / "checkpoints" / "1" / "state" / "d").iterdir())
  assert data, "expected the OCDBT data files of checkpoint 1"
  for path in data:
    path.write_bytes(b"garbage")
  return str(copy)


def _closed_loop_callback_error():
  """What TensorStore's done-callback raises once Orbax closed its loop: a real one."""
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(lambda: None)
  except RuntimeError as error:
    return types.SimpleNamespace(
      exc_type=RuntimeError, exc_value=error, exc_traceback=error.__traceback__, object=None
    )
  raise AssertionError("a closed loop accepted a callback")


def test_no_event_loop_is_closed_noise_after_a_damaged_checkpoint(mini_run, tmp_path, monkeypatch):
  """The commands' unraisable hook drops exactly the callbacks that hit a closed asyncio loop
  (what the pending reads of a refused restore raise, 0 to 8 of them depending on timing);
  anything else still reaches the previous hook."""
  from rare_jax.infra import teardown_noise

  reported = []
  monkeypatch.setattr(sys, "unraisablehook", reported.append)
  teardown_noise.ignore_closed_event_loop_callbacks()
  teardown_noise.ignore_closed_event_loop_callbacks()  # once only: not wrapped twice
  sys.unraisablehook(_closed_loop_callback_error())
  assert reported == []
  other = types.SimpleNamespace(exc_value=RuntimeError("other"), exc_traceback=None)
  sys.unraisablehook(other)
  late = ValueError("Event loop is closed")  # the same words from elsewhere: reported
  sys.unraisablehook(types.SimpleNamespace(exc_value=late, exc_traceback=None))
  assert [r.exc_value for r in reported] == [other.exc_value, late]
  del reported[:]
  _, _, workdir, _ = mini_run
  with pytest.raises(ValueError, match="checkpoint step 1 in .* cannot be restored"):
    predict.load_scorer(_damaged_copy(workdir, tmp_path), log=lambda _: None)
  time.sleep(1.0)  # the pending reads finish (their callbacks, if any, are dropped)
  assert reported == []


def test_predict_on_a_damaged_checkpoint_exits_2_with_one_line(mini_run, tmp_path):
  root, _, workdir, _ = mini_run
  damaged = _damaged_copy(workdir, tmp_path)
  result = subprocess.run(
    [sys.executable, "-m", "rare_jax.predict", f"--workdir={damaged}", f"--images={root}"]
    + [f"--out={tmp_path / 'x.csv'}"],
    cwd=REPO,
    env=_env(devices=8),  # as the report: more pending reads, more noise
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
  assert "cannot be restored" in result.stderr


def test_classify_exits_2_on_an_unknown_model_or_unusable_weights(images, tmp_path, capsys):
  image = str(images / "a" / "0.png")
  assert classify.classify_files([image], model="vgg16") == 2
  assert "vgg16" in capsys.readouterr().err
  garbage = tmp_path / "weights.pth"
  garbage.write_bytes(b"garbage")
  assert classify.classify_files([image], model="resnet50", init=str(garbage)) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ") and "weights.pth" in err


# --- 11: seed file names with commas --------------------------------------------------------


def test_a_seed_file_with_commas_in_its_name_and_a_list_file(images, tmp_path):
  comma = images / "b" / "x,y.png"
  _png(comma, seed=9)
  source = folder.open_folder(images)
  comma_id = source.paths.index("b/x,y.png")
  assert folder.resolve_seeds(source, str(comma)) == ([comma_id], [])  # taken whole
  listed = tmp_path / "seeds.txt"
  outside = tmp_path / "out,side.png"
  _png(outside, seed=10)
  listed.write_text(f"{comma}\n\n{images / 'a' / '0.png'}\n{outside}\n")
  ids, outside_files = folder.resolve_seeds(source, f"@{listed}")
  assert ids == sorted([comma_id, source.paths.index("a/0.png")])
  assert outside_files == [str(outside)]
  two = f"{images / 'a' / '0.png'},{images / 'a' / '1.png'}"  # the comma list still works
  assert folder.resolve_seeds(source, two)[0] == [0, 1]
  with pytest.raises(ValueError, match="does not exist.*--seeds=@LIST"):
    folder.resolve_seeds(source, f"{comma},{images / 'a' / '0.png'}")
  # A labeling run takes them (and takes them again on a restart).
  config = folder_run.make_config(budget=1, batch_size=1, feature_dim=2, image_size=4)
  for spec in (str(comma), str(comma), f"@{listed}"):
    workdir = tmp_path / ("run_list" if spec.startswith("@") else "run_comma")
    run = folder_run.prepare_folder_run(
      str(workdir), images=str(images), seeds=spec, config=config, log=lambda _: None
    )
    assert source.paths.index("b/x,y.png") in run.seed_ids[0].tolist()
  # The run remembers the files @LIST named: a restart with another list is refused.
  listed.write_text(f"{comma}\n")
  with pytest.raises(ValueError, match="started with other seeds"):
    folder_run.prepare_folder_run(
      str(tmp_path / "run_list"),
      images=str(images),
      seeds=f"@{listed}",
      config=config,
      log=lambda _: None,
    )


# --- decoding memory: one pixel budget for all threads; symlinks swapped in; @LIST size -------


class _LoadMeter:
  """Wraps PIL's `ImageFile.load` (where a file's pixels are decoded): the most pixels being
  loaded at once by all threads, and the size of every image loaded."""

  def __init__(self, monkeypatch, seconds=0.02):
    from PIL import ImageFile

    self.lock, self.now, self.peak, self.sizes = threading.Lock(), 0, 0, []
    original = ImageFile.ImageFile.load

    def load(image):
      if not image.tile:
        return original(image)  # already decoded: no pixels to count
      pixels = image.size[0] * image.size[1]
      with self.lock:
        self.now += pixels
        self.peak = max(self.peak, self.now)
        self.sizes.append(image.size)
      try:
        time.sleep(seconds)  # a slow decode, so that threads overlap
        return original(image)
      finally:
        with self.lock:
          self.now -= pixels

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def _decode_on_threads(files, threads, fn=folder.decode_image):
  errors = []

  def work():
    try:
      for file in files:
        fn(file)
    except Exception as error:  # re-raised in the test's thread
      errors.append(error)

  workers = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
  for worker in workers:
    worker.start()
  for worker in workers:
    worker.join(LIMIT_S)
  assert not any(worker.is_alive() for worker in workers), "decodes still waiting (deadlock?)"
  if errors:
    raise errors[0]


def _rgba_png(path, size=100):
  rgba = np.zeros((size, size, 4), np.uint8)
  rgba[..., 0], rgba[: size // 2, :, 3] = 255, 255
  Image.fromarray(rgba, "RGBA").save(path)


def test_concurrent_decodes_stay_within_the_process_wide_pixel_budget(tmp_path, monkeypatch):
  files = []
  for k in range(6):  # 100 x 100 = 10,000 pixels each; RGBA ones go through the compositing
    files.append(str(tmp_path / f"{k}.png"))
    (_rgba_png if k % 2 else _png)(files[-1], size=100)
  monkeypatch.setattr(folder, "DECODE_BUDGET_PIXELS", 25_000, raising=False)
  meter = _LoadMeter(monkeypatch)
  _decode_on_threads(files, threads=8)
  assert 10_000 <= meter.peak <= 25_000, f"{meter.peak} pixels decoding at once"
  source = _within(LIMIT_S, folder.open_folder, tmp_path, image_size=8, num_threads=8)
  assert len(source) == 6 and source.resized.shape == (6, 8, 8, 3)
  assert meter.peak <= 25_000 and folder._BUDGET.in_flight == 0
  assert folder._BUDGET.peak <= max(25_000, folder.MAX_IMAGE_PIXELS)


def test_an_image_over_the_budget_still_decodes_alone(tmp_path, monkeypatch):
  files = [str(tmp_path / f"{k}.png") for k in range(3)]
  for k, file in enumerate(files):
    _png(file, seed=k, size=100)
  monkeypatch.setattr(folder, "DECODE_BUDGET_PIXELS", 5_000, raising=False)
  meter = _LoadMeter(monkeypatch)
  assert _within(LIMIT_S, folder.decode_image, files[0]).size == (100, 100)
  _decode_on_threads(files, threads=4)  # each over the budget: one at a time, none refused
  assert meter.peak == 10_000, f"{meter.peak} pixels decoding at once"
  assert folder._BUDGET.in_flight == 0


def _swap_for_symlink(path, target):
  os.remove(path)
  os.symlink(target, path)


def test_a_symlink_out_of_the_folder_swapped_in_after_the_scan_is_refused(images, monkeypatch):
  outside = images.parent / "outside.png"
  _png(outside, seed=99)
  os.symlink(images / "a" / "0.png", images / "b" / "link_in.png")  # inside: kept
  source = folder.open_folder(images)
  assert "b/link_in.png" in source.paths
  np.testing.assert_array_equal(
    source[source.paths.index("b/link_in.png")]["image"], source[0]["image"]
  )
  _swap_for_symlink(source.file_path(0), outside)
  with pytest.raises(ValueError, match="no longer decodes.*outside the folder"):
    source[0]
  assert folder.decode_image(source.file_path(0)).size == (12, 12)  # no folder: followed
  # Swapped between the scan and the decoding pass of open_folder: listed as skipped.
  scan = folder.list_image_files

  def scan_then_swap(root):
    found = scan(root)
    _swap_for_symlink(os.path.join(root, "a", "1.png"), outside)
    return found

  monkeypatch.setattr(folder, "list_image_files", scan_then_swap)
  skipped = dict(folder.open_folder(images).skipped)
  assert "outside the folder" in skipped["a/0.png"] and "outside the folder" in skipped["a/1.png"]


def test_a_symlink_swapped_in_as_the_file_is_opened_is_refused(images, monkeypatch):
  outside = images.parent / "outside.png"
  _png(outside, seed=99)
  source = folder.open_folder(images)
  path = source.file_path(2)
  real_open = os.open

  def swap_then_open(name, flags, *args, **kwargs):  # after any check of the path, before open
    if os.fspath(name).endswith("2.png") and not os.path.islink(path):
      _swap_for_symlink(path, outside)
    return real_open(name, flags, *args, **kwargs)

  monkeypatch.setattr(os, "open", swap_then_open)
  with pytest.raises(ValueError, match="no longer decodes"):
    source[2]


def test_a_seed_list_file_over_the_size_or_line_limit_is_refused(tmp_path):
  big = tmp_path / "big.txt"
  big.write_bytes(b"x" * (1 << 20) + b"\n")
  with pytest.raises(ValueError, match=r"big\.txt.*over 1048576 bytes"):
    _within(LIMIT_S, folder.seed_paths, f"@{big}")
  many = tmp_path / "many.txt"
  many.write_text("a\n" * 100_001)
  with pytest.raises(ValueError, match=r"many\.txt.*100001 lines.*at most 100000"):
    folder.seed_paths(f"@{many}")
  many.write_text("a\n" * 100_000)
  assert len(folder.seed_paths(f"@{many}")) == 100_000
