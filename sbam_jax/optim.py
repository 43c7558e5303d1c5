"""Optimizer pieces that follow the reference recipe.

MAE pre-training builds AdamW groups with timm's `add_weight_decay`: every
trainable tensor that is 1-D or named `*.bias` gets no weight decay; all
others are decayed, including cls_token and mask_token (3-D), as the
reference does.
"""

from __future__ import annotations

import jax
from flax import traverse_util

from sbam_jax.convert.torch_keys import torch_key_for


def reference_decay_mask(params: dict) -> dict:
  """Same tree as `params` (nested dict), True where weight decay applies."""
  flat = traverse_util.flatten_dict(params)
  mask = {}
  for path, leaf in flat.items():
    key, _, stacked = torch_key_for(path)
    ndim = len(leaf.shape) - (1 if stacked else 0)
    mask[path] = not (ndim == 1 or key.endswith(".bias"))
  return traverse_util.unflatten_dict(mask)


def adamw_state(optimizer, params, mu, nu, count: int):
  """An optax AdamW state for `params` holding the given moments and step count.

  Works for any chain whose state contains one `ScaleByAdamState`.
  """
  import optax  # pylint: disable=g-import-not-at-top
  state = optimizer.init(params)

  def replace(s):
    if isinstance(s, optax.ScaleByAdamState):
      return optax.ScaleByAdamState(count=jax.numpy.asarray(count, s.count.dtype), mu=mu, nu=nu)
    return s

  return jax.tree.map(replace, state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
