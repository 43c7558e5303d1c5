"""Mixup / CutMix on the accelerator, with timm's `Mixup` semantics (mode
'batch'): one lambda per batch, CutMix with probability `switch_prob`, else
Mixup; each sample mixed with the batch reversed; CutMix's lambda corrected to
the box area actually pasted; targets are label-smoothed one-hots mixed with
the same lambda. Pure JAX, static shapes (the box is a mask), jittable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int):
  """timm rand_bbox: box of (sqrt(1 - lam) H, sqrt(1 - lam) W) centred at a
  uniform pixel, clipped to the image -> (top, bottom, left, right)."""
  ky, kx = jax.random.split(rng)
  cut = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * cut).astype(jnp.int32)
  cut_w = jnp.floor(width * cut).astype(jnp.int32)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  return top, bottom, left, right


def mix_with_lambda(images, labels, lam, use_cutmix, box, num_classes: int, smoothing: float):
  """Deterministic core: mix NHWC `images` with their batch reversal."""
  n, h, w, _ = images.shape
  flipped = images[::-1]
  top, bottom, left, right = box
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  cut_lam = 1.0 - jnp.asarray((bottom - top) * (right - left), jnp.float32) / (h * w)
  mixed_cut = jnp.where(inside[None, :, :, None], flipped, images)
  mixed_mix = images * lam + flipped * (1.0 - lam)
  out = jnp.where(use_cutmix, mixed_cut, mixed_mix)
  lam = jnp.where(use_cutmix, cut_lam, lam)
  y = smooth_one_hot(labels, num_classes, smoothing)
  return out.astype(images.dtype), y * lam + y[::-1] * (1.0 - lam)


def mixup_cutmix(rng: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
                 prob: float = 1.0, smoothing: float = 0.1):
  """Returns (mixed images, soft targets (N, num_classes))."""
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
  use_cutmix = jax.random.uniform(k_switch) < switch_prob
  lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
  lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
  if mixup_alpha <= 0:
    use_cutmix = jnp.asarray(True)
  if cutmix_alpha <= 0:
    use_cutmix = jnp.asarray(False)
  lam = jnp.where(use_cutmix, lam_cut, lam_mix)
  lam = jnp.where(jax.random.uniform(k_apply) < prob, lam, 1.0).astype(jnp.float32)
  box = cutmix_box(k_box, lam, images.shape[1], images.shape[2])
  return mix_with_lambda(images, labels, lam, use_cutmix, box, num_classes, smoothing)
