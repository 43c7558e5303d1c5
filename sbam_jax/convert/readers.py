"""Any supported checkpoint -> (reference state dict, what it is) -> this project's tree.

One entry point, `read_source`, takes a path and decides by what is there:
a `.pth` / `.safetensors` file (MAE or timm names), a Hugging Face folder,
or a timm folder. Everything is brought to the reference (MAE / timm) key
names first, so detection and the parameter mapping are shared.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from sbam_jax import files
from sbam_jax.convert import formats, hf, timm_layout
from sbam_jax.convert.optimizer import adamw_moments
from sbam_jax.checkpoints import CARD as CARD_NAME
from sbam_jax.convert.torch_io import ConvertError, load_checkpoint, state_dict_of
from sbam_jax.convert.torch_keys import params_from_torch

_EXPECTED = ("to-jax reads a .pth or .safetensors file, or a Hugging Face / timm folder "
             "(config.json beside model.safetensors or pytorch_model.bin)")


@dataclasses.dataclass
class Source:
  path: str
  state_dict: dict[str, np.ndarray]
  detected: formats.Detected
  notes: list[str]
  raw: Any = None  # the loaded .pth object (optimizer, epoch), when there is one
  fmt: str = "pth"


def _args_pool(obj: Any, path: str) -> Optional[tuple[str, str]]:
  """MAE's main_finetune records `global_pool` (False with --cls_token) in args."""
  args = obj.get("args") if isinstance(obj, dict) else None
  value = getattr(args, "global_pool", None)
  if isinstance(value, bool):
    return (formats.AVG if value else formats.TOKEN), f"{path} args.global_pool={value}"
  return None


def _hf_named(sd) -> bool:
  return any(k.startswith(("vit.", "embeddings.", "encoder.layer.", "layers.", "decoder.decoder_"))
             or ".attention.attention." in k for k in sd)


def _read_file(path: str, folder_cfg: Optional[dict], **kw) -> Source:
  obj, fmt = load_checkpoint(path)
  sd = state_dict_of(obj, path)
  if _hf_named(sd):
    raise ConvertError(f"{path} holds Hugging Face key names; pass its folder (with config.json, "
                       f"which gives the head counts) instead of the weights file")
  hint = (folder_cfg or {}).get("pool_hint") or _args_pool(obj, path)
  heads = kw.pop("num_heads") or (folder_cfg or {}).get("num_heads")
  kind = kw.get("kind")
  if kind == formats.ENCODER:
    sd = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
  det = formats.detect(sd, num_heads=heads, pool_hint=hint, **kw)
  notes = [f"timm config.json beside the weights: global_pool "
           f"{(folder_cfg['pool_hint'] or ('not stated',))[0]}"] if folder_cfg else []
  return Source(path, sd, det, notes, raw=obj, fmt=fmt)


def read_source(path: str, *, kind: Optional[str] = None, num_heads: Optional[int] = None,
                decoder_num_heads: Optional[int] = None,
                global_pool: Optional[str] = None) -> Source:
  """What is at `path`, in reference key names, with its architecture."""
  if not files.exists(path):
    raise ConvertError(f"{path}: no such file or folder")
  kw = dict(kind=kind, num_heads=num_heads, decoder_num_heads=decoder_num_heads,
            global_pool=global_pool)
  if not files.isdir(path):
    return _read_file(path, timm_layout.folder_hint(path), **kw)
  if files.isfile(files.join(path, CARD_NAME)):
    raise ConvertError(f"{path} is already a sbam_jax checkpoint or workdir: export it with "
                       f"to-torch; {_EXPECTED}")
  if timm_layout.is_timm_folder(path):
    return _read_file(timm_layout.weights_file(path),
                      timm_layout.read_config(files.join(path, "config.json")), **kw)
  if hf.is_hf_folder(path):
    if kind or num_heads or decoder_num_heads:
      raise ConvertError("--kind / --num-heads / --decoder-num-heads do not apply to a Hugging "
                         "Face folder: its config.json states the architecture")
    sd, det, notes = hf.read_folder(path, global_pool=global_pool)
    return Source(path, sd, det, notes, fmt="hf")
  raise ConvertError(f"{path} is a folder without config.json; {_EXPECTED}")


def resample(source: Source, img_size: int) -> Source:
  """Position tables resampled to another image size (bicubic, cls row kept)."""
  det = source.detected
  if img_size % det.config.patch_size:
    raise ConvertError(f"--img-size {img_size} is not a multiple of the patch size "
                       f"{det.config.patch_size}")
  grid = img_size // det.config.patch_size
  sd = dict(source.state_dict)
  for key in ("pos_embed", "decoder_pos_embed"):
    if key in sd:
      sd[key] = formats.resample_pos_embed(sd[key], grid)
  det = dataclasses.replace(det, config=dataclasses.replace(det.config, img_size=img_size))
  return dataclasses.replace(source, state_dict=sd, detected=det)


def to_params(source: Source) -> tuple[dict, dict, dict]:
  """(parameter tree, card, extra trees) for `checkpoints.save_params`."""
  det, obj = source.detected, source.raw
  params = params_from_torch(source.state_dict, formats.template(det))
  extra = {}
  if isinstance(obj, dict) and "optimizer" in obj:
    extra = _adamw_tree(obj["optimizer"], source.state_dict, det, source.path)
  card = {"kind": det.kind, "model": dataclasses.asdict(det.config),
          "num_classes": det.num_classes, "global_pool": det.global_pool,
          "source": files.abspath(source.path), "source_format": source.fmt}
  if isinstance(obj, dict) and "epoch" in obj:
    card["epoch"] = int(obj["epoch"])
  if extra:
    card["adamw_step"] = int(extra["adamw"]["count"])
  return params, card, extra


def _adamw_tree(optimizer_sd, sd, det, path) -> dict:
  """{'adamw': {'mu', 'nu', 'count'}} for a reference pre-training checkpoint."""
  if det.kind != formats.PRETRAIN:
    print(f"note: optimizer state of a {det.kind} checkpoint is not converted (weights only)")
    return {}
  from flax import nnx  # pylint: disable=g-import-not-at-top
  exp_avg, exp_avg_sq, step = adamw_moments(optimizer_sd, sd, path)
  trainable = nnx.to_pure_dict(nnx.state(formats.build_model(det), nnx.Param))
  mu = params_from_torch(exp_avg, trainable)
  nu = params_from_torch(exp_avg_sq, trainable)
  print(f"converted AdamW moments of {len(exp_avg)} tensors at step {step}")
  return {"adamw": {"mu": mu, "nu": nu, "count": np.asarray(step, np.int32)}}
