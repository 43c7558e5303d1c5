"""Typed configs: ml_collections ConfigDicts -> frozen dataclasses.

Every config section has a schema, a dataclass whose fields are the section's
keys with their defaults and types (`TrainConfig` and its subclasses in each
task module, `DataConfig`, `MaskingConfig`, ... here). `parse` checks a
config against its schema: an unknown key names the closest known one, a
value of the wrong type names the field; a missing key takes the default.
Recipes in configs/ start from `defaults(schema)`, so the keys a recipe
shows, the keys that validate and the defaults are one list: adding a key
is adding a field. Semantic checks (a batch that does not split, a ratio
outside its range) live beside the code that needs them and raise
ConfigError naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Mapping

from sbam_jax import masking, registry
from sbam_jax.errors import ConfigError
from sbam_jax.models.sizes import SIZES, ModelConfig, model_config

__all__ = ["ConfigError", "parse", "defaults", "TrainConfig", "DataConfig", "MeshConfig",
           "MaskingConfig", "build_model_config", "build_masking_spec", "group_size"]

GROUPS = ("sample", "device", "global")
CAPACITIES = ("max", "bucketed", "packed")


def _plain(value: Any) -> Any:
  """ConfigDicts -> plain dicts (other values as they are)."""
  return value.to_dict() if hasattr(value, "to_dict") else value


def check_known(keys, known, where: str = "") -> None:
  """A ConfigError naming each unknown key and the closest known one."""
  prefix = f"{where}." if where else ""
  unknown = sorted(set(keys) - set(known))
  if unknown:
    problems = []
    for key in unknown:
      close = difflib.get_close_matches(key, list(known), n=1)
      problems.append(f"{prefix}{key}" + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
    raise ConfigError(f"unknown config field {', '.join(problems)}; known in "
                      f"{where or 'the top level'}: {', '.join(known)}")


def _coerce(typ: Any, value: Any, where: str) -> Any:
  value = _plain(value)
  if dataclasses.is_dataclass(typ):
    if not isinstance(value, Mapping):
      raise ConfigError(f"{where} must be a section (dict) of {typ.__name__}, got {value!r}")
    return parse(typ, value, where)
  if typ is dict:
    if not isinstance(value, Mapping):
      raise ConfigError(f"{where} must be a dict, got {value!r}")
    return dict(value)
  ok = {bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str)}.get(typ, True)
  if not ok:
    raise ConfigError(f"{where} must be {getattr(typ, '__name__', typ)}, got {value!r}")
  return float(value) if typ is float else value


def parse(schema: type, cfg: Mapping, where: str = "") -> Any:
  """`cfg` as an instance of the dataclass `schema` (see the module docstring)."""
  hints = typing.get_type_hints(schema)
  fields = [f.name for f in dataclasses.fields(schema)]
  prefix = f"{where}." if where else ""
  check_known(cfg.keys(), fields, where)
  return schema(**{k: _coerce(hints[k], cfg[k], prefix + k) for k in fields if k in cfg})


def defaults(schema: type):
  """A ConfigDict holding the schema's fields and defaults (what recipes start from)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dataclasses.asdict(schema()))


# ---- sections shared by every task ------------------------------------------

