"""The labeling app's HTTP server (Flask on Werkzeug's threaded server): the page and a JSON API.

Every request must carry the run's access token, as `?token=` or the `X-Token` header
(compared in constant time); without it: 401. The one exception is `/favicon.ico`, which
browsers fetch on their own without the token: an empty 204. Routes:

    GET  /                  the page (static/index.html)
    GET  /app.js, /app.css  its script and style
    GET  /image/<id>        pool image <id> (an int), re-encoded; 404 for any other id
    GET  /image/<id>/large  the same image to see it large: its own resolution up to
                             pool_images.LARGE_SIZE on its longest side (same checks)
    GET  /api/state         {version, phase, serial, round, rounds, budget, categories: [{name,
                             labels_used, positives_found, query: [{id, path, answer}], top}]}
    POST /api/answer        {"serial", "category", "id", "answer": true|false}
    POST /api/undo          {"serial"}: takes back the last answer of the open batch
    POST /api/submit        {"serial"}: hands the complete batch to the loop
    POST /api/correct       {"category", "id", "answer"}: changes an answer of a submitted batch
                             (422 not answered in one, 409 unchanged or the run busy); the run
                             is re-derived from the corrected answers (session.correct)
    POST /api/finish        {}: writes the ranked results of the whole pool for every category
                             (exports.write_results); the state's "results" says where
                             (409 no model yet or the run busy)
    POST /api/deep_update   {}: a deep update after the batch being labeled (pretrained runs);
                             409 for pixel-PCA runs, one running, or no round left after it
    GET  /export/labels.csv, /export/labels.json   the labels given so far, as a download
                             (what `python -m rare_jax.export` writes)
    /audit.js, /api/audit...  the audit's routes (rare_jax/webapp/audit_routes.py, registered
                             after these)

POST bodies are JSON objects of exactly the fields shown (types checked; others, or nesting
deeper than Python's JSON decoder takes, are 400) of at most `max_request_bytes`, declared
(Content-Length) or chunked (413 beyond; a chunked body is read up to one byte past the limit).
Refusals are JSON `{"error": ...}` with a status that says why: 400 malformed, 401 token, 404
unknown image or route, 405 method, 409 conflict (stale batch, answered already, nothing to
undo, incomplete batch, no open batch), 410 an image file that is gone, no longer decodes, or
is refused as it is served (resolves outside the folder, not a regular file, over the size
limits of `pool_images`), 413 too large, 422 an id or category that is not queried, 503 all
connections busy, 507 a disk full when saving a submitted batch (the answers stay on the
page). Files are only ever reached through an image id of the run's pool: no request names a
path.

`Server` gives every connection `read_timeout` seconds per read or write (an idle or half-sent
request is closed after it), and every request `request_deadline` seconds in all to send its
request line, headers and body (a client trickling bytes slower than that is closed however
short its pauses), and serves at most `max_connections` at once (one thread each); a
connection beyond them is answered 503 at once and closed.

Images are sent `Cache-Control: private, no-cache` with an ETag of their bytes: the browser
asks again each time (a pool file may be replaced, or refused, after it was first served) and
gets a 304 without the image while it is unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import io
import json
import math
import numbers
import os
import pathlib
import socket
import string
import tempfile
import threading
import time
from typing import Any

import flask
from werkzeug import exceptions, serving

from rare_jax.webapp import audit_routes, exports
from rare_jax.webapp.labeler import AnswerRejected
from rare_jax.webapp.session import LabelingSession

STATIC = pathlib.Path(__file__).parent / "static"
MAX_REQUEST_BYTES = 16 * 1024
READ_TIMEOUT_S = 30.0  # per read or write on a connection: idle or half-sent ones are closed
REQUEST_DEADLINE_S = 60.0  # to read a request whole (line, headers, body): trickling ones closed
MAX_CONNECTIONS = 32  # connections served at once (a browser opens about 6 per host)
_URLSAFE = set(string.ascii_letters + string.digits + "-_")
_ASSETS = {
  "app.js": "text/javascript; charset=utf-8",
  "app.css": "text/css; charset=utf-8",
}
_SECURITY_HEADERS = {
  "Content-Security-Policy": (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
  ),
  "Referrer-Policy": "no-referrer",  # the token is in the URL: never send it elsewhere
  "X-Content-Type-Options": "nosniff",
  "X-Frame-Options": "DENY",
  "Cache-Control": "no-store",
}


def create_app(
  session: LabelingSession, *, token: str, max_request_bytes: int = MAX_REQUEST_BYTES
) -> flask.Flask:
  """The Flask app serving `session` to whoever holds `token`."""
  if len(token) < 16 or not set(token) <= _URLSAFE:
    raise ValueError("token must be at least 16 URL-safe characters (secrets.token_urlsafe)")
  app = flask.Flask(__name__, static_folder=None)
  app.config["MAX_CONTENT_LENGTH"] = max_request_bytes
  app.config["MAX_FORM_MEMORY_SIZE"] = max_request_bytes
  expected = token.encode()
  page = (STATIC / "index.html").read_text().replace("__TOKEN__", token)
  assets = {name: (STATIC / name).read_bytes() for name in _ASSETS}

  @app.before_request
  def _authenticate():
    if flask.request.path == "/favicon.ico" and flask.request.method in ("GET", "HEAD"):
      return flask.Response(status=204)  # no icon; asked without the token: no 401 noise
    given = flask.request.args.get("token") or flask.request.headers.get("X-Token") or ""
    if not hmac.compare_digest(given.encode(), expected):
      return _error(401, "missing or wrong access token: open the URL the server printed")
    return None

  @app.after_request
  def _headers(response):
    for name, value in _SECURITY_HEADERS.items():
      response.headers.setdefault(name, value)
    return response

  @app.errorhandler(exceptions.HTTPException)
  def _http_error(error):
    return _error(error.code or 500, error.description or error.name)

  @app.get("/")
  def index():
    return flask.Response(page, mimetype="text/html")

  @app.get("/<any('app.js', 'app.css'):name>")
  def asset(name):
    return flask.Response(assets[name], content_type=_ASSETS[name])

  @app.get("/image/<int:image_id>")
  @app.get("/image/<int:image_id>/<any('large'):size>")
  def image(image_id, size=None):
    try:
      data, mimetype = (session.large_image if size else session.image)(image_id)
    except IndexError:
      return _error(404, f"no image {image_id} in this run")
    except ValueError as error:
      return _error(410, str(error))
    # A pool file may be replaced (or refused) after it was served: the browser revalidates
    # every time, and the ETag (of the bytes served) spares it the image while it is unchanged.
    response = flask.Response(data, mimetype=mimetype)
    response.headers["Cache-Control"] = "private, no-cache"
    response.set_etag(hashlib.sha256(data).hexdigest()[:32])
    return response.make_conditional(flask.request)

  @app.get("/api/state")
  def state():
    return flask.jsonify(session.state())

  @app.post("/api/answer")
  def answer():
    body = _json_body({"serial": int, "category": int, "id": int, "answer": bool})
    session.labeler.set_answer(body["serial"], body["category"], body["id"], body["answer"])
    return flask.jsonify(session.state())

  @app.post("/api/undo")
  def undo():
    undone = session.labeler.undo(_json_body({"serial": int})["serial"])
    return flask.jsonify(dict(session.state(), undone=undone))

  @app.post("/api/submit")
  def submit():
    session.labeler.submit(_json_body({"serial": int})["serial"])
    return flask.jsonify(session.state())

  @app.post("/api/correct")
  def correct():
    body = _json_body({"category": int, "id": int, "answer": bool})
    corrected = session.correct(body["category"], body["id"], body["answer"])
    return flask.jsonify(dict(session.state(), corrected=corrected))

  @app.post("/api/finish")
  def finish():
    _json_body({})
    written = session.write_results()
    return flask.jsonify(dict(session.state(), written=written))

  @app.post("/api/deep_update")
  def deep_update():
    _json_body({})  # the page sends {}: anything else is a malformed request
    after_round = session.request_deep_update()
    return flask.jsonify(dict(session.state(), deep_update_after_round=after_round))

  @app.get("/export/labels.<any('csv', 'json'):fmt>")
  def export_labels(fmt):
    try:
      manifest, labels = exports.collect_labels(session.run.workdir)
      with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, f"labels.{fmt}")
        exports.write_labels(path, manifest, labels, fmt)
        data = pathlib.Path(path).read_bytes()
    except (ValueError, OSError) as error:
      return _error(500, f"cannot export the labels: {error}")
    mimetype = "text/csv; charset=utf-8" if fmt == "csv" else "application/json"
    response = flask.Response(data, mimetype=mimetype)
    response.headers["Content-Disposition"] = f'attachment; filename="labels.{fmt}"'
    return response

  @app.errorhandler(AnswerRejected)
  def _rejected(error):
    return _error(error.status, str(error))

  # The audit (its routes and page script: rare_jax/webapp/audit_routes.py), after the app's own
  # routes; the token check, headers and error handlers above apply to it too.
  app.register_blueprint(audit_routes.blueprint(session, json_body=_json_body))
  return app


class _BadRequest(AnswerRejected):
  def __init__(self, message: str):
    super().__init__(400, message)


def _json_body(fields: dict[str, type]) -> dict[str, Any]:
  """The request's JSON object, with exactly `fields` (name: int or bool), else 400."""
  if not flask.request.is_json:
    raise _BadRequest("expected a JSON object body (Content-Type: application/json)")
  data = _read_body(flask.request.max_content_length or MAX_REQUEST_BYTES)
  try:
    body = json.loads(data)
  except (ValueError, RecursionError):  # RecursionError: nested too deep to decode
    body = None
  if not isinstance(body, dict):
    raise _BadRequest("expected a JSON object body (Content-Type: application/json)")
  unknown = sorted(set(body) - set(fields))
  if unknown:
    raise _BadRequest(f"unknown fields {unknown}; expected only {sorted(fields)}")
  for key, kind in fields.items():
    value = body.get(key)
    if kind is bool and not isinstance(value, bool):
      raise _BadRequest(f"{key}={value!r}; expected true or false")
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
      raise _BadRequest(f"{key}={value!r}; expected an integer")
  return body


