"""In steady state the loop never waits for the device between steps: no
value comes back to the host and nothing is waited for unless a progress
line, a save, an evaluation or a figure is due. Every read of a device
array's value and every `block_until_ready` is counted while steps 4..N-1
run (the first step compiles and captures the figure images; the last one
logs and saves). (JAX's transfer guard would be the natural tool, but on the
CPU backend arrays already live in host memory and it never fires.)"""

import os
import sys

import jax
from jax._src.array import ArrayImpl

from sbam_jax.train import loop, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import demo as demo_config  # noqa: E402


WATCH = {"on": False, "reads": []}


class _Watched:
  """The task's batches; reads are counted while steps 4..N-1 run."""

  def __init__(self, inner, total):
    self.inner, self.total = inner, total

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def __iter__(self):
    for i, batch in enumerate(self.inner, start=1):
      WATCH["on"] = 4 <= i < self.total
      yield batch
    WATCH["on"] = False


def _counting(original, what):
  def wrapped(self, *args):
    if WATCH["on"]:
      WATCH["reads"].append(what)
    return original(self, *args)
  return wrapped


def _run(tmp_path, monkeypatch, **overrides):
  original = pretrain.PretrainTask.data
  monkeypatch.setattr(pretrain.PretrainTask, "data",
                      lambda self, start: _Watched(original(self, start), self.total_steps))
  monkeypatch.setattr(ArrayImpl, "_value", property(_counting(ArrayImpl._value.fget, "read")))
  monkeypatch.setattr(ArrayImpl, "block_until_ready",
                      _counting(ArrayImpl.block_until_ready, "wait"))
  monkeypatch.setattr(jax, "block_until_ready", _counting(jax.block_until_ready, "wait"))
  WATCH["reads"] = []
  c = demo_config.get_config()
  c.epochs, c.warmup_epochs, c.random_epochs = 1, 0, 0
  c.log_every, c.log_seconds, c.checkpoint_every, c.figure_every = 1000, 1e6, 1000, 1000
  c.evals.knn.every = 0
  for k, v in overrides.items():
    setattr(c, k, v)
  assert loop.run(c, str(tmp_path)) == 0
  return WATCH["reads"]


def test_steady_state_steps_read_nothing_back(tmp_path, monkeypatch):
  assert _run(tmp_path / "quiet", monkeypatch) == []
  # Control: a line every 5 steps (5 and 10 fall in the watched steps) is seen.
  reads = _run(tmp_path / "lines", monkeypatch, log_every=5)
  assert reads.count("read") >= 2 and "wait" in reads, reads
