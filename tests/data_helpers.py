"""Generated image trees for the data tests."""

import io
import os

import numpy as np
from PIL import Image

PHOTO_DIR = os.path.join(os.path.dirname(__file__), "..", "sbam_jax", "data", "demo_photos")


def photo(name="chelsea"):
  return Image.open(os.path.join(PHOTO_DIR, name + ".jpg")).convert("RGB")


def encode(img, fmt="JPEG", **kw):
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def make_tree(root, classes=("n02", "n01", "n03"), per_class=5, size=(60, 80), seed=0,
              awkward=True):
  """{root}/{train,val}/<class>/*.JPEG; with `awkward`, train/n01 also holds a
  grayscale, a CMYK, a PNG named .JPEG, and train/n03 a corrupt, a truncated and
  an empty file. Returns {'bad': [paths], 'good': count}."""
  rng = np.random.default_rng(seed)
  for split in ("train", "val"):
    for c in classes:
      os.makedirs(os.path.join(root, split, c), exist_ok=True)
      for i in range(per_class):
        arr = (rng.uniform(size=size + (3,)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(root, split, c, f"{c}_{i}.JPEG"), quality=90)
  bad = []
  if awkward:
    base = np.asarray(photo().resize((80, 60)))
    d = os.path.join(root, "train", "n01")
    Image.fromarray(base[..., 0]).save(os.path.join(d, "gray.JPEG"))
    Image.fromarray(base).convert("CMYK").save(os.path.join(d, "cmyk.JPEG"))
    Image.fromarray(base).save(os.path.join(d, "png_inside.JPEG"), format="PNG")
    d = os.path.join(root, "train", "n03")
    payloads = {"corrupt.JPEG": b"this is not an image",
                "truncated.JPEG": encode(Image.fromarray(base))[:200],
                "empty.JPEG": b""}
    for name, data in payloads.items():
      with open(os.path.join(d, name), "wb") as f:
        f.write(data)
      bad.append(os.path.join(d, name))
  return {"bad": bad}
