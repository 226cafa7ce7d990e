"""The weight-file reader (`checkpoint_io`) against hostile files.

Each group is one class of attack: code execution through any of a checkpoint's pickles,
tensor views outside their storage, memory bombs from small files, malformed files that
must be one `ValueError` naming the file, and safetensors offsets that overlap or leave gaps.
Files that would make a vulnerable reader allocate gigabytes or crash are read in a child
process (`read_in_child`): limited to 2 GiB of address space, reporting its outcome and the
reader's peak allocation (tracemalloc sees numpy's buffers).
"""

import bz2
import collections
import json
import os
import pickle
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest

from rare_jax.models import checkpoint_io, pretrained
from tests import torch_format as tf
from tests.torch_format import Build, Global, PersistentId, Reduce, Storage, Tensor

MiB = 1 << 20
GiB = 1 << 30

_CHILD = """
import importlib.util, json, resource, sys, time, tracemalloc
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
spec = importlib.util.spec_from_file_location("checkpoint_io", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
for path in sys.argv[3:]:
  tracemalloc.start()
  start = time.perf_counter()
  try:
    module.read_state_dict(path, **json.loads(sys.argv[2]))
    outcome, message = "loaded", ""
  except ValueError as error:
    outcome, message = "ValueError", str(error)
  except BaseException as error:
    outcome, message = type(error).__name__, str(error)[:300]
  seconds = time.perf_counter() - start
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  result = {"outcome": outcome, "message": message, "peak": peak, "seconds": seconds}
  print(json.dumps(result), flush=True)
"""


def read_in_child(*paths, **kwargs) -> list[dict]:
  """Reads each of `paths` in one child process: each one's outcome (`ValueError`, `loaded`
  or another exception's name), message, peak allocation and seconds."""
  done = subprocess.run(
    [sys.executable, "-c", _CHILD, checkpoint_io.__file__, json.dumps(kwargs), *map(str, paths)],
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
  )
  assert done.returncode == 0, f"the reader died (status {done.returncode}): {done.stderr[-2000:]}"
  results = [json.loads(line) for line in done.stdout.strip().splitlines()]
  assert len(results) == len(paths), done.stdout
  return results


def refused(path, match: str = "", **kwargs) -> tuple[str, int]:
  """The ValueError reading `path` raises (checked to name the file) and the peak bytes."""
  tracemalloc.start()
  try:
    with pytest.raises(ValueError) as error:
      checkpoint_io.read_state_dict(str(path), **kwargs)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  message = str(error.value)
  assert str(path) in message, message
  assert match in message, message
  return message, peak


def zip_of(path, obj, records=None, **kwargs):
  tf.write_zip(str(path), tf.torch_pickle(obj), records or {}, **kwargs)
  return path


def one_tensor(path, offset=0, size=(2,), stride=(1,), numel=4, record=None):
  """A zip checkpoint {"w": a view of a 4-float storage}, any offset, size and stride."""
  storage = Storage("0", numel)
  record = np.arange(4, dtype="<f4").tobytes() if record is None else record
  return zip_of(path, {"w": Tensor(storage, size, offset, stride)}, {"0": record})


# --- 1. no code runs, from any pickle -----------------------------------------------------------


class Evil:
  """Unpickled by plain `pickle`, creates `marker` (a harmless stand-in for os.system)."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def payloads(marker: str) -> dict[str, bytes]:
  """Pickles that call open(marker, "w"): GLOBAL+REDUCE (protocol 2, as torch writes),
  STACK_GLOBAL with framing (protocol 4), INST (protocol 0)."""
  return {
    "global": pickle.dumps(Evil(marker), protocol=2),
    "stack_global": pickle.dumps(Evil(marker), protocol=4),
    "inst": b"(S'" + marker.encode() + b"'\nS'w'\niio\nopen\n.",
  }


def message_of(path) -> str:
  """The ValueError's message reading `path` raises, or "loaded"."""
  try:
    checkpoint_io.read_state_dict(str(path))
  except ValueError as error:
    return str(error)
  return "loaded"


SLOTS = ("magic", "protocol", "sys_info", "object", "keys")


@pytest.mark.parametrize("kind", ["global", "stack_global", "inst"])
@pytest.mark.parametrize("slot", SLOTS)
def test_no_legacy_pickle_runs_code(tmp_path, slot, kind):
  marker = str(tmp_path / "MARKER")
  payload = payloads(marker)[kind]
  blob = np.ones(2, "<f4").tobytes()
  parts = {
    "object": tf.torch_pickle({"w": Tensor(Storage("0", 2), (2,))}, legacy=True),
    slot: payload,
  }
  path = tmp_path / "evil.pth"
  tf.write_legacy(str(path), parts.pop("object"), {"0": (2, blob)}, **parts)
  message = message_of(path)
  assert not os.path.exists(marker), "the file ran code"
  assert str(path) in message and "refusing" in message, message
  assert "io.open" in message or "opcode STACK_GLOBAL" in message, message


