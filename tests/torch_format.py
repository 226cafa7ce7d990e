"""Writers of PyTorch (zip) checkpoints and safetensors files for tests, without torch.

`save_torch(state, path)` writes what `torch.save(state_dict, path)` writes for float32 CPU
tensors (torch >= 1.6's zip format: `archive/data.pkl` with persistent storage ids, one
`archive/data/KEY` file of little-endian bytes per storage); `save_safetensors` the
safetensors layout (8-byte header length, JSON header, raw bytes). Both follow the formats'
public descriptions; they exist so the readers can be tested on files made here.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import zipfile

import numpy as np


class _Global:
  def __init__(self, module: str, name: str):
    self.module, self.name = module, name


class _Storage:
  def __init__(self, key: str, numel: int):
    self.key, self.numel = key, numel


class _Tensor:
  def __init__(self, storage: _Storage, shape: tuple[int, ...]):
    self.storage, self.shape = storage, shape


class _Pickler(pickle._Pickler):
  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      return ("storage", _Global("torch", "FloatStorage"), obj.key, "cpu", obj.numel)
    return None

  def save(self, obj, save_persistent_id=True):
    if isinstance(obj, _Global):
      self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
      return
    if isinstance(obj, _Tensor):
      strides = tuple(int(np.prod(obj.shape[i + 1 :])) for i in range(len(obj.shape)))
      self.save(_Global("torch._utils", "_rebuild_tensor_v2"))
      self.save((obj.storage, 0, obj.shape, strides, False, collections.OrderedDict()))
      self.write(pickle.REDUCE)
      return
    super().save(obj, save_persistent_id)


def save_torch(state: dict[str, np.ndarray], path: str, *, extra_global: tuple | None = None):
  """Writes `state` (float32 arrays) as a torch zip checkpoint; `extra_global` adds a global
  reference (module, name) to the pickle, as a malicious file would."""
  tensors = collections.OrderedDict()
  blobs = {}
  for i, (name, value) in enumerate(state.items()):
    value = np.ascontiguousarray(value, dtype="<f4")
    storage = _Storage(str(i), value.size)
    tensors[name] = _Tensor(storage, tuple(int(s) for s in value.shape))
    blobs[str(i)] = value.tobytes()
  buffer = io.BytesIO()
  pickler = _Pickler(buffer, protocol=2)
  if extra_global is not None:
    tensors["payload"] = _Global(*extra_global)
  pickler.dump(tensors)
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", buffer.getvalue())
    archive.writestr("archive/byteorder", "little")
    for key, blob in blobs.items():
      archive.writestr(f"archive/data/{key}", blob)
    archive.writestr("archive/version", "3\n")


def save_safetensors(state: dict[str, np.ndarray], path: str) -> None:
  """Writes float32 arrays as a `.safetensors` file."""
  header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
  for name, value in state.items():
    blob = np.ascontiguousarray(value, dtype="<f4").tobytes()
    header[name] = {
      "dtype": "F32",
      "shape": list(value.shape),
      "data_offsets": [offset, offset + len(blob)],
    }
    offset += len(blob)
    blobs.append(blob)
  encoded = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for blob in blobs:
      f.write(blob)
