"""The representation monitor of pre-training: how good are the frozen
encoder's features right now? (No MAE implementation reports this during
training; the anchors are DINO's weighted k-NN and big_vision's few-shot
linear evaluator.)

Both evaluators read the unmasked encoder's features (`task.features_fn`:
the cls token and the mean of the patch tokens, each reported) of two fixed,
seeded subsets: a labelled `bank` of the training split and `queries` of the
eval split (or, for data without one, training images disjoint from the
bank), through the eval transform (resize + centre crop). Fixed subsets
make the numbers comparable along a run and across runs. Features stay
sharded over the mesh as they were computed (representation.py); nothing
gathers the bank onto one device.

  knn      top-1 of DINO's weighted k-NN (cosine, k = 20, T = 0.07)
  fewshot  top-1 of closed-form ridge regression on `shots` examples per
           class of the bank (several n at once)

Both run before the first step of a fresh run too (`first=True`), so a
curve starts at the initialisation. When both run at the same step they
share one feature extraction.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from sbam_jax import registry
from sbam_jax.data import device as device_ops
from sbam_jax.errors import ConfigError, DataError
from sbam_jax.evals import representation as rep
from sbam_jax.evals.base import Evaluator
from sbam_jax.evals.classification import eval_batches


class _Features:
  """Bank and query features of the latest evaluated step, shared by the
  monitor evaluators of one task."""

  def __init__(self, task, bank: int, queries: int, seed: int, split: str, batch_size: int,
               where: str):
    cfg = task.config
    if bank < 1 or queries < 1:
      raise ConfigError(f"{where}.bank and {where}.queries must be >= 1, got {bank}, {queries}")
    self.task = task
    self.bank_source, self.query_source = self._subsets(task, bank, queries, seed, split, where)
    self.num_classes = len(self.bank_source.classes)
    self.batch_size = batch_size or cfg.batch_size // cfg.accum_steps
    features = task.features_fn()
    self.fn = lambda state, images: features(state, device_ops.normalize(images, jnp.float32))
    self._step, self._sets = None, None

  @staticmethod
  def _subsets(task, bank, queries, seed, split, where):
    """The bank from the training split; queries from `split` (default: the
    eval split), or, when the data has no eval split and none was asked
    for, from training images disjoint from the bank."""
    train = task.source()
    try:
      query_source = task.source(split or task.config.data.eval_split_name())
    except DataError as e:
      if split:
        raise DataError(f"{where}.split: {e}") from None
      if task.process == 0:
        print(f"{where}: the data has no eval split ({e}); its queries are {queries} training "
              f"images disjoint from the bank", flush=True)
      return tuple(train.subsets([bank, queries], seed))
    return train.subsets([bank], seed)[0], query_source.subsets([queries], seed + 1)[0]

  def __call__(self, state):
    step = int(state.step)
    if step != self._step:
      self._sets = tuple(rep.extract_features(
          self.fn, eval_batches(self.task, source, self.batch_size), self.task.mesh,
          args=(state,)) for source in (self.bank_source, self.query_source))
      self._step = step
    return self._sets


def _shared(task, where: str, **kwargs) -> _Features:
  cache = task.__dict__.setdefault("_monitor_features", {})
  key = tuple(sorted(kwargs.items()))
  if key not in cache:
    cache[key] = _Features(task, where=where, **kwargs)
  return cache[key]


@registry.register("evaluator", "knn")
class KnnEvaluator(Evaluator):
  """{'<feature>_top1': percent} for each feature the task reports."""

  def __init__(self, task, *, bank: int = 10_000, queries: int = 5_000, k: int = 20,
               temperature: float = 0.07, seed: int = 0, split: str = "",
               batch_size: int = 0, first: bool = True, **base):
    super().__init__(task, first=first, **base)
    self.k, self.temperature = int(k), float(temperature)
    self.features = _shared(task, f"evals.{self.name}", bank=bank, queries=queries, seed=seed,
                            split=split, batch_size=batch_size)

  def run(self, state) -> dict:
    (bank, bank_y, bank_ok), (query, query_y, query_ok) = self.features(state)
    out = {}
    for name in sorted(bank):
      preds = rep.knn_predict(bank[name], bank_y, bank_ok, query[name],
                              num_classes=self.features.num_classes, k=self.k,
                              temperature=self.temperature)
      out[f"{name}_top1"] = 100.0 * float(rep.accuracy(preds, query_y, query_ok))
    return out

  def describe(self, m: dict) -> str:
    return ("k-NN top-1 " + " ".join(f"{k[:-5]} {v:.2f}%" for k, v in m.items())
            + f" (k={self.k}, chance {100 / max(self.features.num_classes, 1):.1f}%)")

  def headline(self, m: dict) -> str:
    return "knn " + "/".join(f"{v:.1f}" for v in m.values()) + "%"


@registry.register("evaluator", "fewshot")
class FewshotEvaluator(Evaluator):
  """{'<feature>_<n>shot_top1': percent} for each n in `shots`."""

  def __init__(self, task, *, shots: Sequence[int] = (5, 10), bank: int = 10_000,
               queries: int = 5_000, l2_reg: float = 2.0 ** 10, seed: int = 0,
               split: str = "", batch_size: int = 0, first: bool = True, **base):
    super().__init__(task, first=first, **base)
    self.shots, self.l2_reg, self.seed = tuple(int(n) for n in shots), float(l2_reg), seed
    self.features = _shared(task, f"evals.{self.name}", bank=bank, queries=queries, seed=seed,
                            split=split, batch_size=batch_size)
    self._picks: dict = {}

  def _indices(self, bank_y, bank_ok, n: int):
    if n not in self._picks:  # the bank is fixed: so is each n-shot choice
      self._picks[n] = rep.fewshot_indices(rep.to_host(bank_y), rep.to_host(bank_ok), n,
                                           self.seed, num_classes=self.features.num_classes)
    return self._picks[n]

  def run(self, state) -> dict:
    (bank, bank_y, bank_ok), (query, query_y, query_ok) = self.features(state)
    out = {}
    for n in self.shots:
      idx = self._indices(bank_y, bank_ok, n)
      labels = rep.take_examples(bank_y, idx)
      for name in sorted(bank):
        preds = rep.ridge_fewshot_predict(rep.take_examples(bank[name], idx), labels, query[name],
                                          num_classes=self.features.num_classes,
                                          l2_reg=self.l2_reg)
        out[f"{name}_{n}shot_top1"] = 100.0 * float(rep.accuracy(preds, query_y, query_ok))
    return out

  def headline(self, m: dict) -> str:
    return "fewshot " + "/".join(f"{v:.1f}" for v in m.values()) + "%"
