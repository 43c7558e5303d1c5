"""What the representation monitor (k-NN / few-shot evaluators) costs next to
pre-training, measured in one run on synthetic on-device data (no TensorFlow).

For a model size it times, in the same process: the real pre-training step
(bench_pretrain.build: SBAM, AdamW, the batch given) and one monitor
evaluation as the evaluators run it (features of `bank` + `queries` images
through the unmasked encoder, sharded extraction, k-NN on both features,
optionally few-shot ridge). The cost fraction of a recipe is

  evaluations x eval seconds / (steps x step seconds)

with the recipe's cadence: the demo (configs/demo.py: 360 steps, k-NN at
step 0, epoch 12 and the end: 3 evaluations of 240 + 160 images) and the
ImageNet pre-training recipe
(global batch 4096, 400 epochs = 124,800 steps; every 20 epochs + start:
21 evaluations of 10k + 5k images), the latter also as a FLOP ratio (an
accelerator runs both near the same MFU; a CPU cannot time ViT-L steps).

  python benchmarks/bench_monitor.py --size tiny --img-size 64 --patch 8   # the demo
  python benchmarks/bench_monitor.py --size large --batch 256               # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import bench_pretrain  # noqa: E402
from sbam_jax import masking, sharding  # noqa: E402
from sbam_jax.data import device as device_ops  # noqa: E402
from sbam_jax.evals import representation as rep  # noqa: E402
from sbam_jax.models import model_config  # noqa: E402
from sbam_jax.train import flops as flops_lib  # noqa: E402

RECIPES = {  # steps of the run, evaluations of the monitor, bank + queries per evaluation
    "demo": dict(steps=360, evals=3, images=240 + 160),
    "imagenet_pretrain": dict(steps=1_281_167 // 4096 * 400, evals=21, images=15_000),
}


def monitor_seconds(cfg, state, bank: int, queries: int, batch: int, shots: int, reps: int):
  """Seconds of one evaluation: extraction of bank + queries, k-NN (and ridge) on both features."""
  mesh = sharding.make_mesh()
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: bench_pretrain.MaskedAutoencoder(
      cfg, rngs=nnx.Rngs(0))))

  def features(params, fixed, images):
    model = nnx.merge(graphdef, params, fixed)
    return model.encoder.pooled_features(device_ops.normalize(images, jnp.float32))

  rng = np.random.default_rng(0)

  def batches(n):
    for start in range(0, n, batch):
      rows = min(batch, n - start)
      image = rng.integers(0, 256, (batch, cfg.img_size, cfg.img_size, 3), np.uint8)
      yield {"image": image, "label": rng.integers(0, 10, batch).astype(np.int32),
             "valid": np.arange(batch) < rows}

  def once():
    sets = [rep.extract_features(features, batches(n), mesh, args=(state.params, state.fixed))
            for n in (bank, queries)]
    (bf, by, bv), (qf, qy, qv) = sets
    out = [rep.accuracy(rep.knn_predict(bf[k], by, bv, qf[k], num_classes=10), qy, qv)
           for k in bf]
    if shots:
      idx = rep.fewshot_indices(rep.to_host(by), rep.to_host(bv), shots, 0, num_classes=10)
      out += [rep.ridge_fewshot_predict(rep.take_examples(bf[k], idx), rep.take_examples(by, idx),
                                        qf[k], num_classes=10) for k in bf]
    jax.block_until_ready(out)

  t0 = time.perf_counter()
  once()  # compiles
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(reps):
    once()
  return (time.perf_counter() - t0) / reps, first


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--size", default="tiny")
  ap.add_argument("--img-size", type=int, default=64)
  ap.add_argument("--patch", type=int, default=8)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--bank", type=int, default=240)
  ap.add_argument("--queries", type=int, default=160)
  ap.add_argument("--shots", type=int, default=0, help="also time n-shot ridge (0: k-NN only)")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = ap.parse_args(argv)
  cfg, _, cap, jitted, state, data = bench_pretrain.build(
      args.size, "sbam", args.batch, args.dtype, "xla", args.img_size, patch_size=args.patch)
  kept = jax.tree.map(jnp.copy, state)  # the timed steps donate theirs
  step_s, _, _ = bench_pretrain.time_jax(jitted, state, data, args.steps)
  state = kept
  eval_s, first_s = monitor_seconds(cfg, state, args.bank, args.queries, args.batch,
                                    args.shots, args.reps)
  dev = jax.devices()[0]
  row = dict(date=time.strftime("%Y-%m-%d"), device=dev.device_kind, size=args.size,
             img_size=cfg.img_size, batch=args.batch, bank=args.bank, queries=args.queries,
             shots=args.shots, step_s=round(step_s, 4), eval_s=round(eval_s, 3),
             eval_first_s=round(first_s, 2), eval_over_step=round(eval_s / step_s, 2))
  demo = RECIPES["demo"]
  row["demo_fraction"] = round(demo["evals"] * eval_s / (demo["steps"] * step_s), 4)
  inet = RECIPES["imagenet_pretrain"]
  for size in ("base", "large"):
    big = model_config(size)
    keep = masking.max_capacity(bench_pretrain.SPECS["sbam"], big.num_patches)
    train_flops = inet["steps"] * 4096 * flops_lib.mae(big, keep)
    monitor_flops = inet["evals"] * inet["images"] * flops_lib.encoder(big, backward=False)
    row[f"imagenet_{size}_flop_fraction"] = round(monitor_flops / train_flops, 5)
  print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
