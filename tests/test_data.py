"""Data layer: the embedded Fashion-MNIST dataset, TFDS sources (real and mocked), batching.

Needs `python -m rare_jax.data.prepare` run beforehand (the Makefile does it); never downloads.
"""

import functools
import json
import os
import pathlib
import shutil
import socket
import struct
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import gcs_utils

from rare_jax.data import fashion_mnist, on_device, pipeline, sources

NAME = "rare_fashion_mnist"


class RareJaxTinyTest(tfds.core.GeneratorBasedBuilder):
  """A 12 + 6 example dataset of 4x4 images, built in a temporary data_dir by the tests."""

  VERSION = tfds.core.Version("1.0.0")
  OFFSET = 0  # Changes the content, to test cache invalidation.

  def _info(self):
    # DatasetInfo directly: dataset_info_from_configs looks for metadata files in the builder's
    # package, and this test module is not in one.
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(4, 4, 1), dtype=np.uint8),
          "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
        }
      ),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(12), "test": self._generate_examples(6)}

  def _generate_examples(self, count):
    for i in range(count):
      image = np.full((4, 4, 1), (i * 10 + self.OFFSET) % 256, np.uint8)
      yield i, {"image": image, "label": i % 3}


def _build_tiny(data_dir, offset=0):
  RareJaxTinyTest.OFFSET = offset
  builder = RareJaxTinyTest(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


@pytest.fixture(scope="module")
def fm_train():
  try:
    return sources.open_source(NAME, "train")
  except ValueError as error:
    pytest.fail(f"{error}\nThe tests need `python -m rare_jax.data.prepare` run first.")


@pytest.fixture(scope="module")
def fm_test():
  try:
    return sources.open_source(NAME, "test")
  except ValueError as error:
    pytest.fail(f"{error}\nThe tests need `python -m rare_jax.data.prepare` run first.")


@pytest.fixture(scope="module")
def fm_test_arrays(fm_test):
  return sources.load_arrays(fm_test)


@pytest.fixture(scope="module")
def raw_folder():
  return fashion_mnist.ensure_raw_files()


# The embedded dataset.


def test_embedded_dataset_through_tfds_data_source(fm_train, fm_test, raw_folder):
  for split, source, size in (("train", fm_train, 60_000), ("test", fm_test, 10_000)):
    data_source = tfds.data_source(NAME, split=split, download=False)
    assert len(data_source) == size
    labels = source.labels()
    assert labels.shape == (size,)
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [size // 10] * 10)
    raw_images, raw_labels = fashion_mnist.read_raw_split(raw_folder, split)
    np.testing.assert_array_equal(labels, raw_labels)  # The idx order is kept.
    for i in (0, 1, size // 2, size - 1):
      example = data_source[i]
      np.testing.assert_array_equal(example["image"], raw_images[i])
      assert example["label"] == raw_labels[i]
  assert fm_train.class_names == fashion_mnist.CLASS_NAMES
  assert fm_train.num_classes == 10


def test_load_arrays_equals_raw_files_and_reads_the_cache(fm_train, raw_folder, monkeypatch):
  sources.load_arrays(fm_train)  # Writes the .npy cache if a fresh data folder has none.

  def no_decoding(*args, **kwargs):
    raise AssertionError("load_arrays decoded examples although its .npy cache exists")

  monkeypatch.setattr(sources, "_read_examples", no_decoding)
  images, labels = sources.load_arrays(fm_train)
  raw_images, raw_labels = fashion_mnist.read_raw_split(raw_folder, "train")
  assert images.dtype == np.uint8 and images.shape == (60_000, 28, 28, 1)
  np.testing.assert_array_equal(images, raw_images)
  np.testing.assert_array_equal(labels, raw_labels)
  ids = np.array([59_999, 3, 3, 17])
  some_images, some_labels = sources.load_arrays(fm_train, ids)
  np.testing.assert_array_equal(some_images, raw_images[ids])
  np.testing.assert_array_equal(some_labels, raw_labels[ids])
  with pytest.raises(ValueError, match="60000"):
    sources.load_arrays(fm_train, [60_000])


def test_ensure_raw_files_finds_the_system_package():
  folder = fashion_mnist.ensure_raw_files()
  assert folder == fashion_mnist.SYSTEM_DIR
  for images_file, labels_file in fashion_mnist.RAW_FILES.values():
    assert (folder / images_file).is_file() and (folder / labels_file).is_file()


def test_ensure_raw_files_uses_the_user_cache(tmp_path, monkeypatch):
  monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "missing")
  cached = tmp_path / "cache" / fashion_mnist.PACKAGE_SUBDIR
  cached.mkdir(parents=True)
  for pair in fashion_mnist.RAW_FILES.values():
    for name in pair:
      (cached / name).write_bytes(b"")
  monkeypatch.setattr(fashion_mnist, "_run", lambda command: pytest.fail(f"ran {command}"))
  assert fashion_mnist.ensure_raw_files(cache_dir=tmp_path / "cache") == cached


@pytest.mark.parametrize("is_root", [True, False])
def test_ensure_raw_files_failure_says_what_to_run(tmp_path, monkeypatch, is_root):
  monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "missing")
  monkeypatch.setattr(os, "geteuid", lambda: 0 if is_root else 1000)
  ran = []

  def failing_run(command):
    ran.append(" ".join(command))
    return f"`{' '.join(command)}` exited with 100: E: Unable to locate package"

  monkeypatch.setattr(fashion_mnist, "_run", failing_run)
  with pytest.raises(RuntimeError) as error:
    fashion_mnist.ensure_raw_files(cache_dir=tmp_path / "cache")
  message = str(error.value)
  assert "sudo apt-get install -y dataset-fashion-mnist" in message
  assert "apt-get download dataset-fashion-mnist" in message and "dpkg-deb -x" in message
  assert any("apt-get download" in command for command in ran)
  assert any(command.startswith("apt-get install") for command in ran) == is_root


def test_read_idx_rejects_other_files(tmp_path):
  bad = tmp_path / "bad-idx1-ubyte"
  bad.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x02ab")
  with pytest.raises(ValueError, match="not an idx file"):
    fashion_mnist.read_idx(bad)
  short = tmp_path / "short-idx1-ubyte"
  short.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
  with pytest.raises(ValueError, match="expected 5 bytes"):
    fashion_mnist.read_idx(short)


# Sources: errors, caches, formats, mocked registered datasets.


def test_unknown_dataset_name():
  with pytest.raises(
    ValueError, match="Unknown dataset name 'rare_fashion_mnsit'.*rare_fashion_mnist"
  ):
    sources.open_source("rare_fashion_mnsit", "train")


def test_unknown_split(fm_train):
  with pytest.raises(ValueError, match="Unknown split 'validation'.*'test', 'train'"):
    sources.open_source(NAME, "validation")


def test_not_prepared_says_how(tmp_path):
  with pytest.raises(ValueError, match="not prepared.*python -m rare_jax.data.prepare"):
    sources.open_source(NAME, "train", data_dir=str(tmp_path))


def test_registered_dataset_is_never_downloaded(tmp_path, monkeypatch):
  def no_download(*args, **kwargs):
    raise AssertionError("open_source must not download")

  connections = []

  def no_network(self, address, *args, **kwargs):
    connections.append(address)
    raise OSError(f"test: no network ({address!r})")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
  monkeypatch.setattr(socket.socket, "connect", no_network)
  monkeypatch.setattr(socket.socket, "connect_ex", no_network)
  # TFDS's GCS copies go through TensorFlow's own client, which bypasses Python's sockets.
  for name in ("download_gcs_dataset", "download_gcs_folder"):
    monkeypatch.setattr(gcs_utils, name, functools.partial(no_network, None, name))
  with pytest.raises(ValueError, match="'places365_small' is not prepared.*tfds build"):
    sources.open_source("places365_small", "train", data_dir=str(tmp_path))
  assert connections == [], f"open_source tried to reach {connections}"


@pytest.mark.parametrize(
  "name, num_classes, extra_feature",
  [("i_naturalist2017", 5089, "supercategory"), ("places365_small", 365, "filename")],
)
def test_mocked_registered_dataset_reads_through_open_source(name, num_classes, extra_feature):
  # USE_CODE: metadata from the builder class, a data_dir that does not exist, no download.
  with tfds.testing.mock_data(num_examples=9, policy=tfds.testing.MockPolicy.USE_CODE):
    builder = tfds.builder(name)
    assert extra_feature in builder.info.features  # The real builder class is in use.
    source = sources.open_source(name, "train", data_dir="/nonexistent/tfds")
    assert len(source) == 9 and source.num_classes == num_classes
    example = source[4]
    assert example["image"].dtype == np.uint8 and example["image"].ndim == 3
    assert example["image"].shape[-1] == 3
    labels = source.labels()
    assert labels.dtype == np.int64 and labels.shape == (9,)
    assert labels[4] == example["label"] and 0 <= labels.min() and labels.max() < num_classes
    batches = list(pipeline.iterate_batches(source, [4, 0, 8], batch_size=2, image_size=8))
  assert [b["image"].shape for b in batches] == [(2, 8, 8, 3)] * 2
  assert batches[1]["mask"].tolist() == [True, False]
  assert batches[0]["label"][0] == labels[4]


def test_cache_is_invalidated_when_the_dataset_is_rebuilt(tmp_path):
  builder = _build_tiny(tmp_path)
  source = sources.open_source("rare_jax_tiny_test", "train", data_dir=str(tmp_path))
  images, labels = sources.load_arrays(source)
  assert images[:, 0, 0, 0].tolist() == [i * 10 for i in range(12)]
  assert labels.tolist() == [i % 3 for i in range(12)]
  cache = source.cache_path("images")
  assert cache.is_file()
  np.save(cache, np.full_like(images, 7))  # A stale cache of the same files is served...
  assert sources.load_arrays(source)[0].max() == 7
  cache.write_bytes(b"damaged")  # ...a damaged one is rebuilt.
  assert sources.load_arrays(source)[0][:, 0, 0, 0].tolist() == [i * 10 for i in range(12)]
  shutil.rmtree(builder.data_dir)
  time.sleep(0.01)  # A distinct mtime for the rebuilt files.
  _build_tiny(tmp_path, offset=1)
  rebuilt = sources.open_source("rare_jax_tiny_test", "train", data_dir=str(tmp_path))
  assert rebuilt.cache_path("images") != cache
  assert sources.load_arrays(rebuilt)[0][:, 0, 0, 0].tolist() == [i * 10 + 1 for i in range(12)]


def _masked_crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_tfrecord_dataset_reads_without_tensorflow(tmp_path):
  builder = _build_tiny(tmp_path)
  array_source = sources.open_source("rare_jax_tiny_test", "train", data_dir=str(tmp_path))
  expected = array_source.__getitems__(range(12))
  # Rewrite the prepared dataset as tfrecord: same serialized examples, another container.
  folder = pathlib.Path(builder.data_dir)
  for split in ("train", "test"):
    shard = folder / f"rare_jax_tiny_test-{split}.array_record-00000-of-00001"
    raw = builder.as_data_source(
      split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
    )
    with open(folder / f"rare_jax_tiny_test-{split}.tfrecord-00000-of-00001", "wb") as f:
      for i in range(len(raw)):
        record = raw[i]
        length = struct.pack("<Q", len(record))
        f.write(length + struct.pack("<I", _masked_crc32c(length)))
        f.write(record + struct.pack("<I", _masked_crc32c(record)))
    shard.unlink()
  info = json.loads((folder / "dataset_info.json").read_text())
  info["fileFormat"] = "tfrecord"
  (folder / "dataset_info.json").write_text(json.dumps(info))

  source = sources.open_source("rare_jax_tiny_test", "train", data_dir=str(tmp_path))
  assert isinstance(source._examples._records, sources.TFRecordRecords)
  assert len(source) == 12
  for i in (0, 5, 11):
    np.testing.assert_array_equal(source[i]["image"], expected[i]["image"])
    assert source[i]["label"] == expected[i]["label"]
  np.testing.assert_array_equal(source.labels(), [i % 3 for i in range(12)])
  sliced = sources.open_source("rare_jax_tiny_test", "train[3:7]", data_dir=str(tmp_path))
  assert [e["label"] for e in sliced.__getitems__(range(4))] == [0, 1, 2, 0]
  assert sliced[0]["image"][0, 0, 0] == 30


# The batching pipeline.


def test_batches_have_fixed_shapes_padding_and_order(fm_test_arrays):
  images, labels = fm_test_arrays
  ids = np.array([9, 4, 4, 0, 9999, 123, 7])
  batches = list(pipeline.iterate_batches(fm_test_arrays, ids, batch_size=3))
  assert len(batches) == pipeline.num_batches(len(ids), 3) == 3
  for batch in batches:
    assert batch["image"].shape == (3, 28, 28, 1) and batch["image"].dtype == np.float32
    assert batch["mask"].dtype == bool and batch["index"].dtype == np.int64
  index = np.concatenate([b["index"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(index, [9, 4, 4, 0, 9999, 123, 7, -1, -1])
  np.testing.assert_array_equal(mask, [True] * 7 + [False] * 2)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:7], labels[ids])
  stacked = np.concatenate([b["image"] for b in batches])
  np.testing.assert_allclose(stacked[:7], images[ids] / 255.0, atol=1e-6)
  assert not stacked[7:].any()
  assert list(pipeline.iterate_batches(fm_test_arrays, [], batch_size=3)) == []


def test_process_batches_are_the_rows_of_each_batch(fm_test_arrays):
  # 10 ids in batches of 8 over 2 processes: process 1's rows of the last batch are padding.
  ids = np.array([5, 9, 4, 4, 0, 9999, 123, 7, 31, 2])
  options = dict(batch_size=8, image_size=14, channels=3, mean=0.5, std=0.25)
  whole = list(pipeline.iterate_batches(fm_test_arrays, ids, **options))
  parts = [
    list(pipeline.process_batches(fm_test_arrays, ids, process_index=i, process_count=2, **options))
    for i in range(2)
  ]
  assert len(parts[0]) == len(parts[1]) == len(whole) == 2
  for b, batch in enumerate(whole):
    for key in batch:
      joined = np.concatenate([parts[0][b][key], parts[1][b][key]])
      np.testing.assert_array_equal(joined, batch[key], err_msg=f"batch {b} {key}")
  assert not parts[1][1]["mask"].any() and parts[0][1]["mask"].sum() == 2
  with pytest.raises(ValueError, match="process_index"):
    next(
      pipeline.process_batches(fm_test_arrays, ids, batch_size=8, process_index=2, process_count=2)
    )


def test_source_and_arrays_give_the_same_batches(fm_test, fm_test_arrays):
  ids = np.arange(0, 10_000, 997)
  options = dict(batch_size=4, image_size=32, channels=3, mean=0.5, std=0.25)
  from_source = list(pipeline.iterate_batches(fm_test, ids, **options))
  from_arrays = list(pipeline.iterate_batches(fm_test_arrays, ids, **options))
  for a, b in zip(from_source, from_arrays, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_workers_give_identical_output(fm_test):
  ids = np.random.default_rng(0).permutation(10_000)[:45]
  options = dict(
    batch_size=16,
    image_size=(20, 24),
    channels=3,
    mean=pipeline.IMAGENET_MEAN,
    std=pipeline.IMAGENET_STD,
  )
  serial = list(pipeline.iterate_batches(fm_test, ids, **options))
  parallel = list(pipeline.iterate_batches(fm_test, ids, num_workers=2, **options))
  assert len(serial) == len(parallel) == 3
  for a, b in zip(serial, parallel, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert parallel[-1]["mask"].sum() == 45 - 32


def test_preprocess_matches_jax_resize_and_normalises():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(2, 28, 20, 1), dtype=np.uint8)
  for size in ((32, 32), (14, 9), (224, 50)):
    mine = pipeline.preprocess(images, image_size=size)
    expected = jax.image.resize(images / 255.0, (2, *size, 1), method="linear")
    np.testing.assert_allclose(mine, np.asarray(expected), atol=2e-5)
  color = pipeline.preprocess(images, channels=3, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 4.0))
  assert color.shape == (2, 28, 20, 3)
  gray = images[..., 0] / 255.0
  for channel, (mean, std) in enumerate(((0.1, 1.0), (0.2, 2.0), (0.3, 4.0))):
    np.testing.assert_allclose(color[..., channel], (gray - mean) / std, atol=1e-6)


def test_pipeline_bad_input(fm_test_arrays):
  with pytest.raises(ValueError, match="batch_size=0"):
    next(pipeline.iterate_batches(fm_test_arrays, [0], batch_size=0))
  with pytest.raises(ValueError, match="id 10000 out of range"):
    next(pipeline.iterate_batches(fm_test_arrays, [1, 10_000], batch_size=2))
  with pytest.raises(ValueError, match="image_size=0"):
    next(pipeline.iterate_batches(fm_test_arrays, [1], batch_size=2, image_size=0))
  with pytest.raises(ValueError, match="std"):
    next(pipeline.iterate_batches(fm_test_arrays, [1], batch_size=2, std=0.0))
  with pytest.raises(ValueError, match="channels=3 for images with 3 channels|expected grayscale"):
    pipeline.preprocess(np.zeros((1, 2, 2, 3), np.uint8), channels=1)
  with pytest.raises(ValueError, match="expected a Source"):
    next(pipeline.iterate_batches({"image": 1}, [0], batch_size=1))


def test_images_of_several_sizes_need_image_size():
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    source = sources.open_source("i_naturalist2017", "train")
    shapes = {source[i]["image"].shape for i in range(6)}
    assert len(shapes) > 1  # The mocked images vary in size, like the real ones.
    with pytest.raises(ValueError, match="pass image_size"):
      list(pipeline.iterate_batches(source, range(6), batch_size=6))
    with pytest.raises(ValueError, match="expected one shape"):
      sources.load_arrays(source)
    batch = next(pipeline.iterate_batches(source, range(6), batch_size=6, image_size=(5, 7)))
  assert batch["image"].shape == (6, 5, 7, 3) and batch["mask"].all()


def test_batch_iterator_resumes_from_its_state(fm_test):
  ids = np.random.default_rng(2).permutation(10_000)[:50]
  options = dict(batch_size=8, image_size=12, mean=0.5, std=0.25)
  iterator = pipeline.iterate_batches(fm_test, ids, **options)
  first = [next(iterator) for _ in range(3)]
  state = iterator.get_state()
  rest = list(iterator)
  assert len(rest) == pipeline.num_batches(50, 8) - 3
  for workers in (0, 1):
    resumed = pipeline.iterate_batches(fm_test, ids, num_workers=workers, **options)
    resumed.set_state(state)
    again = list(resumed)
    assert len(again) == len(rest)
    for a, b in zip(rest, again, strict=True):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
  np.testing.assert_array_equal(first[0]["index"], ids[:8])


def test_undecoded_batches_preprocessed_on_device_match_the_host(fm_test):
  ids = np.arange(0, 10_000, 1111)
  options = dict(image_size=(20, 36), channels=3, mean=pipeline.IMAGENET_MEAN)
  options["std"] = pipeline.IMAGENET_STD
  host = list(pipeline.iterate_batches(fm_test, ids, batch_size=4, **options))
  raw = list(pipeline.iterate_batches(fm_test, ids, batch_size=4, host_preprocess=False))
  step = jax.jit(lambda images: on_device.preprocess(images, **options))
  for a, b in zip(host, raw, strict=True):
    assert b["image"].dtype == np.uint8 and b["image"].shape == (4, 28, 28, 1)
    np.testing.assert_array_equal(a["index"], b["index"])
    np.testing.assert_array_equal(a["mask"], b["mask"])
    mask = a["mask"]
    np.testing.assert_allclose(np.asarray(step(b["image"]))[mask], a["image"][mask], atol=1e-5)
  with pytest.raises(ValueError, match="channels=1 for images with 3 channels"):
    on_device.preprocess(np.zeros((1, 2, 2, 3), np.uint8), channels=1)


def test_step_batches_serve_make_of_the_step_asked():
  made = []

  def make(step):
    made.append(step)
    return {"step": np.array([step])}

  get_batch = pipeline.StepBatches(make, end=8)
  try:
    assert [int(get_batch(s)["step"][0]) for s in (0, 1, 2, 5, 6, 0)] == [0, 1, 2, 5, 6, 0]
  finally:
    get_batch.close()
  assert {0, 1, 2, 5, 6} <= set(made)
  with pytest.raises(ValueError, match="step 8"):
    get_batch(8)
