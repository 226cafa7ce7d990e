r"""The deep updates' embedding (`rare_jax.deep.updates.embed`) at the demo's setting: the Flax
model against the folded path, in the same process.

`updates.embed` embeds the pool and validation set with M_pre and re-embeds them after every
deep update; with the demo's settings (EfficientNet-Lite0 with ImageNet weights at 48x48, 11
of 16 blocks frozen, batches of 256) it runs three programs, each timed here:
  - whole: the whole network on images (M_pre's features);
  - frozen: the stem and the frozen blocks on images (the activations a run caches once);
  - trainable: the other blocks and the heads on the cached activations (every update).
Each is timed with `folded=False` (`train.jit_predict`: the Flax model on whole batches, the
path before 2026-12-06) and `folded=True` (the default: `rare_jax.deep.inference`), alternating
`--rounds` times over `--images` images (after a warm-up pass that compiles); it prints images/s
(median), the speed-up, and the process's peak memory. Only ratios within one run mean
anything on a shared machine.

  PYTHONPATH=. python benchmarks/deep_embed_throughput.py \
      --out=benchmarks/results/deep_embed_throughput.txt
"""

from __future__ import annotations

import os
import platform
import resource
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from rare_jax import models
from rare_jax.deep import train, updates
from rare_jax.infra import sharding

FLAGS = flags.FLAGS
flags.DEFINE_integer("image_size", 48, "Image size (the demo's 48).")
flags.DEFINE_integer("frozen_blocks", 11, "Frozen blocks (the demo's 11).")
flags.DEFINE_integer("batch_size", 256, "embed_batch_size (the demo's 256).")
flags.DEFINE_integer("images", 4096, "Images per timed pass.")
flags.DEFINE_integer("rounds", 3, "Alternations Flax/folded per program.")
flags.DEFINE_string("out", None, "Also write the output to this file.")


def main(argv):
  del argv
  lines = []

  def say(text=""):
    print(text, flush=True)
    lines.append(text)

  settings = updates.DeepSettings(
    model="efficientnet_lite0",
    init="imagenet",
    image_size=FLAGS.image_size,
    frozen_blocks=FLAGS.frozen_blocks,
    freeze_batchnorm=True,
    embed_batch_size=FLAGS.batch_size,
  )
  mesh = updates.make_mesh(settings)
  model = updates.bgsplit_model(settings, 3, 10)
  _, pretrained_vars = models.pretrained.load_classifier(
    settings.model, models.pretrained.weights_path(settings.model)
  )
  shape = (1, FLAGS.image_size, FLAGS.image_size, 3)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)
  variables["params"]["trunk"] = pretrained_vars["params"]["trunk"]
  variables["batch_stats"]["trunk"] = pretrained_vars["batch_stats"]["trunk"]
  rng = np.random.default_rng(0)
  for head in ("main_head", "aux_head"):
    kernel = variables["params"][head]["kernel"]
    variables["params"][head]["kernel"] = rng.normal(size=kernel.shape).astype(np.float32) * 0.03

  def state_of(v):
    state = train.TrainState(jnp.zeros((), jnp.int32), v["params"], v["batch_stats"], ())
    return jax.device_put(state, sharding.replicated(mesh))

  state = state_of(variables)
  trunk_only = state_of({k: {"trunk": v["trunk"]} for k, v in variables.items()})
  images = rng.normal(size=(FLAGS.images, *shape[1:])).astype(np.float32)
  frozen_model = models.TrunkOutput(trunk=model.trunk.clone(part="frozen"))
  frozen_fn = jax.jit(lambda v, x: frozen_model.trunk.apply(v, x))
  trunk_vars = {k: v["trunk"] for k, v in variables.items()}
  frozen = np.concatenate(
    [np.asarray(frozen_fn(trunk_vars, images[i : i + 256])) for i in range(0, len(images), 256)]
  )
  say(
    f"deep embed throughput: {platform.processor() or platform.machine()}, "
    f"{os.cpu_count()} CPUs, jax {jax.__version__}, backend {jax.default_backend()}, "
    f"{len(jax.devices())} device(s); Lite0 at {FLAGS.image_size}x{FLAGS.image_size}, "
    f"{FLAGS.frozen_blocks} blocks frozen, batches of {FLAGS.batch_size}, "
    f"{FLAGS.images} images per pass"
  )
  cases = (
    ("whole", model, state, images, ("embedding", "main_probs")),
    ("frozen", frozen_model, trunk_only, images, ("embedding",)),
    ("trainable", updates.trainable_part(model), state, frozen, ("embedding", "main_probs")),
  )
  ids = np.arange(FLAGS.images)
  with tempfile.TemporaryDirectory() as tmp:
    counter = iter(range(10**6))

    def one_pass(m, s, inputs, outputs, folded):
      start = time.perf_counter()
      updates.embed(
        m,
        s,
        None,
        ids,
        os.path.join(tmp, str(next(counter))),
        settings,
        outputs=outputs,
        inputs=inputs,
        folded=folded,
        log=lambda _: None,
      )
      return FLAGS.images / (time.perf_counter() - start)

    for name, m, s, inputs, outputs in cases:
      for folded in (False, True):
        one_pass(m, s, inputs, outputs, folded)  # compiles
      rates = {False: [], True: []}
      for _ in range(FLAGS.rounds):
        for folded in (False, True):
          rates[folded].append(one_pass(m, s, inputs, outputs, folded))
      flax, new = np.median(rates[False]), np.median(rates[True])
      say(
        f"{name:9s}: Flax {flax:7.0f} img/s, folded {new:7.0f} img/s, "
        f"embed speed-up = {new / flax:.2f}x  (rounds: "
        + ", ".join(f"{b / a:.2f}" for a, b in zip(rates[False], rates[True], strict=True))
        + ")"
      )
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  say(f"peak memory (RSS of this process): {peak:.0f} MiB; load average {os.getloadavg()}")
  if FLAGS.out:
    with open(FLAGS.out, "a") as f:
      f.write(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()) + "\n")
      f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
  app.run(main)
