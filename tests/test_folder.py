"""A folder of images as a source: stable ids, broken files skipped and reported, seeds, and a
folder run's workdir (manifest, stand-in features equal to `stand_in.pixel_pca_features`)."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from rare_jax.data import folder, pipeline, sources
from rare_jax.deep import stand_in
from rare_jax.webapp import folder_run


@pytest.fixture(scope="module")
def example(tmp_path_factory):
  """A small Fashion-MNIST folder plus files that must be skipped or ignored."""
  out = tmp_path_factory.mktemp("example")
  images, seeds = folder.write_example_folder(out, per_class=3, rare_count=4, num_seeds=2)
  root = os.path.join(images)
  with open(os.path.join(root, "Bag", "broken.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
  buffer = io.BytesIO()
  Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(buffer, format="JPEG")
  with open(os.path.join(root, "Coat", "truncated.JPG"), "wb") as f:
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
  open(os.path.join(root, "empty.png"), "wb").close()
  with open(os.path.join(root, "notes.txt"), "w") as f:
    f.write("not an image")
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(os.path.join(root, ".hidden.png"))
  rgba = np.zeros((6, 6, 4), np.uint8)
  rgba[..., 0] = 255  # red, half of it transparent
  rgba[:3, :, 3] = 255
  Image.fromarray(rgba, "RGBA").save(os.path.join(root, "rgba.png"))
  Image.fromarray(np.full((10, 20, 3), 200, np.uint8)).save(os.path.join(root, "Bag", "p.jpeg"))
  outside = out / "outside.png"
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(outside)
  os.symlink(outside, os.path.join(root, "Bag", "link.png"))
  return root, seeds


def test_ids_are_sorted_readable_paths_and_broken_files_are_reported(example):
  root, _ = example
  source = folder.open_folder(root, labels_from_subfolders=True)
  assert list(source.paths) == sorted(source.paths)
  assert len(source) == 9 * 3 + 4 + 2  # 3 per class, 4 Sandals, p.jpeg, rgba.png
  assert "rgba.png" in source.paths and "Bag/p.jpeg" in source.paths
  skipped = dict(source.skipped)
  assert set(skipped) == {"Bag/broken.png", "Coat/truncated.JPG", "empty.png", "Bag/link.png"}
  assert "outside" in skipped["Bag/link.png"]
  assert all(".hidden" not in p and not p.endswith(".txt") for p in source.paths)
  report = source.report()
  assert "4 skipped" in report and "Coat/truncated.JPG" in report
  again = folder.open_folder(root)
  assert again.paths == source.paths  # stable ids
  assert again.num_classes == 0 and (again.labels() == folder.UNLABELED).all()


def test_images_and_labels_match_the_dataset(example):
  root, _ = example
  source = folder.open_folder(root, labels_from_subfolders=True)
  assert source.class_names[:2] == ("Ankle_boot", "Bag")
  labels = source.labels()
  assert labels[source.paths.index("rgba.png")] == folder.UNLABELED
  train = sources.open_source("rare_fashion_mnist", "train")
  for index in (0, 7, 20):
    path = source.paths[index]
    assert source.class_names[labels[index]] == path.split("/")[0]
    dataset_id = int(path.split("/")[1].split(".")[0])
    expected = train[dataset_id]["image"]
    image = source[index]["image"]
    assert image.shape == (28, 28, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, np.repeat(expected, 3, axis=-1))
  red = source[source.paths.index("rgba.png")]["image"]
  np.testing.assert_array_equal(red[0, 0], [255, 0, 0])
  np.testing.assert_array_equal(red[5, 0], [255, 255, 255])  # transparent: white
  with pytest.raises(IndexError, match="out of range"):
    source.file_path(len(source))


def test_resized_images_and_batching(example):
  root, _ = example
  source = folder.open_folder(root, image_size=12)
  assert source.resized.shape == (len(source), 12, 12, 3)
  expected = folder.resize_image(folder.decode_image(source.file_path(3)), 12)
  np.testing.assert_array_equal(source.resized[3], expected)
  batch = next(pipeline.iterate_batches(source, [0, 5, 30], batch_size=4, image_size=16))
  assert batch["image"].shape == (4, 16, 16, 3)
  assert batch["mask"].tolist() == [True, True, True, False]


def test_seeds_from_folder_paths_and_outside(example, tmp_path):
  root, seed_files = example
  source = folder.open_folder(root)
  seeds_dir = os.path.dirname(seed_files[0])
  ids, outside = folder.resolve_seeds(source, seeds_dir)
  assert ids == [] and outside == sorted(seed_files)
  inside = [source.file_path(i) for i in (2, 4)]
  ids, outside = folder.resolve_seeds(source, ",".join(inside + seed_files[:1]))
  assert ids == [2, 4] and outside == seed_files[:1]
  with pytest.raises(ValueError, match="does not exist"):
    folder.resolve_seeds(source, [os.path.join(root, "nope.png")])
  with pytest.raises(ValueError, match="not one of its readable images"):
    folder.resolve_seeds(source, [os.path.join(root, "Bag", "broken.png")])
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"garbage")
  with pytest.raises(ValueError, match="does not decode"):
    folder.resolve_seeds(source, [str(bad)])
  with pytest.raises(ValueError, match="no image found"):
    folder.resolve_seeds(source, " , ")
  with pytest.raises(ValueError, match="not a directory"):
    folder.open_folder(tmp_path / "missing")


def test_pixel_projection_is_pca_and_round_trips(tmp_path):
  rng = np.random.default_rng(0)
  fit = rng.integers(0, 256, (40, 6, 6, 3), dtype=np.uint8)
  other = rng.integers(0, 256, (7, 6, 6, 3), dtype=np.uint8)
  projection = stand_in.PixelProjection.fit(fit, 5)
  # Same subspace and variances as sklearn's PCA (signs may differ per component).
  from sklearn.decomposition import PCA

  reference = PCA(n_components=5, svd_solver="full").fit(fit.reshape(40, -1) / 255.0)
  expected = reference.transform(other.reshape(7, -1) / 255.0)
  got = projection.project(other)
  np.testing.assert_allclose(np.abs(got), np.abs(expected), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
    projection.project(fit).var(0, ddof=1), reference.explained_variance_, rtol=1e-4
  )
  projection.save(str(tmp_path / "p.npz"))
  loaded = stand_in.PixelProjection.load(str(tmp_path / "p.npz"))
  assert loaded.project(other).tobytes() == got.tobytes()
  with pytest.raises(ValueError, match="expected"):
    projection.project(other[:, :5])


def test_folder_run_workdir(example, tmp_path):
  root, seed_files = example
  config = folder_run.make_config(budget=6, batch_size=3, feature_dim=8, image_size=10)
  lines = []
  run = folder_run.prepare_folder_run(
    str(tmp_path / "run"),
    images=root,
    seeds=os.path.dirname(seed_files[0]),
    config=config,
    eval_subfolder="Sandal",
    log=lines.append,
  )
  assert any("4 files skipped" in line for line in lines)
  pool = run.pool_size
  assert pool == 33 + 2 and run.features.shape == (pool, 8)
  assert run.seed_ids.tolist() == [[33, 34]]  # the seeds from outside the folder come last
  # The seed folder "seeds" says nothing: the default name is its parent folder's.
  assert run.category_names == [os.path.basename(os.path.dirname(os.path.dirname(seed_files[0])))]
  assert run.category_names != ["seeds"]
  assert run.file_path(34) == seed_files[1]
  assert run.val_ground_truth.shape == (1, pool) and run.val_ground_truth.sum() == 4 + 2
  saved = stand_in.PixelProjection.load(str(tmp_path / "run" / "features" / "projection.npz"))
  resized = folder_run.read_resized([run.file_path(i) for i in range(pool)], 10)
  np.testing.assert_array_equal(saved.project(resized), np.asarray(run.features))
  manifest = json.loads((tmp_path / "run" / folder_run.MANIFEST).read_text())
  assert manifest["paths"][:2] == [
    "Ankle_boot/" + p for p in sorted(os.listdir(os.path.join(root, "Ankle_boot")))[:2]
  ]
  # The same command reopens it; another folder, seeds or config is refused.
  again = folder_run.prepare_folder_run(
    str(tmp_path / "run"),
    images=root,
    seeds=os.path.dirname(seed_files[0]),
    config=config,
    eval_subfolder="Sandal",
    log=lines.append,
  )
  np.testing.assert_array_equal(np.asarray(again.features), np.asarray(run.features))
  with pytest.raises(ValueError, match="other seeds"):
    folder_run.prepare_folder_run(
      str(tmp_path / "run"),
      images=root,
      seeds=seed_files[0],
      config=config,
      eval_subfolder="Sandal",
    )
  with pytest.raises(ValueError, match="another config"):
    folder_run.prepare_folder_run(
      str(tmp_path / "run"),
      images=root,
      seeds=os.path.dirname(seed_files[0]),
      config=folder_run.make_config(budget=6, batch_size=3, feature_dim=16, image_size=10),
      eval_subfolder="Sandal",
    )
  # A larger budget continues the run, but not when the restart is refused for another reason:
  # then config.json keeps the run's budget.
  saved_config = (tmp_path / "run" / "config.json").read_text()
  with pytest.raises(ValueError, match="other seeds"):
    folder_run.prepare_folder_run(
      str(tmp_path / "run"),
      images=root,
      seeds=seed_files[0],
      config=folder_run.make_config(budget=9, batch_size=3, feature_dim=8, image_size=10),
      eval_subfolder="Sandal",
    )
  assert (tmp_path / "run" / "config.json").read_text() == saved_config


def test_bad_settings_are_refused(example, tmp_path):
  root, seed_files = example
  with pytest.raises(ValueError, match="not a multiple of batch_size"):
    folder_run.make_config(budget=25, batch_size=10)
  with pytest.raises(ValueError, match="expected a positive int"):
    folder_run.make_config(batch_size=0)
  with pytest.raises(ValueError, match="needs a pool of at least"):
    folder_run.prepare_folder_run(
      str(tmp_path / "big"),
      images=root,
      seeds=seed_files[0],
      config=folder_run.make_config(budget=30, batch_size=10),
      log=lambda _: None,
    )
  with pytest.raises(ValueError, match="not a top-level sub-folder"):
    folder_run.prepare_folder_run(
      str(tmp_path / "eval"),
      images=root,
      seeds=seed_files[0],
      config=folder_run.make_config(budget=4, batch_size=2),
      eval_subfolder="Zebra",
      log=lambda _: None,
    )


def test_pretrained_features_are_the_trunks_cached_embeddings(example, tmp_path):
  """features="pretrained": the pool is EfficientNet-Lite0's embedding of each image (squeezed
  to image_size), z-scored with the pool's statistics; cached and reused on a restart."""
  from rare_jax import workdirs
  from rare_jax.deep import trunk_features

  root, seed_files = example
  config = folder_run.make_config(
    budget=6, batch_size=3, features="pretrained", image_size=32, embed_batch_size=16
  )
  assert config.model == "efficientnet_lite0" and config.init == "imagenet"
  lines = []
  workdir = str(tmp_path / "run")
  run = folder_run.prepare_folder_run(
    workdir, images=root, seeds=seed_files[0], config=config, log=lines.append
  )
  assert run.features.shape == (33 + 1, 1280) and run.projection is None
  assert any("embedding 34 images with efficientnet_lite0" in line for line in lines)
  assert any("embed: done, 34 rows" in line for line in lines), lines
  embedder = trunk_features.TrunkEmbedder("efficientnet_lite0", "imagenet", 32, batch_size=16)
  raw = embedder.embed(folder_run.read_resized(folder_run.pool_files(run.manifest), 32))
  expected, _ = workdirs.normalize_features(raw, raw[:0], "standardize")
  np.testing.assert_allclose(np.asarray(run.features), np.asarray(expected), atol=2e-4)
  assert np.abs(np.asarray(run.features).mean(0)).max() < 1e-3  # standardised
  source = json.loads((tmp_path / "run" / "features" / "pool" / "source.json").read_text())
  assert source["model"] == "efficientnet_lite0" and source["image_size"] == 32
  lines.clear()
  again = folder_run.prepare_folder_run(
    workdir, images=root, seeds=seed_files[0], config=config, log=lines.append
  )
  assert not any("embedding" in line for line in lines)  # cached
  np.testing.assert_array_equal(np.asarray(again.features), np.asarray(run.features))
  assert "efficientnet_lite0" in folder_run.describe_features(config)
  with pytest.raises(ValueError, match="features='pca'"):
    folder_run.make_config(features="pca")
  with pytest.raises(ValueError, match="no installable ImageNet weights"):
    folder_run.make_config(features="pretrained", model="resnet50")
  with pytest.raises(ValueError, match="is not a file"):
    folder_run.make_config(features="pretrained", model="resnet50", init=str(tmp_path / "no.pth"))


