"""Read and write PyTorch `.pth` files without running pickled code.

Loading uses `torch.load(weights_only=True)` with an explicit allow-list: the
only non-tensor object the reference checkpoints hold is `args`, an
`argparse.Namespace`. Anything else a pickle asks to build (a class, a
function: the way malicious `.pth` files run code) is refused with a message
naming it. Writing goes to a temporary file in the target folder, then an
atomic rename: an interrupted conversion never leaves a half-written file.
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import zipfile
from typing import Any, Mapping

import numpy as np

ALLOWED_GLOBALS = (argparse.Namespace,)


class ConvertError(ValueError):
  """A checkpoint that cannot be converted; the message says why and what to do."""


def load_pth(path: str) -> Any:
  """The unpickled object of a `.pth`, tensors only plus Namespace `args`."""
  import torch  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise ConvertError(f"{path}: no such file")
  try:
    with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise ConvertError(
        f"{path}: refused to load: its pickle asks for something outside the allow-list "
        f"(tensors, containers, argparse.Namespace), which could run code. Loader said: "
        f"{str(e).splitlines()[0] if str(e) else e!r}") from None
  except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError) as e:
    raise ConvertError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def state_dict_of(obj: Any, path: str = "checkpoint") -> dict[str, np.ndarray]:
  """The model state dict inside a loaded `.pth` (under 'model', 'state_dict' or
  at the top level), as float32 numpy arrays (half precision goes through float32)."""
  import torch  # pylint: disable=g-import-not-at-top
  if isinstance(obj, Mapping):
    for key in ("model", "state_dict", "model_state"):
      if key in obj and isinstance(obj[key], Mapping):
        obj = obj[key]
        break
  if not isinstance(obj, Mapping) or not obj:
    raise ConvertError(f"{path}: holds no state dict (expected a dict of tensors, or one under "
                       f"'model' / 'state_dict')")
  out = {}
  for k, v in obj.items():
    if not isinstance(v, torch.Tensor):
      raise ConvertError(f"{path}: state dict entry {k!r} is a {type(v).__name__}, not a tensor")
    out[k] = v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
  return out


def save_pth(obj: Any, path: str, *, overwrite: bool = False) -> None:
  """torch.save to a temporary name beside `path`, then rename."""
  import torch  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise ConvertError(f"{path} exists; pass --force to replace it")
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
  os.close(fd)
  try:
    torch.save(obj, tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def to_torch_state_dict(arrays: Mapping[str, np.ndarray]) -> "dict":
  import torch  # pylint: disable=g-import-not-at-top
  return {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in arrays.items()}
