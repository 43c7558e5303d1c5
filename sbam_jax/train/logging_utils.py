"""The run's records: a JSON-lines log and TensorBoard events (process 0).

Both must match the saved state. A record is one line written with one
`write` call, so a crash leaves at most a cut-off last line, which the next
start removes; a write that fails (full disk) is undone and stops the run.
On resume, records past the restored step are dropped from both, so a step
is never logged twice. TensorBoard goes through `tf.summary` (TensorFlow is
on the host for the input pipeline anyway), imported lazily.

A workdir URL (gs://): an object cannot be appended to, so a record rewrites
metrics.jsonl whole (one upload: readers see the old or the new object).
TensorBoard events are written by `tf.summary` into a local temporary
folder and uploaded whole (each file one object) at most every
`UPLOAD_S` seconds and at the end, through `sbam_jax.files`: TensorFlow's
own GCS client would also work in production, but it cannot be pointed at
an emulator, and one client for all outputs is simpler to reason about.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time

import numpy as np

from sbam_jax import files
from sbam_jax.errors import WriteError

UPLOAD_S = 60.0   # a remote workdir's TensorBoard files are uploaded this often


class MetricWriter:
  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.jsonl = files.join(workdir, "metrics.jsonl")
    self.tb_dir = files.join(workdir, "tensorboard")
    self.remote = files.is_remote(workdir)
    self._tb, self._local_tb, self._uploaded = None, None, 0.0
    self._held = None  # a remote log's bytes as last read or written (this run is its one writer)

  def _writer(self):
    if self._tb is None:
      from sbam_jax.data.tf_env import import_tf  # pylint: disable=g-import-not-at-top
      self._tf = import_tf()
      folder = self.tb_dir
      if self.remote:  # staged locally, uploaded by _upload_events
        folder = self._local_tb = tempfile.mkdtemp(prefix="sbam_jax-tensorboard-")
      self._tb = self._tf.summary.create_file_writer(folder)
    return self._tb

  def _upload_events(self, force: bool = False) -> None:
    """Copy the staged event files of a remote workdir up (each whole)."""
    if self._local_tb is None or (not force and time.time() - self._uploaded < UPLOAD_S):
      return
    self._tb.flush()
    try:
      for name in sorted(os.listdir(self._local_tb)):
        files.copy_file(os.path.join(self._local_tb, name), files.join(self.tb_dir, name))
    except OSError as e:
      raise WriteError(f"cannot upload TensorBoard events to {self.tb_dir} ({e.strerror or e}); "
                       "the run stops here: fix the bucket's access, then resume") from e
    self._uploaded = time.time()

  # ---- metrics.jsonl ------------------------------------------------------------

  def _read(self) -> bytes:
    if self._held is not None:
      return self._held  # (no download per record: the bucket holds what we last wrote)
    data = files.read_bytes(self.jsonl) if files.exists(self.jsonl) else b""
    if self.remote:
      self._held = data
    return data

  def records(self, whole: bytes | None = None) -> list:
    """The whole records in metrics.jsonl (a cut-off last line is not one)."""
    out = []
    for line in (self._read() if whole is None else whole).split(b"\n"):
      try:
        out.append(json.loads(line))
      except ValueError:
        continue  # an empty or cut-off line
    return out

  def _rewrite(self, records: list) -> None:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    try:
      self._held = None
      files.write_atomic(self.jsonl, data)
      self._held = data if self.remote else None
    except OSError as e:
      raise WriteError(f"cannot write {self.jsonl} ({e.strerror or e}); the run stops here: "
                       "free space or fix permissions, then resume") from e

  def _append(self, record: dict) -> None:
    data = (json.dumps(record) + "\n").encode()
    if self.remote:  # no append on an object store: the whole log, one upload
      try:
        whole = self._read() + data
        self._held = None  # (unknown until the upload succeeds)
        files.write_atomic(self.jsonl, whole)
        self._held = whole
      except OSError as e:
        raise WriteError(f"cannot write {self.jsonl} ({e}); the run stops here: fix the "
                         f"bucket's access (network, permissions or quota), then resume") from e
      return
    fd = os.open(self.jsonl, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    size = os.fstat(fd).st_size
    try:
      if os.write(fd, data) != len(data):
        raise OSError(28, "short write")
    except OSError as e:
      os.ftruncate(fd, size)  # no cut-off line stays behind
      raise WriteError(f"cannot append to {self.jsonl} ({e.strerror or e}); the run stops "
                       f"here: free space or fix permissions, then resume") from e
    finally:
      os.close(fd)

  def truncate(self, step: int) -> None:
    """Keep only records up to `step` (the restored state) in both logs."""
    if not self.enabled:
      return
    whole = self._read()
    records = self.records(whole)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) != len(records) or (whole and not whole.endswith(b"\n")):
      self._rewrite(kept)
    trim_events(self.tb_dir, step)

  # ---- writing ------------------------------------------------------------------

  def scalars(self, step: int, values: dict, *, replace: bool = False) -> None:
    """One record; `replace`: drop earlier records of the same step holding
    the same keys (an evaluation repeated on the same weights)."""
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
    record = {"step": int(step), "time": time.time(), **clean}
    if replace:
      old = self.records()
      kept = [r for r in old if not (r.get("step") == step and set(clean) <= set(r))]
      if len(kept) != len(old):
        self._rewrite(kept + [record])
        record = None
    if record is not None:
      self._append(record)
    with self._writer().as_default():
      for k, v in clean.items():
        self._tf.summary.scalar(k, v, step=int(step))
    self._upload_events()

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    if not self.enabled:
      return
    with self._writer().as_default():
      self._tf.summary.image(name, image[None], step=int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._upload_events(force=True)

  def close(self) -> None:
    """Flush, and remove a remote workdir's local staging folder."""
    self.flush()
    if self._local_tb is not None:
      self._tb.close()
      shutil.rmtree(self._local_tb, ignore_errors=True)
      self._tb = self._local_tb = None


