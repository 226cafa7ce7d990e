r"""Throughput of the background-splitting model (any `MODELS` trunk): sharded vs plain jit.

Measures, in one run, images/s of
  - the sharded training step (`train.jit_step`: NamedSharding over a mesh of all local
    devices, donated state, state born sharded) and the sharded inference step
    (`train.jit_predict`: embedding + main-head probabilities, what `embed` runs);
  - the baseline: the same `train_step`/`predict` under a plain `jax.jit` on one device,
and prints the ratios. Compilation and `--warmup` steps are excluded; timings end with
`block_until_ready`. Batches are generated on the devices once (no input pipeline in the loop).

  # GPU (the paper's setting):
  python benchmarks/resnet_throughput.py --model=resnet50 --image_size=224 --batch_size=256 \
      --dtype=bfloat16 --steps=50 --json_out=/tmp/resnet50_throughput.json
  # EfficientNet-Lite0 on the CPU at the demo's resolution (depthwise convs as shifted
  # multiply-adds; --depthwise=native for XLA's grouped convolution):
  python benchmarks/resnet_throughput.py --model=efficientnet_lite0 --image_size=64 \
      --batch_size=64 --dtype=float32 --steps=5 --warmup=1 --num_categories=3
  # CPU smoke run (seconds):
  python benchmarks/resnet_throughput.py --model=resnet_tiny --image_size=28 --channels=1 \
      --batch_size=32 --dtype=float32 --steps=5 --warmup=1

`--batch_size` is the global batch (split over the mesh's data axes for the sharded step).
"""

from __future__ import annotations

import functools
import json
import os
import resource
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from rare_jax.deep import train
from rare_jax.infra import provenance, sharding
from rare_jax.models import MODELS, BGSplitModel

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "resnet50", sorted(MODELS), "Trunk from rare_jax.models.MODELS.")
flags.DEFINE_integer("image_size", 224, "Square input resolution.")
flags.DEFINE_integer("channels", 3, "Input channels.")
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype (params f32).")
flags.DEFINE_integer("steps", 20, "Timed steps per measurement.")
flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
flags.DEFINE_integer("num_categories", 10, "Main-head outputs (categories of a group).")
flags.DEFINE_integer("num_aux_classes", 1000, "Auxiliary-head classes (M_pre's classes).")
flags.DEFINE_string("mesh", "data:-1", "Mesh axes as name:size,... over all local devices.")
flags.DEFINE_string("param_axis", None, "Mesh axis to shard large parameters over (FSDP).")
flags.DEFINE_bool("baseline", True, "Also time the plain unsharded jax.jit step.")
flags.DEFINE_string("json_out", None, "Write the results as JSON here.")
flags.DEFINE_integer("frozen_blocks", 0, "EfficientNet-Lite: blocks not trained (stem too).")
flags.DEFINE_enum(
  "depthwise", "auto", ["auto", "native", "shifted"], "EfficientNet-Lite depthwise convs."
)


def parse_mesh(spec: str) -> list[tuple[str, int]]:
  axes = []
  for part in spec.split(","):
    name, _, size = part.partition(":")
    if not name or not size.lstrip("-").isdigit():
      raise ValueError(f"--mesh must look like 'data:-1' or 'data:2,fsdp:4', got {spec!r}")
    axes.append((name, int(size)))
  return axes


def random_batch(key, *, batch_size, image_size, channels, num_categories, num_aux_classes):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  return {
    "image": jax.random.normal(k1, (batch_size, image_size, image_size, channels), jnp.float32),
    "labels": jax.random.bernoulli(k2, 0.1, (batch_size, num_categories)).astype(jnp.float32),
    "label_mask": jax.random.bernoulli(k3, 0.5, (batch_size, num_categories)),
    "aux_labels": jax.random.randint(k4, (batch_size,), 0, num_aux_classes),
    "mask": jnp.ones((batch_size,), bool),
  }


def flops_of(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None
  except Exception:  # cost analysis is best-effort and backend-dependent
    return None


def time_train(step, state, batch, *, steps, warmup):
  """Compiles, warms up, then times `steps` chained train steps."""
  t = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics) if warmup else state)
  t = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  elapsed = time.perf_counter() - t
  loss = float(metrics["loss"])
  return state, {
    "seconds": elapsed,
    "compile_s": compile_s,
    "flops_per_step": flops_of(compiled),
    "final_loss": loss,
  }


def time_predict(predict, state, batch, *, steps, warmup):
  t = time.perf_counter()
  compiled = predict.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  out = None
  for _ in range(warmup):
    out = compiled(state, batch)
  jax.block_until_ready(out)
  t = time.perf_counter()
  for _ in range(steps):
    out = compiled(state, batch)
  jax.block_until_ready(out)
  return {
    "seconds": time.perf_counter() - t,
    "compile_s": compile_s,
    "flops_per_step": flops_of(compiled),
  }


def summarize(result: dict, *, batch_size: int, steps: int) -> dict:
  result = dict(result)
  result["images_per_s"] = batch_size * steps / result["seconds"]
  result["ms_per_step"] = 1e3 * result["seconds"] / steps
  if result.get("flops_per_step"):
    result["tflops_per_s"] = result["flops_per_step"] * steps / result["seconds"] / 1e12
  return result


