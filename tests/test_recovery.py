"""What keeps a run's work whole: logs that match the restored state, a
non-finite step that halts the state, one run per workdir, refused
incompatible resumes, nothing left by a failed start, and honest timing."""

import errno
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sbam_jax.errors import ConfigError, WriteError
from sbam_jax.train import logging_utils, report as report_lib, workdir as workdir_lib
from sbam_jax.train.step import TrainState, make_train_step
from workdir_helpers import run_env, tensorboard_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- metrics.jsonl and TensorBoard ----------------------------------------------------

def test_resume_drops_records_past_the_restored_step(tmp_path):
  w = logging_utils.MetricWriter(str(tmp_path))
  for step in (1, 2, 3, 4):
    w.scalars(step, {"loss": 1.0 / step})
  w.image(3, "fig", np.zeros((4, 4, 3), np.float32))
  w.flush()
  with open(w.jsonl, "a") as f:
    f.write('{"step": 5, "lo')  # a line cut off by a crash
  w2 = logging_utils.MetricWriter(str(tmp_path))
  w2.truncate(2)
  assert [r["step"] for r in w2.records()] == [1, 2]
  assert open(w.jsonl).read().endswith("\n")
  assert tensorboard_steps(tmp_path, "loss") == [1, 2]
  assert tensorboard_steps(tmp_path, "fig") == []  # the image of step 3 went too


def test_a_failed_append_leaves_no_cut_off_line(tmp_path, monkeypatch):
  w = logging_utils.MetricWriter(str(tmp_path))
  w.scalars(1, {"loss": 1.0})
  before = open(w.jsonl).read()
  real_write = os.write

  def full_disk(fd, data):
    real_write(fd, data[:7])  # part of the line reaches the disk, then it is full
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(logging_utils.os, "write", full_disk)
  with pytest.raises(WriteError, match="metrics.jsonl.*No space left"):
    w.scalars(2, {"loss": 0.5})
  assert open(w.jsonl).read() == before


def test_eval_only_replaces_its_own_record(tmp_path):
  w = logging_utils.MetricWriter(str(tmp_path))
  w.scalars(9, {"loss": 1.0})
  w.scalars(9, {"eval/top1": 50.0})
  w.scalars(9, {"eval/top1": 51.0}, replace=True)
  assert [(r["step"], r.get("eval/top1")) for r in w.records()] == [(9, None), (9, 51.0)]


# ---- the non-finite guard ---------------------------------------------------------------

def test_a_non_finite_step_halts_the_state_at_that_step():
  """Loss w * x with plain SGD (lr 1): the update is w -= x. Step 2 sees a NaN;
  every later step must leave the state as it was after step 1."""
  def loss_fn(params, fixed, stats, batch, key, step):
    loss = jnp.sum(params["w"] * batch["x"])
    return loss, ({}, stats)

  tx = optax.sgd(1.0)
  params = {"w": jnp.array([1.0, 2.0])}
  state = TrainState(step=jnp.int32(0), params=params, fixed={}, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(0))
  step = jax.jit(make_train_step(loss_fn, tx, accum_steps=1))
  xs = [[0.5, 0.5], [np.nan, 0.0], [1.0, 1.0], [1.0, 1.0]]
  seen = []
  for x in xs:
    state, m = step(state, {"x": jnp.array([x], jnp.float32)[0][None]})
    seen.append((int(state.step), np.asarray(state.params["w"]).tolist(), bool(m["finite"])))
  assert seen[0] == (1, [0.5, 1.5], True)
  assert seen[1] == (-2, [0.5, 1.5], False)        # step 2 failed: marked, not applied
  assert seen[2] == (-2, [0.5, 1.5], True)         # finite again, but the run is halted
  assert seen[3] == (-2, [0.5, 1.5], True)


# ---- workdir ownership and identity -----------------------------------------------------

def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_one_run_per_workdir_and_stale_locks_are_taken_over(tmp_path, capsys):
  first = workdir_lib.Lock(str(tmp_path))
  first.acquire()
  with pytest.raises(ConfigError, match=rf"in use by pid {os.getpid()} on host"):
    workdir_lib.Lock(str(tmp_path)).acquire()
  first.release()
  assert not os.path.exists(first.path)
  lock_path = tmp_path / workdir_lib.LOCK
  lock_path.write_text(json.dumps({"pid": _dead_pid(), "host": first.me["host"]}))
  again = workdir_lib.Lock(str(tmp_path))
  again.acquire()  # the process is gone: stale
  assert "is not running" in capsys.readouterr().out
  again.release()
  lock_path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
  with pytest.raises(ConfigError, match="in use by pid 1 on host elsewhere"):
    workdir_lib.Lock(str(tmp_path)).acquire()  # another host, seen just now
  old = os.stat(lock_path).st_mtime - workdir_lib.STALE_S - 5
  os.utime(lock_path, (old, old))
  workdir_lib.Lock(str(tmp_path)).acquire()  # another host, silent for too long
  assert json.loads(lock_path.read_text())["pid"] == os.getpid()


