"""Sources, order, sharding, resume and robustness of the input pipeline."""

import os
import subprocess
import sys

import numpy as np
import pytest

from data_helpers import make_tree
from sbam_jax.data import demo, pipeline, sources, transforms

pre32 = transforms.make_transform("pretrain", 32)
eval32 = transforms.make_transform("eval", 32, resize=36)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("imgs"))
  info = make_tree(root)
  return root, info


def take(p, n):
  it = iter(p)
  return [next(it) for _ in range(n)]


def test_folder_labels_are_sorted_class_names(tree):
  root, _ = tree
  s = sources.folder_source(root, "train")
  assert s.classes == ("n01", "n02", "n03")
  for path, label in zip(s.paths, s.labels):
    assert os.path.basename(os.path.dirname(path)) == s.classes[label]
  assert s.num_examples == 15 + 6


def test_awkward_files_decode_and_bad_ones_are_counted(tree):
  root, info = tree
  s = sources.folder_source(root, "train")
  p = pipeline.InputPipeline(s, eval32, global_batch=7, image_size=32, train=False)
  batches = list(p)
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid.sum() == s.num_examples - 3 and p.skipped == 3
  assert sorted(p.skipped_names) == sorted(info["bad"])
  names = list(s.paths)
  imgs = np.concatenate([b["image"] for b in batches])
  gray = imgs[names.index(os.path.join(root, "train", "n01", "gray.JPEG"))]
  assert imgs.dtype == np.uint8
  np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
  # CMYK and PNG-in-JPEG decode to (nearly) the same RGB picture as the grayscale's source.
  cmyk = imgs[names.index(os.path.join(root, "train", "n01", "cmyk.JPEG"))]
  png = imgs[names.index(os.path.join(root, "train", "n01", "png_inside.JPEG"))]
  assert np.abs(cmyk.astype(float) - png).mean() < 3


def test_training_replaces_bad_images_and_keeps_batch_size(tree):
  root, _ = tree
  s = sources.folder_source(root, "train")
  p = pipeline.InputPipeline(s, pre32, global_batch=7, image_size=32, seed=1, num_epochs=1)
  batches = list(p)
  assert len(batches) == p.steps_per_epoch == 3
  assert all(b["image"].shape == (7, 32, 32, 3) and b["valid"].all() for b in batches)
  assert p.skipped == 3
  # Crops for the device resize: canvases + sizes + flips, refilled together.
  crops = pipeline.InputPipeline(s, transforms.make_transform("pretrain_crop", 32),
                                 global_batch=7, image_size=32, seed=1, num_epochs=1)
  batches = list(crops)
  assert crops.skipped == 3 and all(b["image"].shape == (7, 64, 64, 3) for b in batches)
  assert 0 < np.mean([b["flip"].mean() for b in batches]) < 1
  for b in batches:
    for img, (h, w) in zip(b["image"], b["size"]):
      assert 0 < h <= 64 and 0 < w <= 64 and img[h:].max(initial=0) == img[:, w:].max(initial=0) == 0


def test_same_seed_same_order_and_resume_at_any_step(tree):
  root, _ = tree
  s = sources.folder_source(root, "val")  # 15 images, batch 4: 3 steps an epoch
  make = lambda **kw: pipeline.InputPipeline(s, pre32, global_batch=4, image_size=32, seed=5, **kw)
  full = take(make(), 8)
  again = take(make(), 8)
  for a, b in zip(full, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(make().epoch_positions(0), make().epoch_positions(1))
  for k in (1, 3, 5):  # inside the first epoch, at an epoch start, inside the second
    resumed = take(make(start_step=k), 8 - k)
    for a, b in zip(full[k:], resumed):
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["label"], b["label"])


