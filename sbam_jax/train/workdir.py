"""A training workdir's ownership and identity.

- `Lock`: one run per workdir. Two runs on one workdir would delete each
  other's temporary checkpoint folders and interleave their logs, so the
  second stops with "in use by pid N on host H". A lock whose process is gone
  (same host) or whose heartbeat is older than `STALE_S` (another host) is
  taken over, with a line saying so. In a workdir URL (gs://) there is no
  process to ask across hosts: the lock is an object created only if absent
  (GCS precondition `ifGenerationMatch=0`) and read back to check the owner;
  the heartbeat rewrites it at most every `REMOTE_BEAT_S`; only its age
  (`STALE_S`) tells a dead run, so a killed run's lock holds the workdir for
  up to STALE_S (delete the object to resume sooner).
- `check_resume`: the workdir card records what the saved state means (task,
  model architecture, global batch, steps per epoch, classes). Resuming with
  a config that changes any of these is refused before anything is written,
  listing every difference; `resume_override` names those that may change.
- `Undo`: a run that fails validation leaves nothing behind: what start-up
  created in the workdir is removed again.
"""

from __future__ import annotations

import json
import os
import socket
import time

from sbam_jax import files
from sbam_jax.errors import ConfigError

LOCK = ".sbam_jax.lock"
STALE_S = 600.0          # a lock not touched for this long belongs to a dead run
REMOTE_BEAT_S = 60.0     # a lock object is rewritten at most this often
# ModelConfig fields that change how the model runs, never what its parameters mean.
EXECUTION_FIELDS = frozenset({"dtype", "scan_layers", "attention", "remat"})
RUN_FIELDS = ("task", "batch_size", "steps_per_epoch")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class Lock:
  """Held by process 0 of a run from start-up to exit."""

  def __init__(self, workdir: str):
    self.path = files.join(workdir, LOCK)
    self.remote = files.is_remote(workdir)
    self.me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    self.held, self._beat = False, 0.0

  def acquire(self) -> None:
    for _ in range(3):
      if not files.create_exclusive(self.path, json.dumps(self.me)):
        self._take_over_if_stale()
        continue
      if self.remote and self._owner() != self.me:
        continue  # another run's creation won the race (a store without preconditions)
      self.held, self._beat = True, time.time()
      return
    raise ConfigError(f"cannot lock {self.path}: another run keeps taking it")

  def _owner(self):
    try:
      return json.loads(files.read_text(self.path))
    except (OSError, ValueError):
      return None

  def _take_over_if_stale(self) -> None:
    try:
      other = json.loads(files.read_text(self.path))
      st = files.stat(self.path)
      if st is None:
        return  # released meanwhile: try again
      age = time.time() - st.mtime
    except FileNotFoundError:
      return  # released meanwhile: try again
    except (OSError, ValueError):
      other, age = {}, STALE_S + 1  # unreadable: a crash while writing it
    pid, host = other.get("pid"), other.get("host")
    same_host = host == self.me["host"] and not self.remote  # (no pid across a bucket's users)
    if (same_host and isinstance(pid, int) and _alive(pid)) or (not same_host and age < STALE_S):
      since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(other.get("started", 0)))
      raise ConfigError(
          f"workdir {os.path.dirname(self.path)} is in use by pid {pid} on host {host} "
          f"(since {since}, last seen {age:.0f} s ago): wait for that run, or use another "
          f"workdir; if that run is dead, delete {self.path}")
    why = "is not running" if same_host else f"has not been seen for {age:.0f} s"
    print(f"note: taking over the lock of pid {pid} on host {host}, which {why}", flush=True)
    try:
      files.remove(self.path)
    except FileNotFoundError:
      pass

  def heartbeat(self) -> None:
    if not self.held:
      return
    try:
      if not self.remote:
        os.utime(self.path)
      elif time.time() - self._beat >= REMOTE_BEAT_S:
        files.write_atomic(self.path, json.dumps(self.me))  # a new object: a new mtime
        self._beat = time.time()
    except OSError:
      pass  # a lock we cannot touch does not stop training

  def release(self) -> None:
    if not self.held:
      return
    self.held = False
    try:
      if json.loads(files.read_text(self.path)).get("pid") != self.me["pid"]:
        return
      files.remove(self.path)
    except (OSError, ValueError):
      pass


def run_card(task) -> dict:
  """What the saved state's step numbers mean."""
  return {"task": task.config.task, "batch_size": task.batch_size,
          "steps_per_epoch": task.steps_per_epoch}


def differences(stored: dict, now: dict) -> list:
  """`(name, was, now)` for every field of the card that changes the meaning of
  the saved state (fields missing on either side are not compared)."""
  out = []
  for key in ("kind", "num_classes", "classes", "global_pool"):
    if key in stored and key in now and stored[key] != now[key]:
      out.append((key, stored[key], now[key]))
  was_model, now_model = stored.get("model", {}), now.get("model", {})
  for key in sorted(set(was_model) & set(now_model) - EXECUTION_FIELDS):
    if was_model[key] != now_model[key]:
      out.append((f"model.{key}", was_model[key], now_model[key]))
  was_run, now_run = stored.get("run", {}), now.get("run", {})
  for key in RUN_FIELDS:
    if key in was_run and key in now_run and was_run[key] != now_run[key]:
      out.append((key, was_run[key], now_run[key]))
  return out


def check_resume(workdir: str, stored: dict, now: dict, override: str) -> None:
  """Refuse to continue a workdir's state under a config that means another run."""
  allowed = {k.strip() for k in override.split(",") if k.strip()}
  found = differences(stored, now)
  unknown = allowed - {name for name, _, _ in found}
  if unknown:
    raise ConfigError(f"resume_override names {sorted(unknown)}, which do not differ from "
                      f"the workdir's card; remove them")
  blocking = [(n, a, b) for n, a, b in found if n not in allowed]
  if blocking:
    listed = "; ".join(f"{n}: {_short(a)} -> {_short(b)}" for n, a, b in blocking)
    raise ConfigError(
        f"cannot resume {workdir} with this config: {listed}. Use another workdir (with "
        f"init_from={workdir} to start from its weights), or set config.resume_override="
        f"'{','.join(n for n, _, _ in blocking)}' if continuing is what you mean")


def _short(value) -> str:
  text = repr(value)
  return text if len(text) <= 40 else text[:37] + "..."


class Undo:
  """Remembers what a workdir held before start-up, to remove what a failed
  start-up added (and the workdir itself if start-up created it)."""

  def __init__(self, workdir: str):
    self.workdir = files.abspath(workdir)
    self.existed = files.isdir(self.workdir)
    self.before = set(files.listdir(self.workdir)) if self.existed else set()

  def __call__(self) -> None:
    if not files.isdir(self.workdir):
      return
    for name in set(files.listdir(self.workdir)) - self.before:
      path = files.join(self.workdir, name)
      if files.isdir(path) and not os.path.islink(path):
        files.rmtree(path, ignore_errors=True)
      else:
        try:
          files.remove(path)
        except OSError:
          pass
    if not self.existed and not files.is_remote(self.workdir):  # (a bucket has no empty folders)
      try:
        os.rmdir(self.workdir)
      except OSError:
        pass