@pytest.mark.parametrize("kind", ["global", "stack_global", "inst"])
def test_no_zip_pickle_runs_code(tmp_path, kind):
  marker = str(tmp_path / "MARKER")
  inside = {"w": Tensor(Storage("0", 2), (2,)), "x": Reduce(Global("io", "open"), (marker, "w"))}
  for data_pkl in (payloads(marker)[kind], tf.torch_pickle(inside)):
    path = tmp_path / "evil.pth"
    tf.write_zip(str(path), data_pkl, {"0": bytes(8)})
    message = message_of(path)
    assert not os.path.exists(marker), "the file ran code"
    assert str(path) in message and "io.open" in message, message


def test_a_file_cannot_set_state_on_the_readers_objects(tmp_path):
  """BUILD could change a tensor after its bounds were checked, or the reader's own functions
  (their __defaults__) for every later file: refused."""
  storage = Storage("0", 4)
  tensor = Build(Tensor(storage, (2,)), (None, {"offset": -3}))
  zip_of(tmp_path / "a.pth", {"w": tensor}, {"0": bytes(16)})
  refused(tmp_path / "a.pth", "BUILD")
  function = Build(Global("torch._utils", "_rebuild_tensor_v2"), (None, {"__defaults__": (1,)}))
  zip_of(tmp_path / "b.pth", {"w": Tensor(storage, (2,)), "f": function}, {"0": bytes(16)})
  refused(tmp_path / "b.pth", "BUILD")
  hooks = Reduce(Global("collections", "OrderedDict"), ([("k", 1)],))
  zip_of(tmp_path / "c.pth", {"w": Tensor(storage, (2,)), "h": hooks}, {"0": bytes(16)})
  refused(tmp_path / "c.pth", "OrderedDict")


@pytest.mark.parametrize(
  "state",
  [
    {"items": Global("collections", "OrderedDict")},  # what `_state_dict` would call
    {"keys": 1},
    {"_metadata": collections.OrderedDict(), "note": 1},
    {"_metadata": 3},
    (None, {"items": Global("collections", "OrderedDict")}),  # slot-state form
    (None, {"_metadata": collections.OrderedDict()}),
    ({"_metadata": collections.OrderedDict()}, {"items": 1}),
  ],
)
def test_build_on_an_ordered_dict_sets_only_torchs_metadata(tmp_path, state):
  """torch writes a state dict as an OrderedDict whose BUILD sets `_metadata` (a dict); any
  other attribute (`items`, which shadows the method the reader calls) is refused."""
  tensors = collections.OrderedDict(w=Tensor(Storage("0", 2), (2,)))
  zip_of(tmp_path / "a.pth", Build(tensors, state), {"0": bytes(8)})
  refused(tmp_path / "a.pth", "BUILD")
  metadata = {"_metadata": collections.OrderedDict([("", {"version": 1})])}
  zip_of(tmp_path / "ok.pth", Build(tensors, metadata), {"0": bytes(8)})
  assert list(checkpoint_io.read_state_dict(str(tmp_path / "ok.pth"))) == ["w"]


# --- 2. tensor views stay inside their storage -----------------------------------------------


@pytest.mark.parametrize(
  "offset, size, stride",
  [
    (-2, (2,), (1,)),  # negative offset
    (0, (3,), (-1,)),  # negative stride: reads before the storage
    (3, (2, 2), (1, -2)),
    (4, (1,), (1,)),  # offset at the end
    (0, (5,), (1,)),  # past the end
    (0, (2,), (4,)),
    (0, (2,), (2**62,)),
    (2**62, (2,), (2**62,)),
    (0, (2,), (2**64,)),  # not an int64
    (1.0, (2,), (1,)),
    ("1", (2,), (1,)),
    (True, (2,), (1,)),
    (0, (2.0,), (1,)),
    (0, (True,), (1,)),
    (0, ("2",), (1,)),
    (0, (-1,), (1,)),
    (0, (2,), (1, 1)),  # len(size) != len(stride)
    (0, 2, (1,)),
    (0, (1,) * 40, (1,) * 40),
  ],
)
def test_tensor_views_outside_their_storage_are_refused(tmp_path, offset, size, stride):
  refused(one_tensor(tmp_path / "view.pth", offset, size, stride))


