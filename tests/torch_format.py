"""Writers of PyTorch checkpoints and safetensors files for tests, without torch.

`save_torch(state, path)` writes what `torch.save(state_dict, path)` writes for float32 CPU
tensors (torch >= 1.6's zip format: `archive/data.pkl` with persistent storage ids, one
`archive/data/KEY` file of little-endian bytes per storage); `save_torch_legacy` torch's
legacy stream (`torch.save(..., _use_new_zipfile_serialization=False)`: pickles of the magic
number, protocol version, sys_info, the object and the storage keys, then each storage as an
8-byte element count and its bytes); `save_safetensors` the safetensors layout (8-byte header
length, JSON header, raw bytes). They follow the formats' public descriptions and exist so
the readers can be tested on files made here.

The lower-level pieces build hostile files too: `torch_pickle` pickles any object holding
`Storage`/`Tensor` placeholders (any offset, size, stride), `Global` references and `Reduce`,
`Build`, `PersistentId` (any call, state setting, persistent id); `write_zip`, `write_raw_zip`
(members that lie about their size), `write_legacy` and `write_safetensors` assemble the
parts, each replaceable.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import zipfile

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
LEGACY_SYS_INFO = {
  "protocol_version": LEGACY_PROTOCOL,
  "little_endian": True,
  "type_sizes": {"short": 2, "int": 4, "long": 4},
}


class Global:
  """A reference to `module.name` in the pickle (GLOBAL), as torch's pickler writes."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name


class Storage:
  """A storage's persistent id: ("storage", torch.<dtype>, key, "cpu", numel)."""

  def __init__(self, key: str, numel: int, dtype: str = "FloatStorage"):
    self.key, self.numel, self.dtype = key, numel, dtype


class Tensor:
  """`_rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict())`; the stride
  defaults to the contiguous one."""

  def __init__(self, storage: Storage, shape, offset=0, stride=None):
    if stride is None:
      stride = tuple(int(np.prod(shape[i + 1 :])) for i in range(len(shape)))
    self.storage, self.shape, self.offset, self.stride = storage, shape, offset, stride


class PersistentId:
  """A persistent id of any shape (BINPERSID), where a storage's would be."""

  def __init__(self, pid):
    self.pid = pid


class Reduce:
  """`function(*args)` in the pickle (REDUCE), `function` a `Global`."""

  def __init__(self, function: Global, args: tuple):
    self.function, self.args = function, args


class Build:
  """`obj` with `state` set on it (BUILD)."""

  def __init__(self, obj, state):
    self.obj, self.state = obj, state


class _Pickler(pickle._Pickler):
  def __init__(self, file, legacy: bool):
    super().__init__(file, protocol=2)
    self.legacy = legacy

  def persistent_id(self, obj):
    if isinstance(obj, PersistentId):
      return obj.pid
    if isinstance(obj, Storage):
      pid = ("storage", Global("torch", obj.dtype), obj.key, "cpu", obj.numel)
      return pid + (None,) if self.legacy else pid  # legacy: and no view
    return None

  def save(self, obj, save_persistent_id=True):
    if isinstance(obj, Global):
      self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
      return
    if isinstance(obj, Tensor):
      args = (obj.storage, obj.offset, obj.shape, obj.stride, False, collections.OrderedDict())
      obj = Reduce(Global("torch._utils", "_rebuild_tensor_v2"), args)
    if isinstance(obj, Reduce):
      self.save(obj.function)
      self.save(obj.args)
      self.write(pickle.REDUCE)
      return
    if isinstance(obj, Build):
      self.save(obj.obj)
      self.save(obj.state)
      self.write(pickle.BUILD)
      return
    super().save(obj, save_persistent_id)


def torch_pickle(obj, *, legacy: bool = False) -> bytes:
  """`obj` pickled as torch does (protocol 2), its `Storage`s as persistent ids."""
  buffer = io.BytesIO()
  _Pickler(buffer, legacy).dump(obj)
  return buffer.getvalue()


