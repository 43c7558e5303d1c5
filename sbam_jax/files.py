"""The project's one file layer: local paths, or cloud-storage URLs (`gs://...`).

Every file the project reads or writes goes through here, so a workdir, a
dataset folder, `init_from` or a converter's input and output may each be a
local path or a URL. Local paths take a fast path with `os` (modes honour
the umask, writes are temporary name + fsync + rename). A URL (`scheme://`,
anything fsspec serves: gs:// through gcsfs) goes through fsspec, with these
differences, which the callers rely on:

- no rename: `write_atomic` uploads one object, which the store publishes
  whole or not at all (a GCS object is written once; a reader sees the old
  or the new one). `move` is copy + delete, not atomic.
- no folders: a folder exists while an object lies under its prefix;
  `makedirs` does nothing, an emptied folder is gone.
- no append, no pid: callers rewrite whole objects and do without process
  liveness (see train/workdir.py's lock).
- `create_exclusive` writes an object only if none exists (GCS: the
  `ifGenerationMatch=0` precondition).

Orbax and tfds reach the same URLs through etils.epath; `sbam_jax/__init__.py`
sets epath to fsspec (`EPATH_USE_TF=false`) so both use the same client.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import types
from typing import Iterator, NamedTuple, Optional

from sbam_jax import store


# ---------------------------------------------------------------------------
# Modes


@functools.lru_cache(maxsize=1)
def umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def honour_umask(path: str) -> None:
  """Give local `path` (a file or a folder) the umask's default mode:
  `mkstemp` / `mkdtemp` make 0600 / 0700, which a rename keeps."""
  base = 0o777 if os.path.isdir(path) else 0o666
  os.chmod(path, base & ~umask())


# ---------------------------------------------------------------------------
# Names


def is_remote(path) -> bool:
  """Whether `path` is a URL (`gs://b/x`), not a local path."""
  return "://" in str(path) and not str(path).startswith("file://")


def abspath(path: str) -> str:
  return str(path) if is_remote(path) else os.path.abspath(path)


def join(*parts: str) -> str:
  return os.path.join(*map(str, parts))  # '/'-separated: right for URLs too


def basename(path: str) -> str:
  return os.path.basename(str(path).rstrip("/"))


def dirname(path: str) -> str:
  return os.path.dirname(str(path).rstrip("/"))


def _fs(path: str):
  """(the store's fsspec filesystem, path without the scheme). The store is
  probed at first use (`store.check`: one line, not a minute of retries).
  Listings are not cached: orbax (tensorstore) and other processes write
  the same bucket. Its methods raise OSError for the client's own errors."""
  import fsspec  # pylint: disable=g-import-not-at-top
  store.check(path)
  protocol = str(path).split("://", 1)[0]
  fs = fsspec.filesystem(protocol, use_listings_cache=False)
  return _Translated(fs), fs._strip_protocol(str(path))  # pylint: disable=protected-access


class _Translated:
  """A filesystem whose calls (and the generators they return) raise
  OSError for a storage client's exceptions (gcsfs's HttpError is not
  one), so every `except OSError` here and in the callers applies."""

  def __init__(self, fs):
    self._fs = fs

  def __getattr__(self, name):
    attr = getattr(self._fs, name)
    if not callable(attr):
      return attr

    def call(*args, **kwargs):
      with _client_errors():
        out = attr(*args, **kwargs)
      return _translated_items(out) if isinstance(out, types.GeneratorType) else out
    return call


def _translated_items(gen):
  with _client_errors():
    yield from gen


@contextlib.contextmanager
def _client_errors():
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    err = store.as_oserror(e)
    if err is None:
      raise
    raise err from e


# ---------------------------------------------------------------------------
# Queries


def exists(path: str) -> bool:
  if not is_remote(path):
    return os.path.exists(path)
  fs, p = _fs(path)
  return fs.exists(p)


def isdir(path: str) -> bool:
  if not is_remote(path):
    return os.path.isdir(path)
  fs, p = _fs(path)
  return fs.isdir(p)


def isfile(path: str) -> bool:
  if not is_remote(path):
    return os.path.isfile(path)
  fs, p = _fs(path)
  return fs.isfile(p)


def listdir(path: str) -> list[str]:
  """Names in a folder, sorted (FileNotFoundError if there is none)."""
  if not is_remote(path):
    return sorted(os.listdir(path))
  fs, p = _fs(path)
  if not fs.isdir(p):
    raise FileNotFoundError(2, "No such folder", str(path))
  return sorted({basename(e) for e in fs.ls(p, detail=False)} - {""})


def walk(path: str) -> Iterator[tuple[str, list[str], list[str]]]:
  """(folder, sub-folder names, file names), top-down like os.walk, names
  sorted; folders are full paths / URLs. A remote walk lists each prefix
  explicitly (epath's recursive glob is refused on gs://)."""
  if not is_remote(path):
    for root, dirs, names in os.walk(path):
      dirs.sort()
      yield root, dirs, sorted(names)
    return
  fs, p = _fs(path)
  scheme = str(path).split("://", 1)[0]
  for root, dirs, names in fs.walk(p):
    yield f"{scheme}://{root}", sorted(dirs), sorted(names)


def find(path: str) -> list[str]:
  """Every file under `path`, ordered by folder, then name (os.walk's
  listing, sorted: the order a local folder walk gives)."""
  return [join(root, n) for root, _, names in sorted(walk(path)) for n in sorted(names)]


class Stat(NamedTuple):
  size: int
  mtime: float


def stat(path: str) -> Optional[Stat]:
  """Size and modification time, or None for a file that is not there (it
  went away meanwhile, e.g. another process's temporary file)."""
  try:
    if not is_remote(path):
      st = os.stat(path)
      return Stat(st.st_size, st.st_mtime)
    fs, p = _fs(path)
    info = fs.info(p)
  except (OSError, ValueError):
    return None
  mtime = info.get("mtime") or info.get("updated") or info.get("LastModified")
  if hasattr(mtime, "timestamp"):
    mtime = mtime.timestamp()
  elif isinstance(mtime, str):
    import datetime  # pylint: disable=g-import-not-at-top
    mtime = datetime.datetime.fromisoformat(mtime.replace("Z", "+00:00")).timestamp()
  return Stat(int(info.get("size") or 0), float(mtime or 0.0))


# ---------------------------------------------------------------------------
# Reading


def open_file(path: str, mode: str = "rb"):
  """A file object; for writing prefer `write_atomic`."""
  if not is_remote(path):
    return open(path, mode)  # pylint: disable=unspecified-encoding
  fs, p = _fs(path)
  # gcsfs's default 'adaptive' cache (a background prefetcher) was seen to
  # hang reads; plain read-ahead is what sequential reads here need.
  return fs.open(p, mode, cache_type="readahead") if "r" in mode else fs.open(p, mode)


def read_bytes(path: str) -> bytes:
  if is_remote(path):
    fs, p = _fs(path)
    return fs.cat_file(p)  # one request, no file object
  with open(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
  """A local path holding `path`'s file: itself, or a download into a
  temporary folder (for libraries that only open local files: torch.load,
  safetensors, TFRecord readers), removed afterwards."""
  if not is_remote(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="sbam_jax-") as scratch:
    local = os.path.join(scratch, basename(path))
    fs, p = _fs(path)
    fs.get_file(p, local)
    yield local


# ---------------------------------------------------------------------------
# Writing


def makedirs(path: str) -> None:
  """Create a folder and its parents (no-op on an object store)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def write_atomic(path: str, data, *, fsync: bool = True) -> None:
  """Write `data` (bytes or str) so that a reader sees all of it or none.

  Locally: a temporary name in the same folder (mode from the umask),
  fsync, rename. On an object store: one upload, which the store publishes
  whole (GCS objects are write-once; an existing object is replaced
  atomically); no temporary name."""
  data = data.encode("utf-8") if isinstance(data, str) else bytes(data)
  if is_remote(path):
    fs, p = _fs(path)
    fs.pipe_file(p, data)
    return
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
  try:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      if fsync:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def create_exclusive(path: str, data) -> bool:
  """Write `path` only if it does not exist; False if it does. Locally
  O_EXCL; on GCS a precondition (`ifGenerationMatch=0`) makes the store
  refuse a second creator (a store that ignores it, like some emulators, is
  caught by the existence check before, not in a race)."""
  data = data.encode("utf-8") if isinstance(data, str) else bytes(data)
  if not is_remote(path):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
      return False
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    return True
  fs, p = _fs(path)
  if fs.exists(p):
    return False
  try:
    fs.pipe_file(p, data, mode="create")
  except FileExistsError:  # (gcsfs's HTTP 412: another creator was first)
    return False
  return True


def remove(path: str) -> None:
  """Delete a file (FileNotFoundError if it is not there)."""
  if not is_remote(path):
    os.remove(path)
    return
  fs, p = _fs(path)
  if not fs.isfile(p):
    raise FileNotFoundError(2, "No such file", str(path))
  fs.rm_file(p)


def rmtree(path: str, ignore_errors: bool = False) -> None:
  """Delete a folder and everything in it."""
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=ignore_errors)
    return
  fs, p = _fs(path)
  try:
    fs.rm(p, recursive=True)
  except (OSError, ValueError):
    if not ignore_errors:
      raise


def move(src: str, dst: str) -> None:
  """Rename a file or folder. Locally atomic (os.replace); on an object store
  a copy of every object, then the deletion of the originals (not atomic:
  callers only move what no reader relies on, e.g. a damaged step aside)."""
  if not is_remote(src) and not is_remote(dst):
    os.replace(src, dst)
    return
  if isdir(src):
    prefix = len(str(src).rstrip("/")) + 1
    for root, _, names in walk(src):
      for name in names:
        copy_file(join(root, name), join(dst, join(root, name)[prefix:]))
    rmtree(src)
  else:
    copy_file(src, dst)
    remove(src)


def copy_file(src: str, dst: str) -> None:
  """Copy one file between any two places (server-side within one store)."""
  if is_remote(src) and is_remote(dst) and src.split("://")[0] == dst.split("://")[0]:
    fs, p = _fs(src)
    fs.copy(p, _fs(dst)[1])
  elif not is_remote(dst):
    makedirs(dirname(abspath(dst)))
    with open_file(src, "rb") as fin, open(dst, "wb") as fout:
      shutil.copyfileobj(fin, fout)
  elif not is_remote(src):
    fs, p = _fs(dst)
    fs.put_file(src, p)
  else:
    write_atomic(dst, read_bytes(src))


def upload_tree(local: str, dst: str, *, last: str = "") -> None:
  """Copy local folder `local` to `dst`, file by file; the file named `last`
  (e.g. a card that marks the folder complete) goes last."""
  files = [os.path.relpath(os.path.join(r, n), local) for r, _, ns in os.walk(local) for n in ns]
  for rel in sorted(files, key=lambda f: (f == last, f)):
    copy_file(os.path.join(local, rel), join(dst, rel))
