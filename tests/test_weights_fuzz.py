"""A seeded fuzz of the weight-file reader (`checkpoint_io`), run with the suite in seconds.

Small valid files made by tests/torch_format.py (a torch zip checkpoint, a legacy stream, a
safetensors file) are mutated: random byte flips, insertions, deletions and truncation of the
pickles, the JSON header and the whole file; pickle opcodes replaced, duplicated, dropped, or
their ints, strings and globals swapped for hostile ones; JSON fields replaced by values of
the wrong type or sign; storage counts and zip members' declared sizes changed. Every outcome
must be a dict of numpy arrays or one `ValueError` naming the file: never another exception,
a crash, a case slower than `SECONDS`, or an allocation (tracemalloc's peak, which sees
numpy's buffers) over the cap the reader was given (`MAX_BYTES`).

The loop runs in a child process, `python tests/test_weights_fuzz.py --seed S --cases N`
(which is also how to fuzz longer by hand), so that a crash fails the test instead of
killing pytest's worker.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import pickle
import pickletools
import random
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import tracemalloc
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_BYTES = 4 << 20  # the cap each case reads under; small files rarely come near it
SECONDS = 2.0  # per case; a file read takes milliseconds
CASES = 600  # in the suite: ~4 s alone, ~9 s on a busy 2-core machine


def test_fuzz_the_weight_file_reader():
  done = subprocess.run(
    [sys.executable, os.path.abspath(__file__), "--seed", "0", "--cases", str(CASES)],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=ROOT,
    env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
  )
  assert done.returncode == 0, (
    f"the fuzz failed (status {done.returncode}):\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
  )
  assert f"{CASES} cases" in done.stdout, done.stdout


# --- the fuzz (in the child) ----------------------------------------------------------------------

HOSTILE_INTS = [
  -1,
  -(2**31),
  -(2**20),
  0,
  1,
  3,
  255,
  2**16,
  2**31 - 1,
  2**31,
  2**32,
  2**40,
  2**62,
  2**63 - 1,
  2**63,
  2**64 + 5,
  -(2**63),
  10**30,
]
HOSTILE_JSON = [
  -1,
  -8,
  0,
  1,
  2**40,
  2**63,
  2**64,
  10**30,
  1.5,
  True,
  None,
  "x",
  "F32",
  "BOOL",
  [],
  {},
  [1, 2, 3],
  [[0]],
  [-8, 0],
  [0, 2**62],
  [2**31, 2**31],
  ["0", "8"],
]
GLOBALS = [
  ("os", "system"),
  ("builtins", "eval"),
  ("io", "open"),
  ("collections", "OrderedDict"),
  ("torch._utils", "_rebuild_tensor_v2"),
  ("torch._utils", "_rebuild_parameter"),
  ("torch", "FloatStorage"),
  ("torch", "LongStorage"),
  ("torch", "BFloat16Storage"),
  ("torch", "QInt8Storage"),
  ("torch.nn", "Module"),
  ("__builtin__", "getattr"),
]
STRINGS = [
  "storage",
  "0",
  "1",
  "2",
  "9",
  "cpu",
  "",
  "x" * 300,
  "a.weight",
  "state_dict",
  "__class__",
]
OPCODE_SNIPPETS = [
  b"}",
  b"]",
  b")",
  b"N",
  b"(",
  b"t",
  b"R",
  b"b",
  b"s",
  b"u",
  b"e",
  b"a",
  b"Q",
  b"2",
  b"0",
  b"1",
  b"\x85",
  b"\x86",
  b"\x87",
  b"\x88",
  b"\x89",
  b"\x8f",  # EMPTY_SET
  b"\x81",  # NEWOBJ
  b"\x82\x01",  # EXT1
  b"\x94",  # MEMOIZE
  b"\x93",  # STACK_GLOBAL
  b"h\x00",
  b"q\x07",
  b"r\xff\xff\xff\x7f",  # LONG_BINPUT 2**31 - 1
  b"j\xff\xff\x00\x00",
  b"K\x00",
  b"J\xff\xff\xff\xff",
  b"\x8a\x09" + b"\xff" * 9,
  b"X\xff\xff\xff\x7fab",  # BINUNICODE claiming 2 GiB
  b"\x8e" + (2**40).to_bytes(8, "little"),  # BINBYTES8 claiming 1 TiB
  b"\x95" + (2**33).to_bytes(8, "little"),  # FRAME of 8 GiB
  b"ios\nsystem\n",  # INST
  b"cos\nsystem\n",  # GLOBAL
]


def load_modules():
  """checkpoint_io without importing rare_jax (and so jax); torch_format from tests/."""
  sys.path.insert(0, ROOT)
  spec = importlib.util.spec_from_file_location(
    "checkpoint_io", os.path.join(ROOT, "rare_jax", "models", "checkpoint_io.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  from tests import torch_format

  return module, torch_format


def base_files(tf):
  """Small valid files: their parts, so that each part can be mutated and reassembled."""
  import numpy as np

  values = np.arange(6, dtype="<f4")
  floats, longs = tf.Storage("0", 6), tf.Storage("1", 3, "LongStorage")
  tensors = collections.OrderedDict(
    [
      ("a.weight", tf.Tensor(floats, (2, 3))),
      ("a.t", tf.Tensor(floats, (3, 2), 0, (1, 3))),
      ("a.bias", tf.Tensor(floats, (2,), 4, (1,))),
      ("n", tf.Tensor(longs, ())),
      ("e", tf.Tensor(floats, (0, 4), 6, (4, 1))),
    ]
  )
  state = tf.Build(tensors, {"_metadata": collections.OrderedDict([("", {"version": 1})])})
  records = {"0": values.tobytes(), "1": np.array([7, 8, 9], "<i8").tobytes()}
  legacy_records = {"0": (6, records["0"]), "1": (3, records["1"])}
  header = {
    "__metadata__": {"format": "pt"},
    "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "i": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]},
    "b": {"dtype": "BOOL", "shape": [3], "data_offsets": [40, 43]},
    "z": {"dtype": "F32", "shape": [0], "data_offsets": [43, 43]},
  }
  data = values.tobytes() + np.array([1, 2], "<i8").tobytes() + bytes([1, 0, 1])
  return {
    "zip_pickle": tf.torch_pickle(state),
    "zip_records": records,
    "legacy_parts": {
      "magic": pickle.dumps(tf.LEGACY_MAGIC, protocol=2),
      "protocol": pickle.dumps(tf.LEGACY_PROTOCOL, protocol=2),
      "sys_info": pickle.dumps(tf.LEGACY_SYS_INFO, protocol=2),
      "object": tf.torch_pickle(state, legacy=True),
      "keys": pickle.dumps(list(legacy_records), protocol=2),
    },
    "legacy_records": legacy_records,
    "header": header,
    "data": data,
  }


def encode_int(value: int) -> bytes:
  if -(2**31) <= value < 2**31:
    return b"J" + struct.pack("<i", value)
  return pickle.dumps(value, protocol=2)[2:-1]  # LONG1


def mutate_bytes(rng: random.Random, data: bytes) -> tuple[bytes, str]:
  data = bytearray(data)
  kind = rng.choice(["flip", "flip", "insert", "delete", "truncate", "append"])
  if not data or kind == "append":
    return bytes(data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))), "append"
  at = rng.randrange(len(data))
  if kind == "flip":
    for _ in range(rng.randint(1, 4)):
      data[rng.randrange(len(data))] = rng.randrange(256)
  elif kind == "insert":
    data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
  elif kind == "delete":
    del data[at : at + rng.randint(1, 16)]
  else:
    del data[at:]
  return bytes(data), f"{kind}@{at}"


def mutate_pickle(rng: random.Random, data: bytes) -> tuple[bytes, str]:
  """An opcode-aware mutation of a valid pickle, or a byte-level one."""
  if rng.random() < 0.3:
    return mutate_bytes(rng, data)
  ops = list(pickletools.genops(data))
  spans = [
    (pos, (ops[i + 1][2] if i + 1 < len(ops) else len(data))) for i, (_, _, pos) in enumerate(ops)
  ]
  i = rng.randrange(len(ops))
  opcode, arg, _ = ops[i]
  start, end = spans[i]
  kind = rng.choice(["int", "global", "string", "snippet", "drop", "duplicate", "swap", "memo"])
  ints = [
    j for j, (op, _, _) in enumerate(ops) if op.name in ("BININT", "BININT1", "BININT2", "LONG1")
  ]
  if kind == "int" and ints:
    i = rng.choice(ints)
    start, end = spans[i]
    value = rng.choice(HOSTILE_INTS)
    return data[:start] + encode_int(value) + data[end:], f"int#{i}={value}"
  globals_ = [j for j, (op, _, _) in enumerate(ops) if op.name == "GLOBAL"]
  if kind == "global" and globals_:
    i = rng.choice(globals_)
    start, end = spans[i]
    module, name = rng.choice(GLOBALS)
    return data[:start] + f"c{module}\n{name}\n".encode() + data[
      end:
    ], f"global#{i}={module}.{name}"
  strings = [j for j, (op, _, _) in enumerate(ops) if op.name in ("BINUNICODE", "SHORT_BINUNICODE")]
  if kind == "string" and strings:
    i = rng.choice(strings)
    start, end = spans[i]
    text = rng.choice(STRINGS).encode()
    return data[:start] + b"X" + struct.pack("<I", len(text)) + text + data[end:], f"string#{i}"
  memos = [j for j, (op, _, _) in enumerate(ops) if op.name in ("BINPUT", "BINGET", "LONG_BINPUT")]
  if kind == "memo" and memos:
    i = rng.choice(memos)
    start, end = spans[i]
    index = rng.choice([0, 1, 255, 2**16, 2**28, 2**32 - 1])
    code = b"r" if ops[i][0].name != "BINGET" else b"j"
    return data[:start] + code + struct.pack("<I", index) + data[end:], f"memo#{i}={index}"
  if kind == "drop" and opcode.name != "PROTO":
    return data[:start] + data[end:], f"drop#{i}"
  if kind == "duplicate":
    return data[:end] + data[start:end] + data[end:], f"duplicate#{i}"
  if kind == "swap" and i + 1 < len(ops):
    after_start, after_end = spans[i + 1]
    return data[:start] + data[after_start:after_end] + data[start:end] + data[
      after_end:
    ], f"swap#{i}"
  snippet = rng.choice(OPCODE_SNIPPETS)
  return data[:start] + snippet + data[start:], f"snippet#{i}={snippet!r}"


def mutate_json(rng: random.Random, header: dict) -> tuple[dict, str]:
  header = json.loads(json.dumps(header))
  names = [n for n in header if n != "__metadata__"]
  kind = rng.choice(["field", "field", "field", "drop_field", "add_tensor", "drop_tensor", "meta"])
  name = rng.choice(names)
  if kind == "field":
    field = rng.choice(["dtype", "shape", "data_offsets"])
    value = rng.choice(HOSTILE_JSON)
    if field != "dtype" and isinstance(header[name][field], list) and rng.random() < 0.5:
      entries = list(header[name][field])
      if entries:
        entries[rng.randrange(len(entries))] = rng.choice(HOSTILE_JSON)
      value = entries
    header[name][field] = value
    return header, f"{name}.{field}={value!r}"
  if kind == "drop_field":
    field = rng.choice(["dtype", "shape", "data_offsets"])
    del header[name][field]
    return header, f"del {name}.{field}"
  if kind == "add_tensor":
    header[f"copy_{name}"] = json.loads(json.dumps(header[name]))
    return header, f"copy {name}"
  if kind == "drop_tensor":
    del header[name]
    return header, f"del {name}"
  header["__metadata__"] = rng.choice(HOSTILE_JSON)
  return header, "metadata"


def make_case(rng: random.Random, tf, base) -> tuple[str, bytes, str]:
  """(file suffix, file bytes, what was mutated) of one fuzz case."""
  form = rng.choice(["zip", "legacy", "safetensors"])
  with tempfile.NamedTemporaryFile() as scratch:
    path = scratch.name
    if form == "zip":
      kind = rng.choice(["pickle", "pickle", "pickle", "record", "file", "sizes"])
      data_pkl, records, what = base["zip_pickle"], dict(base["zip_records"]), kind
      if kind == "pickle":
        data_pkl, what = mutate_pickle(rng, data_pkl)
      elif kind == "record":
        key = rng.choice(list(records))
        records[key], what = mutate_bytes(rng, records[key])
      if kind == "sizes":
        members = [("archive/data.pkl", data_pkl, 0, zlib.crc32(data_pkl), len(data_pkl))]
        for key, blob in records.items():
          size = rng.choice([len(blob), 0, 1, len(blob) * 2, 2**31, 2**32 - 1])
          compressed = zlib.compressobj(9, zlib.DEFLATED, -15)
          blob8 = compressed.compress(blob) + compressed.flush()
          members.append((f"archive/data/{key}", blob8, 8, zlib.crc32(blob), size))
        tf.write_raw_zip(path, members)
        what = "declared sizes"
      else:
        tf.write_zip(path, data_pkl, records)
      raw = open(path, "rb").read()
      if kind == "file":
        raw, what = mutate_bytes(rng, raw)
      return ".pth", raw, f"zip {what}"
    if form == "legacy":
      parts, records = dict(base["legacy_parts"]), dict(base["legacy_records"])
      kind = rng.choice(
        ["object", "object", "keys", "sys_info", "magic", "protocol", "count", "file"]
      )
      what = kind
      if kind in parts:
        parts[kind], what = mutate_pickle(rng, parts[kind])
        what = f"{kind} {what}"
      elif kind == "count":
        key = rng.choice(list(records))
        count = rng.choice(HOSTILE_INTS)
        count = max(-(2**63), min(count, 2**63 - 1))
        records[key] = (count, records[key][1])
        what = f"count {key}={count}"
      obj = parts.pop("object")
      tf.write_legacy(path, obj, records, **parts)
      raw = open(path, "rb").read()
      if kind == "file":
        raw, what = mutate_bytes(rng, raw)
      return ".pth", raw, f"legacy {what}"
    kind = rng.choice(["json", "json", "json", "header_bytes", "length", "file"])
    header, data, what = base["header"], base["data"], kind
    encoded = json.dumps(header).encode()
    length = None
    if kind == "json":
      header, what = mutate_json(rng, header)
      encoded = json.dumps(header).encode()
    elif kind == "header_bytes":
      encoded, what = mutate_bytes(rng, encoded)
    elif kind == "length":
      length = rng.choice([0, 1, len(encoded) - 1, len(encoded) + 1, 2**31, 2**63, 2**64 - 1])
      what = f"length={length}"
    tf.write_safetensors(path, encoded, data, length=length)
    raw = open(path, "rb").read()
    if kind == "file":
      raw, what = mutate_bytes(rng, raw)
    return ".safetensors", raw, f"safetensors {what}"


def run(seed: int, cases: int) -> int:
  import numpy as np

  checkpoint_io, tf = load_modules()
  base = base_files(tf)
  rng = random.Random(seed)
  outcomes = collections.Counter()
  causes = collections.Counter()
  failures = []
  slowest = 0.0
  with tempfile.TemporaryDirectory() as directory:
    for case in range(cases):
      suffix, raw, what = make_case(rng, tf, base)
      path = os.path.join(directory, f"case{case}{suffix}")
      with open(path, "wb") as f:
        f.write(raw)
      tracemalloc.start()
      start = time.perf_counter()
      try:
        state = checkpoint_io.read_state_dict(path, max_bytes=MAX_BYTES)
        problem = None
        if not isinstance(state, dict) or not all(
          isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items()
        ):
          problem = f"returned {type(state).__name__} that is not a dict of arrays"
        outcome = "loaded"
      except ValueError as error:
        problem = None if path in str(error) else f"ValueError without the file name: {error}"
        outcome = "ValueError"
        causes[type(error.__cause__).__name__ if error.__cause__ else "ValueError"] += 1
      except BaseException as error:  # noqa: BLE001 - anything else is the bug to report
        problem = "".join(traceback.format_exception(error))[-3000:]
        outcome = type(error).__name__
      seconds = time.perf_counter() - start
      peak = tracemalloc.get_traced_memory()[1]
      tracemalloc.stop()
      slowest = max(slowest, seconds)
      if seconds > SECONDS:
        problem = f"took {seconds:.2f} s"
      if peak > MAX_BYTES:
        problem = f"allocated {peak:,} bytes, over max_bytes={MAX_BYTES:,}"
      outcomes[f"{suffix} {outcome}"] += 1
      if problem:
        failures.append(f"case {case} (seed {seed}, {what}): {problem}")
      os.unlink(path)
  print(f"{cases} cases, seed {seed}: {dict(sorted(outcomes.items()))}")
  print(f"ValueErrors by cause: {dict(causes.most_common())}; slowest case {slowest:.3f} s")
  for failure in failures[:20]:
    print(failure)
  return 1 if failures else 0


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--cases", type=int, default=CASES)
  arguments = parser.parse_args()
  sys.exit(run(arguments.seed, arguments.cases))