@pytest.mark.parametrize("stride", [-(2**20), -(2**40)])
def test_a_far_negative_stride_does_not_crash_the_process(tmp_path, stride):
  """A view reaching 4 MiB or 4 TiB before its storage: read, or a SIGSEGV, unchecked."""
  (result,) = read_in_child(one_tensor(tmp_path / "segv.pth", 0, (2,), (stride,)))
  assert result["outcome"] == "ValueError", result
  assert "stride" in result["message"], result


def test_views_inside_their_storage_load_as_torch_lays_them_out(tmp_path):
  base = np.arange(12, dtype="<f4")
  storage = Storage("0", 12)
  views = {
    "full": (Tensor(storage, (3, 4)), base.reshape(3, 4)),
    "transposed": (Tensor(storage, (4, 3), 0, (1, 4)), base.reshape(3, 4).T),
    "slice": (Tensor(storage, (4,), 4, (1,)), base[4:8]),
    "broadcast": (Tensor(storage, (2, 3), 0, (0, 1)), np.broadcast_to(base[:3], (2, 3))),
    "unit_dim": (Tensor(storage, (1, 3), 9, (2**62, 1)), base[9:].reshape(1, 3)),
    "empty": (Tensor(storage, (0, 5), 12, (5, 1)), np.zeros((0, 5), "<f4")),
  }
  obj = collections.OrderedDict((name, tensor) for name, (tensor, _) in views.items())
  zip_of(tmp_path / "v.pth", obj, {"0": base.tobytes()})
  tf.write_legacy(
    str(tmp_path / "v_legacy.pth"), tf.torch_pickle(obj, legacy=True), {"0": (12, base.tobytes())}
  )
  for path in ("v.pth", "v_legacy.pth"):
    state = checkpoint_io.read_state_dict(str(tmp_path / path))
    assert list(state) == list(views)
    for name, (_, want) in views.items():
      assert state[name].dtype == np.float32 and state[name].shape == want.shape, name
      np.testing.assert_array_equal(state[name], want, err_msg=name)


def test_legacy_round_trip_and_storage_counts(tmp_path):
  state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
  tf.save_torch_legacy(state, str(tmp_path / "ok.pth"))
  read = checkpoint_io.read_state_dict(str(tmp_path / "ok.pth"))
  for name in state:
    np.testing.assert_array_equal(read[name], state[name])
  obj = tf.torch_pickle({"w": Tensor(Storage("0", 4), (4,))}, legacy=True)
  for count in (3, 5, -1, 2**62):
    tf.write_legacy(str(tmp_path / "n.pth"), obj, {"0": (count, bytes(16))})
    refused(tmp_path / "n.pth", "elements")


# --- 3. what a file may make the reader allocate ----------------------------------------------


def test_stride_zero_bomb_is_refused_before_allocating(tmp_path):
  """A 360-byte file whose one float is broadcast to 2**31 (8 GiB); the default cap is 1 GiB."""
  path = one_tensor(tmp_path / "bomb.pth", 0, (2**31,), (0,), numel=1, record=bytes(4))
  assert os.path.getsize(path) < 1000
  (result,) = read_in_child(path)
  assert result["outcome"] == "ValueError" and "max_bytes" in result["message"], result
  assert result["peak"] < MiB, result
  # A broadcast the cap allows loads as torch would lay it out; a lower cap refuses it.
  path = one_tensor(tmp_path / "wide.pth", 0, (2**20,), (0,), numel=1, record=bytes(4))
  assert checkpoint_io.read_state_dict(str(path))["w"].shape == (2**20,)
  _, peak = refused(path, "max_bytes", max_bytes=2 * MiB)
  assert peak < MiB


