"""Per-batch image ops that run on the accelerator, after the host pipeline:
ImageNet normalisation of the uint8 batch and timm's RandomErasing. Pure
JAX, static shapes, jittable; each sample draws its own randomness."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: jax.Array, dtype=jnp.float32) -> jax.Array:
  """uint8 (N, H, W, 3) -> (x / 255 - mean) / std, as ToTensor + Normalize."""
  x = images.astype(jnp.float32) / 255.0
  return ((x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)).astype(dtype)


def denormalize(images: jax.Array) -> jax.Array:
  """Inverse of `normalize`, to [0, 1] floats (for figures)."""
  return images * jnp.asarray(IMAGENET_STD) + jnp.asarray(IMAGENET_MEAN)


def random_erasing(rng: jax.Array, images: jax.Array, prob: float = 0.25,
                   area=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), attempts: int = 10) -> jax.Array:
  """timm RandomErasing(prob, mode='pixel', max_count=1) on normalised images.

  Per sample: with probability `prob`, the first of `attempts` boxes (area
  fraction ~ U(area), log aspect ~ U(log ratio)) that fits is filled with
  N(0, 1) noise per pixel and channel; no box fits -> unchanged.
  """
  n, h, w, _ = images.shape
  k_do, k_area, k_ratio, k_top, k_left, k_noise = jax.random.split(rng, 6)
  target = h * w * jax.random.uniform(k_area, (n, attempts), minval=area[0], maxval=area[1])
  aspect = jnp.exp(jax.random.uniform(k_ratio, (n, attempts), minval=math.log(ratio[0]),
                                      maxval=math.log(ratio[1])))
  bh = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
  bw = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
  ok = (bw < w) & (bh < h)
  # randint(0, size - box) inclusive, as Python's random.randint
  top = jnp.floor(jax.random.uniform(k_top, (n, attempts)) * (h - bh + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_left, (n, attempts)) * (w - bw + 1)).astype(jnp.int32)
  first = jnp.argmax(ok, axis=1)
  pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0, None, None]
  t, l, bh, bw = pick(top), pick(left), pick(bh), pick(bw)
  erase = (jax.random.uniform(k_do, (n,)) < prob) & ok.any(axis=1)
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  box = (rows >= t) & (rows < t + bh) & (cols >= l) & (cols < l + bw) & erase[:, None, None]
  noise = jax.random.normal(k_noise, images.shape, images.dtype)
  return jnp.where(box[..., None], noise, images)


def _pil_bicubic_weights(in_len: jax.Array, out_len: int, max_in: int) -> jax.Array:
  """(out_len, max_in) weights of PIL's antialiased bicubic resize from `in_len`
  (traced) to `out_len` pixels: output i is centred at (i + 0.5) in/out, the
  kernel (a = -0.5) is stretched by max(in/out, 1), taps are the inputs in
  [floor(c - support + 0.5), floor(c + support + 0.5)) inside the image, and
  each row is normalised to sum 1 (PIL's precompute_coeffs)."""
  in_f = in_len.astype(jnp.float32)
  scale = in_f / out_len
  fs = jnp.maximum(scale, 1.0)
  support = 2.0 * fs
  center = (jnp.arange(out_len, dtype=jnp.float32) + 0.5) * scale
  x = jnp.arange(max_in, dtype=jnp.float32)
  lo = jnp.maximum(jnp.floor(center - support + 0.5), 0.0)
  hi = jnp.minimum(jnp.floor(center + support + 0.5), in_f)
  t = jnp.abs((x[None, :] - center[:, None] + 0.5) / fs)
  a = -0.5
  k = jnp.where(t < 1.0, ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0,
                jnp.where(t < 2.0, (((t - 5.0) * t + 8.0) * t - 4.0) * a, 0.0))
  k = jnp.where((x[None, :] >= lo[:, None]) & (x[None, :] < hi[:, None]), k, 0.0)
  return k / jnp.sum(k, axis=1, keepdims=True)


def resize_crops(canvas: jax.Array, sizes: jax.Array, size: int) -> jax.Array:
  """The accelerator's half of RandomResizedCrop: crops (top-left (h, w) of each
  uint8 canvas) -> (N, size, size, 3) float32 holding uint8 values. PIL's
  antialiased bicubic (what torchvision applies to PIL images), in PIL's order:
  the horizontal pass, rounded and clipped to uint8, then the vertical pass."""
  c = canvas.shape[1]
  wy = jax.vmap(lambda h: _pil_bicubic_weights(h, size, c))(sizes[:, 0])
  wx = jax.vmap(lambda w: _pil_bicubic_weights(w, size, c))(sizes[:, 1])
  hi = jax.lax.Precision.HIGHEST
  to_uint8 = lambda v: jnp.clip(jnp.round(v), 0.0, 255.0)
  cols = to_uint8(jnp.einsum("nyxc,ntx->nytc", canvas.astype(jnp.float32), wx, precision=hi))
  return to_uint8(jnp.einsum("nsy,nytc->nstc", wy, cols, precision=hi))


def pixels(batch: dict, size: int) -> jax.Array:
  """The batch's images at `size` px: resized (and flipped) here when the host
  sent crops ('size', 'flip' present), else as they came (uint8)."""
  if "size" not in batch:
    return batch["image"]
  out = resize_crops(batch["image"], batch["size"], size)
  return jnp.where(batch["flip"][:, None, None, None], out[:, :, ::-1], out)
