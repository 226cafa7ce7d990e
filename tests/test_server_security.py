"""The labeling server against hostile files and clients: pool images checked as they are served
(a symlink or FIFO swapped in, a file grown huge), JSON bodies validated (deep nesting, unknown
fields, chunked bodies over the limit), idle and half-sent connections closed, and a bounded
number of connections served at once.

A small example folder with the pixel-PCA stand-in (as in test_webapp.py); the session is not
started (no loop, no JAX work): every check here happens before the loop is involved. Requests
that need a real socket (chunked bodies, timeouts, connection bounds) go to a `server.Server` on
127.0.0.1, with short timeouts and loops that stop by themselves.
"""

import http.client
import json
import os
import select
import shutil
import socket
import threading
import time

import pytest
from test_webapp import TOKEN, post

from rare_jax.data import folder
from rare_jax.webapp import folder_run, server
from rare_jax.webapp.session import LabelingSession


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
  """(app, run, outside): a session on a small folder, and a directory outside it."""
  base = tmp_path_factory.mktemp("pool")
  images, seed_files = folder.write_example_folder(base, per_class=3, rare_count=4, num_seeds=2)
  config = folder_run.make_config(budget=10, batch_size=5, feature_dim=8, image_size=16)
  run = folder_run.prepare_folder_run(
    str(base / "run"), images=images, seeds=",".join(seed_files), config=config, log=lambda _: None
  )
  session = LabelingSession(run, log=lambda _: None)  # not started: nothing runs in the loop
  outside = base / "outside"
  outside.mkdir()
  return server.create_app(session, token=TOKEN), run, outside


def _image(client, image_id):
  return client.get(f"/image/{image_id}?token={TOKEN}")


def _folder_id(run, prefix):
  """The first folder image (not an outside seed) whose relative path starts with `prefix`."""
  paths = run.manifest["paths"][: run.manifest["num_folder_images"]]
  return next(i for i, p in enumerate(paths) if p.startswith(prefix))


def _secret_png(outside, name="secret.png"):
  """An image outside the folder that must never be served (a 300x300 red square)."""
  from PIL import Image

  path = outside / name
  Image.new("RGB", (300, 300), (255, 0, 0)).save(path)
  return path


# Item 8: pool images are checked where they resolve to when served, and bounded.


def test_an_image_swapped_for_a_symlink_out_of_the_folder_is_refused(pool):
  app, run, outside = pool
  client = app.test_client()
  secret = _secret_png(outside)
  victim = _folder_id(run, "Bag/")
  assert _image(client, victim).status_code == 200  # served (and cached) before the swap
  other = victim + 1
  assert run.manifest["paths"][other].startswith("Bag/")
  for image_id in (victim, other):  # `other` was never served: nothing cached
    path = run.file_path(image_id)
    os.remove(path)
    os.symlink(secret, path)
    response = _image(client, image_id)
    assert response.status_code == 410, (image_id, response.status_code)
    assert "outside the images folder" in response.get_json()["error"]
    assert response.mimetype == "application/json"
  # A symlink to another image inside the folder is still served (the scan allows it too).
  inside = _folder_id(run, "Coat/")
  target = run.file_path(_folder_id(run, "Dress/"))
  os.remove(run.file_path(inside))
  os.symlink(target, run.file_path(inside))
  response = _image(client, inside)
  assert response.status_code == 200 and response.data.startswith(b"\x89PNG")


def test_a_folder_swapped_for_a_symlink_out_of_the_folder_is_refused(pool):
  app, run, outside = pool
  client = app.test_client()
  image_id = _folder_id(run, "Shirt/")
  shirt = os.path.dirname(run.file_path(image_id))
  elsewhere = outside / "Shirt"
  elsewhere.mkdir()
  for name in os.listdir(shirt):  # the same names, other (secret) content
    _secret_png(elsewhere, name)
  shutil.rmtree(shirt)
  os.symlink(elsewhere, shirt)
  response = _image(client, image_id)
  assert response.status_code == 410 and "outside" in response.get_json()["error"]


