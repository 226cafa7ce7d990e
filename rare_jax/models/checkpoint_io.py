"""Reading other frameworks' weight files without their frameworks: one home for the formats.

`read_state_dict(path, max_bytes=...)` returns `{name: numpy array}` from
- a PyTorch checkpoint (`torch.save`): the zip format (torch >= 1.6, e.g. torchvision's
  `.pth` files) and the legacy pickle stream (e.g. the EfficientNet-Lite `.pth` files);
- a `.safetensors` file (timm and Hugging Face).
torch is not needed. A checkpoint that wraps its state dict (`{"state_dict": ...}`,
`{"model": ...}`) is unwrapped.

Weight files come from anywhere, so the reader treats every file as hostile:
- Code. PyTorch checkpoints are pickles, and unpickling can run arbitrary code. Every pickle
  (the zip's data.pkl; the legacy stream's magic number, protocol version, sys_info, object
  and storage keys) is first scanned opcode by opcode (`_scan_pickle`) and only then
  unpickled. The object pickle admits the few globals a state dict is made of (tensor
  rebuild functions, storage types, an empty `OrderedDict`); the other pickles admit no
  global at all.
- Bounds. A tensor's storage offset, size and stride are Python ints, checked non-negative
  and inside its storage before any view is made; safetensors offsets must tile the data.
- Memory. `max_bytes` caps what a file can make the reader allocate, checked before
  allocating: the storages it reads, the arrays it returns, and a worst-case estimate of the
  Python objects its pickles, JSON header and zip directory expand to. Pickles, headers,
  zip directories and tensor counts have fixed caps besides (`MAX_*` below). Zip members are
  read only as far as they declare, so only stored and deflated members are read (zipfile
  decompresses a bzip2 or LZMA chunk whole).
- Objects. BUILD may set only torch's `_metadata` on an OrderedDict (and nothing on the
  reader's own objects); the state dict is walked with dict's methods, never attributes.
- Files. Only a regular file is read: it is opened once without blocking (a FIFO swapped in
  cannot make the reader wait for a writer), then checked by fstat.
- Errors. Anything malformed is one `ValueError` naming the file and what is wrong.
"""

from __future__ import annotations

import collections
import io
import json
import lzma
import math
import operator
import os
import pickle
import pickletools
import reprlib
import stat
import struct
import zipfile
import zlib
from typing import Any

import ml_dtypes
import numpy as np

_MiB = 1 << 20
# What a file may make the reader allocate when the caller gives no cap: 1 GiB, 2.5x what a
# float64 ResNet-50 needs (its storages and the arrays made from them, 2 x 205 MB).
DEFAULT_MAX_BYTES = 1 << 30
# A ResNet-50 state dict holds 320 tensors (373 with num_batches_tracked), an EfficientNet-Lite2
# ~400; a training checkpoint with Adam's state about three times that.
MAX_TENSORS = 16_384
# A pickle costs ~140 bytes a tensor (EfficientNet-Lite0's: 42 KB for 296), so 2 MiB holds
# MAX_TENSORS; a ResNet-50's safetensors header is ~40 KB (~140 bytes a tensor too), and 4 MiB
# leaves room for metadata. (The format's reference implementation allows 100 MB: it serves
# LLMs of 10^4..10^5 tensors. Parsing 100 MB of JSON takes ~1.5 GB of Python objects.)
MAX_PICKLE_BYTES = 2 * _MiB
MAX_HEADER_BYTES = 4 * _MiB
_MAX_SMALL_PICKLE_BYTES = 4096  # the legacy magic number, protocol version and sys_info
_MAX_ZIP_DIRECTORY_BYTES = 4 * _MiB  # ~100 bytes an entry; one entry per storage
_MAX_NDIM = 32
_MAX_INDEX = 1 << 63  # torch's sizes, strides and offsets are int64
# Dict keys other than strings (ints, tuples: hashes a file can make collide, which makes
# inserting them quadratic) a pickle may hold; an optimizer's state has one per parameter.
_MAX_OTHER_KEYS = 4096
# Worst-case bytes of Python objects per byte of input, measured on CPython 3.11: a 1-byte
# EMPTY_DICT opcode is a 72-byte dict (sets, 224 bytes, are refused); `[],` in JSON a 64-byte
# list; a zip directory parses into ~11 bytes of ZipInfo per byte.
_PICKLE_EXPANSION = 80
_JSON_EXPANSION = 32
_ZIP_DIRECTORY_EXPANSION = 16

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
_LEGACY_PROTOCOL = 1001
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80