def deflated_zeros(nbytes: int) -> bytes:
  """A raw deflate stream of `nbytes` zero bytes (a multiple of 1 MiB), ~1/1000 the size."""
  compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
  chunk = compressor.compress(bytes(MiB)) + compressor.flush(zlib.Z_FULL_FLUSH)
  return chunk * (nbytes // MiB) + compressor.flush()


@pytest.mark.parametrize("declared", ["honestly", "by_the_member_only", "as_4_bytes"])
def test_zip_bomb_is_refused_before_decompressing(tmp_path, declared):
  """A ~2 MB member that inflates to 2 GiB: its declared size is refused before reading; a
  member that declares 4 bytes is read no further than that (and fails its CRC)."""
  size = 2 * GiB
  numel = size // 4 if declared == "honestly" else 1
  data_pkl = tf.torch_pickle({"w": Tensor(Storage("0", numel), (1,))})
  path = tmp_path / "bomb.pth"
  tf.write_raw_zip(
    str(path),
    [
      ("archive/data.pkl", data_pkl, 0, zlib.crc32(data_pkl), len(data_pkl)),
      ("archive/data/0", deflated_zeros(size), 8, 0, 4 if declared == "as_4_bytes" else size),
    ],
  )
  assert os.path.getsize(path) < 3 * MiB
  (result,) = read_in_child(path)
  assert result["outcome"] == "ValueError", result
  assert result["peak"] < 16 * MiB, result


def bomb_member(method: int, nbytes: int) -> bytes:
  """`nbytes` zeros compressed as a zip member of `method` (bzip2 ~1/10^6, LZMA ~1/7000)."""
  if method == zipfile.ZIP_BZIP2:
    return bz2.compress(bytes(nbytes), 9)
  compressor = zipfile.LZMACompressor()  # zipfile's LZMA member layout (a header, then LZMA1)
  return compressor.compress(bytes(nbytes)) + compressor.flush()


@pytest.mark.parametrize("member", ["byteorder", "data.pkl", "data/0"])
@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA, zipfile.ZIP_DEFLATED])
def test_members_inflate_no_further_than_they_declare(tmp_path, member, method):
  """zipfile bounds a deflate read by its size, but decompresses a whole bzip2 or LZMA chunk
  (4 KiB and more of input: 28 MB of LZMA, gigabytes of bzip2) at once: such members are
  refused unread. A member declaring 6 bytes holds 64 MiB of zeros here."""
  data_pkl = tf.torch_pickle({"w": Tensor(Storage("0", 1), (1,))})
  parts = {"byteorder": b"little", "data.pkl": data_pkl, "data/0": bytes(4)}
  members = [(f"archive/{name}", raw, 0, zlib.crc32(raw), len(raw)) for name, raw in parts.items()]
  size = 64 * MiB
  bomb = deflated_zeros(size) if method == zipfile.ZIP_DEFLATED else bomb_member(method, size)
  index = list(parts).index(member)
  members[index] = (members[index][0], bomb, method, members[index][3], members[index][4])
  path = tmp_path / "bomb.pth"
  tf.write_raw_zip(str(path), members)
  (result,) = read_in_child(path)
  assert result["peak"] < 16 * MiB, result
  if method == zipfile.ZIP_DEFLATED:  # read as far as declared: 4 zero bytes are a storage
    assert result["outcome"] == ("loaded" if member == "data/0" else "ValueError"), result
  else:
    assert result["outcome"] == "ValueError" and str(path) in result["message"], result
    assert f"archive/{member}" in result["message"], result
    assert "compress" in result["message"], result


