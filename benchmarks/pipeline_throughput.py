r"""End-to-end img/s of the grain input pipeline feeding the demo model vs in-memory tensors.

The demo model (experiments/configs/demo.py): EfficientNet-Lite0 at 48x48x3, frozen_blocks=11,
BatchNorm statistics frozen, a 3-category background-splitting head; random weights (speed
does not depend on them). Two tasks: `embed` (jitted `train.predict`, outputs fetched to the
host every batch, as `embed_to_store` does; batch 256) and `train` (jitted `train_step`,
state chained; batch 128).

Baseline ("synthetic"): the same jitted function on one float32 48x48x3 batch already in
memory. End-to-end: `pipeline.iterate_batches` over stored/encoded images, for each
  - source: `tfds` (the embedded `rare_fashion_mnist` train split as stored: array_record,
    28x28x1 uint8 tensors), and folders written here into a temp dir from its images:
    `png28` (the 28x28 images as PNG), `jpeg48` (upsampled to 48x48 RGB, JPEG q90),
    `jpeg224` (upsampled to 224x224, JPEG q90), read through `folder.open_folder`;
  - mode: `device` (workers decode; resize 28/224 -> 48, grayscale -> RGB and ImageNet
    normalisation in the jitted step, `on_device.preprocess`) or `host` (workers also
    resize/normalise with NumPy, float32 batches);
  - worker count: 0 (one prefetch thread in this process) or N grain worker processes.
Worker start-up and compilation are excluded (`--warmup` batches are not timed). The
baseline is measured again right after each end-to-end measurement (the machine is shared:
the load drifts); prints both rates, their ratio and peak RSS (this process; the largest
worker's VmHWM, sampled at every batch).

  python benchmarks/pipeline_throughput.py                     # the full matrix (~10 min)
  python benchmarks/pipeline_throughput.py --sources=tfds --modes=device --workers=0,1
"""

from __future__ import annotations

import os
import resource
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from PIL import Image

from rare_jax import models
from rare_jax.data import folder, on_device, pipeline, sources
from rare_jax.deep import train
from rare_jax.infra import provenance

FLAGS = flags.FLAGS
IMAGE_SIZE = 48
BATCH = {"embed": 256, "train": 128}
OPTIONS = {
  "image_size": IMAGE_SIZE,
  "channels": 3,
  "mean": pipeline.IMAGENET_MEAN,
  "std": pipeline.IMAGENET_STD,
}


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def workers_peak_rss_gib() -> float:
  """The largest VmHWM (peak RSS) among this process's live descendants (the grain workers).
  Not RUSAGE_CHILDREN: a spawned child's ru_maxrss keeps the parent's RSS at fork time."""
  peak, pending = 0, [os.getpid()]
  while pending:
    pid = pending.pop()
    try:
      for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
          pending += [int(c) for c in f.read().split()]
    except OSError:
      continue
    if pid == os.getpid():
      continue
    try:
      with open(f"/proc/{pid}/status") as f:
        for line in f:
          if line.startswith("VmHWM:"):
            peak = max(peak, int(line.split()[1]))
    except OSError:
      continue
  return peak / 2**20


def write_folder(root: str, images: np.ndarray, *, size: int | None, fmt: str) -> None:
  os.makedirs(root)
  for i, image in enumerate(images):
    pil = folder.image_to_pil(image) if size else Image.fromarray(image[..., 0], mode="L")
    if size:
      pil = pil.resize((size, size), Image.Resampling.BILINEAR)
    suffix = "jpg" if fmt == "JPEG" else "png"
    pil.save(os.path.join(root, f"{i:06d}.{suffix}"), format=fmt, quality=90)


def build_functions(batch_size: dict):
  trunk = models.get_trunk(
    "efficientnet_lite0",
    dtype=jnp.float32,
    depthwise="auto",
    frozen_blocks=11,
    freeze_batchnorm=True,
  )
  model = models.BGSplitModel(trunk=trunk, num_categories=3, num_aux_classes=10)
  tx = train.make_optimizer(total_steps=10_000, warmup_steps=0, frozen=train.frozen_mask(model))
  state = train.create_train_state(
    jax.random.key(0, impl="rbg"), model=model, tx=tx, input_shape=(1, IMAGE_SIZE, IMAGE_SIZE, 3)
  )

  def with_images(images, raw):
    return on_device.preprocess(images, **OPTIONS) if raw else images

  def embed(state, images, mask, raw):
    batch = {"image": with_images(images, raw), "mask": mask}
    return train.predict(state, batch, model=model)["embedding"]

  def step(state, images, mask, labels, raw):
    batch = {
      "image": with_images(images, raw),
      "mask": mask,
      "labels": labels,
      "label_mask": jnp.broadcast_to(mask[:, None], labels.shape),
      "aux_labels": jnp.zeros(mask.shape, jnp.int32),
    }
    return train.train_step(state, batch, model=model, tx=tx, aux_weight=0.1)

  functions = {
    "embed": jax.jit(embed, static_argnames="raw"),
    "train": jax.jit(step, static_argnames="raw", donate_argnums=0),
  }
  return state, functions