def _show(value: Any) -> str:
  """A short repr of a value from the file (which may be huge or deeply nested)."""
  return _REPR.repr(value)


class _Bad(ValueError):
  """What is wrong with the file, in words (`read_state_dict` adds the file's name)."""


class _Budget:
  """What is left of `max_bytes`; `charge` refuses before anything is allocated."""

  def __init__(self, max_bytes: int):
    self.max_bytes = self.left = max_bytes

  def charge(self, nbytes: int, what: str) -> None:
    if nbytes > self.left:
      raise _Bad(
        f"{what} would take {nbytes:,} bytes, over the reader's cap (max_bytes={self.max_bytes:,}"
        f", of which {self.left:,} are left)"
      )
    self.left -= nbytes


def _index(value: Any, what: str) -> int:
  if type(value) is not int or not 0 <= value < _MAX_INDEX:
    raise _Bad(f"{what} is {_show(value)}; expected an int in [0, 2**63)")
  return value


def _indices(value: Any, what: str) -> tuple[int, ...]:
  if type(value) not in (tuple, list) or len(value) > _MAX_NDIM:
    raise _Bad(f"{what} is {_show(value)}; expected a tuple of at most {_MAX_NDIM} ints")
  return tuple(_index(v, f"an entry of {what} {_show(value)}") for v in value)


# --- pickles ------------------------------------------------------------------------------------

# Opcodes of plain data. Refused everywhere: INST, OBJ, NEWOBJ(_EX) and EXT1/2/4 (objects a state
# dict never holds), sets (224 bytes from 1), BYTEARRAY8 and out-of-band buffers.
_DATA_OPCODES = frozenset(
  """PROTO FRAME STOP MARK POP POP_MARK DUP INT BININT BININT1 BININT2 LONG LONG1 LONG4 STRING
  BINSTRING SHORT_BINSTRING BINBYTES SHORT_BINBYTES BINBYTES8 UNICODE SHORT_BINUNICODE
  BINUNICODE BINUNICODE8 NONE NEWTRUE NEWFALSE FLOAT BINFLOAT EMPTY_LIST APPEND APPENDS LIST
  EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_DICT DICT SETITEM SETITEMS GET BINGET
  LONG_BINGET PUT BINPUT LONG_BINPUT MEMOIZE""".split()
)
# Opcodes the object pickle also needs: globals (each passes find_class), calls, persistent ids.
_CALL_OPCODES = frozenset("GLOBAL STACK_GLOBAL REDUCE BUILD PERSID BINPERSID".split())
_MEMO_PUTS = frozenset(("PUT", "BINPUT", "LONG_BINPUT"))
_MEMO_GETS = frozenset(("GET", "BINGET", "LONG_BINGET"))
_STRING_KINDS = frozenset(
  (pickletools.pyunicode, pickletools.pystring, pickletools.pybytes, pickletools.pybytes_or_str)
)


