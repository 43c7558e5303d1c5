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
