"""Fine-tuning and linear probing of a pre-trained encoder: the tasks
`finetune` and `linprobe`.

fine-tune (MAE main_finetune): the whole ViT trains; AdamW with layer-wise lr
  decay, drop-path, label smoothing, mixup / cutmix and random erasing on the
  device (RandAugment on the host), global pool by default.
linprobe (MAE main_linprobe): the encoder is frozen (it lives in the state's
  `fixed` tree: no gradient, no weight decay, no update, bit-identical);
  BatchNorm1d(affine=False) + Linear on the cls feature, trained with LARS.
evaluation: the evaluators listed in `config.evals` (by default the
  `classification` evaluator on the eval split: sbam_jax/evals/), every
  `eval_every` epochs, at the end, and alone with `eval_only`.

Starting weights (`init_from`): a converted checkpoint (pretrain, encoder or
finetuned) or a training workdir of this project; the encoder is taken, its
position table resampled if the grid differs, and the head initialised as the
reference does. `eval_only` needs a classifier (finetuned / linprobe).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from sbam_jax import checkpoints as param_ckpt
from sbam_jax import files
from sbam_jax import config as config_lib
from sbam_jax import optim, registry
from sbam_jax.data import device as device_ops
from sbam_jax.data import mixup as mixup_lib
from sbam_jax.errors import ConfigError
from sbam_jax.models import VisionTransformer
from sbam_jax.models.pos_embed import resample_pos_embed
from sbam_jax.train import checkpointing, flops
from sbam_jax.train.step import TrainState
from sbam_jax.train.task import Task
from sbam_jax.train.weights import model_card, take

TASKS = ("finetune", "linprobe")
CLASSIFIER_KINDS = ("finetuned", "linprobe")
_ARCH_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "in_chans")


def build_model(config, model_cfg, num_classes: int, seed: int = 0) -> VisionTransformer:
  probe = config.task == "linprobe"
  return VisionTransformer(model_cfg, num_classes, global_pool=bool(config.global_pool),
                           drop_path_rate=float(config.drop_path), probe=probe,
                           head_init_std=0.01 if probe else 2e-5, rngs=nnx.Rngs(seed))


def split_model(model: VisionTransformer, task: str):
  """graphdef, trainable params, statistics, fixed (pure dicts). The probe
  trains the head only; the rest of its parameters sit in `fixed`."""
  trainable = nnx.Param if task == "finetune" else nnx.All(nnx.Param, nnx.PathContains("head"))
  graphdef, params, stats, fixed = nnx.split(model, trainable, nnx.BatchStat, ...)
  return graphdef, *map(nnx.to_pure_dict, (params, stats, fixed))


# ---- starting weights -------------------------------------------------------

def _check_arch(card: dict, model_cfg, path: str) -> None:
  theirs = card.get("model", {})
  bad = [f"{f}: checkpoint {theirs[f]} vs config {getattr(model_cfg, f)}" for f in _ARCH_FIELDS
         if f in theirs and theirs[f] != getattr(model_cfg, f)]
  if bad:
    raise ConfigError(f"init_from {path!r} does not match config.model ("
                              + "; ".join(bad) + "): pick the matching model size")


def _encoder_of(tree: dict, card: dict) -> dict:
  return tree if card["kind"] == "encoder" else tree["encoder"]


def starting_weights(config, model_cfg, full: dict) -> tuple[dict, list[str]]:
  """`full` (the fresh model's state) with `init_from`'s weights put in; and
  notes on what was resampled or kept fresh."""
  path = config.init_from
  try:
    loaded, card = param_ckpt.load_weights(path)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"init_from: {e}") from None
  _check_arch(card, model_cfg, path)
  notes = [f"init_from {path} ({card['kind']})"]
  if config.eval_only:
    if card["kind"] not in CLASSIFIER_KINDS:
      raise ConfigError(f"eval_only needs a fine-tuned or probed classifier; "
                                f"init_from {path!r} holds a {card['kind']} checkpoint")
    wanted = full
  else:
    loaded = {"encoder": dict(_encoder_of(loaded, card))}
    wanted = {"encoder": full["encoder"]}
    fresh = sorted(set(full) - {"encoder"})
    notes.append(f"initialised fresh: {', '.join(fresh)}")
  enc = loaded["encoder"]
  want_pos = full["encoder"]["pos_embed"].shape
  if "pos_embed" in enc and enc["pos_embed"].shape != want_pos:
    grid = model_cfg.grid_size
    enc["pos_embed"] = resample_pos_embed(enc["pos_embed"], grid)
    notes.append(f"position table resampled to {grid}x{grid}")
  if "norm" in full["encoder"] and "norm" not in enc:
    raise ConfigError(f"init_from {path!r} has no final encoder `norm` (a global-pool "
                              f"classifier?), which cls-token pooling needs; set "
                              f"global_pool=True or start from a pre-train checkpoint")
  got = take(loaded, wanted, f"init_from {path!r}")
  return param_ckpt.deep_merge(got, {k: v for k, v in full.items() if k not in got}), notes


# ---- losses and evaluation ----------------------------------------------------

def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return -(targets * jax.nn.log_softmax(logits.astype(jnp.float32))).sum(-1).mean()


def finetune_loss(graphdef, *, num_classes: int, shards: int, smoothing: float, reprob: float,
                  mix: dict | None):
  """timm's training input: random erasing, then mixup / cutmix per device batch
  (each device draws its own lambda, as each reference GPU does), then soft-target
  cross-entropy (label smoothing folded into the targets)."""

  def loss_fn(params, fixed, stats, batch, key, step):
    del step
    k_erase, k_mix, k_drop = jax.random.split(key, 3)
    x = device_ops.normalize(batch["image"], jnp.float32)
    if reprob > 0:
      x = device_ops.random_erasing(k_erase, x, prob=reprob)
    labels = batch["label"]
    if mix is not None:
      per = lambda a: a.reshape((shards, -1) + a.shape[1:])
      x, y = jax.vmap(lambda k, xi, li: mixup_lib.mixup_cutmix(
          k, xi, li, num_classes=num_classes, smoothing=smoothing, **mix))(
              jax.random.split(k_mix, shards), per(x), per(labels))
      x, y = x.reshape((-1,) + x.shape[2:]), y.reshape(-1, num_classes)
    else:
      y = mixup_lib.smooth_one_hot(labels, num_classes, smoothing)
    model = nnx.merge(graphdef, params, stats, fixed)
    loss = soft_cross_entropy(model(x, key=k_drop, train=True), y)
    return loss, ({}, stats)

  return loss_fn


def probe_loss(graphdef, image_size: int):
  """Frozen features (no gradient reaches the encoder), BatchNorm in training
  mode (its running statistics come back as the new `stats`), cross-entropy.
  Images may come as host crops + 'size' (resized here, `data.device_resize`)."""

  def loss_fn(params, fixed, stats, batch, key, step):
    del key, step
    model = nnx.merge(graphdef, params, stats, fixed)
    image = device_ops.pixels(batch, image_size)
    feats = jax.lax.stop_gradient(model.features(device_ops.normalize(image)))
    logits = model.classify(feats, train=True)
    labels = batch["label"]
    loss = soft_cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))
    acc = (logits.argmax(-1) == labels).mean() * 100
    return loss, ({"train_top1": acc}, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

  return loss_fn


# ---- the tasks ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MixupConfig:
  mixup_alpha: float = 0.8
  cutmix_alpha: float = 1.0
  prob: float = 1.0
  switch_prob: float = 0.5

  @property
  def active(self) -> bool:
    return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


@dataclasses.dataclass(frozen=True)
class ClassifyConfig(config_lib.TrainConfig):
  """MAE's main_finetune recipe for ViT-B (configs/finetune.py sets the other
  sizes; configs/linprobe.py the probe's)."""
  task: str = "finetune"
  num_classes: int = 0          # 0 = the number of classes in the data
  global_pool: bool = True      # mean of patch tokens + fc_norm; False = cls token + norm
  drop_path: float = 0.1
  eval_only: bool = False       # evaluate init_from (or the workdir's checkpoint) and exit
  batch_size: int = 1024
  eval_batch_size: int = 1024
  epochs: int = 100
  warmup_epochs: int = 5
  blr: float = 5e-4
  min_lr: float = 1e-6
  b2: float = 0.999
  layer_decay: float = 0.65
  smoothing: float = 0.1
  mixup: MixupConfig = MixupConfig()
  rand_augment: str = "rand-m9-mstd0.5-inc1"   # '' = off
  reprob: float = 0.25          # random erasing probability
  eval_every: int = 1           # epochs, for evaluators that set no `every` of their own
  evals: dict = dataclasses.field(default_factory=lambda: {"eval": {"type": "classification"}})


def check_classify(cfg: ClassifyConfig, *, num_devices: int, num_processes: int) -> None:
  """What fine-tuning and probing need beyond TrainConfig.check."""
  micro = cfg.batch_size // cfg.accum_steps
  if cfg.eval_batch_size < 1 or cfg.eval_batch_size % num_devices \
      or cfg.eval_batch_size % num_processes:
    raise ConfigError(f"eval_batch_size {cfg.eval_batch_size} must split over {num_devices} "
                      f"devices (and {num_processes} processes)")
  ranges = {"drop_path": (cfg.drop_path, 0, 1, "[0, 1)"), "smoothing": (cfg.smoothing, 0, 1, "[0, 1)")}
  for key, (value, lo, hi, text) in ranges.items():
    if not lo <= value < hi:
      raise ConfigError(f"{key} must be in {text}, got {value}")
  if not 0 < cfg.layer_decay <= 1:
    raise ConfigError(f"layer_decay must be in (0, 1], got {cfg.layer_decay}")
  if not 0 <= cfg.reprob <= 1:
    raise ConfigError(f"reprob must be in [0, 1], got {cfg.reprob}")
  mix = cfg.mixup
  if not (0 <= mix.prob <= 1 and 0 <= mix.switch_prob <= 1):
    raise ConfigError(f"mixup.prob and mixup.switch_prob must be in [0, 1], got "
                      f"{mix.prob}, {mix.switch_prob}")
  if mix.active and (micro // num_devices) % 2:
    raise ConfigError(f"mixup pairs each device's batch with its reverse: the per-device "
                      f"micro-batch {micro // num_devices} must be even")
  if cfg.eval_every < 1:
    raise ConfigError(f"eval_every must be >= 1 (epochs), got {cfg.eval_every}")
  if cfg.num_classes < 0:
    raise ConfigError(f"num_classes must be >= 0 (0 = from the data), got {cfg.num_classes}")


@registry.register("task", "finetune")
class FinetuneTask(Task):
  """Fine-tuning (MAE main_finetune): the whole ViT trains."""
  Config = ClassifyConfig
  kind = "finetuned"

  def __init__(self, config, workdir: str):
    super().__init__(config, workdir)
    cfg = self.config
    check_classify(cfg, num_devices=self.num_devices, num_processes=self.num_processes)
    self.check_task()
    self.eval_only = cfg.eval_only
    self.eval_split = cfg.data.eval_split_name()
    self._setup_data()
    abstract = nnx.eval_shape(lambda: build_model(cfg, self.model_cfg, self.num_classes))
    self.graphdef, abstract_params, _, _ = split_model(abstract, cfg.task)
    mask, scales = self.decay_rules(abstract_params)
    self.tx = self.make_optimizer(abstract_params, mask, scales)
    if self.process == 0 and not self.eval_only:
      rules = optim.parameter_rules(abstract_params, self.table_mask(mask), scales)
      param_ckpt.write_text(os.path.join(workdir, "param_groups.txt"),
                            "\n".join(optim.param_table(rules)) + "\n")
      print(_rules_summary(cfg.task, rules, workdir), flush=True)
    self.flops_per_image = flops.encoder(self.model_cfg, backward=cfg.task == "finetune")

  def check_task(self) -> None:
    """Recipe-specific checks (the probe forbids regularisation)."""

  def _setup_data(self) -> None:
    cfg = self.config
    eval_source = self.source(self.eval_split)
    source = eval_source if cfg.eval_only else self.source()
    self.classes = tuple(source.classes)
    self.num_classes = cfg.num_classes or len(self.classes)
    if self.classes and self.num_classes != len(self.classes):
      raise ConfigError(f"num_classes={self.num_classes} but the data has "
                        f"{len(self.classes)} classes")
    if tuple(eval_source.classes) != self.classes:
      raise ConfigError(f"the {cfg.data.split!r} and {self.eval_split!r} splits "
                        f"have different class lists")
    if cfg.eval_only and not cfg.init_from and not checkpointing.list_steps(
        files.join(self.workdir, "checkpoints")):
      raise ConfigError("eval_only needs init_from (a classifier checkpoint) or a "
                        "workdir that already holds checkpoints")
    if cfg.eval_only:
      self.steps_per_epoch = max(source.num_examples // cfg.batch_size, 1)
    else:
      self.set_epoch_length(source.num_examples)

  def decay_rules(self, params):
    """(weight-decay mask, lr scales): MAE's param_groups_lrd."""
    return (optim.finetune_decay_mask(params),
            optim.layer_decay_scales(params, self.model_cfg.depth, self.config.layer_decay))

  def table_mask(self, mask):
    return mask

  @property
  def card(self) -> dict:
    return model_card(self.kind, self.model_cfg, num_classes=self.num_classes,
                      global_pool=bool(self.config.global_pool), classes=list(self.classes))

  def summary(self) -> str:
    return (f"{self.config.task} of a {self.model_cfg.embed_dim}-wide ViT on "
            f"{self.num_classes} classes, lr {self.peak_lr:.3g}")

  def transform(self):
    from sbam_jax.data import transforms  # pylint: disable=g-import-not-at-top
    return transforms.make_transform("finetune", self.image_size,
                                     rand_augment=self.config.rand_augment)

  def batch_keys(self) -> tuple:
    return (*self.transform().spec, "label")

  def loss(self):
    cfg = self.config
    mix = dataclasses.asdict(cfg.mixup) if cfg.mixup.active else None
    return finetune_loss(self.graphdef, num_classes=self.num_classes, shards=self.num_devices,
                         smoothing=cfg.smoothing, reprob=cfg.reprob, mix=mix)

  def init_state(self, load: bool) -> TrainState:
    cfg = self.config
    model = build_model(cfg, self.model_cfg, self.num_classes, seed=cfg.seed)
    full = nnx.to_pure_dict(nnx.state(model))
    if cfg.init_from and load:
      full, notes = starting_weights(cfg, self.model_cfg, full)
      if self.process == 0:
        print("; ".join(notes), flush=True)
      param_ckpt.load_into(model, full)
    _, params, stats, fixed = split_model(model, cfg.task)
    return TrainState(step=jnp.asarray(0, jnp.int32), params=params, fixed=fixed,
                      opt_state=self.tx.init(params), rng=jax.random.PRNGKey(cfg.seed),
                      stats=stats)

  def _model(self, state):
    return nnx.merge(self.graphdef, state.params, state.stats, state.fixed)

  def logits_fn(self):
    return lambda state, images: self._model(state)(images, train=False)

  def features_fn(self):
    return lambda state, images: {"pooled": self._model(state).features(images)}


@registry.register("task", "linprobe")
class LinprobeTask(FinetuneTask):
  """Linear probing (MAE main_linprobe): frozen encoder, BatchNorm + Linear, LARS."""
  kind = "linprobe"
  recipe_optimizer = "lars"

  def check_task(self) -> None:
    cfg = self.config
    used = [k for k in ("drop_path", "smoothing", "reprob", "rand_augment") if getattr(cfg, k)]
    if cfg.mixup.active:
      used.append("mixup")
    if used:
      raise ConfigError(f"linear probing (MAE main_linprobe) trains on plain crops + flips, "
                        f"no regularisation; unset: {', '.join(used)}")

  def decay_rules(self, params):
    """LARS decays matrices only (its own rule); no layer-wise scales."""
    return optim.matrices(params), None

  def table_mask(self, mask):
    return jax.tree.map(lambda m: m and bool(self.config.weight_decay), mask)

  def transform(self):
    """RandomResizedCrop with torchvision's default scale, + flip; the resize
    may run on the device (the fine-tune's cannot: RandAugment needs it here)."""
    from sbam_jax.data import transforms  # pylint: disable=g-import-not-at-top
    kind = "pretrain_crop" if self.config.data.device_resize else "pretrain"
    return transforms.make_transform(kind, self.image_size, scale=(0.08, 1.0))

  def loss(self):
    return probe_loss(self.graphdef, self.image_size)


def _rules_summary(task: str, rules: dict, workdir: str) -> str:
  no_decay = [name for name, (_, decay, _) in rules.items() if not decay]
  text = [f"{len(rules)} trainable tensors; no weight decay on {len(no_decay)}: "
          f"{', '.join(no_decay[:6])}{' ...' if len(no_decay) > 6 else ''}"]
  if task == "finetune":
    scales = {}
    for name, (_, _, s) in rules.items():
      group = name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("blocks.") else "")
      scales.setdefault(group, s)
    text.append("layer-wise lr scales: " + ", ".join(f"{g} {s:.4g}" for g, s in scales.items()))
  text.append(f"full table: {os.path.join(workdir, 'param_groups.txt')}")
  return "\n".join(text)