def _scan_pickle(data: bytes, what: str, *, limit: int, calls: bool) -> int:
  """Checks a pickle's opcodes before it is unpickled; returns its length (through STOP).

  `data` may run past the pickle (a legacy stream); a pickle longer than `limit` is refused.
  Refused besides opcodes outside the allow-list: memo indices beyond the opcodes seen (the C
  unpickler grows its memo to twice the index), FRAMEs past the data, more than
  `_MAX_OTHER_KEYS` dict keys that are not strings (the stack is simulated, kinds only), and
  counted strings longer than the data (genops reads them first; the unpickler would allocate
  the claimed length before reading).
  """
  allowed = _DATA_OPCODES | _CALL_OPCODES if calls else _DATA_OPCODES
  stack: list = []  # the kinds (pickletools stack types) above the innermost mark
  marks: list[list] = []
  memo: dict[int, Any] = {}
  other_keys = count = 0
  ops = pickletools.genops(data)
  while True:
    try:
      opcode, arg, pos = next(ops)
    except ValueError as error:  # truncated, an unknown opcode, a malformed argument
      cut = f" (its cap is {limit:,} bytes)" if len(data) > limit else ""
      raise _Bad(f"its {what} pickle is malformed or truncated{cut}: {error}") from None
    count += 1
    name = opcode.name
    if name not in allowed:
      if name in ("GLOBAL", "INST"):
        needs = "needs " + ".".join(_show(part)[1:-1] for part in arg.split(" ", 1))
      else:
        needs = f"uses opcode {name}"
      admitted = (
        "only tensors, storages and OrderedDict are admitted"
        if calls
        else "only plain data (numbers, strings, lists, dicts) is admitted there"
      )
      raise _Bad(f"its {what} pickle {needs}; refusing to unpickle it ({admitted})")
    if name == "STOP" and pos + 1 > limit or pos >= limit:
      raise _Bad(f"its {what} pickle is longer than the reader's cap of {limit:,} bytes")
    if name in _MEMO_PUTS and arg > count:
      raise _Bad(f"its {what} pickle stores memo entry {arg} after {count} opcodes")
    if name == "FRAME" and arg > len(data) - pos - 9:
      raise _Bad(f"its {what} pickle declares a frame of {arg:,} bytes past its end")
    before = opcode.stack_before
    items = ()
    if pickletools.markobject in before:
      if not marks:
        raise _Bad(f"its {what} pickle uses {name} without a MARK")
      items, stack = stack, marks.pop()
      below = before.index(pickletools.markobject)
    elif name == "POP" and not stack and marks:
      stack = marks.pop()  # the C unpickler pops a mark when nothing is above it
      continue
    else:
      below = len(before)
    if len(stack) < below:
      raise _Bad(f"its {what} pickle's {name} at byte {pos} underflows the stack")
    popped = stack[len(stack) - below :]
    del stack[len(stack) - below :]
    keys = popped[1:2] if name == "SETITEM" else items[0::2] if name in ("SETITEMS", "DICT") else ()
    other_keys += sum(kind not in _STRING_KINDS for kind in keys)
    if other_keys > _MAX_OTHER_KEYS:
      raise _Bad(f"its {what} pickle has over {_MAX_OTHER_KEYS} dict keys that are not strings")
    if name == "STOP":
      return pos + 1
    if name == "MARK":
      marks.append(stack)
      stack = []
    elif name in _MEMO_GETS:
      if arg not in memo:
        raise _Bad(f"its {what} pickle reads memo entry {arg}, never stored")
      stack.append(memo[arg])
    elif name in _MEMO_PUTS:
      if not stack:
        raise _Bad(f"its {what} pickle's {name} at byte {pos} underflows the stack")
      memo[arg] = stack[-1]
    elif name == "MEMOIZE":
      memo[len(memo)] = popped[0]
      stack.append(popped[0])
    elif name == "DUP":
      stack += popped * 2
    else:
      stack += opcode.stack_after


def _checked_pickle(data: bytes, what: str, limit: int, budget: _Budget, *, calls: bool) -> bytes:
  """The pickle at the start of `data`, scanned, its Python objects charged to `budget`."""
  end = _scan_pickle(data, what, limit=limit, calls=calls)
  budget.charge(end * _PICKLE_EXPANSION, f"unpickling its {what} pickle ({end:,} bytes)")
  return data[:end]


def _next_pickle(f, size: int, what: str, limit: int, budget: _Budget, *, calls=False) -> bytes:
  """The pickle at `f`'s position (at most `limit` bytes); leaves `f` just after it."""
  start = f.tell()
  chunk = f.read(max(0, min(limit + 1, size - start)))  # read(n) allocates n bytes first
  data = _checked_pickle(chunk, what, limit, budget, calls=calls)
  f.seek(start + len(data))
  return data


class _Sealed:
  """An object the unpickler hands to the pickle; setting its state (BUILD) is refused."""

  __slots__ = ()

  def __setstate__(self, state):
    raise _Bad(f"the pickle sets the state of a {type(self).__name__[1:]} (BUILD)")


class _Admitted(_Sealed):
  """A global the object pickle may call (REDUCE)."""

  __slots__ = ("name", "function")

  def __init__(self, name: str, function):
    self.name, self.function = name, function

  def __call__(self, *args):
    return self.function(*args)


class _StorageType(_Sealed):
  __slots__ = ("name", "dtype")

  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name]).newbyteorder("<")


class _Storage(_Sealed):
  """A storage as its persistent id declares it; its bytes are filled in once read."""

  __slots__ = ("key", "dtype", "numel", "data")

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel
    self.data: np.ndarray | None = None

  @property
  def nbytes(self) -> int:
    return self.numel * self.dtype.itemsize