def test_resume_differences_are_listed_and_overridable():
  stored = {"kind": "pretrain", "model": {"embed_dim": 64, "depth": 2, "dtype": "float32"},
            "run": {"task": "pretrain", "batch_size": 32, "steps_per_epoch": 15}}
  now = {"kind": "pretrain", "model": {"embed_dim": 64, "depth": 4, "dtype": "bfloat16"},
         "run": {"task": "pretrain", "batch_size": 64, "steps_per_epoch": 7}}
  assert workdir_lib.differences(stored, now) == [
      ("model.depth", 2, 4), ("batch_size", 32, 64), ("steps_per_epoch", 15, 7)]
  with pytest.raises(ConfigError, match=r"model.depth: 2 -> 4; batch_size: 32 -> 64; "
                     r"steps_per_epoch: 15 -> 7.*resume_override='model.depth,batch_size,"
                     r"steps_per_epoch'"):
    workdir_lib.check_resume("w", stored, now, "")
  with pytest.raises(ConfigError, match=r"model.depth: 2 -> 4\. "):
    workdir_lib.check_resume("w", stored, now, "batch_size, steps_per_epoch")
  workdir_lib.check_resume("w", stored, now, "model.depth,batch_size,steps_per_epoch")
  with pytest.raises(ConfigError, match=r"resume_override names \['epochs'\]"):
    workdir_lib.check_resume("w", stored, now, "model.depth,batch_size,steps_per_epoch,epochs")


# ---- timing -------------------------------------------------------------------------------

class _Task:
  batch_size, total_steps, steps_per_epoch, flops_per_image = 10, 100, 10, None

  def lr(self, step):
    return 0.1


def test_speed_and_eta_leave_out_compilation_and_side_work(monkeypatch, tmp_path):
  clock = [0.0]
  monkeypatch.setattr(report_lib.time, "time", lambda: clock[0])
  r = report_lib.Reporter(_Task(), str(tmp_path), started=0.0)
  r.writer.enabled = False
  with r.side("compile"):
    clock[0] += 50.0                       # compiling the first step
  for step in range(2, 11):                # 9 steps of 0.5 s, a figure and a save among them
    clock[0] += 0.5
    r.stepped(10)
    if step == 5:
      with r.side("figures"):
        clock[0] += 20.0
    if step == 8:
      with r.side("checkpoint"):
        clock[0] += 7.0
  r.train(10, {"loss": 1.0}, data=None, state=None)
  assert r.step_time == pytest.approx(0.5)
  assert r.seconds["compile"] == 50.0 and r.seconds["figures"] == 20.0
  assert r.seconds["checkpoint"] == 7.0 and r.seconds["train"] == pytest.approx(4.5)


# ---- end to end: refused resumes and failed starts leave the workdir as it was -----------

def _train(workdir, *args, timeout=600):
  env = run_env()
  cmd = [sys.executable, "train.py", "--config", "configs/demo.py", "--workdir", str(workdir),
         "--config.epochs=1", "--config.warmup_epochs=0", "--config.random_epochs=0",
         "--config.evals.knn.every=0", "--config.figure_every=1000", *args]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _snapshot(workdir):
  return {os.path.relpath(os.path.join(d, f), workdir): os.path.getmtime(os.path.join(d, f))
          for d, _, fs in os.walk(workdir) for f in fs}


def test_summary_lists_files_and_passes_over_files_that_went_away(tmp_path):
  (tmp_path / "metrics.jsonl").write_text("{}\n" * 1000)
  steps = tmp_path / "checkpoints"
  (steps / "8").mkdir(parents=True)
  (steps / "8" / "data").write_bytes(b"x" * 2_000_000)
  (steps / "9.orbax-checkpoint-tmp").mkdir()
  os.symlink(steps / "gone", steps / "9.orbax-checkpoint-tmp" / "lock")  # removed meanwhile
  old = tmp_path / "old.txt"
  old.write_text("from an earlier run")
  os.utime(old, (1.0, 1.0))
  lines = report_lib.written(str(tmp_path), since=10.0)
  assert lines == [f"{steps}/ steps [8] (2.0 MB written)",
                   f"{tmp_path / 'metrics.jsonl'} (0.00 MB)"], lines


def test_refused_resumes_and_failed_starts_change_nothing(tmp_path):
  work = tmp_path / "w"
  out = _train(work)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "wrote    " + str(work / "checkpoints") in out.stdout
  before = _snapshot(work)
  out = _train(work, "--config.batch_size=64")
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
  assert out.stderr.strip().startswith(f"error: cannot resume {work} with this config: "
                                       f"batch_size: 32 -> 64; steps_per_epoch: 15 -> 7.")
  assert _snapshot(work) == before                 # card and logs untouched, nothing added
  lock = workdir_lib.Lock(str(work))
  lock.acquire()
  out = _train(work)
  assert out.returncode == 2 and f"in use by pid {os.getpid()}" in out.stderr, out.stderr
  lock.release()
  fresh = tmp_path / "fresh"
  out = _train(fresh, f"--config.init_from={tmp_path / 'nothing'}")
  assert out.returncode == 2 and "nothing" in out.stderr and "Traceback" not in out.stderr
  assert not fresh.exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
  out = _train(tmp_path / "w", "--dry_run")
  assert out.returncode == 0, out.stderr
  text = out.stdout
  for expected in ("config.masking.method = 'sbam'", "task     pretrain", "480 images",
                   "15 steps/epoch", "32 global = 32 per device", "GiB per device",
                   "dry run: nothing trained or written"):
    assert expected in text, text
  assert not (tmp_path / "w").exists()


def test_outputs_renamed_into_place_honour_the_umask(tmp_path):
  """mkdtemp/mkstemp make 0700/0600; what is renamed into place gets what a
  plain open/makedirs would give under the umask."""
  from sbam_jax import checkpoints
  from sbam_jax.convert import torch_io
  from sbam_jax.files import umask
  checkpoints.write_folder(str(tmp_path / "ckpt"), lambda tmp: None)
  torch_io.save_pth({"a": 1}, str(tmp_path / "x.pth"))
  assert os.stat(tmp_path / "ckpt").st_mode & 0o777 == 0o777 & ~umask()
  assert os.stat(tmp_path / "x.pth").st_mode & 0o777 == 0o666 & ~umask()
