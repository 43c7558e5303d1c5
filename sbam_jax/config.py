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


PRETRAIN_KEYS = {"task", "seed", "model", "masking", "random_epochs", "data", "batch_size", "accum_steps",
                 "epochs", "warmup_epochs", "blr", "min_lr", "weight_decay", "b1", "b2", "mesh",
                 "init_from", "log_every", "checkpoint_every", "keep_checkpoints", "figure_every",
                 "figure_images"}
DATA_SOURCES = ("folder", "tfds", "demo")


def check_pretrain(config: Mapping, *, num_devices: int, num_processes: int):
  """Validate a pre-training config before anything is built or compiled.

  Returns (ModelConfig, MaskingSpec, micro-batch global size).
  """
  _check_keys(config, PRETRAIN_KEYS, "top-level")
  model, micro = _check_common(config, num_devices=num_devices, num_processes=num_processes)
  spec = build_masking_spec(config["masking"], global_batch=micro, num_devices=num_devices)
  if not 0 <= config["random_epochs"] < config["epochs"]:
    raise ConfigError(f"need 0 <= random_epochs ({config['random_epochs']}) < epochs "
                      f"({config['epochs']})")
  if int(config["figure_every"]) < 1:
    raise ConfigError(f"figure_every must be >= 1, got {config['figure_every']}")
  return model, spec, micro


DATA_KEYS = {"source", "path", "split", "eval_split", "tfds_name", "tfds_data_dir", "threads",
             "device_resize"}


def _check_common(config: Mapping, *, num_devices: int, num_processes: int):
  """Fields every training task has; returns (ModelConfig, micro-batch global size)."""
  _check_keys(config["data"], DATA_KEYS, "data")
  _check_keys(config["mesh"], {"data", "fsdp"}, "mesh")
  model = build_model_config(config["model"])
  batch, accum = int(config["batch_size"]), int(config["accum_steps"])
  if accum < 1:
    raise ConfigError(f"accum_steps must be >= 1, got {accum}")
  if batch % (accum * num_devices) or batch % (accum * num_processes):
    raise ConfigError(f"batch_size {batch} must split into accum_steps ({accum}) x "
                      f"{num_devices} devices (and {num_processes} processes)")
  if not 0 <= config["warmup_epochs"] < config["epochs"]:
    raise ConfigError(f"need 0 <= warmup_epochs ({config['warmup_epochs']}) < epochs "
                      f"({config['epochs']})")
  if config["blr"] <= 0 or config["min_lr"] < 0:
    raise ConfigError(f"blr must be > 0 and min_lr >= 0, got {config['blr']}, {config['min_lr']}")
  if config["data"]["source"] not in DATA_SOURCES:
    raise ConfigError(f"data.source must be one of {DATA_SOURCES}, got "
                      f"{config['data']['source']!r}")
  for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
    if int(config[key]) < 1:
      raise ConfigError(f"{key} must be >= 1, got {config[key]}")
  if not (0 <= config["b1"] < 1 and 0 <= config["b2"] < 1):
    raise ConfigError(f"b1, b2 must be in [0, 1), got {config['b1']}, {config['b2']}")
  fsdp = int(config["mesh"]["fsdp"])
  if fsdp < 1 or num_devices % fsdp:
    raise ConfigError(f"mesh.fsdp={fsdp} must divide the {num_devices} devices")
  return model, batch // accum


CLASSIFY_KEYS = {"task", "seed", "model", "num_classes", "global_pool", "drop_path", "init_from",
                 "eval_only", "data", "batch_size", "accum_steps", "eval_batch_size", "epochs",
                 "warmup_epochs", "blr", "min_lr", "weight_decay", "b1", "b2", "layer_decay",
                 "smoothing", "mixup", "rand_augment", "reprob", "mesh", "log_every",
                 "checkpoint_every", "keep_checkpoints", "eval_every"}
MIXUP_KEYS = {"mixup_alpha", "cutmix_alpha", "prob", "switch_prob"}


def mixup_active(mix: Mapping) -> bool:
  return mix["prob"] > 0 and (mix["mixup_alpha"] > 0 or mix["cutmix_alpha"] > 0)


def check_classify(config: Mapping, *, num_devices: int, num_processes: int) -> ModelConfig:
  """Validate a fine-tune / linear-probe config (see configs/finetune.py)."""
  _check_keys(config, CLASSIFY_KEYS, "top-level")
  _check_keys(config["mixup"], MIXUP_KEYS, "mixup")
  model, micro = _check_common(config, num_devices=num_devices, num_processes=num_processes)
  eval_batch = int(config["eval_batch_size"])
  if eval_batch < 1 or eval_batch % num_devices or eval_batch % num_processes:
    raise ConfigError(f"eval_batch_size {eval_batch} must split over {num_devices} devices "
                      f"(and {num_processes} processes)")
  if not 0 <= config["drop_path"] < 1:
    raise ConfigError(f"drop_path must be in [0, 1), got {config['drop_path']}")
  if not 0 < config["layer_decay"] <= 1:
    raise ConfigError(f"layer_decay must be in (0, 1], got {config['layer_decay']}")
  if not 0 <= config["smoothing"] < 1:
    raise ConfigError(f"smoothing must be in [0, 1), got {config['smoothing']}")
  if not 0 <= config["reprob"] <= 1:
    raise ConfigError(f"reprob must be in [0, 1], got {config['reprob']}")
  mix = config["mixup"]
  if not (0 <= mix["prob"] <= 1 and 0 <= mix["switch_prob"] <= 1):
    raise ConfigError(f"mixup.prob and mixup.switch_prob must be in [0, 1], got "
                      f"{mix['prob']}, {mix['switch_prob']}")
  if mixup_active(mix) and (micro // num_devices) % 2:
    raise ConfigError(f"mixup pairs each device's batch with its reverse: the per-device "
                      f"micro-batch {micro // num_devices} must be even")
  if config["task"] == "linprobe":
    used = [k for k in ("drop_path", "smoothing", "reprob", "rand_augment") if config[k]]
    if mixup_active(mix):
      used.append("mixup")
    if used:
      raise ConfigError(f"linear probing (MAE main_linprobe) trains on plain crops + flips, "
                        f"no regularisation; unset: {', '.join(used)}")
  if int(config["eval_every"]) < 1:
    raise ConfigError(f"eval_every must be >= 1 (epochs), got {config['eval_every']}")
  if int(config["num_classes"]) < 0:
    raise ConfigError(f"num_classes must be >= 0 (0 = from the data), got {config['num_classes']}")
  return model