def run_task(task, functions, state, batches, *, raw, warmup):
  """img/s over the batches after `warmup` untimed ones (compilation, worker start-up)."""
  fn = functions[task]
  size = BATCH[task]
  labels = np.zeros((size, 3), np.float32)
  count, start = 0, None
  out = None
  worker_rss = 0.0
  for i, batch in enumerate(batches):
    # Sampled while the batches come: a grain worker exits once its share is made.
    worker_rss = max(worker_rss, workers_peak_rss_gib())
    if i == warmup:
      jax.block_until_ready(out)
      start = time.perf_counter()
    if task == "embed":
      out = np.asarray(fn(state, batch["image"], batch["mask"], raw=raw))  # to the host
    else:
      state, out = fn(state, batch["image"], batch["mask"], labels, raw=raw)
    if start is not None:
      count += size
  jax.block_until_ready(out)
  return count / (time.perf_counter() - start), state, worker_rss


def synthetic_batches(task, steps):
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.standard_normal((BATCH[task], IMAGE_SIZE, IMAGE_SIZE, 3), np.float32),
    "mask": np.ones(BATCH[task], bool),
  }
  return [batch] * steps


def main(argv):
  del argv
  tasks = FLAGS.tasks
  steps = FLAGS.warmup + FLAGS.steps
  need = steps * max(BATCH[t] for t in tasks)
  data_dir = FLAGS.data_dir or None
  tfds_source = sources.open_source("rare_fashion_mnist", "train", data_dir)
  images, _ = sources.load_arrays(tfds_source, np.arange(need))
  with os.popen("uptime") as f:
    load = f.read().strip()
  print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, {load}")
  print(f"# provenance: {provenance.one_line()}")
  print(
    f"# jax {jax.__version__} ({jax.default_backend()}), efficientnet_lite0 {IMAGE_SIZE}x"
    f"{IMAGE_SIZE}x3 frozen_blocks=11, batches: embed {BATCH['embed']}, train "
    f"{BATCH['train']}; {FLAGS.warmup} warm-up + {FLAGS.steps} timed batches"
  )
  state, functions = build_functions(BATCH)

  def synthetic(task, state):
    batches = synthetic_batches(task, steps)
    rate, state, _ = run_task(task, functions, state, batches, raw=False, warmup=FLAGS.warmup)
    return rate, state

  with tempfile.TemporaryDirectory() as tmp:
    data = {}
    for name in FLAGS.sources:
      start = time.perf_counter()
      if name == "tfds":
        data[name] = tfds_source
        continue
      size, fmt = {"png28": (None, "PNG"), "jpeg48": (48, "JPEG"), "jpeg224": (224, "JPEG")}[name]
      write_folder(os.path.join(tmp, name), images, size=size, fmt=fmt)
      data[name] = folder.open_folder(os.path.join(tmp, name))
      print(f"# wrote {need} {name} files in {time.perf_counter() - start:.1f} s", flush=True)
    best = {}
    workers_peak = 0.0
    for name in FLAGS.sources:
      for mode in FLAGS.modes:
        for workers in (int(w) for w in FLAGS.workers):
          for task in tasks:
            batches = pipeline.iterate_batches(
              data[name],
              np.arange(steps * BATCH[task]),
              batch_size=BATCH[task],
              num_workers=workers,
              prefetch=FLAGS.prefetch,
              host_preprocess=mode == "host",
              **({} if mode == "device" else OPTIONS),
            )
            rate, state, worker_rss = run_task(
              task, functions, state, batches, raw=mode == "device", warmup=FLAGS.warmup
            )
            workers_peak = max(workers_peak, worker_rss)
            batches.close()
            # The baseline right after, under the same (shared machine's) load.
            baseline, state = synthetic(task, state)
            ratio = rate / baseline
            key = (name, mode, task)
            if ratio > best.get(key, (0, None))[0]:
              best[key] = (ratio, workers)
            print(
              f"{name:7s} {mode:6s} workers={workers} {task:5s}: {rate:7.1f} img/s vs synthetic "
              f"{baseline:7.1f} img/s: {ratio:.2f}x | peak RSS {peak_rss_gib():.2f} GiB, "
              f"largest worker {worker_rss:.2f} GiB",
              flush=True,
            )
  print("# best worker count per (source, mode, task): ratio")
  for (name, mode, task), (ratio, workers) in best.items():
    print(f"#   {name} {mode} {task}: workers={workers} {ratio:.2f}x")
  print(f"# peak RSS: this process {peak_rss_gib():.2f} GiB, largest worker {workers_peak:.2f} GiB")


if __name__ == "__main__":
  flags.DEFINE_list("tasks", ["embed", "train"], "embed and/or train.")
  flags.DEFINE_list("sources", ["tfds", "png28", "jpeg48", "jpeg224"], "Image sources.")
  flags.DEFINE_list("modes", ["device", "host"], "Where resize/normalisation run.")
  flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker counts (0: a prefetch thread).")
  flags.DEFINE_integer("prefetch", 2, "Batches buffered (per worker).")
  flags.DEFINE_integer("steps", 10, "Timed batches per measurement.")
  flags.DEFINE_integer("warmup", 2, "Untimed batches first (compilation, worker start).")
  flags.DEFINE_string("data_dir", "", "TFDS data dir ('' = the default).")
  app.run(main)
