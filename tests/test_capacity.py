"""Padded capacity == variable length: static-shape SBAM changes no number."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sbam_jax import masking
from sbam_jax.models import MaskedAutoencoder, model_config

TOL = 1e-6


def exact_runs(model, imgs, plan):
  """Each sample alone with exactly len_keep slots: no padding, no key mask."""
  preds, latents = [], []
  for i in range(imgs.shape[0]):
    k = int(plan.len_keep[i])
    one = masking.MaskPlan(plan.ids_shuffle[i:i + 1], plan.ids_restore[i:i + 1],
                           plan.mask[i:i + 1], plan.len_keep[i:i + 1], min_keep=k, max_keep=k)
    out = model.forward_with_plan(imgs[i:i + 1], one, k)
    preds.append(out.pred)
    latents.append(out.latent[0])
  pred = jnp.concatenate(preds)
  return model.forward_loss(imgs, pred, plan.mask), pred, latents


@pytest.mark.parametrize("attention", ["xla", "einsum"])
def test_max_and_bucketed_capacity_equal_exact_length(attention, assert_close):
  cfg = model_config("tiny", attention=attention, norm_pix_loss=True)
  model = MaskedAutoencoder(cfg, rngs=nnx.Rngs(0))
  imgs = jnp.asarray(np.random.default_rng(0).normal(size=(6, 32, 32, 3)), jnp.float32) * 0.5
  spec = masking.MaskingSpec("sbam", ratio_var=0.2, group_size=1)
  plan, _ = model.make_plan(imgs, spec, jax.random.key(3))
  keep = np.asarray(plan.len_keep)
  assert len(set(keep.tolist())) > 1, keep
  loss, pred, latents = exact_runs(model, imgs, plan)

  buckets = masking.capacity_buckets(spec, cfg.num_patches, 4)
  bucket = masking.choose_capacity(int(keep.max()), buckets)
  for capacity in sorted({masking.max_capacity(spec, cfg.num_patches), bucket}):
    out = jax.jit(model.forward_with_plan, static_argnums=2)(imgs, plan, capacity)
    assert out.latent.shape[1] == 1 + capacity
    assert_close(out.loss, loss, TOL, f"loss at capacity {capacity}")
    assert_close(out.pred, pred, TOL, f"pred at capacity {capacity}")
    for i, lat in enumerate(latents):
      assert_close(out.latent[i, :1 + keep[i]], lat, TOL, f"latent {i} at capacity {capacity}")


def test_padding_gets_no_gradient_through_the_loss():
  cfg = model_config("tiny")
  model = MaskedAutoencoder(cfg, rngs=nnx.Rngs(1))
  imgs = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)), jnp.float32) * 0.5
  spec = masking.MaskingSpec("sbam", ratio_var=0.2, group_size=1)
  plan, _ = model.make_plan(imgs, spec, jax.random.key(0))
  capacity = masking.max_capacity(spec, cfg.num_patches)

  def loss_of_latent(latent):
    return model.forward_loss(imgs, model.forward_decoder(latent, plan), plan.mask)

  latent = model.forward_with_plan(imgs, plan, capacity).latent
  g = np.asarray(jax.grad(loss_of_latent)(latent))
  for i, k in enumerate(np.asarray(plan.len_keep)):
    assert np.all(g[i, 1 + k:] == 0)
    assert np.abs(g[i, 1:1 + k]).sum() > 0


def test_capacity_below_smallest_keep_is_refused():
  cfg = model_config("tiny")
  model = MaskedAutoencoder(cfg, rngs=nnx.Rngs(0))
  imgs = jnp.zeros((2, 32, 32, 3))
  plan, _ = model.make_plan(imgs, masking.MaskingSpec("random"), jax.random.key(0))
  with pytest.raises(ValueError, match="capacity 3"):
    model.forward_with_plan(imgs, plan, 3)