@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where images come from (the same fields for every task)."""
  source: str = "folder"        # a registered source: 'folder' (MAE layout) | 'tfds' | 'demo'
  path: str = ""                # folder layout root (--data_path of the reference)
  split: str = "train"
  eval_split: str = ""          # '' = val (folder) / validation (tfds)
  tfds_name: str = "imagenet2012"
  tfds_data_dir: str = ""
  threads: int = 0              # tf.data threads per process; 0 = one per core
  device_resize: bool = True    # pre-train / probe crops resized on the accelerator

  def eval_split_name(self) -> str:
    return self.eval_split or ("validation" if self.source == "tfds" else "val")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1                # -1: all devices not used by fsdp
  fsdp: int = 1                 # devices that split parameters and optimizer state


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Fields every training task has (a task's schema subclasses this)."""
  task: str = "pretrain"        # a registered task
  seed: int = 0
  model: dict = dataclasses.field(default_factory=dict)   # see build_model_config
  data: DataConfig = DataConfig()
  batch_size: int = 4096        # global images per optimizer step (all devices, all micro-steps)
  accum_steps: int = 1          # micro-steps per optimizer step (--accum_iter)
  epochs: int = 400
  warmup_epochs: int = 40
  blr: float = 1.5e-4           # lr = blr * batch_size / 256
  min_lr: float = 0.0
  weight_decay: float = 0.05
  b1: float = 0.9               # AdamW betas (the recipe's optimizer)
  b2: float = 0.95
  optimizer: str = ""           # '' = the recipe's; 'adamw' | 'lars' | any optax optimizer name
  optimizer_args: dict = dataclasses.field(default_factory=dict)  # its keyword arguments
  init_from: str = ""           # converted checkpoint or training workdir
  mesh: MeshConfig = MeshConfig()
  evals: dict = dataclasses.field(default_factory=dict)  # name -> dict(type=..., every=..., ...)
  log_every: int = 50           # steps
  checkpoint_every: int = 2000  # steps; and at the end, and on SIGTERM
  keep_checkpoints: int = 3

  def check(self, *, num_devices: int, num_processes: int) -> int:
    """Checks every task needs; returns the global micro-batch size."""
    batch, accum = self.batch_size, self.accum_steps
    if accum < 1:
      raise ConfigError(f"accum_steps must be >= 1, got {accum}")
    if batch < 1 or batch % (accum * num_devices) or batch % (accum * num_processes):
      raise ConfigError(f"batch_size {batch} must split into accum_steps ({accum}) x "
                        f"{num_devices} devices (and {num_processes} processes)")
    if not 0 <= self.warmup_epochs < self.epochs:
      raise ConfigError(f"need 0 <= warmup_epochs ({self.warmup_epochs}) < epochs "
                        f"({self.epochs})")
    if self.blr <= 0 or self.min_lr < 0:
      raise ConfigError(f"blr must be > 0 and min_lr >= 0, got {self.blr}, {self.min_lr}")
    for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, key) < 1:
        raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
    if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
      raise ConfigError(f"b1, b2 must be in [0, 1), got {self.b1}, {self.b2}")
    fsdp = self.mesh.fsdp
    if fsdp < 1 or num_devices % fsdp:
      raise ConfigError(f"mesh.fsdp={fsdp} must divide the {num_devices} devices")
    registry.lookup("source", self.data.source, where="data.source")
    return batch // accum


def build_model_config(cfg: Mapping) -> ModelConfig:
  """`config.model` -> ModelConfig ('size' picks the architecture)."""
  values = dict(_plain(cfg))
  check_known(values, [f.name for f in dataclasses.fields(ModelConfig)] + ["size"], "model")
  size = values.pop("size", "base")
  if size not in SIZES:
    raise ConfigError(f"model.size must be one of {SIZES}, got {size!r}")
  try:
    return model_config(size, **values)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"model: {e}") from None


# ---- masking ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MaskingConfig:
  """Masking method and its static-shape strategy. ratio_var = 0.1 and
  delta = 0.5 are this project's defaults: the SBAM release states none."""
  method: str = masking.SBAM    # 'random' (MAE) | 'sbam' (ratio_var = 0 gives SBM)
  mask_ratio: float = 0.75
  ratio_var: float = 0.1
  delta: float = 0.5
  group: str = "device"         # AMR ratio shared per 'sample' | 'device' batch | 'global' batch
  capacity: str = "max"         # 'max' (one compile, no host sync) | 'packed' | 'bucketed'
  num_buckets: int = 4          # 'bucketed': compiled encoder capacities
  num_budgets: int = 8          # 'packed': token budgets per device (lax.switch branches)


def group_size(group: str, *, global_batch: int, num_devices: int) -> int:
  """Samples per AMR group: 1, one device's batch, or the whole global batch."""
  if group not in GROUPS:
    raise ConfigError(f"masking.group must be one of {GROUPS}, got {group!r}")
  if global_batch % num_devices:
    raise ConfigError(f"global batch {global_batch} does not split over {num_devices} devices")
  return {"sample": 1, "device": global_batch // num_devices, "global": global_batch}[group]


def build_masking_spec(cfg: Mapping, *, global_batch: int, num_devices: int) -> masking.MaskingSpec:
  """`config.masking` -> MaskingSpec, with the AMR group resolved to a size."""
  m = cfg if isinstance(cfg, MaskingConfig) else parse(MaskingConfig, cfg, "masking")
  if m.capacity not in CAPACITIES:
    raise ConfigError(f"masking.capacity must be one of {CAPACITIES}, got {m.capacity!r}")
  if m.num_buckets < 1:
    raise ConfigError(f"masking.num_buckets must be >= 1, got {m.num_buckets}")
  size = group_size(m.group, global_batch=global_batch, num_devices=num_devices)
  try:
    return masking.MaskingSpec(method=m.method, mask_ratio=m.mask_ratio, ratio_var=m.ratio_var,
                               delta=m.delta, group_size=size)
  except ValueError as e:
    raise ConfigError(f"masking: {e}") from None
