"""Where images come from: the MAE folder layout, tensorflow-datasets, or
synthetic arrays. A source is a list of records that the pipeline orders,
shards and decodes; it never decodes anything itself.

Folder layout (what the PyTorch MAE/SBAM scripts read with ImageFolder):
`{root}/{split}/<class>/<image>`; labels are the sorted class folder names,
the order torchvision's ImageFolder and tfds' `imagenet2012` label list use
(both sort the WordNet ids), so labels agree between the two sources.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
  """The data the config points to is missing or unusable; the message says
  which path or dataset and what to do."""


@dataclasses.dataclass(frozen=True)
class FolderSource:
  """Encoded image files of one split, with integer labels."""
  root: str
  split: str
  paths: np.ndarray          # (N,) str
  labels: np.ndarray         # (N,) int32
  classes: tuple[str, ...]

  @property
  def num_examples(self) -> int:
    return len(self.paths)


def folder_source(root: str, split: str) -> FolderSource:
  """Index `{root}/{split}/<class>/*` (image extensions, case-insensitive)."""
  if not root or not os.path.isdir(root):
    raise DataError(f"data path {root!r} does not exist or is not a folder; point "
                    f"config.data.path at a folder holding {split}/<class>/<images>")
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise DataError(f"{split_dir!r} does not exist; the MAE folder layout needs "
                    f"{root}/{split}/<class>/<images>")
  classes = tuple(sorted(d for d in os.listdir(split_dir)
                         if os.path.isdir(os.path.join(split_dir, d))))
  if not classes:
    raise DataError(f"{split_dir!r} has no class folders; expected {split_dir}/<class>/<images>")
  paths, labels = [], []
  for label, name in enumerate(classes):
    folder = os.path.join(split_dir, name)
    for dirpath, _, files in sorted(os.walk(folder, followlinks=True)):
      for f in sorted(files):
        if f.lower().endswith(IMAGE_EXTENSIONS):
          paths.append(os.path.join(dirpath, f))
          labels.append(label)
  if not paths:
    raise DataError(f"{split_dir!r} has {len(classes)} class folders but no image files "
                    f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
  return FolderSource(root, split, np.asarray(paths), np.asarray(labels, np.int32), classes)


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """A prepared tensorflow-datasets image-classification split."""
  name: str
  split: str
  data_dir: Optional[str]
  num_examples: int
  classes: tuple[str, ...]
  image_key: str = "image"
  label_key: str = "label"


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
        f"or set config.data.data_dir to where it is prepared")
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
