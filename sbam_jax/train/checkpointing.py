"""Training checkpoints: orbax CheckpointManager (async, atomic, keep K).

The saved tree is the whole TrainState (step, parameters, fixed tables,
optimizer state, RNG); the data position is the step, since the input
pipeline can start at any step. SIGTERM (pre-emption) asks the loop to save
and exit at the next step boundary.
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
  """Set by SIGTERM; the loop checks it between steps."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def abstract_like(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)
