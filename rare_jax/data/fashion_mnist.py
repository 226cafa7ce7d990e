"""The embedded default dataset: Fashion-MNIST from Debian's `dataset-fashion-mnist`, as TFDS.

The raw idx files come from the Debian package (no network besides the package mirror):
`ensure_raw_files` finds them under `/usr/share/datasets/fashion-mnist`, installs the package
when running as root, or unpacks it into a user cache folder otherwise. `RareFashionMnist`
wraps them as a TFDS dataset named `rare_fashion_mnist`, stored as array_record so that it
is read back through `tfds.data_source` without TensorFlow. Examples keep the order of the idx
files (shuffling disabled): index `i` of a split is row `i` of its idx file.

Without apt-get (another Linux, macOS), the same four files from Zalando's release (the files
TFDS's own `fashion_mnist` downloads; Debian's are them re-compressed without the name field)
are taken by `import_raw_files` (`python -m rare_jax.data.prepare --raw_dir=DIR`), which checks
their uncompressed contents against Debian's and copies them into the user cache folder.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import numpy as np
import tensorflow_datasets as tfds

DEBIAN_PACKAGE = "dataset-fashion-mnist"
SYSTEM_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
# Where the package puts its files, relative to the root it is unpacked into.
PACKAGE_SUBDIR = pathlib.Path("usr/share/datasets/fashion-mnist")

# split -> (images file, labels file)
RAW_FILES = {
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
# sha256 of each file's uncompressed contents (Debian's dataset-fashion-mnist 2020-06-05): a file
# from elsewhere is accepted only if it holds the same bytes.
RAW_SHA256 = {
  "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
  "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
  "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
  "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
RAW_SIZES = {  # uncompressed bytes
  "train-images-idx3-ubyte.gz": 47_040_016,
  "train-labels-idx1-ubyte.gz": 60_008,
  "t10k-images-idx3-ubyte.gz": 7_840_016,
  "t10k-labels-idx1-ubyte.gz": 10_008,
}
# Where the files can be had without Debian (TFDS's fashion_mnist downloads them from the second).
RAW_SOURCES = (
  "https://github.com/zalandoresearch/fashion-mnist (folder data/fashion)",
  "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/<file name>",
)
CLASS_NAMES = (
  "T-shirt/top",
  "Trouser",
  "Pullover",
  "Dress",
  "Coat",
  "Sandal",
  "Shirt",
  "Sneaker",
  "Bag",
  "Ankle boot",
)
IMAGE_SHAPE = (28, 28, 1)


def default_cache_dir() -> pathlib.Path:
  """The user cache folder the package is unpacked into when not root (honours XDG)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "rare_jax" / DEBIAN_PACKAGE


def _has_raw_files(folder: pathlib.Path) -> bool:
  return all((folder / name).is_file() for pair in RAW_FILES.values() for name in pair)


def _manual_commands(cache_dir: pathlib.Path) -> str:
  return (
    f"  sudo apt-get install -y {DEBIAN_PACKAGE}\n"
    "or, without root:\n"
    f"  mkdir -p {cache_dir} && cd {cache_dir} && apt-get download {DEBIAN_PACKAGE} && "
    f"dpkg-deb -x {DEBIAN_PACKAGE}_*.deb {cache_dir}\n"
    "(run `apt-get update` first if apt cannot find the package)\n" + _without_apt(cache_dir)
  )


def _without_apt(cache_dir: pathlib.Path) -> str:
  """How to get the files on a machine without apt-get."""
  names = " ".join(name for pair in RAW_FILES.values() for name in pair)
  return (
    f"Without apt-get: download the four files {names} from\n"
    + "".join(f"  {source}\n" for source in RAW_SOURCES)
    + "into one folder, then run\n"
    "  python -m rare_jax.data.prepare --raw_dir=THAT_FOLDER\n"
    f"which checks them and copies them to {cache_dir / PACKAGE_SUBDIR}."
  )


def _has_apt() -> bool:
  return shutil.which("apt-get") is not None and shutil.which("dpkg-deb") is not None


def import_raw_files(
  folder: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None
) -> pathlib.Path:
  """Copies the four idx .gz files from folder into the user cache, after checking them.

  Each must be a regular gzip file whose uncompressed contents are Debian's (`RAW_SHA256`);
  the files are copied only when all four pass; then the cache's old folder is removed and the
  checked copy renamed in (a kill in between leaves no files: run the command again).

  Args:
    folder: holds train-images-idx3-ubyte.gz and the other three files (from RAW_SOURCES).
    cache_dir: the user cache folder (default `default_cache_dir()`).

  Returns:
    The folder `ensure_raw_files` now finds them in.

  Raises:
    ValueError: a file is missing, not a regular file, or holds other data.
  """
  folder = pathlib.Path(folder)
  cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  for name, expected in RAW_SHA256.items():
    path = folder / name
    if not path.is_file():
      raise ValueError(f"{path}: expected the regular file {name} (Fashion-MNIST) there")
    digest, size = hashlib.sha256(), 0
    try:
      with gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
          size += len(chunk)
          if size > RAW_SIZES[name]:
            break  # never inflate past the known size
          digest.update(chunk)
    except (OSError, EOFError) as error:
      raise ValueError(f"{path}: not a readable gzip file ({error})") from error
    if size != RAW_SIZES[name] or digest.hexdigest() != expected:
      raise ValueError(
        f"{path}: not Fashion-MNIST's {name} (uncompressed {size} bytes, sha256 "
        f"{digest.hexdigest()[:16]}...; expected {RAW_SIZES[name]} bytes, sha256 "
        f"{expected[:16]}...)"
      )
  target = cache_dir / PACKAGE_SUBDIR
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    staged = pathlib.Path(tmp) / "files"
    staged.mkdir()
    for name in RAW_SHA256:
      shutil.copyfile(folder / name, staged / name)
    if target.exists():
      shutil.rmtree(target)
    staged.rename(target)  # only complete copies ever appear under target
  return target