def _read_body(limit: int) -> bytes:
  """The request body, or 413 past `limit` bytes, declared or chunked.

  Werkzeug refuses a Content-Length over the limit, but cuts a chunked body at the limit
  silently (a padded body would pass as its first `limit` bytes): read it here instead, up to
  one byte past the limit.
  """
  request = flask.request
  if request.content_length is not None:
    if request.content_length > limit:
      raise exceptions.RequestEntityTooLarge()
    stream = request.stream  # ends at Content-Length
  elif "wsgi.input_terminated" in request.environ:  # chunked: the server finds its end
    stream = request.input_stream
  else:
    return b""
  data = bytearray()
  try:
    while len(data) <= limit:
      chunk = stream.read(limit + 1 - len(data))
      if not chunk:
        break
      data += chunk
  except OSError as error:  # a malformed chunk, a read timeout
    raise _BadRequest(f"could not read the request body ({error})") from None
  if len(data) > limit:
    raise exceptions.RequestEntityTooLarge()
  return bytes(data)


def _error(status: int, message: str) -> flask.Response:
  response = flask.jsonify({"error": message, "status": status})
  response.status_code = status
  return response


class _DeadlineReader(io.RawIOBase):
  """A connection's reading side whose reads all end by a deadline (besides `timeout` each).

  A socket timeout bounds one read only: a client sending a byte just before each timeout would
  hold the connection (and its slot) for ever. Every read here, down to each `recv` that a
  buffered `readline` makes, waits at most until `deadline` (time.monotonic()); past it, reads
  raise `TimeoutError` (socket.timeout) and `expired` stays set.
  """

  def __init__(self, connection: socket.socket, timeout: float):
    super().__init__()
    self._connection = connection
    self._timeout = timeout
    self.deadline = float("inf")
    self.expired = False

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    left = self.deadline - time.monotonic()
    if left <= 0:
      self.expired = True
      raise TimeoutError("the request was not sent whole before its deadline")
    self._connection.settimeout(min(self._timeout, left))
    try:
      return self._connection.recv_into(buffer)
    except TimeoutError:
      if self.deadline - time.monotonic() <= 0:
        self.expired = True
      raise
    finally:
      self._connection.settimeout(self._timeout)  # writes keep the per-write timeout


