"""This project's parameter checkpoints: an orbax PyTree plus a JSON card.

    <dir>/params/      orbax StandardCheckpointer tree of the model's state
                       (nnx.to_pure_dict of Params and fixed tables)
    <dir>/sbam_jax.json  what the tree is: kind, model config, classes, source
    <dir>/<extra>/     optional further trees, e.g. `adamw` (mu, nu, count) of a
                       converted PyTorch training checkpoint

Written under a temporary name beside the target and renamed into place, so a
reader never sees half a checkpoint. At a URL (gs://), where folders cannot
be renamed, the folder is assembled in a local temporary folder and uploaded
file by file, the card last: a folder without its card is not a checkpoint
to any reader here, so a reader never takes half of one.

A training workdir (train.py) holds its own card (`sbam_jax.json`, format
`sbam_jax.workdir/1`) beside `checkpoints/` (orbax CheckpointManager of the
whole TrainState); `load_weights` reads either kind of folder, the workdir's
newest step that verifies (train/checkpointing.py), weights only (params +
fixed tables + statistics).

The card (`sbam_jax.json`) is JSON with: `format` (`sbam_jax.params/1` or
`sbam_jax.workdir/1`), `kind` (`pretrain` | `encoder` | `finetuned` |
`linprobe`), `model` (every ModelConfig field), `num_classes`, `global_pool`
(classifiers: mean of patch tokens + fc_norm, else cls token after norm), and
optionally `classes` (label names), `source` / `source_format` (what it was
converted from), `epoch` and `adamw_step` (a converted training checkpoint),
`extra` (names of further trees).

Python API: `load_model(path)` -> (ready NNX model, its ModelConfig, card)
for any such folder; `save_model(dir, model)` writes a folder that
`convert_checkpoints.py to-torch` exports.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, NamedTuple, Optional

import numpy as np

from sbam_jax import files
from sbam_jax.files import honour_umask

CARD = "sbam_jax.json"
FORMAT = "sbam_jax.params/1"
WORKDIR_FORMAT = "sbam_jax.workdir/1"


def write_folder(directory: str, fill) -> None:
  """Create `directory` atomically: `fill(tmp)` writes into a temporary folder
  beside it, which then replaces `directory` (an existing one included) by
  renames, so a reader never sees half of it. A URL: see the module docstring."""
  if files.is_remote(directory):
    _write_remote_folder(directory, fill)
    return
  directory = os.path.abspath(directory)
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".", suffix=".tmp", dir=parent)
  try:
    honour_umask(tmp)  # (mkdtemp makes it 0700)
    fill(tmp)
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


def _write_remote_folder(directory: str, fill) -> None:
  """Fill a local scratch folder (local by nature: orbax, torch and
  safetensors write files there), then upload it, the card last; an earlier
  folder there is deleted first."""
  with tempfile.TemporaryDirectory(prefix="sbam_jax-") as scratch:
    fill(scratch)
    if files.exists(directory):
      files.rmtree(directory)
    files.upload_tree(scratch, directory, last=CARD)


def save_params(directory: str, params: Any, card: dict, *, overwrite: bool = False,
                extra: dict | None = None) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = files.abspath(directory)
  if files.exists(directory) and not overwrite:
    raise FileExistsError(f"{directory} exists; pass --force to replace it")

  def fill(tmp):
    ckptr = ocp.StandardCheckpointer()
    for name, tree in {"params": params, **(extra or {})}.items():
      ckptr.save(os.path.join(tmp, name), tree)
      ckptr.wait_until_finished()
    with open(os.path.join(tmp, CARD), "w") as f:  # (tmp is local: see write_folder)
      json.dump({"format": FORMAT, **card, "extra": sorted(extra or {})}, f, indent=2,
                sort_keys=True)

  write_folder(directory, fill)


def read_card(directory: str, what: str) -> dict:
  card_path = files.join(directory, CARD)
  if not files.isfile(card_path):
    raise FileNotFoundError(f"{directory} {what} (no {CARD})")
  return json.loads(files.read_text(card_path))


def load_params(directory: str) -> tuple[dict, dict]:
  """(nested dict of numpy arrays, card)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = files.abspath(directory)
  card = read_card(directory, "is not a sbam_jax parameter checkpoint")
  card_path = files.join(directory, CARD)
  if card.get("format") != FORMAT:
    raise ValueError(f"{card_path}: unknown format {card.get('format')!r}, expected {FORMAT}")
  tree = ocp.StandardCheckpointer().restore(files.join(directory, "params"))
  return _to_numpy(tree), card


