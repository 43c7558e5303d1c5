"""The MAE pre-training model (He et al.), with SBAM choosing what it hides.

Shape of the computation, as in facebookresearch/mae `models_mae.py`:
embed_patches -> mask plan -> forward_encoder (kept tokens + cls) ->
forward_decoder (mask tokens, un-shuffle, predict pixels) -> forward_loss.

The encoder runs on a static number of slots (`capacity`). Slots past a
sample's keep length are padding: no real token attends to them (key
lengths), the decoder replaces them by the mask token, and the loss counts
them as masked, so results equal a variable-length run exactly. With a
`packing.PackSpec` the kept tokens are packed end to end instead (no padding
in the per-token work, see `packing`); the decoder sees the same latent.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from sbam_jax import masking
from sbam_jax.models import packing
from sbam_jax.models.layers import (BlockStack, FixedEmbed, PatchEmbed, dense, layer_norm,
                                    patchify)
from sbam_jax.models.pos_embed import sincos_2d
from sbam_jax.models.sizes import ModelConfig

NORM_PIX_EPS = 1e-6
_token_init = nnx.initializers.normal(0.02)


class Encoder(nnx.Module):
  """ViT encoder shared by MAE and the classifier: patch embedding, cls token,
  position table (fixed sin-cos for MAE, learned for fine-tuning), blocks, norm."""

  def __init__(self, cfg: ModelConfig, *, learned_pos: bool = False, final_norm: bool = True,
               rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.compute_dtype)
    d = cfg.embed_dim
    self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, d, dtype, rngs=rngs)
    self.cls_token = nnx.Param(_token_init(rngs.params(), (1, 1, d), jnp.float32))
    table = jnp.asarray(sincos_2d(d, cfg.grid_size))[None]
    self.pos_embed = nnx.Param(table) if learned_pos else FixedEmbed(table)
    self.blocks = BlockStack(cfg.depth, d, cfg.num_heads, cfg.mlp_ratio, dtype=dtype,
                             impl=cfg.attention, scan=cfg.scan_layers, remat=cfg.remat, rngs=rngs)
    # MAE's global-pool classifier deletes `norm` (it uses `fc_norm`).
    self.norm = layer_norm(d, rngs) if final_norm else None

  def embed_patches(self, imgs: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, L, D): patch embedding + position table, no cls.
    These are the tokens SBAM computes salience from."""
    return self.patch_embed(imgs) + self.pos_embed[...][:, 1:]

  def pooled_features(self, imgs: jax.Array) -> dict:
    """All patches encoded, nothing masked: {'cls': the cls token after the
    final norm (what MAE's linear probe reads), 'mean': the mean of the patch
    tokens out of the blocks (MAE's global pool)}, each (N, D)."""
    x = self.blocks(self.with_cls(self.embed_patches(imgs)))
    cls = (self.norm(x) if self.norm is not None else x)[:, 0]
    return {"cls": cls.astype(jnp.float32), "mean": x[:, 1:].mean(axis=1).astype(jnp.float32)}

  def with_cls(self, x: jax.Array) -> jax.Array:
    cls = self.cls_token[...] + self.pos_embed[...][:, :1]
    return jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])), x], axis=1)


class MAEOutput(NamedTuple):
  loss: jax.Array          # scalar
  pred: jax.Array          # (N, L, p*p*C), in the (normalised) target space
  mask: jax.Array          # (N, L), 1 = masked
  latent: jax.Array        # (N, 1 + capacity, D); rows past 1 + len_keep are padding
  plan: masking.MaskPlan
  salience: Optional[jax.Array]  # (N, L) for SBAM, None for random masking


