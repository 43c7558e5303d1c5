"""Checkpoint faults: damaged steps are found, reported, moved aside and the
newest good step is used; saves that fail stop the run with one line; a kill
during a save and a damaged newest step both resume bit-identically.

The in-process cases use a small state of known arrays (the reference); the
end-to-end ones run train.py on the demo config for 30 steps."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sbam_jax import checkpoints
from sbam_jax.errors import CheckpointError
from sbam_jax.train import checkpointing as C
from workdir_helpers import final_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The faults, the runs and the kill-inside-a-save program are the fault script's
# (scripts/fault_checkpoints.py): the script and the tests inject the same faults.
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from fault_checkpoints import KILL_IN_SAVE as KILLED_IN_SAVE  # noqa: E402
from fault_checkpoints import array_file as largest_array_file  # noqa: E402
from fault_checkpoints import bit_flip, truncate  # noqa: E402
from fault_checkpoints import train as _script_train  # noqa: E402
STEPS = (5, 10, 15)


def reference(step: int) -> dict:
  """The state saved as `step`: arrays that differ from step to step."""
  rng = np.random.default_rng(step)
  return {"params": {"w": rng.normal(size=(64, 48)).astype(np.float32),
                     "b": rng.normal(size=(48,)).astype(np.float32)},
          "fixed": {"table": rng.normal(size=(9, 8)).astype(np.float32)},
          "stats": {}, "step": np.int32(step)}


def abstract(step: int = 0):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                     sharding=device), reference(step))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A checkpoints folder holding STEPS (keep=3), written once."""
  directory = str(tmp_path_factory.mktemp("saved") / "checkpoints")
  ckpt = C.Checkpointer(directory, keep=3)
  for step in STEPS:
    ckpt.save(step, jax.tree.map(jnp.asarray, reference(step)))
  ckpt.close()
  return directory


@pytest.fixture
def copy(saved, tmp_path):
  target = str(tmp_path / "checkpoints")
  shutil.copytree(saved, target)
  return target


def delete_data(directory, step):
  os.remove(largest_array_file(directory, step))


def delete_metadata(directory, step):
  os.remove(os.path.join(directory, str(step), "default", "_METADATA"))


def delete_record(directory, step):
  os.remove(os.path.join(directory, str(step), C.RECORD))


FAULTS = {"truncated": (truncate, "bytes"), "deleted": (delete_data, "is missing"),
          "bit-flipped": (bit_flip, "sha256"), "no _METADATA": (delete_metadata, "_METADATA"),
          "no record": (delete_record, "no integrity record")}


def restore(directory):
  ckpt = C.Checkpointer(directory, keep=3)
  try:
    return ckpt.restore_latest(abstract())
  finally:
    ckpt.close()


def assert_state(state, step):
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(reference(step))):
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("damaged", [(15,), (15, 10)], ids=["newest", "two"])
def test_damaged_steps_fall_back_to_the_newest_good_one(copy, capsys, fault, damaged):
  inject, reason = FAULTS[fault]
  for step in damaged:
    inject(copy, step)
  state, step = restore(copy)
  good = max(set(STEPS) - set(damaged))
  assert step == good
  assert_state(state, good)
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == len(damaged), lines
  for line, bad in zip(lines, sorted(damaged, reverse=True)):
    assert line.startswith(f"checkpoint step {bad} is damaged:") and reason in line, line
    assert os.path.isdir(os.path.join(copy, "damaged", f"{bad}.1")), line
  assert C.list_steps(copy) == sorted(set(STEPS) - set(damaged))


def test_non_finite_values_are_damage(tmp_path, capsys):
  directory = str(tmp_path / "checkpoints")
  ckpt = C.Checkpointer(directory)
  ckpt.save(5, jax.tree.map(jnp.asarray, reference(5)))
  bad = reference(10)
  bad["params"]["w"][3, 4] = np.inf
  ckpt.save(10, jax.tree.map(jnp.asarray, bad))
  ckpt.close()
  state, step = restore(directory)
  assert step == 5
  assert_state(state, 5)
  assert "NaN or Inf, e.g. ['params']['w']" in capsys.readouterr().err


