"""Training checkpoints: orbax CheckpointManager (async, atomic, keep K).

The saved tree is the whole TrainState (step, parameters, fixed tables,
optimizer state, RNG); the data position is the step, since the input
pipeline can start at any step. SIGTERM (pre-emption) asks the loop to save
and exit at a step boundary (on several processes: the same step on all).
"""

from __future__ import annotations

import os
import signal

import jax


class Checkpointer:
  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, *, force: bool = False) -> None:
    """Save `state` as `step` (a step already saved is left as it is)."""
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=self._ocp.args.StandardSave(state), force=force)

  def restore(self, step: int, abstract_state):
    """`abstract_state`: ShapeDtypeStructs with shardings (jax.eval_shape + shardings)."""
    return self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract_state))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class Preemption:
  """Set by SIGTERM; the loop asks `requested(step)` between steps.

  One process: a Python SIGTERM handler. Several processes (jax.distributed):
  the distributed runtime's preemption service, which hears SIGTERM on any
  process and agrees with all of them on the step to save at, so every
  process joins the (collective) checkpoint; a Python handler would replace
  the runtime's and leave the other processes training.
  """

  def __init__(self):
    self._flag = False
    self._multi = jax.process_count() > 1
    self._previous = None if self._multi else signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._flag = True

  def requested(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self._flag

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def abstract_like(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)
