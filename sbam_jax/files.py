"""File modes that honour the umask.

`tempfile.mkstemp` / `mkdtemp` create 0600 files and 0700 folders, and a
temporary name renamed into place keeps that mode: outputs another user or
a group job should read would be private. What the project writes through
a temporary name gets the mode a plain `open` / `os.makedirs` would give.
"""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=1)
def umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def honour_umask(path: str) -> None:
  """Give `path` (a file or a folder) the umask's default mode."""
  base = 0o777 if os.path.isdir(path) else 0o666
  os.chmod(path, base & ~umask())
