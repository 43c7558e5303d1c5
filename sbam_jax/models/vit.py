"""ViT classifier for fine-tuning, linear probing and evaluation, on the MAE encoder.

As MAE's `models_vit.py`: the same encoder with a learned position table;
global pool (mean of patch tokens -> `fc_norm`, no final `norm`) by default,
or the cls token after `norm`; drop-path linear in depth. The learned table
starts from the sin-cos table; a pre-trained checkpoint overwrites it
(resampled if the grid differs).

The head weight is drawn from N(0, head_init_std): MAE calls timm's
trunc_normal_(std) whose cut-off is at +-2 in absolute value, i.e. at
10^5 (fine-tune, 2e-5) or 200 (probe, 0.01) standard deviations, so the
reference's draw is a plain normal. The linear probe (`probe=True`) puts
BatchNorm1d(affine=False, eps=1e-6) in front of the head, as main_linprobe.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from sbam_jax.models.layers import layer_norm
from sbam_jax.models.mae import Encoder
from sbam_jax.models.sizes import ModelConfig


class FeatureBatchNorm(nnx.Module):
  """PyTorch BatchNorm1d(affine=False): batch statistics (biased variance) in
  training, running statistics otherwise; the running variance is updated with
  the unbiased batch variance, momentum 0.1. Statistics are over the whole
  (global) batch given, i.e. synchronised across devices."""

  def __init__(self, dim: int, *, eps: float = 1e-6, momentum: float = 0.1):
    self.eps, self.momentum = eps, momentum
    self.mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((dim,), jnp.float32))

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = x.astype(jnp.float32)
    if train:
      n = x.shape[0]
      mean = x.mean(axis=0)
      var = jnp.square(x - mean).mean(axis=0)
      m = self.momentum
      self.mean[...] = (1 - m) * self.mean[...] + m * mean
      self.var[...] = (1 - m) * self.var[...] + m * var * (n / max(n - 1, 1))
    else:
      mean, var = self.mean[...], self.var[...]
    return (x - mean) / jnp.sqrt(var + self.eps)


class VisionTransformer(nnx.Module):
  def __init__(self, cfg: ModelConfig, num_classes: int, *, global_pool: bool = True,
               drop_path_rate: float = 0.0, probe: bool = False, head_init_std: float = 2e-5,
               rngs: nnx.Rngs):
    self.global_pool = global_pool
    self.drop_path_rate = drop_path_rate
    self.encoder = Encoder(cfg, learned_pos=True, final_norm=not global_pool, rngs=rngs)
    d = cfg.embed_dim
    if global_pool:
      self.fc_norm = layer_norm(d, rngs)
    self.head_bn = FeatureBatchNorm(d) if probe else None
    self.head = nnx.Linear(d, num_classes, kernel_init=nnx.initializers.normal(head_init_std),
                           bias_init=nnx.initializers.zeros, param_dtype=jnp.float32, rngs=rngs)

  def features(self, imgs: jax.Array, *, key: Optional[jax.Array] = None) -> jax.Array:
    """Pooled features (N, D). `key` enables drop-path (training)."""
    enc = self.encoder
    x = enc.with_cls(enc.embed_patches(imgs))
    rate = self.drop_path_rate if key is not None else 0.0
    x = enc.blocks(x, None, drop_path_rate=rate, key=key)
    if self.global_pool:
      return self.fc_norm(x[:, 1:].mean(axis=1))
    return enc.norm(x)[:, 0]

  def classify(self, feats: jax.Array, *, train: bool = False) -> jax.Array:
    """Head on pooled features (the linear probe's BatchNorm first)."""
    if self.head_bn is not None:
      feats = self.head_bn(feats, train=train)
    return self.head(feats.astype(jnp.float32)).astype(jnp.float32)

  def __call__(self, imgs: jax.Array, *, key: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    return self.classify(self.features(imgs, key=key), train=train)
