"""The labeling app's API: a batch advances the run; bad requests are refused and change nothing;
a server killed with SIGKILL after a submitted batch resumes with that batch's answers.

The image folder is written on the fly from the embedded Fashion-MNIST (Sandal is the rare
category). The in-process tests drive the Flask app with its test client; the kill/restart
test runs `python -m rare_jax.label` and talks to it over real HTTP on 127.0.0.1.
"""

import dataclasses
import errno
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from rare_jax.active import runner
from rare_jax.data import folder
from rare_jax.infra.checkpoint import CheckpointStore
from rare_jax.webapp import folder_run, server
from rare_jax.webapp.labeler import AnswerRejected, LabelingStopped, WebLabeler
from rare_jax.webapp.session import LabelingSession

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "test-token-0123456789abcdef"


def wait_for(predicate, what, timeout=120.0):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    value = predicate()
    if value:
      return value
    time.sleep(0.05)
  raise AssertionError(f"timed out waiting for {what}")


def truth(path):
  """The person's answer: Sandals, and the seed copies from outside the folder."""
  return path.startswith("Sandal/") or path.startswith("/")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
  out = tmp_path_factory.mktemp("example")
  return folder.write_example_folder(out, per_class=28, rare_count=20, num_seeds=5)


@pytest.fixture(scope="module")
def live(example, tmp_path_factory):
  """An in-process session on the example folder, served by the Flask test client."""
  images, seed_files = example
  workdir = str(tmp_path_factory.mktemp("run"))
  config = folder_run.make_config(budget=20, batch_size=5, feature_dim=16, image_size=16)
  lines = []
  run = folder_run.prepare_folder_run(
    workdir, images=images, seeds=",".join(seed_files), config=config, log=lines.append
  )
  session = LabelingSession(run, log=lines.append)
  app = server.create_app(session, token=TOKEN)
  session.start()
  client = app.test_client()
  wait_for(lambda: session.state()["phase"] == "labeling", "the first query")
  yield session, client, run
  session.stop()


def get_state(client):
  response = client.get("/api/state", headers={"X-Token": TOKEN})
  assert response.status_code == 200
  return response.get_json()


def post(client, path, body, token=TOKEN):
  return client.post(f"{path}?token={token}", json=body)


def files_of(run):
  out = {}
  for name in ("answers.jsonl", folder_run.JOURNAL):
    path = os.path.join(run.run_dir, name)
    out[name] = open(path).read() if os.path.exists(path) else None
  return out


