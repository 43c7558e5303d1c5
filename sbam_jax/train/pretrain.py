"""The pre-training task (MAE / SBM / SBAM): config -> Job for the generic loop.

Encoder capacity: 'max' compiles one step for the largest keep length the
masking spec allows; 'bucketed' reads the batch's largest AMR keep length
(one scalar a step) and runs the smallest compiled bucket that holds it.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sbam_jax import checkpoints as param_ckpt
from sbam_jax import config as cfg_lib
from sbam_jax import masking, optim
from sbam_jax.models import MaskedAutoencoder
from sbam_jax.train import figures, schedule, sharding
from sbam_jax.train.loop import Job, make_source
from sbam_jax.train.step import TrainState, make_optimizer, make_train_step, pretrain_loss


def tower_flops(tokens: int, d: int, depth: int, ratio: float) -> float:
  """Forward FLOPs of `depth` transformer blocks: matmuls and attention."""
  return depth * (2 * tokens * (4 * d * d + 2 * ratio * d * d) + 4 * tokens * tokens * d)


def flops_per_image(cfg, keep: int) -> float:
  """Training FLOPs per image (3x forward): matmuls and attention of encoder
  (1 + keep tokens) and decoder (1 + L tokens), patch embed and prediction."""
  tower = tower_flops
  L, D, dd = cfg.num_patches, cfg.embed_dim, cfg.decoder_embed_dim
  fwd = (2 * L * cfg.patch_dim * D + tower(1 + keep, D, cfg.depth, cfg.mlp_ratio)
         + 2 * (1 + keep) * D * dd + tower(1 + L, dd, cfg.decoder_depth, cfg.mlp_ratio)
         + 2 * (1 + L) * dd * cfg.patch_dim)
  return 3.0 * fwd


def model_card(kind: str, cfg, **more) -> dict:
  return {"kind": kind, "model": dataclasses.asdict(cfg), **more}


def _initial_state(config, model_cfg, tx, steps_per_epoch, load: bool = True):
  """Fresh parameters, or a converted checkpoint (`init_from`) with its AdamW
  state and epoch: training continues at (epoch + 1) * steps_per_epoch."""
  model = MaskedAutoencoder(model_cfg, rngs=nnx.Rngs(config.seed))
  _, params, fixed = nnx.split(model, nnx.Param, ...)
  params, fixed = nnx.to_pure_dict(params), nnx.to_pure_dict(fixed)
  step, opt_state = 0, None
  if config.init_from and load:
    try:
      loaded, card = param_ckpt.load_weights(config.init_from)
    except FileNotFoundError as e:
      raise cfg_lib.ConfigError(f"init_from: {e}") from None
    if card["kind"] != "pretrain":
      raise cfg_lib.ConfigError(f"init_from {config.init_from!r} holds a {card['kind']} "
                                f"checkpoint; pre-training needs a full pre-train model")
    params, fixed = take(loaded, params, "init_from"), take(loaded, fixed, "init_from")
    if "adamw" in card.get("extra", []):
      m = param_ckpt.load_extra(config.init_from, "adamw")
      opt_state = optim.adamw_state(tx, params, m["mu"], m["nu"], int(m["count"]))
    if "epoch" in card:
      step = (int(card["epoch"]) + 1) * steps_per_epoch
  if opt_state is None:
    opt_state = tx.init(params)
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params, fixed=fixed,
                    opt_state=opt_state, rng=jax.random.PRNGKey(config.seed))


def take(loaded: dict, like: dict, what: str, path: str = "") -> dict:
  """The entries of `loaded` that the tree `like` has, names and shapes checked."""
  if isinstance(like, dict):
    if not isinstance(loaded, dict):
      raise cfg_lib.ConfigError(f"{what}: {path or 'root'} is an array, the model has a subtree")
    missing = sorted(set(like) - set(loaded))
    if missing:
      raise cfg_lib.ConfigError(f"{what} lacks {', '.join(f'{path}{k}' for k in missing)}")
    return {k: take(loaded[k], v, what, f"{path}{k}/") for k, v in like.items()}
  if tuple(np.shape(loaded)) != tuple(np.shape(like)):
    raise cfg_lib.ConfigError(f"{what}: {path.rstrip('/')} has shape {np.shape(loaded)}, "
                              f"the model needs {np.shape(like)}")
  return np.asarray(loaded, np.float32)


def make_job(config, workdir: str) -> Job:
  n_dev, n_proc, proc = jax.device_count(), jax.process_count(), jax.process_index()
  model_cfg, spec, _ = cfg_lib.check_pretrain(config, num_devices=n_dev, num_processes=n_proc)
  warm_spec = masking.MaskingSpec("random", mask_ratio=spec.mask_ratio)
  L = model_cfg.num_patches
  capacity = masking.max_capacity(spec, L)
  warm_capacity = masking.max_capacity(warm_spec, L)

  source = make_source(config.data)  # bad paths fail here, before any compilation
  steps_per_epoch = source.num_examples // config.batch_size
  if steps_per_epoch == 0:
    raise cfg_lib.ConfigError(f"{source.num_examples} images is less than one batch of "
                              f"{config.batch_size}")
  random_steps = steps_per_epoch * config.random_epochs
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  lr = schedule.peak_lr(config.blr, config.batch_size)
  lr_fn = lambda s: schedule.mae_lr(s, lr=lr, min_lr=config.min_lr,
                                    warmup_epochs=config.warmup_epochs, epochs=config.epochs,
                                    steps_per_epoch=steps_per_epoch)
  abstract = nnx.eval_shape(lambda: MaskedAutoencoder(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
  decay_mask = optim.reference_decay_mask(nnx.to_pure_dict(abstract_params))
  tx = make_optimizer(lr_fn, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
                      decay_mask=decay_mask)
  bucketed = config.masking.capacity == "bucketed" and spec.adaptive
  buckets = (masking.capacity_buckets(spec, L, config.masking.num_buckets) if bucketed
             else (capacity,))
  step_fns: dict = {}

  def build_step(state_sh):
    bsh = {k: sharding.batch_sharding(mesh) for k in data_keys}
    replicated = NamedSharding(mesh, P())
    max_keep_fn = (_max_keep_fn(graphdef, spec, config.accum_steps, mesh, model_cfg.img_size)
                   if bucketed else None)

    def compile_step(cap):
      loss_fn = pretrain_loss(graphdef, spec=spec, warmup_spec=warm_spec,
                              random_steps=random_steps, capacity=cap,
                              warmup_capacity=warm_capacity, image_size=model_cfg.img_size)
      fn = make_train_step(loss_fn, tx, accum_steps=config.accum_steps)
      return jax.jit(fn, in_shardings=(state_sh, bsh), out_shardings=(state_sh, replicated),
                     donate_argnums=0)

    def step(state, batch):
      arrays = {k: sharding.global_batch(mesh, batch[k]) for k in data_keys}
      cap = capacity
      if bucketed and int(state.step) >= random_steps:  # one small host read a step
        cap = masking.choose_capacity(int(max_keep_fn(state.params, state.fixed, arrays)),
                                      buckets)
      if cap not in step_fns:
        step_fns[cap] = compile_step(cap)
      return step_fns[cap](state, arrays)

    return step

  from sbam_jax.data import transforms  # pylint: disable=g-import-not-at-top
  transform = transforms.make_transform(
      "pretrain_crop" if config.data.device_resize else "pretrain", model_cfg.img_size)
  data_keys = tuple(transform.spec)  # what the host sends per image

  def make_data(start):
    from sbam_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    return pipeline.InputPipeline(
        source, transform,
        global_batch=config.batch_size, image_size=model_cfg.img_size, seed=config.seed,
        process_index=proc, process_count=n_proc, start_step=start, num_epochs=config.epochs,
        threads=config.data.threads or None)

  figure_batch = []

  def on_step(state, step, batch, writer):
    if not figure_batch:
      from sbam_jax.data import device as device_ops  # pylint: disable=g-import-not-at-top
      few = {k: batch[k][: config.figure_images] for k in data_keys}
      figure_batch.append(np.asarray(device_ops.pixels(few, model_cfg.img_size), np.uint8))
    if step % config.figure_every == 0:
      _figure(state, graphdef, spec, figure_batch[0], step, workdir, writer)

  def on_close():
    if bucketed and proc == 0:
      print(f"encoder capacities compiled: {sorted(step_fns)} of buckets {list(buckets)}")

  return Job(
      mesh=mesh, card=model_card("pretrain", model_cfg),
      init_state=lambda load: _initial_state(config, model_cfg, tx, steps_per_epoch, load),
      build_step=build_step, make_data=make_data, steps_per_epoch=steps_per_epoch,
      total_steps=steps_per_epoch * config.epochs, batch_size=config.batch_size, lr_fn=lr_fn,
      summary=(f"pre-training a {model_cfg.embed_dim}-wide ViT, lr {lr:.3g}, masking "
               f"{spec.method} (v={spec.ratio_var}, group={spec.group_size}), random masking "
               f"until step {random_steps}"),
      flops_per_image=flops_per_image(model_cfg, (capacity + warm_capacity) // 2),
      on_step=on_step,
      on_end=lambda state, step, writer: _figure(
          state, graphdef, spec, figure_batch[0] if figure_batch else None, step, workdir,
          writer),
      on_close=on_close)


def _max_keep_fn(graphdef, spec, accum_steps, mesh, image_size):
  """Largest AMR keep length of a step's micro-batches. Keep lengths depend on
  salience only (not on the masking noise), so this equals what the step will
  compute, and the chosen bucket always holds every sample."""
  from sbam_jax.data import device as device_ops  # pylint: disable=g-import-not-at-top

  def fn(params, fixed, batch):
    model = nnx.merge(graphdef, params, fixed)
    images = device_ops.pixels(batch, image_size)
    micro = images.reshape((accum_steps, -1) + images.shape[1:])
    keep = jax.vmap(lambda x: masking.amr_keep_lengths(
        masking.token_salience(model.embed_patches(device_ops.normalize(x))),
        mask_ratio=spec.mask_ratio, ratio_var=spec.ratio_var, delta=spec.delta,
        group_size=spec.group_size))(micro)
    return keep.max()

  return jax.jit(fn, out_shardings=NamedSharding(mesh, P()))


def _figure(state, graphdef, spec, images, step, workdir, writer):
  """Every process joins the gather (parameters may be split over processes);
  process 0 draws."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  params, fixed = multihost_utils.process_allgather((state.params, state.fixed), tiled=True)
  if images is None or jax.process_index() != 0:
    return
  model = nnx.merge(graphdef, params, fixed)
  # A few images cannot form the training AMR group: one ratio per image here.
  image = figures.panels(model, images, dataclasses.replace(spec, group_size=1),
                         jax.random.PRNGKey(step))
  figures.save_png(image, os.path.join(workdir, "figures", f"step_{step:07d}.png"))
  writer.image(step, "reconstruction", image)

