"""The bundled demo dataset: real photographs, no download.

Ten public-domain / CC0 photos ship in `demo_photos/` (see LICENSES.md).
`write_demo_dataset` turns them once into the MAE folder layout: each photo is
a class, its samples are random square crops (area 25-100 %) resized to
`size` px, so the set works for pre-training and for a small classification
check (which photo does a crop come from?). Written into a temporary folder
and renamed, so an interrupted write never leaves a half dataset. The
bundled photos are local by nature (they ship inside the package); the
default cache is local too (`SBAM_JAX_CACHE`, ~/.cache/sbam_jax).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

from sbam_jax import files
from sbam_jax.files import honour_umask

PHOTO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_photos")
SPLITS = {"train": 48, "val": 16}
_MARKER = ".complete"


def default_root() -> str:
  cache = os.environ.get("SBAM_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                         "sbam_jax"))
  return os.path.join(cache, "demo")


def photo_names() -> list[str]:
  return sorted(os.path.splitext(f)[0] for f in os.listdir(PHOTO_DIR) if f.endswith(".jpg"))


def write_demo_dataset(root: str | None = None, *, size: int = 96, seed: int = 0) -> str:
  """Create `{root}/{train,val}/<photo>/<i>.jpg` once; returns root. A URL
  root (gs://) is written in a local temporary folder and uploaded, the
  completion marker last."""
  root = root or default_root()
  if files.exists(files.join(root, _MARKER)):
    return root
  if files.is_remote(root):
    with tempfile.TemporaryDirectory(prefix="sbam_jax-") as scratch:
      _write_crops(scratch, size, seed)
      if files.exists(root):
        files.rmtree(root)  # an incomplete earlier attempt
      files.upload_tree(scratch, root, last=_MARKER)
    return root
  parent = os.path.dirname(os.path.abspath(root))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".demo-", dir=parent)
  honour_umask(tmp)
  try:
    _write_crops(tmp, size, seed)
    if os.path.exists(root):
      shutil.rmtree(root)  # an incomplete earlier attempt
    os.replace(tmp, root)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return root


def _write_crops(folder: str, size: int, seed: int) -> None:
  """The crops of every photo and split into local `folder`, marker last."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  for name in photo_names():
    photo = Image.open(os.path.join(PHOTO_DIR, name + ".jpg")).convert("RGB")
    w, h = photo.size
    for split, count in SPLITS.items():
      out = os.path.join(folder, split, name)
      os.makedirs(out)
      for i in range(count):
        side = int(min(w, h) * np.sqrt(rng.uniform(0.25, 1.0)))
        x, y = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
        crop = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
        crop.save(os.path.join(out, f"{i:03d}.jpg"), quality=90)
  open(os.path.join(folder, _MARKER), "w").close()
