"""Time the jitted masking functions and one MAE forward+backward.

Synthetic on-device data, no TensorFlow; one JSON line per measurement.
Runs on CPU and GPU alike:

  python benchmarks/bench_model.py --size base --batch 8 --steps 5
  python benchmarks/bench_model.py --size tiny --batch 256 --out results.jsonl

Salience is timed alone (and reported as a fraction of each step), masking on
its own (salience + keep lengths + sort) and as part of
the step: random masking is the baseline, SBM (fixed keep) and SBAM (AMR)
at maximum capacity, and SBAM with bucketed capacity (one host read a step).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from sbam_jax import masking  # noqa: E402
from sbam_jax.models import MaskedAutoencoder, model_config  # noqa: E402

SPECS = {
    "random": masking.MaskingSpec("random"),
    "sbm": masking.MaskingSpec("sbam", ratio_var=0.0),
    "sbam": masking.MaskingSpec("sbam", ratio_var=0.1, group_size=1),
    "sbam_bucketed": masking.MaskingSpec("sbam", ratio_var=0.1, group_size=1),
}


def timed(fn, *args, steps: int, repeats: int = 3):
  """Seconds per call: the best of `repeats` loops of `steps` calls, after a
  warm-up call (the best loop is the least disturbed by other processes)."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / steps)
  return best


def compile_seconds(jitted, *args) -> float:
  t0 = time.perf_counter()
  jitted.lower(*args).compile()
  return time.perf_counter() - t0


def bench_masking(cfg, batch: int, steps: int, emit) -> float:
  """Times salience alone and each plan; returns salience seconds per batch."""
  tokens = jax.random.normal(jax.random.key(0), (batch, cfg.num_patches, cfg.embed_dim)) * 0.05
  key = jax.random.key(1)
  sal_fn = jax.jit(masking.token_salience)
  comp = compile_seconds(sal_fn, tokens)
  sal_sec = timed(sal_fn, tokens, steps=steps)
  emit(bench="salience", ms=sal_sec * 1e3, samples_per_s=batch / sal_sec, compile_s=comp)
  for name in ("random", "sbm", "sbam"):
    spec = SPECS[name]
    fn = jax.jit(lambda t, k, spec=spec: masking.make_mask_plan(spec, t, k)[0])
    comp = compile_seconds(fn, tokens, key)
    sec = timed(fn, tokens, key, steps=steps)
    emit(bench="masking", method=name, ms=sec * 1e3, samples_per_s=batch / sec, compile_s=comp)
  return sal_sec


def bench_step(cfg, batch: int, steps: int, methods, emit) -> dict:
  """Times forward+backward per method; returns {method: seconds per step}."""
  model = MaskedAutoencoder(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  imgs = jax.random.normal(jax.random.key(2), (batch, cfg.img_size, cfg.img_size, 3))
  key = jax.random.key(3)
  base, out = None, {}
  for name in methods:
    spec = SPECS[name]

    if name != "sbam_bucketed":
      def loss_fn(p, x, k, spec=spec):
        return nnx.merge(graphdef, p, rest)(x, k, spec).loss

      step = jax.jit(jax.value_and_grad(loss_fn))
      comp = compile_seconds(step, params, imgs, key)
      sec = timed(step, params, imgs, key, steps=steps)
    else:
      buckets = masking.capacity_buckets(spec, cfg.num_patches, 4)
      plan_fn = jax.jit(lambda x, k, spec=spec: nnx.merge(graphdef, params, rest).make_plan(
          x, spec, k)[0])

      def loss_with_plan(p, x, plan, capacity):
        return nnx.merge(graphdef, p, rest).forward_with_plan(x, plan, capacity).loss

      step_k = jax.jit(jax.value_and_grad(loss_with_plan), static_argnums=3)
      plan0 = plan_fn(imgs, key)
      comp = compile_seconds(plan_fn, imgs, key) + sum(
          compile_seconds(step_k, params, imgs, plan0, b) for b in buckets)

      def run(p, x, k):
        plan = plan_fn(x, k)
        capacity = masking.choose_capacity(int(plan.len_keep.max()), buckets)  # host read
        return step_k(p, x, plan, capacity)

      sec = timed(run, params, imgs, key, steps=steps)
    base = sec if name == "random" else base
    out[name] = sec
    emit(bench="fwd_bwd", method=name, ms=sec * 1e3, img_per_s=batch / sec, compile_s=comp,
         vs_random=(sec / base) if base else None)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--size", default="tiny", choices=["tiny", "base", "large", "huge"])
  ap.add_argument("--img-size", type=int, default=None)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--attention", default="xla", choices=["einsum", "xla", "cudnn"])
  ap.add_argument("--methods", default="random,sbm,sbam,sbam_bucketed")
  ap.add_argument("--out", default=None, help="append JSON lines to this file too")
  args = ap.parse_args(argv)

  overrides = dict(dtype=args.dtype, attention=args.attention)
  if args.img_size:
    overrides["img_size"] = args.img_size
  cfg = model_config(args.size, **overrides)
  dev = jax.devices()[0]
  common = dict(size=args.size, img_size=cfg.img_size, batch=args.batch, dtype=args.dtype,
                attention=args.attention, device=dev.device_kind, platform=dev.platform,
                jax=jax.__version__, date=time.strftime("%Y-%m-%d"))

  def emit(**row):
    row = {**common, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}}
    line = json.dumps(row)
    print(line, flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(line + "\n")

  sal_sec = bench_masking(cfg, args.batch, args.steps, emit)
  steps = bench_step(cfg, args.batch, args.steps, args.methods.split(","), emit)
  for name, sec in steps.items():  # salience's share of a step (same batch)
    emit(bench="salience_vs_step", method=name, ratio=sal_sec / sec)


if __name__ == "__main__":
  main()
