"""A folder of one's own JPEG/PNG images as a random-access source with stable ids.

`open_folder(root)` walks `root` recursively and keeps every `.jpg`/`.jpeg`/`.png` file
(case-insensitive; hidden files and folders are left out) that decodes. Ids are positions in
the sorted list of the readable files' relative POSIX paths, so the same folder always gives
the same ids. A file that does not decode (corrupt, truncated, not an image, a symlink out of
the folder, over `MAX_IMAGE_PIXELS` pixels) or that is not a regular file (a FIFO, a socket, a
device, a broken symlink: found with `os.stat`, never opened) is skipped and listed in
`source.skipped` / `source.report()`, never an error.

Every image file of the project is read through `decode_image`: it opens the file without
blocking (`O_NONBLOCK`) and refuses what the open file is, if not a regular file (so a file
swapped for a FIFO after the scan cannot hang a reader), reads only JPEG/PNG and refuses an
image over `MAX_IMAGE_PIXELS` before decoding it, whatever PIL's own `MAX_IMAGE_PIXELS` is.
Decodes share one process-wide pixel budget (`DECODE_BUDGET_PIXELS`): a decode waits until the
pixels being decoded by other threads plus its own fit, so a folder of images at the size cap
read on many threads cannot take memory in proportion to the thread count. A path read for a
folder (`root=`) must still resolve inside it when opened: a symlink swapped in after the scan
is refused.

Like `sources.Source`, a `FolderSource` has `len`, `source[i] -> {"image": uint8[H, W, 3],
"label": int}` (RGB, EXIF orientation applied, transparency composited on white),
`__getitems__`, `labels()`, `class_names` and `num_classes`, so `pipeline.iterate_batches`
reads it (pass an `image_size`: the images' sizes vary). With `labels_from_subfolders=True`
the label of `cats/a/x.jpg` is the index of `cats` among the sorted top-level sub-folders,
for evaluation; files directly in `root` get -1.

`open_folder(..., image_size=S)` also keeps every image resized to `S x S` RGB
(`source.resized`, read in the same decoding pass that checks the files), which is what the
pixel-PCA stand-in features of a folder run are computed from (`resize_image`).

A list of image files instead of a folder (`--images=@LIST`: `open_images`, `read_image_list`).
LIST is read by the `.csv` rule: a file whose name ends in `.csv` (any case) is a CSV file whose
header row names a `path` column (other columns are ignored; a UTF-8 byte order mark is
allowed); any other file holds one path per line (blank lines ignored, a line's spaces kept, a
final CR dropped). Paths are absolute or relative to the base folder (`base`: `--base=DIR`,
default the list file's folder); `..` is resolved on the text of the path. The list file is read
as `--seeds=@LIST` is (a regular file only, at most `MAX_IMAGE_LIST_BYTES` bytes and
`MAX_IMAGE_LIST_LINES` lines, else an error; `read_list_file`), bytes that are not UTF-8 kept as
they are in the names. Every entry must be a regular `.jpg`/`.jpeg`/`.png` file that decodes: an
entry that is missing, not a regular file (a FIFO, a directory, a device, a symlink loop), of
another extension, listed twice (the same path, or another path to the same file) or that does
not decode is skipped and listed in `source.skipped` like a folder's skipped files, never an
error. The source's root is the base folder.

One path convention for a run's images, the pool and the seeds alike (`stored_path`): relative
to the root (POSIX `/`) for a file that lies in it, both as written and once symlinks are
resolved; absolute (normalised, symlinks kept) for any other file. Ids follow that text: the
relative paths sorted, then the absolute ones sorted, so a list of every image of a folder, with
the folder as base, gives the folder's ids.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import hashlib
import io
import itertools
import os
import pathlib
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
IMAGE_FORMATS = ("JPEG", "PNG", "MPO")  # MPO: a JPEG with extra frames (some cameras)
UNLABELED = -1
# The most pixels an image may have to be decoded: PIL's decompression-bomb error threshold
# (2x its default MAX_IMAGE_PIXELS of about 89 MP), applied here whatever PIL's setting is
# (PIL only warns between 1x and 2x, and checks nothing when MAX_IMAGE_PIXELS is None).
MAX_IMAGE_PIXELS = 2 * 89_478_485
# The most pixels all threads of the process may be decoding at once (a decode of an RGBA image
# peaks at about 8 bytes a pixel, others at 4-8); one image over it is still decoded, alone.
DECODE_BUDGET_PIXELS = 2 * MAX_IMAGE_PIXELS
# An @LIST file of seed paths is refused over this size or this many lines.
MAX_SEED_LIST_BYTES = 1 << 20
MAX_SEED_LIST_LINES = 100_000
# An @LIST file of images (--images=@LIST) is refused over this size or this many lines.
MAX_IMAGE_LIST_BYTES = 64 << 20
MAX_IMAGE_LIST_LINES = 1_000_000
# Files decoded per progress step.
_CHUNK = 256
# A FIFO opened for reading without O_NONBLOCK waits for a writer forever (and a thread
# blocked in open() cannot be interrupted): never wait, check what was opened instead.
_OPEN_FLAGS = (
  os.O_RDONLY
  | getattr(os, "O_NONBLOCK", 0)
  | getattr(os, "O_NOCTTY", 0)
  | getattr(os, "O_CLOEXEC", 0)
  | getattr(os, "O_BINARY", 0)
)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class _PixelBudget:
  """Pixels being decoded by all threads, kept within `DECODE_BUDGET_PIXELS` (read at each
  request, so tests can lower it); waiters go first come, first served, so a large image is not
  starved by a stream of small ones.

  Attributes:
    in_flight: pixels being decoded now.
    peak: the most pixels ever in flight at once (for tests).
  """

  def __init__(self):
    self._condition = threading.Condition()
    self._queue: collections.deque[int] = collections.deque()
    self._tickets = itertools.count()
    self.in_flight = 0
    self.peak = 0

  @contextlib.contextmanager
  def hold(self, pixels: int) -> Iterator[None]:
    pixels = max(int(pixels), 0)
    with self._condition:
      ticket = next(self._tickets)
      self._queue.append(ticket)
      try:
        while self._queue[0] != ticket or (
          self.in_flight > 0 and self.in_flight + pixels > DECODE_BUDGET_PIXELS
        ):
          self._condition.wait()
      finally:
        self._queue.remove(ticket)
        self._condition.notify_all()  # the next in line may fit now
      self.in_flight += pixels
      self.peak = max(self.peak, self.in_flight)
    try:
      yield
    finally:
      with self._condition:
        self.in_flight -= pixels
        self._condition.notify_all()


_BUDGET = _PixelBudget()


class OutsideFolderError(ValueError):
  """A path of a folder's image that resolves (through a symlink) to a file outside the folder."""


