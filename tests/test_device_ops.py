"""Accelerator-side image ops: normalisation and timm's random erasing."""

import jax
import jax.numpy as jnp
import numpy as np

from sbam_jax.data import device


def test_normalize_matches_totensor_normalize():
  x = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  want = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(device.normalize(jnp.asarray(x)), want, atol=1e-6)
  np.testing.assert_allclose(device.denormalize(device.normalize(jnp.asarray(x))), x / 255.0,
                             atol=1e-6)


def test_random_erasing_statistics():
  imgs = jnp.zeros((4000, 32, 32, 3))
  out = np.asarray(jax.jit(device.random_erasing)(jax.random.key(0), imgs))
  erased = (out != 0).any(axis=(1, 2, 3))
  assert abs(erased.mean() - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 4000)
  boxes = (out[erased] != 0).any(axis=-1)
  areas = boxes.mean(axis=(1, 2))
  assert areas.min() >= 0.015 and areas.max() <= 1 / 3 + 0.02
  # one axis-aligned rectangle per erased image
  for b in boxes[:50]:
    rows, cols = np.flatnonzero(b.any(1)), np.flatnonzero(b.any(0))
    assert b[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
    assert b.sum() == len(rows) * len(cols)
  vals = out[erased][np.broadcast_to(boxes[..., None], out[erased].shape)]
  assert abs(vals.mean()) < 0.02 and abs(vals.std() - 1) < 0.02


def test_device_resize_reproduces_pil_bicubic():
  """Crops of a real photo, top-left in a canvas: the device resize equals PIL's
  antialiased bicubic (torchvision's) up to PIL's fixed-point rounding."""
  from PIL import Image
  from data_helpers import photo
  img = np.asarray(photo("astronaut").resize((512, 512), Image.BICUBIC))
  canvas = np.zeros((5, 448, 448, 3), np.uint8)
  sizes = [(300, 280), (120, 150), (448, 336), (224, 224), (37, 400)]  # shrink, grow, mixed
  for i, (h, w) in enumerate(sizes):
    canvas[i, :h, :w] = img[:h, :w]
  got = np.asarray(device.resize_crops(jnp.asarray(canvas), jnp.asarray(sizes, jnp.int32), 224))
  for i, (h, w) in enumerate(sizes):
    want = np.asarray(Image.fromarray(img[:h, :w]).resize((224, 224), Image.BICUBIC), np.float64)
    diff = np.abs(got[i] - want)
    # PIL sums 22-bit fixed-point coefficients: a sum near .5 may round the other way.
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, ((h, w), diff.max(), (diff > 0).mean())
