"""Accelerator defaults: 'auto' compute dtype and attention, bf16 parity, padded attention.

bf16 parity tolerance (stated): relative L2 error of bf16 compute against
float32 compute with the same float32 parameters, on a ViT-tiny MAE:
loss <= 1e-2, pred <= 3e-2, parameter gradients <= 6e-2. bf16 keeps 8
significant bits (a unit roundoff of 2^-9 ~ 2e-3 per product); the residual
stream, layer norms and softmax stay float32, so errors grow like the depth
times that, not with the sequence length.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sbam_jax import masking
from sbam_jax.models import MaskedAutoencoder, model_config
from sbam_jax.models import layers

from conftest import rel_err


def test_auto_is_float32_and_xla_on_cpu_bf16_and_cudnn_on_gpu(monkeypatch):
  cfg = model_config("tiny", dtype="auto", attention="auto")
  assert cfg.compute_dtype == "float32"
  assert layers.resolve_attention("auto", jnp.float32, 16) == ("xla", 1)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert cfg.compute_dtype == "bfloat16"
  assert layers.resolve_attention("auto", jnp.bfloat16, 64) == ("cudnn", layers.FUSED_SEQ_MULTIPLE)
  assert layers.resolve_attention("auto", jnp.float32, 64) == ("xla", 1)    # fused needs 16-bit
  assert layers.resolve_attention("auto", jnp.bfloat16, 160) == ("xla", 1)  # head dim too large
  assert layers.resolve_attention("einsum", jnp.bfloat16, 64) == ("einsum", 1)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert cfg.compute_dtype == "bfloat16"


def test_recipes_default_to_auto():
  from configs import common
  m = common.model("base")
  assert (m.dtype, m.attention) == ("auto", "auto")


def _loss_and_grads(dtype, imgs, plan):
  model = MaskedAutoencoder(model_config("tiny", dtype=dtype), rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))

  def loss(p):
    out = nnx.merge(graphdef, p, rest).forward_with_plan(imgs, plan)
    return out.loss, out.pred

  (l, pred), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return l, pred, np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])


def test_bf16_against_float32_within_stated_tolerance():
  imgs = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32) * 0.5
  spec = masking.MaskingSpec("sbam", ratio_var=0.2, group_size=1)
  plan, _ = MaskedAutoencoder(model_config("tiny"), rngs=nnx.Rngs(0)).make_plan(
      imgs, spec, jax.random.key(1))
  l32, p32, g32 = _loss_and_grads("float32", imgs, plan)
  l16, p16, g16 = _loss_and_grads("bfloat16", imgs, plan)
  assert p16.dtype == jnp.float32
  assert rel_err(l16, l32) <= 1e-2
  assert rel_err(p16, p32) <= 3e-2
  assert rel_err(g16, g32) <= 6e-2
  assert rel_err(p16, p32) > 0      # bf16 really ran


@pytest.mark.parametrize("impl", ["xla", "einsum"])
@pytest.mark.parametrize("lengths", [None, (197, 120, 1)])
def test_padded_attention_equals_unpadded(impl, lengths):
  """197 tokens padded to 256 (the fused kernel's multiple) change nothing."""
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.normal(size=(3, 197, 2, 16)), jnp.float32) for _ in range(3))
  kv_len = None if lengths is None else jnp.asarray(lengths, jnp.int32)
  ref = layers.attend(q, k, v, kv_len, impl, 1)
  out = layers.attend(q, k, v, kv_len, impl, layers.FUSED_SEQ_MULTIPLE)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
  # float64 reference of the valid rows
  qd, kd, vd = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("nqhd,nkhd->nhqk", qd, kd) / 4.0
  n_valid = [197] * 3 if lengths is None else lengths
  for i, t in enumerate(n_valid):
    w = np.exp(logits[i, :, :, :t] - logits[i, :, :, :t].max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    want = np.einsum("hqk,khd->qhd", w, vd[i, :t])
    np.testing.assert_allclose(out[i], want, rtol=2e-5, atol=2e-6)


def test_padded_attention_in_the_model_changes_no_number():
  cfg = model_config("tiny")
  imgs = jnp.asarray(np.random.default_rng(4).normal(size=(2, 32, 32, 3)), jnp.float32)
  model = MaskedAutoencoder(cfg, rngs=nnx.Rngs(0))
  ref = model.encoder.pooled_features(imgs)
  model.encoder.blocks.layers.attn.multiple = 16   # 65 tokens -> 80
  out = model.encoder.pooled_features(imgs)
  for key in ("cls", "mean"):
    np.testing.assert_allclose(out[key], ref[key], rtol=1e-6, atol=1e-6)
