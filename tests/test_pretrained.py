"""Pretrained trunks: checkpoint readers, EfficientNet-Lite on real photos, ResNet importers.

The ResNet importer is checked against an independent forward pass written here in plain
`jax.lax` ops from torchvision's definition (NCHW, the state dict's own tensors), on
checkpoints built in torchvision's layout and names with random values (no ResNet ImageNet
weights can be installed here).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from PIL import Image
from skimage import data as skimage_data

from rare_jax import classify
from rare_jax.models import Classifier, checkpoint_io, efficientnet, get_trunk, pretrained
from tests import torch_format

LITE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


# --- checkpoint readers -------------------------------------------------------------------


def test_reads_legacy_torch_checkpoint_of_lite0():
  state = checkpoint_io.read_state_dict(pretrained.weights_path("efficientnet_lite0"))
  assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
  assert state["_fc.weight"].shape == (1000, 1280)
  assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
  assert state["_bn0.running_var"].dtype == np.float32
  assert np.all(state["_bn0.running_var"] >= 0) and np.isfinite(state["_bn0.running_var"]).all()


def test_zip_and_safetensors_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  state = {"a.weight": rng.normal(size=(3, 2, 5)).astype(np.float32), "b": np.ones(4, np.float32)}
  torch_format.save_torch(state, str(tmp_path / "x.pth"))
  torch_format.save_safetensors(state, str(tmp_path / "x.safetensors"))
  for path in ("x.pth", "x.safetensors"):
    read = checkpoint_io.read_state_dict(str(tmp_path / path))
    assert sorted(read) == sorted(state)
    for name in state:
      np.testing.assert_array_equal(read[name], state[name])


def test_refuses_pickles_that_reach_for_other_code(tmp_path):
  path = str(tmp_path / "evil.pth")
  torch_format.save_torch({"w": np.ones(2, np.float32)}, path, extra_global=("os", "system"))
  with pytest.raises(ValueError, match="os.system"):
    checkpoint_io.read_state_dict(path)


@pytest.mark.parametrize(
  "content, message", [(b"", "cannot read"), (b"not a checkpoint at all", "cannot read")]
)
def test_unreadable_files_name_the_file(tmp_path, content, message):
  path = tmp_path / "bad.pth"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=message) as error:
    checkpoint_io.read_state_dict(str(path))
  assert "bad.pth" in str(error.value)
  with pytest.raises(ValueError, match="does not exist"):
    checkpoint_io.read_state_dict(str(tmp_path / "missing.pth"))


def test_unknown_model_names_are_refused():
  with pytest.raises(ValueError, match="efficientnet_lite0"):
    pretrained.spec("vgg16")
  with pytest.raises(ValueError, match="your\\s+own file"):
    pretrained.weights_path("resnet50")


# --- EfficientNet-Lite ---------------------------------------------------------------------


@pytest.mark.parametrize(
  "kernel_size, height, width, stride", [(3, 9, 10, 2), (5, 8, 8, 2), (3, 7, 7, 1), (5, 6, 9, 1)]
)
def test_shifted_and_dense_depthwise_equal_native_conv(kernel_size, height, width, stride):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, height, width, 6)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 1, 6)), jnp.float32)

  def native(x, kernel):
    return lax.conv_general_dilated(
      x,
      kernel,
      (stride, stride),
      "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=6,
      precision=lax.Precision.HIGHEST,
    )

  shifted = functools.partial(efficientnet.depthwise_shifted, stride=stride)
  dense = functools.partial(efficientnet.depthwise_dense, stride=stride)

  @jax.jit
  def values_and_grads(x, kernel):
    out = {}
    for name, f in (("shifted", shifted), ("dense", dense), ("native", native)):
      loss = lambda x, k, f=f: jnp.sum(jnp.sin(f(x, k)))  # noqa: E731
      out[name] = (f(x, kernel), *jax.grad(loss, argnums=(0, 1))(x, kernel))
    return out

  out = values_and_grads(x, kernel)
  for mode in ("shifted", "dense"):
    for got, want in zip(out[mode], out["native"], strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=mode)


def test_lite_modes_share_parameters_and_values():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 33, 33, 3)), jnp.float32)
  native, variables = pretrained.load_classifier("efficientnet_lite0", depthwise="native")
  want = jax.jit(native.apply)(variables, x)["logits"]
  for mode in ("shifted", "dense", "auto"):  # auto on the CPU: dense on maps <= 4x4
    other = Classifier(trunk=get_trunk("efficientnet_lite0", depthwise=mode), num_classes=1000)
    got = jax.jit(other.apply)(variables, x)["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=mode)
  bad = Classifier(trunk=get_trunk("efficientnet_lite0", depthwise="grouped"), num_classes=1000)
  with pytest.raises(ValueError, match="depthwise mode"):
    jax.eval_shape(bad.apply, variables, x)


@pytest.fixture(scope="module")
def photos():
  return {"cat": skimage_data.chelsea(), "coffee": skimage_data.coffee()}


@pytest.mark.parametrize("name", LITE)
def test_lite_classifies_real_photographs(name, photos):
  classifier = classify.ImageNetClassifier(name)
  size = pretrained.spec(name).image_size
  crops = np.stack([classify.center_crop(Image.fromarray(photos[k]), size) for k in photos])
  probs = classifier.probabilities(crops)
  assert probs.shape == (2, 1000)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)
  cat, coffee = np.argsort(-probs, axis=1)[:, :5]
  assert cat[0] in CAT_CLASSES, [classifier.names[i] for i in cat]
  assert classifier.names[coffee[0]].startswith("espresso"), [classifier.names[i] for i in coffee]
  assert {classifier.names[i].split(",")[0] for i in coffee} & {"cup", "coffee mug"}


def test_lite_weights_refuse_another_architecture():
  state = checkpoint_io.read_state_dict(pretrained.weights_path("efficientnet_lite0"))
  model = Classifier(trunk=get_trunk("efficientnet_lite1"), num_classes=1000)
  with pytest.raises(ValueError, match="efficientnet_lite1"):
    pretrained.classifier_variables("efficientnet_lite1", state, model)


def test_classify_cli(tmp_path, photos, capsys):
  cat = tmp_path / "cat.jpg"
  Image.fromarray(photos["cat"]).save(cat)
  (tmp_path / "broken.png").write_bytes(b"not an image")
  status = classify.classify_files(
    [str(cat), str(tmp_path / "broken.png")], model="efficientnet_lite0"
  )
  out, err = capsys.readouterr()
  assert status == 1  # one image could not be read
  assert "cat.jpg" in out and "cat" in out.split("cat.jpg", 1)[1]
  assert len(out.strip().splitlines()) == 6  # the path and five classes
  assert "broken.png: not a readable image" in err
  assert classify.classify_files([str(cat)], model="vgg16") == 2  # bad input
  assert "vgg16" in capsys.readouterr().err


# --- ResNet importers: torchvision / timm / Hugging Face names --------------------------------


def torchvision_resnet_state(depth: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A random state dict with torchvision's names and layouts for resnet18 / resnet50."""
  bottleneck, stages = {18: (False, (2, 2, 2, 2)), 50: (True, (3, 4, 6, 3))}[depth]
  rng = np.random.default_rng(seed)
  state = {}

  def conv(name, out, inp, k):
    state[f"{name}.weight"] = rng.normal(0, np.sqrt(1.0 / (inp * k * k)), (out, inp, k, k))

  def bn(name, c):
    state[f"{name}.weight"] = rng.uniform(0.5, 1.0, c)
    state[f"{name}.bias"] = rng.normal(0, 0.1, c)
    state[f"{name}.running_mean"] = rng.normal(0, 0.1, c)
    state[f"{name}.running_var"] = rng.uniform(0.5, 1.5, c)

  conv("conv1", 64, 3, 7)
  bn("bn1", 64)
  inp = 64
  for s, blocks in enumerate(stages):
    width = 64 * 2**s
    for b in range(blocks):
      stride = 2 if s > 0 and b == 0 else 1
      p = f"layer{s + 1}.{b}"
      if bottleneck:
        out = width * 4
        conv(f"{p}.conv1", width, inp, 1), bn(f"{p}.bn1", width)
        conv(f"{p}.conv2", width, width, 3), bn(f"{p}.bn2", width)
        conv(f"{p}.conv3", out, width, 1), bn(f"{p}.bn3", out)
      else:
        out = width
        conv(f"{p}.conv1", width, inp, 3), bn(f"{p}.bn1", width)
        conv(f"{p}.conv2", width, width, 3), bn(f"{p}.bn2", width)
      if stride != 1 or inp != out:
        conv(f"{p}.downsample.0", out, inp, 1), bn(f"{p}.downsample.1", out)
      inp = out
  state["fc.weight"] = rng.normal(0, 1 / np.sqrt(inp), (1000, inp))
  state["fc.bias"] = rng.normal(0, 0.1, 1000)
  return {k: v.astype(np.float32) for k, v in state.items()}


