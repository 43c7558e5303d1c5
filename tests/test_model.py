"""Model structure: sizes, initialisation, execution options, weight mapping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from helpers import nchw
from sbam_jax import masking
from sbam_jax.convert import MappingError, params_from_torch, params_to_torch
from sbam_jax.models import MaskedAutoencoder, VisionTransformer, model_config
from sbam_jax.models.pos_embed import sincos_2d
from torch_reference import TorchMAE, TorchViT, sincos_table


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("size", ["base", "large", "huge"])
def test_parameter_counts_match_reference(size):
  cfg = model_config(size)
  abstract = nnx.eval_shape(lambda: MaskedAutoencoder(cfg, rngs=nnx.Rngs(0)))
  with torch.device("meta"):
    ref = TorchMAE.from_config(cfg)
  want = sum(p.numel() for p in ref.parameters())
  assert count(nnx.state(abstract)) == want
  trainable = sum(p.numel() for p in ref.parameters() if p.requires_grad)
  assert count(nnx.state(abstract, nnx.Param)) == trainable
  # Every reference tensor has its place, with the right shape (no allocation).
  template = nnx.to_pure_dict(nnx.state(abstract))
  shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  fake = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
  params_from_torch(fake, template)  # raises on any missing / unexpected / mis-shaped key


def test_sincos_table_matches_mae_formula():
  np.testing.assert_allclose(sincos_2d(64, 7), sincos_table(64, 7), atol=1e-7)
  t = sincos_2d(16, 3, cls_token=False)
  # token 5 = row 1, col 2: first half encodes the column, second half the row.
  np.testing.assert_allclose(t[5, 0], np.sin(2.0), atol=1e-7)
  np.testing.assert_allclose(t[5, 8], np.sin(1.0), atol=1e-7)


def test_initialisation_follows_mae():
  cfg = model_config("tiny")
  m = MaskedAutoencoder(cfg, rngs=nnx.Rngs(0))
  qkv = np.asarray(m.encoder.blocks.layers.attn.qkv.kernel[...])
  bound = np.sqrt(6 / (64 + 192))
  assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.95 * bound
  pk = np.asarray(m.encoder.patch_embed.kernel[...])
  pbound = np.sqrt(6 / (4 * 4 * 3 + 64))  # conv viewed as a (p*p*C, D) matrix
  assert np.abs(pk).max() <= pbound and np.abs(pk).max() > 0.9 * pbound
  assert np.all(np.asarray(m.encoder.blocks.layers.attn.qkv.bias[...]) == 0)
  assert np.all(np.asarray(m.decoder_norm.scale[...]) == 1)
  big = MaskedAutoencoder(model_config("tiny", embed_dim=512, decoder_embed_dim=512,
                                       num_heads=8, decoder_num_heads=8), rngs=nnx.Rngs(1))
  tokens = np.concatenate([np.ravel(big.encoder.cls_token[...]), np.ravel(big.mask_token[...])])
  assert abs(tokens.std() - 0.02) < 0.003
  # Different layers of a stack get different weights.
  assert not np.allclose(qkv[0], qkv[1])


def test_scanned_and_unrolled_layers_agree():
  imgs = jnp.asarray(np.random.default_rng(0).normal(size=(3, 32, 32, 3)), jnp.float32)
  spec = masking.MaskingSpec("sbam", ratio_var=0.2, group_size=1)
  outs = []
  for scan in (True, False):
    m = MaskedAutoencoder(model_config("tiny", depth=3, scan_layers=scan), rngs=nnx.Rngs(0))
    outs.append(jax.jit(lambda x, m=m: m(x, jax.random.key(1), spec))(imgs))
  np.testing.assert_array_equal(outs[0].mask, outs[1].mask)
  np.testing.assert_allclose(outs[0].pred, outs[1].pred, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(outs[0].loss, outs[1].loss, rtol=1e-6)


def test_bf16_compute_keeps_float32_params_and_stays_close():
  imgs = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
  spec = masking.MaskingSpec("random")
  losses = []
  for dtype in ("float32", "bfloat16"):
    m = MaskedAutoencoder(model_config("tiny", dtype=dtype), rngs=nnx.Rngs(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m)))
    out = m(imgs, jax.random.key(0), spec)
    assert out.pred.dtype == jnp.float32
    losses.append(float(out.loss))
  assert abs(losses[0] - losses[1]) / losses[0] < 2e-2


def test_remat_changes_nothing():
  imgs = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)), jnp.float32)
  spec = masking.MaskingSpec("random")
  grads = []
  for remat in (False, True):
    m = MaskedAutoencoder(model_config("tiny", remat=remat), rngs=nnx.Rngs(0))
    grads.append(nnx.grad(lambda m: m(imgs, jax.random.key(0), spec).loss)(m))
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_mapping_round_trips_bit_exactly():
  m = MaskedAutoencoder(model_config("tiny", depth=3), rngs=nnx.Rngs(0))
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(m)))
  sd = params_to_torch(params)
  assert sd["blocks.2.attn.qkv.weight"].shape == (192, 64)
  assert sd["patch_embed.proj.weight"].shape == (64, 3, 4, 4)
  assert sd["decoder_norm.weight"].shape == (32,)
  back = params_from_torch(sd, params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  again = params_to_torch(back)
  assert sd.keys() == again.keys() and all(np.array_equal(sd[k], again[k]) for k in sd)


def test_mapping_lists_every_problem_by_name():
  m = MaskedAutoencoder(model_config("tiny"), rngs=nnx.Rngs(0))
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(m)))
  sd = params_to_torch(params)
  del sd["blocks.1.mlp.fc2.bias"]
  sd["decoder_pred.weight"] = np.zeros((5, 32), np.float32)
  sd["head.weight"] = np.zeros((10, 64), np.float32)
  with pytest.raises(MappingError) as err:
    params_from_torch(sd, params)
  msg = str(err.value)
  assert "missing keys: blocks.1.mlp.fc2.bias" in msg
  assert "unexpected keys: head.weight" in msg
  assert "decoder_pred.weight: got (5, 32), expected (48, 32)" in msg


@pytest.mark.parametrize("global_pool", [True, False])
def test_classifier_matches_reference(global_pool, assert_close):
  cfg = model_config("tiny", depth=3)
  vit = VisionTransformer(cfg, 7, global_pool=global_pool, drop_path_rate=0.2, rngs=nnx.Rngs(0))
  params = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(vit)))
  ref = TorchViT(cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads, 7,
                 global_pool=global_pool)
  ref.load_state_dict({k: torch.from_numpy(v) for k, v in params_to_torch(params).items()},
                      strict=True)
  imgs = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  logits = vit(jnp.asarray(imgs))
  with torch.no_grad():
    want = ref(nchw(imgs)).numpy()
  assert_close(logits, want, 1e-5, "logits")
  # Drop-path only with a key; survivors rescaled so the expectation is unchanged.
  a = vit(jnp.asarray(imgs), key=jax.random.key(0))
  b = vit(jnp.asarray(imgs), key=jax.random.key(1))
  assert not np.allclose(a, b) and np.allclose(vit(jnp.asarray(imgs)), logits)


def test_config_rejects_bad_shapes():
  with pytest.raises(ValueError, match="multiple of patch_size"):
    model_config("base", img_size=100)
  with pytest.raises(ValueError, match="attention"):
    model_config("tiny", attention="flash")
  with pytest.raises(ValueError, match="unknown model size"):
    model_config("giant")
