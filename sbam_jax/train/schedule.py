"""MAE's learning-rate rule, per optimizer step.

lr = blr * global_batch / 256; linear warm-up over `warmup_epochs`, then a
half cosine to `min_lr`, evaluated at the fractional epoch
`step / steps_per_epoch` (MAE's `adjust_learning_rate`, called per iteration
with `data_iter_step / len(data_loader) + epoch`; with gradient accumulation
it uses the first micro-step of each optimizer step, as here).
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def peak_lr(blr: float, global_batch: int) -> float:
  return blr * global_batch / 256


def mae_lr(step, *, lr: float, min_lr: float, warmup_epochs: float, epochs: float,
           steps_per_epoch: int):
  """Learning rate at optimizer step `step` (array or int)."""
  epoch = jnp.asarray(step, jnp.float32) / steps_per_epoch
  warm = lr * epoch / max(warmup_epochs, 1e-12)
  progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
  cos = min_lr + (lr - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
  return jnp.where(epoch < warmup_epochs, warm, cos)