class _Tensor(_Sealed):
  """A view of a storage, checked to lie inside it (Python ints: nothing overflows)."""

  __slots__ = ("storage", "offset", "size", "stride", "numel")

  def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
    self.numel = math.prod(size)
    if self.numel:
      last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
      if last >= storage.numel:
        raise _Bad(
          f"a tensor of size {size}, stride {stride} at offset {offset} reads element {last:,} "
          f"of storage {storage.key!r}, which holds {storage.numel:,}"
        )

  @property
  def nbytes(self) -> int:
    return self.numel * self.storage.dtype.itemsize

  def to_numpy(self) -> np.ndarray:
    data = self.storage.data
    if data is None:
      raise _Bad(f"storage {self.storage.key!r} is missing from the checkpoint")
    if not self.numel:
      return np.empty(self.size, data.dtype)
    # A dimension of size 1 never moves: its stride (any int64 in torch) is not multiplied.
    pairs = zip(self.size, self.stride, strict=True)
    strides = tuple(s * data.itemsize if n > 1 else 0 for n, s in pairs)
    view = np.lib.stride_tricks.as_strided(
      data[self.offset :], shape=self.size, strides=strides, writeable=False
    )
    return np.array(view)


class _OrderedDict(collections.OrderedDict):
  """The OrderedDict a state dict is. torch sets `_metadata` (a dict of module versions) on it
  by BUILD; any other attribute (`items`, which would shadow the method) is refused, and
  `_metadata` itself is dropped: the reader never looks at attributes of the file's objects."""

  __slots__ = ()

  def __setstate__(self, state):
    if not (
      type(state) is dict and list(state) == ["_metadata"] and isinstance(state["_metadata"], dict)
    ):
      raise _Bad(
        f"the pickle sets {_show(state)} on an OrderedDict (BUILD); only torch's "
        "{'_metadata': dict} is admitted"
      )


def _ordered_dict(*args):
  if args:
    raise _Bad("the pickle calls OrderedDict with arguments; a state dict builds it empty")
  return _OrderedDict()


def _rebuild_parameter(data, *unused):
  del unused  # requires_grad, backward hooks
  if not isinstance(data, _Tensor):
    raise _Bad(f"a parameter is rebuilt from {_show(data)}, not a tensor")
  return data


class _Unpickler(pickle.Unpickler):
  """The object pickle: admits only what a state dict is made of; storages are placeholders."""

  def __init__(self, data: bytes):
    super().__init__(io.BytesIO(data))
    self.storages: dict[str, _Storage] = {}
    self.tensors = 0
    rebuild = _Admitted("torch._utils._rebuild_tensor_v2", self._rebuild_tensor)
    self.admitted = {
      ("collections", "OrderedDict"): _Admitted("collections.OrderedDict", _ordered_dict),
      ("torch._utils", "_rebuild_tensor_v2"): rebuild,
      ("torch._utils", "_rebuild_tensor"): rebuild,
      ("torch._utils", "_rebuild_parameter"): _Admitted(
        "torch._utils._rebuild_parameter", _rebuild_parameter
      ),
    }

  def find_class(self, module: str, name: str):
    admitted = self.admitted.get((module, name))
    if admitted is not None:
      return admitted
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise _Bad(
      f"the checkpoint needs {_show(module)[1:-1]}.{_show(name)[1:-1]}, which a plain state dict "
      "does not use; refusing to unpickle it (only tensors, storages and OrderedDict are admitted)"
    )

  def persistent_load(self, pid):
    # zip: ("storage", type, key, location, numel); legacy: the same and a view (None).
    if not (
      type(pid) is tuple
      and len(pid) in (5, 6)
      and type(pid[0]) is str
      and pid[0] == "storage"
      and isinstance(pid[1], _StorageType)
      and type(pid[2]) is str
      and len(pid[2]) <= 256
      and type(pid[3]) is str
    ):
      raise _Bad(f"unsupported persistent id {_show(pid)}; expected a storage's")
    if len(pid) == 6 and pid[5] is not None:
      raise _Bad(f"storage {pid[2]!r} is a view of another (torch < 0.4); not supported")
    dtype, key, numel = pid[1].dtype, pid[2], _index(pid[4], f"the size of storage {pid[2]!r}")
    storage = self.storages.get(key)
    if storage is None:
      if len(self.storages) >= MAX_TENSORS:
        raise _Bad(f"the checkpoint has more than {MAX_TENSORS} storages")
      storage = self.storages[key] = _Storage(key, dtype, numel)
    elif (storage.dtype, storage.numel) != (dtype, numel):
      raise _Bad(f"storage {key!r} is declared twice, differently")
    return storage

  def _rebuild_tensor(self, *args):
    # (storage, offset, size, stride, requires_grad, backward_hooks[, metadata])
    if len(args) < 4:
      raise _Bad(f"a tensor is rebuilt from {len(args)} arguments; expected 4 or more")
    storage, offset, size, stride = args[:4]
    if not isinstance(storage, _Storage):
      raise _Bad(f"a tensor's storage is {_show(storage)}, not a storage")
    offset = _index(offset, "a tensor's storage offset")
    size, stride = _indices(size, "a tensor's size"), _indices(stride, "a tensor's stride")
    if len(size) != len(stride):
      raise _Bad(f"a tensor has size {size} but stride {stride}")
    self.tensors += 1
    if self.tensors > MAX_TENSORS:
      raise _Bad(f"the checkpoint has more than {MAX_TENSORS} tensors")
    return _Tensor(storage, offset, size, stride)


