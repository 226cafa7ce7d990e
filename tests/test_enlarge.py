"""Seeing an image large (issue 26, item 6): `GET /image/<id>/large` serves the pool image at its
own resolution up to `pool_images.LARGE_SIZE` on its longest side, through the same checks as
the thumbnails (a symlink out of the folder, a file that is not regular, too many pixels: 410).
"""

import io
import os

import flask
import numpy as np
import pytest
from PIL import Image

from rare_jax.webapp import pool_images, server

TOKEN = "test-token-0123456789abcdef"


class _Run:
  """What `pool_images.PoolImages` reads of a run."""

  def __init__(self, root, names):
    self.manifest = {"root": str(root), "num_folder_images": len(names)}
    self.pool_size = len(names)
    self.names = names

  def file_path(self, i):
    if not 0 <= i < self.pool_size:
      raise IndexError(i)
    return os.path.join(self.manifest["root"], self.names[i])


class _Session:
  def __init__(self, run):
    self.images = pool_images.PoolImages(run)

  def image(self, image_id):
    return self.images.thumbnail(image_id)

  def large_image(self, image_id):
    return self.images.large(image_id)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (600, 900, 3), np.uint8)).save(root / "photo.jpg")
  Image.fromarray(rng.integers(0, 256, (2000, 3000, 3), np.uint8)).save(root / "big.png")
  Image.fromarray(rng.integers(0, 256, (28, 28, 3), np.uint8)).save(root / "tiny.png")
  outside = tmp_path_factory.mktemp("outside") / "secret.png"
  Image.fromarray(rng.integers(0, 256, (300, 300, 3), np.uint8)).save(outside)
  os.symlink(outside, root / "link.png")
  os.mkfifo(root / "fifo.png")
  Image.fromarray(rng.integers(0, 256, (1000, 1200, 3), np.uint8)).save(root / "wide.png")
  run = _Run(root, ["photo.jpg", "big.png", "tiny.png", "link.png", "fifo.png", "wide.png"])
  with pytest.MonkeyPatch.context() as patch:  # no run files here for the audit's routes
    patch.setattr(server.audit_routes, "blueprint", lambda *_, **__: flask.Blueprint("a", "a"))
    return server.create_app(_Session(run), token=TOKEN).test_client()


def _size(data):
  with Image.open(io.BytesIO(data)) as image:
    return image.size


def test_large_images_keep_their_resolution_up_to_the_limit(client):
  for image_id, thumbnail, large in ((0, (256, 171), (900, 600)), (1, (256, 171), (2048, 1365))):
    small = client.get(f"/image/{image_id}?token={TOKEN}")
    assert small.status_code == 200 and _size(small.data) == thumbnail
    response = client.get(f"/image/{image_id}/large?token={TOKEN}")
    assert response.status_code == 200, response.get_json()
    assert _size(response.data) == large and response.mimetype == "image/jpeg"
    assert response.headers["Cache-Control"] == "private, no-cache" and response.headers["ETag"]
  tiny = client.get(f"/image/2/large?token={TOKEN}")  # never stretched
  assert tiny.status_code == 200 and _size(tiny.data) == (28, 28) and tiny.mimetype == "image/png"


def test_large_images_go_through_the_same_checks(client):
  assert client.get("/image/0/large").status_code == 401  # the token
  for path in ("/image/3/large", "/image/4/large"):  # out of the folder; not a regular file
    response = client.get(f"{path}?token={TOKEN}")
    assert response.status_code == 410, path
    assert b"secret" not in response.data or b"not served" in response.data
  for path in ("/image/6/large", "/image/-1/large", "/image/0/huge", "/image/0/large/x"):
    assert client.get(f"{path}?token={TOKEN}").status_code == 404, path


def test_large_images_respect_the_pixel_bound(client, monkeypatch):
  monkeypatch.setattr(pool_images, "MAX_IMAGE_PIXELS", 1000 * 1000)
  response = client.get(f"/image/5/large?token={TOKEN}")  # never served (not cached)
  assert response.status_code == 410 and "over the 1000000" in response.get_json()["error"]
