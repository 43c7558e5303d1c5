"""Named plug-ins: tasks, evaluators, data sources and optimizers.

A config names what it wants (`task = "pretrain"`, `evals.knn.type = "knn"`,
`data.source = "folder"`, `optimizer = "lars"`); this module turns the name
into the class or function. Plug-ins register themselves with `@register`;
the built-in ones are imported on first lookup (by module name, so the
registry imports nothing of the project and no import circle can pass
through it). For tasks, evaluators and sources a name of the form
`package.module:attr` imports that module and takes the attribute, so a
plug-in defined anywhere works without registration (optimizers are a
registered name or an optax optimizer, see optim.build).
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

from sbam_jax.errors import ConfigError

KINDS = ("task", "evaluator", "source", "optimizer")
# Modules whose import registers the built-in plug-ins of each kind.
BUILTIN = {
    "task": ("sbam_jax.train.pretrain", "sbam_jax.train.classify"),
    "evaluator": ("sbam_jax.evals.classification", "sbam_jax.evals.monitor"),
    "source": ("sbam_jax.data.sources",),
    "optimizer": ("sbam_jax.optim",),
}
_TABLES: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
_LOADED: set[str] = set()


def register(kind: str, name: str) -> Callable:
  """Decorator: make `obj` available as `name` among the `kind` plug-ins."""
  if kind not in KINDS:
    raise ValueError(f"unknown plug-in kind {kind!r}; kinds are {KINDS}")

  def add(obj):
    _TABLES[kind][name] = obj
    return obj

  return add


def _load_builtins(kind: str) -> None:
  if kind not in _LOADED:
    _LOADED.add(kind)
    for module in BUILTIN[kind]:
      importlib.import_module(module)


def names(kind: str) -> list[str]:
  _load_builtins(kind)
  return sorted(_TABLES[kind])


def lookup(kind: str, name: str, *, where: str = "") -> Any:
  """The plug-in registered as `name`, or `module:attr`; a ConfigError naming
  the config field (`where`) and the known names otherwise."""
  where = where or kind
  table = _TABLES[kind]
  if name not in table:
    _load_builtins(kind)
  if name in table:
    return table[name]
  if isinstance(name, str) and ":" in name:
    module, _, attr = name.partition(":")
    try:
      return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
      raise ConfigError(f"{where}={name!r}: cannot import it ({e})") from None
  close = difflib.get_close_matches(str(name), table, n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  raise ConfigError(f"{where}={name!r} is not a known {kind}{hint}; known: "
                    f"{', '.join(sorted(table))}, or 'package.module:Name'")