class _PlainUnpickler(pickle.Unpickler):
  """The legacy stream's magic number, protocol version, sys_info and keys: no global at all."""

  def __init__(self, data: bytes):
    super().__init__(io.BytesIO(data))

  def find_class(self, module: str, name: str):
    raise _Bad(f"a plain-data pickle needs {_show(module)[1:-1]}.{_show(name)[1:-1]}; refusing it")

  def persistent_load(self, pid):
    raise _Bad("a plain-data pickle holds a persistent id; refusing it")


def _state_dict(obj: Any) -> dict[str, _Tensor]:
  """The tensors of the (possibly wrapped) state dict the object pickle returned."""
  # dict's own methods, never attributes of the file's objects (the pickle makes only dicts and
  # _OrderedDicts, but should one carry an attribute, it is not looked up).
  for key in _WRAPPER_KEYS:
    if isinstance(obj, dict) and isinstance(dict.get(obj, key), dict):
      obj = dict.__getitem__(obj, key)
      break
  if not isinstance(obj, dict):
    raise _Bad(f"expected a state dict (name -> tensor), got {type(obj).__name__}")
  tensors = {}
  for name, value in dict.items(obj):
    if isinstance(value, _Tensor):
      if type(name) not in (str, int):
        raise _Bad(f"a tensor is named {_show(name)}, not a string")
      if str(name) in tensors:
        raise _Bad(f"two tensors are named {str(name)!r}")
      tensors[str(name)] = value
  if not tensors:
    raise _Bad("the checkpoint holds no tensors")
  return tensors


def _storages(tensors: dict[str, _Tensor], budget: _Budget) -> dict[str, _Storage]:
  """The storages `tensors` use, once their bytes and the arrays' are charged to `budget`."""
  storages = {t.storage.key: t.storage for t in tensors.values()}
  budget.charge(sum(s.nbytes for s in storages.values()), "the storages the state dict uses")
  budget.charge(sum(t.nbytes for t in tensors.values()), "the state dict's arrays")
  return storages