def test_processes_get_disjoint_shards_that_assemble_the_global_batch(tree):
  root, _ = tree
  s = sources.folder_source(root, "val")
  kw = dict(global_batch=6, image_size=32, seed=3)
  single = pipeline.InputPipeline(s, pre32, **kw)
  parts = [pipeline.InputPipeline(s, pre32, process_index=i, process_count=2, **kw)
           for i in range(2)]
  for epoch in range(3):
    pos = [p.epoch_positions(epoch) for p in parts]
    assert not set(pos[0].ravel()) & set(pos[1].ravel())
    np.testing.assert_array_equal(np.concatenate(pos, axis=1), single.epoch_positions(epoch))
  # Over an epoch the union of both processes is the split minus the dropped remainder.
  union = set(parts[0].epoch_positions(0).ravel()) | set(parts[1].epoch_positions(0).ravel())
  assert len(union) == 12 and union <= set(range(15))
  g = take(single, 2)
  local = [take(p, 2) for p in parts]
  for step in range(2):
    joined = np.concatenate([local[0][step]["image"], local[1][step]["image"]])
    np.testing.assert_array_equal(joined, g[step]["image"])


def test_eval_counts_every_example_once(tree):
  root, _ = tree
  s = sources.folder_source(root, "val")
  parts = [pipeline.InputPipeline(s, eval32, global_batch=4, image_size=32, train=False,
                                  process_index=i, process_count=2) for i in range(2)]
  seen = []
  for p in parts:
    for pos in p.epoch_positions(0):
      seen += [int(x) for x in pos if x >= 0]
  assert sorted(seen) == list(range(15))
  valid = sum(int(b["valid"].sum()) for p in parts for b in p)
  assert valid == 15


@pytest.mark.parametrize("setup,match", [
    (lambda root: sources.folder_source(os.path.join(root, "nope"), "train"), "does not exist"),
    (lambda root: sources.folder_source(root, "test"), "test"),
    (lambda root: (os.makedirs(os.path.join(root, "empty", "train", "c")),
                   sources.folder_source(os.path.join(root, "empty"), "train")), "no image files"),
    (lambda root: (os.makedirs(os.path.join(root, "noclass", "train")),
                   sources.folder_source(os.path.join(root, "noclass"), "train")),
     "no class folders"),
    (lambda root: sources.tfds_source("imagenet2012", "train", data_dir=root), "not prepared"),
])
def test_bad_data_paths_give_clear_errors(tmp_path, setup, match):
  with pytest.raises(sources.DataError, match=match):
    setup(str(tmp_path))


def test_tfds_imagenet_through_the_real_code_path(tmp_path):
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import naming
  from tensorflow_datasets.core import splits as splits_lib
  data_dir = str(tmp_path)
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  builder.info.set_splits(splits_lib.SplitDict([
      splits_lib.SplitInfo(name=name, shard_lengths=[n], num_bytes=0,
                           filename_template=naming.ShardedFileTemplate(
                               data_dir=builder.data_dir, dataset_name=builder.name, split=name,
                               filetype_suffix="tfrecord"))
      for name, n in (("train", 24), ("validation", 10))]))
  os.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)
  with tfds.testing.mock_data(num_examples=24, data_dir=data_dir,
                              policy=tfds.testing.MockPolicy.USE_FILES):
    s = sources.tfds_source("imagenet2012", "train", data_dir=data_dir)
    assert s.num_examples == 24 and len(s.classes) == 1000 and s.classes[0] == "n01440764"
    assert list(s.classes) == sorted(s.classes)  # the folder layout's label order
    p = pipeline.InputPipeline(s, pre32, global_batch=8, image_size=32, seed=0, num_epochs=2)
    batches = list(p)
    assert len(batches) == 2 * 3 and p.skipped == 0
    for b in batches:
      assert b["image"].shape == (8, 32, 32, 3) and b["valid"].all()
      assert ((0 <= b["label"]) & (b["label"] < 1000)).all()
    resumed = take(pipeline.InputPipeline(s, pre32, global_batch=8, image_size=32, seed=0,
                                          start_step=4), 2)
    for a, b in zip(batches[4:], resumed):
      np.testing.assert_array_equal(a["image"], b["image"])


