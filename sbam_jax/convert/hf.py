"""Hugging Face folders (config.json + weights) of ViT-MAE and ViT models, both ways.

Read: `ViTMAEForPreTraining` (-> pretrain), `ViTMAEModel` / `ViTModel`
(-> encoder), `ViTForImageClassification` (-> cls-token classifier: the
model pools `layernorm(x)[:, 0]`). The architecture, head counts included,
comes from config.json; the weights are checked against it. Weights are
`model.safetensors`, `pytorch_model.bin` (safe loader), or either sharded
with its `.index.json`.

Write: a folder `from_pretrained` loads with no missing or unexpected keys:
`ViTMAEForPreTraining` for a pre-train model, `ViTMAEModel` for an encoder,
`ViTForImageClassification` for a cls-token classifier (Hugging Face has no
global-pool ViT head: such a classifier is refused, timm's format holds it).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from sbam_jax import files
from sbam_jax.convert import formats, hf_keys
from sbam_jax.convert.torch_io import (ConvertError, load_pth, load_safetensors, read_json,
                                       state_dict_of)
from sbam_jax.models.layers import LN_EPS

ARCHS = {"ViTMAEForPreTraining": formats.PRETRAIN, "ViTMAEModel": formats.ENCODER,
         "ViTModel": formats.ENCODER, "ViTForImageClassification": formats.FINETUNED}
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json")


def is_hf_folder(path: str) -> bool:
  cfg = files.join(path, "config.json")
  return files.isdir(path) and files.isfile(cfg) and "architecture" not in read_json(cfg)


def _load_weights(folder: str) -> dict[str, np.ndarray]:
  for name in _WEIGHTS:
    path = files.join(folder, name)
    if not files.isfile(path):
      continue
    if name.endswith(".index.json"):
      shards = sorted(set(read_json(path).get("weight_map", {}).values()))
      sd = {}
      for shard in shards:
        sd.update(_load_file(files.join(folder, shard)))
      return sd
    return _load_file(path)
  raise ConvertError(f"{folder}: Hugging Face folder without weights: expected one of "
                     f"{', '.join(_WEIGHTS)} beside config.json")


def _load_file(path: str) -> dict[str, np.ndarray]:
  if path.endswith(".safetensors"):
    return state_dict_of(load_safetensors(path), path)
  return state_dict_of(load_pth(path), path)


def _square(value, name: str, path: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ConvertError(f"{path}: {name} {value} is not square; only square images are supported")
    value = value[0]
  return int(value)


def _arch(cfg: dict, path: str) -> str:
  archs = cfg.get("architectures") or []
  arch = next((a for a in archs if a in ARCHS), None)
  if arch is None:
    model_type = cfg.get("model_type")
    arch = {"vit_mae": "ViTMAEForPreTraining", "vit": "ViTModel"}.get(model_type)
    if arch is None:
      raise ConvertError(f"{path}: config.json describes {archs or model_type!r}; supported: "
                         f"{', '.join(ARCHS)}")
  return arch


def read_folder(path: str, global_pool: Optional[str] = None
                ) -> tuple[dict[str, np.ndarray], formats.Detected, list[str]]:
  """(reference state dict, what it is, notes to print) of a Hugging Face folder;
  a classifier pools the cls token (`global_pool` may only confirm it)."""
  cfg = read_json(files.join(path, "config.json"))
  arch = _arch(cfg, path)
  act = cfg.get("hidden_act", "gelu")
  if act != "gelu" or not cfg.get("qkv_bias", True):
    raise ConvertError(f"{path}: hidden_act {act!r}, qkv_bias {cfg.get('qkv_bias')}: this "
                       f"project's ViT uses exact GELU ('gelu') and qkv biases")
  hf_sd = _load_weights(path)
  layout = hf_keys.layout_of(hf_sd)
  sd, dropped = hf_keys.to_reference(hf_sd)
  kind = ARCHS[arch]
  if kind == formats.ENCODER:
    sd = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token", "head"))}
  det = formats.detect(sd, kind=kind, num_heads=int(cfg["num_attention_heads"]),
                       decoder_num_heads=cfg.get("decoder_num_attention_heads"),
                       global_pool=global_pool,
                       pool_hint=(formats.TOKEN, f"{path} (ViTForImageClassification)"))
  _check_config(cfg, det, path)
  c = det.config
  norm_pix = bool(cfg.get("norm_pix_loss", c.norm_pix_loss)) if kind == formats.PRETRAIN else True
  det = formats.Detected(det.kind, dataclasses.replace(c, norm_pix_loss=norm_pix),
                         det.num_classes, det.global_pool)
  notes = [f"Hugging Face {arch} (transformers {layout} key names)"]
  if dropped:
    notes.append(f"not carried (no counterpart in this project's models): {', '.join(dropped)}")
  eps = float(cfg.get("layer_norm_eps", 1e-12))
  if eps != LN_EPS:
    notes.append(f"config.json layer_norm_eps {eps:g}; this project's LayerNorms use {LN_EPS:g} "
                 f"(as MAE / timm): outputs differ slightly where a token's variance is tiny")
  return sd, det, notes


def _check_config(cfg: dict, det: formats.Detected, path: str) -> None:
  """config.json and the weights' shapes must describe the same model."""
  c = det.config
  want = {"hidden_size": c.embed_dim, "num_hidden_layers": c.depth,
          "intermediate_size": int(round(c.mlp_ratio * c.embed_dim)),
          "patch_size": c.patch_size, "num_channels": c.in_chans}
  if det.kind == formats.PRETRAIN:
    want.update(decoder_hidden_size=c.decoder_embed_dim,
                decoder_num_hidden_layers=c.decoder_depth,
                decoder_intermediate_size=int(round(c.decoder_ratio * c.decoder_embed_dim)))
  bad = [f"{k} {cfg[k]} vs {v} in the weights" for k, v in want.items()
         if k in cfg and _square(cfg[k], k, path) != v]
  if "image_size" in cfg and _square(cfg["image_size"], "image_size", path) != c.img_size:
    bad.append(f"image_size {cfg['image_size']} vs {c.img_size} from the position table")
  if bad:
    raise ConvertError(f"{path}: config.json does not match the weights: {'; '.join(bad)}")