def main(argv):
  del argv
  dtype = jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32
  trunk_kwargs = {}
  if FLAGS.model.startswith("efficientnet"):
    trunk_kwargs = {"depthwise": FLAGS.depthwise, "frozen_blocks": FLAGS.frozen_blocks}
  model = BGSplitModel(
    MODELS[FLAGS.model](dtype=dtype, **trunk_kwargs),
    num_categories=FLAGS.num_categories,
    num_aux_classes=FLAGS.num_aux_classes,
  )
  total = FLAGS.warmup + FLAGS.steps + 1
  tx = train.make_optimizer(
    total_steps=2 * total + 1, warmup_steps=0, frozen=train.frozen_mask(model)
  )
  input_shape = (1, FLAGS.image_size, FLAGS.image_size, FLAGS.channels)
  # RBG keys only for the initialisation (threefry initialisers compile slowly on CPU).
  init_key = jax.random.key(0, impl="rbg")
  batch_kwargs = {
    "batch_size": FLAGS.batch_size,
    "image_size": FLAGS.image_size,
    "channels": FLAGS.channels,
    "num_categories": FLAGS.num_categories,
    "num_aux_classes": FLAGS.num_aux_classes,
  }
  runs = {"steps": FLAGS.steps, "warmup": FLAGS.warmup}
  report = {
    "model": FLAGS.model,
    "depthwise": FLAGS.depthwise if trunk_kwargs else None,
    "frozen_blocks": FLAGS.frozen_blocks if trunk_kwargs else None,
    "image_size": FLAGS.image_size,
    "channels": FLAGS.channels,
    "batch_size": FLAGS.batch_size,
    "dtype": FLAGS.dtype,
    "steps": FLAGS.steps,
    "warmup": FLAGS.warmup,
    "mesh": FLAGS.mesh,
    "param_axis": FLAGS.param_axis,
    "backend": jax.default_backend(),
    "device_kind": jax.devices()[0].device_kind,
    "num_devices": jax.local_device_count(),
    "jax": jax.__version__,
  }

  # Sharded: mesh over all local devices, state born sharded, donated, batch split.
  mesh = sharding.make_mesh(parse_mesh(FLAGS.mesh), devices=jax.local_devices())
  state, shardings = train.init_sharded_state(
    init_key, model=model, tx=tx, input_shape=input_shape, mesh=mesh, param_axis=FLAGS.param_axis
  )
  batch = jax.jit(
    functools.partial(random_batch, **batch_kwargs), out_shardings=sharding.batch_sharding(mesh)
  )(jax.random.key(1))
  step = train.jit_step(
    train.train_step, mesh=mesh, state_shardings=shardings, model=model, tx=tx, aux_weight=0.1
  )
  state, sharded_train = time_train(step, state, batch, **runs)
  predict = train.jit_predict(model=model, mesh=mesh, state_shardings=shardings)
  sharded_infer = time_predict(predict, state, batch, **runs)
  del state, batch
  report["sharded"] = {
    "train": summarize(sharded_train, batch_size=FLAGS.batch_size, steps=FLAGS.steps),
    "inference": summarize(sharded_infer, batch_size=FLAGS.batch_size, steps=FLAGS.steps),
  }

  if FLAGS.baseline:
    # Baseline: plain jax.jit on the default device, no shardings, no donation.
    state = jax.jit(
      functools.partial(train.create_train_state, model=model, tx=tx, input_shape=input_shape)
    )(init_key)
    batch = jax.jit(functools.partial(random_batch, **batch_kwargs))(jax.random.key(1))
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, aux_weight=0.1))
    state, base_train = time_train(step, state, batch, **runs)
    base_infer = time_predict(
      jax.jit(functools.partial(train.predict, model=model)), state, batch, **runs
    )
    del state, batch
    report["baseline"] = {
      "train": summarize(base_train, batch_size=FLAGS.batch_size, steps=FLAGS.steps),
      "inference": summarize(base_infer, batch_size=FLAGS.batch_size, steps=FLAGS.steps),
    }
    report["ratio_sharded_over_baseline"] = {
      kind: report["sharded"][kind]["images_per_s"] / report["baseline"][kind]["images_per_s"]
      for kind in ("train", "inference")
    }

  print(
    f"{FLAGS.model} {FLAGS.image_size}x{FLAGS.image_size}x{FLAGS.channels} "
    f"batch {FLAGS.batch_size} {FLAGS.dtype} on {report['num_devices']} x "
    f"{report['device_kind']} ({report['backend']}), {FLAGS.steps} timed steps"
  )
  for name in ("sharded", "baseline"):
    if name not in report:
      continue
    for kind in ("train", "inference"):
      r = report[name][kind]
      tflops = f"  {r['tflops_per_s']:.3g} TFLOP/s" if r.get("tflops_per_s") else ""
      print(
        f"  {name:9s} {kind:9s} {r['images_per_s']:10.1f} images/s  "
        f"{r['ms_per_step']:8.2f} ms/step  compile {r['compile_s']:.1f}s{tflops}"
      )
  if "ratio_sharded_over_baseline" in report:
    ratio = report["ratio_sharded_over_baseline"]
    print(
      f"  ratio sharded/baseline: train {ratio['train']:.3f}  inference {ratio['inference']:.3f}"
    )
  report["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  report["provenance"] = provenance.provenance()
  print(f"  provenance: {provenance.one_line(report['provenance'])}")
  print(f"  peak resident memory {report['peak_rss_gib']:.2f} GiB")
  if FLAGS.json_out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json_out)), exist_ok=True)
    with open(FLAGS.json_out, "w") as f:
      json.dump(report, f, indent=1)
    print(f"wrote {FLAGS.json_out}")


if __name__ == "__main__":
  app.run(main)