def state_parts(state: dict[str, np.ndarray]) -> tuple[collections.OrderedDict, dict[str, bytes]]:
  """(name -> `Tensor`, storage key -> little-endian float32 bytes) of float32 arrays."""
  tensors, records = collections.OrderedDict(), {}
  for i, (name, value) in enumerate(state.items()):
    value = np.ascontiguousarray(value, dtype="<f4")
    tensors[name] = Tensor(Storage(str(i), value.size), tuple(int(s) for s in value.shape))
    records[str(i)] = value.tobytes()
  return tensors, records


def write_zip(
  path: str,
  data_pkl: bytes,
  records: dict[str, bytes],
  *,
  prefix: str = "archive",
  compression: int = zipfile.ZIP_STORED,
) -> None:
  """A torch zip checkpoint: `prefix/data.pkl` and one `prefix/data/KEY` per record."""
  with zipfile.ZipFile(path, "w", compression=compression) as archive:
    archive.writestr(f"{prefix}/data.pkl", data_pkl)
    archive.writestr(f"{prefix}/byteorder", "little")
    for key, blob in records.items():
      archive.writestr(f"{prefix}/data/{key}", blob)
    archive.writestr(f"{prefix}/version", "3\n")


def write_raw_zip(path: str, members: list[tuple[str, bytes, int, int, int]]) -> None:
  """A zip archive written byte by byte, so that members can lie: each (name, stored bytes,
  compression method (0 stored, 8 deflated), CRC-32, declared uncompressed size)."""
  out, directory = bytearray(), bytearray()
  for name, data, method, crc, size in members:
    encoded = name.encode()
    fields = (20, 0, method, 0, 0x21, crc, len(data), size, len(encoded))
    directory += struct.pack("<4sH", b"PK\x01\x02", 20) + struct.pack("<3H2H3L2H", *fields, 0)
    directory += struct.pack("<3H2L", 0, 0, 0, 0, len(out)) + encoded
    out += struct.pack("<4s3H2H3L2H", b"PK\x03\x04", *fields, 0) + encoded + data
  end = struct.pack(
    "<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(directory), len(out), 0
  )
  with open(path, "wb") as f:
    f.write(bytes(out + directory + end))


def write_legacy(
  path: str,
  object_pkl: bytes,
  records: dict[str, tuple[int, bytes]],
  *,
  magic: bytes | None = None,
  protocol: bytes | None = None,
  sys_info: bytes | None = None,
  keys: bytes | None = None,
) -> None:
  """torch's legacy stream; `records`: key -> (element count, bytes), written in that order.
  `magic`, `protocol`, `sys_info`, `keys`: raw pickles replacing the ones torch writes."""
  parts = [
    magic if magic is not None else pickle.dumps(LEGACY_MAGIC, protocol=2),
    protocol if protocol is not None else pickle.dumps(LEGACY_PROTOCOL, protocol=2),
    sys_info if sys_info is not None else pickle.dumps(LEGACY_SYS_INFO, protocol=2),
    object_pkl,
    keys if keys is not None else pickle.dumps(list(records), protocol=2),
  ]
  for count, blob in records.values():
    parts += [struct.pack("<q", count), blob]
  with open(path, "wb") as f:
    f.write(b"".join(parts))


def save_torch(state: dict[str, np.ndarray], path: str, *, extra_global: tuple | None = None):
  """Writes `state` (float32 arrays) as a torch zip checkpoint; `extra_global` adds a global
  reference (module, name) to the pickle, as a malicious file would."""
  tensors, records = state_parts(state)
  if extra_global is not None:
    tensors["payload"] = Global(*extra_global)
  write_zip(path, torch_pickle(tensors), records)


def save_torch_legacy(state: dict[str, np.ndarray], path: str) -> None:
  """Writes `state` (float32 arrays) as torch's legacy (pre-zip) stream."""
  tensors, records = state_parts(state)
  write_legacy(
    path,
    torch_pickle(tensors, legacy=True),
    {key: (len(blob) // 4, blob) for key, blob in records.items()},
  )


def write_safetensors(path: str, header: dict | bytes, data: bytes, *, length=None) -> None:
  """A safetensors file of `header` (a dict, or raw bytes) and `data`; `length` overrides
  the header length the first 8 bytes declare."""
  encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded) if length is None else length))
    f.write(encoded)
    f.write(data)


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
  write_safetensors(path, header, b"".join(blobs))
