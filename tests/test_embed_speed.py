"""The fast inference path of EfficientNet-Lite (folded BatchNorm, micro-batches) gives the
reference path's embeddings: equal up to float32 rounding, or close in the opt-in bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rare_jax.deep import trunk_features
from rare_jax.models import efficientnet

SIZE = 32  # tiny images: the same network, seconds to compile


def test_folded_batchnorm_equals_the_flax_trunk_with_nontrivial_statistics():
  # A narrow, shallow Lite: the same code as Lite0-2 at any width and depth, faster to compile.
  model = efficientnet.EfficientNetLite(width=0.5, depth=0.5, depthwise="shifted")
  x = jax.random.normal(jax.random.key(0), (2, SIZE, SIZE, 3))
  shapes = jax.eval_shape(model.init, jax.random.key(1), x)  # (jitted init: 17 s to compile)
  rng = np.random.default_rng(2)

  def values(path, leaf):  # BatchNorm statistics and affine parameters far from identity
    name = path[-1].key
    if name in ("var", "scale"):
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    if name in ("mean", "bias"):
      return rng.uniform(-0.75, 0.75, leaf.shape).astype(np.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(values, shapes)
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
  monkeypatch.setattr(trunk_features, "MAX_TEMP_BYTES", 1)
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
