"""timm's ViT files: its state-dict layout and its hub folder's config.json.

timm's `VisionTransformer` state dict uses the reference MAE names
(`cls_token`, `pos_embed` with the cls row, `patch_embed.proj`,
`blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, then `norm`, or
`fc_norm` when it averages tokens, and `head`), so its weights map like a MAE
`.pth`. What the keys cannot say (the pooling of a `norm` + `head`
classifier, head counts) is read from the hub folder's config.json when
there is one: `global_pool`, `num_classes`, `model_args`.

A timm folder is `config.json` (with an `architecture` entry: Hugging Face
configs have `architectures`) beside `model.safetensors` or
`pytorch_model.bin`. Export writes that folder, or the weights file alone.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from sbam_jax import files
from sbam_jax.convert import formats
from sbam_jax.convert.torch_io import ConvertError, read_json

WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def is_timm_folder(path: str) -> bool:
  cfg = files.join(path, "config.json")
  return files.isdir(path) and files.isfile(cfg) and "architecture" in read_json(cfg)


def weights_file(folder: str) -> str:
  for name in WEIGHTS:
    if files.isfile(files.join(folder, name)):
      return files.join(folder, name)
  raise ConvertError(f"{folder}: timm folder without weights: expected {' or '.join(WEIGHTS)} "
                     f"beside config.json")


def read_config(path: str) -> dict:
  """What a timm config.json says about pooling and heads, for `formats.detect`.

  Returns {'pool_hint': (pool, where) or None, 'num_heads': int or None}; only an
  explicit `global_pool` counts (timm's per-model defaults are not all 'token').
  """
  cfg = read_json(path)
  args = cfg.get("model_args") or {}
  pool = cfg.get("global_pool", args.get("global_pool"))
  hint = None
  if pool in ("avg", "token"):
    hint = (pool, f"{path} global_pool")
  elif pool:
    raise ConvertError(f"{path}: global_pool {pool!r}; supported: 'avg', 'token'")
  return {"pool_hint": hint, "num_heads": args.get("num_heads")}


def folder_hint(weights_path: str) -> Optional[dict]:
  """`read_config` of a timm config.json beside a weights file, if there is one."""
  cfg = files.join(files.dirname(files.abspath(weights_path)), "config.json")
  if files.isfile(cfg) and "architecture" in read_json(cfg):
    return read_config(cfg)
  return None


def export(sd: dict[str, np.ndarray], card: dict) -> tuple[dict[str, np.ndarray], list[str]]:
  """(timm state dict, notes): a pre-train model loses its decoder (timm has none)."""
  if card["kind"] == formats.PRETRAIN:
    enc = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
    return enc, [f"timm has no MAE decoder: wrote the encoder ({len(enc)} of {len(sd)} tensors)"]
  if card["kind"] not in (formats.ENCODER, formats.FINETUNED):
    raise ConvertError(f"a {card['kind']} checkpoint has no timm counterpart")
  return dict(sd), []


def config_for(card: dict, cfg, num_classes: int, global_pool: Optional[bool]) -> dict:
  """A timm hub config.json: `timm.create_model('hf-hub:...')` / `pretrained_cfg_overlay`
  builds a VisionTransformer with exactly these arguments."""
  pool = "avg" if global_pool else "token"
  args = {"img_size": cfg.img_size, "patch_size": cfg.patch_size, "embed_dim": cfg.embed_dim,
          "depth": cfg.depth, "num_heads": cfg.num_heads, "mlp_ratio": cfg.mlp_ratio,
          "in_chans": cfg.in_chans, "global_pool": pool, "class_token": True}
  out = {"architecture": "vit_base_patch16_224", "num_classes": num_classes,
         "num_features": cfg.embed_dim, "global_pool": pool, "model_args": args,
         "pretrained_cfg": {"num_classes": num_classes, "input_size": [cfg.in_chans, cfg.img_size,
                                                                      cfg.img_size],
                            "interpolation": "bicubic", "crop_pct": 0.875, "mean": list(_MEAN),
                            "std": list(_STD), "first_conv": "patch_embed.proj",
                            "classifier": "head"}}
  if card.get("classes"):
    out["label_names"] = [str(c) for c in card["classes"]]
  return out
