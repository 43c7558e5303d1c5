"""What a run tells its user: the start-up header, progress lines, evaluator
lines and the closing summary (process 0 prints; every process keeps time).

Speed is steady-state speed. Wall time is split into `startup`, `compile`
(the first step, which compiles), `train`, and the side work the loop does
between steps (`eval`, `checkpoint`, `figures`). Before side work the loop
waits for the steps already dispatched, so their time stays in `train`;
img/s and the ETA are the images and the train time since the last line, so
compilation, figures, evaluation and saves never bend them.
"""

from __future__ import annotations

import contextlib
import math
import time

import jax
import numpy as np

from sbam_jax import files
from sbam_jax.train import checkpointing, logging_utils

# bf16 dense matmul peaks, for the MFU estimate (None elsewhere, e.g. CPU).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6 lite": 918e12}
SIDE_WORK = ("eval", "checkpoint", "figures")


def _count(n: float) -> str:
  for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if n >= size:
      return f"{n / size:.3g}{unit}"
  return f"{n:.0f}"


def header_lines(task, params, workdir: str, start: int) -> list:
  """The start-up header: everything that decides what this run computes."""
  cfg, m = task.config, task.model_cfg
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  flops = f", {_count(task.flops_per_image)}FLOP/image" if task.flops_per_image else ""
  source = task.source()
  where = source.describe()
  if cfg.data.source == "tfds" and cfg.data.tfds_data_dir:
    where += f" in {cfg.data.tfds_data_dir}"
  devices = jax.devices()
  resume = (f"steps {start}..{task.total_steps} (from epoch {start / task.steps_per_epoch:.2f})")
  return [
      f"task     {cfg.task}: {task.summary()}",
      f"model    ViT {m.embed_dim}d x{m.depth} ({m.num_heads} heads), patch {m.patch_size}, "
      f"{m.img_size} px, {_count(n_params)} trainable parameters{flops}, compute {m.compute_dtype}",
      f"data     {where}: {source.num_examples} images, {task.steps_per_epoch} steps/epoch x {cfg.epochs} "
      f"epochs = {task.total_steps} steps",
      f"batch    {task.batch_size} global = {task.micro_batch // jax.device_count()} per device "
      f"x {jax.device_count()} devices x {cfg.accum_steps} accumulation",
      f"mesh     {dict(task.mesh.shape)} on {len(devices)} {devices[0].platform} devices "
      f"({jax.process_count()} process{'es' if jax.process_count() > 1 else ''})",
      f"workdir  {files.abspath(workdir)}; {resume}",
  ]


