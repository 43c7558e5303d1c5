"""Inject checkpoint faults into a real demo workdir and show what happens.

  python scripts/fault_checkpoints.py [--out DIR] [--only NAME ...]

Trains the demo config once for 30 steps (a checkpoint every 5, the last 3
kept), then for each fault: copies that workdir, damages it, reruns train.py
on the copy and prints the exit status, the lines about damage, the step it
resumed from, and whether its final state equals the undamaged run's bit for
bit. The full-disk case mounts a 3 MiB tmpfs (needs root; skipped if the
mount fails). A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

RUN = ["--config.epochs=2", "--config.warmup_epochs=1", "--config.random_epochs=1",
       "--config.evals.knn.every=0", "--config.log_every=5", "--config.checkpoint_every=5",
       "--config.figure_every=1000"]
KILL_IN_SAVE = """
import os, runpy, signal, sys
from sbam_jax.train import checkpointing
write = checkpointing.write_record
def write_or_die(folder, step):
  if step == 20:
    os.kill(os.getpid(), signal.SIGKILL)
  return write(folder, step)
checkpointing.write_record = write_or_die
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def train(workdir: str, cache: str, code: str | None = None):
  head = ["-c", code] if code else [os.path.join(ROOT, "train.py")]
  config = os.path.join(ROOT, "configs", "demo.py")
  proc = subprocess.run([sys.executable, *head, "--config", config, "--workdir", workdir, *RUN],
                        cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, SBAM_JAX_CACHE=cache,  # + compiled programs
                                 JAX_COMPILATION_CACHE_DIR=os.path.join(cache, "xla"),
                                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"))
  return proc.returncode, proc.stdout, proc.stderr


def array_file(ckpts: str, step: int) -> str:
  files = glob.glob(os.path.join(ckpts, str(step), "default", "**", "d", "*"), recursive=True)
  return max(files, key=os.path.getsize)


def truncate(ckpts, step):
  path = array_file(ckpts, step)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def bit_flip(ckpts, step):
  path = array_file(ckpts, step)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    chunk = f.read(64)
    f.seek(-len(chunk), 1)
    f.write(bytes(b ^ 0xFF for b in chunk))


def at(steps, damage):
  return lambda ckpts: [damage(ckpts, s) for s in steps]


FAULTS = {
    "truncated data file, newest": at([30], truncate),
    "deleted data file, newest": at([30], lambda c, s: os.remove(array_file(c, s))),
    "64-byte bit flip, newest": at([30], bit_flip),
    "deleted _METADATA, newest": at([30], lambda c, s: os.remove(
        os.path.join(c, str(s), "default", "_METADATA"))),
    "deleted integrity record, newest": at([30], lambda c, s: os.remove(
        os.path.join(c, str(s), "sbam_integrity.json"))),
    "bit flips at two steps": at([30, 25], bit_flip),
    "bit flips at every step": at([30, 25, 20], bit_flip),
}


def same_final_state(a: str, b: str) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from sbam_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
  trees = []
  for w in (a, b):
    steps = checkpointing.list_steps(os.path.join(w, "checkpoints"))
    if not steps:
      return "no final state"
    trees.append(ocp.StandardCheckpointer().restore(os.path.join(w, "checkpoints",
                                                                 str(steps[-1]), "default")))
  same = all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(trees[0]), jax.tree.leaves(trees[1])))
  return "final state bit-identical" if same else "final state DIFFERS"


def report(name: str, status: int, out: str, err: str, reference: str, workdir: str) -> None:
  print(f"== {name}: exit {status}")
  for line in (out + err).splitlines():
    if "damaged" in line or line.startswith(("error:", "resuming from", "Traceback")):
      print(f"   {line}")
  if status == 0:
    print(f"   {same_final_state(reference, workdir)}")


def full_disk(base: str, cache: str) -> None:
  mount = os.path.join(base, "tmpfs")
  os.makedirs(mount)
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", mount],
                    capture_output=True).returncode:
    print("== full disk: skipped (cannot mount a tmpfs)")
    return
  try:
    status, out, err = train(os.path.join(mount, "run"), cache)
    report("full disk (3 MiB tmpfs)", status, out, err, "", "")
    print(f"   steps kept: {sorted(os.listdir(os.path.join(mount, 'run', 'checkpoints')))}")
  finally:
    subprocess.run(["umount", mount], check=False)


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--out", default=None, help="keep the workdirs here (default: a temp folder)")
  ap.add_argument("--only", nargs="*", default=None, help="fault names containing these words")
  args = ap.parse_args()
  base = args.out or tempfile.mkdtemp(prefix="sbam_faults.")
  os.makedirs(base, exist_ok=True)
  cache = os.path.join(base, "cache")
  reference = os.path.join(base, "reference")
  if not os.path.isdir(reference):
    status, out, err = train(reference, cache)
    if status:
      print(out + err)
      return status
  print(f"reference run: {reference} (steps 20, 25, 30 kept)")
  chosen = lambda name: not args.only or any(w in name for w in args.only)
  for i, (name, damage) in enumerate(FAULTS.items()):
    if chosen(name):
      workdir = os.path.join(base, f"fault{i}")
      shutil.rmtree(workdir, ignore_errors=True)
      shutil.copytree(reference, workdir)
      damage(os.path.join(workdir, "checkpoints"))
      report(name, *train(workdir, cache), reference, workdir)
  if chosen("kill -9 during the save of step 20"):
    workdir = os.path.join(base, "killed")
    shutil.rmtree(workdir, ignore_errors=True)
    status = train(workdir, cache, KILL_IN_SAVE)[0]
    print(f"== kill -9 during the save of step 20: exit {status}, then a rerun:")
    report("   resumed", *train(workdir, cache), reference, workdir)
  if chosen("full disk"):
    full_disk(base, cache)
  if not args.out:
    shutil.rmtree(base, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
