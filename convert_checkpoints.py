"""Convert checkpoints between PyTorch formats (MAE, timm, Hugging Face) and sbam_jax.

  to-jax   SRC  DST_DIR   a checkpoint in any supported format -> this project's
                          checkpoint folder
  to-torch SRC_DIR  DST   this project's checkpoint, or a training workdir (its
                          newest step that verifies, as the trainer checks
                          it: damaged newer steps are named on stderr and
                          skipped, none good is one error) -> --format mae
                          (default) | timm | hf

SRC of to-jax:
  FILE.pth             MAE / SBAM / timm state dict or training checkpoint
  FILE.safetensors     MAE or timm state dict
  FOLDER (Hugging Face) config.json + model.safetensors | pytorch_model.bin:
                       ViTMAEForPreTraining, ViTMAEModel, ViTModel,
                       ViTForImageClassification (transformers 4.x or 5.x names)
  FOLDER (timm)        config.json with 'architecture' + model.safetensors

What a checkpoint holds is detected and printed:
  pretrain   full MAE/SBAM pre-train model with decoder -> MaskedAutoencoder
  encoder    encoder-only weights (MAE's mae_pretrain_vit_*.pth, ViTMAEModel,
             ViTModel, timm with num_classes=0) -> Encoder
  finetuned  classifier: global pool ('fc_norm') or cls token ('norm'), MAE's
             fine-tuned releases, timm ViTs, ViTForImageClassification
--kind forces one. Keys 'norm' + 'head' do not tell the pooling (cls token, or
timm's global_pool='avg' with fc_norm=False): it is read from --global-pool,
the checkpoint's training args, or a timm config.json, and refused otherwise.
Head counts come from config.json, --num-heads, or the standard widths.
Fixed sin-cos tables are carried as stored; --img-size resamples position
tables to another grid (bicubic, cls row kept, as MAE's interpolate_pos_embed).
A pre-training checkpoint's AdamW state (MAE's recipe: no-decay group, then
decay group) is converted too, with its epoch, so training can continue.

DST of to-torch:
  --format mae   FILE.pth ({'model': state dict}) or FILE.safetensors
  --format timm  FILE.safetensors / FILE.pth, or a FOLDER (config.json +
                 model.safetensors, timm's hub layout); a pre-train model
                 keeps its encoder (timm has no MAE decoder)
  --format hf    FOLDER that transformers' from_pretrained loads:
                 ViTMAEForPreTraining (pretrain), ViTMAEModel (encoder),
                 ViTForImageClassification (cls-token classifier)

.pth files are read with weights_only=True and an allow-list
(argparse.Namespace only): a pickle that asks for anything else (which could
run code) is refused, naming what it asked for. Outputs are written under a
temporary name and renamed; an existing output is replaced only with --force.

Examples:
  python convert_checkpoints.py to-jax mae_pretrain_vit_base_full.pth ckpt/mae_base
  python convert_checkpoints.py to-jax hf/vit-mae-base ckpt/hf_base
  python convert_checkpoints.py to-jax vit_ft/model.safetensors ckpt/ft --global-pool token
  python convert_checkpoints.py to-torch ckpt/mae_base exported.pth
  python convert_checkpoints.py to-torch ckpt/mae_base hf_out --format hf
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from sbam_jax import checkpoints, files  # noqa: E402
from sbam_jax.convert import exporters, formats, readers  # noqa: E402
from sbam_jax.convert.torch_io import ConvertError  # noqa: E402
from sbam_jax.errors import StoreError  # noqa: E402


def to_jax(args) -> str:
  if files.isfile(args.dst):
    raise ConvertError(f"{args.dst} is a file; to-jax writes a checkpoint folder: give a "
                       f"folder name")
  source = readers.read_source(args.src, kind=args.kind, num_heads=args.num_heads,
                               decoder_num_heads=args.decoder_num_heads,
                               global_pool=args.global_pool)
  for note in source.notes:
    print(note)
  print(f"detected {source.detected.describe()}")
  if args.img_size and args.img_size != source.detected.config.img_size:
    source = readers.resample(source, args.img_size)
    print(f"resampled position tables to {source.detected.config.grid_size}^2 "
          f"({args.img_size}px)")
  params, card, extra = readers.to_params(source)
  checkpoints.save_params(args.dst, params, card, overwrite=args.force, extra=extra)
  print(f"wrote {args.dst}")
  return args.dst


def to_torch(args) -> str:
  if files.isfile(args.src):
    raise ConvertError(f"{args.src} is a file; to-torch reads a sbam_jax checkpoint folder or a "
                       f"training workdir (convert .pth / .safetensors files with to-jax)")
  params, card = checkpoints.load_weights(args.src)
  written = exporters.export(params, card, args.dst, fmt=args.format, overwrite=args.force)
  print(f"wrote {args.dst}: {card['kind']}, {written}")
  return args.dst


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  sub = ap.add_subparsers(dest="mode", required=True)
  a = sub.add_parser("to-jax", help="PyTorch / timm / Hugging Face -> sbam_jax checkpoint folder")
  a.add_argument("src", help="a .pth or .safetensors file, or a Hugging Face / timm folder")
  a.add_argument("dst", help="output folder (must not exist unless --force)")
  a.add_argument("--kind", choices=formats.KINDS, default=None,
                 help="override the detected kind")
  a.add_argument("--global-pool", choices=formats.POOLS, default=None,
                 help="classifier pooling when keys 'norm' + 'head' cannot tell it")
  a.add_argument("--num-heads", type=int, default=None,
                 help="encoder heads, for non-standard widths")
  a.add_argument("--decoder-num-heads", type=int, default=None,
                 help="decoder heads, for non-standard decoder widths")
  a.add_argument("--img-size", type=int, default=None,
                 help="resample position tables to this image size")
  a.add_argument("--force", action="store_true", help="replace an existing output")
  b = sub.add_parser("to-torch", help="sbam_jax checkpoint folder -> MAE / timm / Hugging Face")
  b.add_argument("src", help="the checkpoint folder or a training workdir (its newest good step)")
  b.add_argument("dst", help="output file (.pth / .safetensors) or folder (hf, timm)")
  b.add_argument("--format", choices=exporters.FORMATS, default="mae",
                 help="key layout and container of the output (default mae)")
  b.add_argument("--force", action="store_true", help="replace an existing output")
  return ap


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    (to_jax if args.mode == "to-jax" else to_torch)(args)
  except (ValueError, FileExistsError, FileNotFoundError, StoreError) as e:  # ConvertError, ...
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
