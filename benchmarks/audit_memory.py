"""Memory audit of the compiled pre-training step (compile only, on the CPU).

Per-device bytes from `compiled.memory_analysis()` of the trainer's own step
(`PretrainTask.train_step`, captured as in audit_flops.py, with abstract
inputs carrying the trainer's shardings): arguments (parameters, AdamW
state, the batch), outputs, aliased bytes (the donated state) and
temporaries. Peak estimate = arguments + outputs - aliased + temporaries.
FSDP over N devices uses N simulated CPU devices (`XLA_FLAGS=
--xla_force_host_platform_device_count=N`, set in a subprocess before jax is
imported). Layers are scanned (the recipe's default); the recipe's two
micro-steps per optimizer step (accum_steps=2) are kept, so the gradient
accumulator is counted.

The CPU compiler's buffer assignment is a proxy for the GPU's: same
parameters, optimizer state and activations saved for the backward pass,
different fusion. Bytes are linear in the batch (checked on the grid), so the
largest batch for a memory size is read off the fitted line.

  python benchmarks/audit_memory.py                      # ViT-L/H x 64/128/256 x remat x fsdp 1/8
  python benchmarks/audit_memory.py --sizes large --batches 64 --fsdp 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GB = 1e9
MEMORY_GB = (16, 32, 80, 141)
HEADROOM = 0.9   # fraction of device memory the step may plan for (allocator, workspaces)


def worker(args) -> None:
  """One device count: compile each (size, remat, batch) and print JSON lines."""
  sys.path.insert(0, HERE)
  import jax  # pylint: disable=g-import-not-at-top
  import audit_flops as af  # pylint: disable=g-import-not-at-top
  ndev = jax.device_count()
  for size in args.sizes.split(","):
    for remat in (False, True):
      for per_device in (int(b) for b in args.batches.split(",")):
        t0 = time.perf_counter()
        cfg = af.make_config(size, args.method, group=args.group, capacity=args.capacity,
                             batch=per_device * ndev * args.accum, fsdp=args.fsdp,
                             remat=remat, scan=True, dtype=args.dtype)
        cfg.accum_steps = args.accum
        task = af.make_task(cfg)
        abstract, shardings = af.abstract_state(task)
        state = af.sharded_abstract(abstract, shardings)
        records = af.capture_step(task, state, shardings, af.abstract_batch(task))
        step = [c for name, c in records if name == "step"][-1]
        mem = step.memory_analysis()
        row = dict(size=size, per_device_batch=per_device, remat=remat, devices=ndev,
                   fsdp=args.fsdp, accum_steps=args.accum, dtype=args.dtype,
                   method=args.method, group=args.group, capacity=args.capacity,
                   argument_bytes=mem.argument_size_in_bytes,
                   output_bytes=mem.output_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
                   temp_bytes=mem.temp_size_in_bytes,
                   compile_s=round(time.perf_counter() - t0, 1))
        row["peak_bytes"] = (row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"]
                             + row["temp_bytes"])
        print(json.dumps(row), flush=True)


def run_devices(args, fsdp: int) -> list:
  """The worker in a subprocess with `fsdp` simulated devices."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={fsdp}").strip()
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--fsdp", str(fsdp),
         "--sizes", args.sizes, "--batches", args.batches, "--accum", str(args.accum),
         "--dtype", args.dtype, "--method", args.method, "--group", args.group,
         "--capacity", args.capacity]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  rows = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode:
    sys.stderr.write(proc.stderr[-3000:])
    raise SystemExit(f"worker with {fsdp} devices failed (exit {proc.returncode})")
  return rows


def largest_batch(rows: list, memory_gb: float, multiple: int = 8) -> int:
  """Largest per-device batch (a multiple of `multiple`) whose fitted peak
  fits HEADROOM x memory; 0 if none."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  b = np.asarray([r["per_device_batch"] for r in rows], float)
  y = np.asarray([r["peak_bytes"] for r in rows], float)
  if len(b) > 1:
    slope, fixed = np.polyfit(b, y, 1)
  else:  # one point: the state (arguments + outputs - aliased) is the fixed part
    r = rows[0]
    fixed = r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"]
    slope = (y[0] - fixed) / b[0]
  best = int((HEADROOM * memory_gb * GB - fixed) // max(slope, 1.0))
  return max(best // multiple * multiple, 0)


def table(rows: list) -> str:
  """Markdown: bytes per cell, then the largest batch per memory size."""
  out = ["| model | fsdp devices | remat | per-device batch | arguments GB | outputs GB "
         "| aliased GB | temporaries GB | peak GB | compile s |",
         "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    out.append(f"| {r['size']} | {r['fsdp']} | {'yes' if r['remat'] else 'no'} "
               f"| {r['per_device_batch']} | {r['argument_bytes'] / GB:.2f} "
               f"| {r['output_bytes'] / GB:.2f} | {r['alias_bytes'] / GB:.2f} "
               f"| {r['temp_bytes'] / GB:.2f} | {r['peak_bytes'] / GB:.2f} | {r['compile_s']} |")
  out += ["", "| model | fsdp devices | remat | " + " | ".join(f"max batch @ {g} GB"
                                                              for g in MEMORY_GB) + " |",
          "|---|---:|---|" + "---:|" * len(MEMORY_GB)]
  groups: dict = {}
  for r in rows:
    groups.setdefault((r["size"], r["fsdp"], r["remat"]), []).append(r)
  for (size, fsdp, remat), rs in groups.items():
    fits = " | ".join(str(largest_batch(rs, g)) for g in MEMORY_GB)
    out.append(f"| {size} | {fsdp} | {'yes' if remat else 'no'} | {fits} |")
  return "\n".join(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--sizes", default="large,huge")
  ap.add_argument("--batches", default="64,128,256", help="per-device micro-batch sizes")
  ap.add_argument("--fsdp", default="1,8", help="device counts (all of them FSDP)")
  ap.add_argument("--accum", type=int, default=2)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--method", default="sbam", choices=["random", "sbm", "sbam"])
  ap.add_argument("--group", default="device")
  ap.add_argument("--capacity", default="max")
  ap.add_argument("--out", default=None, help="JSON lines (written under a temporary name)")
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    args.fsdp = int(args.fsdp)
    return worker(args)
  rows = []
  for fsdp in (int(f) for f in args.fsdp.split(",")):
    rows += run_devices(args, fsdp)
  print(table(rows))
  if args.out:
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, args.out)
  return None


if __name__ == "__main__":
  main()
