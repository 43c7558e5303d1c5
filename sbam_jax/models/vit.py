"""ViT classifier for fine-tuning and evaluation, on the MAE encoder.

As MAE's `models_vit.py`: the same encoder with a learned position table;
global pool (mean of patch tokens -> `fc_norm`, no final `norm`) by default,
or the cls token after `norm`; drop-path linear in depth; head initialised
trunc-normal(2e-5). The learned table starts from the sin-cos table; a
pre-trained checkpoint overwrites it (resampled if the grid differs).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from sbam_jax.models.layers import layer_norm
from sbam_jax.models.mae import Encoder
from sbam_jax.models.sizes import ModelConfig


class VisionTransformer(nnx.Module):
  def __init__(self, cfg: ModelConfig, num_classes: int, *, global_pool: bool = True,
               drop_path_rate: float = 0.0, rngs: nnx.Rngs):
    self.global_pool = global_pool
    self.drop_path_rate = drop_path_rate
    self.encoder = Encoder(cfg, learned_pos=True, final_norm=not global_pool, rngs=rngs)
    d = cfg.embed_dim
    if global_pool:
      self.fc_norm = layer_norm(d, rngs)
    self.head = nnx.Linear(d, num_classes, kernel_init=nnx.initializers.truncated_normal(2e-5),
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

  def __call__(self, imgs: jax.Array, *, key: Optional[jax.Array] = None) -> jax.Array:
    return self.head(self.features(imgs, key=key)).astype(jnp.float32)
