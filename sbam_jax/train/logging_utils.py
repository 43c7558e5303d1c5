"""Progress lines, a JSON-lines log and TensorBoard events (written by process 0).

TensorBoard events go through `tf.summary` (TensorFlow is already on the host
for the input pipeline), imported lazily.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np


class MetricWriter:
  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.jsonl = os.path.join(workdir, "metrics.jsonl")
    self.tb_dir = os.path.join(workdir, "tensorboard")
    self._tb = None

  def _writer(self):
    if self._tb is None:
      from sbam_jax.data.tf_env import import_tf  # pylint: disable=g-import-not-at-top
      self._tf = import_tf()
      self._tb = self._tf.summary.create_file_writer(self.tb_dir)
    return self._tb

  def scalars(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
    with open(self.jsonl, "a") as f:
      f.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
    with self._writer().as_default():
      for k, v in clean.items():
        self._tf.summary.scalar(k, v, step=int(step))

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    if not self.enabled:
      return
    with self._writer().as_default():
      self._tf.summary.image(name, image[None], step=int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()


def progress_line(step, total, epoch, metrics, lr, img_per_s, mfu, eta_s) -> str:
  eta = time.strftime("%H:%M:%S", time.gmtime(max(eta_s, 0)))
  text = (f"step {step}/{total} ep {epoch:.2f} loss {metrics['loss']:.4f} lr {lr:.3g} "
          f"{img_per_s:.1f} img/s")
  if mfu is not None:
    text += f" MFU {100 * mfu:.1f}%"
  ratio = metrics.get("mask_ratio_mean")
  if ratio is not None and math.isfinite(ratio):
    text += (f" mask {ratio:.3f} [{metrics['mask_ratio_min']:.3f}, "
             f"{metrics['mask_ratio_max']:.3f}]")
  above = metrics.get("frac_above_delta")
  if above is not None and math.isfinite(above):
    text += f" >delta {above:.3f}"
  return text + f" ETA {eta}"