class NotRegularFileError(ValueError):
  """A path that names a FIFO, socket, device or directory, not a file of bytes to read.

  Attributes:
    kind: what it is, e.g. "a FIFO (named pipe)".
  """

  def __init__(self, path: str, kind: str):
    super().__init__(f"{path!r} is {kind}, not a regular file; expected an image file")
    self.kind = kind


def file_kind(mode: int) -> str:
  """What a `st_mode` names, in words ("a regular file", "a FIFO (named pipe)", ...)."""
  for test, kind in (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symlink"),
  ):
    if test(mode):
      return kind
  return "not a regular file"


def _inside(path: str | os.PathLike, real: str, real_root: str) -> None:
  if os.path.commonpath([real, real_root]) != real_root:
    raise OutsideFolderError(
      f"{os.fsdecode(path)!r} resolves to {real!r}, outside the folder {real_root!r} (a "
      "symlink swapped in after the folder was scanned?); expected a file inside the folder"
    )


def open_regular_file(
  path: str | os.PathLike, *, root: str | os.PathLike | None = None
) -> IO[bytes]:
  """`path` opened for reading in binary, if what was opened is a regular file.

  The open never blocks (`O_NONBLOCK`: a FIFO with no writer opens at once) and what it
  opened is checked with `fstat`, so a file replaced by a FIFO or device after a folder scan
  is refused here, not read.

  Args:
    path: the file.
    root: the folder `path` was found in, if any: then `path` must resolve inside it. Its
      resolved path is opened without following a final symlink, and after the open `path`
      must still resolve to that same file (device and inode), so a symlink out of the folder
      swapped in after the scan is refused.

  Raises:
    NotRegularFileError: a FIFO, socket, device or directory.
    OutsideFolderError: with `root`, `path` resolves outside it (or changed while opened).
    OSError: the file cannot be opened (missing, permissions, a symlink swapped in as it was
      opened).
  """
  target, real_root = path, None
  if root is not None:
    real_root = os.path.realpath(root)
    target = os.path.realpath(path)
    _inside(path, target, real_root)
  fd = os.open(target, _OPEN_FLAGS | (_NOFOLLOW if root is not None else 0))
  try:
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode):
      raise NotRegularFileError(os.fsdecode(path), file_kind(status.st_mode))
    if real_root is not None:
      again = os.path.realpath(path)
      _inside(path, again, real_root)
      now = os.stat(again)
      if again != target or (now.st_dev, now.st_ino) != (status.st_dev, status.st_ino):
        raise OutsideFolderError(
          f"{os.fsdecode(path)!r} changed while it was opened; expected a file that stays put"
        )
    return os.fdopen(fd, "rb")
  except BaseException:
    os.close(fd)
    raise


