"""The fast inference path of EfficientNet-Lite (folded BatchNorm, micro-batches) gives the
reference path's embeddings: equal up to float32 rounding, or close in the opt-in bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rare_jax.deep import inference, trunk_features
from rare_jax.models import efficientnet

SIZE = 32  # tiny images: the same network, seconds to compile


def test_folded_batchnorm_equals_the_flax_trunk_with_nontrivial_statistics():
  # A narrow, shallow Lite: the same code as Lite0-2 at any width and depth, faster to compile.
  model = efficientnet.EfficientNetLite(width=0.5, depth=0.5, depthwise="shifted")
  x = jax.random.normal(jax.random.key(0), (2, SIZE, SIZE, 3))
  variables = _random_variables(model, x, 2)  # (eval_shape: a jitted init takes 17 s)
  expected = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  folded = efficientnet.fold_batchnorm(variables, epsilon=model.bn_epsilon)
  got = jax.jit(lambda f, x: efficientnet.embed_folded(f, x, width=0.5, depth=0.5))(folded, x)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * float(jnp.abs(expected).max()))
  with pytest.raises(ValueError, match="depthwise"):
    efficientnet.embed_folded(folded, x, width=0.5, depth=0.5, depthwise="bad")


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  smooth = rng.integers(0, 256, (5, 4, 4, 3)).repeat(SIZE // 4, 1).repeat(SIZE // 4, 2)
  return np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def reference(images):
  embedder = trunk_features.TrunkEmbedder(
    "efficientnet_lite0", "imagenet", SIZE, batch_size=4, reference=True
  )
  return embedder.embed(images)


def test_default_path_equals_the_reference_within_float32_rounding(images, reference, monkeypatch):
  # A temporary-buffer limit this small forces micro-batches of 1 (with an uneven last batch).
  monkeypatch.setattr(inference, "MAX_TEMP_BYTES", 1)
  embedder = trunk_features.TrunkEmbedder("efficientnet_lite0", "imagenet", SIZE, batch_size=4)
  got = embedder.embed(images)
  assert embedder.micro_batch == 1
  # Measured 2.5e-05 absolute (4e-6 relative) on real images at 128x128 (docs/speed.md).
  np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5 * np.abs(reference).max())
  monkeypatch.undo()
  whole = trunk_features.TrunkEmbedder("efficientnet_lite0", "imagenet", SIZE, batch_size=4)
  np.testing.assert_allclose(
    whole.embed(images), reference, rtol=0, atol=1e-5 * np.abs(reference).max()
  )
  assert whole.micro_batch == 4  # 32x32 images fit the limit at once


def test_bfloat16_is_opt_in_close_and_recorded(images, reference, tmp_path):
  embedder = trunk_features.TrunkEmbedder(
    "efficientnet_lite0", "imagenet", SIZE, batch_size=4, compute="bfloat16"
  )
  got = embedder.embed(images)
  cosine = (
    np.sum(got * reference, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
  )
  assert cosine.min() > 0.99, cosine  # bfloat16 operands: ~3 significant digits per product
  assert np.abs(got - reference).max() < 0.25 * np.abs(reference).max()
  trunk_features.check_source(embedder, str(tmp_path))
  float32 = trunk_features.TrunkEmbedder("efficientnet_lite0", "imagenet", SIZE)
  with pytest.raises(ValueError, match="compute"):
    trunk_features.check_source(float32, str(tmp_path))  # a bfloat16 store refuses float32
  with pytest.raises(ValueError, match="compute"):
    trunk_features.TrunkEmbedder("efficientnet_lite0", "imagenet", SIZE, compute="float16")


def _random_variables(model, x, seed):
  """Variables of `model` with BatchNorm statistics and affine parameters far from identity."""
  shapes = jax.eval_shape(model.init, jax.random.key(seed), x)
  rng = np.random.default_rng(seed)

  def values(path, leaf):
    name = path[-1].key
    if name in ("var", "scale"):
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    if name in ("mean", "bias"):
      return rng.uniform(-0.75, 0.75, leaf.shape).astype(np.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(values, shapes)


def test_deep_updates_embed_folded_equals_the_flax_model(tmp_path, monkeypatch):
  """`updates.embed` (the demo's and the deep updates' path) runs EfficientNet-Lite models
  folded: the outputs of `train.predict` for the whole network, the frozen part and the
  trainable part on cached activations, on the tests' 8-device mesh (whole batches) and on one
  CPU device (micro-batches, an uneven last one). A bfloat16 trunk keeps the Flax path."""
  from jax.sharding import Mesh

  from rare_jax.deep import train, updates
  from rare_jax.infra import sharding
  from rare_jax.models import bgsplit

  trunk = efficientnet.EfficientNetLite(width=0.5, depth=0.5, frozen_blocks=3)
  model = bgsplit.BGSplitModel(trunk=trunk, num_categories=2, num_aux_classes=3)
  images = np.asarray(jax.random.normal(jax.random.key(0), (10, SIZE, SIZE, 3)))
  variables = _random_variables(model, images[:1], 3)
  settings = updates.DeepSettings(model="efficientnet_lite0", embed_batch_size=8)
  mesh = updates.make_mesh(settings)

  def state_of(v):
    state = train.TrainState(jnp.zeros((), jnp.int32), v["params"], v["batch_stats"], ())
    return jax.device_put(state, sharding.replicated(mesh))

  state = state_of(variables)
  frozen_model = bgsplit.TrunkOutput(trunk=trunk.clone(part="frozen"))
  frozen_state = state_of({k: {"trunk": v["trunk"]} for k, v in variables.items()})
  frozen_fn = jax.jit(lambda v, x: frozen_model.trunk.apply(v, x))
  frozen = np.asarray(frozen_fn({k: v["trunk"] for k, v in variables.items()}, images))
  ids = np.arange(len(images))
  cases = (
    ("whole", model, state, images, ("embedding", "main_probs", "aux_labels")),
    ("frozen", frozen_model, frozen_state, images, ("embedding",)),
    ("trainable", updates.trainable_part(model), state, frozen, ("embedding", "main_probs")),
  )
  for name, m, s, inputs, outputs in cases:
    got, want = (
      updates.embed(
        m,
        s,
        None,
        ids,
        str(tmp_path / f"{name}_{folded}"),
        settings,
        outputs=outputs,
        inputs=inputs,
        folded=folded,
        log=lambda _: None,
      )
      for folded in (True, False)
    )
    for key in outputs:
      a, b = np.asarray(got[key]), np.asarray(want[key])
      if key == "aux_labels":
        assert (a == b).mean() >= 0.9, name  # an argmax tie may flip on float rounding
      else:
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max(), err_msg=name)
  # One CPU device: a 1-byte temporary-buffer limit forces micro-batches of 1.
  monkeypatch.setattr(inference, "MAX_TEMP_BYTES", 1)
  one = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  predict = inference.folded_predict(model, state, one)
  out = predict(None, {"image": jnp.asarray(images[:7])})
  ref = jax.jit(lambda v, x: model.apply(v, x))(variables, images[:7])
  np.testing.assert_allclose(
    out["main_probs"], jax.nn.sigmoid(ref["main_logits"]), rtol=0, atol=1e-5
  )
  assert out["embedding"].shape == ref["embedding"].shape
  bf16 = model.clone(trunk=trunk.clone(dtype=jnp.bfloat16))
  assert inference.folded_predict(bf16, state, one) is None
