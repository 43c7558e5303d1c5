"""Map between reference PyTorch state dicts and this project's parameters.

Both sides are plain mappings of numpy arrays: PyTorch keys such as
`blocks.3.attn.qkv.weight`, and this project's nested parameter dict (the
`to_pure_dict()` of an NNX state) such as
`encoder/blocks/layers/attn/qkv/kernel[3]`. Names follow from a few rules:

- `encoder/` is dropped (the reference model is flat);
- stacked blocks `<stack>/layers/...` hold layer i of `<stack>.i....`;
- `patch_embed` is the reference's `patch_embed.proj` conv;
- Linear `kernel` (in, out) is `weight` (out, in) transposed; the patch
  kernel (p, p, C, D) is the conv weight (D, C, p, p) transposed; LayerNorm
  `scale` is `weight`; everything else is carried as is.

Every transform is a transpose, so a round trip is bit-exact.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from flax import traverse_util

STACKS = ("blocks", "decoder_blocks")


class MappingError(ValueError):
  """Missing, unexpected or mis-shaped keys, all listed by name."""


def torch_key_for(path: tuple[str, ...]) -> tuple[str, str, bool]:
  """JAX path -> (torch key, with '{i}' for a stacked layer; transform; stacked)."""
  parts = [p for p in path if p != "encoder"]
  stacked = False
  if len(parts) > 1 and parts[0] in STACKS and parts[1] == "layers":
    parts = [parts[0], "{i}"] + parts[2:]
    stacked = True
  leaf = parts[-1]
  transform = "same"
  if parts[0] == "patch_embed":
    parts = ["patch_embed", "proj"] + parts[1:]
    transform = "conv" if leaf == "kernel" else "same"
  elif leaf == "kernel":
    transform = "linear"
  if leaf in ("kernel", "scale"):
    parts[-1] = "weight"
  return ".".join(parts), transform, stacked


# Axis permutations (JAX -> torch, torch -> JAX) for each transform.
_PERMS = {"linear": ((1, 0), (1, 0)), "conv": ((3, 2, 0, 1), (2, 3, 1, 0))}


def _relayout(x: np.ndarray, transform: str, to_torch: bool) -> np.ndarray:
  if transform not in _PERMS:
    return x
  return np.ascontiguousarray(x.transpose(_PERMS[transform][0 if to_torch else 1]))


def _torch_shape(shape: tuple, transform: str) -> tuple:
  return tuple(_relayout(np.empty(shape, np.bool_), transform, True).shape)


def params_to_torch(params: Mapping) -> dict[str, np.ndarray]:
  """Nested JAX parameter dict -> flat reference state dict (numpy arrays)."""
  out = {}
  for path, value in traverse_util.flatten_dict(dict(params)).items():
    key, transform, stacked = torch_key_for(path)
    value = np.asarray(value)
    if stacked:
      for i in range(value.shape[0]):
        out[key.format(i=i)] = _relayout(value[i], transform, True)
    else:
      out[key] = _relayout(value, transform, True)
  return out


def params_from_torch(state_dict: Mapping[str, np.ndarray], template: Mapping, *,
                      ignore_unexpected: tuple[str, ...] = ()) -> dict:
  """Reference state dict -> nested JAX dict shaped like `template`.

  `template` is a nested dict whose leaves have `.shape` (e.g. the pure dict of
  `nnx.eval_shape(...)`); every leaf must be found with the right shape, and
  every torch key must be used (except prefixes in `ignore_unexpected`).
  Raises MappingError listing all missing, unexpected and mis-shaped keys.
  """
  used, missing, mismatched, flat = set(), [], [], {}
  for path, leaf in traverse_util.flatten_dict(dict(template)).items():
    key, transform, stacked = torch_key_for(path)
    shape = tuple(leaf.shape)
    keys = [key.format(i=i) for i in range(shape[0])] if stacked else [key]
    absent = [k for k in keys if k not in state_dict]
    used.update(k for k in keys if k in state_dict)
    if absent:
      missing.extend(absent)
      continue
    parts = [_relayout(np.asarray(state_dict[k]), transform, False) for k in keys]
    want = shape[1:] if stacked else shape
    bad = [f"{k}: got {tuple(np.shape(state_dict[k]))}, expected {_torch_shape(want, transform)}"
           for k, p in zip(keys, parts) if p.shape != want]
    if bad:
      mismatched.extend(bad)
      continue
    value = np.stack(parts) if stacked else parts[0]
    flat[path] = value
  unexpected = sorted(k for k in state_dict if k not in used
                      and not any(k.startswith(p) for p in ignore_unexpected))
  if missing or unexpected or mismatched:
    lines = []
    if missing:
      lines.append("missing keys: " + ", ".join(missing))
    if unexpected:
      lines.append("unexpected keys: " + ", ".join(unexpected))
    if mismatched:
      lines.append("shape mismatches: " + "; ".join(mismatched))
    raise MappingError("state dict does not match the model:\n  " + "\n  ".join(lines))
  return traverse_util.unflatten_dict(flat)
