"""Extending the trainer without touching it: an evaluator, a data source and
an optimizer defined only here plug in through the config; the evaluator's
metrics reach metrics.jsonl and TensorBoard; a run with a non-AdamW
optimizer resumes bit-identically."""

import glob
import io
import os
import shutil
import sys

import jax
import numpy as np
import optax
import pytest
from PIL import Image

from sbam_jax import config as C
from sbam_jax import optim, registry
from sbam_jax.data import sources
from sbam_jax.evals.base import Evaluator
from sbam_jax.train import loop
from workdir_helpers import final_state, metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import demo as demo_config  # noqa: E402

READS = []


@registry.register("source", "test_memory")
class MemorySource(sources.IndexedSource):
  """PNG images held in memory: 4 classes of flat colours plus noise."""

  def __init__(self, split: str, count: int = 64):
    rng = np.random.default_rng(0 if split == "train" else 1)
    self.classes = ("blue", "green", "grey", "red")
    self.labels = np.arange(count, dtype=np.int32) % 4
    colours = np.array([[0, 0, 200], [0, 200, 0], [128, 128, 128], [200, 0, 0]])
    self.blobs = []
    for label in self.labels:
      img = np.clip(colours[label] + rng.normal(0, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
      buf = io.BytesIO()
      Image.fromarray(img).save(buf, "PNG")
      self.blobs.append(buf.getvalue())
    self.num_examples = count

  @classmethod
  def from_config(cls, data, split):
    return cls(split)

  def records(self, positions):
    READS.append(len(positions))
    return [self.blobs[p] for p in positions], self.labels[positions]


@registry.register("evaluator", "test_param_norm")
class ParamNorm(Evaluator):
  """The global L2 norm of the trainable parameters, scaled."""

  def __init__(self, task, *, scale: float = 1.0, **base):
    super().__init__(task, **base)
    self.scale = scale

  def run(self, state):
    return {"norm": self.scale * float(optax.tree.norm(state.params))}


def config(workdir_epochs=2, **more):
  c = demo_config.get_config()
  c.data.source = "test_memory"
  c.epochs = workdir_epochs
  c.warmup_epochs = 1
  c.random_epochs = 1
  c.log_every = 1
  c.figure_every = 1000
  c.evals = {"probe": dict(type="test_param_norm", every=1, scale=2.0)}
  for k, v in more.items():
    setattr(c, k, v)
  return c


def tensorboard_scalars(workdir, tag):
  import tensorflow as tf
  out = {}
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag == tag:
          out[event.step] = float(tf.make_ndarray(v.tensor))
  return out


def test_evaluator_and_source_defined_here_plug_in_through_the_config(tmp_path):
  READS.clear()
  assert loop.run(config(), str(tmp_path)) == 0
  assert READS, "the test source was never read"
  steps = [r["step"] for r in metrics(tmp_path) if "loss" in r]
  assert steps == [1, 2, 3, 4]  # 64 images, batch 32: 2 steps an epoch, 2 epochs
  probe = {r["step"]: r["probe/norm"] for r in metrics(tmp_path) if "probe/norm" in r}
  assert sorted(probe) == [2, 4]  # every epoch; the last step once
  step, tree = final_state(tmp_path)
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree["params"])]
  want = 2.0 * np.sqrt(sum((x ** 2).sum() for x in leaves))
  assert step == 4 and probe[4] == pytest.approx(want, rel=1e-6)
  assert tensorboard_scalars(tmp_path, "probe/norm") == pytest.approx(probe, rel=1e-6)


def test_monitor_evaluators_run_through_the_loop_on_any_source(tmp_path):
  """k-NN and few-shot share one feature extraction per step; both start at step 0."""
  c = config()
  c.evals = {"knn": dict(type="knn", every=1, bank=64, queries=32, k=5),
             "fs": dict(type="fewshot", every=2, shots=(2, 4), bank=64, queries=32)}
  assert loop.run(c, str(tmp_path)) == 0
  knn = {r["step"]: r for r in metrics(tmp_path) if "knn/cls_top1" in r}
  fs = {r["step"]: r for r in metrics(tmp_path) if "fs/cls_2shot_top1" in r}
  assert sorted(knn) == [0, 2, 4] and sorted(fs) == [0, 4]
  keys = {f"fs/{f}_{n}shot_top1" for f in ("cls", "mean") for n in (2, 4)}
  assert keys <= set(fs[4]) and {"knn/cls_top1", "knn/mean_top1"} <= set(knn[4])
  # 4 flat colours: any encoder's features separate them (chance is 25 %)
  assert knn[4]["knn/mean_top1"] > 50 and fs[4]["fs/mean_4shot_top1"] > 50


