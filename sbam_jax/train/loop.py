"""The pre-training loop: config -> data, mesh, state -> jitted steps, with
checkpoints, logs and figures. Everything numeric lives in `step.py`."""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sbam_jax import checkpoints as param_ckpt
from sbam_jax import config as cfg_lib
from sbam_jax import masking, optim
from sbam_jax.models import MaskedAutoencoder
from sbam_jax.train import checkpointing, figures, logging_utils, schedule, sharding
from sbam_jax.train.step import TrainState, make_optimizer, make_train_step

# bf16 dense matmul peaks, for the MFU estimate (None elsewhere, e.g. CPU).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6 lite": 918e12}


def make_source(data):
  from sbam_jax.data import demo, sources  # pylint: disable=g-import-not-at-top
  if data.source == "demo":
    return sources.folder_source(demo.write_demo_dataset(), data.split)
  if data.source == "tfds":
    return sources.tfds_source(data.tfds_name, data.split, data.tfds_data_dir or None)
  return sources.folder_source(data.path, data.split)


def flops_per_image(cfg, keep: int) -> float:
  """Training FLOPs per image (3x forward): matmuls and attention of encoder
  (1 + keep tokens) and decoder (1 + L tokens), patch embed and prediction."""
  def tower(tokens, d, depth, ratio):
    per_layer = 2 * tokens * (4 * d * d + 2 * ratio * d * d) + 4 * tokens * tokens * d
    return depth * per_layer
  L, D, dd = cfg.num_patches, cfg.embed_dim, cfg.decoder_embed_dim
  fwd = (2 * L * cfg.patch_dim * D + tower(1 + keep, D, cfg.depth, cfg.mlp_ratio)
         + 2 * (1 + keep) * D * dd + tower(1 + L, dd, cfg.decoder_depth, cfg.mlp_ratio)
         + 2 * (1 + L) * dd * cfg.patch_dim)
  return 3.0 * fwd


def _initial_state(config, model_cfg, tx, steps_per_epoch):
  """Fresh parameters, or a converted checkpoint (`init_from`) with its AdamW
  state and epoch: training continues at (epoch + 1) * steps_per_epoch."""
  model = MaskedAutoencoder(model_cfg, rngs=nnx.Rngs(config.seed))
  _, params, fixed = nnx.split(model, nnx.Param, ...)
  params, fixed = nnx.to_pure_dict(params), nnx.to_pure_dict(fixed)
  step, opt_state = 0, None
  if config.init_from:
    loaded, card = param_ckpt.load_params(config.init_from)
    if card["kind"] != "pretrain":
      raise cfg_lib.ConfigError(f"init_from {config.init_from!r} holds a {card['kind']} "
                                f"checkpoint; pre-training needs a full pre-train model")
    params, fixed = _take(loaded, params), _take(loaded, fixed)
    if "adamw" in card.get("extra", []):
      m = param_ckpt.load_extra(config.init_from, "adamw")
      opt_state = optim.adamw_state(tx, params, m["mu"], m["nu"], int(m["count"]))
    if "epoch" in card:
      step = (int(card["epoch"]) + 1) * steps_per_epoch
  if opt_state is None:
    opt_state = tx.init(params)
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params, fixed=fixed,
                    opt_state=opt_state, rng=jax.random.PRNGKey(config.seed))


def _take(loaded: dict, like: dict) -> dict:
  """The entries of `loaded` that the tree `like` has, shapes checked."""
  if isinstance(like, dict):
    return {k: _take(loaded[k], v) for k, v in like.items()}
  if tuple(np.shape(loaded)) != tuple(np.shape(like)):
    raise cfg_lib.ConfigError(f"init_from shape {np.shape(loaded)} != model {np.shape(like)}")
  return np.asarray(loaded, np.float32)