def torchvision_forward(state: dict, x_nchw: jax.Array, depth: int) -> jax.Array:
  """torchvision's ResNet forward in eval mode, in plain lax ops (NCHW, OIHW weights)."""
  bottleneck, stages = {18: (False, (2, 2, 2, 2)), 50: (True, (3, 4, 6, 3))}[depth]
  w = {k: jnp.asarray(v) for k, v in state.items()}

  def conv(x, name, stride, pad):
    return lax.conv_general_dilated(
      x,
      w[f"{name}.weight"],
      (stride, stride),
      [(pad, pad), (pad, pad)],
      dimension_numbers=("NCHW", "OIHW", "NCHW"),
      precision=lax.Precision.HIGHEST,
    )

  def bn(x, name):
    shape = (1, -1, 1, 1)
    scale = w[f"{name}.weight"] / jnp.sqrt(w[f"{name}.running_var"] + 1e-5)
    return (x - w[f"{name}.running_mean"].reshape(shape)) * scale.reshape(shape) + w[
      f"{name}.bias"
    ].reshape(shape)

  relu = jax.nn.relu
  x = relu(bn(conv(x_nchw, "conv1", 2, 3), "bn1"))
  x = lax.reduce_window(
    x, -jnp.inf, lax.max, (1, 1, 3, 3), (1, 1, 2, 2), [(0, 0), (0, 0), (1, 1), (1, 1)]
  )
  for s, blocks in enumerate(stages):
    for b in range(blocks):
      stride = 2 if s > 0 and b == 0 else 1
      p = f"layer{s + 1}.{b}"
      if bottleneck:
        y = relu(bn(conv(x, f"{p}.conv1", 1, 0), f"{p}.bn1"))
        y = relu(bn(conv(y, f"{p}.conv2", stride, 1), f"{p}.bn2"))
        y = bn(conv(y, f"{p}.conv3", 1, 0), f"{p}.bn3")
      else:
        y = relu(bn(conv(x, f"{p}.conv1", stride, 1), f"{p}.bn1"))
        y = bn(conv(y, f"{p}.conv2", 1, 1), f"{p}.bn2")
      if f"{p}.downsample.0.weight" in w:
        x = bn(conv(x, f"{p}.downsample.0", stride, 0), f"{p}.downsample.1")
      x = relu(x + y)
  x = jnp.mean(x, axis=(2, 3))
  return jnp.dot(x, w["fc.weight"].T, precision=lax.Precision.HIGHEST) + w["fc.bias"]


