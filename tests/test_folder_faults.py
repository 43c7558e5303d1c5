"""Faults in what a run starts from: hostile data folders (symlink loops and
duplicates, links into another class, unreadable entries, empty classes, any
file name the OS allows) and multi-process peers that never come."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sbam_jax.data import pipeline, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def touch(path: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(b"not decoded here")
  return path


def link(target: str, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  os.symlink(target, path)


def skipped_kinds(source) -> dict:
  """{kind: count} parsed back from the one-line report."""
  _, line = source.skipped
  parts = line.split(": ", 1)[1].split("; ") if line else []
  return {p.split(": ")[0]: int(p.split(": ")[1].split(" ")[0]) for p in parts}


@pytest.fixture
def hostile(tmp_path):
  """Two classes, a folder outside the split, and every kind of bad link."""
  split = str(tmp_path / "data" / "train")
  ext = str(tmp_path / "elsewhere")
  real = [touch(f"{split}/a/1.jpg"), touch(f"{split}/a/sub/2.jpg"), touch(f"{split}/b/3.png"),
          touch(f"{ext}/4.jpg"), touch(f"{ext}/x/5.jpg"), touch(f"{ext}/y/6.jpg")]
  touch(f"{split}/b/notes.txt")
  link(".", f"{split}/a/self")                      # loop: its own folder
  link("..", f"{split}/a/up")                       # loop: the split holding it
  link("../..", f"{split}/a/sub/upup")              # loop: two levels up
  link("sub", f"{split}/a/sub_again")               # duplicate folder
  link("1.jpg", f"{split}/a/again.jpg")             # duplicate file
  link("../b", f"{split}/a/to_b")                   # another class's folder
  link("../a/1.jpg", f"{split}/b/from_a.jpg")       # another class's file
  link(ext, f"{split}/b/ext")                       # outside the split: indexed as b
  link(ext, f"{split}/b/ext_again")                 # ... once
  link("../y", f"{ext}/x/to_y")                     # a cycle between two folders
  link("../x", f"{ext}/y/to_x")
  link("missing.jpg", f"{split}/a/dangling.jpg")
  os.mkfifo(f"{split}/a/fifo.jpg")                  # would block the reader
  link("fifo.jpg", f"{split}/a/to_fifo.jpg")
  return str(tmp_path / "data"), split, ext, real


def test_links_are_followed_once_and_never_relabel(hostile, caplog):
  root, split, ext, real = hostile
  with caplog.at_level(logging.WARNING):
    s = sources.folder_source(root, "train")
  want = {f"{split}/a/1.jpg": 0, f"{split}/a/sub/2.jpg": 0, f"{split}/b/3.png": 1,
          f"{split}/b/ext/4.jpg": 1, f"{split}/b/ext/x/5.jpg": 1, f"{split}/b/ext/y/6.jpg": 1}
  assert dict(zip(s.paths.tolist(), s.labels.tolist())) == want
  assert sorted(os.path.realpath(p) for p in s.paths) == sorted(os.path.realpath(p) for p in real)
  assert skipped_kinds(s) == {"symlink loop": 3, "duplicate": 5, "link into another class": 2,
                              "dangling link": 1, "not a regular file": 2}
  line = s.skipped[1]
  assert "e.g. " in line and f"{split}/a/to_b -> b" in line and "\n" not in line
  assert [r.getMessage() for r in caplog.records] == [line]
  assert s.describe().endswith("; 13 entries skipped)")


def test_a_plain_tree_keeps_the_order_of_a_sorted_walk(tmp_path):
  """Resumed runs index the same list: order as sorted(os.walk) gave it."""
  split = str(tmp_path / "train")
  for rel in ("b/z.jpg", "b/a/y.JPG", "b/deep/er/q.png", "b/deep/1.jpg", "b/deep/er_.jpg",
              "c/B.jpg", "c/a.jpg"):
    touch(f"{split}/{rel}")
  want = []
  for label, cls in enumerate(("b", "c")):
    for dirpath, _, files in sorted(os.walk(f"{split}/{cls}")):
      want += [(os.path.join(dirpath, f), label) for f in sorted(files)]
  s = sources.folder_source(str(tmp_path), "train")
  assert list(zip(s.paths.tolist(), s.labels.tolist())) == want and s.skipped == (0, "")


def test_unreadable_folders_and_files_are_reported_by_name(tmp_path, monkeypatch):
  split = str(tmp_path / "train")
  for rel in ("a/1.jpg", "a/locked/2.jpg", "a/3.jpg", "b/4.jpg", "b/5.jpg"):
    touch(f"{split}/{rel}")
  scandir, access = os.scandir, os.access
  def no_scandir(path):
    if str(path).endswith("locked"):
      raise PermissionError(13, "Permission denied", str(path))
    return scandir(path)
  monkeypatch.setattr(os, "scandir", no_scandir)
  monkeypatch.setattr(os, "access", lambda p, mode: not str(p).endswith("5.jpg")
                      and access(p, mode))
  s = sources.folder_source(str(tmp_path), "train")
  assert s.paths.tolist() == [f"{split}/a/1.jpg", f"{split}/a/3.jpg", f"{split}/b/4.jpg"]
  assert skipped_kinds(s) == {"unreadable folder": 1, "unreadable file": 1}
  assert f"{split}/a/locked (Permission denied)" in s.skipped[1]
  assert f"{split}/b/5.jpg (no read permission)" in s.skipped[1]


def test_a_class_with_no_readable_image_is_one_clear_error(tmp_path, monkeypatch):
  split = str(tmp_path / "train")
  touch(f"{split}/a/1.jpg")
  touch(f"{split}/c/3.jpg")
  touch(f"{split}/b/notes.txt")
  with pytest.raises(sources.DataError, match=r"1 of 3 class folders with no image files: b .*"
                     r"labels are the sorted class folders"):
    sources.folder_source(str(tmp_path), "train")
  os.remove(f"{split}/b/notes.txt")
  touch(f"{split}/b/2.jpg")
  scandir = os.scandir
  monkeypatch.setattr(os, "scandir", lambda p: (_ for _ in ()).throw(
      PermissionError(13, "Permission denied", str(p))) if str(p).endswith("/c") else scandir(p))
  with pytest.raises(sources.DataError, match=r"no image files: c .*unreadable folder: 1 "
                     r"\(e\.g\. .*/train/c \(Permission denied\)\)"):
    sources.folder_source(str(tmp_path), "train")


def test_describe_counts_images_per_class(tmp_path):
  counts = {"k0": 3, "k1": 1, "k2": 2, "k3": 5, "k4": 2, "k5": 2, "k6": 4}
  for cls, n in counts.items():
    for i in range(n):
      touch(str(tmp_path / "many" / "train" / cls / f"{i}.jpg"))
  s = sources.folder_source(str(tmp_path / "many"), "train")
  median = float(np.median(list(counts.values())))
  assert s.describe() == (f"{tmp_path}/many/train (19 images in 7 classes: min 1 in k1, "
                          f"median {median:g}, max 5 per class)")
  for cls, n in (("x", 2), ("y", 3)):
    for i in range(n):
      touch(str(tmp_path / "few" / "train" / cls / f"{i}.png"))
  assert sources.folder_source(str(tmp_path / "few"), "train").describe() == (
      f"{tmp_path}/few/train (5 images in 2 classes: x 2, y 3)")


def test_any_file_name_the_os_allows_is_read(tmp_path):
  """Non-UTF-8 bytes, a newline, spaces and non-ASCII letters in file and
  class names: every image decodes to the pixels written, and every name
  prints as one UTF-8 line."""
  split = os.path.join(str(tmp_path), "train")
  names = [b"caf\xc3\xa9_\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e.JPEG", b"bad\xff\xfe.png",
           b"new\nline.jpg", b"  two  spaces .PNG", b"tab\there.png"]
  classes = [b"cls \xff", "класс".encode()]
  rng = np.random.default_rng(0)
  written = {}
  for c, cls in enumerate(classes):
    for i, name in enumerate(names):
      path = os.fsdecode(os.path.join(os.fsencode(split), cls, name))
      os.makedirs(os.path.dirname(path), exist_ok=True)
      pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(path, format="PNG")  # lossless, whatever the extension
      written[path] = (pixels, c)
  s = sources.folder_source(str(tmp_path), "train")
  assert sorted(s.paths.tolist()) == sorted(written) and s.skipped == (0, "")
  from sbam_jax.data.tf_env import import_tf
  tf = import_tf()
  decode = lambda data, seed: tf.ensure_shape(tf.io.decode_image(data, channels=3,
                                                                 expand_animations=False),
                                              (8, 8, 3))
  p = pipeline.InputPipeline(s, decode, global_batch=len(written), image_size=8, train=False)
  batch, = list(p)
  assert p.skipped == 0 and batch["valid"].all()
  for i, path in enumerate(s.paths.tolist()):
    pixels, label = written[path]
    np.testing.assert_array_equal(batch["image"][i], pixels, err_msg=repr(path))
    assert batch["label"][i] == label
    shown = s.name_of(i)
    assert "\n" not in shown and shown.encode("utf-8")
  assert "café_日本語.JPEG" in " ".join(s.name_of(i) for i in range(s.num_examples))
  assert [sources.shown(c) for c in s.classes] == ["cls \\xff", "класс"]
  assert s.describe().encode("utf-8")


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def test_a_peer_that_never_comes_is_one_error_line(tmp_path):
  """Each process alone in a run of two: process 0 (its peer never starts)
  and process 1 (no coordinator) say whom they wait for at once, then stop
  after --distributed_timeout with one line and status 2."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  procs = []
  for i in range(2):
    address = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "train.py", "--config", "configs/demo.py", "--workdir",
           str(tmp_path / f"w{i}"), f"--coordinator_address={address}", "--num_processes=2",
           f"--process_id={i}", "--distributed_timeout=5"]
    procs.append((address, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True)))
  waits = ["waiting for 1 peer at {a} (process 0 of 2, timeout 5 s)",
           "waiting for the coordinator at {a} (process 1 of 2, timeout 5 s)"]
  errors = ["error: timed out after 5 s waiting for 1 other process at {a} (this is process 0 "
            "of 2, the coordinator): check",
            "error: timed out after 5 s waiting for the coordinator (process 0) at {a} (this is "
            "process 1 of 2, nothing answers at that address): check"]
  for (address, proc), wait, error in zip(procs, waits, errors):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert out.strip() == wait.format(a=address)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(error.format(a=address)), err
    assert "--distributed_timeout" in lines[0]


def test_a_coordinator_port_in_use_is_one_error_line(tmp_path):
  """XLA itself crashes (SIGSEGV) when process 0 cannot bind its port."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  with socket.socket() as held:
    held.bind(("127.0.0.1", 0))
    held.listen()
    address = f"127.0.0.1:{held.getsockname()[1]}"
    out = subprocess.run([sys.executable, "train.py", "--config", "configs/demo.py", "--workdir",
                          str(tmp_path / "w"), f"--coordinator_address={address}",
                          "--num_processes=2", "--process_id=0", "--distributed_timeout=5"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and out.stdout == "", out.stderr
  assert out.stderr.strip() == (f"error: cannot start the coordinator at {address}: its port is "
                                f"in use on this host (another run, or a process of an earlier "
                                f"one still alive?); stop that process or pick another port in "
                                f"--coordinator_address")
