"""Pool images as the labeling app serves them: checked where they are when served, bounded.

A pool file may change after the run was prepared (the folder is the person's own, and other
programs may write to it). So every `GET /image/<id>` checks again what it reads:

- the file is opened where it resolves to now (`os.path.realpath`) with `O_NOFOLLOW` and
  `O_NONBLOCK` (a FIFO swapped in cannot block the request), and that open file must be a
  regular file (`fstat`) that lies under the images folder's real root, taken when the session
  was created; a seed outside the folder must still be the file its path named then. On Linux
  (and macOS) the path of the opened descriptor itself is checked, so a directory swapped for a
  symlink between the check and the open is refused too;
- a file is read (into one buffer, at most `MAX_IMAGE_BYTES`) and decoded (only the JPEG and
  PNG readers, at most `MAX_IMAGE_PIXELS` pixels) only while holding one of `DECODE_SLOTS`
  slots, so at most DECODE_SLOTS files are in memory at once whatever the number of requests
  (a file grown to gigabytes, or a decompression bomb, costs a refusal, not the server's
  memory).

Two sizes are served: thumbnails (`thumbnail`, at most THUMBNAIL_SIZE on their longest side)
and enlarged images (`large`, the image at its own resolution up to LARGE_SIZE on its longest
side: the page shows it shrunk to the window, never stretched). Both go through the same
checks, slots and bounds.

Refusals raise `ValueError` (the server answers 410). Served images are cached by the identity of
the file read (device, inode, size, modification time) and the size, so a replaced file is checked
and read again, never answered from the cache of the file it replaced.
"""

from __future__ import annotations

import collections
import io
import os
import stat
import sys
import threading
from typing import Any

from PIL import Image

from rare_jax.data import folder

# Longest side of the images the app serves (re-encoded; the originals are never sent).
THUMBNAIL_SIZE = 256
# Largest image file read to make a thumbnail (bigger ones are refused, not read).
MAX_IMAGE_BYTES = 128 * 1024 * 1024
# Largest image decoded: the folder scan's bound (so every image of the pool can be shown),
# whatever PIL's own setting is. Files are read and decoded at most DECODE_SLOTS at a time.
MAX_IMAGE_PIXELS = folder.MAX_IMAGE_PIXELS
# Longest side of the enlarged images (`large`): a large screen's; smaller images keep theirs.
LARGE_SIZE = 2048
DECODE_SLOTS = 2
CACHE_SIZE = 1024
LARGE_CACHE_SIZE = 16  # enlarged images are up to ~1 MB each

_OPEN_FLAGS = (
  os.O_RDONLY
  | getattr(os, "O_NOFOLLOW", 0)
  | getattr(os, "O_NONBLOCK", 0)
  | getattr(os, "O_CLOEXEC", 0)
  | getattr(os, "O_BINARY", 0)
)


