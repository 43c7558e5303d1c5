"""Time the real pre-training step (sbam_jax.train.step) on synthetic data.

No TensorFlow: uint8 images are made on the device. For each size x masking
method it reports, as JSON lines: img/s, step ms, model FLOPs per image,
achieved TFLOP/s and MFU against a bf16 matmul peak measured in the same run,
peak device memory, compile seconds; with --torch, the same model's PyTorch
step (tests/torch_reference.py blocks, bf16 autocast, fused AdamW where
available) in the same process, and the ratio. --inspect prints what the
compiled step contains: host callbacks / transfers (a host sync) and gathers.

  python benchmarks/bench_pretrain.py --sizes base,large --batch 256 --torch
  python benchmarks/bench_pretrain.py --sizes tiny --batch 32 --steps 3 --inspect   # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sbam_jax import masking, optim  # noqa: E402
from sbam_jax.models import MaskedAutoencoder, model_config  # noqa: E402
from sbam_jax.train import flops as flops_lib  # noqa: E402
from sbam_jax.train.pretrain import pretrain_loss  # noqa: E402
from sbam_jax.train.step import TrainState, make_train_step  # noqa: E402

SPECS = {"random": masking.MaskingSpec("random"),
         "sbm": masking.MaskingSpec("sbam", ratio_var=0.0),
         "sbam": masking.MaskingSpec("sbam", ratio_var=0.1, group_size=1)}


def matmul_peak(dtype=jnp.bfloat16, n: int = 8192, reps: int = 10) -> float:
  """Measured FLOP/s of a square matmul (the MFU denominator)."""
  if jax.devices()[0].platform == "cpu":
    n, reps = 1024, 3
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(reps):
    out = f(a)
  out.block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def build(size, method, batch, dtype, attention, img_size, device_resize=False, patch_size=None):
  overrides = dict(dtype=dtype, attention=attention)
  if img_size:
    overrides["img_size"] = img_size
  if patch_size:
    overrides["patch_size"] = patch_size
  cfg = model_config(size, **overrides)
  spec = SPECS[method]
  model = MaskedAutoencoder(cfg, rngs=nnx.Rngs(0))
  graphdef, params, fixed = nnx.split(model, nnx.Param, ...)
  params, fixed = nnx.to_pure_dict(params), nnx.to_pure_dict(fixed)
  tx = optim.build("adamw", 1e-4, decay_mask=optim.reference_decay_mask(params),
                   defaults=dict(b1=0.9, b2=0.95, weight_decay=0.05))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, fixed=fixed,
                     opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
  cap = masking.max_capacity(spec, cfg.num_patches)
  loss_fn = pretrain_loss(graphdef, spec=spec, warmup_spec=spec, random_steps=0, capacity=cap,
                          warmup_capacity=cap, image_size=cfg.img_size)
  step = make_train_step(loss_fn, tx, accum_steps=1)
  side = 2 * cfg.img_size if device_resize else cfg.img_size
  images = jax.random.randint(jax.random.PRNGKey(1), (batch, side, side, 3), 0, 256,
                              jnp.int32).astype(jnp.uint8)
  data = {"image": images}
  if device_resize:  # host crops on a 2S canvas, resized in the step (data.device_resize)
    data["size"] = jax.random.randint(jax.random.PRNGKey(2), (batch, 2), cfg.img_size // 2,
                                      side + 1, jnp.int32)
    data["flip"] = jax.random.bernoulli(jax.random.PRNGKey(3), 0.5, (batch,))
  return cfg, spec, cap, jax.jit(step, donate_argnums=0), state, data


def inspect(compiled_text: str) -> dict:
  ops = {"gather": r"\bgather\(", "scatter": r"\bscatter\(", "host_callback": r"callback",
         "outfeed": r"\boutfeed\(", "infeed": r"\binfeed\(", "send_recv": r"\b(send|recv)\("}
  return {k: len(re.findall(v, compiled_text)) for k, v in ops.items()}


def time_jax(jitted, state, images, steps):
  t0 = time.perf_counter()
  compiled = jitted.lower(state, images).compile()
  compile_s = time.perf_counter() - t0
  state, m = compiled(state, images)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = compiled(state, images)
  jax.block_until_ready(m)
  return (time.perf_counter() - t0) / steps, compile_s, compiled


def time_torch(cfg, method, batch, steps):
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from torch_reference import TorchMAE, torch_sbam_ids  # pylint: disable=g-import-not-at-top
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  model = TorchMAE.from_config(cfg).to(dev)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                          fused=dev == "cuda")
  imgs = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=dev)
  spec = SPECS[method]
  L = cfg.num_patches

  def step():
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
      if spec.method == "random":
        ids = torch.argsort(torch.rand(batch, L, device=dev), dim=1)
        keep = masking.fixed_keep_length(L, spec.mask_ratio)
        x = model.tokens(imgs)
        lat, mask, restore = model.forward_encoder(x, ids, keep)
      else:  # the public code's path: one keep length per batch, read on the host
        with torch.no_grad():
          ids, keeps = torch_sbam_ids(model.tokens(imgs).float(), torch.rand(batch, L, device=dev)
                                      * 0.5, spec.mask_ratio, spec.ratio_var, spec.delta, batch)
        lat, mask, restore = model.forward_encoder(model.tokens(imgs), ids, keeps[0])
      loss = model.forward_loss(imgs, model.forward_decoder(lat, restore), mask)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  step()
  if dev == "cuda":
    torch.cuda.synchronize()
  t0 = time.perf_counter()
  for _ in range(steps):
    step()
  if dev == "cuda":
    torch.cuda.synchronize()
  return (time.perf_counter() - t0) / steps


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--sizes", default="base,large")
  ap.add_argument("--methods", default="random,sbm,sbam")
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--img-size", type=int, default=None)
  ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  ap.add_argument("--attention", default="xla", choices=["einsum", "xla", "cudnn"])
  ap.add_argument("--torch", action="store_true", help="also time the PyTorch reference step")
  ap.add_argument("--inspect", action="store_true", help="report host syncs / gathers in HLO")
  ap.add_argument("--device-resize", action="store_true",
                  help="feed 2S crops + sizes, resized in the step (data.device_resize)")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  dev = jax.devices()[0]
  peak = matmul_peak()
  base = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
              batch=args.batch, dtype=args.dtype, attention=args.attention,
              matmul_peak_tflops=round(peak / 1e12, 2), date=time.strftime("%Y-%m-%d"))
  for size in args.sizes.split(","):
    for method in args.methods.split(","):
      cfg, spec, cap, jitted, state, images = build(size, method, args.batch, args.dtype,
                                                    args.attention, args.img_size,
                                                    args.device_resize)
      sec, compile_s, compiled = time_jax(jitted, state, images, args.steps)
      flops = flops_lib.mae(cfg, cap)
      row = dict(base, size=size, method=method, img_size=cfg.img_size, capacity=cap,
                 device_resize=args.device_resize,
                 step_ms=round(sec * 1e3, 2), img_per_s=round(args.batch / sec, 1),
                 gflops_per_img=round(flops / 1e9, 2),
                 mfu=round(flops * args.batch / sec / peak, 4), compile_s=round(compile_s, 1))
      stats = dev.memory_stats() or {}
      if "peak_bytes_in_use" in stats:
        row["peak_mem_gib"] = round(stats["peak_bytes_in_use"] / 2 ** 30, 2)
      if args.inspect:
        row["hlo"] = inspect(compiled.as_text())
      if args.torch:
        tsec = time_torch(cfg, method, args.batch, args.steps)
        row.update(torch_img_per_s=round(args.batch / tsec, 1), vs_torch=round(tsec / sec, 3))
      line = json.dumps(row)
      print(line, flush=True)
      if args.out:
        with open(args.out, "a") as f:
          f.write(line + "\n")


if __name__ == "__main__":
  main()
