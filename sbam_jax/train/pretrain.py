"""The pre-training task (MAE / SBM / SBAM).

Masking is chosen per step: random masking during the first `random_epochs`
(SBAM's warm-up), then `config.masking`, switched with `lax.cond` so only the
branch in force runs. Encoder capacity: 'max' compiles one step for the
largest keep length the masking spec allows; 'packed' (per-image AMR
lengths) packs each device's kept tokens end to end and picks one of
`num_budgets` static token budgets on the device (models/packing.py), so the
encoder's cost follows the sum of keep lengths with no host read; 'bucketed'
reads the batch's largest AMR keep length (one scalar a step) and runs the
smallest compiled bucket that holds it, given the pre-pass's salience so the
step does not compute it again.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sbam_jax import checkpoints as param_ckpt
from sbam_jax import config as config_lib
from sbam_jax import masking, optim, registry, sharding
from sbam_jax.data import device as device_ops
from sbam_jax.errors import ConfigError
from sbam_jax.models import MaskedAutoencoder, packing
from sbam_jax.train import figures, flops, plots
from sbam_jax.train.step import TrainState, make_train_step
from sbam_jax.train.task import Task
from sbam_jax.train.weights import model_card, take

STAT_KEYS = ("mask_ratio_mean", "mask_ratio_min", "mask_ratio_max", "frac_above_delta",
             "frac_delta_band", "salience_entropy")


@dataclasses.dataclass(frozen=True)
class PretrainConfig(config_lib.TrainConfig):
  """MAE's main_pretrain recipe (ViT-L, 400 epochs, global batch 4096 = 256 per
  device x 8 devices x accumulation 2) plus the masking method."""
  task: str = "pretrain"
  masking: config_lib.MaskingConfig = config_lib.MaskingConfig()
  random_epochs: int = 100      # random masking first (SBAM's warm-up); 0 = `masking` from the start
  accum_steps: int = 2
  figure_every: int = 10000     # steps between reconstruction figures
  figure_images: int = 4


def pretrain_loss(graphdef, *, spec: masking.MaskingSpec, warmup_spec: masking.MaskingSpec,
                  random_steps: int, capacity: int, warmup_capacity: int, image_size: int,
                  pack: packing.PackSpec | None = None, on_plan=None):
  """MAE loss of a batch {'image': uint8} (or host crops + 'size', resized
  here to `image_size`); steps below `random_steps` use `warmup_spec`
  (random masking), the rest `spec` (its encoder tokens packed with `pack`;
  a batch 'salience' from a pre-pass is used instead of computing it).
  Salience diagnostics are NaN under random masking.

  `on_plan(step, key, ids_shuffle, len_keep)`: a host function given the
  masking key and the mask each micro-batch used, from inside the compiled
  step, so another implementation can be fed the very same masks (the
  parity harness). Unordered (ordered effects do not run on several devices):
  the step number tells calls apart. None (the default) traces nothing."""

  def run(params, fixed, imgs, key, step, s, c, sal=None):
    model = nnx.merge(graphdef, params, fixed)
    tokens = model.embed_patches(imgs)
    plan, salience = masking.make_mask_plan(s, tokens, key, salience=sal)
    if on_plan is not None:
      jax.debug.callback(on_plan, step, key, plan.ids_shuffle, plan.len_keep, ordered=False)
    if s is spec and pack is not None and len(pack.budgets) > 1:
      loss, _ = packed_loss(graphdef, params, fixed, imgs, plan, c, pack)
    else:
      loss = model.forward_with_plan(imgs, plan, c, tokens=tokens, salience=salience,
                                     pack=pack if s is spec else None).loss
    diag = masking.masking_stats(plan, salience, s.delta)
    return loss, {k: diag.get(k, jnp.float32(jnp.nan)) for k in STAT_KEYS}

  def loss_fn(params, fixed, stats, batch, key, step):
    imgs = device_ops.normalize(device_ops.pixels(batch, image_size), jnp.float32)
    sal = batch.get("salience")
    branch = lambda s, c: (lambda _: run(params, fixed, imgs, key, step, s, c, sal))
    if random_steps <= 0:
      loss, diag = branch(spec, capacity)(None)
    else:
      loss, diag = jax.lax.cond(step < random_steps, branch(warmup_spec, warmup_capacity),
                                branch(spec, capacity), None)
    return loss, (diag, stats)

  return loss_fn


def packed_loss(graphdef, params, fixed, imgs, plan: masking.MaskPlan, capacity: int,
                pack: packing.PackSpec):
  """(loss, pred) with the encoder's tokens packed into the budget chosen on
  the device. Each budget's branch takes its own gradient
  (`packing.switch_with_gradients`), so no activation crosses the switch;
  differentiable in `params` only."""
  def branch(budget):
    one = packing.PackSpec(pack.groups, (budget,))

    def run(p, f, x, pl):
      out = nnx.merge(graphdef, p, f).forward_with_plan(x, pl, capacity, pack=one)
      return out.loss, out.pred
    return run

  index = packing.choose_budget(plan.len_keep + 1, pack)
  return packing.switch_with_gradients(index, [branch(b) for b in pack.budgets], params,
                                       (fixed, imgs, plan))


def check_config(config, *, num_devices: int, num_processes: int) -> masking.MaskingSpec:
  """Validate a whole pre-training config before anything is built or
  compiled; returns the masking spec (AMR group resolved for this many devices)."""
  cfg = config_lib.parse(PretrainConfig, config)
  micro = cfg.check(num_devices=num_devices, num_processes=num_processes)
  config_lib.build_model_config(cfg.model)
  return check_pretrain(cfg, micro_batch=micro, num_devices=num_devices)


def check_pretrain(cfg: PretrainConfig, *, micro_batch: int,
                   num_devices: int) -> masking.MaskingSpec:
  """What pre-training needs beyond TrainConfig.check: the masking spec."""
  spec = config_lib.build_masking_spec(cfg.masking, global_batch=micro_batch,
                                       num_devices=num_devices)
  if not 0 <= cfg.random_epochs < cfg.epochs:
    raise ConfigError(f"need 0 <= random_epochs ({cfg.random_epochs}) < epochs ({cfg.epochs})")
  if cfg.figure_every < 1:
    raise ConfigError(f"figure_every must be >= 1, got {cfg.figure_every}")
  if cfg.masking.num_budgets < 1:
    raise ConfigError(f"masking.num_budgets must be >= 1, got {cfg.masking.num_budgets}")
  return spec


def pack_spec(spec: masking.MaskingSpec, num_tokens: int, *, micro_batch: int, groups: int,
              num_budgets: int) -> packing.PackSpec | None:
  """Token budgets for one device's images (None where every image keeps the
  same static number of tokens: nothing to pack)."""
  lo, hi = masking.keep_length_bounds(spec, num_tokens)
  if lo == hi:
    return None
  per_group = micro_batch // groups
  return packing.PackSpec(groups, packing.token_budgets(per_group, lo + 1, hi + 1, num_budgets))


@registry.register("task", "pretrain")
class PretrainTask(Task):
  Config = PretrainConfig
  kind = "pretrain"

  def __init__(self, config, workdir: str):
    super().__init__(config, workdir)
    cfg = self.config
    self.spec = check_pretrain(cfg, micro_batch=self.micro_batch, num_devices=self.num_devices)
    L = self.model_cfg.num_patches
    self.warm_spec = masking.MaskingSpec("random", mask_ratio=self.spec.mask_ratio)
    self.capacity = masking.max_capacity(self.spec, L)
    self.warm_capacity = masking.max_capacity(self.warm_spec, L)
    self.bucketed = cfg.masking.capacity == "bucketed" and self.spec.adaptive
    self.buckets = (masking.capacity_buckets(self.spec, L, cfg.masking.num_buckets)
                    if self.bucketed else (self.capacity,))
    self.pack = (pack_spec(self.spec, L, micro_batch=self.micro_batch, groups=self.num_devices,
                           num_budgets=cfg.masking.num_budgets)
                 if cfg.masking.capacity == "packed" else None)
    self.set_epoch_length(self.source().num_examples)  # bad paths fail here, before compiling
    self.random_steps = self.steps_per_epoch * cfg.random_epochs
    abstract = nnx.eval_shape(lambda: MaskedAutoencoder(self.model_cfg, rngs=nnx.Rngs(0)))
    self.graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
    abstract_params = nnx.to_pure_dict(abstract_params)
    self.tx = self.make_optimizer(abstract_params, optim.reference_decay_mask(abstract_params))
    self.flops_per_image = flops.mae(self.model_cfg, (self.capacity + self.warm_capacity) // 2)
    self._step_fns: dict = {}
    self._figures = None      # figures.FigureLog, process 0's figure images
    self._figure_step = None  # the last step drawn
    self.on_plan = None       # see pretrain_loss: set before the step compiles

  @property
  def card(self) -> dict:
    return model_card(self.kind, self.model_cfg)

  def summary(self) -> str:
    s = self.spec
    if self.pack is not None:
      encoder = (f"kept tokens packed per device ({len(self.pack.budgets)} budgets, "
                 f"{self.pack.budgets[0]}..{self.pack.budgets[-1]} tokens)")
    elif self.bucketed:
      encoder = f"{len(self.buckets)} capacity buckets, up to {self.buckets[-1]} tokens per image"
    else:
      encoder = f"{self.capacity} tokens per image"
    return (f"pre-training a {self.model_cfg.embed_dim}-wide ViT, lr {self.peak_lr:.3g}, masking "
            f"{s.method} (v={s.ratio_var}, group={s.group_size}), random masking until step "
            f"{self.random_steps}; encoder: {encoder}")

  def transform(self):
    from sbam_jax.data import transforms  # pylint: disable=g-import-not-at-top
    kind = "pretrain_crop" if self.config.data.device_resize else "pretrain"
    return transforms.make_transform(kind, self.image_size)

  def init_state(self, load: bool) -> TrainState:
    """Fresh parameters, or a converted checkpoint (`init_from`) with its AdamW
    state and epoch: training continues at (epoch + 1) * steps_per_epoch."""
    cfg = self.config
    model = MaskedAutoencoder(self.model_cfg, rngs=nnx.Rngs(cfg.seed))
    _, params, fixed = nnx.split(model, nnx.Param, ...)
    params, fixed = nnx.to_pure_dict(params), nnx.to_pure_dict(fixed)
    step, opt_state = 0, None
    if cfg.init_from and load:
      try:
        loaded, card = param_ckpt.load_weights(cfg.init_from)
      except FileNotFoundError as e:
        raise ConfigError(f"init_from: {e}") from None
      if card["kind"] != "pretrain":
        raise ConfigError(f"init_from {cfg.init_from!r} holds a {card['kind']} checkpoint; "
                          f"pre-training needs a full pre-train model")
      params, fixed = take(loaded, params, "init_from"), take(loaded, fixed, "init_from")
      opt_state = self._converted_adamw(card, params)
      if "epoch" in card:
        step = (int(card["epoch"]) + 1) * self.steps_per_epoch
    if opt_state is None:
      opt_state = self.tx.init(params)
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params, fixed=fixed,
                      opt_state=opt_state, rng=jax.random.PRNGKey(cfg.seed))

  def _converted_adamw(self, card: dict, params):
    """The AdamW moments of a converted training checkpoint, if the optimizer
    in use has AdamW state to put them in (else a note, and fresh state)."""
    if "adamw" not in card.get("extra", []):
      return None
    if not optim.has_adam_state(jax.eval_shape(self.tx.init, params)):
      if self.process == 0:
        print(f"note: init_from's AdamW moments are not used by optimizer "
              f"{self.optimizer_spec['name']!r}; it starts from fresh state", flush=True)
      return None
    m = param_ckpt.load_extra(self.config.init_from, "adamw")
    return optim.adamw_state(self.tx, params, m["mu"], m["nu"], int(m["count"]))

  def loss(self, capacity: int | None = None):
    return pretrain_loss(self.graphdef, spec=self.spec, warmup_spec=self.warm_spec,
                         random_steps=self.random_steps,
                         capacity=self.capacity if capacity is None else capacity,
                         warmup_capacity=self.warm_capacity, image_size=self.image_size,
                         pack=self.pack, on_plan=self.on_plan)

  def train_step(self, state_shardings):
    """One jitted step per encoder capacity in use (one with 'max' or 'packed';
    a bucketed step also takes the pre-pass's salience)."""
    keys, mesh = self.batch_keys(), self.mesh
    bsh = sharding.batch_sharding(mesh)
    pre_pass = self._salience_fn() if self.bucketed else None

    def compile_step(cap, with_salience):
      shard = {k: bsh for k in keys + (("salience",) if with_salience else ())}
      fn = make_train_step(self.loss(cap), self.tx, accum_steps=self.config.accum_steps)
      return sharding.jit(fn, mesh, in_shardings=(state_shardings, shard),
                          out_shardings=(state_shardings, NamedSharding(mesh, P())),
                          donate_argnums=0)

    def step(state, batch):
      arrays = {k: sharding.global_batch(mesh, batch[k]) for k in keys}
      cap = self.capacity
      if self.bucketed and int(state.step) >= self.random_steps:  # one small host read a step
        max_keep, arrays["salience"] = pre_pass(state.params, state.fixed, arrays)
        cap = masking.choose_capacity(int(max_keep), self.buckets)
      key = (cap, "salience" in arrays)
      if key not in self._step_fns:
        self._step_fns[key] = compile_step(*key)
      return self._step_fns[key](state, arrays)

    return step

  def _salience_fn(self):
    """(largest AMR keep length, salience (B, L)) of a step's micro-batches.
    Keep lengths depend on salience only (not on the masking noise), so the
    chosen bucket always holds every sample; the step reuses the salience."""
    spec, accum, graphdef, size = self.spec, self.config.accum_steps, self.graphdef, self.image_size

    def fn(params, fixed, batch):
      model = nnx.merge(graphdef, params, fixed)
      images = device_ops.pixels(batch, size)
      micro = images.reshape((accum, -1) + images.shape[1:])
      sal = jax.vmap(lambda x: masking.token_salience(
          model.embed_patches(device_ops.normalize(x, jnp.float32))))(micro)
      keep = jax.vmap(lambda s: masking.amr_keep_lengths(
          s, mask_ratio=spec.mask_ratio, ratio_var=spec.ratio_var, delta=spec.delta,
          group_size=spec.group_size))(sal)
      return keep.max(), sal.reshape((-1,) + sal.shape[2:])

    bsh = sharding.batch_sharding(self.mesh)
    return jax.jit(fn, out_shardings=(NamedSharding(self.mesh, P()), bsh))

  def features_fn(self):
    """Unmasked encoder features: the cls token and the mean of patch tokens."""
    graphdef = self.graphdef

    def fn(state, images):
      return nnx.merge(graphdef, state.params, state.fixed).encoder.pooled_features(images)

    return fn

  def has_side_output(self, step):
    return step % self.config.figure_every == 0 or (self._figures is None and self.process == 0)

  def after_step(self, state, step, batch, writer):
    if self._figures is None and self.process == 0:
      self._figures = figures.FigureLog(os.path.join(self.workdir, "figures"),
                                        self.config.figure_images)
      self._figures.choose({k: batch[k] for k in (*self.batch_keys(), "label") if k in batch},
                           lambda few: device_ops.pixels(few, self.image_size))
    if step % self.config.figure_every == 0:
      self._figure(state, step, writer)

  def at_end(self, state, step, writer):
    if self._figure_step != step:  # not drawn already by after_step at this step
      self._figure(state, step, writer)
    if self.process == 0:
      plots.write_metrics_plot(self.workdir)

  def close(self):
    if self.bucketed and self.process == 0:
      print(f"encoder capacities compiled: {sorted({c for c, _ in self._step_fns})} of buckets "
            f"{list(self.buckets)}")

  def _figure(self, state, step, writer):
    """Every process joins the gather (parameters may be split over processes);
    process 0 draws."""
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    params, fixed = multihost_utils.process_allgather((state.params, state.fixed), tiled=True)
    self._figure_step = step
    if self._figures is None or self.process != 0:
      return
    model = nnx.merge(self.graphdef, params, fixed)
    warm = step < self.random_steps  # the masking the next step uses
    # A few images cannot form the training AMR group: one ratio per image here.
    # One masking key for every figure, so the progress sheet's columns differ by training only.
    spec = self.warm_spec if warm else dataclasses.replace(self.spec, group_size=1)
    parts = figures.reconstruct(model, self._figures.images, spec, jax.random.PRNGKey(0))
    title = figures.sheet_title(step, step / self.steps_per_epoch,
                                "random (warm-up)" if warm else spec.method, parts["hidden"])
    image = figures.draw_sheet(parts, title=title, delta=None if warm else spec.delta)
    folder = os.path.join(self.workdir, "figures")
    figures.save_png(image, os.path.join(folder, f"step_{step:07d}.png"))
    self._figures.add(step, parts)
    figures.save_png(self._figures.progress(), os.path.join(folder, "progress.png"))
    writer.image(step, "reconstruction", image)
