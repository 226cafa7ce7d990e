"""Deep updates from cached frozen activations equal updates from images.

An EfficientNet-Lite trunk with `frozen_blocks` > 0 runs its stem and first blocks as a fixed
function of the image; `updates.DeepUpdater` computes that part once per image
(`updates.frozen_inputs`) and trains / re-embeds with the trainable part only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rare_jax.deep import updates
from rare_jax.models.efficientnet import efficientnet_lite0

SIZE = 32  # block 10 (the last frozen one) outputs 2x2x112, blocks 11-15 run at 2x2 and 1x1
FROZEN = 11


def _settings(**kwargs):
  values = dict(
    model="efficientnet_lite0",
    init="",
    image_size=None,
    channels=3,
    frozen_blocks=FROZEN,
    freeze_batchnorm=True,
    batch_size=8,
    embed_batch_size=8,
    epochs=1,
    learning_rate=0.05,
    warmup_fraction=0.0,
  )
  values.update(kwargs)
  return updates.DeepSettings(**values)


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (12, SIZE, SIZE, 3), dtype=np.uint8)
  data = updates.ImageData(train=(images, np.zeros(12, np.int64)), eval=(images, np.zeros(12)))
  settings = _settings()
  model = updates.bgsplit_model(settings, num_categories=2, num_aux_classes=5)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
  labels = np.full((2, 12), -1, np.int8)
  labels[0, :3], labels[0, 3:6], labels[1, 6:8] = 1, 0, 0
  examples = updates.training_set(labels, np.zeros((2, 12), bool), rng.integers(0, 5, 12))
  return data, settings, model, variables, examples


def test_frozen_then_trainable_part_equals_the_whole_network():
  trunk = efficientnet_lite0(frozen_blocks=FROZEN, freeze_batchnorm=True)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, SIZE, SIZE, 3)), jnp.float32)
  variables = trunk.init(jax.random.key(1), x)
  frozen = trunk.clone(part="frozen").apply(variables, x)
  assert frozen.shape[1:] == (2, 2, 112)  # block 10's output

  def loss(params, part, inputs):
    return jnp.sum(jnp.sin(trunk.clone(part=part).apply({**variables, "params": params}, inputs)))

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  whole = value_and_grad(variables["params"], "all", x)
  split = value_and_grad(variables["params"], "trainable", frozen)
  np.testing.assert_allclose(split[0], whole[0], rtol=1e-6)
  for name in ("head_conv", "block11", "block15"):
    for got, want in zip(
      jax.tree.leaves(split[1][name]), jax.tree.leaves(whole[1][name]), strict=True
    ):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="part must be one of"):
    trunk.clone(part="middle").apply(variables, x)
  with pytest.raises(ValueError, match="needs frozen_blocks >= 1"):
    efficientnet_lite0(part="frozen").apply(variables, x)


def test_update_from_cached_activations_equals_update_from_images(setup, tmp_path):
  data, settings, model, variables, examples = setup
  pool_ids = np.arange(12)
  frozen = updates.frozen_inputs(
    settings, variables, data.train, pool_ids, str(tmp_path / "frozen")
  )
  assert frozen.shape == (12, 2, 2, 112)
  # Resumed from its store: the same rows, nothing recomputed.
  again = updates.frozen_inputs(settings, variables, data.train, pool_ids, str(tmp_path / "frozen"))
  np.testing.assert_array_equal(again, frozen)

  def update(directory, cache):
    return updates.bgsplit_update(
      model=model,
      start_variables=variables,
      examples=examples,
      pool_ids=pool_ids,
      data=data,
      settings=settings,
      directory=str(tmp_path / directory),
      seed=3,
      log=lambda _: None,
      frozen=cache,
    )

  from_images, from_cache = update("images", None), update("cache", frozen)
  for got, want in zip(
    jax.tree.leaves(from_cache.params), jax.tree.leaves(from_images.params), strict=True
  ):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  moved = jax.tree.map(
    lambda a, b: float(jnp.abs(a - b).max()), from_cache.params, variables["params"]
  )
  assert moved["trunk"]["block15"]["project_conv"]["kernel"] > 0  # it trained
  assert moved["trunk"]["block3"]["project_conv"]["kernel"] == 0  # frozen stays

  # Re-embedding from the cache equals embedding the images with the whole network.
  by_image = updates.embed(model, from_cache, data.train, pool_ids, str(tmp_path / "e1"), settings)
  by_cache = updates.embed(
    updates.trainable_part(model),
    from_cache,
    data.train,
    pool_ids,
    str(tmp_path / "e2"),
    settings,
    inputs=frozen,
  )
  np.testing.assert_allclose(by_cache.features, by_image.features, rtol=1e-5, atol=1e-6)


def test_only_a_frozen_efficientnet_has_a_cache():
  assert updates.caches_frozen_part(_settings())
  assert not updates.caches_frozen_part(_settings(frozen_blocks=0, freeze_batchnorm=False))
  with pytest.raises(ValueError, match="no frozen part"):
    updates.frozen_inputs(_settings(frozen_blocks=0), {}, None, np.arange(2), "unused")
