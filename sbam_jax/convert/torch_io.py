"""Read and write PyTorch `.pth` and `.safetensors` files without running pickled code.

A file is first recognised by its opening bytes (zip or pickle: a `.pth`; an
8-byte header length then `{`: safetensors), so text or random bytes are
called what they are instead of failing deep inside a loader. `.pth` files
load with `torch.load(weights_only=True)` and an explicit allow-list: the only
non-tensor object the reference checkpoints hold is `args`, an
`argparse.Namespace`. Anything else a pickle asks to build (a class, a
function: the way malicious `.pth` files run code) is refused with a message
naming it. Writing goes to a temporary file in the target folder, then an
atomic rename: an interrupted conversion never leaves a half-written file.
Paths may be URLs (gs://): the loaders read a downloaded copy in a local
temporary folder, a file to write is made there and uploaded as one object.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import pickletools
import re
import io
import struct
import tempfile
import warnings
import zipfile
from typing import Any, Callable, Mapping

import numpy as np

from sbam_jax import files
from sbam_jax.files import honour_umask

ALLOWED_GLOBALS = (argparse.Namespace,)
PTH, SAFETENSORS = "pth", "safetensors"
_SAFE_NAMES = {"collections.OrderedDict", "argparse.Namespace", "_codecs.encode", "builtins.set",
               "builtins.frozenset", "builtins.bytearray", "builtins.slice", "builtins.complex"}


class ConvertError(ValueError):
  """A checkpoint that cannot be converted; the message says why and what to do."""


def sniff(path: str) -> str:
  """PTH or SAFETENSORS from the file's opening bytes; ConvertError otherwise."""
  if files.isdir(path):
    raise ConvertError(f"{path} is a folder; expected a checkpoint file (.pth or .safetensors)")
  if not files.isfile(path):
    raise ConvertError(f"{path}: no such file")
  with files.open_file(path, "rb") as f:
    head = f.read(16)
  size = files.stat(path).size
  if not head:
    raise ConvertError(f"{path} is empty: not a checkpoint")
  if head[:4] == b"PK\x03\x04" or (head[0] == 0x80 and 2 <= head[1] <= 5):
    return PTH
  if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
    return SAFETENSORS
  try:
    head.decode("utf-8")
    looks = "it looks like text"
  except UnicodeDecodeError:
    looks = f"it starts with bytes {head[:8].hex(' ')}"
  raise ConvertError(f"{path} is not a checkpoint: neither a PyTorch .pth (zip or pickle) nor a "
                     f".safetensors file ({looks})")


def _pickle_bytes(path: str) -> bytes:
  data = io.BytesIO(files.read_bytes(path))
  if zipfile.is_zipfile(data):
    with zipfile.ZipFile(data) as z:
      names = [n for n in z.namelist() if n.endswith("data.pkl")]
      return z.read(names[0]) if names else b""
  return data.getvalue()


def pickle_globals(data: bytes) -> list[str]:
  """'module.name' of every GLOBAL / STACK_GLOBAL a pickle asks for, read from
  its opcodes without executing anything (strings tracked through the memo)."""
  found, strings, memo = [], [], {}
  try:
    for op, arg, _ in pickletools.genops(data):
      if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
        strings.append(arg)
      elif op.name == "MEMOIZE" and strings:
        memo[len(memo)] = strings[-1]
      elif op.name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
        strings.append(memo[arg])
      elif op.name == "GLOBAL":
        found.append(arg.replace(" ", "."))
      elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
        found.append(f"{strings[-2]}.{strings[-1]}")
  except Exception:  # pylint: disable=broad-except  (a damaged tail: keep what was read)
    pass
  return found


def _refusal(path: str, loader_message: str) -> ConvertError:
  """Name the globals a refused pickle wanted; never repeat the loader's advice."""
  named = re.findall(r"GLOBAL ([\w.]+)", loader_message)
  if not named:
    named = [g for g in pickle_globals(_pickle_bytes(path))
             if not g.startswith("torch.") and g not in _SAFE_NAMES]
  named = list(dict.fromkeys(named))
  what = (f"it asks for {', '.join(named)}" if named
          else "its pickle uses instructions the safe loader does not accept")
  return ConvertError(f"{path}: refused to load: {what}, outside the allow-list (tensors, "
                      f"containers, argparse.Namespace); loading it could run code. Re-save the "
                      f"weights alone (a dict of tensors, or .safetensors) from a trusted copy")


def load_pth(path: str) -> Any:
  """The unpickled object of a `.pth`, tensors only plus Namespace `args`."""
  import torch  # pylint: disable=g-import-not-at-top
  sniff(path)
  try:
    with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)), warnings.catch_warnings():
      warnings.simplefilter("ignore")  # e.g. "pickle protocol 4": the outcome is reported below
      with files.local_copy(path) as local:
        return torch.load(local, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise _refusal(path, str(e)) from None
  except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
    raise ConvertError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def load_safetensors(path: str) -> dict:
  """{name: torch tensor} of a `.safetensors` file (no code can run: it holds no pickle)."""
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  sniff(path)
  try:
    with files.local_copy(path) as local:
      return load_file(local)
  except (SafetensorError, OSError, ValueError) as e:
    raise ConvertError(f"{path}: not a readable .safetensors file (truncated or corrupt?): "
                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def load_checkpoint(path: str) -> tuple[Any, str]:
  """(loaded object, PTH | SAFETENSORS) of a checkpoint file of either kind."""
  kind = sniff(path)
  return (load_pth(path) if kind == PTH else load_safetensors(path)), kind


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


def check_file_target(path: str, what: str) -> None:
  """A file output must not land on a folder."""
  if files.isdir(path):
    raise ConvertError(f"{path} is a folder; {what} writes a file (.pth or .safetensors): "
                       f"give a file name")


def _atomic_file(path: str, write: Callable[[str], None], overwrite: bool) -> None:
  path = files.abspath(path)
  check_file_target(path, "this format")
  if files.exists(path) and not overwrite:
    raise ConvertError(f"{path} exists; pass --force to replace it")
  if files.is_remote(path):  # written in local scratch space, then one upload
    with tempfile.TemporaryDirectory(prefix="sbam_jax-") as scratch:
      local = os.path.join(scratch, files.basename(path))
      write(local)
      files.copy_file(local, path)
    return
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
  os.close(fd)
  try:
    write(tmp)
    honour_umask(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def save_pth(obj: Any, path: str, *, overwrite: bool = False) -> None:
  """torch.save to a temporary name beside `path`, then rename."""
  import torch  # pylint: disable=g-import-not-at-top
  _atomic_file(path, lambda tmp: torch.save(obj, tmp), overwrite)


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str, *, overwrite: bool = False,
                     metadata: Mapping[str, str] | None = None) -> None:
  """A float32 `.safetensors` file (metadata: string values only), written atomically."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  sd = to_torch_state_dict(tensors)
  meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
  _atomic_file(path, lambda tmp: save_file(sd, tmp, metadata=meta), overwrite)


def read_json(path: str) -> dict:
  try:
    return json.loads(files.read_text(path))
  except (OSError, ValueError) as e:
    raise ConvertError(f"{path}: not readable JSON: {e}") from None


def to_torch_state_dict(arrays: Mapping[str, np.ndarray]) -> "dict":
  import torch  # pylint: disable=g-import-not-at-top
  return {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in arrays.items()}