def decode_image(
  file: str | os.PathLike | IO[bytes], *, root: str | os.PathLike | None = None
) -> Image.Image:
  """Opens and fully decodes one JPEG/PNG image as RGB (EXIF orientation applied, alpha on white).

  The decode holds its pixels of the process-wide budget (`DECODE_BUDGET_PIXELS`) while it
  runs; the image it returns is the caller's (outside the budget).

  Args:
    file: a path (opened with `open_regular_file`: never blocks on a FIFO) or a binary file
      object.
    root: the folder a path was found in: it must still resolve inside it (`open_regular_file`).

  Raises:
    NotRegularFileError: `file` names a FIFO, socket, device or directory.
    OutsideFolderError: with `root`, the path resolves outside it.
    ValueError: not JPEG/PNG, or over `MAX_IMAGE_PIXELS` pixels (refused before decoding).
    OSError / PIL errors: the file does not decode (callers report it).
  """
  if isinstance(file, (str, bytes, os.PathLike)):
    with open_regular_file(file, root=root) as opened:
      return _decode(opened)
  return _decode(file)


def _decode(file: IO[bytes]) -> Image.Image:
  """The RGB image in `file` (see `decode_image`)."""
  try:  # only the JPEG and PNG readers look at the bytes (MPO comes through JPEG's)
    image = Image.open(file, formats=("JPEG", "PNG"))
  except Image.DecompressionBombError as error:  # PIL's own check, at 2x its MAX_IMAGE_PIXELS
    raise ValueError(f"{error}; expected at most {MAX_IMAGE_PIXELS} pixels") from None
  except UnidentifiedImageError:  # its message shows a file object's repr, not the format
    raise ValueError("not a JPEG or PNG image (no JPEG/PNG header)") from None
  result = None
  try:
    if image.format not in IMAGE_FORMATS:
      raise ValueError(f"format {image.format}; expected JPEG or PNG")
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:  # from the header, before any pixel is decoded
      raise ValueError(
        f"image of {width}x{height} = {width * height} pixels; expected at most "
        f"{MAX_IMAGE_PIXELS} (a decompression bomb?)"
      )
    with _BUDGET.hold(image.size[0] * image.size[1]):
      result = _to_rgb(image)
    return result
  finally:
    if result is not image:  # closing drops the pixels: not when they are what is returned
      image.close()


def _to_rgb(image: Image.Image) -> Image.Image:
  """`image` decoded as RGB, EXIF-oriented, alpha on white, with as few full-size copies as
  can be (an RGB image comes back itself; alpha is pasted onto the white, not composited)."""
  image.load()  # Decodes everything: a truncated file fails here, not later.
  ImageOps.exif_transpose(image, in_place=True)  # no copy when the orientation is fine
  has_alpha = image.mode in ("RGBA", "LA", "PA") or (
    image.mode == "P" and "transparency" in image.info
  )
  if has_alpha:
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, (0, 0), rgba)  # = alpha_composite on white, without two more copies
    return out
  return image if image.mode == "RGB" else image.convert("RGB")


def resize_image(image: Image.Image, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: the whole image squeezed to a square (bilinear, antialiased)."""
  return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def image_to_pil(image: np.ndarray) -> Image.Image:
  """uint8 [H, W, C] (C = 1 or 3) as an RGB PIL image, to resize arrays like files."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"image of {image.dtype} {image.shape}; expected uint8 [H, W, 1 or 3]")
  if image.shape[-1] == 1:
    return Image.fromarray(image[..., 0], mode="L").convert("RGB")
  return Image.fromarray(image, mode="RGB")


class FolderSource:
  """The readable images of a folder or an image list, by id (see the module docstring).

  Attributes:
    root: the folder (absolute); for an image list, its base folder.
    paths: the readable images' paths, `paths[id]`: for a folder, relative POSIX paths, sorted;
      for a list, `stored_path`s (relative ones sorted, then absolute ones sorted).
    skipped: (path, reason) of each image file (or list entry) refused or that did not decode.
    class_names: sorted top-level sub-folder names when labels come from sub-folders, else ().
    resized: uint8 [N, S, S, 3] when opened with `image_size`, else None.
    image_list: the `ImageList` read for a list, else None.
  """

  def __init__(
    self,
    root: str,
    paths: Sequence[str],
    *,
    skipped: Sequence[tuple[str, str]] = (),
    class_names: Sequence[str] = (),
    labels: np.ndarray | None = None,
    resized: np.ndarray | None = None,
    image_list: ImageList | None = None,
  ):
    self.root = os.path.abspath(root)
    self.paths = tuple(paths)
    self.skipped = tuple((str(p), str(r)) for p, r in skipped)
    self.class_names = tuple(class_names)
    labels = np.full(len(self.paths), UNLABELED, np.int64) if labels is None else labels
    self._labels = np.asarray(labels, np.int64)
    if self._labels.shape != (len(self.paths),):
      raise ValueError(f"labels of shape {self._labels.shape}; expected ({len(self.paths)},)")
    self.resized = resized
    self.image_list = image_list
    self.name = f"folder:{self.root}" if image_list is None else f"list:{image_list.file}"
    self._real_positions: dict[str, int] | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.paths)

  def __repr__(self) -> str:
    return f"FolderSource({self.root!r}, size={len(self)}, skipped={len(self.skipped)})"

  def file_path(self, index: int) -> str:
    """The absolute path of image `index` (ids only: no path from outside reaches here)."""
    if not 0 <= int(index) < len(self):
      raise IndexError(f"image id {index} out of range; expected 0 <= id < {len(self)}")
    return join_path(self.root, self.paths[int(index)])

  def real_positions(self) -> dict[str, int]:
    """{where image i resolves to (`os.path.realpath`): i}, computed once."""
    if self._real_positions is None:
      self._real_positions = {
        os.path.realpath(self.file_path(i)): i for i in reversed(range(len(self)))
      }
    return self._real_positions

  def labels(self) -> np.ndarray:
    """int64 [N]: class ids from sub-folders (-1 for files directly in root / no labels)."""
    return self._labels.copy()

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.__getitems__([index])[0]

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    out = []
    for index in np.asarray(indices, np.int64).reshape(-1).tolist():
      path = self.file_path(index)
      root = None if os.path.isabs(self.paths[index]) else self.root  # outside: as listed
      try:
        image = np.asarray(decode_image(path, root=root), dtype=np.uint8)
      except Exception as error:  # The file changed since the folder was opened.
        raise ValueError(f"image {index} ({path}) no longer decodes: {error}") from error
      out.append({"image": image, "label": int(self._labels[index])})
    return out

  def report(self) -> str:
    """A human-readable summary: readable images, skipped files with the reason for each."""
    where = self.root
    if self.image_list is not None:
      where = f"{self.image_list.file} (paths relative to {self.root})"
    lines = [f"{where}: {len(self)} images, {len(self.skipped)} skipped"]
    lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
    return "\n".join(lines)


