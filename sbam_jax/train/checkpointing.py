"""Training checkpoints: orbax CheckpointManager (async, atomic), verified.

The saved tree is the whole TrainState (step, parameters, fixed tables,
optimizer state, RNG); the data position is the step, since the input
pipeline can start at any step. Stop signals (`signals.py`) ask the loop to
save and exit at a step boundary (on several processes: the same step on all).

Integrity: every step folder holds `sbam_integrity.json` (size and sha256 of
each of its files). It is written by orbax's post-finalisation hook into the
step's temporary folder, so the rename that commits the step commits its
record too: a step folder without a record was not finished by this code
(or was tampered with). Restore checks the record, reads the step and checks
that every float array is finite; a step that fails is reported on one line,
moved to `checkpoints/damaged/<step>.<n>` (never deleted) and the next older
step is tried. A folder saved before records existed gets records when the
trainer opens it, marked `adopted`: they guard against later damage, and a
read failure of such a step counts as damage, not as a config mismatch.

Keeping: orbax deletes nothing itself. A step is deleted only once `keep`
newer steps are committed with their records (and their files have the
recorded sizes), so a failed or interrupted save never costs an older step
and keep=1 holds the previous step until the next one is committed.

A failed save (no space, permission, I/O error, here or in orbax's background
thread) raises SaveError at that save, or at the next save / wait /
close for the background part: the run stops naming the folder, the bytes the
last good step took, and that step; a half-written step stays a temporary
folder (removed) and is never taken for a step.

A checkpoint folder URL (gs://): orbax writes each step straight into
`<step>/` (no temporary folder; its `commit_success.txt` marks the end) and
the record goes into that folder before the marker; moving a damaged step
aside is a copy and a deletion (sbam_jax.files.move).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys

import jax

from sbam_jax import files
from sbam_jax.errors import CheckpointError, SaveError

RECORD = "sbam_integrity.json"
RECORD_FORMAT = "sbam_jax.integrity/1"
DAMAGED = "damaged"
_TMP = ".orbax-checkpoint-tmp"
# Orbax rewrites its step metadata (times) after the hook, and adds the commit
# marker: neither holds state.
_UNRECORDED = (RECORD, "_CHECKPOINT_METADATA", "commit_success.txt")


# ---------------------------------------------------------------------------
# Integrity records


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with files.open_file(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _files(folder: str) -> list[str]:
  out, prefix = [], len(folder.rstrip("/")) + 1
  for root, _, names in files.walk(folder):
    out += [files.join(root, n)[prefix:] for n in names]
  return sorted(p for p in out if p not in _UNRECORDED and not p.endswith(".tmp"))


def _write_json(path: str, obj) -> None:
  """A reader sees all of it or none (files.write_atomic)."""
  files.write_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def write_record(folder: str, step: int, *, adopted: bool = False) -> dict:
  """Size and sha256 of every file under a step folder, stored in it
  (`adopted`: of a step written before records, not as it was written)."""
  listed = {rel: {"size": files.stat(files.join(folder, rel)).size,
                  "sha256": _sha256(files.join(folder, rel))} for rel in _files(folder)}
  record = {"format": RECORD_FORMAT, "step": int(step), "files": listed,
            "bytes": sum(f["size"] for f in listed.values()), "adopted": adopted}
  _write_json(files.join(folder, RECORD), record)
  return record


def read_record(folder: str):
  """The step's record, None if it has none; ValueError if unreadable."""
  path = files.join(folder, RECORD)
  if not files.exists(path):
    return None
  try:
    record = json.loads(files.read_text(path))
    assert record["format"] == RECORD_FORMAT and isinstance(record["files"], dict)
    return record
  except (OSError, ValueError, KeyError, AssertionError) as e:
    raise ValueError(f"its integrity record cannot be read ({type(e).__name__})") from None


