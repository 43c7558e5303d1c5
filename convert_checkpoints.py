"""Convert checkpoints between the reference PyTorch code and sbam_jax.

  to-jax   SRC.pth  DST_DIR   a PyTorch .pth -> this project's checkpoint
  to-torch SRC_DIR  DST.pth   this project's checkpoint, or a training workdir
                              (its latest step) -> a .pth the reference PyTorch
                              code loads with strict=True

What a .pth holds is detected from keys and shapes and printed:
  pretrain   full MAE/SBAM pre-train model with decoder (SBAM releases, MAE's
             *_full / visualize files, the 'model' of a training checkpoint)
  encoder    encoder-only pre-train weights (MAE's mae_pretrain_vit_*.pth)
  finetuned  classifier: global pool ('fc_norm') or cls token ('norm'), MAE's
             fine-tuned releases and timm-layout ViTs
--kind forces one. Fixed sin-cos tables are carried as stored; --img-size
resamples position tables to another grid (bicubic, cls row kept, as MAE's
interpolate_pos_embed). A pre-training checkpoint's AdamW state (MAE's
recipe: no-decay group, then decay group) is converted too, with its epoch, so
training can continue the same schedule. .pth files are read with weights_only=True and an
allow-list (argparse.Namespace only): a file whose pickle would run code is
refused. Outputs are written under a temporary name and renamed; an existing
output is replaced only with --force.

Examples:
  python convert_checkpoints.py to-jax mae_pretrain_vit_base_full.pth ckpt/mae_base
  python convert_checkpoints.py to-jax mae_finetuned_vit_large.pth ckpt/ft_large
  python convert_checkpoints.py to-torch ckpt/mae_base exported.pth
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402


from sbam_jax import checkpoints  # noqa: E402
from sbam_jax.convert import formats, params_from_torch, params_to_torch  # noqa: E402
from sbam_jax.convert.optimizer import adamw_moments  # noqa: E402
from sbam_jax.convert.torch_io import (ConvertError, load_pth, save_pth, state_dict_of,  # noqa: E402
                                       to_torch_state_dict)
from sbam_jax.convert.torch_keys import MappingError  # noqa: E402
from sbam_jax.models import model_config  # noqa: E402


def to_jax(args) -> str:
  obj = load_pth(args.src)
  sd = state_dict_of(obj, args.src)
  det = formats.detect(sd, kind=args.kind, num_heads=args.num_heads,
                       decoder_num_heads=args.decoder_num_heads)
  print(f"detected {formats.Detected.describe(det)}")
  if args.img_size and args.img_size != det.config.img_size:
    if args.img_size % det.config.patch_size:
      raise ConvertError(f"--img-size {args.img_size} is not a multiple of the patch size "
                         f"{det.config.patch_size}")
    grid = args.img_size // det.config.patch_size
    for key in ("pos_embed", "decoder_pos_embed"):
      if key in sd:
        sd[key] = formats.resample_pos_embed(sd[key], grid)
    fields = {f: getattr(det.config, f) for f in det.config.__dataclass_fields__}
    fields["img_size"] = args.img_size
    det = formats.Detected(det.kind, model_config("base", **fields), det.num_classes,
                           det.global_pool)
    print(f"resampled position tables to {grid}x{grid} ({args.img_size}px)")
  params = params_from_torch(sd, formats.template(det))
  extra = {}
  if isinstance(obj, dict) and "optimizer" in obj:
    extra = adamw_tree(obj["optimizer"], sd, det, args.src)
  card = {"kind": det.kind, "model": {f: getattr(det.config, f) for f in
                                       det.config.__dataclass_fields__},
          "num_classes": det.num_classes, "global_pool": det.global_pool,
          "source": os.path.abspath(args.src)}
  if isinstance(obj, dict) and "epoch" in obj:
    card["epoch"] = int(obj["epoch"])
  if extra:
    card["adamw_step"] = int(extra["adamw"]["count"])
  checkpoints.save_params(args.dst, params, card, overwrite=args.force, extra=extra)
  print(f"wrote {args.dst}")
  return args.dst


def adamw_tree(optimizer_sd, sd, det, path) -> dict:
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


def to_torch(args) -> str:
  params, card = checkpoints.load_weights(args.src)
  if card["kind"] == "linprobe":
    raise ConvertError(f"{args.src} is a linear probe; exporting its BatchNorm head to "
                       f"PyTorch is not supported (its encoder is the pre-trained one)")
  sd = params_to_torch(params)
  save_pth({"model": to_torch_state_dict(sd)}, args.dst, overwrite=args.force)
  print(f"wrote {args.dst}: {card['kind']}, {len(sd)} tensors, float32")
  return args.dst


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  sub = ap.add_subparsers(dest="mode", required=True)
  a = sub.add_parser("to-jax", help="PyTorch .pth -> sbam_jax checkpoint folder")
  a.add_argument("src", help="the .pth file")
  a.add_argument("dst", help="output folder (must not exist unless --force)")
  a.add_argument("--kind", choices=formats.KINDS, default=None,
                 help="override the detected kind")
  a.add_argument("--num-heads", type=int, default=None,
                 help="encoder heads, for non-standard widths")
  a.add_argument("--decoder-num-heads", type=int, default=None,
                 help="decoder heads, for non-standard decoder widths")
  a.add_argument("--img-size", type=int, default=None,
                 help="resample position tables to this image size")
  a.add_argument("--force", action="store_true", help="replace an existing output")
  b = sub.add_parser("to-torch", help="sbam_jax checkpoint folder -> PyTorch .pth")
  b.add_argument("src", help="the checkpoint folder or a training workdir")
  b.add_argument("dst", help="output .pth (must not exist unless --force)")
  b.add_argument("--force", action="store_true", help="replace an existing output")
  args = ap.parse_args(argv)
  try:
    (to_jax if args.mode == "to-jax" else to_torch)(args)
  except (ConvertError, MappingError, FileExistsError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