@pytest.mark.parametrize("compression", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_only_stored_and_deflated_members_are_read(tmp_path, compression):
  """torch writes stored members; deflated ones (a zip re-packed by hand) load too."""
  state = {"w": np.arange(3, dtype=np.float32)}
  tensors, records = tf.state_parts(state)
  zip_of(tmp_path / "c.pth", tensors, records, compression=compression)
  refused(tmp_path / "c.pth", "archive/")
  zip_of(tmp_path / "d.pth", tensors, records, compression=zipfile.ZIP_DEFLATED)
  read = checkpoint_io.read_state_dict(str(tmp_path / "d.pth"))
  np.testing.assert_array_equal(read["w"], state["w"])


def test_huge_safetensors_header_is_refused_from_its_length(tmp_path, monkeypatch):
  """The issue's 100 MB header (1.5 GB and 29 s to parse): refused from its length alone."""
  path = tmp_path / "big.safetensors"
  with open(path, "wb") as f:
    f.write((100_000_000).to_bytes(8, "little") + b'{"a": [')
    f.truncate(8 + 100_000_000)
  asked = []  # The sizes the reader asks the file for.
  open_regular = checkpoint_io._open_regular

  def counted(name):
    f = open_regular(name)
    read = f.read
    f.read = lambda size=-1: asked.append(size) or read(size)
    return f

  monkeypatch.setattr(checkpoint_io, "_open_regular", counted)
  message, peak = refused(path, "over the reader's cap")
  assert asked == [8] and peak < MiB, (asked, message)


def test_legacy_storage_count_is_checked_before_reading(tmp_path):
  paths = []
  for numel in (2**27, 2**40):  # 512 MiB (under the default cap) and 4 TiB, in a tiny file
    obj = tf.torch_pickle({"w": Tensor(Storage("0", numel), (1,))}, legacy=True)
    paths.append(tmp_path / f"count{numel}.pth")
    tf.write_legacy(str(paths[-1]), obj, {"0": (numel, bytes(16))})
  for result in read_in_child(*paths):
    assert result["outcome"] == "ValueError" and result["peak"] < MiB, result


def test_pickle_allocations_follow_the_pickles_size(tmp_path):
  """Pickles that make the C unpickler allocate what they claim, in the zip's data.pkl and
  in the legacy stream's first pickle (read by a plain unpickler)."""
  # A memo index of 2**28 makes the C unpickler zero a 4 GiB memo.
  memo_bomb = b"\x80\x02}r" + (2**28).to_bytes(4, "little") + b"."
  # A bytes object claiming 2**40 bytes is allocated before its (missing) bytes are read.
  claim = b"\x80\x04\x8e" + (2**40).to_bytes(8, "little") + b"xx."
  obj = tf.torch_pickle({"w": Tensor(Storage("0", 1), (1,))}, legacy=True)
  paths = []
  for name, raw in (("memo", memo_bomb), ("claim", claim)):
    paths.append(tmp_path / f"{name}.pth")
    tf.write_zip(str(paths[-1]), raw, {})
    paths.append(tmp_path / f"{name}_legacy.pth")
    tf.write_legacy(str(paths[-1]), obj, {"0": (1, bytes(4))}, magic=raw)
  for path, result in zip(paths, read_in_child(*paths), strict=True):
    assert result["outcome"] == "ValueError" and result["peak"] < MiB, (path.name, result)


def test_pickles_over_their_cap_are_refused(tmp_path):
  big = {"w": Tensor(Storage("0", 1), (1,)), "notes": "x" * (3 * MiB)}
  zip_of(tmp_path / "big.pth", big, {"0": bytes(4)})
  refused(tmp_path / "big.pth", "data.pkl holds")
  tf.write_legacy(str(tmp_path / "big_legacy.pth"), tf.torch_pickle(big, legacy=True), {})
  refused(tmp_path / "big_legacy.pth", "cap")
  small = {"w": Tensor(Storage("0", 1), (1,)), "notes": "x" * 400_000}
  zip_of(tmp_path / "small.pth", small, {"0": bytes(4)})
  refused(tmp_path / "small.pth", "max_bytes", max_bytes=16 * MiB)  # 80 x 400 KB of objects
  assert list(checkpoint_io.read_state_dict(str(tmp_path / "small.pth"))) == ["w"]


class CollidingItems:
  """Pickles as an OrderedDict of `count` int keys that share a hash (equal modulo 2**61 - 1:
  inserting n of them takes n**2 steps) and a tensor, without building that dict here. With
  `collide=False` the keys are as large but their hashes differ (i): n steps."""

  def __init__(self, count: int, collide: bool = True):
    self.count, self.collide = count, collide

  def __reduce__(self):
    items = [(i * (2**61 - 1) + (0 if self.collide else i), None) for i in range(1, self.count)]
    items.append(("w", Tensor(Storage("0", 1), (1,))))
    return (collections.OrderedDict, (), None, None, iter(items))


def test_colliding_dict_keys_are_refused_fast(tmp_path):
  # Timed against the same refusal of keys whose hashes differ, in this process: a ratio, so
  # a loaded machine slows both. Inserting the 30,000 colliding keys (~4.5e8 comparisons)
  # takes about 45 times the baseline (26.6 s against 0.59 s on the 2-core CI machine).
  zip_of(tmp_path / "keys.pth", CollidingItems(30_000), {"0": bytes(4)})
  zip_of(tmp_path / "distinct.pth", CollidingItems(30_000, collide=False), {"0": bytes(4)})

  def seconds(name):
    start = time.perf_counter()
    refused(tmp_path / name, "not strings")
    return time.perf_counter() - start

  baseline = min(seconds("distinct.pth") for _ in range(3))
  colliding = min(seconds("keys.pth") for _ in range(3))
  assert colliding < 20 * baseline + 0.5, (colliding, baseline)
  zip_of(tmp_path / "few.pth", CollidingItems(100), {"0": bytes(4)})
  assert list(checkpoint_io.read_state_dict(str(tmp_path / "few.pth"))) == ["w"]


def test_too_many_tensors_or_zip_entries_are_refused(tmp_path):
  count = checkpoint_io.MAX_TENSORS + 1
  header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(count)}
  tf.write_safetensors(str(tmp_path / "many.safetensors"), header, b"")
  refused(tmp_path / "many.safetensors", "tensors")
  members = [(f"archive/data/{i:032d}", b"", 0, 0, 0) for i in range(60_000)]  # 5 MB
  tf.write_raw_zip(str(tmp_path / "many.pth"), members)
  _, peak = refused(tmp_path / "many.pth", "zip directory")
  assert peak < 8 * MiB


