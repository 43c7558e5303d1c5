"""Config pieces shared by every recipe.

Recipes (`configs/<recipe>.py`, `get_config(arg)`) start from a task's
schema defaults (`sbam_jax.config.defaults(<Task>.Config)`: every key a task
reads, with the reference recipe's values) and change what differs. The
schemas, with a comment per key, are the dataclasses in `sbam_jax/config.py`
(shared sections) and in each task module (`sbam_jax/train/pretrain.py`,
`sbam_jax/train/classify.py`).
"""

import ml_collections

from sbam_jax import config as config_lib


def model(size: str = "base", **overrides) -> ml_collections.ConfigDict:
  """Model size ('tiny', 'base', 'large', 'huge') and execution options."""
  cfg = ml_collections.ConfigDict(dict(
      size=size,
      img_size=224 if size != "tiny" else 32,
      norm_pix_loss=True,
      dtype="auto",             # compute dtype: 'auto' = bfloat16 on GPU/TPU, float32 on CPU;
                                # parameters are always float32
      scan_layers=True,         # lax.scan over stacked blocks (same weights either way)
      attention="auto",         # 'auto' (cuDNN where supported, else XLA) | 'einsum' | 'xla' | 'cudnn'
      remat=False,
  ))
  cfg.update(overrides)
  return cfg


def masking(method: str = "sbam", **overrides) -> ml_collections.ConfigDict:
  """The masking section (sbam_jax.config.MaskingConfig) for `method`."""
  cfg = config_lib.defaults(config_lib.MaskingConfig)
  cfg.method = method
  cfg.update(overrides)
  return cfg


def knn_monitor(every: int, bank: int, queries: int, **more) -> dict:
  """The representation monitor of pre-training: weighted k-NN (DINO's) on
  frozen encoder features, a fixed seeded bank of training images against a
  fixed subset of the eval split."""
  return dict(type="knn", every=every, bank=bank, queries=queries, **more)
