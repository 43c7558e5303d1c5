"""Reconstruction figures: per image, five panels side by side:

original | salience heat-map | mask (hidden patches grey) | reconstruction |
reconstruction pasted into the hidden patches of the original.

With norm-pix loss the model predicts each patch normalised by its own mean
and variance, which are unknown for hidden patches. The figure puts
predictions back into pixels with the mean and variance averaged over the
image's *visible* patches (what the model could know), per image and channel.
"""

from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from sbam_jax.data import device as device_ops
from sbam_jax.models.layers import patchify, unpatchify


def heat(values: np.ndarray) -> np.ndarray:
  """[0, 1] -> RGB in [0, 1] (blue -> cyan -> yellow -> red)."""
  v = np.clip(values, 0, 1)[..., None]
  stops = np.array([[0, 0, .5], [0, .6, 1], [1, 1, 0], [.8, 0, 0]])
  pos = v * (len(stops) - 1)
  lo = np.clip(np.floor(pos).astype(int), 0, len(stops) - 2)
  t = pos - lo
  return stops[lo[..., 0]] * (1 - t) + stops[lo[..., 0] + 1] * t


def panels(model, images_uint8: np.ndarray, spec, key) -> np.ndarray:
  """(N, H, W, 3) uint8 -> (N * H, 5 * W, 3) uint8 figure."""
  imgs = device_ops.normalize(jnp.asarray(images_uint8))
  out = model(imgs, key, spec)
  p = model.cfg.patch_size
  n, h, w, c = imgs.shape
  target = patchify(imgs, p)
  mask = out.mask[..., None]
  pred = out.pred
  if model.cfg.norm_pix_loss:
    vis = 1.0 - mask
    count = jnp.maximum(vis.sum(1, keepdims=True), 1.0)
    # per-image, per-channel mean and variance of visible patches (layout: row, col, channel)
    t = target.reshape(n, -1, p * p, c)
    vis4 = vis[..., None]
    mean = (t.mean(2, keepdims=True) * vis4).sum(1, keepdims=True) / count[..., None]
    var = (t.var(2, ddof=1, keepdims=True) * vis4).sum(1, keepdims=True) / count[..., None]
    pred = (pred.reshape(n, -1, p * p, c) * jnp.sqrt(var + 1e-6) + mean).reshape(pred.shape)
  to_img = lambda x: np.clip(np.asarray(device_ops.denormalize(unpatchify(x, p, c))), 0, 1)
  original = np.asarray(images_uint8, np.float32) / 255.0
  masked = np.where(np.asarray(unpatchify(jnp.broadcast_to(mask, target.shape), p, c)) > 0,
                    0.5, original)
  recon = to_img(pred)
  pasted = to_img(target * (1 - mask) + pred * mask)
  g = h // p
  if out.salience is not None:
    sal = np.asarray(out.salience).reshape(n, g, g)
    sal = heat(np.repeat(np.repeat(sal, p, 1), p, 2))
  else:
    sal = np.zeros_like(original)
  rows = [np.concatenate([original[i], sal[i], masked[i], recon[i], pasted[i]], axis=1)
          for i in range(n)]
  return (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)


def save_png(image: np.ndarray, path: str) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".png", dir=folder)
  os.close(fd)
  try:
    Image.fromarray(image).save(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