def test_load_classifier_caps_the_file_by_the_architecture(tmp_path):
  """resnet18 (11.7 M values) may take 16 bytes a value + 64 MiB (~250 MB), under the 1 GiB
  default: a 300 MB broadcast that the default would allow is refused."""
  path = one_tensor(tmp_path / "r18.pth", 0, (75 * 2**20,), (0,), numel=1, record=bytes(4))
  with pytest.raises(ValueError, match="max_bytes=2") as error:
    pretrained.load_classifier("resnet18", str(path))
  assert "r18.pth" in str(error.value)


# --- 4. malformed files: one ValueError naming the file -----------------------------------------


def tensor_info(**change):
  return {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], **change}


SAFETENSORS_CASES = {
  "header_list": (b"[1, 2]", 0),
  "header_string": (b'"abc"', 0),
  "deep_json": (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 0),
  "nan": (b'{"a": NaN}', 0),
  "duplicate_name": (b'{"a": {}, "a": {}}', 0),
  "not_utf8": (b'{"\xff": 1}', 0),
  "info_string": ({"a": "F32"}, 8),
  "info_list": ({"a": ["F32", [2], [0, 8]]}, 8),
  "dtype_number": ({"a": tensor_info(dtype=5)}, 8),
  "dtype_list": ({"a": tensor_info(dtype=["F32"])}, 8),
  "dtype_unknown": ({"a": tensor_info(dtype="F8_E4M3")}, 8),
  "dtype_missing": ({"a": {"shape": [2], "data_offsets": [0, 8]}}, 8),
  "shape_negative": ({"a": tensor_info(shape=[-2, -1], data_offsets=[0, 8])}, 8),
  "shape_bool": ({"a": tensor_info(shape=[True, True], data_offsets=[0, 4])}, 4),
  "shape_float": ({"a": tensor_info(shape=[2.0])}, 8),
  "shape_string": ({"a": tensor_info(shape="2")}, 8),
  "shape_huge": ({"a": tensor_info(shape=[2**64, 0])}, 8),
  "shape_missing": ({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, 8),
  "offsets_strings": ({"a": tensor_info(data_offsets=["0", "8"])}, 8),
  "offsets_floats": ({"a": tensor_info(data_offsets=[0.0, 8.0])}, 8),
  "offsets_three": ({"a": tensor_info(data_offsets=[0, 8, 8])}, 8),
  "offsets_one": ({"a": tensor_info(data_offsets=[8])}, 8),
  "offsets_missing": ({"a": {"dtype": "F32", "shape": [2]}}, 8),
  "offsets_mismatch_shape": ({"a": tensor_info(data_offsets=[0, 4])}, 4),
  "metadata_not_strings": ({"__metadata__": {"format": 1}, "a": tensor_info()}, 8),
  "metadata_list": ({"__metadata__": [], "a": tensor_info()}, 8),
  "data_truncated": ({"a": tensor_info()}, 4),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_malformed_safetensors_are_one_value_error(tmp_path, case):
  header, data_size = SAFETENSORS_CASES[case]
  path = tmp_path / f"{case}.safetensors"
  tf.write_safetensors(str(path), header, bytes(data_size))
  refused(path, "safetensors")


def test_safetensors_header_length_past_the_file(tmp_path):
  path = tmp_path / "short.safetensors"
  tf.write_safetensors(str(path), {"a": tensor_info()}, bytes(8), length=1000)
  refused(path, "more than the file holds")
  path.write_bytes(b"\x01\x02")
  refused(path, "shorter than 8 bytes")


TORCH_CASES = {
  "list": [Tensor(Storage("0", 4), (2,))],
  "no_tensors": {"w": 3},
  "rebuild_one_arg": {"w": Reduce(Global("torch._utils", "_rebuild_tensor_v2"), ((1,),))},
  "string_for_storage": {
    "w": Reduce(Global("torch._utils", "_rebuild_tensor_v2"), ("abc", 0, (2,), (1,)))
  },
  "rebuild_two_args": {
    "w": Reduce(Global("torch._utils", "_rebuild_tensor_v2"), (Storage("0", 4), 0))
  },
  "parameter_of_string": {"w": Reduce(Global("torch._utils", "_rebuild_parameter"), ("x",))},
  "numel_negative": {"w": Tensor(Storage("0", -4), (2,))},
  "numel_huge": {"w": Tensor(Storage("0", 2**70), (2,))},
  "numel_string": {"w": Tensor(Storage("0", "4"), (2,))},
  "storage_type_unknown": {"w": Tensor(Storage("0", 4, "QInt8Storage"), (2,))},
  "name_tuple": {("w",): Tensor(Storage("0", 4), (2,))},
  "names_collide": {1: Tensor(Storage("0", 4), (2,)), "1": Tensor(Storage("0", 4), (2,))},
  "storage_declared_twice": {
    "w": Tensor(Storage("0", 4), (2,)),
    "v": Tensor(Storage("0", 2), (2,)),
  },
  "storage_record_missing": {"w": Tensor(Storage("9", 4), (2,))},
  "storage_record_short": {"w": Tensor(Storage("0", 8), (2,))},
}


PIDS = {
  "pid_string": "storage",
  "pid_list": ["storage", Global("torch", "FloatStorage"), "0", "cpu", 4],
  "pid_key_list": ("storage", Global("torch", "FloatStorage"), ["0"], "cpu", 4),
  "pid_key_huge": ("storage", Global("torch", "FloatStorage"), "0" * 1000, "cpu", 4),
  "pid_type_dict": ("storage", {}, "0", "cpu", 4),
  "pid_view": ("storage", Global("torch", "FloatStorage"), "0", "cpu", 4, ("1", 0, 2)),
  "pid_seven": ("storage", Global("torch", "FloatStorage"), "0", "cpu", 4, None, None),
}


@pytest.mark.parametrize("case", sorted(TORCH_CASES) + sorted(PIDS))
def test_malformed_torch_checkpoints_are_one_value_error(tmp_path, case):
  if case in PIDS:
    args = (PersistentId(PIDS[case]), 0, (2,), (1,))
    obj = {"w": Reduce(Global("torch._utils", "_rebuild_tensor_v2"), args)}
  else:
    obj = TORCH_CASES[case]
  zip_of(tmp_path / "bad.pth", obj, {"0": bytes(16)})
  refused(tmp_path / "bad.pth", "PyTorch checkpoint")


@pytest.mark.parametrize(
  "case",
  [
    "magic_float",
    "magic_string",
    "protocol_string",
    "protocol_other",
    "sys_info_list",
    "big_endian",
    "keys_int",
    "keys_of_lists",
    "key_listed_twice",
    "key_unused",
    "key_missing",
    "truncated_count",
    "truncated_storage",
    "object_list",
  ],
)
def test_malformed_legacy_streams_are_one_value_error(tmp_path, case):
  dump = lambda value: pickle.dumps(value, protocol=2)  # noqa: E731
  obj = {"w": Tensor(Storage("0", 2), (2,))}
  records = {"0": (2, bytes(8))}
  parts = {
    "magic_float": {"magic": dump(1.5)},
    "magic_string": {"magic": dump("torch")},
    "protocol_string": {"protocol": dump("1001")},
    "protocol_other": {"protocol": dump(1000)},
    "sys_info_list": {"sys_info": dump([1, 2])},
    "big_endian": {"sys_info": dump({"little_endian": False})},
    "keys_int": {"keys": dump(3)},
    "keys_of_lists": {"keys": dump([["0"]])},
    "key_listed_twice": {"keys": dump(["0", "0"])},
    "key_unused": {"keys": dump(["0", "1"])},
    "key_missing": {"keys": dump([])},
  }.get(case, {})
  if case == "truncated_count":
    records = {"0": (2, b"")}
  path = tmp_path / "bad.pth"
  object_pkl = tf.torch_pickle([1] if case == "object_list" else obj, legacy=True)
  tf.write_legacy(str(path), object_pkl, records, **parts)
  if case == "truncated_count":
    path.write_bytes(path.read_bytes()[:-4])
  elif case == "truncated_storage":
    path.write_bytes(path.read_bytes()[:-1])
  refused(path, "PyTorch checkpoint")


def test_big_endian_zip_checkpoints_are_refused(tmp_path):
  path = tmp_path / "be.pth"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", tf.torch_pickle({"w": Tensor(Storage("0", 2), (2,))}))
    archive.writestr("archive/byteorder", "big")
    archive.writestr("archive/data/0", bytes(8))
  refused(path, "big-endian")


def _unblock(fifo) -> None:
  """Lets a reader blocked opening `fifo` go (a writer opens and closes it)."""
  for _ in range(100):
    try:
      os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # ENXIO: nobody is waiting to read
      return
    time.sleep(0.02)


@pytest.mark.parametrize("name", ["w.pth", "w.safetensors", "link.pth"])
def test_a_fifo_is_refused_at_once(tmp_path, monkeypatch, name):
  """A FIFO (or a symlink to one) swapped in for the weights file after it was checked: one
  ValueError at once, never an open that waits for a writer. `os.path.isfile` reporting True
  stands for the check that passed before the swap."""
  fifo = tmp_path / "pipe"
  os.mkfifo(fifo)
  path = tmp_path / name
  if name == "link.pth":
    os.symlink(fifo, path)
  else:
    os.rename(fifo, path)
    fifo = path
  monkeypatch.setattr(os.path, "isfile", lambda _: True)
  outcome = {}

  def read():
    try:
      checkpoint_io.read_state_dict(str(path))
    except ValueError as error:
      outcome["message"] = str(error)

  thread = threading.Thread(target=read, daemon=True)
  thread.start()
  thread.join(5)
  if thread.is_alive():
    _unblock(fifo)
    thread.join(5)
    pytest.fail("read_state_dict still blocked on a FIFO after 5 s")
  message = outcome.get("message", "loaded")
  assert str(path) in message and "FIFO" in message, message


def test_only_regular_files_are_read(tmp_path):
  refused(tmp_path / "missing.pth", "does not exist")
  (tmp_path / "dir.pth").mkdir()
  refused(tmp_path / "dir.pth", "directory")
  if os.path.exists("/dev/zero"):
    with pytest.raises(ValueError, match="/dev/zero.*character device"):
      checkpoint_io.read_state_dict("/dev/zero")


@pytest.fixture(scope="module")
def resnet18():
  from rare_jax.models import Classifier, get_trunk

  model = Classifier(trunk=get_trunk("resnet18"), num_classes=1000)
  abstract = pretrained._abstract_variables("resnet18", model)
  from tests.test_pretrained import torchvision_resnet_state

  return model, abstract, torchvision_resnet_state(18)


def test_classifier_variables_refuses_tensors_that_do_not_fit(resnet18):
  model, abstract, state = resnet18
  variables = pretrained.classifier_variables("resnet18", state, model, abstract=abstract)
  assert variables["params"]["head"]["kernel"].shape == (512, 1000)
  wrong = {
    "int": ("conv1.weight", state["conv1.weight"].astype(np.int64), "floating point"),
    "bool": ("bn1.running_var", state["bn1.running_var"] > 0, "floating point"),
    "shape": ("fc.bias", np.zeros((10,), np.float32), "shape"),
    "rank": ("conv1.weight", np.zeros((64,), np.float32), "shape"),
    "missing": ("layer1.0.bn1.bias", None, "no tensor"),
  }
  for case, (name, value, match) in wrong.items():
    bad = dict(state)
    if value is None:
      del bad[name]
    else:
      bad[name] = value
    with pytest.raises(ValueError, match=match) as error:
      pretrained.classifier_variables("resnet18", bad, model, source="f.pth", abstract=abstract)
    assert "f.pth" in str(error.value), case


# --- 5. safetensors offsets tile the data -------------------------------------------------


def two_tensors(offsets_a, offsets_b, data_size=16):
  return {
    "a": {"dtype": "F32", "shape": [2], "data_offsets": offsets_a},
    "b": {"dtype": "F32", "shape": [2], "data_offsets": offsets_b},
  }, data_size


@pytest.mark.parametrize(
  "case, header",
  [
    ("overlapping", two_tensors([0, 8], [0, 8], 8)),
    ("overlapping_partly", two_tensors([0, 8], [4, 12], 12)),
    ("negative", two_tensors([0, 8], [-8, 0], 8)),
    ("negative_both", two_tensors([-16, -8], [-8, 0], 16)),
    ("reversed", two_tensors([0, 8], [16, 8], 16)),
    ("gap", two_tensors([0, 8], [12, 20], 20)),
    ("not_from_zero", two_tensors([4, 12], [12, 20], 20)),
    ("short_of_the_data", two_tensors([0, 8], [8, 16], 20)),
    ("past_the_data", two_tensors([0, 8], [8, 16], 12)),
  ],
)
def test_safetensors_offsets_must_tile_the_data(tmp_path, case, header):
  header, data_size = header
  path = tmp_path / f"{case}.safetensors"
  tf.write_safetensors(str(path), header, bytes(data_size))
  refused(path, "safetensors")


def test_safetensors_tiles_in_any_header_order(tmp_path):
  data = np.arange(8, dtype="<f4")
  header = {
    "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 32]},
    "e": {"dtype": "F32", "shape": [0], "data_offsets": [16, 16]},
    "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
  }
  path = tmp_path / "order.safetensors"
  tf.write_safetensors(str(path), header, data.tobytes())
  state = checkpoint_io.read_state_dict(str(path))
  assert list(state) == ["b", "e", "a"]
  np.testing.assert_array_equal(state["a"], data[:4])
  np.testing.assert_array_equal(state["b"], data[4:].reshape(2, 2))
  assert state["e"].shape == (0,)