class PoolImages:
  """Thumbnails of a run's pool images, by id.

  Args:
    run: a `folder_run.FolderRun` (its `manifest` and `file_path`). Where the images folder
      and the seeds outside it resolve to is taken now: files are served from there only.
  """

  def __init__(self, run: Any):
    self._run = run
    self._real_root = os.path.realpath(run.manifest["root"])
    seeds_outside = range(int(run.manifest["num_folder_images"]), run.pool_size)
    self._outside = {i: os.path.realpath(run.file_path(i)) for i in seeds_outside}
    self._cache: collections.OrderedDict[tuple, tuple[bytes, str]] = collections.OrderedDict()
    self._large: collections.OrderedDict[tuple, tuple[bytes, str]] = collections.OrderedDict()
    self._lock = threading.Lock()
    self._decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)

  def thumbnail(self, image_id: int) -> tuple[bytes, str]:
    """(bytes, mimetype) of pool image `image_id`, re-encoded at most THUMBNAIL_SIZE wide.

    Raises:
      IndexError: no such image id in this run's pool.
      ValueError: the file is gone, resolves outside where the pool was, is not a regular file,
        is over MAX_IMAGE_BYTES or MAX_IMAGE_PIXELS, or no longer decodes.
    """
    return self._serve(image_id, THUMBNAIL_SIZE, self._cache, CACHE_SIZE)

  def large(self, image_id: int) -> tuple[bytes, str]:
    """(bytes, mimetype) of pool image `image_id` to see it large: its own resolution, at most
    LARGE_SIZE on its longest side; checked and bounded as `thumbnail` (same errors)."""
    return self._serve(image_id, LARGE_SIZE, self._large, LARGE_CACHE_SIZE)

  def _serve(self, image_id: int, size: int, cache, cache_size: int) -> tuple[bytes, str]:
    path = self._run.file_path(image_id)
    fd = self._open(image_id, path)
    try:
      info = os.fstat(fd)
      key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
      cached = self._cached(cache, key)
      if cached is not None:
        return cached
      with self._decode_slots:  # before reading: waiting requests hold no file in memory
        cached = self._cached(cache, key)  # made while this request waited for its slot
        if cached is not None:
          return cached
        result = _encode_thumbnail(_read_at_most(fd, MAX_IMAGE_BYTES, path), path, size)
        with self._lock:  # cached before the slot is free: a request waiting for it finds it
          cache[key] = result
          while len(cache) > cache_size:
            cache.popitem(last=False)
        return result
    finally:
      os.close(fd)

  def _cached(self, cache, key: tuple) -> tuple[bytes, str] | None:
    with self._lock:
      cached = cache.get(key)
      if cached is not None:
        cache.move_to_end(key)
      return cached

  def _open(self, image_id: int, path: str) -> int:
    """A descriptor of the regular file `path` resolves to, if it is where the pool was."""
    real = os.path.realpath(path)
    if not self._allowed(image_id, real):
      raise ValueError(f"{path} now resolves outside the images folder; not served")
    try:
      fd = os.open(real, _OPEN_FLAGS)
    except OSError as error:
      raise ValueError(f"{path} cannot be opened ({error.strerror or error})") from None
    try:
      info = os.fstat(fd)
      if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file any more; not served")
      if info.st_size > MAX_IMAGE_BYTES:
        raise ValueError(
          f"{path} is {info.st_size} bytes, over the {MAX_IMAGE_BYTES} the app reads; not served"
        )
      opened = _path_of(fd)
      if opened is not None and not self._allowed(image_id, opened):
        raise ValueError(f"{path} changed while it was opened; not served")
    except BaseException:
      os.close(fd)
      raise
    return fd

  def _allowed(self, image_id: int, real: str) -> bool:
    if image_id in self._outside:  # a seed outside the folder: the file it named
      return real == self._outside[image_id]
    return os.path.commonpath([real, self._real_root]) == self._real_root


def _path_of(fd: int) -> str | None:
  """Where the open file `fd` is (the kernel's answer), or None where it cannot be asked."""
  if sys.platform.startswith("linux"):
    try:
      return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
      return None
  if sys.platform == "darwin":
    import fcntl

    try:
      path = fcntl.fcntl(fd, fcntl.F_GETPATH, b"\0" * 1024)
      return os.fsdecode(path.rstrip(b"\0"))
    except (OSError, AttributeError):
      return None
  return None


def _read_at_most(fd: int, limit: int, path: str) -> io.BytesIO:
  """The whole file, read straight into one buffer (no second copy), or ValueError once it has
  grown past `limit` bytes."""
  buffer = io.BytesIO()
  size = min(os.fstat(fd).st_size, limit) + 1  # one byte more: sees a file that has grown
  allocated = total = 0
  with io.FileIO(fd, "rb", closefd=False) as file:
    while True:
      if total == size:  # full: the file grew after fstat
        size = min(2 * size, limit + 1)
      if allocated < size:
        buffer.seek(size - 1)
        buffer.write(b"\0")  # grows the buffer to `size` bytes in place
        allocated = size
      with buffer.getbuffer() as view, view[total:size] as window:
        count = file.readinto(window)
      if not count:
        break
      total += count
      if total > limit:
        raise ValueError(f"{path} is over the {limit} bytes the app reads; not served")
  buffer.truncate(total)
  buffer.seek(0)
  return buffer


def _encode_thumbnail(data: io.BytesIO, path: str, size: int = THUMBNAIL_SIZE) -> tuple[bytes, str]:
  try:  # the header only, and only the JPEG and PNG readers (as the folder scan)
    with Image.open(data, formats=("JPEG", "PNG")) as header:
      width, height = header.size
  except Exception as error:
    raise ValueError(f"{path} no longer decodes: {error}") from None
  if width * height > MAX_IMAGE_PIXELS:
    raise ValueError(
      f"{path} is {width}x{height} pixels, over the {MAX_IMAGE_PIXELS} the app decodes; not served"
    )
  try:
    data.seek(0)
    image = folder.decode_image(data)  # PIL reads a file object like a path
  except Exception as error:
    raise ValueError(f"{path} no longer decodes: {error}") from None
  image.thumbnail((size, size), Image.Resampling.LANCZOS)  # shrinks only, never enlarges
  buffer = io.BytesIO()
  if max(image.size) <= 128:  # small images (icons, MNIST-like): lossless
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "image/png"
  image.save(buffer, format="JPEG", quality=88)
  return buffer.getvalue(), "image/jpeg"
