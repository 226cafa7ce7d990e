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
"""

from __future__ import annotations

import collections
import contextlib
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
  """The readable images of a folder, by id (see the module docstring).

  Attributes:
    root: the folder (absolute).
    paths: relative POSIX paths of the readable images, sorted; `paths[id]`.
    skipped: (relative path, reason) of each image file that did not decode.
    class_names: sorted top-level sub-folder names when labels come from sub-folders, else ().
    resized: uint8 [N, S, S, 3] when opened with `image_size`, else None.
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
    self.name = f"folder:{self.root}"

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
    return os.path.join(self.root, *self.paths[int(index)].split("/"))

  def labels(self) -> np.ndarray:
    """int64 [N]: class ids from sub-folders (-1 for files directly in root / no labels)."""
    return self._labels.copy()

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.__getitems__([index])[0]

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    out = []
    for index in np.asarray(indices, np.int64).reshape(-1).tolist():
      path = self.file_path(index)
      try:
        image = np.asarray(decode_image(path, root=self.root), dtype=np.uint8)
      except Exception as error:  # The file changed since the folder was opened.
        raise ValueError(f"image {index} ({path}) no longer decodes: {error}") from error
      out.append({"image": image, "label": int(self._labels[index])})
    return out

  def report(self) -> str:
    """A human-readable summary: readable images, skipped files with the reason for each."""
    lines = [f"{self.root}: {len(self)} images, {len(self.skipped)} skipped"]
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


def _check_one(root: str, relative: str, image_size: int | None):
  path = os.path.join(root, *relative.split("/"))
  try:
    if image_size:  # decoded in full, as every other features path (and resume) reads it
      return resize_image(decode_image(path, root=root), image_size), None
    decode_image(path, root=root)
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
  if image_size is not None and (int(image_size) != image_size or image_size < 1):
    raise ValueError(f"image_size={image_size!r}; expected a positive int or None")
  root = os.path.abspath(os.fspath(root))
  candidates, skipped = list_image_files(root)
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
        log(f"read {done}/{len(candidates)} image files under {root}")
  if not kept:
    raise ValueError(
      f"images folder {root!r} holds no readable image ({len(skipped)} skipped); expected "
      f"{'/'.join(IMAGE_EXTENSIONS)} files"
    )
  class_names, labels = (), None
  if labels_from_subfolders:
    class_names = tuple(sorted({p.split("/")[0] for p in kept if "/" in p}))
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array(
      [index[p.split("/")[0]] if "/" in p else UNLABELED for p in kept], dtype=np.int64
    )
  return FolderSource(
    root,
    kept,
    skipped=sorted(skipped),
    class_names=class_names,
    labels=labels,
    resized=np.stack(resized) if image_size else None,
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
    try:  # a regular file only (a FIFO is refused, not waited on), and only so many bytes
      with open_regular_file(seeds[1:]) as f:
        data = f.read(MAX_SEED_LIST_BYTES + 1)
    except (OSError, ValueError) as error:
      raise ValueError(
        f"seeds={seeds!r}: the list file cannot be read ({error}); expected @FILE naming a "
        "file with one seed image path per line"
      ) from None
    if len(data) > MAX_SEED_LIST_BYTES:
      raise ValueError(
        f"seeds={seeds!r}: the list file {seeds[1:]!r} is over {MAX_SEED_LIST_BYTES} bytes; "
        f"expected at most {MAX_SEED_LIST_BYTES} bytes and {MAX_SEED_LIST_LINES} lines"
      )
    lines = data.decode("utf-8", "surrogateescape").splitlines()
    if len(lines) > MAX_SEED_LIST_LINES:
      raise ValueError(
        f"seeds={seeds!r}: the list file {seeds[1:]!r} has {len(lines)} lines; expected at "
        f"most {MAX_SEED_LIST_LINES} lines"
      )
    return [line for line in lines if line.strip()]
  return [s.strip() for s in seeds.split(",") if s.strip()]


def resolve_seeds(source: FolderSource, seeds: str | Sequence[str]) -> tuple[list[int], list[str]]:
  """Seed positives given as a folder or file paths: (ids in `source`, files outside it).

  Args:
    source: the folder the run labels.
    seeds: a folder (its images, recursively), an image file, `@LIST` (a file of paths, one
      per line), comma-separated image files, or a list of files (see `seed_paths`). Files
      inside `source.root` must be readable images of the source.

  Returns:
    (ids of seeds that are images of `source`, sorted absolute paths of seed files outside
    `source.root`; a run adds those to its pool).

  Raises:
    ValueError: no seeds, a missing file or one that is not a regular file, a seed in the
      folder that was skipped as unreadable, or a seed outside the folder that does not decode.
  """
  files = seed_paths(seeds)
  if not files:
    raise ValueError(f"seeds={seeds!r}: no image found; expected a folder or image file paths")
  position = {p: i for i, p in enumerate(source.paths)}
  real_root = os.path.realpath(source.root)
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
    if os.path.commonpath([real, real_root]) == real_root:
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
      outside.add(os.path.abspath(file))
  return sorted(ids), sorted(outside)


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
  "MAX_SEED_LIST_BYTES",
  "MAX_SEED_LIST_LINES",
  "UNLABELED",
  "FolderSource",
  "NotRegularFileError",
  "OutsideFolderError",
  "decode_image",
  "file_kind",
  "image_to_pil",
  "list_image_files",
  "open_folder",
  "open_regular_file",
  "resize_image",
  "resolve_seeds",
  "seed_paths",
  "write_example_folder",
]
