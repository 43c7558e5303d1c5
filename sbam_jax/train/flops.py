"""Analytic training FLOPs per image, for the MFU estimate in progress lines.

Matmuls and attention only (2 FLOPs per multiply-add); a backward pass costs
twice the forward. Layer norms, softmax and GELU are left out, as MFU
conventions do.
"""

from __future__ import annotations


def tower(tokens: int, d: int, depth: int, mlp_ratio: float) -> float:
  """Forward FLOPs of `depth` transformer blocks on `tokens` tokens of width d."""
  return depth * (2 * tokens * (4 * d * d + 2 * mlp_ratio * d * d) + 4 * tokens * tokens * d)


def mae(cfg, keep: int) -> float:
  """MAE pre-training (3x forward): patch embedding, encoder on 1 + keep
  tokens, decoder on 1 + L tokens, prediction head."""
  L, D, dd = cfg.num_patches, cfg.embed_dim, cfg.decoder_embed_dim
  fwd = (2 * L * cfg.patch_dim * D + tower(1 + keep, D, cfg.depth, cfg.mlp_ratio)
         + 2 * (1 + keep) * D * dd + tower(1 + L, dd, cfg.decoder_depth, cfg.decoder_ratio)
         + 2 * (1 + L) * dd * cfg.patch_dim)
  return 3.0 * fwd


def encoder(cfg, *, backward: bool) -> float:
  """The whole-image encoder: 3x forward when it trains, 1x when frozen."""
  fwd = (2 * cfg.num_patches * cfg.patch_dim * cfg.embed_dim
         + tower(1 + cfg.num_patches, cfg.embed_dim, cfg.depth, cfg.mlp_ratio))
  return (3.0 if backward else 1.0) * fwd
