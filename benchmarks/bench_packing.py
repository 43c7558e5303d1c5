"""CPU proxy for per-image masking cost: the SBAM step at a mean keep of ~49
against the random-masking step at 49 kept, ViT-B, timed in one run.

For every capacity strategy in `sbam_jax.config.CAPACITIES` (so 'packed'
too, once it exists) the trainer's own step (`PretrainTask.train_step`: its
jit, host reads and pre-passes included) runs on synthetic uint8 crops; SBAM
uses per-image ratios (`masking.group='sample'`) with keep lengths set to a
profile of mean 49 (audit_flops.profile: 40..58 for 196 patches) so every strategy
sees the same lengths; salience is computed as in training. Steps of the
strategies are interleaved round by round with the random-masking step,
so load on shared cores hits all alike (one strategy's state alive at a
time beside the random-masking step's); the ratio is of medians.

  python benchmarks/bench_packing.py                 # ViT-B, batch 32, 3 rounds
  python benchmarks/bench_packing.py --size tiny --batch 32 --rounds 2   # quick check
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import audit_flops as af  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from sbam_jax import config as config_lib  # noqa: E402


class Runner:
  """One strategy's trainer step on a fixed batch, ready to time."""

  def __init__(self, size, method, capacity, batch, keeps, scan):
    cfg = af.make_config(size, method, group="sample", capacity=capacity, batch=batch,
                         scan=scan)
    self.task = task = af.make_task(cfg)
    self.keeps = keeps
    _, shardings = af.abstract_state(task)
    self.state = jax.device_put(task.init_state(False), shardings)
    self.batch = af.host_batch(task)
    with af.keep_lengths(keeps):
      self.step = task.train_step(shardings)
      t0 = time.perf_counter()
      self.run()
      self.first_s = time.perf_counter() - t0   # compiles

  def run(self) -> float:
    t0 = time.perf_counter()
    with af.keep_lengths(self.keeps):
      self.state, metrics = self.step(self.state, self.batch)
      jax.block_until_ready(metrics)
    return time.perf_counter() - t0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--size", default="base")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--capacities", default=",".join(config_lib.CAPACITIES))
  ap.add_argument("--unrolled", action="store_true", help="model.scan_layers=False")
  ap.add_argument("--out", default=None, help="JSON lines (written under a temporary name)")
  args = ap.parse_args(argv)
  from sbam_jax.models import model_config  # pylint: disable=g-import-not-at-top
  end = af.profile("sbam", "sample", "end", model_config(args.size).num_patches)
  keeps = tuple(np.resize(np.asarray(end), args.batch).tolist())
  scan = not args.unrolled
  # One strategy's step alive at a time beside the random-masking one (memory).
  random_runner = Runner(args.size, "random", "max", args.batch, None, scan)
  rows = []
  head = dict(date=time.strftime("%Y-%m-%d"), machine=platform.processor() or platform.machine(),
              cores=os.cpu_count(), jax=jax.__version__, size=args.size, batch=args.batch,
              rounds=args.rounds, scan_layers=scan, mean_keep=float(np.mean(keeps)),
              random_first_step_s=round(random_runner.first_s, 1))
  for cap in args.capacities.split(","):
    runner = Runner(args.size, "sbam", cap, args.batch, keeps, scan)
    rand, mine = [], []
    for _ in range(args.rounds):
      rand.append(random_runner.run())
      mine.append(runner.run())
    rows.append(dict(head, capacity=cap, sbam_median_s=round(float(np.median(mine)), 3),
                     random_median_s=round(float(np.median(rand)), 3),
                     sbam_s=[round(t, 3) for t in mine], random_s=[round(t, 3) for t in rand],
                     sbam_first_step_s=round(runner.first_s, 1),
                     ratio_vs_random=round(float(np.median(mine) / np.median(rand)), 3)))
    print(json.dumps(rows[-1]), flush=True)
    del runner
    gc.collect()
  if args.out:
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, args.out)


if __name__ == "__main__":
  main()