def list_image_files(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, str]]]:
  """Relative POSIX paths of the image files under `root`, sorted, and the files refused.

  Only regular files are candidates: a name with an image extension that is a FIFO, socket,
  device, or a symlink to one (or a broken symlink) is refused after an `os.stat`, without
  opening it (opening a FIFO would wait for a writer).

  Returns:
    (candidates, refused): regular files with an image extension (not yet decoded), and
    (path, reason) for symlinks pointing out of `root` and files that are not regular files.
  """
  root = os.path.abspath(os.fspath(root))
  if not os.path.isdir(root):
    raise ValueError(f"images folder {root!r} is not a directory; expected a folder of JPEG/PNG")
  real_root = os.path.realpath(root)
  candidates, refused = [], []
  for directory, subdirectories, files in os.walk(root):
    subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
    for name in files:
      if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
        continue
      full = os.path.join(directory, name)
      relative = pathlib.PurePath(os.path.relpath(full, root)).as_posix()
      real = os.path.realpath(full)
      if os.path.islink(full) and os.path.commonpath([real, real_root]) != real_root:
        refused.append((relative, "symlink to a file outside the folder"))
        continue
      reason = _not_regular(full)
      if reason is not None:
        refused.append((relative, reason))
        continue
      candidates.append(relative)
  return sorted(candidates), sorted(refused)


def _not_regular(path: str) -> str | None:
  """Why `path` is not a regular file (what a symlink points to counts), or None if it is."""
  try:
    mode = os.stat(path).st_mode  # follows a symlink: what would be read
  except OSError as error:
    what = "broken symlink" if os.path.islink(path) else "cannot stat it"
    return f"{what} ({error.strerror or error})"
  if stat.S_ISREG(mode):
    return None
  return f"{file_kind(mode)}, not a regular file"


def join_path(root: str, path: str) -> str:
  """The file of a stored path (`stored_path`): `path` itself when absolute, else under `root`."""
  if os.path.isabs(path):
    return path
  return os.path.join(root, *path.split("/"))


def stored_path(path: str | os.PathLike, root: str | os.PathLike) -> str:
  """`path` in the one convention of a run's paths (the module docstring): relative to `root`
  (POSIX) when the file lies in it, as written and once resolved; else absolute.

  `path` may be relative to `root` (an image list's entry) or absolute; `..` is resolved on its
  text (`os.path.normpath`).
  """
  base = os.path.abspath(os.fspath(root))
  full = os.path.normpath(os.path.join(base, os.fspath(path)))
  return _stored(full, base, os.path.realpath(base))[0]


def _stored(
  full: str, base: str, real_base: str, folders: dict[str, str] | None = None
) -> tuple[str, str]:
  """(`stored_path` of the normalised absolute `full` under the normalised absolute `base`,
  where `full` resolves to).

  `folders` caches where folders resolve to, for many files in few folders (a list): then
  `full`'s folder is resolved once and `full` costs one `lstat`.
  """
  real = os.path.realpath(full) if folders is None else _realpath(full, folders)
  prefix = base if base.endswith(os.sep) else base + os.sep  # "/" stays "/"
  real_prefix = real_base if real_base.endswith(os.sep) else real_base + os.sep
  if full.startswith(prefix) and (real == real_base or real.startswith(real_prefix)):
    return pathlib.PurePath(full[len(prefix) :]).as_posix(), real
  return full, real


