"""Top-1 / top-5 / cross-entropy of a classifier over a whole split.

Exact: every example counts once (the last batch is padded and the padding
masked), whatever the number of devices and processes. Images go through
MAE's eval transform (resize by crop_pct 224/256 up to 224 px, centre crop).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from sbam_jax import registry, sharding
from sbam_jax.data import device as device_ops
from sbam_jax.evals.base import Evaluator


def make_eval_step(logits_fn, num_classes: int):
  """(state, batch) -> sums over the batch's valid examples: loss, top-1 and
  top-5 hits, count. `logits_fn(state, normalised images)`."""
  k = min(5, num_classes)

  def eval_step(state, batch):
    logits = logits_fn(state, device_ops.normalize(batch["image"])).astype(jnp.float32)
    labels, valid = batch["label"], batch["valid"]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
    top = jax.lax.top_k(logits, k)[1]
    hit1 = (top[:, 0] == labels) & valid
    hit5 = (top == labels[:, None]).any(axis=1) & valid
    return {"loss_sum": jnp.where(valid, nll, 0.0).sum(), "top1": hit1.sum(),
            "top5": hit5.sum(), "count": valid.sum()}

  return eval_step


def eval_resize(image_size: int) -> int:
  """MAE's eval resize: crop_pct 224/256 up to 224 px, the image size itself above."""
  return int(image_size / (224 / 256)) if image_size <= 224 else image_size


def eval_batches(task, source, batch_size: int):
  """Host batches of a whole split through the eval transform, padded and marked `valid`."""
  from sbam_jax.data import pipeline, transforms  # pylint: disable=g-import-not-at-top
  size = task.image_size
  transform = transforms.make_transform("eval", size, resize=eval_resize(size))
  return pipeline.InputPipeline(
      source, transform, global_batch=batch_size, image_size=size, train=False,
      process_index=task.process, process_count=task.num_processes,
      threads=task.config.data.threads or None)


@registry.register("evaluator", "classification")
class ClassificationEvaluator(Evaluator):
  """{'top1', 'top5' (percent), 'loss', 'count', 'skipped'} on `split`
  (default: the data's eval split), best top-1 so far in the progress text."""

  def __init__(self, task, *, split: str = "", batch_size: int = 0, **base):
    super().__init__(task, **base)
    cfg = task.config
    self.source = task.source(split or cfg.data.eval_split_name())
    self.batch_size = batch_size or getattr(cfg, "eval_batch_size", cfg.batch_size)
    self.step = sharding.jit(make_eval_step(task.logits_fn(), task.num_classes), task.mesh,
                             out_shardings=NamedSharding(task.mesh, P()))
    self.best: Optional[float] = None

  def run(self, state) -> dict:
    data = eval_batches(self.task, self.source, self.batch_size)
    totals = None
    for batch in data:
      gb = {k: sharding.global_batch(self.task.mesh, batch[k]) for k in ("image", "label", "valid")}
      out = self.step(state, gb)
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    t = jax.device_get(totals)
    n = int(t["count"])
    top1 = 100.0 * int(t["top1"]) / max(n, 1)
    self.best = top1 if self.best is None else max(self.best, top1)
    return {"top1": top1, "top5": 100.0 * int(t["top5"]) / max(n, 1),
            "loss": float(t["loss_sum"]) / max(n, 1), "count": n, "skipped": data.skipped}

  def describe(self, m: dict) -> str:
    return (f"top-1 {m['top1']:.3f}% top-5 {m['top5']:.3f}% loss {m['loss']:.4f} on "
            f"{m['count']} images (best top-1 {self.best:.3f}%)")
