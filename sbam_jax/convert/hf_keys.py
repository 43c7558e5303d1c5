"""Hugging Face ViT / ViT-MAE key names <-> the reference (MAE / timm) key names.

Two generations of names are in use. Files written by `save_pretrained` (and
every checkpoint on the hub) use the transformers 4.x names, which
transformers 5.x still writes on disk and renames on load:

    vit.encoder.layer.3.attention.attention.{query,key,value}.weight
    vit.encoder.layer.3.attention.output.dense.weight
    vit.encoder.layer.3.intermediate.dense.weight / .output.dense.weight

while a transformers 5.x module's own `state_dict()` uses

    vit.layers.3.attention.{q,k,v}_proj.weight, .attention.o_proj.weight,
    vit.layers.3.mlp.fc1.weight / .mlp.fc2.weight

(decoder layers are `decoder.decoder_layers.i.` in both, with the same block
names; transformers 5.x's save_pretrained writes them as
`decoder.decoder_encoder.layer.i.`, its renaming of `layers.` applied inside
`decoder_layers.`). All are read; 4.x names are written, which both
generations load.
The separate q, k, v projections are the rows of the reference's fused qkv
(q first), so mapping is concatenation / splitting: bit-exact both ways.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from sbam_jax.convert.torch_io import ConvertError

V4, V5 = "4.x", "5.x"
# Block parts: reference name -> (4.x name, 5.x name).
_BLOCK = {"attn.proj": ("attention.output.dense", "attention.o_proj"),
          "mlp.fc1": ("intermediate.dense", "mlp.fc1"),
          "mlp.fc2": ("output.dense", "mlp.fc2"),
          "norm1": ("layernorm_before", "layernorm_before"),
          "norm2": ("layernorm_after", "layernorm_after")}
_QKV = {V4: ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
        V5: ("attention.q_proj", "attention.k_proj", "attention.v_proj")}
_LAYERS = {V4: "encoder.layer", V5: "layers"}
# Encoder-side parts (under the `vit.` prefix in the task models).
_ENCODER = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
            "patch_embed.proj": "embeddings.patch_embeddings.projection", "norm": "layernorm"}
# Parts outside the encoder (no prefix).
_OUTER = {"mask_token": "decoder.mask_token", "decoder_pos_embed": "decoder.decoder_pos_embed",
          "decoder_embed": "decoder.decoder_embed", "decoder_norm": "decoder.decoder_norm",
          "decoder_pred": "decoder.decoder_pred", "head": "classifier"}
# Present in some Hugging Face models, used by none of this project's.
DROPPED = ("pooler.", "embeddings.mask_token")
_BLOCK_RE = re.compile(r"^(encoder\.layer|layers|decoder\.decoder_layers"
                       r"|decoder\.decoder_encoder\.layer)\.(\d+)\.(.+)\.(weight|bias)$")


def _split_suffix(key: str) -> tuple[str, str]:
  base, _, last = key.rpartition(".")
  return (base, "." + last) if last in ("weight", "bias") else (key, "")


def layout_of(hf_sd: Mapping[str, np.ndarray]) -> str:
  """V4 or V5, from the names of the encoder's layers."""
  if any(".encoder.layer." in "." + k or ".attention.attention." in k for k in hf_sd):
    return V4
  return V5


def to_reference(hf_sd: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
  """Hugging Face state dict (either layout) -> (reference state dict, dropped keys)."""
  out, qkv, dropped, unknown = {}, {}, [], []
  inverse = {hf: ref for ref, names in _BLOCK.items() for hf in names}
  parts = {hf: i for names in _QKV.values() for i, hf in enumerate(names)}
  for key, value in hf_sd.items():
    name = key[4:] if key.startswith("vit.") else key
    m = _BLOCK_RE.match(name)
    if m:
      stack = "decoder_blocks" if m.group(1).startswith("decoder") else "blocks"
      prefix, inner, suffix = f"{stack}.{m.group(2)}", m.group(3), m.group(4)
      if inner in parts:
        qkv.setdefault(f"{prefix}.attn.qkv.{suffix}", {})[parts[inner]] = value
      elif inner in inverse:
        out[f"{prefix}.{inverse[inner]}.{suffix}"] = value
      else:
        unknown.append(key)
      continue
    base, suffix = _split_suffix(name)
    ref = ({v: k for k, v in _ENCODER.items()} | {v: k for k, v in _OUTER.items()}).get(base)
    if ref is not None:
      out[ref + suffix] = value
    elif name.startswith(DROPPED):
      dropped.append(key)
    else:
      unknown.append(key)
  if unknown:
    raise ConvertError(f"not a ViT / ViT-MAE Hugging Face model: unknown keys "
                       f"{', '.join(sorted(unknown)[:8])}")
  for key, pieces in qkv.items():
    if sorted(pieces) != [0, 1, 2]:
      raise ConvertError(f"{key}: the query, key and value projections are not all present")
    out[key] = np.concatenate([pieces[0], pieces[1], pieces[2]], axis=0)
  return out, dropped


def from_reference(sd: Mapping[str, np.ndarray], *, prefix: str = "vit.",
                   layout: str = V4) -> dict[str, np.ndarray]:
  """Reference state dict -> Hugging Face names (`prefix` on the encoder part:
  'vit.' in ViTMAEForPreTraining / ViTForImageClassification, '' in ViTMAEModel)."""
  out = {}
  for key, value in sd.items():
    m = re.match(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$", key)
    if m:
      dec = m.group(1) == "decoder_blocks"
      layers = "decoder.decoder_layers" if dec else prefix + _LAYERS[layout]
      head, inner, suffix = f"{layers}.{m.group(2)}", m.group(3), m.group(4)
      if inner == "attn.qkv":
        for name, piece in zip(_QKV[layout], np.split(np.asarray(value), 3, axis=0)):
          out[f"{head}.{name}.{suffix}"] = piece
      else:
        out[f"{head}.{_BLOCK[inner][0 if layout == V4 else 1]}.{suffix}"] = value
      continue
    base, suffix = _split_suffix(key)
    if base in _ENCODER:
      out[prefix + _ENCODER[base] + suffix] = value
    elif base in _OUTER:
      out[_OUTER[base] + suffix] = value
    else:
      raise ConvertError(f"{key} has no Hugging Face counterpart")
  return out
