"""ViT building blocks (Flax NNX) with MAE's initialisation and timm's numerics.

Transformer blocks live in a `BlockStack`: one block's weights stacked along a
leading depth axis. The same weights run under `lax.scan` (one compiled block,
fast compiles) or unrolled (`scan_layers=False`), so the checkpoint layout
does not depend on that choice.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sbam_jax import sharding

xavier_uniform = nnx.initializers.xavier_uniform()
LN_EPS = 1e-6


class FixedEmbed(nnx.Variable):
  """A non-trainable table (MAE's sin-cos position embeddings): saved and
  loaded with the model, never touched by the optimizer."""


def dense(din: int, dout: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, dtype=dtype, param_dtype=jnp.float32, kernel_init=xavier_uniform,
                    bias_init=nnx.initializers.zeros, rngs=rngs)


def layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance and float32 output, as torch.nn.LayerNorm computes it.
  return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=jnp.float32, use_fast_variance=False, rngs=rngs)


def patchify(imgs: jax.Array, patch: int) -> jax.Array:
  """(N, H, W, C) -> (N, L, p*p*C), each patch flattened as (row, col, channel)."""
  n, h, w, c = imgs.shape
  gh, gw = h // patch, w // patch
  x = imgs.reshape(n, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, gh * gw, patch * patch * c)


def unpatchify(x: jax.Array, patch: int, channels: int = 3) -> jax.Array:
  """(N, L, p*p*C) -> (N, H, W, C), the inverse of `patchify` (square grid)."""
  n, L, _ = x.shape
  g = int(round(L ** 0.5))
  x = x.reshape(n, g, g, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, g * patch, g * patch, channels)


class PatchEmbed(nnx.Module):
  """Stride-p convolution with kernel p, computed as patchify + matmul.

  The kernel is stored as a conv kernel (p, p, C, D); flattened in patchify
  order it is exactly the matrix of the strided conv. Xavier-uniform treats
  it as a (p*p*C, D) matrix, as MAE does.
  """

  def __init__(self, patch: int, in_chans: int, dim: int, dtype, *, rngs: nnx.Rngs):
    self.patch = patch
    self.dtype = dtype
    init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2),
                                             out_axis=-1)
    self.kernel = nnx.Param(init(rngs.params(), (patch, patch, in_chans, dim), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

  def __call__(self, imgs: jax.Array) -> jax.Array:
    p = self.patch
    x = patchify(imgs, p).astype(self.dtype)
    w = self.kernel[...].reshape(-1, self.kernel.shape[-1]).astype(self.dtype)
    return (x @ w).astype(jnp.float32) + self.bias[...]


def key_mask_from_lengths(kv_len: jax.Array, length: int) -> jax.Array:
  """(N,) valid lengths -> (N, 1, 1, T) bool, True where a key may be attended."""
  return (jnp.arange(length)[None, :] < kv_len[:, None])[:, None, None, :]


# cuDNN's fused attention takes sequence lengths in multiples of this (197 is refused).
FUSED_SEQ_MULTIPLE = 64


def resolve_attention(impl: str, dtype, head_dim: int) -> tuple[str, int]:
  """(implementation, sequence multiple) for `impl`; 'auto' picks the fused
  cuDNN kernel on a GPU for 16-bit compute and head dims it supports (padding
  sequences to FUSED_SEQ_MULTIPLE), XLA's attention everywhere else."""
  if impl != "auto":
    return impl, 1
  fused = (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
           and head_dim % 8 == 0 and head_dim <= 128)
  return ("cudnn", FUSED_SEQ_MULTIPLE) if fused else ("xla", 1)


def attend(q, k, v, kv_len: Optional[jax.Array], impl: str, multiple: int = 1) -> jax.Array:
  """Softmax attention of (N, T, H, Dh) q, k, v; keys at or past kv_len (N,) are
  masked. T is padded to a multiple of `multiple` (padded keys masked, padded
  queries dropped), which changes no number of the valid rows."""
  n, t, _, dh = q.shape
  pad = -t % multiple
  if pad:
    widen = lambda a: jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q, k, v = widen(q), widen(k), widen(v)
    kv_len = jnp.full((n,), t, jnp.int32) if kv_len is None else kv_len
  tp = t + pad
  scale = dh ** -0.5
  if impl == "einsum":
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32) * scale
    if kv_len is not None:
      logits = jnp.where(key_mask_from_lengths(kv_len, tp), logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("nhqk,nkhd->nqhd", weights, v)
  else:
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, key_value_seq_lengths=kv_len,
                                       implementation=None if impl == "xla" else impl)
  return out[:, :t]


