"""AdamW state of a reference PyTorch pre-training checkpoint -> moment trees.

The reference (MAE main_pretrain: timm `add_weight_decay` + torch AdamW)
indexes optimizer state by position over its parameter groups: the no-decay
group first (1-D tensors and biases), then the decay group, each in the
model's registration order of trainable parameters, which is the state
dict's key order without the fixed position tables. That order is rebuilt
here and every tensor's shape is checked against its parameter.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from sbam_jax.convert.torch_io import ConvertError

FROZEN = ("pos_embed", "decoder_pos_embed")  # fixed sin-cos tables: requires_grad=False


def reference_group_order(state_dict: Mapping[str, np.ndarray]) -> tuple[list[str], list[str]]:
  """(no-decay names, decay names) in the reference's order."""
  no_decay, decay = [], []
  for name, value in state_dict.items():
    if name in FROZEN:
      continue
    (no_decay if value.ndim == 1 or name.endswith(".bias") else decay).append(name)
  return no_decay, decay


def adamw_moments(optimizer_sd: Mapping, state_dict: Mapping[str, np.ndarray],
                  path: str = "checkpoint") -> tuple[dict, dict, int]:
  """(exp_avg by name, exp_avg_sq by name, step) from a torch AdamW state dict."""
  import torch  # pylint: disable=g-import-not-at-top
  no_decay, decay = reference_group_order(state_dict)
  groups = optimizer_sd.get("param_groups", [])
  sizes = [len(g.get("params", [])) for g in groups]
  if sizes != [len(no_decay), len(decay)]:
    raise ConvertError(
        f"{path}: optimizer has parameter groups of sizes {sizes}; the MAE pre-training "
        f"recipe gives [{len(no_decay)}, {len(decay)}] (no decay, decay) for this model. "
        f"Only pre-training checkpoints of the reference recipe are supported")
  order = no_decay + decay
  ids = [i for g in groups for i in g["params"]]
  state = optimizer_sd.get("state", {})
  exp_avg, exp_avg_sq, steps = {}, {}, set()
  for name, idx in zip(order, ids):
    if idx not in state:
      raise ConvertError(f"{path}: optimizer state has no entry {idx} ({name}); was the "
                         f"checkpoint saved before the first step?")
    entry = state[idx]
    for key, out in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
      value = entry[key].detach().to(torch.float32).numpy()
      if value.shape != state_dict[name].shape:
        raise ConvertError(f"{path}: optimizer state {idx} ({name}) {key} has shape "
                           f"{value.shape}, the parameter {state_dict[name].shape}")
      out[name] = value
    steps.add(int(float(entry["step"])))
  if len(steps) != 1:
    raise ConvertError(f"{path}: parameters have different AdamW step counts {sorted(steps)}")
  return exp_avg, exp_avg_sq, steps.pop()
