"""Indexing a local image folder tree for the folder source (sources.py).

A local tree can hold what an object store cannot: symlinks (loops, second
routes, links into another class), dangling links, FIFOs named like images,
unreadable folders. `FolderWalk` indexes it so that each real file counts
once under the class folder that holds it, and reports what it left out.
"""

from __future__ import annotations

import os

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def shown(path: str) -> str:
  """A file name as one printable line: bytes that are not UTF-8 as \\xNN,
  control characters (a newline in a name) escaped. Printing a raw name can
  raise UnicodeEncodeError (undecodable bytes) or split a log line."""
  text = os.fsencode(path).decode("utf-8", "backslashreplace")
  return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _inside(path: str, folder: str) -> bool:
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def has_image_ext(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


class FolderWalk:
  """Index `{split_dir}/<class>/**` following symlinks, each real folder and
  file at most once.

  Real folders are walked first, symlinked ones after (so a link never
  shadows the real tree it points into). What is left out is counted by kind,
  with one example each: a link to the folder holding it or an ancestor
  (`symlink loop`), a second route to an indexed folder or file (`duplicate`;
  this also ends a cycle between two folders), a link into another class's
  folder (its images would be relabelled), a dangling link, something named
  like an image that is not a file (a FIFO would block the reader), and
  folders or files that cannot be read."""

  def __init__(self, split_dir: str, classes: tuple):
    self.split_dir, self.classes = split_dir, classes
    self.roots: dict = {}       # real path of each class folder -> label
    for label, name in enumerate(classes):
      self.roots.setdefault(os.path.realpath(os.path.join(split_dir, name)), label)
    self.seen: set = set()      # real paths of folders walked
    self.queue: list = []       # (label, path, real) folders to read
    self.dir_links: list = []   # (label, path, real of the folder holding the link)
    self.file_links: list = []  # (label, folder path, name)
    self.link_targets: set = set()
    self.files: dict = {}       # folder path -> (label, [names])
    self.skips: dict = {}       # kind -> [count, example]

  def skip(self, kind: str, example: str) -> None:
    entry = self.skips.setdefault(kind, [0, example])
    entry[0] += 1

  def owner(self, real: str):
    """The label of the class folder `real` lies in (the nearest), or None."""
    while True:
      if real in self.roots:
        return self.roots[real]
      parent = os.path.dirname(real)
      if parent == real:
        return None
      real = parent

  def enter(self, label: int, path: str, real: str, holder: str = "") -> None:
    """Queue folder `path` (real path `real`; `holder`: the real folder holding
    the link that led here) unless it was seen or belongs to another class."""
    owner = self.owner(real)
    if holder and _inside(holder, real):  # a link to its own folder or an ancestor
      self.skip("symlink loop", shown(path))
    elif owner is not None and owner != label:
      self.skip("link into another class", f"{shown(path)} -> {shown(self.classes[owner])}")
    elif real in self.seen:
      self.skip("duplicate", shown(path))
    else:
      self.seen.add(real)
      self.queue.append((label, path, real))

  def read(self, label: int, path: str, real: str) -> None:
    """List one folder: image files are kept, real folders queued, links set aside."""
    try:
      with os.scandir(path) as it:
        entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
      self.skip("unreadable folder", f"{shown(path)} ({e.strerror or e})")
      return
    names = self.files.setdefault(path, (label, []))[1]
    for entry in entries:
      try:
        if entry.is_symlink():
          if entry.is_dir():
            self.dir_links.append((label, entry.path, real))
          elif not os.path.exists(entry.path):
            self.skip("dangling link", shown(entry.path))
          elif has_image_ext(entry.name):
            self.file_links.append((label, path, entry.name))
        elif entry.is_dir():
          self.enter(label, entry.path, os.path.join(real, entry.name))
        elif has_image_ext(entry.name) and self.regular(entry) and self.readable(entry.path):
          names.append(entry.name)
      except OSError as e:
        self.skip("unreadable file", f"{shown(entry.path)} ({e.strerror or e})")

  def regular(self, entry) -> bool:
    if entry.is_file():
      return True
    self.skip("not a regular file", shown(entry.path))
    return False

  def readable(self, path: str) -> bool:
    if os.access(path, os.R_OK):
      return True
    self.skip("unreadable file", f"{shown(path)} (no read permission)")
    return False

  def link_file(self, label: int, folder: str, name: str) -> None:
    """Keep a symlinked image unless its target is indexed already or is
    another class's."""
    path = os.path.join(folder, name)
    real = os.path.realpath(path)
    owner = self.owner(os.path.dirname(real))
    if owner is not None and owner != label:
      self.skip("link into another class", f"{shown(path)} -> {shown(self.classes[owner])}")
    elif not os.path.isfile(real):
      self.skip("not a regular file", shown(path))
    elif real in self.link_targets or (os.path.dirname(real) in self.seen
                                       and has_image_ext(real)):
      self.skip("duplicate", shown(path))
    elif self.readable(path):
      self.link_targets.add(real)
      self.files[folder][1].append(name)

  def run(self) -> tuple[list, list]:
    """(paths, labels): class by class, folders and files in sorted order."""
    for label, name in enumerate(self.classes):
      path = os.path.join(self.split_dir, name)
      self.enter(label, path, os.path.realpath(path))
    while self.queue or self.dir_links:
      if self.queue:
        self.read(*self.queue.pop())
      else:
        label, path, holder = self.dir_links.pop(0)
        self.enter(label, path, os.path.realpath(path), holder)
    for label, folder, name in self.file_links:
      self.link_file(label, folder, name)
    paths, labels = [], []
    for folder, (label, names) in sorted(self.files.items(), key=lambda kv: (kv[1][0], kv[0])):
      paths += [os.path.join(folder, n) for n in sorted(names)]
      labels += [label] * len(names)
    return paths, labels

  def report(self) -> tuple[int, str]:
    """How many entries were left out, and one line saying which kinds, with
    an example each."""
    if not self.skips:
      return 0, ""
    total = sum(n for n, _ in self.skips.values())
    parts = [f"{kind}: {n} (e.g. {example})" for kind, (n, example) in sorted(self.skips.items())]
    return total, f"skipped {total} entries of {shown(self.split_dir)}: " + "; ".join(parts)