class MaskedAutoencoder(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = jnp.dtype(cfg.compute_dtype)
    dd = cfg.decoder_embed_dim
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder_embed = dense(cfg.embed_dim, dd, dtype, rngs)
    self.mask_token = nnx.Param(_token_init(rngs.params(), (1, 1, dd), jnp.float32))
    self.decoder_pos_embed = FixedEmbed(jnp.asarray(sincos_2d(dd, cfg.grid_size))[None])
    self.decoder_blocks = BlockStack(cfg.decoder_depth, dd, cfg.decoder_num_heads, cfg.decoder_ratio,
                                     dtype=dtype, impl=cfg.attention, scan=cfg.scan_layers,
                                     remat=cfg.remat, rngs=rngs)
    self.decoder_norm = layer_norm(dd, rngs)
    self.decoder_pred = dense(dd, cfg.patch_dim, dtype, rngs)

  def patchify(self, imgs: jax.Array) -> jax.Array:
    return patchify(imgs, self.cfg.patch_size)

  def embed_patches(self, imgs: jax.Array) -> jax.Array:
    return self.encoder.embed_patches(imgs)

  def forward_encoder(self, tokens: jax.Array, plan: masking.MaskPlan, capacity: int,
                      pack: Optional[packing.PackSpec] = None) -> jax.Array:
    """Encode the first `capacity` slots of the plan (+ cls) -> (N, 1 + capacity, D).
    With `pack`, only each image's 1 + len_keep tokens are computed (packed)."""
    enc = self.encoder
    x = jnp.take_along_axis(tokens, plan.ids_keep(capacity)[..., None], axis=1)
    x = enc.with_cls(x)
    padded = not (plan.min_keep == plan.max_keep == capacity)
    if pack is not None and padded:
      graphdef, blocks = nnx.split(enc.blocks)
      norm_def, norm = nnx.split(enc.norm)
      run = lambda p, h, layout: nnx.merge(norm_def, p[1])(
          nnx.merge(graphdef, p[0])(h, layout=layout))
      return packing.run_packed(run, (blocks, norm), x, plan.len_keep + 1, pack)
    kv_len = plan.len_keep + 1 if padded else None
    return enc.norm(enc.blocks(x, kv_len))

  def forward_decoder(self, latent: jax.Array, plan: masking.MaskPlan) -> jax.Array:
    """Latent (N, 1 + K, D) -> pixel predictions (N, L, p*p*C)."""
    n, t, _ = latent.shape
    capacity, L = t - 1, plan.ids_restore.shape[1]
    x = self.decoder_embed(latent).astype(jnp.float32)
    mask_token = self.mask_token[...].astype(x.dtype)
    valid = plan.keep_valid(capacity)[..., None]
    visible = jnp.where(valid, x[:, 1:], mask_token)
    rest = jnp.broadcast_to(mask_token, (n, L - capacity, x.shape[-1]))
    x_ = jnp.concatenate([visible, rest], axis=1)
    x_ = jnp.take_along_axis(x_, plan.ids_restore[..., None], axis=1)
    x = jnp.concatenate([x[:, :1], x_], axis=1) + self.decoder_pos_embed[...]
    x = self.decoder_norm(self.decoder_blocks(x))
    return self.decoder_pred(x)[:, 1:].astype(jnp.float32)

  def forward_loss(self, imgs: jax.Array, pred: jax.Array, mask: jax.Array) -> jax.Array:
    """MSE per patch (mean over pixels), averaged over masked patches.
    Norm-pix targets use the unbiased per-patch variance, as torch.var does."""
    target = self.patchify(imgs).astype(jnp.float32)
    if self.cfg.norm_pix_loss:
      mean = target.mean(axis=-1, keepdims=True)
      var = target.var(axis=-1, keepdims=True, ddof=1)
      target = (target - mean) / jnp.sqrt(var + NORM_PIX_EPS)
    per_patch = ((pred - target) ** 2).mean(axis=-1)
    return (per_patch * mask).sum() / mask.sum()

  def forward_with_plan(self, imgs: jax.Array, plan: masking.MaskPlan,
                        capacity: Optional[int] = None, *, tokens: Optional[jax.Array] = None,
                        salience: Optional[jax.Array] = None,
                        pack: Optional[packing.PackSpec] = None) -> MAEOutput:
    """Everything after masking. `capacity` (static) defaults to the plan's
    largest keep length and must hold every sample's len_keep (bucketed
    capacities come from `masking.choose_capacity`); `pack` packs the
    encoder's tokens (its last budget must hold the batch at `capacity`)."""
    L = plan.ids_shuffle.shape[1]
    capacity = plan.max_keep if capacity is None else int(capacity)
    if not plan.min_keep <= capacity <= L:
      raise ValueError(f"capacity {capacity} is outside [{plan.min_keep}, {L}] for this plan")
    tokens = self.embed_patches(imgs) if tokens is None else tokens
    latent = self.forward_encoder(tokens, plan, capacity, pack)
    pred = self.forward_decoder(latent, plan)
    loss = self.forward_loss(imgs, pred, plan.mask)
    return MAEOutput(loss, pred, plan.mask, latent, plan, salience)

  def make_plan(self, imgs: jax.Array, spec: masking.MaskingSpec, rng: Optional[jax.Array],
                noise: Optional[jax.Array] = None):
    """(plan, salience) for a batch: salience is computed from embed_patches."""
    return masking.make_mask_plan(spec, self.embed_patches(imgs), rng, noise=noise)

  def __call__(self, imgs: jax.Array, rng: Optional[jax.Array], spec: masking.MaskingSpec, *,
               capacity: Optional[int] = None, noise: Optional[jax.Array] = None,
               pack: Optional[packing.PackSpec] = None,
               salience: Optional[jax.Array] = None) -> MAEOutput:
    """Full pre-training forward: mask with `spec`, encode, decode, loss.

    imgs: (N, H, W, C) normalised images. capacity: static encoder slots; by
    default the largest keep length `spec` allows (no host sync). pack: pack
    the encoder's tokens. salience: (N, L) already computed from these images
    and parameters (a pre-pass), used instead of computing it again.
    """
    tokens = self.embed_patches(imgs)
    plan, salience = masking.make_mask_plan(spec, tokens, rng, noise=noise, salience=salience)
    return self.forward_with_plan(imgs, plan, capacity, tokens=tokens, salience=salience,
                                  pack=pack)