def _realpath(full: str, folders: dict[str, str]) -> str:
  """`os.path.realpath(full)` of a normalised absolute path, its folder's from `folders`."""
  parent, name = os.path.split(full)
  real_parent = folders.get(parent)
  if real_parent is None:
    real_parent = folders[parent] = os.path.realpath(parent)
  candidate = os.path.join(real_parent, name)
  try:
    if not stat.S_ISLNK(os.lstat(candidate).st_mode):
      return candidate
  except OSError:  # missing (or unreadable): realpath keeps the name as it is
    return candidate
  return os.path.realpath(candidate)


def read_list_file(
  list_file: str, *, flag: str, max_bytes: int, max_lines: int, expected: str
) -> str:
  """The text of an `@LIST` file: a regular file only (a FIFO is refused, not waited on), of at
  most `max_bytes` bytes and `max_lines` lines (`str.splitlines`), decoded as UTF-8 with bytes
  that are not UTF-8 kept (surrogateescape: such a name opens the file it names).

  Args:
    list_file: the file (the value after `@`).
    flag: how errors name the value, e.g. "seeds='@x.txt'".
    expected: what errors say was expected of the file.

  Raises:
    ValueError: the file cannot be read (missing, a FIFO, a directory, ...), or is over a limit.
  """
  try:  # a regular file only (a FIFO is refused, not waited on), and only so many bytes
    with open_regular_file(list_file) as f:
      data = f.read(max_bytes + 1)
  except (OSError, ValueError) as error:
    raise ValueError(
      f"{flag}: the list file cannot be read ({error}); expected {expected}"
    ) from None
  if len(data) > max_bytes:
    raise ValueError(
      f"{flag}: the list file {list_file!r} is over {max_bytes} bytes; expected at most "
      f"{max_bytes} bytes and {max_lines} lines"
    )
  text = data.decode("utf-8", "surrogateescape")
  count = len(text.splitlines())
  if count > max_lines:
    raise ValueError(
      f"{flag}: the list file {list_file!r} has {count} lines; expected at most {max_lines} lines"
    )
  return text


def is_image_list(images: str | os.PathLike) -> bool:
  """Whether an `--images` value names a list (`@LIST`) rather than a folder: it starts with
  `@` and is not an existing folder."""
  images = os.fspath(images)
  return isinstance(images, str) and images.startswith("@") and not os.path.isdir(images)


@dataclasses.dataclass(frozen=True)
class ImageList:
  """An image list as read (`read_image_list`), before any image is decoded.

  Attributes:
    file: the list file (absolute).
    base: the folder relative entries are relative to (absolute).
    candidates: `stored_path`s of the regular image files listed, relative ones sorted then
      absolute ones sorted (not yet decoded).
    refused: (stored path, or `<line N>` for an empty CSV cell; reason) of the entries skipped.
    digest: sha256 of the base and of the set of files listed (every entry, refused or not):
      what makes a restart "the same list".
    kind: "csv" or "text", the rule the file was read by.
  """

  file: str
  base: str
  candidates: tuple[str, ...]
  refused: tuple[tuple[str, str], ...]
  digest: str
  kind: str


def _list_entries(text: str, kind: str, flag: str) -> list[tuple[int, str | None]]:
  """(line number, entry) of a list's text; None for an empty CSV cell."""
  if kind == "text":
    entries = []
    for number, line in enumerate(text.split("\n"), start=1):
      line = line[:-1] if line.endswith("\r") else line
      if line.strip():
        entries.append((number, line))
    return entries
  reader = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""))
  try:
    header = next(reader, None)
    columns = [cell.strip().lower() for cell in header or []]
    if "path" not in columns:
      raise ValueError(
        f"{flag}: the CSV list's header {header!r} has no 'path' column; expected a header row "
        "naming a path column (a file not ending in .csv is read as one path per line)"
      )
    column = columns.index("path")
    entries = []
    for row in reader:
      if not any(cell.strip() for cell in row):
        continue  # a blank line
      cell = row[column] if column < len(row) else ""
      entries.append((reader.line_num, cell or None))
    return entries
  except csv.Error as error:
    raise ValueError(
      f"{flag}: the CSV list is not valid CSV at line {reader.line_num} ({error}); expected a "
      "header row with a path column and one row per image"
    ) from None


