"""Where images come from, behind one small protocol.

A source is a list of labelled, still-encoded examples; the input pipeline
orders, shards, decodes and batches them. What a source provides:

  num_examples, classes         its length and its label names
  describe()                    what it is, for messages and the start-up header
                                ("<root>/train (N images in K classes: ...)")
  elements(pipe, epoch, offset) a tf.data.Dataset of (data, label, seed, pad)
                                for this process, from step `offset` of the
                                epoch, in the order the pipeline `pipe` asks
  reader()                      None, or a tf function data -> encoded image
                                bytes, run in the parallel decode map (file
                                reads go here)
  element_name(pipe, epoch, offset, index)   what a failed element was
  stop_if_unreadable()          (optional) raise once the images cannot be read
                                at all any more, rather than skip them one by one
  subsets(counts, seed)         fixed, seeded, disjoint parts (evaluation banks)
  from_config(data, split)      build it from `config.data` (a DataConfig)

`IndexedSource` implements all of it for anything with random access to its
records (`records(positions)`): the pipeline's seeded permutation picks them.
A new source is one class registered under its config name
(`@registry.register("source", name)`), e.g. `data.source = "folder"`.

Folder layout (what the PyTorch MAE/SBAM scripts read with ImageFolder):
`{root}/{split}/<class>/<image>`; labels are the sorted class folder names,
the order torchvision's ImageFolder and tfds' `imagenet2012` label list use
(both sort the WordNet ids), so labels agree between the two sources. The
root may be a URL (gs://): listed and read through `sbam_jax.files`, as
TensorFlow's own GCS client cannot be pointed at an emulator to test it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import numpy as np

from sbam_jax import files, registry, store
from sbam_jax.data.folder_walk import IMAGE_EXTENSIONS, FolderWalk, has_image_ext, shown
from sbam_jax.errors import ConfigError, DataError

__all__ = ["DataError", "IndexedSource", "FolderSource", "TfdsSource", "SyntheticSource",
           "folder_source", "tfds_source", "build_source"]

EPOCH_SEED_STRIDE = 1_000_003


def epoch_seed(seed: int, epoch: int) -> int:
  return seed * EPOCH_SEED_STRIDE + epoch


def _utf8(value) -> bytes:
  return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)


def build_source(data, split: Optional[str] = None):
  """The source `data.source` names, for `split` (default `data.split`)."""
  cls = registry.lookup("source", data.source, where="data.source")
  if not callable(getattr(cls, "from_config", None)):
    raise ConfigError(f"data.source={data.source!r} names {cls!r}, which has no "
                      f"from_config(data, split): see the sources.py docstring")
  return cls.from_config(data, split or data.split)


class IndexedSource:
  """Random access to `num_examples` records (see the module docstring).
  Subclasses set `num_examples` and `classes` and define `records`."""
  num_examples: int
  classes: tuple

  def records(self, positions: np.ndarray):
    """(data (M,) array of bytes, labels (M,) int32) of the given records."""
    raise NotImplementedError

  def describe(self) -> str:
    return type(self).__name__

  def reader(self):
    return None

  def elements(self, pipe, epoch: int, offset: int):
    from sbam_jax.data.tf_env import import_tf  # pylint: disable=g-import-not-at-top
    tf = import_tf()
    pos = pipe.epoch_positions(epoch)[offset:].reshape(-1)
    safe = np.maximum(pos, 0)
    data, labels = self.records(safe)
    # UTF-8 by hand: numpy's bytes conversion is ASCII-only (file names are not).
    data = np.array([_utf8(d) if p >= 0 else b"" for d, p in zip(data, pos)], dtype=object)
    labels = np.where(pos >= 0, labels, 0).astype(np.int32)
    seeds = np.stack([np.full_like(pos, epoch_seed(pipe.seed, epoch)), safe], 1)
    return tf.data.Dataset.from_tensor_slices((data, labels, seeds.astype(np.int64), pos < 0))

  def element_name(self, pipe, epoch: int, offset: int, index: int) -> str:
    position = pipe.epoch_positions(epoch)[offset:].reshape(-1)[index]
    return self.name_of(int(position))

  def name_of(self, position: int) -> str:
    return f"{self.describe()} record {position}"

  def subsets(self, counts, seed: int) -> list:
    """Disjoint, fixed, seeded subsets of the given sizes (each at most what
    is left), in the order of the source."""
    order = np.random.default_rng(seed).permutation(self.num_examples)
    out, start = [], 0
    for count in counts:
      part = order[start:start + int(count)]
      start += len(part)
      if not len(part):
        raise DataError(f"{self.describe()} has {self.num_examples} examples, too few for "
                        f"disjoint subsets of {list(counts)}")
      out.append(Subset(self, np.sort(part)))
    return out


class Subset(IndexedSource):
  """Records `indices` of another indexed source (a fixed evaluation subset)."""

  def __init__(self, parent: IndexedSource, indices: np.ndarray):
    self.parent, self.indices = parent, np.asarray(indices, np.int64)
    self.num_examples, self.classes = len(self.indices), parent.classes

  def records(self, positions):
    return self.parent.records(self.indices[positions])

  def reader(self):
    return self.parent.reader()

  def describe(self) -> str:
    return f"{self.parent.describe()} ({self.num_examples} chosen)"

  def name_of(self, position: int) -> str:
    return self.parent.name_of(int(self.indices[position]))


@registry.register("source", "folder")
class FolderSource(IndexedSource):
  """Encoded image files of one split, with integer labels. `skipped`: how
  many entries the walk left out and its one-line report (see `FolderWalk`)."""

  def __init__(self, root: str, split: str, paths: np.ndarray, labels: np.ndarray,
               classes: tuple, skipped: tuple[int, str] = (0, "")):
    self.root, self.split, self.paths = root, split, paths
    self.labels, self.classes, self.num_examples = labels, classes, len(paths)
    self.skipped = skipped
    self.class_counts = np.bincount(labels, minlength=len(classes)) if len(classes) else labels
    self.watch = store.Watch(f"images of {shown(root)}")  # (only reads from a store fail it)

  @classmethod
  def from_config(cls, data, split: str) -> "FolderSource":
    return folder_source(data.path, split)

  def records(self, positions):
    return self.paths[positions], self.labels[positions]

  def reader(self):
    from sbam_jax.data.tf_env import import_tf  # pylint: disable=g-import-not-at-top
    tf = import_tf()
    if not files.is_remote(self.root):
      return tf.io.read_file
    self.watch.stop_if_lost()
    fetch = lambda path: _fetch(path, self.watch)
    return lambda path: tf.ensure_shape(tf.numpy_function(fetch, [path], tf.string), [])

  def describe(self) -> str:
    """Where, and how many images per class (the start-up header shows it).
    This, `name_of` and `reader` raise StoreError once the store is lost."""
    self.watch.stop_if_lost()
    counts, names = self.class_counts, self.classes
    if len(counts) and counts.min() == counts.max():
      per = f"{counts[0]} each"
    elif len(names) <= 4:
      per = ", ".join(f"{shown(n)} {c}" for n, c in zip(names, counts))
    else:
      small = int(np.argmin(counts))
      per = (f"min {counts[small]} in {shown(names[small])}, median {np.median(counts):g}, "
             f"max {counts.max()} per class")
    skipped = f"; {self.skipped[0]} entries skipped" if self.skipped[0] else ""
    return (f"{shown(self.root)}/{shown(self.split)} ({self.num_examples} images in "
            f"{len(names)} classes: {per}{skipped})")

  def name_of(self, position: int) -> str:
    self.watch.stop_if_lost()  # (called for a skipped image: was the store lost?)
    return shown(str(self.paths[position]))

  def stop_if_unreadable(self) -> None:
    self.watch.stop_if_lost()


def _fetch(path, watch: store.Watch) -> np.ndarray:
  """A file's bytes, for tf.numpy_function (`path`: bytes in a tf.data map,
  a 0-d array when eager); an object array, as np.bytes_ drops trailing NULs.
  A failed read is a skipped image, unless `watch` finds the store lost."""
  url = (path.item() if isinstance(path, np.ndarray) else path).decode("utf-8", "surrogateescape")
  watch.stop_if_lost()
  try:
    return np.array(files.read_bytes(url), dtype=object)
  except Exception as e:  # pylint: disable=broad-except
    watch.failed(url, e)
    raise


def folder_source(root: str, split: str) -> FolderSource:
  """Index `{root}/{split}/<class>/**` (image extensions, case-insensitive;
  see FolderWalk). A class folder without images is an error: dropping it
  would shift every later label."""
  if not root or not files.isdir(root):
    raise DataError(f"data path {root!r} does not exist or is not a folder; point "
                    f"config.data.path at a folder holding {split}/<class>/<images>")
  split_dir = files.join(root, split)
  if not files.isdir(split_dir):
    raise DataError(f"{split_dir!r} does not exist; the MAE folder layout needs "
                    f"{root}/{split}/<class>/<images>")
  try:
    classes = tuple(sorted(d for d in files.listdir(split_dir)
                           if files.isdir(files.join(split_dir, d))))
  except OSError as e:
    raise DataError(f"cannot list {shown(split_dir)}: {e.strerror or e}") from None
  if not classes:
    raise DataError(f"{split_dir!r} has no class folders; expected {split_dir}/<class>/<images>")
  if files.is_remote(split_dir):  # an object store has no links, devices or permission bits
    found = [[p for p in files.find(files.join(split_dir, c)) if has_image_ext(p)]
             for c in classes]
    paths, labels = sum(found, []), [i for i, f in enumerate(found) for _ in f]
    skipped, report = 0, ""
  else:
    walk = FolderWalk(split_dir, classes)
    paths, labels = walk.run()
    skipped, report = walk.report()
  counts = np.bincount(np.asarray(labels, np.int64), minlength=len(classes))
  empty = [shown(classes[i]) for i in np.flatnonzero(counts == 0)]
  if empty:
    what = (f"{len(classes)} class folders but no image files" if len(empty) == len(classes)
            else f"{len(empty)} of {len(classes)} class folders with no image files: "
                 f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}")
    raise DataError(f"{shown(split_dir)} has {what} (extensions {', '.join(IMAGE_EXTENSIONS)})"
                    f"; labels are the sorted class folders, so add images or remove the "
                    f"empty folders{'; ' + report if report else ''}")
  if report:
    logging.warning("%s", report)
  return FolderSource(root, split, np.asarray(paths), np.asarray(labels, np.int32), classes,
                      skipped=(skipped, report))


@registry.register("source", "demo")
class DemoSource(FolderSource):
  """The bundled photos in the folder layout (written once; see data/demo.py)."""

  @classmethod
  def from_config(cls, data, split: str) -> FolderSource:
    from sbam_jax.data import demo  # pylint: disable=g-import-not-at-top
    return folder_source(demo.write_demo_dataset(), split)


@registry.register("source", "tfds")
@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """A prepared tensorflow-datasets image-classification split, read as a
  stream: each process reads its part (`tfds.split_for_jax_process`), with
  file order and a shuffle buffer seeded from (seed, epoch)."""
  name: str
  split: str
  data_dir: Optional[str]
  num_examples: int
  classes: tuple[str, ...]
  image_key: str = "image"
  label_key: str = "label"

  @classmethod
  def from_config(cls, data, split: str) -> "TfdsSource":
    return tfds_source(data.tfds_name, split, data.tfds_data_dir or None)

  def describe(self) -> str:
    return f"tfds {self.name}:{self.split}"

  def reader(self):
    return None

  def subsets(self, counts, seed: int) -> list:
    """Consecutive slices from the start of the split (tfds slicing: fixed
    but not shuffled; `seed` is unused)."""
    del seed
    if any(c in self.split for c in "[+"):
      raise DataError(f"tfds split {self.split!r} is already a slice or a sum; subsets are "
                      f"taken from a whole split (e.g. 'train', 'validation')")
    out, start = [], 0
    for count in counts:
      stop = min(start + int(count), self.num_examples)
      if stop <= start:
        raise DataError(f"{self.describe()} has {self.num_examples} examples, too few for "
                        f"disjoint subsets of {list(counts)}")
      out.append(dataclasses.replace(self, split=f"{self.split}[{start}:{stop}]",
                                     num_examples=stop - start))
      start = stop
    return out

  def elements(self, pipe, epoch: int, offset: int):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from sbam_jax.data.tf_env import import_tf  # pylint: disable=g-import-not-at-top
    tf = import_tf()
    split = tfds.split_for_jax_process(self.split, process_index=pipe.process_index,
                                       process_count=pipe.process_count)
    seed = epoch_seed(pipe.seed, epoch)
    ds = tfds.load(self.name, split=split, data_dir=self.data_dir, shuffle_files=pipe.train,
                   read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=False),
                   decoders={self.image_key: tfds.decode.SkipDecoding()})
    ds = ds.map(lambda ex: (ex[self.image_key], tf.cast(ex[self.label_key], tf.int32), False))
    if pipe.train:
      ds = ds.shuffle(pipe.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
    # Evaluation: shards differ by at most one image; pad every process to the same length.
    pad = tf.data.Dataset.from_tensors((tf.constant(b""), 0, True)).repeat()
    ds = ds.concatenate(pad).take(pipe.steps_per_epoch * pipe.local_batch)
    ds = ds.enumerate().skip(offset * pipe.local_batch)
    return ds.map(lambda i, ex: (ex[0], ex[1], tf.stack([tf.constant(seed, tf.int64), i]),
                                 ex[2]))

  def element_name(self, pipe, epoch: int, offset: int, index: int) -> str:
    return (f"{self.describe()} element {offset * pipe.local_batch + index} of epoch {epoch} "
            f"(process {pipe.process_index})")


def tfds_source(name: str, split: str, data_dir: Optional[str] = None) -> TfdsSource:
  """Look up a prepared tfds dataset (nothing is downloaded or prepared here)."""
  from sbam_jax.data.tf_env import import_tf  # pylint: disable=g-import-not-at-top
  import_tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # unknown name, bad version string
    raise DataError(f"tfds dataset {name!r}: {e}") from None
  if not builder.is_prepared():
    raise DataError(
        f"tfds dataset {name!r} is not prepared in data_dir {builder.data_dir!r}. Prepare it "
        f"first (for ImageNet: put ILSVRC2012_img_{{train,val}}.tar in "
        f"<data_dir>/downloads/manual and run `tfds build {name} --data_dir <data_dir>`), "
        f"or set config.data.tfds_data_dir to where it is prepared")
  try:
    num = builder.info.splits[split].num_examples
  except KeyError:
    raise DataError(f"tfds dataset {name!r} has no split {split!r}; it has "
                    f"{sorted(builder.info.splits)}") from None
  label = builder.info.features["label"]
  classes = tuple(label.names) if hasattr(label, "names") else ()
  return TfdsSource(name, split, data_dir, int(num), classes)


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
  """Random normalised images and labels, made with numpy (no TensorFlow):
  for benchmarks that must not wait on decoding."""
  image_size: int
  num_classes: int = 1000
  num_examples: int = 1_281_167

  def batch(self, batch_size: int, step: int, seed: int = 0) -> dict:
    rng = np.random.default_rng((seed, step))
    return {"image": rng.standard_normal((batch_size, self.image_size, self.image_size, 3),
                                         np.float32),
            "label": rng.integers(0, self.num_classes, batch_size, dtype=np.int32)}
