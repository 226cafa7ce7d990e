"""Reading other frameworks' weight files without their frameworks: one home for the formats.

`read_state_dict(path)` returns `{name: numpy array}` from
- a PyTorch checkpoint (`torch.save`): the zip format (torch >= 1.6, e.g. torchvision's
  `.pth` files) and the legacy pickle stream (e.g. the EfficientNet-Lite `.pth` files);
- a `.safetensors` file (timm and Hugging Face).
torch is not needed. PyTorch checkpoints are pickles, and unpickling can run arbitrary code:
the reader only admits the few globals a state dict is made of (tensor rebuild functions,
storage types, `OrderedDict`) and refuses anything else with a `ValueError` naming it.
A checkpoint that wraps its state dict (`{"state_dict": ...}`, `{"model": ...}`) is unwrapped.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

# torch storage class name -> numpy dtype.
_STORAGE_DTYPES = {
  "DoubleStorage": np.float64,
  "FloatStorage": np.float32,
  "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}
_SAFETENSORS_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


class _StorageType:
  def __init__(self, name: str):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """A storage's key and dtype; its bytes are filled in once read."""

  def __init__(self, key: str, dtype: np.dtype):
    self.key, self.dtype = key, dtype
    self.data: np.ndarray | None = None


class _Tensor:
  """A tensor to build from a storage once the storages are read."""

  def __init__(self, storage: _Storage, offset: int, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, int(offset), size, stride

  def to_numpy(self) -> np.ndarray:
    data = self.storage.data
    if data is None:
      raise ValueError(f"storage {self.storage.key!r} is missing from the checkpoint")
    size, stride = tuple(int(s) for s in self.size), tuple(int(s) for s in self.stride)
    needed = self.offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
    if all(size) and needed > data.size:
      raise ValueError(f"tensor of shape {size} reads past its storage ({data.size} elements)")
    item = data.itemsize
    view = np.lib.stride_tricks.as_strided(
      data[self.offset :], shape=size, strides=tuple(s * item for s in stride), writeable=False
    )
    return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata
  return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(tensor, *unused):
  del unused
  return tensor


class _Unpickler(pickle.Unpickler):
  """Admits only what a state dict is made of; storages become `_Storage` placeholders."""

  def __init__(self, file, storages: dict[str, _Storage]):
    super().__init__(file)
    self.storages = storages

  def find_class(self, module: str, name: str):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise ValueError(
      f"the checkpoint needs {module}.{name}, which a plain state dict does not use; refusing "
      "to unpickle it (only tensors, storages and OrderedDict are admitted)"
    )

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise ValueError(f"unsupported persistent id {pid!r} in the checkpoint")
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise ValueError(f"unsupported storage type {storage_type!r} in the checkpoint")
    if key not in self.storages:
      self.storages[key] = _Storage(key, storage_type.dtype)
    return self.storages[key]


def _finish(obj: Any, path: str) -> dict[str, np.ndarray]:
  for key in _WRAPPER_KEYS:
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      obj = obj[key]
      break
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
  out = {}
  for name, value in obj.items():
    if isinstance(value, _Tensor):
      out[str(name)] = value.to_numpy()
  if not out:
    raise ValueError(f"{path}: the checkpoint holds no tensors")
  return out


def _read_zip(path: str) -> dict[str, np.ndarray]:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise ValueError(f"{path}: a torch zip checkpoint holds one data.pkl, found {pickles}")
    prefix = pickles[0][: -len("data.pkl")]
    storages: dict[str, _Storage] = {}
    obj = _Unpickler(io.BytesIO(archive.read(pickles[0])), storages).load()
    for key, storage in storages.items():
      raw = archive.read(f"{prefix}data/{key}")
      storage.data = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"))
  return _finish(obj, path)


def _read_legacy(path: str) -> dict[str, np.ndarray]:
  with open(path, "rb") as f:
    magic = pickle.load(f)
    if magic != _LEGACY_MAGIC:
      raise ValueError(f"{path} is not a PyTorch checkpoint (no zip archive, no legacy magic)")
    pickle.load(f)  # protocol version
    sys_info = pickle.load(f)
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
      raise ValueError(f"{path}: big-endian checkpoints are not supported")
    storages: dict[str, _Storage] = {}
    obj = _Unpickler(f, storages).load()
    keys = pickle.load(f)
    for key in keys:
      storage = storages.get(str(key))
      if storage is None:
        raise ValueError(f"{path}: storage {key!r} is listed but never used")
      (count,) = struct.unpack("<q", f.read(8))
      raw = f.read(count * storage.dtype.itemsize)
      if len(raw) != count * storage.dtype.itemsize:
        raise ValueError(f"{path} is truncated (storage {key!r})")
      storage.data = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"))
  return _finish(obj, path)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """`{name: array}` of a `.safetensors` file (its `__metadata__` entry is skipped)."""
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
    (length,) = struct.unpack("<Q", head)
    size = os.path.getsize(path)
    if length > size - 8:
      raise ValueError(f"{path} is not a safetensors file (header of {length} bytes)")
    try:
      header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
      raise ValueError(f"{path} is not a safetensors file ({error})") from None
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
    if dtype is None:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    dtype = np.dtype(dtype).newbyteorder("<")
    if end > len(data) or end - start != int(np.prod(shape)) * dtype.itemsize:
      raise ValueError(f"{path}: tensor {name!r} has inconsistent offsets {start}..{end}")
    out[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(shape).copy()
  return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """`{name: numpy array}` from a PyTorch checkpoint (zip or legacy) or a `.safetensors` file.

  Raises:
    ValueError: the file is missing, of another format, truncated, or would need code
      beyond a plain state dict to unpickle.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"weights file {path!r} does not exist")
  try:
    if path.endswith(".safetensors"):
      return read_safetensors(path)
    if zipfile.is_zipfile(path):
      return _read_zip(path)
    return _read_legacy(path)
  except (pickle.UnpicklingError, EOFError, KeyError, zipfile.BadZipFile, struct.error) as error:
    raise ValueError(f"{path}: cannot read it as a PyTorch checkpoint ({error!r})") from None
