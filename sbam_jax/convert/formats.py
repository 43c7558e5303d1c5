"""The PyTorch checkpoint kinds users hold, recognised from keys and shapes.

  pretrain   full MAE pre-train model with decoder (SBAM releases, MAE *_full /
             visualize files, training checkpoints' 'model')  -> MaskedAutoencoder
  encoder    encoder-only pre-train (MAE's mae_pretrain_vit_*.pth)  -> Encoder
  finetuned  classifier with 'head': global pool ('fc_norm', no 'norm') or
             cls token ('norm')  -> VisionTransformer (timm's ViT layout too)

The architecture comes from shapes (width, depth, patch, grid, MLP ratio);
head counts are not in the weights, so they come from the standard sizes
(768 -> 12, 1024 / 1280 -> 16; decoder 512 -> 16; tiny 64 / 32 -> 4), a flag,
or a Hugging Face config.json. The decoder's MLP width is read from its own
shapes.

A classifier's pooling is read from its keys when they tell: `fc_norm` (and
no `norm`) is the global-pool head. `norm` + `head` is ambiguous: MAE's and
timm's cls-token head, or timm's `global_pool='avg', fc_norm=False` (norm on
every token, then the mean), whose logits differ. Then the pooling must come
from `--global-pool`, the checkpoint's training `args`, or a config beside
the weights; detection refuses, naming the flag, when none says.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping, Optional

import numpy as np

from sbam_jax.convert.torch_io import ConvertError
from sbam_jax.models.pos_embed import resample_pos_embed
from sbam_jax.models.sizes import ModelConfig, model_config

# resample_pos_embed lives in models.pos_embed; readers and tests reach it here
# too, as the converters' step that fits a table to another image size.
__all__ = ["PRETRAIN", "ENCODER", "FINETUNED", "KINDS", "AVG", "TOKEN", "POOLS", "Detected",
           "classifier_pool", "detect", "build_model", "template", "resample_pos_embed"]

PRETRAIN, ENCODER, FINETUNED = "pretrain", "encoder", "finetuned"
KINDS = (PRETRAIN, ENCODER, FINETUNED)
AVG, TOKEN = "avg", "token"
POOLS = (AVG, TOKEN)
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


def classifier_pool(sd: Mapping[str, np.ndarray], global_pool: Optional[str],
                    hint: Optional[tuple[str, str]] = None) -> bool:
  """True for global-pool (mean of patch tokens, fc_norm), False for cls token.

  `global_pool` is the user's flag; `hint` = (pool, where it was read) from
  the checkpoint's own metadata. Refuses when the weights cannot tell and
  nothing else does, and when a stated pooling contradicts the keys.
  """
  has_fc, has_norm = "fc_norm.weight" in sd, "norm.weight" in sd
  stated, where = (global_pool, "--global-pool") if global_pool else (hint or (None, None))
  if has_fc and not has_norm:
    if stated == TOKEN:
      raise ConvertError(f"{where} token contradicts the weights: they hold 'fc_norm' (a "
                         f"global-pool head, no final 'norm'); use --global-pool avg")
    return True
  if not has_norm or has_fc:
    raise ConvertError("classifier has neither 'fc_norm' nor 'norm' (or both): not a MAE / timm "
                       "ViT classifier layout")
  if stated is None:
    raise ConvertError("the weights cannot tell the pooling: keys 'norm' + 'head' are a cls-token "
                       "classifier (MAE --cls_token, timm global_pool='token', Hugging Face) or "
                       "timm global_pool='avg' with fc_norm=False; pass --global-pool token or "
                       "--global-pool avg")
  if stated == AVG:
    raise ConvertError(f"{where} avg with keys 'norm' + 'head' is timm's global_pool='avg', "
                       f"fc_norm=False (norm on every token, then the mean): this project's "
                       f"VisionTransformer pools either cls token after 'norm' or the mean "
                       f"through 'fc_norm', so it cannot run these weights unchanged")
  return False


def _mlp_ratio(sd, prefix: str, width: int) -> float:
  return sd[f"{prefix}.0.mlp.fc1.weight"].shape[0] / width


def detect(sd: Mapping[str, np.ndarray], *, kind: Optional[str] = None,
           num_heads: Optional[int] = None, decoder_num_heads: Optional[int] = None,
           global_pool: Optional[str] = None,
           pool_hint: Optional[tuple[str, str]] = None) -> Detected:
  """What a reference state dict holds; `kind` / head counts / pooling override detection."""
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
  ratio = _mlp_ratio(sd, "blocks", d)
  fields = dict(img_size=grid * p, patch_size=p, embed_dim=d, depth=_depth(sd, "blocks"),
                num_heads=heads, mlp_ratio=ratio, in_chans=chans)
  if kind == PRETRAIN:
    fields.update(_decoder_fields(sd, decoder_num_heads, ratio))
  try:
    cfg = model_config("base", **fields)
  except ValueError as e:
    raise ConvertError(f"architecture read from the weights is not buildable: {e}") from None
  if kind == FINETUNED:
    return Detected(kind, cfg, num_classes=int(sd["head.weight"].shape[0]),
                    global_pool=classifier_pool(sd, global_pool, pool_hint))
  return Detected(kind, cfg)


def _decoder_fields(sd, decoder_num_heads: Optional[int], encoder_ratio: float) -> dict:
  """Decoder width, depth, heads; its MLP width read from its own fc1."""
  if "decoder_embed.weight" not in sd or "decoder_blocks.0.mlp.fc1.weight" not in sd:
    raise ConvertError("pre-train state dict lacks decoder_embed / decoder_blocks.0: a truncated "
                       "decoder? pass --kind encoder to keep the encoder only")
  dd = sd["decoder_embed.weight"].shape[0]
  dheads = decoder_num_heads or _DECODER_HEADS.get(dd)
  if dheads is None:
    raise ConvertError(f"decoder width {dd} is not a standard size: pass --decoder-num-heads")
  dratio = _mlp_ratio(sd, "decoder_blocks", dd)
  return dict(decoder_embed_dim=dd, decoder_depth=_depth(sd, "decoder_blocks"),
              decoder_num_heads=dheads,
              decoder_mlp_ratio=None if dratio == encoder_ratio else dratio)


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
