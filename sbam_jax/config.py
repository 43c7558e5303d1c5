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
  out = schema(**{k: _coerce(hints[k], cfg[k], prefix + k) for k in fields if k in cfg})
  check_ranges(out, where)
  return out


def defaults(schema: type):
  """A ConfigDict holding the schema's fields and defaults (what recipes start from)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dataclasses.asdict(schema()))


# ---- meaningful ranges -------------------------------------------------------

# Every key whose range is known, by its full name (a task's own keys too: a
# key a schema does not have is never looked at). "[a, b)" as in maths; "inf"
# for no upper bound. Relations between keys are in `check_relations`.
RANGES = {
    "seed": "[0, inf)", "batch_size": "[1, inf)", "accum_steps": "[1, inf)",
    "epochs": "[1, inf)", "warmup_epochs": "[0, inf)", "blr": "(0, inf)", "min_lr": "[0, inf)",
    "weight_decay": "[0, inf)", "b1": "[0, 1)", "b2": "[0, 1)", "log_every": "[1, inf)",
    "log_seconds": "(0, inf)",
    "checkpoint_every": "[1, inf)", "keep_checkpoints": "[1, inf)", "mesh.fsdp": "[1, inf)",
    "data.threads": "[0, inf)",
    "masking.mask_ratio": "(0, 1)", "masking.ratio_var": "[0, 1)", "masking.delta": "[0, 1]",
    "masking.num_buckets": "[1, inf)",
    # pre-training (train/pretrain.py)
    "random_epochs": "[0, inf)", "figure_every": "[1, inf)", "figure_images": "[1, inf)",
    # fine-tuning and probing (train/classify.py)
    # (eval_batch_size: check_classify, with whether it splits over the devices)
    "num_classes": "[0, inf)", "drop_path": "[0, 1)",
    "layer_decay": "(0, 1]", "smoothing": "[0, 1)", "reprob": "[0, 1]", "eval_every": "[1, inf)",
    "mixup.mixup_alpha": "[0, inf)", "mixup.cutmix_alpha": "[0, inf)", "mixup.prob": "[0, 1]",
    "mixup.switch_prob": "[0, 1]",
    # config.model (checked in build_model_config)
    "model.img_size": "[1, inf)", "model.patch_size": "[1, inf)", "model.embed_dim": "[1, inf)",
    "model.depth": "[1, inf)", "model.num_heads": "[1, inf)", "model.decoder_embed_dim": "[1, inf)",
    "model.decoder_depth": "[1, inf)", "model.decoder_num_heads": "[1, inf)",
    "model.mlp_ratio": "(0, inf)", "model.decoder_mlp_ratio": "(0, inf)",
    "model.in_chans": "[1, inf)",
}
WHY = {
    "masking.mask_ratio": " (a fraction of the patches; 0 leaves nothing to reconstruct)",
    "masking.delta": " (a threshold on salience normalised to [0, 1])",
    "seed": " (numpy seeds are non-negative)",
}


def in_range(value: float, spec: str) -> bool:
  """Whether `value` lies in the interval written `spec` (e.g. "[0, 1)")."""
  lo, hi = (float(x) for x in spec[1:-1].split(","))
  above = value >= lo if spec[0] == "[" else value > lo
  below = value <= hi if spec[-1] == "]" else value < hi
  return above and below


def range_text(spec: str) -> str:
  """"[1, inf)" -> ">= 1", "[0, 1)" -> "in [0, 1)"."""
  lo, hi = (x.strip() for x in spec[1:-1].split(","))
  if hi == "inf":
    return (">= " if spec[0] == "[" else "> ") + lo
  return f"in {spec}"


def check_value(key: str, value: Any) -> None:
  """A ConfigError naming `key`, `value` and the allowed range if the value is outside it."""
  spec = RANGES.get(key)
  if spec is None or isinstance(value, bool) or not isinstance(value, (int, float)):
    return
  if not in_range(value, spec):
    raise ConfigError(f"{key} = {value!r} is outside its range: it must be "
                      f"{range_text(spec)}{WHY.get(key, '')}")


def check_ranges(section: Any, where: str = "", nested: bool = False) -> None:
  """Each field of a section checked against RANGES (`parse` checks each
  section as it parses it; `nested` also walks the sections inside); a whole
  TrainConfig also gets `check_relations`."""
  prefix = f"{where}." if where else ""
  for f in dataclasses.fields(section):
    value = getattr(section, f.name)
    if nested and dataclasses.is_dataclass(value):
      check_ranges(value, prefix + f.name, nested=True)
    check_value(prefix + f.name, value)
  if isinstance(section, MaskingConfig):
    check_amr_bounds(section, prefix)
  if isinstance(section, TrainConfig) and not where:
    check_relations(section)


def check_amr_bounds(m: "MaskingConfig", prefix: str = "masking.") -> None:
  """SBAM's adaptive ratios lie in [mask_ratio - ratio_var, mask_ratio + ratio_var],
  which must stay inside (0, 1)."""
  if m.method != masking.SBAM or m.ratio_var <= 0:
    return
  lo, hi = m.mask_ratio - m.ratio_var, m.mask_ratio + m.ratio_var
  if not 0 < lo < hi < 1:
    most = min(m.mask_ratio, 1 - m.mask_ratio)
    raise ConfigError(f"{prefix}ratio_var = {m.ratio_var!r} puts the AMR range [{lo:g}, {hi:g}] "
                      f"(mask_ratio +- ratio_var) outside (0, 1): the ratios must lie inside "
                      f"(0, 1), so with {prefix}mask_ratio = {m.mask_ratio!r} it must be "
                      f"< {most:g}")


def check_relations(cfg: "TrainConfig") -> None:
  """Ranges that depend on other keys."""
  if cfg.warmup_epochs > cfg.epochs:
    raise ConfigError(f"warmup_epochs = {cfg.warmup_epochs} is outside its range: it must be "
                      f"in [0, epochs] = [0, {cfg.epochs}]")
  random = getattr(cfg, "random_epochs", None)  # pre-training's warm-up of random masking
  if random is not None and random >= cfg.epochs:
    raise ConfigError(f"random_epochs = {random} is outside its range: it must be in "
                      f"[0, epochs) = [0, {cfg.epochs}) (the configured masking must run)")
  peak = cfg.blr * cfg.batch_size / 256
  if cfg.min_lr > peak:
    raise ConfigError(f"min_lr = {cfg.min_lr!r} is outside its range: it must be in [0, peak lr] "
                      f"= [0, {peak:g}] (blr * batch_size / 256), or the cosine would rise")
  if cfg.mesh.data != -1 and cfg.mesh.data < 1:
    raise ConfigError(f"mesh.data = {cfg.mesh.data} is outside its range: it must be -1 (all "
                      f"devices not used by fsdp) or >= 1")


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
  log_every: int = 50           # steps between progress lines
  log_seconds: float = 30.0     # ... and at most this long between them
  checkpoint_every: int = 2000  # steps; and at the end, and on SIGTERM
  keep_checkpoints: int = 3
  resume_override: str = ""     # card fields a resume may change, e.g. 'batch_size' (workdir.py)

  def check(self, *, num_devices: int, num_processes: int) -> int:
    """Ranges (again, for configs not made by `parse`), then what depends on
    the devices; returns the global micro-batch size."""
    check_ranges(self, nested=True)
    batch, accum = self.batch_size, self.accum_steps
    if batch % (accum * num_devices) or batch % (accum * num_processes):
      raise ConfigError(f"batch_size {batch} must split into accum_steps ({accum}) x "
                        f"{num_devices} devices (and {num_processes} processes)")
    fsdp = self.mesh.fsdp
    if num_devices % fsdp:
      raise ConfigError(f"mesh.fsdp={fsdp} must divide the {num_devices} devices")
    registry.lookup("source", self.data.source, where="data.source")
    _check_data_keys(self.data)
    return batch // accum


def _check_data_keys(data: DataConfig) -> None:
  """A key of another source would be silently ignored: refuse it."""
  if data.path and data.source in ("demo", "tfds"):
    fix = ("the bundled demo photos" if data.source == "demo" else "tfds (which reads "
           "data.tfds_data_dir)")
    raise ConfigError(f"data.path={data.path!r} is set but data.source={data.source!r} uses "
                      f"{fix}: add --config.data.source=folder to train on that folder, or "
                      f"drop data.path")
  if data.tfds_data_dir and data.source != "tfds":
    raise ConfigError(f"data.tfds_data_dir={data.tfds_data_dir!r} is set but data.source="
                      f"{data.source!r}: add --config.data.source=tfds, or drop tfds_data_dir")


def build_model_config(cfg: Mapping) -> ModelConfig:
  """`config.model` -> ModelConfig ('size' picks the architecture)."""
  values = dict(_plain(cfg))
  check_known(values, [f.name for f in dataclasses.fields(ModelConfig)] + ["size"], "model")
  size = values.pop("size", "base")
  if size not in SIZES:
    raise ConfigError(f"model.size must be one of {SIZES}, got {size!r}")
  hints = typing.get_type_hints(ModelConfig)
  for key, value in values.items():
    if hints[key] in (bool, int, float, str):
      values[key] = value = _coerce(hints[key], value, f"model.{key}")
    check_value(f"model.{key}", value)
  base = model_config(size)
  img, patch = (values.get(k, getattr(base, k)) for k in ("img_size", "patch_size"))
  if img % patch:
    raise ConfigError(f"model.img_size = {img} is outside its range: it must be a multiple of "
                      f"patch_size ({patch})")
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
  capacity: str = "max"         # 'max' (one compile, no host sync) | 'packed' (the recipe's) | 'bucketed'
  num_buckets: int = 4          # 'bucketed': compiled encoder capacities
  num_budgets: int = 20         # 'packed': token budgets per device, geometric (lax.switch branches)


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
