r"""Embedding throughput of a pretrained trunk on the CPU: today's path against the new default.

Both paths are `rare_jax.deep.trunk_features.TrunkEmbedder` (what `label` and `predict` embed
with), in the same process, on the same batches of `--batch_size` normalised images:
  - reference (`reference=True`): the Flax classifier jitted on whole batches (the path before
    2026-12-05);
  - new (the default): BatchNorm folded into the convolutions, pointwise convolutions as matrix
    products, micro-batches whose XLA temporary buffer stays under glibc's mmap threshold;
  - with `--bf16`, also the opt-in `compute="bfloat16"` (bfloat16 matrix-product operands).
Measurements alternate reference/new `--rounds` times (the machine may be shared: only ratios
within one run mean anything); each lasts at least `--seconds`. Per size it prints the speed-up
(median wall-clock images/s over the rounds, and CPU time per image, which a shared machine
disturbs less), the fraction of the CPU's float32 peak, XLA's memory per call and the
embeddings' difference from the reference on real images (Fashion-MNIST, and scikit-learn's
two sample photographs in crops when scikit-learn is installed).

The float32 peak: logical CPUs this process may use x the clock (`cpu MHz` of /proc/cpuinfo)
x float32 FLOPs per cycle and core from the flags (avx512f: 2 FMA units x 16 lanes x 2 = 64;
avx2 with fma: 32; else 8). "Per CPU-second" divides by the CPU time the process used
instead of the wall-clock time, i.e. the fraction of peak of the cores it actually got.

  PYTHONPATH=. python benchmarks/embed_throughput.py --sizes=48,128,224 --bf16 \
      --out=benchmarks/results/embed_throughput.txt
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from PIL import Image

from rare_jax.deep import trunk_features
from rare_jax.infra import provenance
from rare_jax.models import efficientnet, pretrained

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "efficientnet_lite0", "An EfficientNet-Lite trunk of PRETRAINED.")
flags.DEFINE_list("sizes", ["48", "128", "224"], "Image sizes (the demo's 48, app's 128, 224).")
flags.DEFINE_integer("batch_size", 32, "TrunkEmbedder batch size (the folder runs' default).")
flags.DEFINE_integer("rounds", 3, "Alternations reference/new per size.")
flags.DEFINE_float("seconds", 3.0, "Minimum seconds per measurement.")
flags.DEFINE_bool("bf16", False, "Also time the opt-in compute='bfloat16'.")
flags.DEFINE_string("out", None, "Also write the output to this file.")


def cpu_peak() -> tuple[float, float, str]:
  """(float32 GFLOP/s of the usable cores, of one core, how it was computed)."""
  info = open("/proc/cpuinfo").read()
  flags_line = next(line for line in info.splitlines() if line.startswith("flags")).split()
  mhz = max(float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz"))
  if "avx512f" in flags_line:
    per_cycle, why = 64, "avx512f: 2 FMA x 16 lanes x 2"
  elif "avx2" in flags_line and "fma" in flags_line:
    per_cycle, why = 32, "avx2+fma: 2 FMA x 8 lanes x 2"
  else:
    per_cycle, why = 8, "no avx2/avx512"
  cores = len(os.sched_getaffinity(0))
  per_core = mhz / 1000 * per_cycle
  extra = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags_line]
  return (
    cores * per_core,
    per_core,
    f"{cores} cores x {mhz:.0f} MHz x {per_cycle} FLOP/cycle ({why}); also has {extra}",
  )


def lite_gflop(model: str, size: int) -> float:
  """GFLOP (2 per multiply-add) of one image through the trunk's convolutions."""
  trunk = pretrained.load_classifier(model)[0].trunk
  width, depth = trunk.width, trunk.depth
  h = -(-size // 2)
  stem = efficientnet.round_filters(32, 1.0)
  total = h * h * stem * 27 * 2
  filters = stem
  for kernel, stride, expand, filters_in, filters_out in efficientnet.block_specs(width, depth):
    wide = filters_in * expand
    if expand != 1:
      total += h * h * filters_in * wide * 2
    h = -(-h // stride)
    total += h * h * wide * (kernel * kernel + filters_out) * 2
    filters = filters_out
  return (total + h * h * filters * 1280 * 2) / 1e9


def real_images(size: int, embedder) -> np.ndarray:
  """uint8 [n, size, size, 3]: Fashion-MNIST images and crops of two photographs."""
  from rare_jax.data import folder

  out = []
  with tempfile.TemporaryDirectory() as tmp:
    images, _ = folder.write_example_folder(tmp, per_class=3, rare_count=3, num_seeds=1)
    for root, _, names in sorted(os.walk(images)):
      out += [embedder.read(os.path.join(root, n)) for n in sorted(names)]
  try:
    from sklearn.datasets import load_sample_images

    for photo in load_sample_images().images:
      h, w = photo.shape[:2]
      for k in range(8):
        side = min(h, w) // (1 + k % 3)
        y, x = (k * 37) % (h - side + 1), (k * 91) % (w - side + 1)
        crop = Image.fromarray(photo[y : y + side, x : x + side])
        out.append(folder.resize_image(crop, size))
  except ImportError:
    pass
  return np.stack(out)


def measure(embedder, batch: np.ndarray, seconds: float) -> dict:
  embedder.embed_normalized(batch)  # compiled and warm
  r0, t0, n = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), 0
  while n < 2 or time.perf_counter() - t0 < seconds:
    embedder.embed_normalized(batch)
    n += len(batch)
  wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
  cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
  return {
    "img_s": n / wall,
    "cpu_ms": 1000 * cpu / n,
    "sys_ms": 1000 * (r1.ru_stime - r0.ru_stime) / n,
    "faults": (r1.ru_minflt - r0.ru_minflt) / n,
  }


def memory_mib(embedder) -> float:
  stats = embedder._executable()[1].memory_analysis()
  total = stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
  return total / 2**20


def main(argv):
  del argv
  lines = []

  def say(text=""):
    print(text, flush=True)
    lines.append(text)

  peak, peak_core, how = cpu_peak()
  uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
  say(f"embed_throughput {time.strftime('%Y-%m-%d %H:%M:%S')} {platform.node()}")
  say(f"jax {jax.__version__} backend {jax.default_backend()}, python {sys.version.split()[0]}")
  say(f"float32 peak {peak:.0f} GFLOP/s = {how}")
  say(f"load before: {uptime}")
  say("GPU: none lent to this session; CPU only.")
  say(f"provenance: {provenance.one_line()}")
  for size in [int(s) for s in FLAGS.sizes]:
    kinds = {"reference": dict(reference=True), "new": {}}
    if FLAGS.bf16:
      kinds["new_bf16"] = dict(compute="bfloat16")
    embedders = {
      k: trunk_features.TrunkEmbedder(
        FLAGS.model, "imagenet", size, batch_size=FLAGS.batch_size, **kw
      )
      for k, kw in kinds.items()
    }
    images = real_images(size, embedders["reference"])
    embedded = {k: e.embed(images) for k, e in embedders.items()}
    reps = -(-FLAGS.batch_size // len(images))
    batch = embedders["reference"].normalize(np.tile(images, (reps, 1, 1, 1))[: FLAGS.batch_size])
    results = {k: [] for k in embedders}
    for _ in range(FLAGS.rounds):
      for k, e in embedders.items():
        results[k].append(measure(e, batch, FLAGS.seconds))
    gflop = lite_gflop(FLAGS.model, size)
    ref = embedded["reference"]
    say(f"\n== {FLAGS.model} {size}x{size}, batch {FLAGS.batch_size}, {gflop:.3f} GFLOP/image")
    med = {k: {m: float(np.median([r[m] for r in v])) for m in v[0]} for k, v in results.items()}
    for k, e in embedders.items():
      m = med[k]
      diff = np.abs(embedded[k] - ref).max()
      rounds = ", ".join(f"{r['img_s']:.1f}" for r in results[k])
      say(
        f"{k:10s} micro-batch {e.micro_batch:3d}: {m['img_s']:7.1f} img/s "
        f"(rounds: {rounds}), "
        f"CPU {m['cpu_ms']:6.2f} ms/img (sys {m['sys_ms']:5.2f}, {m['faults']:5.0f} page "
        f"faults/img), XLA memory per call {memory_mib(e):6.1f} MiB, "
        f"max |diff| vs reference {diff:.2e} (relative to max |ref| "
        f"{diff / np.abs(ref).max():.1e}, {len(images)} real images)"
      )
      cores = len(os.sched_getaffinity(0))
      wall_frac = gflop * m["img_s"] / peak
      cpu_frac = gflop / (m["cpu_ms"] / 1000) / peak_core
      say(
        f"{'':10s} fraction of float32 peak = {wall_frac:.3f} (wall-clock, {cores} cores); "
        f"{cpu_frac:.3f} per CPU-second used"
      )
    for k in embedders:
      if k == "reference":
        continue
      speed = med[k]["img_s"] / med["reference"]["img_s"]
      cpu_speed = med["reference"]["cpu_ms"] / med[k]["cpu_ms"]
      say(f"{size}: {k}: embed speed-up = {speed:.2f} (CPU time per image: {cpu_speed:.2f}x)")
  say(f"\nload after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  say(f"process peak RSS {rss:.0f} MiB (all paths and sizes together)")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  app.run(main)