def test_bad_requests_are_refused_and_leave_the_run_intact(live):
  session, client, run = live
  before = get_state(client)
  assert before["phase"] == "labeling" and before["round"] == 1
  files = files_of(run)
  serial = before["serial"]
  queried = [q["id"] for q in before["categories"][0]["query"]]
  unqueried = next(i for i in range(run.pool_size) if i not in queried)

  # The token: missing or wrong on every route (even unknown ones) -> 401.
  for path in ("/", "/app.js", "/api/state", f"/image/{queried[0]}", "/nope"):
    assert client.get(path).status_code == 401
    assert client.get(path + "?token=" + TOKEN[:-1] + "x").status_code == 401
  assert client.get("/", headers={"X-Token": "x" * len(TOKEN)}).status_code == 401
  refused = post(
    client,
    "/api/answer",
    {"serial": serial, "category": 0, "id": queried[0], "answer": True},
    token="wrong",
  )
  assert refused.status_code == 401 and "token" in refused.get_json()["error"]
  page = client.get("/?token=" + TOKEN)
  assert page.status_code == 200 and b"app.js?token=" + TOKEN.encode() in page.data
  assert "default-src 'none'" in page.headers["Content-Security-Policy"]
  assert page.headers["Referrer-Policy"] == "no-referrer"

  # An id that is not queried, a category that is not, malformed bodies.
  response = post(
    client, "/api/answer", {"serial": serial, "category": 0, "id": unqueried, "answer": True}
  )
  assert response.status_code == 422 and "not in the current query" in response.get_json()["error"]
  response = post(
    client, "/api/answer", {"serial": serial, "category": 1, "id": queried[0], "answer": True}
  )
  assert response.status_code == 422
  for body in (
    {"serial": serial, "category": 0, "id": queried[0], "answer": "yes"},
    {"serial": serial, "category": 0, "id": "../../etc/passwd", "answer": True},
    [1, 2],
  ):
    assert post(client, "/api/answer", body).status_code == 400
  assert (
    client.post(
      "/api/answer?token=" + TOKEN, data="{not json", content_type="application/json"
    ).status_code
    == 400
  )
  # A stale page (another batch's serial), nothing to undo, an incomplete batch.
  stale = post(
    client, "/api/answer", {"serial": serial - 1, "category": 0, "id": queried[0], "answer": True}
  )
  assert stale.status_code == 409 and "reload" in stale.get_json()["error"]
  assert post(client, "/api/undo", {"serial": serial}).status_code == 409
  assert post(client, "/api/submit", {"serial": serial}).status_code == 409
  # A repeated answer: refused until undone.
  first = post(
    client, "/api/answer", {"serial": serial, "category": 0, "id": queried[0], "answer": True}
  )
  assert first.status_code == 200 and first.get_json()["answered"] == 1
  again = post(
    client, "/api/answer", {"serial": serial, "category": 0, "id": queried[0], "answer": False}
  )
  assert again.status_code == 409 and "answered already" in again.get_json()["error"]
  undone = post(client, "/api/undo", {"serial": serial})
  assert undone.status_code == 200
  assert undone.get_json()["undone"] == {"category": 0, "id": queried[0], "answer": True}
  # Path traversal: only image ids of the pool are served; nothing else is a route.
  for path in (
    "/image/../../../../etc/passwd",
    "/image/..%2F..%2Fsetup.py",
    "/image/-1",
    f"/image/{run.pool_size}",
    "/image/1.5",
    "/..%2Fsetup.py",
    "/static/app.js",
    "/app.js/../../setup.py",
    "/image/0/../../../setup.py",
    "/folder_run.json",
  ):
    response = client.get(path + "?token=" + TOKEN)
    assert response.status_code == 404, path
    assert b"setuptools" not in response.data and b"root:" not in response.data
  # An oversized body.
  big = {"serial": serial, "category": 0, "id": queried[0], "answer": True, "pad": "x" * 20000}
  assert post(client, "/api/answer", big).status_code == 413
  assert client.delete("/api/state?token=" + TOKEN).status_code == 405

  after = get_state(client)
  assert after["answered"] == 0 and after["serial"] == serial and after["phase"] == "labeling"
  assert after["categories"] == before["categories"]
  assert files_of(run) == files
  assert session.running


def test_labeling_a_batch_advances_the_run(live):
  session, client, run = live
  state = get_state(client)
  serial = state["serial"]
  query = state["categories"][0]["query"]
  image = client.get(f"/image/{query[0]['id']}?token={TOKEN}")
  assert image.status_code == 200 and image.mimetype == "image/png"
  assert image.data.startswith(b"\x89PNG")
  answers = {q["id"]: truth(q["path"]) for q in query}
  for q in reversed(query):  # any order
    response = post(
      client,
      "/api/answer",
      {"serial": serial, "category": 0, "id": q["id"], "answer": answers[q["id"]]},
    )
    assert response.status_code == 200, response.get_json()
  response = post(client, "/api/submit", {"serial": serial})
  assert response.status_code == 200 and response.get_json()["phase"] == "updating"
  # Submitting twice, or answering the closed batch, is refused.
  assert post(client, "/api/submit", {"serial": serial}).status_code == 409
  state = wait_for(lambda: (s := get_state(client))["serial"] == serial + 1 and s, "round 2")
  category = state["categories"][0]
  assert state["round"] == 2 and state["phase"] == "labeling"
  assert category["labels_used"] == 5 and state["budget"] == 20
  assert category["positives_found"] == sum(answers.values())
  assert category["negatives"] == 5 - sum(answers.values())
  assert not {q["id"] for q in category["query"]} & set(answers)  # new images
  assert len(category["top"]) == 24 and state["model"]["has_model"]
  labeled = {t["id"]: t["label"] for t in category["top"] if t["label"] in ("yes", "no")}
  assert all(labeled[i] == ("yes" if answers[i] else "no") for i in labeled)
  records = runner.read_answers(os.path.join(run.run_dir, "answers.jsonl"))
  ids = records[1]["query_ids"][0]
  assert sorted(ids) == sorted(answers)
  assert records[1]["answers"][0] == [answers[i] for i in ids]