def read_image_list(images: str, *, base: str | os.PathLike | None = None) -> ImageList:
  """The image files an `--images=@LIST` value lists (see the module docstring).

  Args:
    images: "@" and the list file.
    base: the folder relative entries are relative to (default: the list file's folder).

  Raises:
    ValueError: not `@LIST`, a list file that cannot be read or is over the limits, a CSV list
      without a `path` column, or a base that is not a folder. Bad entries are not errors:
      they are `refused`.
  """
  if not is_image_list(images):
    raise ValueError(f"images={images!r}; expected @LIST, a file of image paths")
  list_file = os.path.abspath(images[1:])
  flag = f"images={images!r}"
  text = read_list_file(
    images[1:],
    flag=flag,
    max_bytes=MAX_IMAGE_LIST_BYTES,
    max_lines=MAX_IMAGE_LIST_LINES,
    expected="@FILE naming a file of image paths (one per line, or a CSV with a path column)",
  )
  base = os.path.dirname(list_file) if base is None else os.path.abspath(os.fspath(base))
  if not os.path.isdir(base):
    raise ValueError(
      f"base={base!r} is not a directory; expected the folder the paths of {images!r} are "
      "relative to"
    )
  kind = "csv" if list_file.lower().endswith(".csv") else "text"
  real_base = os.path.realpath(base)
  folders: dict[str, str] = {}  # where the folders of the entries resolve to
  first_line: dict[str, int] = {}  # stored path -> the line it was first listed on
  first_file: dict[str, tuple[str, int]] = {}  # where a file resolves -> (stored path, line)
  candidates, refused, listed = [], [], set()
  for number, entry in _list_entries(text, kind, flag):
    if entry is None:
      refused.append((f"<line {number}>", "an empty path cell"))
      continue
    full = os.path.normpath(os.path.join(base, entry))
    listed.add(full)
    if "\0" in entry:  # no file has it (and os functions refuse it): listed by its text
      prefix = base if base.endswith(os.sep) else base + os.sep
      text = full[len(prefix) :] if full.startswith(prefix) else full
      refused.append((text, "a NUL character in the path"))
      continue
    stored, real = _stored(full, base, real_base, folders)
    if stored in first_line:
      refused.append(
        (stored, f"listed again on line {number} (first on line {first_line[stored]})")
      )
      continue
    first_line[stored] = number
    if not stored.lower().endswith(IMAGE_EXTENSIONS):
      refused.append((stored, f"not a {'/'.join(IMAGE_EXTENSIONS)} file name"))
      continue
    reason = _not_regular(full)
    if reason is not None:
      refused.append((stored, reason))
      continue
    if real in first_file:
      same, line = first_file[real]
      refused.append((stored, f"the same file as {same} (line {line}), listed again"))
      continue
    first_file[real] = (stored, number)
    candidates.append(stored)
  digest = hashlib.sha256(os.fsencode(base) + b"\0\0")
  for full in sorted(listed):
    digest.update(full.encode("utf-8", "surrogatepass") + b"\0")
  return ImageList(
    file=list_file,
    base=base,
    candidates=tuple(sorted(candidates, key=lambda p: (os.path.isabs(p), p))),
    refused=tuple(sorted(refused)),
    digest=digest.hexdigest(),
    kind=kind,
  )


def _check_one(root: str, path: str, image_size: int | None):
  file = join_path(root, path)
  root = None if os.path.isabs(path) else root  # a listed file outside the base: as listed
  try:
    if image_size:  # decoded in full, as every other features path (and resume) reads it
      return resize_image(decode_image(file, root=root), image_size), None
    decode_image(file, root=root)
    return None, None
  except Exception as error:  # Anything a broken file raises is a reason to skip it.
    return None, f"{type(error).__name__}: {error}"


def open_folder(
  root: str | os.PathLike,
  *,
  labels_from_subfolders: bool = False,
  image_size: int | None = None,
  num_threads: int | None = None,
  log: Callable[[str], None] | None = None,
) -> FolderSource:
  """Opens a folder of images; decodes every file once to find the readable ones.

  Args:
    root: the folder (searched recursively).
    labels_from_subfolders: label each image by its top-level sub-folder (for evaluation).
    image_size: also keep every image resized to this square size (`source.resized`).
    num_threads: decoding threads (PIL decodes outside the GIL); default: the CPU count.
    log: receives progress lines (every few thousand images).

  Returns:
    A `FolderSource` of the readable images.

  Raises:
    ValueError: `root` is not a folder, holds no readable image, or a bad `image_size`.
  """
  _check_image_size(image_size)
  root = os.path.abspath(os.fspath(root))
  candidates, skipped = list_image_files(root)
  return _open(
    root,
    candidates,
    skipped,
    labels_from_subfolders=labels_from_subfolders,
    image_size=image_size,
    num_threads=num_threads,
    log=log,
    where=f"under {root}",
    empty=f"images folder {root!r}",
  )


def open_images(
  images: str | os.PathLike,
  *,
  base: str | os.PathLike | None = None,
  labels_from_subfolders: bool = False,
  image_size: int | None = None,
  num_threads: int | None = None,
  log: Callable[[str], None] | None = None,
) -> FolderSource:
  """`open_folder` of a folder, or of the files an `@LIST` lists (`read_image_list`; `base`
  goes with a list only). Same arguments, result and errors as `open_folder`; sub-folder labels
  of a list come from its paths relative to the base."""
  if not is_image_list(images):
    if base is not None:
      raise ValueError(
        f"base={os.fspath(base)!r} with the folder {os.fspath(images)!r}; a base folder goes "
        "with a list of images (@LIST)"
      )
    return open_folder(
      images,
      labels_from_subfolders=labels_from_subfolders,
      image_size=image_size,
      num_threads=num_threads,
      log=log,
    )
  _check_image_size(image_size)
  listed = read_image_list(os.fspath(images), base=base)
  return _open(
    listed.base,
    list(listed.candidates),
    list(listed.refused),
    labels_from_subfolders=labels_from_subfolders,
    image_size=image_size,
    num_threads=num_threads,
    log=log,
    where=f"listed in {listed.file}",
    empty=f"image list {listed.file!r}",
    image_list=listed,
  )