def test_an_image_swapped_for_a_fifo_is_refused_without_blocking(pool):
  """On the code before the fix, the request blocked in open() for ever: run it in a thread."""
  app, run, _ = pool
  client = app.test_client()
  image_id = _folder_id(run, "Pullover/")
  path = run.file_path(image_id)
  os.remove(path)
  os.mkfifo(path)
  result = {}
  thread = threading.Thread(target=lambda: result.update(response=_image(client, image_id)))
  thread.start()
  try:
    thread.join(10)
    assert not thread.is_alive(), "GET /image of a FIFO still blocked after 10 s"
    response = result["response"]
    assert response.status_code == 410 and "not a regular file" in response.get_json()["error"]
  finally:
    if thread.is_alive():  # unblock the reader: a writer that opens and closes at once
      try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
      except OSError:
        pass
      thread.join(10)


def test_an_image_grown_past_the_size_limit_is_refused_unread(pool):
  app, run, _ = pool
  client = app.test_client()
  image_id = _folder_id(run, "Trouser/")
  path = run.file_path(image_id)
  with open(path, "r+b") as f:  # sparse: 1 GiB of zeros after the PNG, no disk used
    f.truncate(1 << 30)
  started = time.monotonic()
  response = _image(client, image_id)
  assert response.status_code == 410, response.status_code
  assert "bytes" in response.get_json()["error"]
  assert time.monotonic() - started < 5  # refused from its size, not read


def test_decoded_pixels_are_bounded(pool, monkeypatch):
  from rare_jax.webapp import pool_images  # the module that serves them (new with the fix)

  app, run, _ = pool
  client = app.test_client()
  image_id = _folder_id(run, "Sneaker/")
  assert _image(client, image_id).status_code == 200  # 28x28: served
  monkeypatch.setattr(pool_images, "MAX_IMAGE_PIXELS", 28 * 28 - 1)
  response = _image(client, image_id + 1)
  assert response.status_code == 410 and "pixels" in response.get_json()["error"]
  monkeypatch.setattr(pool_images, "MAX_IMAGE_BYTES", 100)
  response = _image(client, image_id + 2)
  assert response.status_code == 410 and "bytes" in response.get_json()["error"]


# Item 12: request bodies.


def test_deeply_nested_json_is_a_400_not_a_500(pool):
  app, _, _ = pool
  client = app.test_client()
  for data in ("[" * 8000 + "]" * 8000, '{"serial": ' + "[" * 7000 + "]" * 7000 + "}"):
    for path in ("/api/answer", "/api/undo", "/api/submit", "/api/deep_update"):
      response = client.post(f"{path}?token={TOKEN}", data=data, content_type="application/json")
      assert response.status_code == 400, (path, response.status_code)
      assert response.get_json()["status"] == 400


def test_bodies_must_have_exactly_the_expected_fields(pool):
  app, _, _ = pool
  client = app.test_client()
  # deep_update takes {} only (what the page sends); a pixel-PCA run then refuses it: 409.
  for body in ([], "x", 1, None, {"x": 1}, {"serial": 1}, {"after_round": "1"}):
    response = post(client, "/api/deep_update", body)
    assert response.status_code == 400, (body, response.status_code)
  for data, content_type in (("{not json", "application/json"), ("{}", "text/plain")):
    response = client.post(f"/api/deep_update?token={TOKEN}", data=data, content_type=content_type)
    assert response.status_code == 400, (data, content_type)
  response = post(client, "/api/deep_update", {})
  assert response.status_code == 409 and "pretrained features" in response.get_json()["error"]
  # The other endpoints: unknown fields and wrong types are 400; well-formed ones reach the
  # labeler (409: no batch is open in a session that was not started).
  answer = {"serial": 1, "category": 0, "id": 0, "answer": True}
  for body in (
    dict(answer, pad="x"),
    dict(answer, answer=1),
    dict(answer, id=True),
    {k: v for k, v in answer.items() if k != "serial"},
  ):
    assert post(client, "/api/answer", body).status_code == 400, body
  assert post(client, "/api/answer", answer).status_code == 409
  for path in ("/api/undo", "/api/submit"):
    assert post(client, path, {"serial": 1, "extra": 0}).status_code == 400
    assert post(client, path, {"serial": 1.0}).status_code == 400
    assert post(client, path, {"serial": 1}).status_code == 409