def check_files(folder: str, record: dict, *, hashes: bool = True):
  """Why the files differ from the record (first difference), or None."""
  for rel, want in sorted(record["files"].items()):
    path = files.join(folder, rel)
    try:
      st = files.stat(path)
      if st is None:
        raise FileNotFoundError(path)
      size = st.size
      if size != want["size"]:
        return f"{rel} has {size} bytes, {want['size']} were written"
      if hashes and _sha256(path) != want["sha256"]:
        return f"{rel} does not match its sha256"
    except FileNotFoundError:
      return f"{rel} is missing"
    except OSError as e:
      return f"{rel} cannot be read ({e.strerror})"
  return None


def list_steps(directory: str) -> list[int]:
  if not files.isdir(directory):
    return []
  return sorted(int(d) for d in files.listdir(directory)
                if d.isdigit() and files.isdir(files.join(directory, d)))


def has_records(directory: str) -> bool:
  """Whether this folder's steps are written with records (any step has one)."""
  return any(files.exists(files.join(directory, str(s), RECORD)) for s in list_steps(directory))


def verify_step(directory: str, step: int, recorded: bool = True) -> tuple:
  """(reason it is damaged or None, whether a record of its save vouches for
  its files). `recorded`: the folder's steps have records (else reading the
  step must tell)."""
  folder = files.join(directory, str(step))
  try:
    record = read_record(folder)
  except ValueError as e:
    return str(e), False
  if record is None:
    return (("no integrity record (its save did not finish, or the record was deleted)"
             if recorded else None), False)
  return check_files(folder, record), not record.get("adopted", False)


def one_line(error: BaseException, limit: int = 240) -> str:
  """A storage error in one line: the OS reason when tensorstore names one."""
  text = " ".join(str(error).split()) or type(error).__name__
  code = re.search(r"os_error_code='?(\d+)", text)
  if isinstance(error, OSError) and error.strerror:
    where = f" ({error.filename})" if error.filename else ""
    return f"{error.strerror}{where}"
  if code:
    status = text.split(":")[0]
    return f"{os.strerror(int(code.group(1)))} ({status}, errno {code.group(1)})"
  return text if len(text) <= limit else text[:limit] + " ..."


def move_aside(directory: str, step: int) -> str:
  """checkpoints/<step> -> checkpoints/damaged/<step>.<n>: out of orbax's
  sight, kept for inspection."""
  damaged = files.join(directory, DAMAGED)
  files.makedirs(damaged)
  n = 1
  while files.exists(files.join(damaged, f"{step}.{n}")):
    n += 1
  target = files.join(damaged, f"{step}.{n}")
  files.move(files.join(directory, str(step)), target)
  return target


def newest_good(directory: str, read):
  """(step or None, read(step) or None, [(damaged step, reason)] newer than it).

  Moves nothing: every process reaches the same verdicts before process 0
  moves anything. `read` raises for a step that cannot be used (NonFinite
  included). A step whose record vouches for its files but which still cannot
  be read is not damage (another model, another state layout):
  CheckpointError at once.
  """
  recorded, damaged = has_records(directory), []
  for step in sorted(list_steps(directory), reverse=True):
    reason, vouched = verify_step(directory, step, recorded)
    if reason is None:
      try:
        return step, read(step), damaged
      except NonFinite as e:
        reason = str(e)
      except Exception as e:  # pylint: disable=broad-except  (tensorstore raises many kinds)
        if vouched:
          raise CheckpointError(f"{directory}/{step} is intact (its files match their record) "
                                f"but cannot be read as this run's state: {one_line(e)}. Was "
                                f"it written with another model or config?") from None
        reason = f"cannot be read: {one_line(e)}"
    damaged.append((step, reason))
  return None, None, damaged


def report_damaged(directory: str, damaged: list, *, move: bool) -> None:
  """One stderr line per damaged step (process 0), moving it aside if `move`."""
  if jax.process_index() != 0:
    return
  for step, reason in damaged:
    where = ""
    if move:
      try:
        where = f"; moved to {move_aside(directory, step)}"
      except OSError as e:
        where = f"; could not be moved aside ({e.strerror})"
    print(f"checkpoint step {step} is damaged: {reason}{where}", file=sys.stderr, flush=True)


