"""Putting loaded weights into a model's state, names and shapes checked."""

from __future__ import annotations

import dataclasses

import numpy as np

from sbam_jax.errors import ConfigError


def take(loaded: dict, like: dict, what: str, path: str = "") -> dict:
  """The entries of `loaded` that the tree `like` has, names and shapes checked."""
  if isinstance(like, dict):
    if not isinstance(loaded, dict):
      raise ConfigError(f"{what}: {path or 'root'} is an array, the model has a subtree")
    missing = sorted(set(like) - set(loaded))
    if missing:
      raise ConfigError(f"{what} lacks {', '.join(f'{path}{k}' for k in missing)}")
    return {k: take(loaded[k], v, what, f"{path}{k}/") for k, v in like.items()}
  if tuple(np.shape(loaded)) != tuple(np.shape(like)):
    raise ConfigError(f"{what}: {path.rstrip('/')} has shape {np.shape(loaded)}, "
                      f"the model needs {np.shape(like)}")
  return np.asarray(loaded, np.float32)


def model_card(kind: str, cfg, **more) -> dict:
  """What a workdir's weights are (`sbam_jax.json`): kind, model config, extras."""
  return {"kind": kind, "model": dataclasses.asdict(cfg), **more}