def load_extra(directory: str, name: str) -> dict:
  """A further tree saved beside the parameters (see `save_params(extra=...)`)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = files.join(files.abspath(directory), name)
  if not files.isdir(path):
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


def write_text(path: str, text: str) -> None:
  """Readers never see half a file (files.write_atomic)."""
  files.write_atomic(path, text, fsync=False)


def write_workdir_card(workdir: str, card: dict) -> None:
  """What a training workdir holds (kind, model config, classes)."""
  write_text(files.join(workdir, CARD),
             json.dumps({"format": WORKDIR_FORMAT, **card}, indent=2, sort_keys=True))


def deep_merge(*trees: dict) -> dict:
  """Union of nested dicts with disjoint leaves (e.g. params and fixed tables)."""
  out: dict = {}
  for tree in trees:
    for k, v in tree.items():
      if isinstance(v, dict) and isinstance(out.get(k), dict):
        out[k] = deep_merge(out[k], v)
      elif k in out:
        raise ValueError(f"key {k!r} is in more than one tree")
      else:
        out[k] = v
  return out


def load_weights(path: str) -> tuple[dict, dict]:
  """(full model state as a nested dict of numpy arrays, card) from a parameter
  checkpoint or a training workdir: its newest step that passes the trainer's
  verification (integrity record, readable, finite); damaged newer steps are
  reported on stderr and skipped, never moved (a run may be writing them)."""
  path = files.abspath(path)
  card = read_card(path, "is neither a sbam_jax checkpoint nor a training workdir (convert "
                         "PyTorch .pth files with convert_checkpoints.py)")
  if card.get("format") != WORKDIR_FORMAT:
    return load_params(path)
  from sbam_jax.errors import CheckpointError  # pylint: disable=g-import-not-at-top
  from sbam_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
  directory = files.join(path, "checkpoints")
  if not checkpointing.list_steps(directory):
    raise FileNotFoundError(f"training workdir {path} has no checkpoint yet")
  step, params, damaged = checkpointing.newest_good(
      directory, lambda s: _workdir_weights(directory, s))
  checkpointing.report_damaged(directory, damaged, move=False)
  if step is None:
    raise CheckpointError(checkpointing.no_good_message(
        directory, [f"step {s}: {r}" for s, r in damaged], moved=False))
  return params, {**card, "step": int(step)}


def _workdir_weights(directory: str, step: int) -> dict:
  """Weights only (params + fixed tables + statistics) of one training step."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top  (orbax's path type)
  from sbam_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
  item = files.join(directory, str(step), "default")
  meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item))
  tree = meta.tree if hasattr(meta, "tree") else meta
  wanted = {k: tree[k] for k in ("params", "fixed", "stats") if k in tree}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  out = ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
      item=wanted, restore_args=restore_args, partial_restore=True))
  weights = _to_numpy(deep_merge(*(out[k] for k in wanted)))
  checkpointing.check_finite(weights, lambda x: bool(np.isfinite(x).all()))
  return weights


class LoadedModel(NamedTuple):
  model: Any    # MaskedAutoencoder | Encoder | VisionTransformer, weights loaded
  config: Any   # its ModelConfig
  card: dict


_EXECUTION_FIELDS = ("dtype", "scan_layers", "attention", "remat")


def load_model(path: str, **execution) -> LoadedModel:
  """A ready model from a converted checkpoint folder or a training workdir.

  `execution` may set how (not what) the model computes: dtype, scan_layers,
  attention, remat (see ModelConfig).
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sbam_jax import models  # pylint: disable=g-import-not-at-top
  bad = sorted(set(execution) - set(_EXECUTION_FIELDS))
  if bad:
    raise ValueError(f"load_model: {bad} are not execution options {_EXECUTION_FIELDS}; the "
                     f"architecture comes from the card")
  params, card = load_weights(path)
  cfg = models.ModelConfig(**{**card["model"], **execution})
  kind, rngs = card["kind"], nnx.Rngs(0)
  if kind == "pretrain":
    model = models.MaskedAutoencoder(cfg, rngs=rngs)
  elif kind == "encoder":
    model = models.Encoder(cfg, rngs=rngs)
  elif kind in ("finetuned", "linprobe"):
    model = models.VisionTransformer(cfg, int(card["num_classes"]),
                                     global_pool=bool(card.get("global_pool", True)),
                                     probe=kind == "linprobe", rngs=rngs)
  else:
    raise ValueError(f"{path}: unknown kind {kind!r} in its card")
  load_into(model, params)
  return LoadedModel(model, cfg, card)


def save_model(directory: str, model, config: Optional[Any] = None, *, overwrite: bool = False,
               classes: Optional[list] = None) -> dict:
  """Save an NNX model as a parameter checkpoint (`load_model`, `to-torch` read it).

  `config` is the model's ModelConfig (taken from the model when it keeps one,
  as MaskedAutoencoder does). Returns the card written.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sbam_jax import models  # pylint: disable=g-import-not-at-top
  config = config if config is not None else getattr(model, "cfg", None)
  if config is None:
    raise ValueError(f"save_model: pass the ModelConfig of this {type(model).__name__}")
  card: dict = {"model": dataclasses.asdict(config), "num_classes": 0, "global_pool": True,
                "source": "sbam_jax.checkpoints.save_model"}
  if isinstance(model, models.MaskedAutoencoder):
    card["kind"] = "pretrain"
  elif isinstance(model, models.Encoder):
    card["kind"] = "encoder"
  elif isinstance(model, models.VisionTransformer):
    card.update(kind="linprobe" if model.head_bn is not None else "finetuned",
                num_classes=int(model.head.out_features), global_pool=bool(model.global_pool))
  else:
    raise ValueError(f"save_model: {type(model).__name__} is not a model of this project")
  if classes is not None:
    card["classes"] = [str(c) for c in classes]
  params = _to_numpy(nnx.to_pure_dict(nnx.state(model)))
  save_params(directory, params, card, overwrite=overwrite)
  return card