def test_a_full_disk_at_submit_says_so_and_keeps_the_answers(live, monkeypatch):
  session, client, run = live
  state = get_state(client)
  serial, query = state["serial"], state["categories"][0]["query"]
  for q in query:
    response = post(
      client, "/api/answer", {"serial": serial, "category": 0, "id": q["id"], "answer": False}
    )
    assert response.status_code == 200
  exists = os.path.exists(run.journal_path)
  journal_before = open(run.journal_path, "rb").read() if exists else b""
  real_fsync = os.fsync

  def fsync(fd):  # the journal's disk is full: its data cannot be made durable
    if os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(run.journal_path):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_fsync(fd)

  monkeypatch.setattr(os, "fsync", fsync)
  response = post(client, "/api/submit", {"serial": serial})
  assert response.status_code == 507, response.data
  error = response.get_json()["error"]
  assert "disk full (ENOSPC)" in error and "NOT saved" in error and run.journal_path in error
  assert open(run.journal_path, "rb").read() == journal_before  # no torn or unsaved line
  after = get_state(client)
  assert after["phase"] == "labeling" and after["serial"] == serial
  assert after["answered"] == len(query)  # the person's answers are still there
  monkeypatch.setattr(os, "fsync", real_fsync)  # space freed: submitting again works
  assert post(client, "/api/submit", {"serial": serial}).status_code == 200
  wait_for(lambda: get_state(client)["serial"] == serial + 1, "the next round")
  assert len(open(run.journal_path).read().splitlines()) == len(journal_before.splitlines()) + 1


def test_favicon_needs_no_token_and_nothing_else_does(live):
  _, client, _ = live
  for method in (client.get, client.head):
    response = method("/favicon.ico")
    assert response.status_code == 204 and response.data == b""
  for path in ("/favicon.ico/x", "/favicon.icox", "/api/state?x=/favicon.ico"):
    assert client.get(path).status_code == 401, path
  assert client.post("/favicon.ico").status_code == 401


def test_a_torn_journal_tail_is_repaired_on_open(tmp_path):
  """A batch half-written when the disk filled up (or the power went): the next batch must not
  be glued to it, or every later start fails on that line."""
  journal = str(tmp_path / "submitted.jsonl")
  first = {"query_ids": [[1, 2]], "answers": [[True, False]]}
  with open(journal, "w") as f:
    f.write(json.dumps(first) + "\n" + '{"query_ids": [[3, 4]], "answ')  # torn by ENOSPC
  labeler = WebLabeler(num_categories=1, journal_path=journal)
  result = {}
  thread = threading.Thread(target=lambda: result.update(answers=labeler.answer([[5, 6]])))
  thread.start()
  wait_for(lambda: labeler.snapshot()["phase"] == "labeling", "the query")
  serial = labeler.snapshot()["serial"]
  labeler.set_answer(serial, 0, 5, True)
  labeler.set_answer(serial, 0, 6, False)
  labeler.submit(serial)
  thread.join(10)
  # Before the fix the new batch was glued to the torn line: dropped with it (lost), and the
  # next batch after it made every start fail ("line 2 is not a submitted batch").
  reopened = WebLabeler(num_categories=1, journal_path=journal)
  watchdog = threading.Timer(10, reopened.close)
  watchdog.start()
  assert reopened.answer(np.array([[1, 2]])).tolist() == [[True, False]]
  assert reopened.answer(np.array([[5, 6]])).tolist() == [[True, False]]
  watchdog.cancel()
  assert [json.loads(line) for line in open(journal)] == [
    first,
    {"query_ids": [[5, 6]], "answers": [[True, False]]},
  ]


def test_default_category_names(tmp_path):
  for folders, expected in (
    ("Sandal", "Sandal"),
    ("sandals/seeds", "sandals"),
    ("My Birds/Examples", "My Birds"),
    ("runs/example/seeds", "the category"),
  ):
    (tmp_path / folders).mkdir(parents=True)
    assert folder_run.default_category_name(str(tmp_path / folders)) == expected, folders
  assert folder_run.default_category_name("a.png,b.png") == "the category"


