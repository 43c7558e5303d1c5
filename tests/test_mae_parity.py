"""JAX MAE == PyTorch reference MAE: latent, prediction, loss and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from helpers import jax_and_torch_mae, nchw
from sbam_jax import masking
from sbam_jax.convert import params_from_torch
from sbam_jax.models import model_config
from torch_reference import torch_sbam_ids

TOL = 1e-5
SPECS = {
    "random": masking.MaskingSpec("random"),
    "sbm": masking.MaskingSpec("sbam", ratio_var=0.0),
    "sbam": masking.MaskingSpec("sbam", ratio_var=0.1, group_size=1),
}


def jax_loss_and_grads(model, imgs, spec, noise):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p):
    out = nnx.merge(graphdef, p, rest)(imgs, None, spec, noise=noise)
    return out.loss, out

  (loss, out), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  return out, grads


def reference_ids(ref, imgs_t, spec, noise):
  n, L = noise.shape
  noise_t = torch.from_numpy(np.asarray(noise))
  if spec.method == "random":
    keep = masking.fixed_keep_length(L, spec.mask_ratio)
    return torch.argsort(noise_t, dim=1), [keep] * n
  with torch.no_grad():
    tokens = ref.tokens(imgs_t)
  return torch_sbam_ids(tokens, noise_t, spec.mask_ratio, spec.ratio_var, spec.delta,
                        spec.group_size or n)


def check_parity(cfg, spec, n, seed, assert_close, grads=True, img_scale=1.0):
  model, ref = jax_and_torch_mae(cfg, seed)
  rng = np.random.default_rng(seed)
  imgs = (img_scale * rng.normal(size=(n, cfg.img_size, cfg.img_size, 3))).astype(np.float32)
  hi = 1.0 if spec.method == "random" else masking.SBM_NOISE_SCALE
  noise = rng.uniform(0, hi, size=(n, cfg.num_patches)).astype(np.float32)
  out, g = jax_loss_and_grads(model, jnp.asarray(imgs), spec, jnp.asarray(noise))

  imgs_t = nchw(imgs)
  ids, keep = reference_ids(ref, imgs_t, spec, noise)
  np.testing.assert_array_equal(np.asarray(out.plan.len_keep), keep)
  np.testing.assert_array_equal(np.asarray(out.plan.ids_shuffle), ids.numpy())
  ref.zero_grad()
  loss, pred, mask, latents = ref(imgs_t, ids, keep)
  loss.backward()

  np.testing.assert_array_equal(np.asarray(out.mask), mask.numpy())
  assert_close(out.loss, loss.item(), TOL, "loss")
  assert_close(out.pred, pred.detach().numpy(), TOL, "pred")
  for i, lat in enumerate(latents):
    assert_close(out.latent[i, :1 + keep[i]], lat[0].detach().numpy(), TOL, f"latent {i}")
  if grads:
    ref_grads = {k: p.grad.numpy() for k, p in ref.named_parameters() if p.requires_grad}
    g = nnx.to_pure_dict(g)
    want = params_from_torch(ref_grads, g)
    flat_got = jax.tree_util.tree_leaves_with_path(g)
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
    assert len(flat_got) == len(flat_want)
    for path, leaf in flat_got:
      assert_close(leaf, flat_want[path], TOL, f"grad {jax.tree_util.keystr(path)}")
  return out


@pytest.mark.parametrize("name", list(SPECS))
def test_tiny_parity_with_gradients(name, assert_close):
  out = check_parity(model_config("tiny"), SPECS[name], n=4, seed=11, assert_close=assert_close)
  if name == "sbam":
    assert len(set(np.asarray(out.plan.len_keep).tolist())) > 1, "AMR gave one keep length"


def test_tiny_parity_group_of_whole_batch(assert_close):
  spec = masking.MaskingSpec("sbam", ratio_var=0.1, group_size=None)
  out = check_parity(model_config("tiny", norm_pix_loss=False), spec, n=4, seed=3,
                     assert_close=assert_close)
  assert len(set(np.asarray(out.plan.len_keep).tolist())) == 1


def test_base_forward_parity(assert_close):
  cfg = model_config("base", img_size=64)
  # Unit-variance noise images make every base-sized affinity row one-hot
  # (all salience 0); smaller ones give a salience worth comparing.
  out = check_parity(cfg, SPECS["sbam"], n=2, seed=5, assert_close=assert_close, grads=False,
                     img_scale=0.1)
  frac = float((out.salience > 0.5).mean())
  assert 0.05 < frac < 0.95, frac