def test_several_categories_with_their_own_seeds(example, tmp_path):
  root, seed_files = example
  bag_seeds = [os.path.join(root, "Bag", p) for p in sorted(os.listdir(os.path.join(root, "Bag")))]
  bag_seeds = [p for p in bag_seeds if p.endswith(".png") and "broken" not in p and "link" not in p]
  config = folder_run.make_config(budget=4, batch_size=2, feature_dim=8, image_size=10)
  categories = [("Sandal", os.path.dirname(seed_files[0])), ("Bag", ",".join(bag_seeds[:3]))]
  lines = []
  run = folder_run.prepare_folder_run(
    str(tmp_path / "run"), images=root, config=config, categories=categories, log=lines.append
  )
  assert run.category_names == ["Sandal", "Bag"]
  assert run.seed_ids.shape == (2, 3)  # Sandal's 2 outside seeds padded by repeating one
  assert [run.seed_count(0), run.seed_count(1)] == [2, 3]
  assert sorted(set(run.seed_ids[0].tolist())) == [33, 34]  # the outside seeds, added last
  assert all(run.display_path(i).startswith("Bag/") for i in run.seed_ids[1])
  assert run.val_ground_truth.shape == (2, 0)
  assert any("Sandal: 2 seed positives, Bag: 3 seed positives" in line for line in lines)
  # A restart with other categories is refused; the same ones reopen it.
  with pytest.raises(ValueError, match="other seeds or categories"):
    folder_run.prepare_folder_run(
      str(tmp_path / "run"), images=root, config=config, categories=categories[:1]
    )
  with pytest.raises(ValueError, match="has categories"):
    folder_run.prepare_folder_run(
      str(tmp_path / "run"),
      images=root,
      config=config,
      categories=[("Sandals", categories[0][1]), categories[1]],
    )
  folder_run.prepare_folder_run(
    str(tmp_path / "run"), images=root, config=config, categories=categories, log=lines.append
  )
  with pytest.raises(ValueError, match="repeat"):
    folder_run.prepare_folder_run(
      str(tmp_path / "x"), images=root, config=config, categories=[categories[0]] * 2
    )
  with pytest.raises(ValueError, match="not both"):
    folder_run.prepare_folder_run(
      str(tmp_path / "x"), images=root, seeds=seed_files[0], config=config, categories=categories
    )
  # A seed folder of one sub-folder per category.
  seeds = tmp_path / "seeds"
  for name in ("Cat", "Dog"):
    (seeds / name).mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(seeds / name / "a.png")
  assert folder_run.categories_from_seed_folder(str(seeds)) == [
    ("Cat", str(seeds / "Cat")),
    ("Dog", str(seeds / "Dog")),
  ]
  assert folder_run.categories_from_seed_folder(str(seeds / "Cat")) is None
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(seeds / "loose.png")
  with pytest.raises(ValueError, match="directly"):
    folder_run.categories_from_seed_folder(str(seeds))