def test_labeler_with_two_categories_and_its_journal(tmp_path):
  journal = str(tmp_path / "submitted.jsonl")
  labeler = WebLabeler(num_categories=2, journal_path=journal)
  query = np.array([[4, 9, 2], [7, 4, 1]])
  result = {}
  thread = threading.Thread(target=lambda: result.update(answers=labeler.answer(query)))
  thread.start()
  wait_for(lambda: labeler.snapshot()["phase"] == "labeling", "the query")
  serial = labeler.snapshot()["serial"]
  given = {(1, 1): True, (0, 9): True, (0, 4): False, (1, 7): False, (0, 2): True, (1, 4): True}
  for (category, image_id), value in given.items():
    labeler.set_answer(serial, category, image_id, value)
  with pytest.raises(AnswerRejected) as refused:
    labeler.set_answer(serial, 0, 7, True)  # queried for category 1 only
  assert refused.value.status == 422
  labeler.submit(serial)
  thread.join(10)
  expected = [[given[0, i] for i in query[0]], [given[1, i] for i in query[1]]]
  assert result["answers"].tolist() == expected
  # A restarted labeler answers the same query from its journal, without asking.
  reopened = WebLabeler(num_categories=2, journal_path=journal)
  watchdog = threading.Timer(10, reopened.close)  # were it to wait for a person: fail, not hang
  watchdog.start()
  assert reopened.answer(query).tolist() == expected
  watchdog.cancel()
  closer = threading.Timer(0.2, reopened.close)
  closer.start()
  with pytest.raises(LabelingStopped):
    reopened.answer(np.array([[5, 6, 8], [5, 6, 8]]))  # a new query: waits until closed
  assert reopened.snapshot()["phase"] == "stopped"


# Kill and restart: a real server in a subprocess.