class Attention(nnx.Module):
  """Multi-head self-attention with one fused qkv projection (rows q, k, v).

  With a packing `layout` the input is the packed (G, B, D) buffer: qkv and
  the projection run on it, attention on each image's own tokens (the
  layout's per-image view with key lengths)."""

  def __init__(self, dim: int, num_heads: int, dtype, impl: str, *, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.impl, self.multiple = resolve_attention(impl, dtype, dim // num_heads)
    self.qkv = dense(dim, 3 * dim, dtype, rngs)
    self.proj = dense(dim, dim, dtype, rngs)

  def __call__(self, x: jax.Array, kv_len: Optional[jax.Array], layout=None) -> jax.Array:
    d, h = x.shape[-1], self.num_heads
    qkv = self.qkv(x)
    if layout is not None:
      qkv, kv_len = layout.unpack(qkv), layout.lengths
    n, t = qkv.shape[:2]
    qkv = qkv.reshape(n, t, 3, h, d // h)
    out = attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], kv_len, self.impl, self.multiple)
    out = out.reshape(n, t, d)
    return self.proj(out if layout is None else layout.pack(out))


class Mlp(nnx.Module):
  def __init__(self, dim: int, hidden: int, dtype, *, rngs: nnx.Rngs):
    self.fc1 = dense(dim, hidden, dtype, rngs)
    self.fc2 = dense(hidden, dim, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


def drop_path(x: jax.Array, rate: jax.Array, key: Optional[jax.Array]) -> jax.Array:
  """Stochastic depth per sample (timm semantics: survivors scaled by 1/keep)."""
  if key is None:
    return x
  keep = 1.0 - rate
  alive = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(alive, x / jnp.maximum(keep, 1e-12), 0.0).astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(LN(x)), x + mlp(LN(x)).

  The residual stream stays float32; matmuls run in the compute dtype.
  """

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dtype, impl: str, *,
               rngs: nnx.Rngs):
    self.norm1 = layer_norm(dim, rngs)
    self.attn = Attention(dim, num_heads, dtype, impl, rngs=rngs)
    self.norm2 = layer_norm(dim, rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype, rngs=rngs)

  def __call__(self, x, kv_len=None, drop_rate=0.0, key=None, layout=None):
    k1, k2 = (None, None) if key is None else tuple(jax.random.split(key))
    x = x + drop_path(self.attn(self.norm1(x), kv_len, layout), drop_rate, k1)
    return x + drop_path(self.mlp(self.norm2(x)), drop_rate, k2)


class BlockStack(nnx.Module):
  """`depth` blocks whose parameters are stacked along a leading axis."""

  def __init__(self, depth: int, dim: int, num_heads: int, mlp_ratio: float, *, dtype,
               impl: str, scan: bool, remat: bool = False, rngs: nnx.Rngs):
    self.depth = depth
    self.scan = scan
    self.remat = remat
    blocks = [Block(dim, num_heads, mlp_ratio, dtype, impl, rngs=rngs) for _ in range(depth)]
    graphdef, _ = nnx.split(blocks[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks])
    self.layers = nnx.merge(graphdef, stacked)

  def __call__(self, x: jax.Array, kv_len: Optional[jax.Array] = None,
               drop_path_rate: float = 0.0, key: Optional[jax.Array] = None,
               layout=None) -> jax.Array:
    """kv_len: (N,) count of leading tokens that may be attended (None = all).
    drop_path_rate: the last block's rate, linear from 0 (timm); needs `key`.
    layout: x is a packed (G, B, D) buffer (`packing.PackedLayout`); drop-path
    is per image, so it is refused there."""
    if layout is not None and key is not None:
      raise ValueError("drop-path is per image: not available on packed tokens")
    graphdef, state = nnx.split(self.layers)
    rates = jnp.asarray(np.linspace(0.0, drop_path_rate, self.depth), jnp.float32)
    keys = None if key is None else jax.random.split(key, self.depth)

    def body(h, layer):
      params, rate, k = layer
      params = sharding.gathered(params)  # FSDP: this layer's weights, gathered here
      h = nnx.merge(graphdef, params)(sharding.batch_split(h), kv_len, rate, k, layout)
      return sharding.batch_split(h), None

    if self.remat:
      body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    xs = (state, rates, keys)
    if self.scan:
      return jax.lax.scan(body, x, xs)[0]
    for i in range(self.depth):
      x, _ = body(x, jax.tree.map(lambda a, i=i: a[i], xs))
    return x