@pytest.fixture
def live_server(pool):
  """A real server on 127.0.0.1 (port 0) with a 1 s read timeout and 8 connections."""
  app, _, _ = pool
  http_server = server.Server(app, read_timeout=1.0, max_connections=8)
  http_server.start()
  yield http_server
  http_server.shutdown()


def _raw_request(port, data, timeout=10.0):
  """Sends `data` on a new connection; returns (status, body) of the response."""
  with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
    connection.sendall(data)
    response = http.client.HTTPResponse(connection)
    response.begin()
    return response.status, response.read()


def _chunked(body, size=1000):
  pieces = [body[i : i + size] for i in range(0, len(body), size)]
  return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def test_chunked_bodies_over_the_limit_are_413(live_server):
  head = (
    f"POST /api/undo?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
  ).encode()
  # A valid object padded past the limit: Werkzeug alone would cut it at the limit and parse it.
  padded = b'{"serial": 1}' + b" " * (server.MAX_REQUEST_BYTES + 100)
  status, body = _raw_request(live_server.port, head + _chunked(padded))
  assert status == 413, (status, body)
  assert json.loads(body)["status"] == 413
  exactly = b'{"serial": 1}'.ljust(server.MAX_REQUEST_BYTES)  # at the limit: read whole
  status, body = _raw_request(live_server.port, head + _chunked(exactly))
  assert status == 409, (status, body)  # reached the labeler: nothing to undo
  status, body = _raw_request(live_server.port, head + _chunked(b'{"serial": 1}', size=4))
  assert status == 409, (status, body)
  declared = (
    f"POST /api/undo?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
    f"application/json\r\nContent-Length: {len(padded)}\r\n\r\n"
  ).encode()
  assert _raw_request(live_server.port, declared + padded)[0] == 413


# Item 13: idle connections, half-sent requests, concurrent connections.


def _handler_threads():
  return sum("process_request_thread" in t.name for t in threading.enumerate())


def _closed_by_server(connections, deadline):
  """Reads every connection until the server closes it or `deadline` passes.

  Returns (indices of the closed ones, {index: bytes received}, most handler threads seen).
  """
  replies = {i: b"" for i in range(len(connections))}
  closed = set()
  max_threads = 0
  while len(closed) < len(connections) and time.monotonic() < deadline:
    max_threads = max(max_threads, _handler_threads())
    open_ones = [c for i, c in enumerate(connections) if i not in closed]
    readable, _, _ = select.select(open_ones, [], [], 0.1)
    for connection in readable:
      i = connections.index(connection)
      try:
        data = connection.recv(65536)
      except OSError:  # a reset counts as closed
        data = b""
      replies[i] += data
      if not data:
        closed.add(i)
  return closed, replies, max_threads