def _env(tmp_path_factory):
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device, like a person's run
  # Compilations shared with tests/test_browser.py's server (same shapes), across xdist workers.
  base = tmp_path_factory.getbasetemp()
  env["JAX_COMPILATION_CACHE_DIR"] = str(
    (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax_cache"
  )
  return env


class Labeling:
  """`python -m rare_jax.label` in a subprocess, and HTTP calls to it."""

  def __init__(self, args, env):
    self.process = subprocess.Popen(
      [sys.executable, "-m", "rare_jax.label", *args],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    self.lines = []
    match = None
    for line in self.process.stdout:
      self.lines.append(line)
      match = re.search(r"(http://127\.0\.0\.1:(\d+))/\?token=(\S+)", line)
      if match:
        break
    assert match, "no URL printed:\n" + "".join(self.lines)
    self.url = match.group(0)
    self.port = int(match.group(2))
    self.token = match.group(3)
    threading.Thread(target=self._drain, daemon=True).start()

  def _drain(self):
    for line in self.process.stdout:
      self.lines.append(line)

  def request(self, method, path, body=None, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
    try:
      data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
      headers = {"X-Token": self.token, "Content-Type": "application/json", **(headers or {})}
      connection.request(method, path, body=data, headers=headers)
      response = connection.getresponse()
      return response.status, response.read()
    finally:
      connection.close()

  def call(self, path, body=None):
    status, data = self.request("GET" if body is None else "POST", path, body)
    assert status == 200, (status, data)
    return json.loads(data)

  def wait_phase(self, predicate, what, timeout=120.0):
    def check():
      if self.process.poll() is not None:
        raise AssertionError(
          f"the server exited ({self.process.returncode}):\n" + "".join(self.lines)
        )
      state = self.call("/api/state")
      return state if predicate(state) else None

    return wait_for(check, what, timeout)


@pytest.mark.slow
def test_sigkill_after_a_submitted_batch_then_restart_keeps_it(example, tmp_path, tmp_path_factory):
  images, seed_files = example
  workdir = tmp_path / "run"
  args = [
    f"--images={images}",
    f"--seeds={os.path.dirname(seed_files[0])}",
    f"--workdir={workdir}",
    "--budget=10",
    "--batch_size=5",
    "--features=pixel_pca",
    "--feature_dim=16",
    "--image_size=16",
  ]
  env = _env(tmp_path_factory)
  first = Labeling(args, env)
  try:
    state = first.wait_phase(lambda s: s["phase"] == "labeling", "the first query")
    # Over a real socket: traversal and oversized requests are refused too.
    status, body = first.request("GET", "/../../../../etc/passwd")
    assert status == 404 and b"root:" not in body
    status, _ = first.request("GET", "/image/%2e%2e%2f%2e%2e%2fsetup.py")
    assert status == 404
    status, _ = first.request("POST", "/api/answer", b"{" + b" " * 200_000 + b"}")
    assert status == 413
    status, _ = first.request("GET", "/api/state", headers={"X-Token": "nope"})
    assert status == 401
    serial = state["serial"]
    query = state["categories"][0]["query"]
    answers = {q["id"]: truth(q["path"]) for q in query}
    assert any(answers.values()) and not all(answers.values())
    for q in query:
      first.call(
        "/api/answer", {"serial": serial, "category": 0, "id": q["id"], "answer": answers[q["id"]]}
      )
    assert first.call("/api/submit", {"serial": serial})["phase"] == "updating"
    first.process.send_signal(signal.SIGKILL)  # right after the page was told it is saved
    first.process.wait(30)
  finally:
    if first.process.poll() is None:
      first.process.kill()
  assert first.process.returncode == -signal.SIGKILL

  second = Labeling(args, env)
  try:
    state = second.wait_phase(lambda s: s["phase"] == "labeling", "the next query")
    category = state["categories"][0]
    assert state["round"] == 2, "".join(second.lines)
    assert category["labels_used"] == 5
    assert category["positives_found"] == sum(answers.values())
    second.process.send_signal(signal.SIGTERM)
    assert second.process.wait(60) == 0, "".join(second.lines)
  finally:
    if second.process.poll() is None:
      second.process.kill()
  run_dir = workdir / folder_run.RUN_DIR
  record = runner.read_answers(str(run_dir / "answers.jsonl"))[1]
  assert dict(zip(record["query_ids"][0], record["answers"][0], strict=True)) == answers
  pool = np.load(workdir / "features" / "pool.npy")
  manifest = json.loads((workdir / folder_run.MANIFEST).read_text())
  like = runner.abstract_state(pool, np.asarray(manifest["seed_ids"]), 0)
  with CheckpointStore(run_dir / "checkpoints") as store:
    assert store.latest_step() == 1
    state, _ = store.restore(1, like)
  labels = np.asarray(state.labels)[0]
  assert {i: bool(labels[i]) for i in answers} == answers
  assert int((labels >= 0).sum()) == 5 + len(seed_files)


def _run_label(args, env, timeout=120):
  return subprocess.Popen(
    [sys.executable, "-m", "rare_jax.label", *args],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    encoding="utf-8",
    errors="replace",
  )


@pytest.mark.slow
def test_bad_flags_and_files_are_clear_errors_before_any_work(
  example, live, tmp_path, tmp_path_factory
):
  """Each case: one line naming the bad value, no traceback, the right exit status, and (for
  the address) nothing computed first. Run as parallel subprocesses."""
  images, seed_files = example
  _, _, run = live
  base = [
    f"--images={images}",
    f"--seeds={','.join(seed_files)}",
    "--budget=20",
    "--batch_size=5",
    "--features=pixel_pca",
    "--feature_dim=16",
    "--image_size=16",
  ]
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  bad_config = tmp_path / "bad_config"
  bad_config.mkdir()
  (bad_config / "config.json").write_text("{not json")
  # A copy of the live run whose newest checkpoint is damaged.
  damaged = tmp_path / "damaged"
  shutil.copytree(run.workdir, damaged)
  checkpoints = damaged / folder_run.RUN_DIR / "checkpoints"
  newest = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  for path in (checkpoints / str(newest)).rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  # Unreadable files whose names a strict ASCII terminal cannot print as is.
  odd = tmp_path / "odd_names"
  shutil.copytree(images, odd)
  (odd / "caf\u00e9.png").write_bytes(b"not a png")
  open(os.fsencode(odd) + b"/\xff\xfe.png", "wb").write(b"not a png either")
  work = str(tmp_path / "work")
  env = _env(tmp_path_factory)
  cases = {
    "port too big": ([*base, f"--workdir={work}1", "--port=70000"], 1, "--port=70000"),
    "negative port": ([*base, f"--workdir={work}2", "--port=-1"], 1, "--port=-1"),
    "unknown host": (
      [*base, f"--workdir={work}3", "--host=no-such-host.invalid"],
      1,
      "--host='no-such-host.invalid' does not resolve",
    ),
    "foreign host": ([*base, f"--workdir={work}4", "--host=192.0.2.1"], 1, "cannot serve"),
    "workdir a file": ([*base, f"--workdir={a_file}"], 2, "is a file"),
    "corrupt config": ([*base, f"--workdir={bad_config}"], 2, str(bad_config / "config.json")),
    "damaged checkpoint": ([*base, f"--workdir={damaged}"], 2, f"checkpoint step {newest} in"),
    "odd names, ascii terminal": (
      [f"--images={odd}", f"--seeds={','.join(seed_files)}", f"--workdir={work}5", "--budget=900"],
      2,
      "needs a pool of at least",
    ),
  }
  ascii_env = dict(env, PYTHONIOENCODING="ascii")
  processes = {
    name: _run_label(args, ascii_env if "ascii" in name else env)
    for name, (args, _, _) in cases.items()
  }
  try:
    outputs = {name: p.communicate(timeout=240)[0] for name, p in processes.items()}
  finally:
    for p in processes.values():
      if p.poll() is None:
        p.kill()
  for name, (_, status, expected) in cases.items():
    out = outputs[name]
    assert processes[name].returncode == status, (name, out)
    assert "Traceback" not in out and expected in out, (name, out)
    assert "error: " in out, (name, out)
  for name in ("port too big", "negative port", "unknown host", "foreign host"):
    assert "reading the images" not in outputs[name], (name, outputs[name])
  assert "\\xff\\xfe.png" in outputs["odd names, ascii terminal"]
  assert "caf\\xe9.png" in outputs["odd names, ascii terminal"]


def test_two_categories_in_one_session_keep_their_own_counts(example, tmp_path):
  """`--category NAME=SEEDS` twice: each question names its category, and each category has
  its own queries, labels used and positives found."""
  images, seed_files = example
  bags = sorted(os.listdir(os.path.join(images, "Bag")))[:3]
  config = folder_run.make_config(budget=10, batch_size=5, feature_dim=16, image_size=16)
  run = folder_run.prepare_folder_run(
    str(tmp_path / "run"),
    images=images,
    config=config,
    categories=[
      ("Sandal", ",".join(seed_files)),
      ("Bag", ",".join(os.path.join(images, "Bag", b) for b in bags)),
    ],
    log=lambda _: None,
  )
  session = LabelingSession(run, log=lambda _: None)
  app = server.create_app(session, token=TOKEN)
  session.start()
  try:
    client = app.test_client()
    state = wait_for(lambda: (s := get_state(client))["phase"] == "labeling" and s, "a query")
    assert [c["name"] for c in state["categories"]] == ["Sandal", "Bag"]
    assert [c["seeds"] for c in state["categories"]] == [5, 3]
    serial = state["serial"]
    answers = {}
    for c, prefix in ((0, "Sandal/"), (1, "Bag/")):
      query = state["categories"][c]["query"]
      assert len(query) == 5
      for q in query:
        answers[c, q["id"]] = q["path"].startswith(prefix)
        body = {"serial": serial, "category": c, "id": q["id"], "answer": answers[c, q["id"]]}
        assert post(client, "/api/answer", body).status_code == 200
    assert post(client, "/api/submit", {"serial": serial}).status_code == 200
    state = wait_for(lambda: (s := get_state(client))["serial"] == serial + 1 and s, "round 2")
    for c in (0, 1):
      category = state["categories"][c]
      found = sum(v for (k, _), v in answers.items() if k == c)
      assert category["labels_used"] == 5 and category["positives_found"] == found
      assert category["negatives"] == 5 - found
    assert state["budget"] == 10
  finally:
    session.stop()


def test_deep_update_requests_are_durable_and_refused_where_they_cannot_run(live, tmp_path):
  """A pixel-PCA run refuses the page's deep update (409). On a pretrained run a request
  targets the batch being labeled, is on disk before it is acknowledged (a restarted session
  reads it), is not repeated, and a request with no round left after it is refused."""
  _, client, _ = live
  response = post(client, "/api/deep_update", {})
  assert response.status_code == 409 and "pretrained features" in response.get_json()["error"]
  assert get_state(client)["model"]["deep_update"]["status"] == "unavailable"

  images, seed_files = folder.write_example_folder(tmp_path, per_class=4, rare_count=6, num_seeds=3)
  config = folder_run.make_config(
    budget=10, batch_size=5, features="pretrained", image_size=32, embed_batch_size=16
  )
  run = folder_run.prepare_folder_run(
    str(tmp_path / "run"),
    images=images,
    seeds=",".join(seed_files),
    config=config,
    log=lambda _: None,
  )
  session = LabelingSession(run, log=lambda _: None)  # not started: no loop, no training
  assert session.state()["model"]["deep_update"]["status"] == "idle"
  assert session.request_deep_update() == 1
  assert session.request_deep_update() == 1
  deep_update = session.state()["model"]["deep_update"]
  assert deep_update["status"] == "queued" and "round 1" in deep_update["message"]
  with open(os.path.join(run.run_dir, "deep_requests.json")) as f:
    assert json.load(f) == {"after_rounds": [1]}
  restarted = LabelingSession(run, log=lambda _: None)
  assert [restarted._update_after(r) for r in (1, 2)] == [True, False]
  # Round 1 decided: the next request would follow round 2, the last one.
  with pytest.raises(AnswerRejected, match="no round is left"):
    restarted.request_deep_update()
  # --deep_every=1: an update after every round but the last, without any request.
  every = folder_run.make_config(
    budget=15, batch_size=5, features="pretrained", image_size=32, deep_every=1
  )
  session = LabelingSession(dataclasses.replace(run, config=every), log=lambda _: None)
  session._requests = set()
  assert [session._update_after(r) for r in (1, 2, 3)] == [True, True, False]
  # A pretrained run started before deep updates (no deep settings) resumes without them.
  older = folder_run.make_config(
    budget=10, batch_size=5, features="pretrained", image_size=32, deep_updates=False
  )
  assert "deep_epochs" not in older and "deep_epochs" in config
  session = LabelingSession(dataclasses.replace(run, config=older), log=lambda _: None)
  assert session.state()["model"]["deep_update"]["status"] == "unavailable"
  with pytest.raises(AnswerRejected, match="started before deep updates"):
    session.request_deep_update()


@pytest.mark.slow
def test_sigkill_during_a_deep_update_then_restart_resumes_it(tmp_path, tmp_path_factory):
  """A deep update asked from the page, killed (SIGKILL) after its first epoch: the restarted
  server redoes that round's update from the logged answers, resuming at epoch 2 (epoch 1 is
  not trained again), then asks round 2 on the new features."""
  images, seed_files = folder.write_example_folder(tmp_path, per_class=4, rare_count=6, num_seeds=3)
  workdir = tmp_path / "run"
  args = [
    f"--images={images}",
    f"--seeds={os.path.dirname(seed_files[0])}",
    f"--workdir={workdir}",
    "--budget=10",
    "--batch_size=5",
    "--features=pretrained",
    "--image_size=32",
    "--deep_epochs=2",
  ]
  env = _env(tmp_path_factory)
  first = Labeling(args, env)
  try:
    state = first.wait_phase(lambda s: s["phase"] == "labeling", "the first query")
    assert first.call("/api/deep_update", {})["deep_update_after_round"] == 1
    serial = state["serial"]
    query = state["categories"][0]["query"]
    for q in query:
      body = {"serial": serial, "category": 0, "id": q["id"], "answer": truth(q["path"])}
      first.call("/api/answer", body)
    first.call("/api/submit", {"serial": serial})
    wait_for(
      lambda: any("deep update 1: epoch 1/2" in line for line in first.lines),
      "the first epoch of the update",
      timeout=600,
    )
    running = first.call("/api/state")
    assert running["phase"] == "updating" and running["model"]["deep_update"]["status"] == "running"
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(30)
  finally:
    if first.process.poll() is None:
      first.process.kill()
  assert first.process.returncode == -signal.SIGKILL

  second = Labeling(args, env)
  try:
    state = second.wait_phase(
      lambda s: s["phase"] == "labeling" and s["round"] == 2, "round 2 after the update", 600
    )
    log = "".join(second.lines)
    assert "deep update 1: epoch 2/2" in log and "deep update 1: epoch 1/2" not in log, log
    assert state["model"]["deep_update"]["status"] == "done"
    assert state["categories"][0]["labels_used"] == 5
    second.process.send_signal(signal.SIGTERM)
    assert second.process.wait(60) == 0, "".join(second.lines)
  finally:
    if second.process.poll() is None:
      second.process.kill()
  run_dir = workdir / folder_run.RUN_DIR
  assert (run_dir / "features" / "v1" / "pool" / "meta.json").exists()
  with CheckpointStore(run_dir / "checkpoints") as store:
    assert store.latest_step() == 1