def _check_image_size(image_size) -> None:
  if image_size is not None and (int(image_size) != image_size or image_size < 1):
    raise ValueError(f"image_size={image_size!r}; expected a positive int or None")


def _open(
  root,
  candidates,
  skipped,
  *,
  labels_from_subfolders,
  image_size,
  num_threads,
  log,
  where,
  empty,
  image_list=None,
) -> FolderSource:
  """Decodes `candidates` (stored paths under `root`) once: the source of the readable ones."""
  kept, resized = [], []
  workers = num_threads or os.cpu_count() or 1
  with futures.ThreadPoolExecutor(max_workers=workers) as pool:
    for start in range(0, len(candidates), _CHUNK):
      chunk = candidates[start : start + _CHUNK]
      results = pool.map(lambda p: _check_one(root, p, image_size), chunk)
      for relative, (small, error) in zip(chunk, results, strict=True):
        if error is not None:
          skipped.append((relative, error))
          continue
        kept.append(relative)
        if image_size:
          resized.append(small)
      done = start + len(chunk)
      if log and (done % (16 * _CHUNK) == 0 or done == len(candidates)):
        log(f"read {done}/{len(candidates)} image files {where}")
  if not kept:
    raise ValueError(
      f"{empty} holds no readable image ({len(skipped)} skipped); expected "
      f"{'/'.join(IMAGE_EXTENSIONS)} files"
    )
  class_names, labels = (), None
  if labels_from_subfolders:

    def top(path: str) -> str | None:  # absolute paths (outside the root) have no sub-folder
      return path.split("/")[0] if "/" in path and not os.path.isabs(path) else None

    class_names = tuple(sorted({top(p) for p in kept} - {None}))
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index.get(top(p), UNLABELED) for p in kept], dtype=np.int64)
  return FolderSource(
    root,
    kept,
    skipped=sorted(skipped),
    class_names=class_names,
    labels=labels,
    resized=np.stack(resized) if image_size else None,
    image_list=image_list,
  )


def seed_paths(seeds: str | Sequence[str]) -> list[str]:
  """The seed files a `--seeds` value names, in the order given (not yet checked).

  A string is read by the first rule that applies:
  - an existing directory: its image files, recursively (`list_image_files`);
  - an existing file: that one file, whole (its name may hold commas);
  - `@LIST`: the file LIST holds one path per line (blank lines skipped; relative paths are
    from the current directory, as on the command line), for names with commas;
  - otherwise: comma-separated paths (spaces around each trimmed).
  A list of paths is taken as it is.

  Raises:
    ValueError: a seed folder with unusable files (a symlink out of it, a FIFO, ...), or a
      list file that cannot be read.
  """
  if not isinstance(seeds, str):
    return [os.fspath(s) for s in seeds]
  if os.path.isdir(seeds):
    found, refused = list_image_files(seeds)
    if refused:
      raise ValueError(f"seed folder {seeds!r} has unusable files: {refused}")
    return [os.path.join(os.path.abspath(seeds), *p.split("/")) for p in found]
  if os.path.lexists(seeds):
    return [seeds]
  if seeds.startswith("@"):
    text = read_list_file(
      seeds[1:],
      flag=f"seeds={seeds!r}",
      max_bytes=MAX_SEED_LIST_BYTES,
      max_lines=MAX_SEED_LIST_LINES,
      expected="@FILE naming a file with one seed image path per line",
    )
    return [line for line in text.splitlines() if line.strip()]
  return [s.strip() for s in seeds.split(",") if s.strip()]


