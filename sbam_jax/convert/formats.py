"""The PyTorch checkpoint kinds users hold, recognised from keys and shapes.

  pretrain   full MAE pre-train model with decoder (SBAM releases, MAE *_full /
             visualize files, training checkpoints' 'model')  -> MaskedAutoencoder
  encoder    encoder-only pre-train (MAE's mae_pretrain_vit_*.pth)  -> Encoder
  finetuned  classifier with 'head': global pool ('fc_norm', no 'norm') or
             cls token ('norm')  -> VisionTransformer (timm's ViT layout too)

The architecture comes from shapes (width, depth, patch, grid, MLP ratio);
head counts are not in the weights, so they come from the standard sizes
(768 -> 12, 1024 / 1280 -> 16; decoder 512 -> 16; tiny 64 / 32 -> 4) or a flag.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping, Optional

import numpy as np

from sbam_jax.convert.torch_io import ConvertError
from sbam_jax.models.pos_embed import resample_pos_embed  # noqa: F401  (re-exported)
from sbam_jax.models.sizes import ModelConfig, model_config

PRETRAIN, ENCODER, FINETUNED = "pretrain", "encoder", "finetuned"
KINDS = (PRETRAIN, ENCODER, FINETUNED)
_HEADS = {64: 4, 192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # 64: this project's tiny
_DECODER_HEADS = {32: 4, 512: 16}


@dataclasses.dataclass(frozen=True)
class Detected:
  kind: str
  config: ModelConfig
  num_classes: int = 0
  global_pool: bool = True

  def describe(self) -> str:
    c = self.config
    text = (f"{self.kind}: ViT patch {c.patch_size}, width {c.embed_dim}, depth {c.depth}, "
            f"{c.num_heads} heads, {c.img_size}px ({c.grid_size}x{c.grid_size} grid)")
    if self.kind == PRETRAIN:
      text += (f"; decoder width {c.decoder_embed_dim}, depth {c.decoder_depth}, "
               f"{c.decoder_num_heads} heads")
    if self.kind == FINETUNED:
      text += f"; {self.num_classes} classes, {'global pool' if self.global_pool else 'cls token'}"
    return text


def _depth(sd, prefix):
  ids = {int(m.group(1)) for k in sd for m in [re.match(rf"{prefix}\.(\d+)\.", k)] if m}
  return max(ids) + 1 if ids else 0


def detect(sd: Mapping[str, np.ndarray], *, kind: Optional[str] = None,
           num_heads: Optional[int] = None, decoder_num_heads: Optional[int] = None) -> Detected:
  """What a reference state dict holds; `kind` / head counts override detection."""
  if kind is None:
    if "decoder_embed.weight" in sd or "mask_token" in sd:
      kind = PRETRAIN
    elif "head.weight" in sd:
      kind = FINETUNED
    elif "cls_token" in sd and "blocks.0.attn.qkv.weight" in sd:
      kind = ENCODER
    else:
      raise ConvertError("not a ViT / MAE state dict: no cls_token + blocks.0.attn.qkv.weight; "
                         f"first keys: {', '.join(list(sd)[:8])}")
  if kind not in KINDS:
    raise ConvertError(f"unknown kind {kind!r}; choose from {KINDS}")
  for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
    if key not in sd:
      raise ConvertError(f"state dict lacks {key!r}: not a {kind} ViT checkpoint")
  d = sd["cls_token"].shape[-1]
  patch_w = sd["patch_embed.proj.weight"]
  if patch_w.ndim != 4 or patch_w.shape[2] != patch_w.shape[3]:
    raise ConvertError(f"patch_embed.proj.weight has shape {patch_w.shape}, expected (D, C, p, p)")
  p, chans = patch_w.shape[-1], patch_w.shape[1]
  tokens = sd["pos_embed"].shape[1] - 1
  grid = math.isqrt(tokens)
  if grid * grid != tokens:
    raise ConvertError(f"pos_embed has {tokens} patch rows, not a square grid")
  heads = num_heads or _HEADS.get(d)
  if heads is None:
    raise ConvertError(f"width {d} is not a standard size: pass --num-heads")
  fields = dict(img_size=grid * p, patch_size=p, embed_dim=d, depth=_depth(sd, "blocks"),
                num_heads=heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / d,
                in_chans=chans)
  if kind == PRETRAIN:
    dd = sd["decoder_embed.weight"].shape[0]
    dheads = decoder_num_heads or _DECODER_HEADS.get(dd)
    if dheads is None:
      raise ConvertError(f"decoder width {dd} is not a standard size: pass --decoder-num-heads")
    fields.update(decoder_embed_dim=dd, decoder_depth=_depth(sd, "decoder_blocks"),
                  decoder_num_heads=dheads)
  cfg = model_config("base", **fields)
  if kind == FINETUNED:
    return Detected(kind, cfg, num_classes=int(sd["head.weight"].shape[0]),
                    global_pool="fc_norm.weight" in sd)
  return Detected(kind, cfg)


def build_model(det: Detected, seed: int = 0, abstract: bool = True):
  """The NNX module a detected checkpoint maps onto (shapes only by default)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sbam_jax.models import Encoder, MaskedAutoencoder, VisionTransformer  # pylint: disable=g-import-not-at-top

  def make():
    rngs = nnx.Rngs(seed)
    if det.kind == PRETRAIN:
      return MaskedAutoencoder(det.config, rngs=rngs)
    if det.kind == ENCODER:
      return Encoder(det.config, rngs=rngs)
    return VisionTransformer(det.config, det.num_classes, global_pool=det.global_pool, rngs=rngs)

  return nnx.eval_shape(make) if abstract else make()


def template(det: Detected) -> dict:
  """Nested dict of shapes for `params_from_torch`."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx.to_pure_dict(nnx.state(build_model(det)))
