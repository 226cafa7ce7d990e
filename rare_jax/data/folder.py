"""A folder of one's own JPEG/PNG images as a random-access source with stable ids.

`open_folder(root)` walks `root` recursively and keeps every `.jpg`/`.jpeg`/`.png` file
(case-insensitive; hidden files and folders are left out) that decodes. Ids are positions in
the sorted list of the readable files' relative POSIX paths, so the same folder always gives
the same ids. A file that does not decode (corrupt, truncated, not an image, a symlink out of
the folder) is skipped and listed in `source.skipped` / `source.report()`, never an error.

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

import os
import pathlib
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
UNLABELED = -1
# Files decoded per progress step. (Images over PIL's decompression-bomb limit, 2x its
# MAX_IMAGE_PIXELS of about 89 MP, fail to decode and are reported as skipped.)
_CHUNK = 256


def decode_image(path: str | os.PathLike) -> Image.Image:
  """Opens and fully decodes one image file as RGB (EXIF orientation applied, alpha on white).

  Raises:
    OSError / ValueError / PIL errors: the file does not decode (callers report it).
  """
  with Image.open(path) as image:
    if image.format not in ("JPEG", "PNG", "MPO"):
      raise ValueError(f"format {image.format}; expected JPEG or PNG")
    image.load()  # Decodes everything: a truncated file fails here, not later.
    image = ImageOps.exif_transpose(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
      image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
      rgba = image.convert("RGBA")
      background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
      return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


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
        image = np.asarray(decode_image(path), dtype=np.uint8)
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
  """Relative POSIX paths of the image files under `root`, sorted, and symlinks refused.

  Returns:
    (candidates, refused): files with an image extension (not yet decoded), and
    (path, reason) for symlinks pointing out of `root`.
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
      candidates.append(relative)
  return sorted(candidates), sorted(refused)


def _check_one(root: str, relative: str, image_size: int | None):
  try:
    image = decode_image(os.path.join(root, *relative.split("/")))
    return (resize_image(image, image_size) if image_size else None), None
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


def resolve_seeds(source: FolderSource, seeds: str | Sequence[str]) -> tuple[list[int], list[str]]:
  """Seed positives given as a folder or file paths: (ids in `source`, files outside it).

  Args:
    source: the folder the run labels.
    seeds: a folder (its images, recursively), a comma-separated string of files, or a list
      of files. Files inside `source.root` must be readable images of the source.

  Returns:
    (ids of seeds that are images of `source`, sorted absolute paths of seed files outside
    `source.root`; a run adds those to its pool).

  Raises:
    ValueError: no seeds, a missing file, a seed in the folder that was skipped as unreadable,
      or a seed outside the folder that does not decode.
  """
  if isinstance(seeds, str):
    if os.path.isdir(seeds):
      found, refused = list_image_files(seeds)
      files = [os.path.join(os.path.abspath(seeds), *p.split("/")) for p in found]
      if refused:
        raise ValueError(f"seed folder {seeds!r} has unusable files: {refused}")
    else:
      files = [s.strip() for s in seeds.split(",") if s.strip()]
  else:
    files = [os.fspath(s) for s in seeds]
  if not files:
    raise ValueError(f"seeds={seeds!r}: no image found; expected a folder or image file paths")
  position = {p: i for i, p in enumerate(source.paths)}
  real_root = os.path.realpath(source.root)
  ids, outside = set(), set()
  for file in files:
    if not os.path.isfile(file):
      raise ValueError(f"seed image {file!r} does not exist; expected an image file")
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
  "UNLABELED",
  "FolderSource",
  "decode_image",
  "image_to_pil",
  "list_image_files",
  "open_folder",
  "resize_image",
  "resolve_seeds",
  "write_example_folder",
]