def no_good_message(directory: str, found: list, *, moved: bool) -> str:
  damaged = files.join(directory, DAMAGED)
  if not found:
    held = sorted(files.listdir(damaged)) if files.isdir(damaged) else []
    return (f"{directory} holds no checkpoint, only the damaged steps {held} in {damaged}: "
            f"resuming would start over; to do so, move {damaged} away")
  aside = (f"; they were moved to {damaged} (move one back to retry it; to start over, move "
           f"{damaged} away)" if moved else "")
  return f"{directory} has no good checkpoint ({'; '.join(found)}){aside}"


class NonFinite(ValueError):
  """A restored float array holds NaN or Inf."""


def check_finite(tree, isfinite) -> None:
  """Raise NonFinite naming the first arrays that are not finite."""
  bad = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jax.numpy.issubdtype(dtype, jax.numpy.floating) and not isfinite(x):
      bad.append(jax.tree_util.keystr(path))
  if bad:
    raise NonFinite(f"{len(bad)} float array(s) hold NaN or Inf, e.g. {bad[0]}")


# ---------------------------------------------------------------------------
# The trainer's checkpoints


class _OrbaxErrors(logging.Filter):
  """Orbax logs the errors of its background save with a traceback before
  re-raising them; the Checkpointer reports them as one line instead."""

  def filter(self, record):
    return not (record.exc_info and record.levelno >= logging.ERROR
                and f"{os.sep}orbax{os.sep}" in record.pathname)