def to_hugging_face_names(state: dict) -> dict:
  """torchvision names -> transformers' ResNetForImageClassification names."""
  out = {}
  for name, value in state.items():
    parts = name.split(".")
    if parts[0] in ("conv1", "bn1"):
      kind = "convolution" if parts[0] == "conv1" else "normalization"
      out[f"resnet.embedder.embedder.{kind}.{parts[1]}"] = value
    elif parts[0] == "fc":
      out[f"classifier.1.{parts[1]}"] = value
    else:
      stage, block = int(parts[0][len("layer") :]) - 1, parts[1]
      prefix = f"resnet.encoder.stages.{stage}.layers.{block}"
      if parts[2] == "downsample":
        kind = "convolution" if parts[3] == "0" else "normalization"
        out[f"{prefix}.shortcut.{kind}.{parts[4]}"] = value
      else:
        kind = "convolution" if parts[2].startswith("conv") else "normalization"
        out[f"{prefix}.layer.{int(parts[2][-1]) - 1}.{kind}.{parts[3]}"] = value
  return out


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_import_matches_torchvision_reference(tmp_path, depth):
  name = f"resnet{depth}"
  state = torchvision_resnet_state(depth)
  images = np.random.default_rng(3).normal(size=(2, 3, 72, 72)).astype(np.float32)
  want = np.asarray(torchvision_forward(state, jnp.asarray(images), depth))
  nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))
  files = {"torchvision.pth": state, "timm.safetensors": state}
  if depth == 50:
    files["hugging_face.safetensors"] = to_hugging_face_names(state)
  apply = None
  for file_name, file_state in files.items():
    path = str(tmp_path / file_name)
    if file_name.endswith(".pth"):
      torch_format.save_torch(file_state, path)
    else:
      torch_format.save_safetensors(file_state, path)
    model, variables = pretrained.load_classifier(name, path)
    apply = apply or jax.jit(model.apply)
    got = np.asarray(apply(variables, nhwc)["logits"])
    assert np.abs(want).max() > 0.5  # logits of a meaningful size
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=file_name)


def test_resnet_import_refuses_missing_and_foreign_tensors(tmp_path):
  state = torchvision_resnet_state(18)
  missing = dict(state)
  del missing["layer3.0.downsample.0.weight"]
  torch_format.save_safetensors(missing, str(tmp_path / "missing.safetensors"))
  with pytest.raises(ValueError, match="layer3.0.downsample.0.weight"):
    pretrained.load_classifier("resnet18", str(tmp_path / "missing.safetensors"))
  torch_format.save_safetensors(state, str(tmp_path / "r18.safetensors"))
  with pytest.raises(ValueError, match="resnet50"):
    pretrained.load_classifier("resnet50", str(tmp_path / "r18.safetensors"))
  assert os.path.exists(tmp_path / "r18.safetensors")


def test_classify_command_line(tmp_path, photos):
  import subprocess
  import sys

  cat = tmp_path / "cat.png"
  Image.fromarray(photos["cat"]).save(cat)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  command = [sys.executable, "-m", "rare_jax.classify"]
  done = subprocess.run(
    [*command, "--top=2", str(cat)], capture_output=True, text=True, env=env, timeout=300
  )
  assert done.returncode == 0, done.stderr
  lines = done.stdout.strip().splitlines()
  assert lines[0].endswith("cat.png") and len(lines) == 3 and "cat" in lines[1]
  done = subprocess.run(
    [*command, "--model=vgg16", str(cat)], capture_output=True, text=True, env=env, timeout=300
  )
  assert done.returncode == 2 and "vgg16" in done.stderr