class Reporter:
  """Progress lines (process 0), metrics.jsonl and TensorBoard, and the clock."""

  def __init__(self, task, workdir: str, started: float):
    self.task, self.workdir, self.main = task, workdir, jax.process_index() == 0
    self.writer = logging_utils.MetricWriter(workdir, enabled=self.main)
    device = jax.devices()[0].device_kind
    self.peak = next((v for k, v in PEAK_FLOPS.items() if k in device), None)
    self.headlines: dict = {}
    self.started = started
    self.seconds = {"startup": 0.0, "compile": 0.0, "train": 0.0,
                    **{k: 0.0 for k in SIDE_WORK}}
    self.last_metrics: dict = {}
    self.window_images, self.window_train = 0, 0.0
    self.step_time = None       # steady-state seconds per step, once measured
    self.last_line = time.time()
    self._mark = None

  def say(self, text: str) -> None:
    if self.main:
      print(text, flush=True)

  # ---- the clock ------------------------------------------------------------------

  def training(self) -> None:
    """Steps start (or resume after side work): train time runs from here."""
    self._mark = time.time()

  def _stop_train(self, wait_for=None) -> None:
    if wait_for is not None:
      jax.block_until_ready(wait_for)   # dispatched steps count as train time
    if self._mark is not None:
      dt = time.time() - self._mark
      self.seconds["train"] += dt
      self.window_train += dt
      self._mark = None

  @contextlib.contextmanager
  def side(self, kind: str, state=None):
    """Time side work (`kind` in SIDE_WORK, or 'compile') outside train time."""
    self._stop_train(state)
    t0 = time.time()
    try:
      yield
    finally:
      self.seconds[kind] += time.time() - t0
      self.training()

  def stepped(self, images: int) -> None:
    self.window_images += images

  def line_due(self, step: int, every: int, seconds: float) -> bool:
    return (step % every == 0 or step == self.task.total_steps
            or time.time() - self.last_line >= seconds)

  # ---- lines and records --------------------------------------------------------

  def train(self, step: int, metrics: dict, data, state) -> None:
    task = self.task
    self._stop_train(state)
    if self.window_images and self.window_train > 0:
      self.step_time = self.window_train / (self.window_images / task.batch_size)
    img_s = task.batch_size / self.step_time if self.step_time else None
    lr = float(task.lr(step - 1))
    flops, n_dev = task.flops_per_image, jax.device_count()
    mfu = img_s * flops / (self.peak * n_dev) if self.peak and flops and img_s else None
    epoch = step / task.steps_per_epoch
    eta = (task.total_steps - step) * self.step_time if self.step_time else None
    self.say(" ".join([logging_utils.progress_line(step, task.total_steps, epoch, metrics, lr,
                                                   img_s, mfu, eta), *self.headlines.values()]))
    self.last_metrics = dict(metrics)
    self.writer.scalars(step, {**metrics, "lr": lr, "img_per_s": img_s, "epoch": epoch,
                               "skipped_images": getattr(data, "skipped", 0)})
    self.window_images, self.window_train = 0, 0.0
    self.last_line = time.time()
    self.training()

  def evaluation(self, evaluator, step: int, metrics: dict, *, final_only: bool = False) -> None:
    where = (f"of the weights at step {step}" if final_only else
             f"step {step} ep {step / self.task.steps_per_epoch:.2f}")
    self.say(f"{evaluator.name} {where}: {evaluator.describe(metrics)}")
    head = evaluator.headline(metrics)
    if head:
      self.headlines[evaluator.name] = head
    self.last_metrics.update({f"{evaluator.name}/{k}": v for k, v in metrics.items()})
    self.writer.scalars(step, {f"{evaluator.name}/{k}": v for k, v in metrics.items()},
                        replace=final_only)

  def summary(self, step: int, status: int) -> None:
    """The closing lines: where the run ended, its numbers, its time, its files."""
    self._stop_train()
    total = time.time() - self.started
    split = ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items() if v >= 0.5)
    ended = {0: "finished", 3: "stopped (not finite)"}.get(status, f"stopped (status {status})")
    self.say(f"{ended} at step {step}/{self.task.total_steps} in {total:.0f} s ({split})")
    shown = {k: v for k, v in self.last_metrics.items()
             if isinstance(v, float) and math.isfinite(v) and not k.startswith("mask_ratio_m")}
    if shown:
      self.say("final: " + " ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items())))
    for line in written(self.workdir, self.started):
      self.say(f"wrote    {line}")


def written(workdir: str, since: float) -> list:
  """The workdir's entries this run created or changed, one line each."""
  out = []
  if not files.isdir(workdir):
    return out
  for name in sorted(files.listdir(workdir)):
    if name.startswith("."):
      continue
    path = files.join(workdir, name)
    single = files.isfile(path)
    paths = ([path] if single else
             [files.join(d, f) for d, _, fs in files.walk(path) for f in fs])
    # (a file gone meanwhile, e.g. another process's temporary file, has no stat)
    stats = [st for st in map(files.stat, paths) if st is not None and st.mtime >= since - 1]
    if not stats:
      continue
    size = sum(st.size for st in stats)
    if single:
      out.append(f"{path} ({size / 1e6:.2f} MB)")
    elif name == "checkpoints":
      steps = checkpointing.list_steps(path)
      out.append(f"{path}/ steps {steps} ({size / 1e6:.1f} MB written)")
    else:
      out.append(f"{path}/ ({len(stats)} files, {size / 1e6:.2f} MB)")
  return out
