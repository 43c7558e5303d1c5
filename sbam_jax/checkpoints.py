"""This project's parameter checkpoints: an orbax PyTree plus a JSON card.

    <dir>/params/      orbax StandardCheckpointer tree of the model's state
                       (nnx.to_pure_dict of Params and fixed tables)
    <dir>/sbam_jax.json  what the tree is: kind, model config, classes, source
    <dir>/<extra>/     optional further trees, e.g. `adamw` (mu, nu, count) of a
                       converted PyTorch training checkpoint

Written under a temporary name beside the target and renamed into place, so a
reader never sees half a checkpoint. (Training checkpoints with optimizer
state use orbax's CheckpointManager in the training loop.)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

CARD = "sbam_jax.json"
FORMAT = "sbam_jax.params/1"


def save_params(directory: str, params: Any, card: dict, *, overwrite: bool = False,
                extra: dict | None = None) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not overwrite:
    raise FileExistsError(f"{directory} exists; pass --force to replace it")
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".", suffix=".tmp", dir=parent)
  try:
    ckptr = ocp.StandardCheckpointer()
    for name, tree in {"params": params, **(extra or {})}.items():
      ckptr.save(os.path.join(tmp, name), tree)
      ckptr.wait_until_finished()
    with open(os.path.join(tmp, CARD), "w") as f:
      json.dump({"format": FORMAT, **card, "extra": sorted(extra or {})}, f, indent=2,
                sort_keys=True)
    if os.path.exists(directory):
      old = tmp + ".old"
      os.replace(directory, old)
      os.replace(tmp, directory)
      shutil.rmtree(old)
    else:
      os.replace(tmp, directory)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


def load_params(directory: str) -> tuple[dict, dict]:
  """(nested dict of numpy arrays, card)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(directory)
  card_path = os.path.join(directory, CARD)
  if not os.path.isfile(card_path):
    raise FileNotFoundError(f"{directory} is not a sbam_jax parameter checkpoint "
                            f"(no {CARD})")
  with open(card_path) as f:
    card = json.load(f)
  if card.get("format") != FORMAT:
    raise ValueError(f"{card_path}: unknown format {card.get('format')!r}, expected {FORMAT}")
  tree = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"))
  return _to_numpy(tree), card


def load_extra(directory: str, name: str) -> dict:
  """A further tree saved beside the parameters (see `save_params(extra=...)`)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.abspath(directory), name)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{directory} holds no {name!r} tree")
  return _to_numpy(ocp.StandardCheckpointer().restore(path))


def _to_numpy(tree):
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)


def load_into(model, params: dict) -> None:
  """Overwrite an NNX module's state with a nested dict of arrays (same tree)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