def test_no_good_step_is_one_error_and_stays_one(copy, capsys):
  for step in STEPS:
    bit_flip(copy, step)
  with pytest.raises(CheckpointError) as e:
    restore(copy)
  message = str(e.value)
  assert "\n" not in message and copy in message and "has no good checkpoint" in message
  assert all(f"step {s}: " in message for s in STEPS)
  assert sorted(os.listdir(os.path.join(copy, "damaged"))) == ["10.1", "15.1", "5.1"]
  # A second start does not quietly begin from scratch.
  with pytest.raises(CheckpointError, match="only the damaged steps"):
    restore(copy)
  capsys.readouterr()


def test_intact_step_of_another_layout_is_not_moved(copy):
  other = jax.tree.map(lambda a: jax.ShapeDtypeStruct((3,), a.dtype, sharding=a.sharding),
                       abstract())
  ckpt = C.Checkpointer(copy)
  with pytest.raises(CheckpointError, match="is intact"):
    ckpt.restore_latest(other)
  ckpt.close()
  assert C.list_steps(copy) == list(STEPS)


def test_steps_saved_before_records_are_adopted(copy, capsys):
  """A folder of an earlier version (no records): reading tells damage, and
  the trainer records what it finds, so later damage is caught."""
  for step in STEPS:
    os.remove(os.path.join(copy, str(step), C.RECORD))
  truncate(copy, 15)
  state, step = restore(copy)
  assert step == 10
  assert_state(state, 10)
  assert "checkpoint step 15 is damaged: cannot be read" in capsys.readouterr().err
  assert C.verify_step(copy, 10) == (None, False)  # adopted: a record, not of the save
  bit_flip(copy, 10)
  assert restore(copy)[1] == 5
  assert "step 10 is damaged" in capsys.readouterr().err


def _workdir(copy):
  workdir = os.path.dirname(copy)
  checkpoints.write_workdir_card(workdir, {"kind": "pretrain", "model": {}})
  return workdir


def test_load_weights_skips_damaged_steps_without_moving_them(copy, capsys):
  workdir = _workdir(copy)
  bit_flip(copy, 15)
  params, card = checkpoints.load_weights(workdir)
  assert card["step"] == 10
  ref = reference(10)
  np.testing.assert_array_equal(params["w"], ref["params"]["w"])
  np.testing.assert_array_equal(params["table"], ref["fixed"]["table"])
  assert "checkpoint step 15 is damaged" in capsys.readouterr().err
  assert C.list_steps(copy) == list(STEPS)  # a reader moves nothing
  for step in (10, 5):
    delete_data(copy, step)
  with pytest.raises(CheckpointError, match="has no good checkpoint"):
    checkpoints.load_weights(workdir)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EIO])
def test_failure_in_the_background_save_stops_at_the_next_save(tmp_path, monkeypatch, code):
  """The record is written in orbax's background thread: a failure there
  surfaces at the next save, and the older steps stay."""
  directory = str(tmp_path / "checkpoints")
  ckpt = C.Checkpointer(directory, keep=1)
  ckpt.save(5, jax.tree.map(jnp.asarray, reference(5)))
  ckpt.wait()

  def fail(folder, step):
    raise OSError(code, os.strerror(code), folder)
  monkeypatch.setattr(C, "write_record", fail)
  ckpt.save(10, jax.tree.map(jnp.asarray, reference(10)))
  with pytest.raises(CheckpointError) as e:
    ckpt.save(15, jax.tree.map(jnp.asarray, reference(15)))
  ckpt.close()
  message = str(e.value)
  assert os.strerror(code) in message and directory in message and "\n" not in message
  assert "saving checkpoint step 10" in message and "last good checkpoint is step 5" in message
  assert "MiB (the size of step 5)" in message
  assert os.listdir(directory) == ["5"]  # no half-written step left
  monkeypatch.undo()
  state, step = restore(directory)
  assert step == 5
  assert_state(state, 5)


def small_disk(tmp_path, size: str):
  """A tmpfs of `size` under tmp_path (skips where mounting is not allowed)."""
  mount = tmp_path / "small"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                    capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here")
  return mount


