"""The self-supervised start: NT-Xent, augmentations, SimCLR training, resume, aux labels."""

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.linear_model import LogisticRegression
from synthetic import synthetic_images

from rare_jax.data import fashion_mnist, pipeline
from rare_jax.deep import augment, selfsup, train, updates
from rare_jax.models import BasicBlock, ResNet
from rare_jax.models.simclr import SimCLRModel

# ----------------------------------------------------------------------------- NT-Xent


def test_nt_xent_hand_computed_2x2():
  # Views: image 0 -> a=(1,0), a'=(0,1); image 1 -> b=(0,1), b'=(1,0); temperature 1.
  # Anchor a: positive a' (cos 0), negatives b (cos 0), b' (cos 1): log(1 + 1 + e) - 0.
  # By symmetry every anchor has that loss.
  z1 = jnp.array([[1.0, 0.0], [0.0, 2.0]])  # norms do not matter (cosines)
  z2 = jnp.array([[0.0, 3.0], [1.0, 0.0]])
  np.testing.assert_allclose(selfsup.nt_xent(z1, z2, 1.0), [math.log(2 + math.e)] * 2, rtol=1e-6)
  # Temperature 0.5 doubles the logits: log(1 + 1 + e^2).
  np.testing.assert_allclose(selfsup.nt_xent(z1, z2, 0.5), [math.log(2 + math.e**2)] * 2, rtol=1e-6)
  # Image 1 is padding: anchor a has only its positive left (loss 0), and row 1 is 0.
  np.testing.assert_allclose(selfsup.nt_xent(z1, z2, 1.0, jnp.array([True, False])), [0.0, 0.0])


def test_nt_xent_padding_rows_change_nothing():
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(2, 5, 4)).astype(np.float32)
  real = selfsup.nt_xent(z1[:3], z2[:3], 0.5)
  padded = selfsup.nt_xent(z1, z2, 0.5, np.arange(5) < 3)
  np.testing.assert_allclose(padded[:3], real, rtol=1e-6)
  np.testing.assert_array_equal(padded[3:], 0.0)
  with pytest.raises(ValueError, match=r"\(4, 4\)"):
    selfsup.nt_xent(z1, z2[:, :4][:4], 0.5)


# ----------------------------------------------------------------------------- augmentations


@pytest.mark.parametrize("channels", [1, 3])
def test_augmentations_shape_determinism_and_variety(channels):
  images = jnp.asarray(np.random.default_rng(1).normal(size=(4, 12, 10, channels)), jnp.float32)
  config = augment.AugmentConfig(crop_scale=(0.3, 1.0))
  view = jax.jit(augment.simclr_augment, static_argnums=2)
  first = view(jax.random.key(0), images, config)
  assert first.shape == images.shape and first.dtype == images.dtype
  np.testing.assert_array_equal(first, view(jax.random.key(0), images, config))
  other = view(jax.random.key(1), images, config)
  assert not np.allclose(first, other)
  assert not np.allclose(first, images)
  assert np.isfinite(np.asarray(first)).all()
  for fn in (augment.random_resized_crop, augment.random_flip, augment.color_jitter):
    out = jax.eval_shape(fn, jax.random.key(2), images)
    assert out.shape == images.shape and out.dtype == images.dtype, fn.__name__


def test_full_crop_and_no_jitter_is_identity_or_mirror():
  images = jnp.asarray(np.random.default_rng(2).normal(size=(6, 8, 8, 1)), jnp.float32)
  crop = augment.random_resized_crop(jax.random.key(0), images, scale=(1.0, 1.0), ratio=(1, 1))
  np.testing.assert_allclose(crop, images, atol=1e-5)
  flipped = np.asarray(augment.random_flip(jax.random.key(0), images))
  for out, image in zip(flipped, np.asarray(images), strict=True):
    assert np.array_equal(out, image) or np.array_equal(out, image[:, ::-1])
  with pytest.raises(ValueError, match="crop_scale"):
    augment.AugmentConfig(crop_scale=(0.0, 1.0))