def test_exif_orientation_and_modes_survive_the_copy_free_decode(tmp_path):
  pixels = np.zeros((2, 4, 3), np.uint8)
  pixels[:, 0] = 255  # a white left column
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to show
  Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif, quality=100)
  decoded = folder.decode_image(str(tmp_path / "r.jpg"))
  assert decoded.size == (2, 4) and decoded.mode == "RGB"
  assert np.asarray(decoded)[0].min() > 200 and np.asarray(decoded)[-1].max() < 60  # top: white
  Image.fromarray(np.full((3, 3), 7, np.uint8)).save(tmp_path / "g.png")
  la = np.zeros((3, 3, 2), np.uint8)
  la[..., 0], la[0, :, 1] = 50, 255  # first row opaque grey, the rest transparent
  Image.fromarray(la, "LA").save(tmp_path / "la.png")
  with open(tmp_path / "g.png", "rb") as f:
    np.testing.assert_array_equal(np.asarray(folder.decode_image(f)), np.full((3, 3, 3), 7))
  la_rgb = np.asarray(folder.decode_image(str(tmp_path / "la.png")))
  np.testing.assert_array_equal(la_rgb[0], np.full((3, 3), 50))
  np.testing.assert_array_equal(la_rgb[1:], np.full((2, 3, 3), 255))
