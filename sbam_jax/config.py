"""Typed objects from ml_collections configs, with one clear error per problem.

Configs are plain ConfigDicts (see configs/common.py); the code runs on the
frozen dataclasses built here, so a typo or an impossible value fails before
anything compiles, naming the config field.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from sbam_jax import masking
from sbam_jax.models.sizes import SIZES, ModelConfig, model_config

GROUPS = ("sample", "device", "global")
CAPACITIES = ("max", "bucketed")
_MASKING_KEYS = {"method", "mask_ratio", "ratio_var", "delta", "group", "capacity", "num_buckets"}


class ConfigError(ValueError):
  """A config field that is unknown or holds an impossible value."""


def _check_keys(cfg: Mapping, allowed: set, where: str):
  unknown = sorted(set(cfg.keys()) - allowed)
  if unknown:
    raise ConfigError(f"unknown {where} config field(s): {', '.join(f'{where}.{k}' for k in unknown)}; "
                      f"known: {', '.join(sorted(allowed))}")


def build_model_config(cfg: Mapping) -> ModelConfig:
  """`config.model` -> ModelConfig ('size' picks the architecture)."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  _check_keys(cfg, fields | {"size"}, "model")
  values = dict(cfg)
  size = values.pop("size", "base")
  if size not in SIZES:
    raise ConfigError(f"model.size must be one of {SIZES}, got {size!r}")
  try:
    return model_config(size, **values)
  except ValueError as e:
    raise ConfigError(f"model: {e}") from None


def group_size(group: str, *, global_batch: int, num_devices: int) -> int:
  """Samples per AMR group: 1, one device's batch, or the whole global batch."""
  if group not in GROUPS:
    raise ConfigError(f"masking.group must be one of {GROUPS}, got {group!r}")
  if global_batch % num_devices:
    raise ConfigError(f"global batch {global_batch} does not split over {num_devices} devices")
  return {"sample": 1, "device": global_batch // num_devices, "global": global_batch}[group]


def build_masking_spec(cfg: Mapping, *, global_batch: int, num_devices: int) -> masking.MaskingSpec:
  """`config.masking` -> MaskingSpec, with the AMR group resolved to a size."""
  _check_keys(cfg, _MASKING_KEYS, "masking")
  if cfg.get("capacity", "max") not in CAPACITIES:
    raise ConfigError(f"masking.capacity must be one of {CAPACITIES}, got {cfg['capacity']!r}")
  if int(cfg.get("num_buckets", 4)) < 1:
    raise ConfigError(f"masking.num_buckets must be >= 1, got {cfg['num_buckets']}")
  size = group_size(cfg.get("group", "device"), global_batch=global_batch, num_devices=num_devices)
  try:
    return masking.MaskingSpec(method=cfg.get("method", masking.SBAM),
                               mask_ratio=float(cfg.get("mask_ratio", 0.75)),
                               ratio_var=float(cfg.get("ratio_var", 0.1)),
                               delta=float(cfg.get("delta", 0.5)), group_size=size)
  except ValueError as e:
    raise ConfigError(f"masking: {e}") from None