# ----------------------------------------------------------------------------- SimCLR learns

PROBE_CLASSES = (0, 1, 8, 9)  # T-shirt, trouser, bag, ankle boot
NUM_IMAGES, SIZE, STEPS, BATCH = 1024, 16, 40, 64


def _nuisance_fashion_mnist():
  """Fashion-MNIST at 16x16 with a strong per-image brightness and contrast change: the
  nuisance that SimCLR's colour jitter teaches invariance to."""
  images, labels = fashion_mnist.read_raw_split(fashion_mnist.ensure_raw_files(), "train")
  rng = np.random.default_rng(0)
  chosen = rng.choice(np.flatnonzero(np.isin(labels, PROBE_CLASSES)), NUM_IMAGES, replace=False)
  x = pipeline.preprocess(images[chosen], image_size=SIZE, mean=0.5, std=0.5)
  x = x * rng.uniform(0.4, 1.6, (NUM_IMAGES, 1, 1, 1)) + rng.uniform(-1, 1, (NUM_IMAGES, 1, 1, 1))
  return x.astype(np.float32), labels[chosen]


@pytest.fixture(scope="module")
def simclr_run():
  images, labels = _nuisance_fashion_mnist()
  trunk = ResNet(stage_sizes=(1,), block_cls=BasicBlock, num_filters=16, small_stem=True)
  model = SimCLRModel(trunk, projection_dim=32)
  tx = optax.adam(1e-2)
  init = functools.partial(
    train.create_train_state, model=model, tx=tx, input_shape=(1, SIZE, SIZE, 1)
  )
  state0 = jax.jit(init)(jax.random.key(0, impl="rbg"))
  config = augment.AugmentConfig(
    crop_scale=(0.5, 1.0), brightness=1.0, contrast=0.7, jitter_probability=1.0
  )
  step = jax.jit(
    functools.partial(
      selfsup.simclr_step, model=model, tx=tx, temperature=0.5, seed=0, augment_config=config
    )
  )
  state, history = state0, []
  for i in range(STEPS):
    indices, mask = train.step_batch_indices(NUM_IMAGES, BATCH, i, seed=0)
    state, metrics = step(state, {"image": images[indices], "mask": mask})
    history.append(float(metrics["loss"]))
  embed = jax.jit(lambda s, x: model.apply(s.variables, x)["embedding"])
  return {
    "images": images,
    "labels": labels,
    "state0": state0,
    "state": state,
    "history": history,
    "embed": embed,
  }


def _probe_accuracy(embed, state, images, labels):
  features = np.asarray(embed(state, images))
  half = len(images) // 2
  features = (features - features[:half].mean(0)) / (features[:half].std(0) + 1e-6)
  probe = LogisticRegression(max_iter=2000).fit(features[:half], labels[:half])
  return probe.score(features[half:], labels[half:])


def test_simclr_loss_decreases(simclr_run):
  history = simclr_run["history"]
  assert np.all(np.isfinite(history))
  start, end = np.mean(history[:5]), np.mean(history[-5:])
  assert end < start - 0.2, (start, end)


def test_linear_probe_beats_random_trunk(simclr_run):
  run = simclr_run
  random_acc = _probe_accuracy(run["embed"], run["state0"], run["images"], run["labels"])
  ssl_acc = _probe_accuracy(run["embed"], run["state"], run["images"], run["labels"])
  print(f"linear probe: random trunk {random_acc:.3f}, SimCLR {ssl_acc:.3f}")
  assert ssl_acc >= random_acc + 0.05, (random_acc, ssl_acc)


# ----------------------------------------------------------------------------- driver, resume


class _Killed(Exception):
  pass


def _driver_setup():
  labels = np.arange(24) % 8
  data = (synthetic_images(labels, 0), labels)
  settings = updates.DeepSettings(model="resnet_tiny", batch_size=8, embed_batch_size=24)
  ssl = selfsup.SelfSupSettings(
    epochs=2, learning_rate=0.1, projection_dim=8, num_clusters=3, temperature=0.5
  )
  return data, np.arange(24), settings, ssl