class Checkpointer:
  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.directory = files.abspath(directory)
    self.keep, self._async = max(1, int(keep)), async_save
    self._pending, self._failed = None, False
    self._filter = _OrbaxErrors()
    logging.getLogger("absl").addFilter(self._filter)
    # Always orbax's async checkpointer (its hook writes the record); a
    # synchronous save waits for it.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=True, enable_async_checkpointing=True,
        async_options=ocp.options.AsyncOptions(post_finalization_callback=self._record_pending))
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options)
      if jax.process_index() == 0 and not has_records(self.directory):
        for step in list_steps(self.directory):  # saved by a version without records
          write_record(files.join(self.directory, str(step)), step, adopted=True)
      _sync("sbam_jax checkpoint records adopted")
    except OSError as e:
      raise SaveError(f"cannot write checkpoints to {self.directory}: "
                      f"{one_line(e)}") from None

  def latest_step(self):
    return self.manager.latest_step()

  def _record_pending(self) -> None:
    """Orbax's hook, on process 0, after all processes wrote the step and
    before the rename that commits it: the record goes in with the step."""
    step = self._pending
    staged = self._staged(step)  # (none in a bucket: orbax writes <step>/ directly)
    write_record(staged[0] if staged else files.join(self.directory, str(step)), step)

  def _staged(self, step: int) -> list:
    """Orbax's temporary folders of `step`."""
    names = files.listdir(self.directory) if files.isdir(self.directory) else []
    return [files.join(self.directory, n) for n in names if n.startswith(f"{step}{_TMP}")]

  def save(self, step: int, state, *, force: bool = False) -> None:
    """Save `state` as `step` (a step already saved is left as it is)."""
    if step in self.manager.all_steps():
      return
    self._settle()
    self._pending = step
    try:
      started = self.manager.save(step, args=self._ocp.args.StandardSave(state), force=force)
    except Exception as e:  # pylint: disable=broad-except  (OSError, tensorstore ValueError)
      self._fail(step, e)
    if not started:  # orbax's policy declined (a step not newer than the latest)
      self._pending = None
    if not self._async:
      self._settle()

  def _settle(self) -> None:
    """Wait for the save in flight; raise if it failed; then prune."""
    step = self._pending
    if step is None:
      return
    try:
      self.manager.wait_until_finished()  # orbax's thread reads _pending until done
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._fail(step, e)
    finally:
      self._pending = None
    folder = files.join(self.directory, str(step))
    if not files.isdir(folder) or read_record(folder) is None:
      self._fail(step, None)  # orbax logs some finalisation errors instead of raising
    self._prune()

  def _prune(self) -> None:
    """Delete steps older than the newest `keep` complete ones."""
    steps = list_steps(self.directory)
    complete = [s for s in steps if self._complete(s)]
    if len(complete) <= self.keep:
      return
    oldest_kept = complete[-self.keep]
    for s in steps:
      if s < oldest_kept:
        self.manager.delete(s)

  def _complete(self, step: int) -> bool:
    folder = files.join(self.directory, str(step))
    try:
      record = read_record(folder)
    except ValueError:
      return False
    return record is not None and check_files(folder, record, hashes=False) is None

  def last_good(self):
    """(step, bytes) of the newest complete step, (None, None) if none."""
    for s in reversed(list_steps(self.directory)):
      if self._complete(s):
        return s, read_record(files.join(self.directory, str(s)))["bytes"]
    return None, None

  def _fail(self, step: int, error) -> None:
    """The save of `step` failed: remove its temporary folder, stop the run."""
    self._failed = True
    if jax.process_index() == 0:
      for tmp in self._staged(step):
        files.rmtree(tmp, ignore_errors=True)
    last, size = self.last_good()
    reason = one_line(error) if error is not None else "the step was not committed"
    try:  # (a bucket has no free space to tell)
      free = ("" if files.is_remote(self.directory) else
              f", {shutil.disk_usage(self.directory).free / 2**20:.1f} MiB free")
    except OSError:
      free = ""
    need = (f"; it needs about {size / 2**20:.1f} MiB (the size of step {last}){free}"
            if size else "")
    kept = (f"the last good checkpoint is step {last}, intact" if last is not None else
            "there is no earlier checkpoint")
    raise SaveError(f"saving checkpoint step {step} in {self.directory} failed: "
                    f"{reason}{need}; {kept}. The run stops here; free space or fix "
                    f"the folder, then rerun to resume") from None

  def restore(self, step: int, abstract_state):
    """`abstract_state`: ShapeDtypeStructs with shardings (jax.eval_shape + shardings)."""
    state = self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract_state))
    check_finite(state, lambda x: bool(jax.numpy.isfinite(x).all()))
    return state

  def restore_latest(self, abstract_state):
    """(state, step) of the newest step that verifies, damaged newer ones
    moved aside; None for a fresh run (no step, nothing moved aside before)."""
    if not list_steps(self.directory):
      damaged = files.join(self.directory, DAMAGED)
      if files.isdir(damaged) and files.listdir(damaged):
        raise CheckpointError(no_good_message(self.directory, [], moved=True))
      return None
    step, state, damaged = newest_good(self.directory, lambda s: self._read(s, abstract_state))
    _sync("sbam_jax checkpoints verified")
    report_damaged(self.directory, damaged, move=True)
    _sync("sbam_jax damaged checkpoints moved")
    self.manager.reload()
    if step is None:
      raise CheckpointError(no_good_message(self.directory, [f"step {s}: {r}" for s, r in damaged],
                                            moved=True))
    return state, step

  def _read(self, step: int, abstract_state):
    """restore(), failing on every process if it failed on any."""
    try:
      state, error = self.restore(step, abstract_state), None
    except Exception as e:  # pylint: disable=broad-except
      state, error = None, e
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if not all(multihost_utils.process_allgather(jax.numpy.int32(error is None))):
        error = error or NonFinite("another process could not read it")
    if error is not None:
      raise error
    return state

  def wait(self) -> None:
    self._settle()

  def close(self) -> None:
    try:
      if not self._failed:
        self._settle()
    finally:
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except
        if not self._failed:
          raise
      logging.getLogger("absl").removeFilter(self._filter)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def abstract_like(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)