def test_full_disk_stops_the_save_and_keeps_the_last_step(tmp_path):
  mount = small_disk(tmp_path, "160k")
  try:
    directory = str(mount / "checkpoints")
    ckpt = C.Checkpointer(directory, keep=1)
    ckpt.save(5, jax.tree.map(jnp.asarray, reference(5)))
    ckpt.wait()
    big = reference(10)
    big["params"]["w"] = np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)
    with pytest.raises(CheckpointError) as e:
      ckpt.save(10, jax.tree.map(jnp.asarray, big))
      ckpt.wait()
    ckpt.close()
    message = str(e.value)
    assert "No space left on device" in message and "last good checkpoint is step 5" in message
    assert os.listdir(directory) == ["5"]  # no half-written step left
    state, step = restore(directory)
    assert step == 5
    assert_state(state, 5)
  finally:
    subprocess.run(["umount", str(mount)], check=False)


def test_keep_deletes_only_behind_complete_steps(tmp_path):
  directory = str(tmp_path / "checkpoints")
  ckpt = C.Checkpointer(directory, keep=2)
  for step in (5, 10, 15, 20):
    ckpt.save(step, jax.tree.map(jnp.asarray, reference(step % 15)))
  ckpt.close()
  assert C.list_steps(directory) == [15, 20]
  ckpt = C.Checkpointer(directory, keep=2)
  os.remove(os.path.join(directory, "20", C.RECORD))  # 20 no longer counts as complete
  ckpt.save(25, jax.tree.map(jnp.asarray, reference(0)))
  ckpt.close()
  assert C.list_steps(directory) == [15, 20, 25]  # 15 stays: only 25 is complete after it


# ---------------------------------------------------------------------------
# End to end: train.py on the demo config, 30 steps, a checkpoint every 5.

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("cache"))


def train(workdir, cache, *, code=None):
  """(exit status, stdout, stderr) of train.py (or `code` given its arguments)."""
  return _script_train(str(workdir), cache, code)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache):
  workdir = tmp_path_factory.mktemp("straight")
  status, out, err = train(workdir, cache)
  assert status == 0, out + err
  return workdir


def assert_same_final_state(a, b):
  (step_a, state_a), (step_b, state_b) = final_state(a), final_state(b)
  assert step_a == step_b == 30
  leaves_a, leaves_b = jax.tree.leaves(state_a), jax.tree.leaves(state_b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_kill_in_a_save_and_a_damaged_step_resume_bit_identically(tmp_path, cache, straight,
                                                                   capsys):
  """Killed inside the save of step 20, then step 15 bit-flipped: the export
  and the resume both use step 10, and training to the end gives the
  uninterrupted run's state bit for bit."""
  directory = str(tmp_path / "checkpoints")
  status, out, err = train(tmp_path, cache, code=KILLED_IN_SAVE)
  assert status == -9, out + err
  assert C.list_steps(directory) == [5, 10, 15]  # step 20 was never committed
  bit_flip(directory, 15)
  import convert_checkpoints  # pylint: disable=g-import-not-at-top
  assert convert_checkpoints.main(["to-torch", str(tmp_path), str(tmp_path / "w.pth")]) == 0
  assert "checkpoint step 15 is damaged" in capsys.readouterr().err
  assert C.list_steps(directory) == [5, 10, 15]  # the export moves nothing
  status, out, err = train(tmp_path, cache)
  assert status == 0, out + err
  assert "checkpoint step 15 is damaged: " in err and "sha256" in err
  assert f"resuming from {directory}/10" in out
  assert os.listdir(os.path.join(directory, "damaged")) == ["15.1"]
  assert_same_final_state(straight, tmp_path)


def test_full_disk_ends_the_run_with_one_line(tmp_path, cache):
  mount = small_disk(tmp_path, "3m")
  try:
    status, out, err = train(mount / "run", cache)
    assert status == 4, out + err  # an output that could not be written
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "No space left on device" in errors[0] and "last good checkpoint is step 5" in errors[0]
    assert C.list_steps(str(mount / "run" / "checkpoints")) == [5]
    assert C.verify_step(str(mount / "run" / "checkpoints"), 5) == (None, True)
    assert "step 30/30" not in out  # stopped, not trained on without saves
  finally:
    subprocess.run(["umount", str(mount)], check=False)