def _smallest_trunk(self):
  return ResNet(stage_sizes=(1,), block_cls=BasicBlock, num_filters=4, small_stem=True)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
  # A one-block trunk instead of resnet_tiny's three stages: compiles are the slow part here.
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(updates.DeepSettings, "trunk", _smallest_trunk)
    return _train_straight_and_resumed(tmp_path_factory)


def _train_straight_and_resumed(tmp_path_factory):
  data, ids, settings, ssl = _driver_setup()
  straight_dir = str(tmp_path_factory.mktemp("straight"))
  model, straight = selfsup.pretrain_self_supervised(
    data, ids, settings, ssl, straight_dir, seed=5, log=lambda line: None
  )

  def kill_after_first_epoch(line):
    if "epoch 1/2" in line:
      raise _Killed(line)

  resumed_dir = str(tmp_path_factory.mktemp("resumed"))
  with pytest.raises(_Killed):
    selfsup.pretrain_self_supervised(
      data, ids, settings, ssl, resumed_dir, seed=5, log=kill_after_first_epoch
    )
  lines = []
  _, resumed = selfsup.pretrain_self_supervised(
    data, ids, settings, ssl, resumed_dir, seed=5, log=lines.append
  )
  return model, straight, resumed, lines, data


def test_kill_and_resume_is_bit_identical(resumed):
  _, straight, again, lines, _ = resumed
  assert [line.split(" |")[0] for line in lines] == ["self-supervised M_pre: epoch 2/2"]
  assert int(straight.step) == int(again.step) == 6
  assert jax.tree.structure(straight) == jax.tree.structure(again)
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), straight, again
  )


def test_aux_labels_and_classifier_from_clusters(resumed):
  model, state, _, _, data = resumed
  images = pipeline.make_batch(data, np.arange(24), batch_size=24)["image"]
  predict = jax.jit(functools.partial(train.predict, model=model))
  features = np.asarray(predict(state, {"image": images})["embedding"])
  aux_labels, centroids = selfsup.cluster_aux_labels(features, 3, seed=0)
  assert aux_labels.shape == (24,) and centroids.shape == (3, features.shape[1])
  assert set(aux_labels.tolist()) == {0, 1, 2}
  classifier, m_pre = selfsup.classifier_from_clusters(model, state, centroids)
  out = jax.jit(functools.partial(train.predict, model=classifier))(m_pre, {"image": images})
  np.testing.assert_array_equal(np.asarray(out["labels"]), aux_labels)
  np.testing.assert_allclose(np.asarray(out["embedding"]), features, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="num_clusters=5"):
    selfsup.cluster_aux_labels(features[:4], 5, seed=0)


def test_settings_from_config_and_validation():
  ssl = selfsup.SelfSupSettings.from_config(
    {"epochs": 3, "augment": {"crop_scale": [0.3, 1.0], "brightness": 0.2}}
  )
  assert ssl.epochs == 3 and ssl.augment.crop_scale == (0.3, 1.0)
  assert ssl.augment.brightness == 0.2
  with pytest.raises(ValueError, match="unknown"):
    selfsup.SelfSupSettings.from_config({"epoch": 3})
  with pytest.raises(ValueError, match="temperature"):
    selfsup.SelfSupSettings(temperature=0.0)


@pytest.mark.parametrize(
  "init, expected",
  [("", "related_split"), ("imagenet", "pretrained"), ("self_supervised", "self_supervised")],
)
def test_m_pre_source_of_each_init(init, expected):
  from rare_jax.deep import m_pre, updates

  model = "efficientnet_lite0" if init == "imagenet" else "resnet_tiny"
  assert m_pre.source(updates.DeepSettings(model=model, init=init)) == expected


# ----------------------------------------------------------------------------- shared model cache