def run(config, workdir: str) -> int:
  os.makedirs(workdir, exist_ok=True)
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
  total = steps_per_epoch * config.epochs
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

  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    keep=config.keep_checkpoints)
  state = _initial_state(config, model_cfg, tx, steps_per_epoch)
  state_sh = sharding.tree_shardings(mesh, state)
  state_sh = state_sh.replace(rng=NamedSharding(mesh, P()), step=NamedSharding(mesh, P()))
  if ckpt.latest_step() is not None:
    state = ckpt.restore(ckpt.latest_step(), checkpointing.abstract_like(state, state_sh))
  else:
    state = jax.device_put(state, state_sh)
  start = int(state.step)

  replicated = NamedSharding(mesh, P())

  def compile_step(cap):
    fn = make_train_step(graphdef, tx, spec=spec, warmup_spec=warm_spec,
                         random_steps=random_steps, capacity=cap,
                         warmup_capacity=warm_capacity, accum_steps=config.accum_steps)
    return jax.jit(fn, in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sh, replicated), donate_argnums=0)

  bucketed = config.masking.capacity == "bucketed" and spec.adaptive
  buckets = (masking.capacity_buckets(spec, L, config.masking.num_buckets) if bucketed
             else (capacity,))
  step_fns = {}
  max_keep_fn = _max_keep_fn(graphdef, spec, config.accum_steps, mesh) if bucketed else None

  from sbam_jax.data import pipeline, transforms  # pylint: disable=g-import-not-at-top
  data = pipeline.InputPipeline(
      source, transforms.make_transform("pretrain", model_cfg.img_size),
      global_batch=config.batch_size, image_size=model_cfg.img_size, seed=config.seed,
      process_index=proc, process_count=n_proc, start_step=start, num_epochs=config.epochs,
      threads=config.data.threads or None)
  writer = logging_utils.MetricWriter(workdir, enabled=proc == 0)
  peak = next((v for k, v in PEAK_FLOPS.items() if k in jax.devices()[0].device_kind), None)
  flops = flops_per_image(model_cfg, (capacity + warm_capacity) // 2)
  preempt = checkpointing.Preemption()
  if proc == 0:
    print(f"{model_cfg.embed_dim}-wide ViT, {n_dev} devices, mesh {dict(mesh.shape)}, "
          f"{steps_per_epoch} steps/epoch, steps {start}..{total}, lr {lr:.3g}, masking "
          f"{spec.method} (v={spec.ratio_var}, group={spec.group_size}), random masking "
          f"until step {random_steps}", flush=True)

  status, t0, seen = 0, time.time(), 0
  figure_batch = None
  try:
    step = start
    for batch in data:  # ends after config.epochs
      if figure_batch is None:
        figure_batch = batch["image"][: config.figure_images]
      images = sharding.global_batch(mesh, batch["image"])
      cap = capacity
      if bucketed and step >= random_steps:  # one small host read a step
        cap = masking.choose_capacity(int(max_keep_fn(state.params, state.fixed, images)),
                                      buckets)
      if cap not in step_fns:
        step_fns[cap] = compile_step(cap)
      state, metrics = step_fns[cap](state, images)
      step += 1
      seen += config.batch_size
      if step % config.log_every == 0 or step == total:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not m.pop("finite"):
          print(f"step {step}: loss or gradient is not finite (loss {m['loss']}); stopping. "
                f"The last good checkpoint is kept; lower blr or check the data.", flush=True)
          status = 3
          break
        dt = time.time() - t0
        img_s = seen / max(dt, 1e-9)
        cur_lr = float(lr_fn(step - 1))
        mfu = img_s * flops / (peak * n_dev) if peak else None
        if proc == 0:
          print(logging_utils.progress_line(step, total, step / steps_per_epoch, m, cur_lr,
                                            img_s, mfu, (total - step) * dt / max(seen, 1)
                                            * config.batch_size), flush=True)
        writer.scalars(step, {**m, "lr": cur_lr, "img_per_s": img_s, "epoch":
                              step / steps_per_epoch, "skipped_images": data.skipped})
        t0, seen = time.time(), 0
      if step % config.checkpoint_every == 0:
        ckpt.save(step, state)
      if step % config.figure_every == 0:
        _figure(state, graphdef, spec, figure_batch, step, workdir, writer)
      if preempt.requested:
        print(f"SIGTERM: saving step {step} and exiting", flush=True)
        ckpt.save(step, state, force=True)
        status = 143
        break
    if status == 0:
      ckpt.save(step, state, force=True)
      _figure(state, graphdef, spec, figure_batch, step, workdir, writer)
  finally:
    ckpt.close()
    writer.flush()
    preempt.restore()
  if bucketed and proc == 0:
    print(f"encoder capacities compiled: {sorted(step_fns)} of buckets {list(buckets)}")
  if data.skipped and proc == 0:
    print(f"skipped {data.skipped} undecodable images, e.g. {data.skipped_names[:3]}")
  return status


def _max_keep_fn(graphdef, spec, accum_steps, mesh):
  """Largest AMR keep length of a step's micro-batches. Keep lengths depend on
  salience only (not on the masking noise), so this equals what the step will
  compute, and the chosen bucket always holds every sample."""
  from sbam_jax.data import device as device_ops  # pylint: disable=g-import-not-at-top

  def fn(params, fixed, images):
    model = nnx.merge(graphdef, params, fixed)
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