def _run(command: list[str]) -> str | None:
  """Runs a command; returns None on success, else a one-line reason."""
  try:
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
  except (OSError, subprocess.TimeoutExpired) as error:
    return f"`{' '.join(command)}` failed: {error}"
  if result.returncode != 0:
    tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
    return f"`{' '.join(command)}` exited with {result.returncode}: {' '.join(tail)}"
  return None


def _unpack_into_cache(cache_dir: pathlib.Path) -> str | None:
  """`apt-get download` + `dpkg-deb -x` into cache_dir; returns None or why it failed."""
  cache_dir.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
    error = _run(["sh", "-c", f"cd '{tmp}' && apt-get download {DEBIAN_PACKAGE}"])
    if error:
      return error
    debs = sorted(pathlib.Path(tmp).glob("*.deb"))
    if not debs:
      return f"`apt-get download {DEBIAN_PACKAGE}` produced no .deb file"
    unpacked = pathlib.Path(tmp) / "root"
    error = _run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)])
    if error:
      return error
    target = cache_dir / PACKAGE_SUBDIR
    if target.exists():
      shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Moved only once complete, so that a killed unpack never leaves a half folder behind.
    shutil.move(str(unpacked / PACKAGE_SUBDIR), str(target))
  return None


def ensure_raw_files(*, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Returns the folder holding the four Fashion-MNIST idx .gz files, fetching them if needed.

  Order: the system folder of the Debian package; the user cache folder; as root,
  `apt-get install`; otherwise `apt-get download` + `dpkg-deb -x` into the cache folder.

  Args:
    cache_dir: where to unpack the package without root (default `default_cache_dir()`).

  Returns:
    The folder with `train-images-idx3-ubyte.gz` and the other three files.

  Raises:
    RuntimeError: when no way worked; the message gives the commands to run by hand.
  """
  cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  cached = cache_dir / PACKAGE_SUBDIR
  for folder in (SYSTEM_DIR, cached):
    if _has_raw_files(folder):
      return folder
  if not _has_apt():
    raise RuntimeError(
      f"Fashion-MNIST idx files not found in {SYSTEM_DIR} or {cached}, and this machine has "
      f"no apt-get / dpkg-deb to fetch Debian's package {DEBIAN_PACKAGE!r}.\n"
      + _without_apt(cache_dir)
    )
  reasons = []
  if hasattr(os, "geteuid") and os.geteuid() == 0:
    error = _run(["apt-get", "install", "-y", DEBIAN_PACKAGE])
    if error:  # An old package list may not know the package yet.
      reasons.append(error)
      error = _run(["apt-get", "update"]) or _run(["apt-get", "install", "-y", DEBIAN_PACKAGE])
    if error:
      reasons.append(error)
    elif _has_raw_files(SYSTEM_DIR):
      return SYSTEM_DIR
  error = _unpack_into_cache(cache_dir)
  if error:
    reasons.append(error)
  elif _has_raw_files(cached):
    return cached
  else:
    reasons.append(f"{DEBIAN_PACKAGE} unpacked but its idx files are not in {cached}")
  raise RuntimeError(
    f"Fashion-MNIST idx files not found in {SYSTEM_DIR} or {cached}, and fetching the Debian "
    f"package {DEBIAN_PACKAGE!r} failed:\n  " + "\n  ".join(reasons) + "\n"
    "Install it by hand with:\n" + _manual_commands(cache_dir)
  )


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads a (gzipped) idx file of unsigned bytes into an array of its declared shape."""
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError(f"{path}: not an idx file of unsigned bytes (magic {data[:4]!r})")
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  offset = 4 + 4 * ndim
  size = int(np.prod(shape))
  if len(data) - offset != size:
    raise ValueError(
      f"{path}: expected {size} bytes of data for shape {shape}, found {len(data) - offset}"
    )
  return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def read_raw_split(folder: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [N, 28, 28, 1], labels int64 [N]) of a split from the idx files."""
  if split not in RAW_FILES:
    raise ValueError(f"Fashion-MNIST split {split!r} unknown; expected one of {list(RAW_FILES)}")
  images_file, labels_file = RAW_FILES[split]
  images = read_idx(pathlib.Path(folder) / images_file)
  labels = read_idx(pathlib.Path(folder) / labels_file).astype(np.int64)
  if images.shape[1:] != IMAGE_SHAPE[:2] or images.shape[0] != labels.shape[0]:
    raise ValueError(
      f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} "
      f"do not match; expected [N, 28, 28] and [N]"
    )
  return images[..., None], labels


class RareFashionMnist(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST (Zalando) from Debian's `dataset-fashion-mnist`, in array_record format."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Fashion-MNIST from the Debian package, idx order kept."}

  def __init__(self, **kwargs):
    # array_record by default: the only format readable without TensorFlow.
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description="Fashion-MNIST: 28x28 grayscale images of 10 kinds of clothing.",
      features=tfds.features.FeaturesDict(
        {
          # Tensor rather than Image: encoding an Image feature needs TensorFlow.
          "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
          "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
        }
      ),
      supervised_keys=("image", "label"),
      homepage="https://github.com/zalandoresearch/fashion-mnist",
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The files come from the Debian package, not a download.
    folder = ensure_raw_files()
    return {split: self._generate_examples(folder, split) for split in RAW_FILES}

  def _generate_examples(self, folder, split):
    images, labels = read_raw_split(folder, split)
    for index in range(len(labels)):
      yield index, {"image": images[index], "label": int(labels[index])}
