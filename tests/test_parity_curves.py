"""Training-curve parity with the PyTorch reference, over tens of steps (short
version of benchmarks/parity_curves.py).

Pre-training crosses the warm-up end and the random -> SBAM switch with
accumulation 2; the other masking modes (random, SBM, SBAM with one AMR ratio
per sample) run 8 steps each with their masking from the first step, one
compilation each (the 'global' group is the 'device' one on one device; the
long version runs on two). The reference trains on the masks our loss
reports and builds its own from the reported keys: every sample's kept
tokens must agree. Fine-tuning uses layer-wise lr decay; the probe trains
BatchNorm + Linear with LARS. Ours is held to BOUND_FACTOR x the larger of
the divergence that float32 reordering alone gives (the reference against
itself, summed in another order) and the reference's own float32 error
(against the same recipe in float64). Four deliberate mistakes on our side
(wrong schedule, wrong decay mask, wrong accumulation average, wrong switch
step) must each break the comparison, which shows the check can fail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from benchmarks import parity_curves as pc
from sbam_jax import optim
from sbam_jax.train import schedule

MODES = pc.pretrain_runs(0, images=16, batch=8, accum=2, epochs=4, warmup_epochs=1, blr=5e-3)
SHORT = {
    # 2 steps an epoch: warm-up ends at step 4, SBAM (AMR per micro-batch) from step 6 of 16.
    "pretrain": pc.Run("pretrain", images=16, batch=8, accum=2, epochs=8, warmup_epochs=2,
                       blr=5e-3, random_epochs=3,
                       masking=dict(method="sbam", ratio_var=0.1, group="device")),
    # 2 steps an epoch, warm-up ends at step 2, the mode's masking throughout.
    **{k: MODES[k] for k in ("pretrain_random", "pretrain_sbm", "pretrain_sbam_sample")},
    "finetune": pc.Run("finetune", images=16, batch=8, epochs=6, warmup_epochs=2, blr=5e-3,
                       min_lr=1e-6, layer_decay=0.75),
    "linprobe": pc.Run("linprobe", images=16, batch=8, epochs=6, warmup_epochs=2, blr=2.0,
                       weight_decay=0.0),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  images, labels = pc.demo_images(16)
  root = pc.write_folder(str(tmp_path_factory.mktemp("parity_data")), images, labels)
  return root, images, labels


@pytest.fixture(scope="module")
def results(data, tmp_path_factory):
  """name -> (summary, ours, reference runs), computed once."""
  root, images, labels = data
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = pc.compare_task(SHORT[name], root, images, labels,
                                    str(tmp_path_factory.mktemp(name)))
    return cache[name]

  return get


def _check(s):
  assert s["lr_rel_max"] < 1e-5, s          # the schedule, step by step
  assert s["reorder_loss_rel_max"] > 0, s   # the reordered reference really differs
  assert s["f32_loss_rel_max"] > 0, s       # and so does the float64 one
  assert s["loss_rel_max"] <= s["loss_bound"], s
  assert s["param_rel"] <= s["param_bound"], s


@pytest.mark.parametrize("name", list(SHORT))
def test_training_curve_matches_reference_within_reordering_noise(name, results):
  run = SHORT[name]
  s, ours, (ref, *_) = results(name)
  assert s["steps"] == run.steps
  assert run.warmup_epochs * run.steps_per_epoch < run.steps
  if name == "pretrain":
    assert 0 < run.random_epochs * run.steps_per_epoch < run.steps - 4
  if run.task == "pretrain":  # every sample's mask checked against the reference's own
    assert s["masks"] == run.steps * run.batch and s["mask_mismatch"] == 0, s
    if run.masking.get("method") == "random" or run.masking.get("ratio_var") == 0:
      assert s["keep_min"] == s["keep_max"] == 16, s   # floor(64 tokens x 0.25)
    else:  # AMR moves the ratio within [0.65, 0.85]: keep lengths 9..22
      assert 9 <= s["keep_min"] < s["keep_max"] <= 22, s
  assert ref["loss"][-1] < ref["loss"][0]   # it trains
  _check(s)


def _wrong_schedule(monkeypatch, run):
  """The lr held for a whole epoch (per-epoch instead of per-step schedule).
  Every task shares the schedule; the probe compiles fastest."""
  right = schedule.mae_lr

  def per_epoch(step, *, steps_per_epoch, **kw):
    whole = jnp.asarray(step) // steps_per_epoch * steps_per_epoch
    return right(whole, steps_per_epoch=steps_per_epoch, **kw)

  monkeypatch.setattr(schedule, "mae_lr", per_epoch)


def _wrong_decay_mask(monkeypatch, run):
  """Weight decay on every tensor (biases, LayerNorms, tokens) in pre-training."""
  monkeypatch.setattr(optim, "reference_decay_mask", lambda p: jax.tree.map(lambda _: True, p))


def _wrong_accumulation(monkeypatch, run):
  """Micro-batches weighted by their masked-token count (one mean over every
  masked token of the step) instead of MAE's mean of micro-batch losses."""
  def patch(task):
    loss = task.loss

    def weighted(capacity=None):
      fn = loss(capacity)

      def loss_fn(params, fixed, stats, batch, key, step):
        value, (diag, stats) = fn(params, fixed, stats, batch, key, step)
        w = jax.lax.stop_gradient(diag["mask_ratio_mean"] / task.spec.mask_ratio)
        # The gradient is weighted; the reported loss is not (only training can show it).
        return value * w - jax.lax.stop_gradient(value * w - value), (diag, stats)
      return loss_fn

    task.loss = weighted
  return patch


def _wrong_switch(monkeypatch, run):
  """The random -> SBAM switch counted in micro-steps (accum x too late)."""
  def patch(task):
    task.random_steps *= run.accum
  return patch


MISTAKES = {"wrong_schedule": ("linprobe", _wrong_schedule),
            "wrong_decay_mask": ("pretrain", _wrong_decay_mask),
            "wrong_accumulation_average": ("pretrain", _wrong_accumulation),
            "wrong_switch_step": ("pretrain", _wrong_switch)}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_each_deliberate_mistake_breaks_the_comparison(mistake, monkeypatch, data, results,
                                                       tmp_path):
  name, make_patch = MISTAKES[mistake]
  run = SHORT[name]
  good, _, refs = results(name)
  _check(good)   # the same comparison passes without the mistake
  root, images, labels = data
  patch = make_patch(monkeypatch, run)
  s, *_ = pc.compare_task(run, root, images, labels, str(tmp_path), patch=patch,
                          references=refs)
  assert not s["ok"], s
  # Far outside the bound, not at its edge (or masks the reference would not have used).
  assert (s["loss_rel_max"] > 10 * s["loss_bound"] or s["param_rel"] > 10 * s["param_bound"]
          or s.get("mask_mismatch", 0) > 0), s
