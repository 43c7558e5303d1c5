"""Config pieces shared by every recipe: the model and the masking method.

Recipes (`configs/<recipe>.py`, `get_config(arg)`) build on these; the
defaults are the reference recipe's. `sbam_jax.config` turns them into the
typed objects the code uses and rejects unknown keys and impossible values.
"""

import ml_collections


def model(size: str = "base", **overrides) -> ml_collections.ConfigDict:
  """Model size ('tiny', 'base', 'large', 'huge') and execution options."""
  cfg = ml_collections.ConfigDict(dict(
      size=size,
      img_size=224 if size != "tiny" else 32,
      norm_pix_loss=True,
      dtype="float32",          # compute dtype; parameters are always float32
      scan_layers=True,         # lax.scan over stacked blocks (same weights either way)
      attention="xla",          # 'einsum' | 'xla' | 'cudnn' (GPU)
      remat=False,
  ))
  cfg.update(overrides)
  return cfg


def masking(method: str = "sbam", **overrides) -> ml_collections.ConfigDict:
  """Masking method and its static-shape strategy.

  ratio_var = 0.1 and delta = 0.5 are this project's defaults: the SBAM
  release states no values for them.
  """
  cfg = ml_collections.ConfigDict(dict(
      method=method,            # 'random' (MAE) | 'sbam' (ratio_var = 0 gives SBM)
      mask_ratio=0.75,
      ratio_var=0.1,
      delta=0.5,
      group="device",           # AMR ratio shared per 'sample' | 'device' batch | 'global' batch
      capacity="max",           # 'max' (one compile, no host sync) | 'bucketed'
      num_buckets=4,
  ))
  cfg.update(overrides)
  return cfg


def data(**overrides) -> ml_collections.ConfigDict:
  """Where images come from (the same fields for every task)."""
  cfg = ml_collections.ConfigDict(dict(
      source="folder",          # 'folder' (MAE layout) | 'tfds' | 'demo'
      path="",                  # folder layout root (--data_path of the reference)
      split="train",
      eval_split="",            # evaluated by fine-tuning / probing; '' = val (folder) / validation (tfds)
      tfds_name="imagenet2012",
      tfds_data_dir="",
      threads=0,                # tf.data threads per process; 0 = one per core
      device_resize=True,       # pre-train / probe crops resized on the accelerator
  ))
  cfg.update(overrides)
  return cfg


def run_control(c: ml_collections.ConfigDict) -> None:
  """Mesh, logging and checkpoint cadence (steps), the same for every task."""
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.log_every = 50
  c.checkpoint_every = 2000   # steps; and at the end, and on SIGTERM
  c.keep_checkpoints = 3
