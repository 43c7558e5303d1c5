"""This project's parameter tree -> MAE `.pth` / `.safetensors`, timm, Hugging Face.

  mae   a file: `.pth` holding {'model': state dict} (what MAE's code loads with
        strict=True), or `.safetensors` with the same keys
  timm  a `.safetensors` / `.pth` file with timm's keys, or a folder in timm's hub
        layout (config.json + model.safetensors)
  hf    a folder: config.json + model.safetensors in transformers' on-disk names

Folders are assembled under a temporary name and renamed into place (at a
URL: assembled locally and uploaded, see `checkpoints.write_folder`).
"""

from __future__ import annotations

import json
import os

from sbam_jax import files
from sbam_jax.checkpoints import write_folder
from sbam_jax.convert import formats, hf, timm_layout
from sbam_jax.convert.torch_io import (ConvertError, check_file_target, save_pth,
                                       save_safetensors, to_torch_state_dict)
from sbam_jax.convert.torch_keys import params_to_torch

FORMATS = ("mae", "timm", "hf")
_FILE_EXTS = (".pth", ".pt", ".bin", ".safetensors")


def _model_config(card: dict):
  from sbam_jax.models import ModelConfig  # pylint: disable=g-import-not-at-top
  return ModelConfig(**card["model"])


def _write_file(sd: dict, dst: str, overwrite: bool, fmt: str) -> None:
  check_file_target(dst, f"--format {fmt} with a file name")
  if dst.endswith(".safetensors"):
    save_safetensors(sd, dst, overwrite=overwrite, metadata={"written_by": "sbam_jax"})
  else:
    save_pth({"model": to_torch_state_dict(sd)}, dst, overwrite=overwrite)


def _write_folder(contents: dict, dst: str, overwrite: bool, fmt: str) -> None:
  """{name: state dict or JSON-able dict} as a folder, atomically."""
  dst = files.abspath(dst)
  if files.isfile(dst):
    raise ConvertError(f"{dst} is a file; --format {fmt} writes a folder (config.json + "
                       f"model.safetensors): give a folder name")
  if files.exists(dst) and not overwrite:
    raise ConvertError(f"{dst} exists; pass --force to replace it")

  def fill(tmp):  # tmp: a local folder (write_folder uploads it for a URL)
    for name, content in contents.items():
      if name.endswith(".json"):
        with open(os.path.join(tmp, name), "w") as f:
          json.dump(content, f, indent=2, sort_keys=True)
      else:
        save_safetensors(content, os.path.join(tmp, name), metadata={"written_by": "sbam_jax"})

  write_folder(dst, fill)


def export(params: dict, card: dict, dst: str, *, fmt: str = "mae",
           overwrite: bool = False) -> str:
  """Write `params` (a full model tree) in `fmt` at `dst`; returns a summary line."""
  kind = card["kind"]
  if kind == "linprobe":
    raise ConvertError("a linear probe's BatchNorm head has no PyTorch counterpart here; export "
                       "the pre-trained encoder it was probed on instead")
  if fmt not in FORMATS:
    raise ConvertError(f"unknown format {fmt!r}; choose from {FORMATS}")
  sd = params_to_torch(params)
  if fmt == "mae":
    _write_file(sd, dst, overwrite, fmt)
    return f"MAE names, {len(sd)} tensors, float32"
  if fmt == "timm":
    tsd, notes = timm_layout.export(sd, card)
    if dst.endswith(_FILE_EXTS):
      _write_file(tsd, dst, overwrite, fmt)
    else:
      cfg = timm_layout.config_for(card, _model_config(card), int(card.get("num_classes", 0)),
                                   kind == formats.FINETUNED and card.get("global_pool", True))
      _write_folder({"config.json": cfg, "model.safetensors": tsd}, dst, overwrite, fmt)
    return "; ".join([f"timm names, {len(tsd)} tensors, float32"] + notes)
  if dst.endswith(_FILE_EXTS):
    raise ConvertError(f"{dst}: --format hf writes a folder (config.json + model.safetensors), "
                       f"not a file: give a folder name")
  hf_sd, config = hf.export(sd, card, _model_config(card))
  _write_folder({"config.json": config, "model.safetensors": hf_sd}, dst, overwrite, fmt)
  return (f"Hugging Face {config['architectures'][0]} (transformers 4.x names, which 5.x also "
          f"loads), {len(hf_sd)} tensors")
