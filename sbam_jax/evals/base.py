"""The evaluator protocol, and building evaluators from `config.evals`.

A config lists evaluators in big_vision's manner:

    config.evals.knn = dict(type="knn", every=2, bank=240, queries=160)

`type` names a registered evaluator (`@registry.register("evaluator", name)`)
or `package.module:Class`; `every` is its cadence in epochs (it also runs
after the last step unless `final=False`, and before the first step of a
fresh run with `first=True`; 0 turns it off; unset: the task's `eval_every`);
every other key goes to the evaluator's constructor. An evaluator returns a
flat dict of numbers; the loop writes them as `<name>/<key>` to the progress
output, `metrics.jsonl` and TensorBoard without knowing the keys.
"""

from __future__ import annotations

import inspect
from typing import Mapping, Optional

from sbam_jax import registry
from sbam_jax.config import check_known
from sbam_jax.errors import ConfigError


class Evaluator:
  """Subclasses take the task (for its mesh, data sources and forward
  functions) and their own keyword arguments, and define `run(state)`."""

  def __init__(self, task, *, name: str, every: Optional[int] = None, final: bool = True,
               first: bool = False):
    self.task, self.name, self.final, self.first = task, name, final, first
    default = getattr(task.config, "eval_every", 1)
    self.every = default if every is None else int(every)
    if self.every < 0:
      raise ConfigError(f"evals.{name}.every must be >= 0 (epochs; 0 = off), got {every}")

  def due(self, step: int, steps_per_epoch: int, total_steps: int) -> bool:
    """At the end of every `every`-th epoch, and after the last step."""
    if not self.every:
      return False
    if step == 0:
      return self.first
    if step == total_steps:
      return self.final
    return bool(self.every) and step % (steps_per_epoch * self.every) == 0

  def run(self, state) -> dict:
    raise NotImplementedError

  def describe(self, metrics: dict) -> str:
    """The progress text of a result (default: every value)."""
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in metrics.items())

  def headline(self, metrics: dict) -> Optional[str]:
    """A few characters for the training progress line until the next run."""
    return None


def _arguments(cls) -> list:
  """The keyword arguments an evaluator class takes (its own and the base's)."""
  names = []
  for klass in cls.__mro__:
    init = klass.__dict__.get("__init__")
    if init is not None and klass is not object:
      names += [p.name for p in inspect.signature(init).parameters.values()
                if p.kind == p.KEYWORD_ONLY and p.name not in names]
  return names


def build_evaluators(task, evals: Mapping) -> list:
  """One evaluator per entry of `config.evals` (sorted by name)."""
  out = []
  for name in sorted(evals):
    if not isinstance(evals[name], Mapping):
      raise ConfigError(f"evals.{name} must be a dict, e.g. dict(type='knn', every=1), "
                        f"got {evals[name]!r}")
    spec = dict(evals[name])
    kind = spec.pop("type", None)
    if not kind:
      raise ConfigError(f"evals.{name} needs a type, e.g. dict(type='knn', every=1); known: "
                        f"{', '.join(registry.names('evaluator'))}")
    cls = registry.lookup("evaluator", kind, where=f"evals.{name}.type")
    check_known(spec, [a for a in _arguments(cls) if a != "name"], f"evals.{name}")
    every = spec.get("every")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int)):
      raise ConfigError(f"evals.{name}.every must be a whole number of epochs, got {every!r}")
    try:
      out.append(cls(task, name=name, **spec))
    except TypeError as e:
      raise ConfigError(f"evals.{name}: {e}") from None
  return out
