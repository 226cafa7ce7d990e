"""Inference of the deep models with BatchNorm folded: the deep updates' embedding path.

`folded_predict(model, state, mesh)` returns a `predict(state, batch)` with the outputs of
`rare_jax.deep.train.predict` (embedding, and by model kind the heads' probabilities and
labels), or None where it does not apply. It applies to `Classifier`, `BGSplitModel` and
`TrunkOutput` models on a float32 EfficientNet-Lite trunk (any `part`: the whole network, the
frozen blocks, or the trainable part on cached frozen activations) in a single-process run:
- the trunk's BatchNorms are folded into its convolutions once per state
  (`models.efficientnet.fold_batchnorm`), pointwise convolutions run as matrix products
  (`embed_folded`); the heads are the same dense layers;
- on a CPU mesh of one device each batch runs in micro-batches small enough that XLA's
  temporary buffer stays under `MAX_TEMP_BYTES` (glibc then reuses the buffer instead of
  page-faulting fresh pages in on every call: `rare_jax.deep.trunk_features`); elsewhere the
  whole batch runs at once, split over the mesh like `train.jit_predict`'s.
The outputs equal the Flax model's up to float32 rounding (tests/test_embed_speed.py);
`benchmarks/deep_embed_throughput.py` measures the speed-up at the demo's setting.
Other models, bfloat16 trunks and multi-process runs keep `train.jit_predict`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from rare_jax.infra import sharding
from rare_jax.models import bgsplit, efficientnet

# On the CPU, micro-batches keep XLA's temporary buffer at most this size (glibc's malloc serves
# larger blocks with fresh mappings, page-faulted in on every call; docs/speed.md).
MAX_TEMP_BYTES = 28 << 20
_MODELS = (bgsplit.Classifier, bgsplit.BGSplitModel, bgsplit.TrunkOutput)


def applies(model: Any) -> bool:
  """Whether `folded_predict` serves `model` in this process (see the module docstring)."""
  trunk = getattr(model, "trunk", None)
  return (
    isinstance(model, _MODELS)
    and isinstance(trunk, efficientnet.EfficientNetLite)
    and jnp.dtype(trunk.dtype) == jnp.float32
    and jax.process_count() == 1
  )


def fold(model: Any, variables: dict) -> dict:
  """`{"trunk": folded trunk layers, "heads": {name: dense params}}` of `model`'s variables."""
  trunk = model.trunk
  folded = efficientnet.fold_batchnorm(
    {k: variables[k]["trunk"] for k in ("params", "batch_stats")}, epsilon=trunk.bn_epsilon
  )
  heads = {k: v for k, v in variables["params"].items() if k != "trunk"}
  return {"trunk": folded, "heads": jax.tree.map(jnp.asarray, heads)}


def apply_folded(args: dict, images: jax.Array, *, model: Any, depthwise: str) -> dict:
  """`train.predict`'s outputs of `model` from its folded variables (`fold`)."""
  trunk = model.trunk
  out = efficientnet.embed_folded(
    args["trunk"],
    images,
    width=trunk.width,
    depth=trunk.depth,
    depthwise=depthwise,
    part=trunk.part,
    frozen_blocks=trunk.frozen_blocks,
  )
  embedding = out.reshape(out.shape[0], -1).astype(jnp.float32)
  result = {"embedding": embedding}

  def dense(name):
    layer = args["heads"][name]
    return embedding @ layer["kernel"] + layer["bias"]

  if isinstance(model, bgsplit.BGSplitModel):
    result["main_probs"] = jax.nn.sigmoid(dense("main_head"))
    result["aux_labels"] = jnp.argmax(dense("aux_head"), axis=-1).astype(jnp.int32)
  elif isinstance(model, bgsplit.Classifier):
    logits = dense("head")
    result["probs"] = jax.nn.softmax(logits, axis=-1)
    result["labels"] = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return result


def folded_predict(model: Any, state: Any, mesh: Mesh) -> Callable | None:
  """A `predict(state, batch)` for `embed.make_predict_fn` running `model` folded, bound to
  `state`'s variables (folded once here; the `state` argument is ignored), or None where the
  module docstring says the Flax path stays."""
  if not applies(model):
    return None
  args = jax.device_put(fold(model, state.variables), sharding.replicated(mesh))
  on_cpu = jax.default_backend() == "cpu"
  # Dense depthwise matrices only pay on tiny maps; the CPU's shifted form elsewhere.
  depthwise = "shifted" if on_cpu and model.trunk.depthwise == "auto" else model.trunk.depthwise
  fn = functools.partial(apply_folded, model=model, depthwise=depthwise)
  if mesh.devices.size != 1 or not on_cpu:
    data = sharding.batch_sharding(mesh)
    jitted = jax.jit(fn, in_shardings=(sharding.replicated(mesh), data), out_shardings=data)
    return lambda _state, batch: jitted(args, batch["image"])
  compiled = {}  # batch shape -> (micro-batch size, executable)

  def predict(_state, batch):
    images = batch["image"]
    key = (tuple(images.shape), str(images.dtype))
    if key not in compiled:
      compiled[key] = micro_batched(jax.jit(fn), args, images.shape, images.dtype, model.trunk)
    size, executable = compiled[key]
    if size == len(images):
      return executable(args, images)
    parts = []
    for start in range(0, len(images), size):
      chunk = images[start : start + size]
      if len(chunk) < size:
        chunk = jnp.concatenate(
          [chunk, jnp.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)]
        )
      parts.append(executable(args, chunk))
    return jax.tree.map(lambda *xs: jnp.concatenate(xs)[: len(images)], *parts)

  return predict


def micro_batched(fn, args, shape, dtype, trunk) -> tuple[int, Any]:
  """(size, executable of `fn(args, x)`) for the largest micro-batch of a batch `shape`,
  spread evenly over it, whose XLA temporary buffer is at most `MAX_TEMP_BYTES`
  (memory_analysis of the compiled program; CPU only). `trunk`: the EfficientNet-Lite whose
  size gives the first guess."""
  batch = size = int(shape[0])
  if trunk.part != "trainable":
    # A first guess that saves compiles (Lite0 measured 780-800 bytes per position of the
    # stride-2 map, growing with the width); the loop below checks it.
    per_image = 800 * trunk.width * (-(-int(shape[1]) // 2)) * (-(-int(shape[2]) // 2))
    limit = max(1, int(MAX_TEMP_BYTES // per_image))
    size = -(-batch // -(-batch // min(batch, limit)))
  while True:
    spec = jax.ShapeDtypeStruct((size, *shape[1:]), dtype)
    executable = fn.lower(args, spec).compile()
    temp = getattr(executable.memory_analysis(), "temp_size_in_bytes", None)
    if size == 1 or temp is None or temp <= MAX_TEMP_BYTES:
      return size, executable
    limit = max(1, min(size - 1, size * MAX_TEMP_BYTES // temp))
    size = -(-batch // -(-batch // limit))  # as even as possible, at most `limit`