class _QuietHandler(serving.WSGIRequestHandler):
  """Logs no requests: their URLs carry the access token. Each request must be read whole
  within `request_deadline` seconds of its start (see `_DeadlineReader`)."""

  timeout = READ_TIMEOUT_S  # StreamRequestHandler.setup sets it on the connection
  request_deadline = REQUEST_DEADLINE_S

  def setup(self) -> None:
    super().setup()
    self.rfile.close()  # the plain socket file setup made: read through the deadline instead
    self._reader = _DeadlineReader(self.connection, self.timeout)
    self.rfile = io.BufferedReader(self._reader)

  def handle_one_request(self) -> None:
    if self._reader.expired:  # a request that ran out of time: never read what follows it
      self.close_connection = True
      return
    # From now: the wait for the request line (an idle connection, `timeout` at most) counts.
    self._reader.deadline = time.monotonic() + self.request_deadline
    super().handle_one_request()
    if self._reader.expired:
      self.close_connection = True

  def log_request(self, *args, **kwargs) -> None:
    pass

  def log_error(self, *args, **kwargs) -> None:
    pass  # http.server's errors quote the request line (the token); timeouts are routine


_BUSY = json.dumps({"error": "the server is busy: too many connections; retry", "status": 503})
_BUSY_RESPONSE = (
  "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
  f"Cache-Control: no-store\r\nConnection: close\r\nContent-Length: {len(_BUSY)}\r\n\r\n{_BUSY}"
).encode()