def test_shared_model_is_reused_with_the_same_settings_and_rebuilt_with_others(tmp_path):
  data, _, settings, ssl = _driver_setup()
  ssl = dataclasses.replace(ssl, epochs=1, shared_images=16, shared_seed=3, num_clusters=3)
  cache = str(tmp_path)

  def shared(ssl, lines):
    return selfsup.shared_self_supervised(
      data,
      dataset="synthetic",
      split="train",
      num_examples=24,
      settings=settings,
      ssl=ssl,
      cache_dir=cache,
      log=lines.append,
    )

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(updates.DeepSettings, "trunk", _smallest_trunk)
    first_lines, again_lines, other_lines = [], [], []
    _, first, key = shared(ssl, first_lines)
    assert sum("epoch 1/1" in line for line in first_lines) == 1
    assert int(first.step) == 2  # 16 images, batch 8
    # Same training settings (the clustering's may differ): restored, nothing trained.
    _, again, again_key = shared(dataclasses.replace(ssl, num_clusters=5), again_lines)
    assert again_key == key and not any("epoch" in line for line in again_lines)
    jax.tree.map(
      lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), first, again
    )
    # Another image sample: another key and directory, trained from scratch.
    _, other, other_key = shared(dataclasses.replace(ssl, shared_seed=4), other_lines)
    assert other_key != key and sum("epoch 1/1" in line for line in other_lines) == 1
    assert sorted(os.listdir(cache)) == sorted([key, other_key])
  np.testing.assert_array_equal(
    selfsup.shared_image_ids(24, ssl), selfsup.shared_image_ids(24, ssl)
  )
  assert len(set(selfsup.shared_image_ids(24, ssl).tolist())) == 16
  # A directory whose settings.json records other settings is refused, not reused.
  path = os.path.join(cache, key, "settings.json")
  with open(path) as f:
    record = json.load(f)
  record["self_supervised"]["temperature"] = 0.1
  with open(path, "w") as f:
    json.dump(record, f)
  with pytest.raises(ValueError, match="records another shared self-supervised M_pre"):
    shared(ssl, [])
  with pytest.raises(ValueError, match="shared_images=16: expected 2..10"):
    selfsup.shared_image_ids(10, ssl)
  with pytest.raises(ValueError, match="shared_images"):
    selfsup.SelfSupSettings(shared_images=1)


def test_m_pre_load_shares_the_model_and_a_workdir_refuses_another(tmp_path):
  from types import SimpleNamespace

  from rare_jax.deep import m_pre

  data, _, settings, ssl = _driver_setup()
  settings = dataclasses.replace(settings, init="self_supervised")
  ssl = dataclasses.replace(
    ssl, epochs=1, shared_images=16, num_clusters=3, cache_dir=str(tmp_path / "cache")
  )
  images = updates.ImageData(train=data, eval=data)
  task = SimpleNamespace(
    dataset="synthetic", train_split="train", num_train_examples=24, pool_ids=np.arange(12)
  )

  def load(directory, ssl, seed):
    lines = []
    start = m_pre.load(task, images, settings, str(directory), seed=seed, log=lines.append, ssl=ssl)
    return start, lines

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(updates.DeepSettings, "trunk", _smallest_trunk)
    first, lines = load(tmp_path / "run0", ssl, seed=0)
    assert first.source == "self_supervised" and first.num_classes == 3
    assert sum("epoch 1/1" in line for line in lines) == 1
    # Another run (other seed) restores the cached trunk instead of training one.
    second, lines = load(tmp_path / "run1", ssl, seed=1)
    assert not any("epoch" in line for line in lines)
    jax.tree.map(
      lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
      first.state.params["trunk"],
      second.state.params["trunk"],
    )
    # A workdir made with one shared model refuses another, before training it.
    lines = []
    with pytest.raises(ValueError, match="shared SimCLR model"):
      m_pre.load(
        task,
        images,
        settings,
        str(tmp_path / "run0"),
        seed=0,
        log=lines.append,
        ssl=dataclasses.replace(ssl, shared_seed=7),
      )
    assert not any("epoch" in line for line in lines)
  assert len(os.listdir(tmp_path / "cache")) == 1
