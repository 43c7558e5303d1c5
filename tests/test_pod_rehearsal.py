"""A pod rehearsed on one machine: 2 processes x 4 simulated CPU devices under
jax.distributed (mesh data 4 x fsdp 2 over all 8), the workdir in a bucket
(the GCS emulator on the loopback, as a pod's shared storage), a SIGTERM to
one process mid-run, a resume, and the result held against one process with
8 devices, the same mesh and a local workdir."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from sbam_jax import files
from sbam_jax.train import checkpointing

import gcs_server
from test_train import launch, run
from workdir_helpers import metrics, tensorboard_steps

gcs = gcs_server.gcs  # the emulator fixture, found by pytest under this name

# 2 epochs of 15 steps: random masking in epoch 1, SBAM (global group: the
# salience ranking spans every device's tokens) in epoch 2; figures gather
# the fsdp-split parameters at 15 and 30; the k-NN monitor runs at 0 and 30.
OVERRIDES = ["--config.epochs=2", "--config.warmup_epochs=1", "--config.random_epochs=1",
             "--config.log_every=1", "--config.checkpoint_every=10",
             "--config.figure_every=15", "--config.masking.group=global",
             "--config.mesh.fsdp=2"]
STOP_AT = 7  # SIGTERM once process 0 reports this step; the save comes at it or later


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """The demo photos' cache. No shared compilation cache: jax writes entries
  from process 0 only, under keys process 1 never finds, so a resumed
  process 0 would reach the first collective while process 1 still compiles,
  and gloo gives up setting up after a fixed 30 s."""
  return str(tmp_path_factory.mktemp("cache"))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch_pod(workdir, cache, processes: int = 2, devices: int = 4):
  """`processes` train.py processes with `devices` CPU devices each, joined on
  a fresh loopback coordinator port."""
  port = _free_port()
  return [launch(workdir, cache, *OVERRIDES, devices=devices,
                 flags=(f"--coordinator_address=127.0.0.1:{port}",
                        f"--num_processes={processes}", f"--process_id={i}"))
          for i in range(processes)]


def pod_rehearsal(workdir, cache) -> tuple[int, list[str], list[str]]:
  """Run the pod in `workdir` (a local path or a bucket URL): SIGTERM to
  process 1 once process 0 reports step STOP_AT; both must save and exit 143;
  then resume on 2 x 4 to the end. Returns (the step saved, the stopped
  run's outputs, the resumed run's outputs), by process."""
  procs = launch_pod(workdir, cache)
  with _reaped(procs):
    drain = _drain(procs[1])
    lines = []
    for line in procs[0].stdout:
      lines.append(line)
      if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= STOP_AT:
        procs[1].send_signal(signal.SIGTERM)
        break
    stopped = ["".join(lines) + procs[0].communicate(timeout=300)[0], _wait(procs[1], drain)]
  assert [p.returncode for p in procs] == [143, 143], stopped
  # The runtime's preemption service passes the notice on: both processes
  # save the same step (one orbax save, written by both).
  saved = [int(o.split("SIGTERM: saving step ")[1].split()[0]) for o in stopped]
  assert saved[0] == saved[1] >= STOP_AT, saved
  procs = launch_pod(workdir, cache)
  with _reaped(procs):
    drains = [_drain(p) for p in procs]
    resumed = [_wait(p, d) for p, d in zip(procs, drains)]
  assert [p.returncode for p in procs] == [0, 0], resumed
  return saved[0], stopped, resumed


def _drain(proc) -> threading.Thread:
  """Collect a process's output in the background: a pipe nobody reads fills
  up, blocks its writer, and with it every other process at the next
  collective."""
  proc.lines = []
  thread = threading.Thread(target=lambda: proc.lines.extend(proc.stdout), daemon=True)
  thread.start()
  return thread


def _wait(proc, drain: threading.Thread, timeout: float = 600) -> str:
  proc.wait(timeout=timeout)
  drain.join(timeout=30)
  return "".join(proc.lines)


@contextlib.contextmanager
def _reaped(procs):
  """Kill what is still running when the block fails (a hung collective)."""
  try:
    yield
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def test_pod_rehearsal_matches_one_process(tmp_path, cache, gcs):  # noqa: F811
  one, pod = tmp_path / "one", gcs.url("pod")
  code, out = run(one, cache, *OVERRIDES, devices=8)
  assert code == 0, out
  assert "{'data': 4, 'fsdp': 2} on 8 cpu devices (1 process)" in out, out
  saved, stopped, resumed = pod_rehearsal(pod, cache)
  assert "{'data': 4, 'fsdp': 2} on 8 cpu devices (2 processes)" in stopped[0], stopped[0]
  assert f"resuming from {pod}/checkpoints/{saved}" in resumed[0], resumed[0]
  assert "step 30/30" in resumed[0]

  # Each step logged once, across the stop. Both runs compute the same
  # sharded program; only the order of fp32 sums differs (the gradient
  # all-reduce and the loss mean go through gloo between the two processes,
  # in-process on one): a few ulp per step, measured <= 1.5e-7 relative over
  # 30 steps, so 1e-5 leaves ~70x room and still catches any real divergence
  # (a wrong shard, a skipped or repeated batch moves the loss by > 1e-3).
  loss = lambda w: [(m["step"], m["loss"]) for m in metrics(w) if "loss" in m]
  assert [s for s, _ in loss(pod)] == [s for s, _ in loss(one)] == list(range(1, 31))
  assert tensorboard_steps(pod, "loss") == list(range(1, 31))
  np.testing.assert_allclose([l for _, l in loss(pod)], [l for _, l in loss(one)], rtol=1e-5)
  # The k-NN monitor (features sharded over 8 devices, local top-k merged).
  knn = lambda w: [(m["step"], m["knn/cls_top1"], m["knn/mean_top1"]) for m in metrics(w)
                   if "knn/cls_top1" in m]
  assert knn(pod) == knn(one) and [s for s, *_ in knn(one)] == [0, 30]
  # Figures: process 0 draws after every process joined the parameter gather.
  listing = lambda w, d: sorted(files.listdir(files.join(str(w), d)))
  figs = lambda w: [f for f in listing(w, "figures") if f.startswith("step_")]
  assert figs(pod) == figs(one) == ["step_0000015.png", "step_0000030.png"]
  # Periodic saves at 10, 20, 30, plus the SIGTERM save (at STOP_AT or a few
  # steps later, as the notice reaches the sync point); 3 are kept.
  assert listing(one, "checkpoints") == ["10", "20", "30"]
  assert listing(pod, "checkpoints") == sorted(str(s) for s in sorted({10, 20, 30, saved})[-3:])
  assert_same_final_state(pod, one)


def checkpoint_arrays(workdir) -> tuple[int, dict]:
  """(step, whole train state as numpy) of the workdir's newest checkpoint that
  passes the trainer's own verification (integrity record, readable, finite).
  Read as numpy: it was written from 8 devices, this process has one."""
  directory = files.join(str(workdir), "checkpoints")
  step, state, damaged = checkpointing.newest_good(directory, lambda s: _read(directory, s))
  assert step is not None and not damaged, damaged
  return step, state


def _read(directory: str, step: int) -> dict:
  item = epath.Path(directory) / str(step) / "default"
  meta = ocp.PyTreeCheckpointHandler().metadata(item)
  tree = meta.tree if hasattr(meta, "tree") else meta
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
      item=tree, restore_args=args))
  checkpointing.check_finite(state, lambda x: bool(np.isfinite(x).all()))
  return state


def assert_same_final_state(workdir, reference):
  """The last checkpoints (parameters, fixed tables, AdamW moments, RNG, step)
  agree: integers exactly; floats to 1e-5 relative (L2 per array; measured
  <= 1.2e-6: the reordered fp32 sums of the loss bound, through 30 AdamW steps).

  Except the attention key biases (the middle third of each qkv bias, and
  their moments): softmax over keys is unchanged when every score of a query
  moves by the same q.b_k, so their gradient is fp32 rounding noise (|mu| ~
  1e-10, nu ~ 1e-20 < eps^2) and AdamW turns that noise into steps of ~lr
  mu / eps: each run's key bias is its own noise (measured |b_k| <= 1.3e-4,
  differences up to 7.4e-5). They must stay noise-sized: within 1e-2 of the
  array's largest entry (the query and value biases, ~3e-2, agree to 1e-7)."""
  step_a, a = checkpoint_arrays(workdir)
  step_b, b = checkpoint_arrays(reference)
  assert step_a == step_b == 30
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    where = jax.tree_util.keystr(path)
    assert x.shape == y.shape and x.dtype == y.dtype, where
    if not np.issubdtype(x.dtype, np.floating):
      np.testing.assert_array_equal(x, y, err_msg=where)
      continue
    x, y = x.astype(np.float64), y.astype(np.float64)
    if where.endswith("['qkv']['bias']"):
      d = x.shape[-1] // 3
      key = slice(d, 2 * d)
      np.testing.assert_allclose(x[..., key], y[..., key], rtol=0,
                                 atol=1e-2 * np.abs(y).max(), err_msg=where)
      x, y = np.delete(x, key, axis=-1), np.delete(y, key, axis=-1)
    err = np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)
    assert err <= 1e-5, f"{where}: relative error {err:.3g}"