class _BoundedServer(serving.ThreadedWSGIServer):
  """Werkzeug's threaded server with at most `max_connections` connections served at once.

  A connection beyond them is answered 503 and closed from the accepting thread, without a
  thread of its own (so the threads stay bounded whatever clients do).
  """

  def __init__(self, host: str, port: int, app: flask.Flask, handler, *, max_connections: int):
    super().__init__(host, port, app, handler)
    self._slots = threading.BoundedSemaphore(max_connections)

  def process_request(self, request, client_address) -> None:
    if not self._slots.acquire(blocking=False):
      _refuse_busy(request)
      self.shutdown_request(request)
      return
    try:
      super().process_request(request, client_address)  # starts the connection's thread
    except BaseException:
      self._slots.release()
      raise

  def process_request_thread(self, request, client_address) -> None:
    try:
      super().process_request_thread(request, client_address)
    finally:
      self._slots.release()


def _refuse_busy(connection: socket.socket) -> None:
  try:
    connection.setblocking(False)
    for _ in range(4):  # what the client sent already: read, so closing sends no reset
      if not connection.recv(65536):
        break
  except OSError:
    pass  # nothing (more) to read now
  try:
    connection.settimeout(0.2)  # a fresh socket's send buffer takes it at once
    connection.sendall(_BUSY_RESPONSE)
  except OSError:
    pass


def check_address(host: str, port: int) -> None:
  """Fails early on an address `Server` could not serve on (it binds the same way).

  Raises:
    ValueError: a port outside 0..65535, a host that does not resolve, or one this machine
      cannot bind (not its address, port in use, a privileged port).
  """
  if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
    raise ValueError(f"--port={port}; expected 0..65535 (0 picks a free port)")
  family = serving.select_address_family(host, port)
  try:
    address = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, socket.IPPROTO_TCP)[0][4]
  except (OSError, UnicodeError) as error:  # socket.gaierror is an OSError
    raise ValueError(
      f"--host={host!r} does not resolve ({error}); expected an address of this machine, "
      "e.g. 127.0.0.1"
    ) from None
  with socket.socket(family, socket.SOCK_STREAM) as probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Werkzeug's server does
    try:
      probe.bind(address)
    except OSError as error:
      if error.errno == errno.EADDRINUSE:
        raise ValueError(f"--port={port} is in use on {host}; expected a free port or 0") from None
      raise ValueError(
        f"cannot serve on --host={host!r} --port={port} ({error.strerror or error}); expected "
        "an address of this machine (e.g. 127.0.0.1) and a port it may use"
      ) from None


class Server:
  """A threaded Werkzeug server for `app` on (host, port) in a background thread.

  Port 0 picks a free port; `url(token)` gives the address to open. Each connection gets
  `read_timeout` seconds per read or write, and each request `request_deadline` seconds to be
  read whole (line, headers, body), else it is closed; at most `max_connections` are served at
  once, and one beyond them is answered 503.
  """

  def __init__(
    self,
    app: flask.Flask,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    read_timeout: float = READ_TIMEOUT_S,
    request_deadline: float = REQUEST_DEADLINE_S,
    max_connections: int = MAX_CONNECTIONS,
  ):
    for name, seconds in (("read_timeout", read_timeout), ("request_deadline", request_deadline)):
      if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):
        raise ValueError(f"{name}={seconds!r}; expected a positive number of seconds")
      if not 0 < seconds < math.inf:  # NaN fails too
        raise ValueError(f"{name}={seconds!r}; expected a positive number of seconds")
    if isinstance(max_connections, bool) or not isinstance(max_connections, int):
      raise ValueError(f"max_connections={max_connections!r}; expected an integer >= 1")
    if max_connections < 1:
      raise ValueError(f"max_connections={max_connections!r}; expected an integer >= 1")
    # A handler class per server: Werkzeug sets protocol_version on it.
    handler = type(
      "_Handler",
      (_QuietHandler,),
      {"timeout": float(read_timeout), "request_deadline": float(request_deadline)},
    )
    self._server = _BoundedServer(host, port, app, handler, max_connections=max_connections)
    self.host = host
    self.port = self._server.server_port
    self._thread = threading.Thread(
      target=self._server.serve_forever, name="rare_jax-http", daemon=True
    )

  def url(self, token: str) -> str:
    host = f"[{self.host}]" if ":" in self.host else self.host
    return f"http://{host}:{self.port}/?token={token}"

  def start(self) -> None:
    self._thread.start()

  def shutdown(self) -> None:
    self._server.shutdown()
    self._thread.join(10)