def resolve_seeds(source: FolderSource, seeds: str | Sequence[str]) -> tuple[list[int], list[str]]:
  """Seed positives given as a folder or file paths: (ids in `source`, files outside it).

  Args:
    source: the folder (or image list) the run labels.
    seeds: a folder (its images, recursively), an image file, `@LIST` (a file of paths, one
      per line), comma-separated image files, or a list of files (see `seed_paths`). For a
      folder, files inside `source.root` must be readable images of the source; for an image
      list, a seed that is one of its images (the same file, by whatever path) counts as that
      image, and any other seed is added, wherever it is.

  Returns:
    (ids of seeds that are images of `source`, the `stored_path`s of the other seed files,
    relative ones sorted then absolute ones sorted (a folder's are all absolute: they lie
    outside it); a run adds those to its pool).

  Raises:
    ValueError: no seeds, a missing file or one that is not a regular file, a seed in the
      folder that was skipped as unreadable, or a seed not in the source that does not decode.
  """
  files = seed_paths(seeds)
  if not files:
    raise ValueError(f"seeds={seeds!r}: no image found; expected a folder or image file paths")
  position = {p: i for i, p in enumerate(source.paths)}
  real_root = os.path.realpath(source.root)
  listed = source.real_positions() if source.image_list is not None else None
  ids, outside = set(), set()
  for file in files:
    if not os.path.lexists(file):
      comma = (
        " (a file name with a comma: pass the file alone, or list the files one per line in a "
        "file given as --seeds=@LIST)"
        if isinstance(seeds, str) and "," in seeds
        else ""
      )
      raise ValueError(f"seed image {file!r} does not exist; expected an image file{comma}")
    reason = _not_regular(file)
    if reason is not None:
      raise ValueError(f"seed image {file!r}: {reason}; expected an image file")
    real = os.path.realpath(file)
    if listed is not None and real in listed:
      ids.add(listed[real])
    elif listed is None and os.path.commonpath([real, real_root]) == real_root:
      relative = pathlib.PurePath(os.path.relpath(real, real_root)).as_posix()
      if relative not in position:
        raise ValueError(
          f"seed image {file!r} is in the images folder but is not one of its readable images "
          "(skipped or hidden); expected a readable JPEG/PNG"
        )
      ids.add(position[relative])
    else:
      try:
        decode_image(real)
      except Exception as error:
        raise ValueError(
          f"seed image {file!r} does not decode ({error}); expected a JPEG/PNG"
        ) from None
      outside.add(stored_path(os.path.abspath(file), source.root))
  return sorted(ids), sorted(outside, key=lambda p: (os.path.isabs(p), p))


def write_example_folder(
  out_dir: str | os.PathLike,
  *,
  dataset: str = "rare_fashion_mnist",
  split: str = "train",
  per_class: int = 30,
  rare_class: int = 5,
  rare_count: int = 20,
  num_seeds: int = 5,
  seed: int = 0,
  data_dir: str | None = None,
) -> tuple[str, list[str]]:
  """Writes a small folder of PNGs from a prepared TFDS dataset, to try the labeling app.

  `out_dir/images/<class>/<index>.png` holds `per_class` images of every class but
  `rare_class`, which has `rare_count` (the rare category); class names become folder names
  (characters other than letters, digits, "-" and "_" turn into "_"). `num_seeds` other
  images of the rare class go to `out_dir/seeds/` (examples from outside the pool).

  Returns:
    (the images folder, the seed files).
  """
  # Imported here: reading a folder needs no TFDS.
  from rare_jax.data import sources

  source = sources.open_source(dataset, split, data_dir)
  labels = source.labels()
  if not 0 <= rare_class < source.num_classes:
    raise ValueError(f"rare_class={rare_class}; expected a class id in [0, {source.num_classes})")
  if num_seeds < 1 or rare_count < 1:
    raise ValueError(f"num_seeds={num_seeds}, rare_count={rare_count}; expected both >= 1")
  rng = np.random.default_rng(seed)
  images_dir = os.path.join(os.fspath(out_dir), "images")
  seeds_dir = os.path.join(os.fspath(out_dir), "seeds")
  os.makedirs(seeds_dir, exist_ok=True)
  seed_files = []
  for class_id, class_name in enumerate(source.class_names):
    rare = class_id == rare_class
    count = rare_count + num_seeds if rare else per_class
    ids = rng.choice(np.flatnonzero(labels == class_id), count, replace=False)
    name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in class_name)
    os.makedirs(os.path.join(images_dir, name), exist_ok=True)
    for k, example in enumerate(source.__getitems__(ids)):
      array = example["image"]
      image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
      if rare and k < num_seeds:
        seed_files.append(os.path.join(seeds_dir, f"{ids[k]:06d}.png"))
        image.save(seed_files[-1])
      else:
        image.save(os.path.join(images_dir, name, f"{ids[k]:06d}.png"))
  return images_dir, sorted(seed_files)


__all__ = [
  "IMAGE_EXTENSIONS",
  "IMAGE_FORMATS",
  "DECODE_BUDGET_PIXELS",
  "MAX_IMAGE_PIXELS",
  "MAX_IMAGE_LIST_BYTES",
  "MAX_IMAGE_LIST_LINES",
  "MAX_SEED_LIST_BYTES",
  "MAX_SEED_LIST_LINES",
  "UNLABELED",
  "FolderSource",
  "ImageList",
  "NotRegularFileError",
  "OutsideFolderError",
  "decode_image",
  "file_kind",
  "image_to_pil",
  "is_image_list",
  "join_path",
  "list_image_files",
  "open_folder",
  "open_images",
  "open_regular_file",
  "read_image_list",
  "read_list_file",
  "resize_image",
  "resolve_seeds",
  "seed_paths",
  "stored_path",
  "write_example_folder",
]
