"""Stopping a run on request: save at a step boundary, then exit.

Every signal a user or scheduler sends to stop a job is handled like
pre-emption: SIGTERM (schedulers, `kill`), SIGINT (Ctrl-C; a second one
stops at once), SIGHUP (the terminal went away), SIGUSR1/SIGUSR2 (SLURM's
`--signal` warning). The run saves the current step and exits with
128 + the signal's number (143 for SIGTERM, 130 for SIGINT).

One process: Python handlers set a flag the loop reads between steps.
Several processes (jax.distributed): only the distributed runtime's
pre-emption service can agree with all processes on the step to save at, and
it listens to SIGTERM; the other signals are turned into a SIGTERM to this
process, so they take the same coordinated path.
"""

from __future__ import annotations

import os
import signal

import jax

STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1",
                                                 "SIGUSR2") if hasattr(signal, n))


class Preemption:
  """`requested(step)` between steps; `signal` says which one came."""

  def __init__(self):
    self.signal = None
    self._multi = jax.process_count() > 1
    self._previous = {}
    for sig in STOP_SIGNALS:
      if self._multi and sig == signal.SIGTERM:
        continue  # the runtime's own handler
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:
        pass  # not the main thread: no handlers, the loop runs to its end

  def _handle(self, signum, frame):
    del frame
    if self._multi:
      self.signal = signum
      os.kill(os.getpid(), signal.SIGTERM)
      return
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now
    self.signal = signum

  def requested(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal = self.signal or signal.SIGTERM
        return True
      return False
    return self.signal is not None

  @property
  def exit_status(self) -> int:
    return 128 + int(self.signal or signal.SIGTERM)

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


def name(signum) -> str:
  return signal.Signals(signum).name if signum else "SIGTERM"