def _member_bytes(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
  """A zip member's bytes, its declared size checked against `limit` before reading.

  Only stored (what torch writes) and deflated members are read: zipfile bounds those reads by
  the size asked for (it passes the size to zlib), but decompresses a whole chunk of bzip2 or
  LZMA input (4 KiB or more, which can expand to gigabytes) at once."""
  if info.compress_type not in _ZIP_METHODS:
    raise _Bad(
      f"{info.filename} is compressed with method {info.compress_type} "
      f"({_ZIP_METHOD_NAMES.get(info.compress_type, 'unknown')}); only stored and deflated "
      "members are read"
    )
  if info.file_size > limit:
    raise _Bad(f"{info.filename} holds {info.file_size:,} bytes; at most {limit:,} are expected")
  with archive.open(info) as member:
    raw = member.read(info.file_size)  # never more: the size, not the data, bounds the read
  if len(raw) != info.file_size:
    raise _Bad(f"{info.filename} is truncated ({len(raw):,} of {info.file_size:,} bytes)")
  return raw


_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_ZIP_METHOD_NAMES = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA"}


def _check_zip_directory(f, budget: _Budget) -> None:
  """Refuses a zip directory too large to parse, before `ZipFile` parses all of it."""
  end_record = getattr(zipfile, "_EndRecData", None)  # what ZipFile itself reads first
  if end_record is None:  # a future Python: the file's size still bounds the directory
    return
  record = end_record(f)
  if record is None:
    raise _Bad("it starts like a zip archive but has no end-of-central-directory record")
  directory = record[getattr(zipfile, "_ECD_SIZE", 5)]
  if directory > _MAX_ZIP_DIRECTORY_BYTES:
    raise _Bad(f"its zip directory takes {directory:,} bytes, over the reader's cap of 4 MiB")
  budget.charge(directory * _ZIP_DIRECTORY_EXPANSION, "parsing its zip directory")
  f.seek(0)


def _read_zip(f, budget: _Budget) -> dict[str, np.ndarray]:
  _check_zip_directory(f, budget)
  with zipfile.ZipFile(f) as archive:
    infos = archive.infolist()
    pickles = [i for i in infos if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
    if len(pickles) != 1:
      found = _show([i.filename for i in pickles])
      raise _Bad(f"a torch zip checkpoint holds one data.pkl, found {found}")
    prefix = pickles[0].filename[: -len("data.pkl")]
    members = {i.filename: i for i in infos}
    if prefix + "byteorder" in members:  # torch >= 1.10 writes it
      if _member_bytes(archive, members[prefix + "byteorder"], 16).strip() != b"little":
        raise _Bad("big-endian checkpoints are not supported")
    data = _member_bytes(archive, pickles[0], MAX_PICKLE_BYTES)
    unpickler = _Unpickler(_checked_pickle(data, "data.pkl", len(data), budget, calls=True))
    tensors = _state_dict(unpickler.load())
    for key, storage in _storages(tensors, budget).items():
      info = members.get(f"{prefix}data/{key}")
      if info is None:
        raise _Bad(f"storage {key!r} is missing from the archive")
      if info.file_size != storage.nbytes:
        raise _Bad(
          f"storage {key!r} holds {info.file_size:,} bytes; the pickle declares "
          f"{storage.numel:,} elements of {storage.dtype.itemsize} bytes"
        )
      storage.data = np.frombuffer(_member_bytes(archive, info, storage.nbytes), storage.dtype)
  return {name: tensor.to_numpy() for name, tensor in tensors.items()}


def _read_legacy(f, size: int, budget: _Budget) -> dict[str, np.ndarray]:
  """torch's pickle stream: magic, protocol, sys_info, object and keys pickles, then per key
  (in the keys' order) an 8-byte element count and the storage's bytes."""
  small = _MAX_SMALL_PICKLE_BYTES
  magic = _PlainUnpickler(_next_pickle(f, size, "magic number", small, budget)).load()
  if type(magic) is not int or magic != _LEGACY_MAGIC:
    raise _Bad("neither a zip archive nor a legacy torch stream (no torch magic number first)")
  protocol = _PlainUnpickler(_next_pickle(f, size, "protocol version", small, budget)).load()
  if type(protocol) is not int or protocol != _LEGACY_PROTOCOL:
    raise _Bad(f"legacy protocol version {_show(protocol)}; expected {_LEGACY_PROTOCOL}")
  sys_info = _PlainUnpickler(_next_pickle(f, size, "sys_info", small, budget)).load()
  if type(sys_info) is not dict:
    raise _Bad(f"its sys_info is a {type(sys_info).__name__}, not a dict")
  if not sys_info.get("little_endian", True):
    raise _Bad("big-endian checkpoints are not supported")
  unpickler = _Unpickler(_next_pickle(f, size, "object", MAX_PICKLE_BYTES, budget, calls=True))
  tensors = _state_dict(unpickler.load())
  keys = _PlainUnpickler(_next_pickle(f, size, "storage keys", MAX_PICKLE_BYTES, budget)).load()
  if type(keys) is not list or not all(type(k) in (str, int) for k in keys):
    raise _Bad(f"its storage keys are {_show(keys)}; expected a list of strings")
  needed = _storages(tensors, budget)
  read = set()
  for key in map(str, keys):
    storage = unpickler.storages.get(key)
    if storage is None:
      raise _Bad(f"storage {key!r} is listed but never used")
    if key in read:
      raise _Bad(f"storage {key!r} is listed twice")
    read.add(key)
    head = f.read(8)
    if len(head) != 8:
      raise _Bad(f"the file ends before storage {key!r}")
    (count,) = struct.unpack("<q", head)
    if count != storage.numel:
      raise _Bad(f"storage {key!r} holds {count:,} elements; the pickle declares {storage.numel:,}")
    if storage.nbytes > size - f.tell():
      raise _Bad(f"the file ends inside storage {key!r} ({storage.nbytes:,} bytes)")
    if key in needed:
      storage.data = np.frombuffer(f.read(storage.nbytes), storage.dtype)
    else:  # e.g. an optimizer's, beside the state dict
      f.seek(storage.nbytes, os.SEEK_CUR)
  return {name: tensor.to_numpy() for name, tensor in tensors.items()}


def _read_torch(f, size: int, budget: _Budget) -> dict[str, np.ndarray]:
  zipped = f.read(4) == b"PK\x03\x04"  # torch's own test: a local file header first
  f.seek(0)
  return _read_zip(f, budget) if zipped else _read_legacy(f, size, budget)


# --- safetensors ----------------------------------------------------------------------------------


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  out = dict(pairs)
  if len(out) != len(pairs):
    raise _Bad("its header names an entry twice")
  return out


def _json_constant(name: str):
  raise _Bad(f"its header holds {name}")


def _read_safetensors(f, size: int, budget: _Budget) -> dict[str, np.ndarray]:
  """8 bytes: the header's length N (little-endian); N bytes: a JSON object {name: {dtype, shape,
  data_offsets}} and an optional "__metadata__" {str: str}; then the data, which the tensors'
  [start, end) offsets tile in order from 0 to its end, as the format's reference requires."""
  head = f.read(8)
  if len(head) != 8:
    raise _Bad("shorter than 8 bytes")
  (length,) = struct.unpack("<Q", head)
  if length > MAX_HEADER_BYTES:
    raise _Bad(f"its header takes {length:,} bytes, over the reader's cap of 4 MiB")
  if length > size - 8:
    raise _Bad(f"its header takes {length:,} bytes, more than the file holds")
  budget.charge(length * _JSON_EXPANSION, f"parsing its header ({length:,} bytes)")
  text = f.read(length).decode("utf-8")
  if not text.startswith("{"):
    raise _Bad("its header is not a JSON object")
  try:
    header = json.loads(text, object_pairs_hook=_json_object, parse_constant=_json_constant)
  except RecursionError:
    raise _Bad("its header nests too deeply") from None
  metadata = header.pop("__metadata__", {})
  if type(metadata) is not dict or not all(type(v) is str for v in metadata.values()):
    raise _Bad(f"its __metadata__ is {_show(metadata)}; expected an object of strings")
  if len(header) > MAX_TENSORS:
    raise _Bad(f"it has {len(header):,} tensors, over the reader's cap of {MAX_TENSORS}")
  entries = []
  for name, info in header.items():
    if type(info) is not dict:
      raise _Bad(f"tensor {name!r} is described by {_show(info)}; expected an object")
    dtype = info.get("dtype")
    if type(dtype) is not str or dtype not in _SAFETENSORS_DTYPES:
      raise _Bad(f"tensor {name!r} has unsupported dtype {_show(dtype)}")
    dtype = np.dtype(_SAFETENSORS_DTYPES[dtype]).newbyteorder("<")
    shape = _indices(info.get("shape"), f"the shape of tensor {name!r}")
    offsets = _indices(info.get("data_offsets"), f"the data_offsets of tensor {name!r}")
    if len(offsets) != 2 or offsets[0] > offsets[1]:
      raise _Bad(f"tensor {name!r} has data_offsets {list(offsets)}; expected [start, end]")
    if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
      raise _Bad(
        f"tensor {name!r} of shape {list(shape)} needs {math.prod(shape) * dtype.itemsize:,} "
        f"bytes, its data_offsets {list(offsets)} span {offsets[1] - offsets[0]:,}"
      )
    entries.append((offsets, name, dtype, shape))
  entries.sort(key=lambda entry: entry[0])
  end = 0
  for (start, stop), name, _, _ in entries:
    if start != end:
      what = "overlap the previous" if start < end else "leave a gap after the previous"
      raise _Bad(f"tensor {name!r}'s data_offsets [{start}, {stop}] {what} (which ends at {end})")
    end = stop
  if end != size - 8 - length:
    raise _Bad(f"its tensors cover {end:,} bytes of data; the file holds {size - 8 - length:,}")
  budget.charge(end, "its tensors")
  arrays = {}
  for (start, stop), name, dtype, shape in entries:
    array = np.empty(shape, dtype)
    if f.readinto(array.reshape(-1).view(np.uint8)) != stop - start:
      raise _Bad(f"the file ends inside tensor {name!r}")
    arrays[name] = array
  return {name: arrays[name] for name in header}


# --- entry points -------------------------------------------------------------------------------

# What reading a malformed file can raise besides `ValueError` (json, UnicodeDecodeError and
# pickletools' errors are ValueErrors): all become one ValueError naming the file.
_ERRORS = (
  ValueError,
  pickle.UnpicklingError,
  EOFError,
  KeyError,
  IndexError,
  TypeError,
  AttributeError,
  OverflowError,
  RecursionError,
  MemoryError,
  OSError,
  struct.error,
  zipfile.BadZipFile,
  zipfile.LargeZipFile,
  zlib.error,
  lzma.LZMAError,
  NotImplementedError,  # a zip compression method zipfile lacks
  RuntimeError,  # an encrypted zip member
)


_NOT_REGULAR = (
  (stat.S_ISDIR, "a directory"),
  (stat.S_ISFIFO, "a FIFO (named pipe)"),
  (stat.S_ISCHR, "a character device"),
  (stat.S_ISBLK, "a block device"),
  (stat.S_ISSOCK, "a socket"),
)


def _open_regular(path: str):
  """`path` opened for reading, if it is a regular file (after symlinks); one open, then
  fstat, so that nothing swapped in after a check is read. O_NONBLOCK: opening a FIFO does not
  wait for a writer."""
  flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
  fd = os.open(path, flags)
  try:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
      what = next((name for test, name in _NOT_REGULAR if test(mode)), "not a regular file")
      raise ValueError(f"weights file {path!r} is {what}; expected a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")
  except BaseException:
    os.close(fd)
    raise


def _read(path, kind: str, reader, max_bytes: int) -> dict[str, np.ndarray]:
  path = os.fspath(path)
  max_bytes = operator.index(max_bytes)
  if max_bytes <= 0:
    raise ValueError(f"max_bytes={max_bytes}; expected a positive number of bytes")
  try:
    f = _open_regular(path)
  except FileNotFoundError:
    raise ValueError(f"weights file {path!r} does not exist") from None
  except OSError as error:
    raise ValueError(f"weights file {path!r}: cannot open it: {error.strerror}") from None
  try:
    with f:
      return reader(f, os.fstat(f.fileno()).st_size, _Budget(max_bytes))
  except _ERRORS as error:
    if isinstance(error, _Bad):
      detail = str(error)
    elif isinstance(error, MemoryError):
      detail = "it needs more memory than is available"
    else:
      detail = _show(f"{type(error).__name__}: {error}")[1:-1]
    raise ValueError(f"{path}: cannot read it as a {kind}: {detail}") from error


def read_safetensors(path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, np.ndarray]:
  """`{name: array}` of a `.safetensors` file (its `__metadata__` entry is skipped).

  Raises:
    ValueError: the file is missing or malformed, or would need more than `max_bytes`.
  """
  return _read(path, "safetensors file", _read_safetensors, max_bytes)


def read_state_dict(path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, np.ndarray]:
  """`{name: numpy array}` from a PyTorch checkpoint (zip or legacy) or a `.safetensors` file.

  Args:
    path: the file; `.safetensors` by its name, otherwise a PyTorch checkpoint.
    max_bytes: the most the file may make the reader allocate (see the module's docstring);
      a caller that knows the architecture passes what its parameters need.

  Raises:
    ValueError: the file is missing, of another format, malformed or truncated, would need
      code beyond a plain state dict to unpickle, or more than `max_bytes` to read.
  """
  if os.fspath(path).endswith(".safetensors"):
    return read_safetensors(path, max_bytes=max_bytes)
  return _read(path, "PyTorch checkpoint", _read_torch, max_bytes)