def test_a_non_adamw_optimizer_resumes_bit_identically(tmp_path, capsys):
  spec = "sgd(momentum=0.9, nesterov=True)"
  c = config(workdir_epochs=3, optimizer=spec, checkpoint_every=4)
  c.evals = {}
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  assert loop.run(c, str(straight)) == 0
  assert "note: optimizer 'sgd(momentum=0.9, nesterov=True)' has no weight decay; the " \
      "recipe's weight_decay=0.05 is not applied" in capsys.readouterr().out
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")  # as if killed after saving step 4
  assert loop.run(c, str(resumed)) == 0
  (sa, a), (sb, b) = final_state(straight), final_state(resumed)
  assert sa == sb == 6
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Another optimizer cannot continue these checkpoints: one clear error, nothing written.
  before = sorted(os.listdir(resumed / "checkpoints"))
  c.optimizer = "adamw"
  with pytest.raises(C.ConfigError, match="holds checkpoints of optimizer 'sgd\\(momentum=0.9, "
                                          "nesterov=True\\)'.*asks for 'adamw'"):
    loop.run(c, str(resumed))
  assert sorted(os.listdir(resumed / "checkpoints")) == before


def test_optimizers_by_name_equal_their_optax_definition():
  params = {"w": np.ones((3, 2), np.float32), "b": np.ones((2,), np.float32)}
  grads = {"w": np.full((3, 2), 0.5, np.float32), "b": np.full((2,), -1.0, np.float32)}
  mask = {"w": True, "b": False}
  cases = [
      ("sgd(momentum=0.9)", optax.sgd(0.1, momentum=0.9)),
      ("adamw", optax.adamw(0.1, b1=0.8, b2=0.9, eps=1e-8, weight_decay=0.3, mask=mask)),
      ("lamb", optax.lamb(0.1, b1=0.8, b2=0.9, weight_decay=0.3, mask=mask)),
  ]
  for spec, want in cases:
    tx = optim.build(spec, 0.1, decay_mask=mask,
                     defaults=dict(b1=0.8, b2=0.9, weight_decay=0.3))
    got_u, _ = tx.update(grads, tx.init(params), params)
    want_u, _ = want.update(grads, want.init(params), params)
    for k in params:
      np.testing.assert_allclose(got_u[k], want_u[k], rtol=1e-6, err_msg=spec)


@pytest.mark.parametrize("spec,message", [
    ("sgdd", "optimizer='sgdd' is not a known optimizer \\(did you mean 'sgd'\\?\\)"),
    ("sgd(momentum=0.9, betas=1)", "optimizer 'sgd' takes no argument betas"),
    ("sgd(0.9)", "write a name, or name\\(key=value, ...\\)"),
    ("clip", "optax.clip is not an optimizer"),
    ("sgd(decay_mask=None)", "decay_mask come from the recipe"),
])
def test_bad_optimizer_names_are_one_clear_error(spec, message):
  with pytest.raises(C.ConfigError, match=message):
    optim.build(spec, 0.1, decay_mask={})


def test_a_bad_optimizer_argument_fails_before_compiling():
  params = {"w": jax.ShapeDtypeStruct((3, 2), np.float32)}
  # caught where the optimizer is built (AdamW reads its betas at once) ...
  with pytest.raises(C.ConfigError, match="optimizer 'adamw': could not convert string to float"):
    optim.build("adamw", 0.1, decay_mask={"w": True}, args={"b1": "x"})
  # ... or, for a value optax only reads in its update, by a trial update on shapes
  tx = optim.build("sgd", 0.1, decay_mask={"w": True}, args={"momentum": "x"})
  with pytest.raises(C.ConfigError, match="optimizer 'sgd' cannot update the parameters"):
    optim.check_update(tx, params, "sgd")


@registry.register("source", "test_train_only")
class TrainOnlySource(MemorySource):
  @classmethod
  def from_config(cls, data, split):
    if split != "train":
      raise sources.DataError(f"no split {split!r} here")
    return cls(split)


def test_monitor_without_an_eval_split_queries_held_out_training_images(tmp_path, capsys):
  from sbam_jax.evals import monitor
  from sbam_jax.train import pretrain
  c = config()
  c.data.source = "test_train_only"
  task = pretrain.PretrainTask(c, str(tmp_path))
  ev = monitor.KnnEvaluator(task, name="knn", bank=40, queries=20)
  bank, queries = ev.features.bank_source, ev.features.query_source
  assert (bank.num_examples, queries.num_examples) == (40, 20)
  assert not set(bank.indices) & set(queries.indices)
  assert "evals.knn: the data has no eval split" in capsys.readouterr().out
  with pytest.raises(sources.DataError, match="evals.knn.split: no split 'test'"):
    monitor.KnnEvaluator(task, name="knn", bank=40, queries=20, split="test", seed=1)


@pytest.mark.parametrize("evals,message", [
    ({"x": dict(every=1)}, "evals.x needs a type"),
    ({"x": dict(type="knnn")}, "evals.x.type='knnn' is not a known evaluator \\(did you mean 'knn'\\?\\)"),
    ({"x": dict(type="test_param_norm", scael=2.0)},
     "unknown config field evals.x.scael \\(did you mean evals.x.scale\\?\\)"),
    ({"x": 5}, "evals.x must be a dict"),
    ({"x": dict(type="knn", every=0.5)}, "evals.x.every must be a whole number"),
    ({"x": dict(type="knn", bank=0)}, "evals.x.bank and evals.x.queries must be >= 1"),
])
def test_bad_evaluator_entries_are_one_clear_error(tmp_path, evals, message):
  c = config()
  c.evals = evals
  with pytest.raises(C.ConfigError, match=message):
    loop.run(c, str(tmp_path))