def trim_events(tb_dir: str, step: int) -> None:
  """Rewrite TensorBoard event files without events past `step`, so a resumed
  run draws one line per step (TensorBoard would show both copies)."""
  names = sorted(n for n in (files.listdir(tb_dir) if files.isdir(tb_dir) else [])
                 if "tfevents" in n)
  if not names:
    return
  from sbam_jax.data.tf_env import import_tf  # pylint: disable=g-import-not-at-top
  tf = import_tf()
  for path in (files.join(tb_dir, n) for n in names):
    if path.endswith(".tmp"):
      files.remove(path)  # a rewrite that did not finish; its original is still there
      continue
    with files.local_copy(path) as local:  # TFRecord readers open local files
      raw = [bytes(r.numpy()) for r in tf.data.TFRecordDataset(local)]
    keep = [r for r in raw if tf.compat.v1.Event.FromString(r).step <= step]
    if len(keep) == len(raw):
      continue
    if not files.is_remote(path):
      _write_records(tf, path + ".tmp", keep)
      os.replace(path + ".tmp", path)
      continue
    with tempfile.TemporaryDirectory(prefix="sbam_jax-") as scratch:
      _write_records(tf, os.path.join(scratch, "events"), keep)
      files.copy_file(os.path.join(scratch, "events"), path)  # one upload replaces it


def _write_records(tf, path: str, records: list) -> None:
  with tf.io.TFRecordWriter(path) as w:
    for r in records:
      w.write(r)


def progress_line(step, total, epoch, metrics, lr, img_per_s, mfu, eta_s) -> str:
  text = (f"step {step}/{total} ep {epoch:.2f} loss {metrics['loss']:.4f} lr {lr:.3g}")
  if img_per_s is not None:
    text += f" {img_per_s:.1f} img/s"
  if mfu is not None:
    text += f" MFU {100 * mfu:.1f}%"
  ratio = metrics.get("mask_ratio_mean")
  if ratio is not None and math.isfinite(ratio):
    text += (f" mask {ratio:.3f} [{metrics['mask_ratio_min']:.3f}, "
             f"{metrics['mask_ratio_max']:.3f}]")
  above = metrics.get("frac_above_delta")
  if above is not None and math.isfinite(above):
    text += f" >delta {above:.3f}"
  if eta_s is not None:
    text += " ETA " + time.strftime("%H:%M:%S", time.gmtime(max(eta_s, 0)))
  return text