def test_demo_source_yields_real_photos_offline(tmp_path):
  root = demo.write_demo_dataset(str(tmp_path / "demo"), size=48)
  s = sources.folder_source(root, "train")
  assert s.classes == tuple(demo.photo_names()) and len(s.classes) == 10
  assert s.num_examples == 10 * demo.SPLITS["train"]
  b = take(pipeline.InputPipeline(s, pre32, global_batch=16, image_size=32), 1)[0]
  # Real photos: neighbouring pixels correlate strongly (noise would not).
  img = b["image"].astype(np.float64)
  corr = np.corrcoef(img[:, :, 1:].ravel(), img[:, :, :-1].ravel())[0, 1]
  assert corr > 0.6
  assert demo.write_demo_dataset(root) == root  # second call reuses it


def test_non_ascii_file_names_decode(tmp_path):
  """File names are UTF-8 bytes for tf.data (numpy's bytes conversion is ASCII-only)."""
  from PIL import Image
  names = ["café_日本語.JPEG", "plain.JPEG", "ünïcödé.png", "ascii2.JPEG"]
  for cls in ("a", "b"):
    os.makedirs(tmp_path / "train" / cls)
    for i, name in enumerate(names):
      arr = np.full((40, 40, 3), 40 * i + (100 if cls == "b" else 0), np.uint8)
      Image.fromarray(arr).save(tmp_path / "train" / cls / name, format="PNG")
  s = sources.folder_source(str(tmp_path), "train")
  p = pipeline.InputPipeline(s, eval32, global_batch=8, image_size=32, train=False)
  batch = take(p, 1)[0]
  assert p.skipped == 0 and batch["valid"].all()
  means = sorted(float(m) for m in batch["image"].reshape(8, -1).mean(1))
  want = sorted(float(40 * i + off) for off in (0, 100) for i in range(4))
  np.testing.assert_allclose(means, want, atol=1.0)


def test_tensorflow_is_imported_lazily():
  code = ("import sys, sbam_jax, sbam_jax.masking, sbam_jax.models, sbam_jax.convert, "
          "sbam_jax.config, sbam_jax.data, sbam_jax.data.mixup, sbam_jax.data.sources; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))


def test_stream_with_gaps_is_recut_at_step_boundaries():
  """Hand-worked: steps of 3, 4 steps; indices 0, 4, 5, 6, 7, 8 and 11 failed
  (a gap at the start, across a boundary, a whole step, the tail)."""
  import types
  fake = types.SimpleNamespace(local_batch=3, spec={"image": ((1, 1, 3), np.uint8)})
  fake._cut = types.MethodType(pipeline.InputPipeline._cut, fake)
  survivors = [1, 2, 3, 9, 10]
  elem = lambda ids: {"image": np.asarray(ids, np.uint8).reshape(-1, 1, 1, 1).repeat(3, -1),
                      "label": np.asarray(ids, np.int32), "pad": np.zeros(len(ids), bool),
                      "index": np.asarray(ids, np.int64)}
  tf_batches = [elem(survivors[:3]), elem(survivors[3:])]  # what batch(3) of the survivors gives
  out = list(pipeline.InputPipeline._aligned(fake, tf_batches, 4))
  assert [b["label"].tolist() for b in out] == [[0, 1, 2], [3, 0, 0], [0, 0, 0], [9, 10, 0]]
  assert [b["ok"].tolist() for b in out] == [[False, True, True], [True, False, False],
                                             [False, False, False], [True, True, False]]
  assert out[3]["image"][:, 0, 0, 0].tolist() == [9, 10, 0]
  # No gap: batches pass through untouched.
  clean = [elem([0, 1, 2]), elem([3, 4, 5])]
  out = list(pipeline.InputPipeline._aligned(fake, clean, 2))
  assert out[1]["image"] is clean[1]["image"] and all(b["ok"].all() for b in out)