def test_idle_and_half_sent_connections_are_closed_and_bounded(live_server):
  port = live_server.port
  connections = []
  try:
    for _ in range(50):  # idle: connected, nothing sent
      connections.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    started = time.monotonic()
    closed, replies, max_threads = _closed_by_server(connections, started + 10)
    assert len(closed) == 50, f"{50 - len(closed)} idle connections still open after 10 s"
    busy = [i for i, reply in replies.items() if reply.startswith(b"HTTP/1.1 503")]
    assert len(busy) >= 50 - 8, len(busy)  # beyond the 8 served at once: 503 at once
    assert b'"status": 503' in replies[busy[0]]
    assert max_threads <= 8, max_threads
  finally:
    for connection in connections:
      connection.close()

  half_sent = [
    f"GET /api/state?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode(),  # no blank line
    (
      f"POST /api/undo?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
      "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    ).encode(),  # 1 byte of a 100-byte body
  ]
  connections = []
  try:
    for data in half_sent:
      connection = socket.create_connection(("127.0.0.1", port), timeout=5)
      connection.sendall(data)
      connections.append(connection)
    started = time.monotonic()
    closed, replies, _ = _closed_by_server(connections, started + 10)
    assert len(closed) == len(half_sent), f"half-sent requests still open after 10 s: {replies}"
    assert time.monotonic() - started < 8
  finally:
    for connection in connections:
      connection.close()

  # Afterwards the server answers as usual, and its threads are gone.
  status, body = _raw_request(port, f"GET /api/state?token={TOKEN} HTTP/1.1\r\n\r\n".encode())
  assert status == 200 and json.loads(body)["phase"]
  deadline = time.monotonic() + 5
  while _handler_threads() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert _handler_threads() == 0


def test_server_settings_are_checked(pool):
  app, _, _ = pool
  for settings in ({"read_timeout": 0}, {"max_connections": 0}, {"max_connections": 1.5}):
    with pytest.raises(ValueError, match=next(iter(settings))):
      server.Server(app, **settings)


# Review follow-up: slowloris (a request trickled byte by byte), pool images read only in a
# decode slot and held once, images revalidated by the browser.


_TRICKLED = {
  "header": f"GET /api/state?token={TOKEN} HTTP/1.1\r\nX-Pad: ",
  "body": (
    f"POST /api/undo?token={TOKEN} HTTP/1.1\r\nContent-Type: application/json\r\n"
    'Content-Length: 1000\r\n\r\n{"serial": 1'
  ),
}


def _trickle(port, deadline, part="header", interval=0.3):
  """Sends a request up to `part`, then one byte of it every `interval` s, never ending it.

  Returns the seconds until the server closed the connection, or None if it was still open at
  `deadline` (time.monotonic()).
  """
  with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
    started = time.monotonic()
    connection.sendall(_TRICKLED[part].encode())
    while time.monotonic() < deadline:
      readable, _, _ = select.select([connection], [], [], interval)
      try:
        if readable and not connection.recv(65536):
          return time.monotonic() - started
        connection.sendall(b" ")
      except OSError:  # a reset, or a write after the close
        return time.monotonic() - started
  return None


def test_a_request_trickled_byte_by_byte_is_closed_at_its_deadline(pool):
  """Before the fix, each byte restarted the 1 s read timeout: the connection stayed open (the
  Server took no request_deadline; without it, the trickle was still open after 6 s)."""
  app, _, _ = pool
  http_server = server.Server(app, read_timeout=1.0, request_deadline=2.0, max_connections=3)
  http_server.start()
  try:
    results = []
    until = time.monotonic() + 6
    threads = [  # every slot: two in the headers, one in the body
      threading.Thread(target=lambda p=part: results.append(_trickle(http_server.port, until, p)))
      for part in ("header", "header", "body")
    ]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join(10)
    assert len(results) == 3 and None not in results, f"trickled requests still open: {results}"
    assert all(1.5 < seconds < 4 for seconds in results), results
    # The slots are free again: the owner is served.
    status, body = _raw_request(
      http_server.port, f"GET /api/state?token={TOKEN} HTTP/1.1\r\n\r\n".encode()
    )
    assert status == 200 and json.loads(body)["phase"]
  finally:
    http_server.shutdown()


def test_an_idle_connection_is_still_closed_after_the_read_timeout(pool):
  app, _, _ = pool
  http_server = server.Server(app, read_timeout=1.0, request_deadline=30.0)
  http_server.start()
  try:
    with socket.create_connection(("127.0.0.1", http_server.port), timeout=5) as connection:
      started = time.monotonic()
      closed, _, _ = _closed_by_server([connection], started + 10)
      assert closed == {0} and time.monotonic() - started < 3
  finally:
    http_server.shutdown()


def test_the_request_deadline_is_checked(pool):
  app, _, _ = pool
  for value in (0, -1, float("nan"), float("inf"), True, "60"):
    with pytest.raises(ValueError, match="request_deadline"):
      server.Server(app, request_deadline=value)


class _FakeRun:
  """What `pool_images.PoolImages` reads of a run: a folder of `count` noise PNGs."""

  def __init__(self, root, count, side=1024):
    import numpy as np
    from PIL import Image

    self.manifest = {"root": str(root), "num_folder_images": count}
    self.pool_size = count
    rng = np.random.default_rng(0)
    for i in range(count):  # noise: the PNG is about as big as its pixels (3 MiB)
      pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(self.file_path(i), compress_level=0)

  def file_path(self, i):
    return os.path.join(self.manifest["root"], f"{i}.png")


def test_image_files_are_read_only_in_a_decode_slot_and_held_once(tmp_path, monkeypatch):
  """Before the fix, a request read its whole file before waiting for a decode slot (the 4
  waiting here held 4 files: ~12 MiB), and joined the chunks read into a second copy (a peak of
  twice the file)."""
  import tracemalloc

  from rare_jax.webapp import pool_images

  run = _FakeRun(tmp_path, 5)
  size = os.path.getsize(run.file_path(0))
  monkeypatch.setattr(pool_images, "DECODE_SLOTS", 1)
  images = pool_images.PoolImages(run)
  tracemalloc.start()
  try:
    assert images._decode_slots.acquire(timeout=5)  # the only slot, taken
    try:
      baseline = tracemalloc.get_traced_memory()[0]
      threads = [threading.Thread(target=images.thumbnail, args=(i,)) for i in range(4)]
      for thread in threads:
        thread.start()
      time.sleep(1.0)  # what they read before they wait, they have read by now
      waiting = tracemalloc.get_traced_memory()[0] - baseline
    finally:
      images._decode_slots.release()
    for thread in threads:
      thread.join(30)
    assert waiting < size / 2, f"{waiting} bytes held by requests waiting for a slot"
    tracemalloc.reset_peak()
    baseline = tracemalloc.get_traced_memory()[0]
    data, mimetype = images.thumbnail(4)
    peak = tracemalloc.get_traced_memory()[1] - baseline
  finally:
    tracemalloc.stop()
  assert mimetype == "image/jpeg" and data.startswith(b"\xff\xd8")
  assert size < peak < 1.5 * size, (peak, size)  # the file once, not twice


def test_the_pixel_bound_is_the_folder_scans_whatever_pils_setting(monkeypatch):
  """Before the fix, the bound was 2 * PIL's setting at import: a TypeError at import when it was
  None, another bound than the scan's when it was changed."""
  import importlib.util

  from PIL import Image

  for setting in (None, 1000):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", setting)
    spec = importlib.util.find_spec("rare_jax.webapp.pool_images")
    module = importlib.util.module_from_spec(spec)  # a fresh import, not the one in use
    spec.loader.exec_module(module)
    assert module.MAX_IMAGE_PIXELS == folder.MAX_IMAGE_PIXELS


def test_only_the_jpeg_and_png_readers_see_a_pool_file(pool, monkeypatch):
  """Before the fix, the header check opened the file with every PIL reader."""
  from PIL import Image

  app, run, _ = pool
  client = app.test_client()
  calls = []
  original = Image.open

  def spy(fp, mode="r", formats=None):
    calls.append(formats)
    return original(fp, mode, formats)

  monkeypatch.setattr(Image, "open", spy)
  response = _image(client, _folder_id(run, "Sandal/"))
  assert response.status_code == 200
  assert calls and all(f is not None and set(f) <= {"JPEG", "PNG"} for f in calls), calls


def test_images_are_revalidated_by_the_browser(pool):
  """Before the fix, an image was cached for a day (`max-age=86400`): a file replaced or refused
  since was still shown from the browser's cache."""
  app, run, _ = pool
  client = app.test_client()
  image_id = _folder_id(run, "Ankle_boot/")
  response = _image(client, image_id)
  assert response.status_code == 200
  cache_control = response.headers["Cache-Control"]
  assert "no-cache" in cache_control and "private" in cache_control, cache_control
  assert "max-age" not in cache_control, cache_control
  etag = response.headers["ETag"]
  again = client.get(f"/image/{image_id}?token={TOKEN}", headers={"If-None-Match": etag})
  assert again.status_code == 304 and not again.data
  # Replaced by another image: served anew, with another ETag.
  other = run.file_path(_folder_id(run, "Sandal/"))
  path = run.file_path(image_id)
  os.remove(path)
  shutil.copyfile(other, path)
  replaced = client.get(f"/image/{image_id}?token={TOKEN}", headers={"If-None-Match": etag})
  assert replaced.status_code == 200 and replaced.headers["ETag"] != etag
  assert replaced.data == _image(client, _folder_id(run, "Sandal/")).data
