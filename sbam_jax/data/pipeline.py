"""tf.data input pipeline: order, per-process sharding, decoding, batching.

Order. An epoch is a permutation of the split drawn from (seed, epoch)
(training) or the split in order (evaluation). Global batch s holds positions
[s G, (s + 1) G) of it; process p reads only its slice [p B, (p + 1) B) of
each global batch (B = G / processes), so processes are disjoint, their
union is the split, and concatenating their pieces in process order gives the
global batch (what `jax.make_array_from_process_local_data` expects). An
epoch has `examples // G` steps (the remainder is dropped, as the PyTorch
reference's DistributedSampler + drop_last does); evaluation instead pads the
last batch and marks padding with `valid = False`. `start_step` positions the
stream at any global step: a resumed run sees exactly the batches the
uninterrupted run saw, augmentations included (stateless per-image seeds).

Robustness. Decoding runs in one parallel map followed by `ignore_errors`,
so a corrupt, truncated or empty file is dropped instead of ending the run.
Every element carries its index in the stream; a batch whose indices are
exactly its step's passes straight through (the usual case, no cost), and
after a gap the host re-cuts the stream at step boundaries, putting a
placeholder flagged not-ok where an image failed. The host replaces a
placeholder by another image of the same batch (training) or marks it
invalid (evaluation), counts it, and names it. Batches keep their size and
every process keeps the same number of steps. (A tiny dataset per image with
its own `ignore_errors` does the same inside tf.data but costs ~2 ms of
overhead per image.)

What each element is comes from the source (`sources.py`): an indexed
source (the folder layout) gives the records at this process's positions of
the permutation; a stream (tfds) reads its process's part of the split in an
order seeded from (seed, epoch), in this same framework.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Iterator, Optional

import numpy as np

from sbam_jax.errors import DataError
from sbam_jax.data.tf_env import import_tf

tf = import_tf()


class InputPipeline:
  """Iterator of host batches {'image': (B, S, S, 3) uint8, 'label': (B,) int32,
  'valid': (B,) bool} for one process, plus any further per-image outputs the
  transform declares in its `spec` attribute (see transforms.output_spec).
  `threads`: decoding threads (default: one per core this process may use)."""

  def __init__(self, source, transform: Callable, *,
               global_batch: int, image_size: int, train: bool = True, seed: int = 0,
               process_index: int = 0, process_count: int = 1, start_step: int = 0,
               num_epochs: Optional[int] = None, shuffle_buffer: int = 16_384,
               threads: Optional[int] = None, max_skipped_names: int = 20):
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} does not split over {process_count} "
                       f"processes")
    self.source = source
    self.transform = transform
    self.global_batch = global_batch
    self.local_batch = global_batch // process_count
    self.image_size = image_size
    self.spec = getattr(transform, "spec", None) or {
        "image": ((image_size, image_size, 3), np.uint8)}
    self.train = train
    self.seed = int(seed)
    self.process_index = process_index
    self.process_count = process_count
    self.shuffle_buffer = shuffle_buffer
    self.threads = threads
    n = source.num_examples
    if train:
      self.steps_per_epoch = n // global_batch
      if self.steps_per_epoch == 0:
        raise DataError(f"{source.describe()} has {n} images, fewer than one global batch "
                            f"of {global_batch}")
    else:
      self.steps_per_epoch = -(-n // global_batch)
    self.num_epochs = num_epochs if train else 1
    self.start_step = start_step
    self.skipped = 0
    self.skipped_names: list[str] = []
    self._max_names = max_skipped_names

  # ---- order -------------------------------------------------------------

  def epoch_positions(self, epoch: int) -> np.ndarray:
    """(steps, B) indices into the split for this process (-1 = padding)."""
    n, g, b, p = self.source.num_examples, self.global_batch, self.local_batch, self.process_index
    if self.train:
      order = np.random.default_rng((self.seed, epoch)).permutation(n)
      order = order[:self.steps_per_epoch * g]
    else:
      order = np.full(self.steps_per_epoch * g, -1, np.int64)
      order[:n] = np.arange(n)
    return order.reshape(-1, g)[:, p * b:(p + 1) * b]

  # ---- tf.data -------------------------------------------------------------

  def _decode(self, data, label, seed, pad, index, read):
    def load():
      encoded = data if read is None else read(data)
      out = self.transform(encoded, seed)
      out = out if isinstance(out, dict) else {"image": out}
      return {k: tf.ensure_shape(out[k], shape) for k, (shape, _) in self.spec.items()}

    blank = lambda: {k: tf.zeros(shape, dtype) for k, (shape, dtype) in self.spec.items()}
    out = tf.cond(pad, blank, load)
    return {**out, "label": label, "pad": pad, "index": index}

  def epoch_dataset(self, epoch: int, offset: int = 0) -> "tf.data.Dataset":
    """Batches of one epoch for this process, starting at step `offset`."""
    elements = self.source.elements(self, epoch, offset)
    read = self.source.reader()
    threads = self.threads or len(os.sched_getaffinity(0))  # (this host's cores)
    ds = elements.enumerate().map(
        lambda i, e: self._decode(*e, index=i, read=read),
        num_parallel_calls=threads, deterministic=True).ignore_errors()
    ds = ds.batch(self.local_batch)  # cut at step boundaries by `_aligned`
    options = tf.data.Options()
    options.deterministic = True
    # Fixed parallelism, no autotuning: with autotuning the same pipeline ran
    # at ~290 or ~800 img/s per core from one run to the next.
    options.autotune.enabled = False
    options.threading.private_threadpool_size = threads
    # Parallel over images, one thread per op: per-op threads only contend.
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options).prefetch(2)

  # ---- host side ---------------------------------------------------------

  def _finish(self, batch: dict, epoch: int, offset: int) -> dict:
    ok, pad = batch["ok"], batch["pad"]
    bad = ~ok & ~pad
    if bad.any():
      getattr(self.source, "stop_if_unreadable", lambda: None)()
      self.skipped += int(bad.sum())
      for index in batch["index"][bad][: self._max_names - len(self.skipped_names)]:
        self.skipped_names.append(self.source.element_name(self, epoch, offset, int(index)))
        logging.warning("skipped an image that could not be read or decoded: %s", self.skipped_names[-1])
      if self.train:
        good = np.flatnonzero(ok)
        if good.size == 0:
          raise DataError(f"no image of a whole batch could be decoded from "
                              f"{self.source.describe()}; first: {self.skipped_names[:3]}")
        # Fill each failed slot with a decodable image of the same batch.
        keys = (*self.spec, "label")
        batch.update({k: batch[k].copy() for k in keys})
        for i, slot in enumerate(np.flatnonzero(bad)):
          for k in keys:
            batch[k][slot] = batch[k][good[i % good.size]]
        ok = np.ones_like(ok)
    return {**{k: batch[k] for k in self.spec}, "label": batch["label"].astype(np.int32),
            "valid": ok & ~pad}

  def _aligned(self, batches, steps: int) -> Iterator[dict]:
    """Batches of the surviving stream -> one batch per step, with `ok`."""
    b_size, step, buf = self.local_batch, 0, None
    for b in batches:
      idx = b["index"]
      if buf is None and len(idx) == b_size and idx[0] == step * b_size \
          and idx[-1] == (step + 1) * b_size - 1:  # indices increase: no gap
        yield {**b, "ok": np.ones(b_size, bool)}
        step += 1
        continue
      buf = b if buf is None else {k: np.concatenate([buf[k], b[k]]) for k in b}
      while step < steps and buf["index"].size and buf["index"][-1] >= (step + 1) * b_size:
        batch, buf = self._cut(buf, step)
        yield batch
        step += 1
    while step < steps:  # the tail: failures at the very end of the epoch
      batch, buf = self._cut(buf, step)
      yield batch
      step += 1

  def _cut(self, buf, step: int):
    """Step `step`'s batch out of the buffered elements, placeholders in the gaps."""
    b_size = self.local_batch
    batch = {k: np.zeros((b_size,) + tuple(shape), dtype) for k, (shape, dtype) in self.spec.items()}
    batch.update(label=np.zeros(b_size, np.int32), pad=np.zeros(b_size, bool),
                 ok=np.zeros(b_size, bool), index=step * b_size + np.arange(b_size))
    if buf is None:
      return batch, None
    take = buf["index"] < (step + 1) * b_size
    slots = buf["index"][take] - step * b_size
    for k in (*self.spec, "label", "pad"):
      batch[k][slots] = buf[k][take]
    batch["ok"][slots] = True
    return batch, {k: v[~take] for k, v in buf.items()}

  def __iter__(self) -> Iterator[dict]:
    epoch, offset = divmod(self.start_step, self.steps_per_epoch)
    while self.num_epochs is None or epoch < self.num_epochs:
      batches = self.epoch_dataset(epoch, offset).as_numpy_iterator()
      for batch in self._aligned(batches, self.steps_per_epoch - offset):
        yield self._finish(batch, epoch, offset)
      epoch, offset = epoch + 1, 0

