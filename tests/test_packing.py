"""Packed encoder tokens == each image run alone at its exact keep length.

The reference runs every image on its own with exactly 1 + len_keep encoder
tokens (no padding, no mask, no packing); the packed step must give the same
loss, predictions and parameter gradients within 1e-6 (float32).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sbam_jax import masking
from sbam_jax.models import MaskedAutoencoder, model_config
from sbam_jax.models import packing
from sbam_jax.train import pretrain

TOL = 1e-6


def one_plan(plan, i, k):
  return masking.MaskPlan(plan.ids_shuffle[i:i + 1], plan.ids_restore[i:i + 1],
                          plan.mask[i:i + 1], plan.len_keep[i:i + 1], min_keep=k, max_keep=k)


def flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _exact_one(graphdef, params, rest, img, plan):
  """Numerator of one image's loss (sum of masked per-patch errors), run alone
  with exactly 1 + len_keep encoder tokens (the plan's static bounds = len_keep)."""
  out = nnx.merge(graphdef, params, rest).forward_with_plan(img, plan, plan.max_keep)
  return out.loss * plan.mask.sum(), out.pred


_exact_grad = jax.jit(jax.value_and_grad(_exact_one, argnums=1, has_aux=True), static_argnums=0)


def exact_reference(model, imgs, plan):
  """(loss, pred, grads) from per-image exact-length runs: the loss is the sum
  of per-image numerators over the batch's masked count, so its gradient is
  the sum of per-image gradients (one compilation per distinct keep length)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  total = float(np.asarray(plan.mask).sum())
  loss, preds, grads = 0.0, [], None
  for i, k in enumerate(np.asarray(plan.len_keep).tolist()):
    (num, pred), g = _exact_grad(graphdef, params, rest, imgs[i:i + 1], one_plan(plan, i, k))
    loss += float(num) / total
    preds.append(pred)
    grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
  return loss, jnp.concatenate(preds), jax.tree.map(lambda x: x / total, grads)


def check_equal(model, imgs, plan, pack, assert_close):
  """Both ways of choosing the budget on the device: the model's
  (`run_packed`: the switch shares its residual slots) and the trainer's
  (`pretrain.packed_loss`: each branch takes its own gradient)."""
  l0, p0, g0 = exact_reference(model, imgs, plan)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def model_way(p):
    out = nnx.merge(graphdef, p, rest).forward_with_plan(imgs, plan, plan.max_keep, pack=pack)
    return out.loss, out.pred

  def trainer_way(p):
    return pretrain.packed_loss(graphdef, p, rest, imgs, plan, plan.max_keep, pack)

  for way in (model_way, trainer_way):
    (l1, p1), g1 = jax.jit(jax.value_and_grad(way, has_aux=True))(params)
    name = way.__name__
    assert_close(l1, l0, TOL, f"{name}: loss")
    assert_close(p1, p0, TOL, f"{name}: pred")
    assert_close(flat(g1), flat(g0), TOL, f"{name}: gradients")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g0)):
      assert_close(a, b, 1e-5, f"{name}: gradient {jax.tree_util.keystr(path)}")


def images(n, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 32, 32, 3)), jnp.float32) * 0.5


@pytest.mark.parametrize("group_size,groups", [(1, 2), (4, 1), (8, 2)])
def test_packed_equals_exact_length_per_amr_group(group_size, groups, assert_close):
  """AMR groups of 1, 4 and the batch (8); one or two packing groups (devices)."""
  cfg = model_config("tiny")
  model = MaskedAutoencoder(cfg, rngs=nnx.Rngs(0))
  imgs = images(8, group_size)
  spec = masking.MaskingSpec("sbam", ratio_var=0.2, group_size=group_size)
  plan, _ = model.make_plan(imgs, spec, jax.random.key(group_size))
  lo, hi = masking.keep_length_bounds(spec, cfg.num_patches)
  pack = packing.PackSpec(groups, packing.token_budgets(8 // groups, lo + 1, hi + 1, 3))
  need = int((np.asarray(plan.len_keep) + 1).reshape(groups, -1).sum(1).max())
  chosen = pack.budgets[int(packing.choose_budget(plan.len_keep + 1, pack))]
  assert need <= chosen and (chosen == pack.budgets[0] or need > pack.budgets[pack.budgets.index(chosen) - 1])
  check_equal(model, imgs, plan, pack, assert_close)


def test_packed_extremes_one_and_all_but_one_token(assert_close):
  """One image keeps 1 token and another L - 1 in one packing group; the other
  group (L - 2 and 50 kept) needs the last budget, the exact fallback."""
  cfg = model_config("tiny")
  L = cfg.num_patches
  model = MaskedAutoencoder(cfg, rngs=nnx.Rngs(2))
  imgs = images(4, 7)
  keep = jnp.asarray([1, L - 1, L - 2, 50], jnp.int32)
  scores = jax.random.uniform(jax.random.key(5), (4, L))
  plan = masking.plan_from_scores(scores, keep, min_keep=1, max_keep=L - 1)
  pack = packing.PackSpec(2, packing.token_budgets(2, 2, L, 3))
  assert int(packing.choose_budget(keep + 1, pack)) == len(pack.budgets) - 1   # the fallback
  check_equal(model, imgs, plan, pack, assert_close)


def test_layout_round_trip_and_budget_choice():
  """Hand-worked layout: lengths 2, 3 | 1, 4 in two groups of budget 6."""
  lengths = jnp.asarray([2, 3, 1, 4])
  layout = packing.make_layout(lengths, 2, 6, 4)
  view = jnp.arange(16.0).reshape(4, 4, 1) + 1
  packed = np.asarray(layout.pack(view))[..., 0]
  np.testing.assert_array_equal(packed[0, :5], [1, 2, 5, 6, 7])
  np.testing.assert_array_equal(packed[1, :5], [9, 13, 14, 15, 16])
  assert np.all(packed[:, 5:] == 0)                 # past each group's total
  back = np.asarray(layout.unpack(layout.pack(view)))[..., 0]
  for i, n in enumerate([2, 3, 1, 4]):
    np.testing.assert_array_equal(back[i, :n], np.asarray(view)[i, :n, 0])
    assert np.all(back[i, n:] == 0)
  # each one's backward is the other gather: the same as XLA's scatter-add
  # transpose of the plain gathers, for cotangents on every slot
  plain = lambda x, idx, used: packing._gather_used(x, idx, used)
  g_flat = jax.random.normal(jax.random.key(0), (2, 6, 1))
  g_view = jax.random.normal(jax.random.key(1), (4, 4, 1))
  _, ref = jax.vjp(lambda v: plain(v.reshape(2, 8, 1), layout.to_flat, layout.flat_used), view)
  _, got = jax.vjp(layout.pack, view)
  np.testing.assert_array_equal(got(g_flat)[0], ref(g_flat)[0])
  flat = jnp.arange(12.0).reshape(2, 6, 1)
  _, ref = jax.vjp(lambda f: plain(f, layout.to_view, layout.view_used).reshape(4, 4, 1), flat)
  _, got = jax.vjp(layout.unpack, flat)
  np.testing.assert_array_equal(got(g_view)[0], ref(g_view)[0])
  spec = packing.PackSpec(2, (4, 5, 8))
  assert int(packing.choose_budget(lengths, spec)) == 1        # group totals 5, 5
  assert int(packing.choose_budget(jnp.asarray([4, 4, 1, 1]), spec)) == 2
  # geometric: 960 x 2.3^(i/3) = 960, 1267.2, 1672.7, 2208 -> rounded up to 8 tokens
  assert packing.token_budgets(32, 30, 69, 4) == (960, 1272, 1680, 2208)
  budgets = packing.token_budgets(32, 30, 69, 16)
  steps = np.asarray(budgets[1:]) / np.asarray(budgets[:-1])
  assert len(budgets) == 16 and steps.max() <= 2.3 ** (1 / 15) + 8 / 960   # waste bound



def test_train_step_memory_does_not_grow_with_the_number_of_budgets():
  """Only the chosen budget's branch runs, and it hands out its gradient, not
  its activations: the trainer's compiled step (random-masking warm-up and
  SBAM branches, per-image ratios) needs the same temporary memory with 2
  and 8 budgets (54.4 MB here), and at most 1.3x that of one budget without
  a switch (43.8 MB; the gradient is carried out of the switch). A plain
  lax.switch keeps every branch's residuals: 44 -> 94 MB with 8."""
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
  import audit_flops as af  # pylint: disable=g-import-not-at-top

  def temp_bytes(num_budgets):
    cfg = af.make_config("tiny", "sbam", group="sample", capacity="packed", batch=32, scan=True)
    cfg.masking.num_budgets = num_budgets
    cfg.random_epochs = 1
    task = af.make_task(cfg)
    assert len(task.pack.budgets) == num_budgets
    abstract, shardings = af.abstract_state(task)
    records = af.capture_step(task, af.sharded_abstract(abstract, shardings), shardings,
                              af.abstract_batch(task))
    step = [c for name, c in records if name == "step"][-1]
    return step.memory_analysis().temp_size_in_bytes

  one, two, eight = temp_bytes(1), temp_bytes(2), temp_bytes(8)
  assert eight <= 1.02 * two and two <= 1.3 * one, (one, two, eight)