def config_for(card: dict, kind: str, cfg, num_classes: int = 0) -> dict:
  """config.json of the Hugging Face model an exported checkpoint becomes."""
  out = {"hidden_size": cfg.embed_dim, "num_hidden_layers": cfg.depth,
         "num_attention_heads": cfg.num_heads,
         "intermediate_size": int(round(cfg.mlp_ratio * cfg.embed_dim)),
         "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
         "initializer_range": 0.02, "layer_norm_eps": LN_EPS, "image_size": cfg.img_size,
         "patch_size": cfg.patch_size, "num_channels": cfg.in_chans, "qkv_bias": True}
  if kind == formats.FINETUNED:
    names = card.get("classes") or [f"LABEL_{i}" for i in range(num_classes)]
    out.update(model_type="vit", architectures=["ViTForImageClassification"],
               id2label={str(i): str(n) for i, n in enumerate(names)},
               label2id={str(n): i for i, n in enumerate(names)})
    return out
  out.update(model_type="vit_mae", mask_ratio=0.75, norm_pix_loss=bool(cfg.norm_pix_loss),
             decoder_hidden_size=cfg.decoder_embed_dim,
             decoder_num_hidden_layers=cfg.decoder_depth,
             decoder_num_attention_heads=cfg.decoder_num_heads,
             decoder_intermediate_size=int(round(cfg.decoder_ratio * cfg.decoder_embed_dim)),
             architectures=["ViTMAEForPreTraining" if kind == formats.PRETRAIN
                            else "ViTMAEModel"])
  return out


def export(sd: dict[str, np.ndarray], card: dict, cfg, *,
           layout: Optional[str] = None) -> tuple[dict[str, np.ndarray], dict]:
  """(Hugging Face state dict, config.json) of a reference state dict."""
  kind = card["kind"]
  if kind == formats.FINETUNED and card.get("global_pool", True):
    raise ConvertError("this classifier pools the mean of patch tokens (fc_norm); Hugging Face's "
                       "ViTForImageClassification pools the cls token, so it cannot hold it: "
                       "export with --format timm (or mae) instead")
  if kind not in (formats.PRETRAIN, formats.ENCODER, formats.FINETUNED):
    raise ConvertError(f"a {kind} checkpoint has no Hugging Face counterpart")
  prefix = "" if kind == formats.ENCODER else "vit."
  hf_sd = hf_keys.from_reference(sd, prefix=prefix, layout=layout or hf_keys.V4)
  return hf_sd, config_for(card, kind, cfg, int(card.get("num_classes", 0)))
