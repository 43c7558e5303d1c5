"""Fine-tuning and linear probing of a pre-trained encoder, and evaluation.

fine-tune (MAE main_finetune): the whole ViT trains; AdamW with layer-wise lr
  decay, drop-path, label smoothing, mixup / cutmix and random erasing on the
  device (RandAugment on the host), global pool by default.
linprobe (MAE main_linprobe): the encoder is frozen (it lives in the state's
  `fixed` tree: no gradient, no weight decay, no update, bit-identical);
  BatchNorm1d(affine=False) + Linear on the cls feature, trained with LARS.
evaluation: top-1 / top-5 / cross-entropy over the whole split, exact (the
  last batch is padded and padding masked), every `eval_every` epochs, at
  the end, and alone with `eval_only`.

Starting weights (`init_from`): a converted checkpoint (pretrain, encoder or
finetuned) or a training workdir of this project; the encoder is taken, its
position table resampled if the grid differs, and the head initialised as the
reference does. `eval_only` needs a classifier (finetuned / linprobe).
"""

from __future__ import annotations

import glob
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sbam_jax import checkpoints as param_ckpt
from sbam_jax import config as cfg_lib
from sbam_jax import optim
from sbam_jax.data import device as device_ops
from sbam_jax.data import mixup as mixup_lib
from sbam_jax.models import VisionTransformer
from sbam_jax.models.pos_embed import resample_pos_embed
from sbam_jax.train import schedule, sharding
from sbam_jax.train.loop import Job, make_source
from sbam_jax.train.pretrain import model_card, take, tower_flops
from sbam_jax.train.step import TrainState, make_train_step

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
    raise cfg_lib.ConfigError(f"init_from {path!r} does not match config.model ("
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
    raise cfg_lib.ConfigError(f"init_from: {e}") from None
  _check_arch(card, model_cfg, path)
  notes = [f"init_from {path} ({card['kind']})"]
  if config.eval_only:
    if card["kind"] not in CLASSIFIER_KINDS:
      raise cfg_lib.ConfigError(f"eval_only needs a fine-tuned or probed classifier; "
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
    raise cfg_lib.ConfigError(f"init_from {path!r} has no final encoder `norm` (a global-pool "
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


def make_eval_step(graphdef, num_classes: int):
  """Sums over the valid examples of a batch: loss, top-1 / top-5 hits, count."""
  k = min(5, num_classes)

  def eval_step(params, stats, fixed, batch):
    model = nnx.merge(graphdef, params, stats, fixed)
    logits = model(device_ops.normalize(batch["image"]), train=False)
    labels, valid = batch["label"], batch["valid"]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
    top = jax.lax.top_k(logits, k)[1]
    hit1 = (top[:, 0] == labels) & valid
    hit5 = (top == labels[:, None]).any(axis=1) & valid
    return {"loss_sum": jnp.where(valid, nll, 0.0).sum(), "top1": hit1.sum(),
            "top5": hit5.sum(), "count": valid.sum()}

  return eval_step


def evaluation(config, model_cfg, graphdef, num_classes, mesh, source):
  """state -> {'top1', 'top5' (percent), 'loss', 'count', 'skipped'} over the split."""
  from sbam_jax.data import pipeline, transforms  # pylint: disable=g-import-not-at-top
  size = model_cfg.img_size
  # MAE's eval resize: crop_pct 224/256 up to 224 px, the image size itself above.
  resize = int(size / (224 / 256)) if size <= 224 else size
  step = jax.jit(make_eval_step(graphdef, num_classes), out_shardings=NamedSharding(mesh, P()))
  transform = transforms.make_transform("eval", size, resize=resize)

  def evaluate(state) -> dict:
    data = pipeline.InputPipeline(
        source, transform,
        global_batch=config.eval_batch_size, image_size=size, train=False,
        process_index=jax.process_index(), process_count=jax.process_count(),
        threads=config.data.threads or None)
    totals = None
    for batch in data:
      gb = {k: sharding.global_batch(mesh, batch[k]) for k in ("image", "label", "valid")}
      out = step(state.params, state.stats, state.fixed, gb)
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    t = jax.device_get(totals)
    n = int(t["count"])
    return {"top1": 100.0 * int(t["top1"]) / max(n, 1), "top5": 100.0 * int(t["top5"]) / max(n, 1),
            "loss": float(t["loss_sum"]) / max(n, 1), "count": n, "skipped": data.skipped}

  return evaluate


# ---- the job ------------------------------------------------------------------

def _optimizer(config, params, model_cfg, lr_fn):
  """(optax transform, `optim.parameter_rules` of what it does per tensor)."""
  if config.task == "linprobe":
    tx = optim.lars(lr_fn, weight_decay=config.weight_decay)
    decays = jax.tree.map(lambda m: m and bool(config.weight_decay), optim.matrices(params))
    return tx, optim.parameter_rules(params, decays)
  mask = optim.finetune_decay_mask(params)
  scales = optim.layer_decay_scales(params, model_cfg.depth, config.layer_decay)
  tx = optim.finetune_adamw(lr_fn, b1=config.b1, b2=config.b2,
                            weight_decay=config.weight_decay, decay_mask=mask, scales=scales)
  return tx, optim.parameter_rules(params, mask, scales)


def make_job(config, workdir: str) -> Job:
  n_dev, n_proc, proc = jax.device_count(), jax.process_count(), jax.process_index()
  model_cfg = cfg_lib.check_classify(config, num_devices=n_dev, num_processes=n_proc)
  eval_split = config.data.eval_split or ("validation" if config.data.source == "tfds" else "val")
  eval_source = make_source(config.data, eval_split)
  source = eval_source if config.eval_only else make_source(config.data)
  num_classes = int(config.num_classes) or len(source.classes)
  if source.classes and num_classes != len(source.classes):
    raise cfg_lib.ConfigError(f"num_classes={num_classes} but the data has "
                              f"{len(source.classes)} classes")
  if tuple(eval_source.classes) != tuple(source.classes):
    raise cfg_lib.ConfigError(f"the {config.data.split!r} and {eval_split!r} splits "
                              f"have different class lists")
  if config.eval_only and not config.init_from and not glob.glob(
      os.path.join(workdir, "checkpoints", "[0-9]*")):
    raise cfg_lib.ConfigError("eval_only needs init_from (a classifier checkpoint) or a "
                              "workdir that already holds checkpoints")
  steps_per_epoch = max(source.num_examples // config.batch_size, 1)
  if not config.eval_only and source.num_examples < config.batch_size:
    raise cfg_lib.ConfigError(f"{source.num_examples} images is less than one batch of "
                              f"{config.batch_size}")
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  lr = schedule.peak_lr(config.blr, config.batch_size)
  lr_fn = lambda s: schedule.mae_lr(s, lr=lr, min_lr=config.min_lr,
                                    warmup_epochs=config.warmup_epochs, epochs=config.epochs,
                                    steps_per_epoch=steps_per_epoch)
  abstract = nnx.eval_shape(lambda: build_model(config, model_cfg, num_classes))
  graphdef, abstract_params, _, _ = split_model(abstract, config.task)
  tx, rules = _optimizer(config, abstract_params, model_cfg, lr_fn)
  if proc == 0 and not config.eval_only:
    param_ckpt.write_text(os.path.join(workdir, "param_groups.txt"),
                          "\n".join(optim.param_table(rules)) + "\n")
    print(_rules_summary(config, rules, workdir), flush=True)

  def init_state(load: bool):
    model = build_model(config, model_cfg, num_classes, seed=config.seed)
    full = nnx.to_pure_dict(nnx.state(model))
    if config.init_from and load:
      full, notes = starting_weights(config, model_cfg, full)
      if proc == 0:
        print("; ".join(notes), flush=True)
      param_ckpt.load_into(model, full)
    _, params, stats, fixed = split_model(model, config.task)
    return TrainState(step=jnp.asarray(0, jnp.int32), params=params, fixed=fixed,
                      opt_state=tx.init(params), rng=jax.random.PRNGKey(config.seed), stats=stats)

  mix = None
  if cfg_lib.mixup_active(config.mixup):
    mix = {k: float(v) for k, v in config.mixup.items()}
  if config.task == "finetune":
    loss_fn = finetune_loss(graphdef, num_classes=num_classes, shards=n_dev,
                            smoothing=config.smoothing, reprob=config.reprob, mix=mix)
  else:
    loss_fn = probe_loss(graphdef, model_cfg.img_size)

  from sbam_jax.data import transforms  # pylint: disable=g-import-not-at-top
  if config.task == "finetune":
    transform = transforms.make_transform("finetune", model_cfg.img_size,
                                          rand_augment=config.rand_augment)
  else:  # RandomResizedCrop with torchvision's default scale, + flip; the probe can
    # leave the resize to the device (the fine-tune cannot: RandAugment needs it here)
    transform = transforms.make_transform(
        "pretrain_crop" if config.data.device_resize else "pretrain", model_cfg.img_size,
        scale=(0.08, 1.0))
  keys = (*transform.spec, "label")

  def build_step(state_sh):
    bsh = sharding.batch_sharding(mesh)
    fn = jax.jit(make_train_step(loss_fn, tx, accum_steps=config.accum_steps),
                 in_shardings=(state_sh, {k: bsh for k in keys}),
                 out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=0)
    return lambda state, batch: fn(state, {k: sharding.global_batch(mesh, batch[k])
                                           for k in keys})

  def make_data(start):
    from sbam_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    return pipeline.InputPipeline(
        source, transform, global_batch=config.batch_size, image_size=model_cfg.img_size,
        seed=config.seed, process_index=proc, process_count=n_proc, start_step=start,
        num_epochs=config.epochs, threads=config.data.threads or None)

  kind = "linprobe" if config.task == "linprobe" else "finetuned"
  return Job(
      mesh=mesh, card=model_card(kind, model_cfg, num_classes=num_classes,
                                 global_pool=bool(config.global_pool),
                                 classes=list(source.classes)),
      init_state=init_state, build_step=build_step, make_data=make_data,
      steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * config.epochs,
      batch_size=config.batch_size, lr_fn=lr_fn,
      summary=(f"{config.task} of a {model_cfg.embed_dim}-wide ViT on {num_classes} classes, "
               f"lr {lr:.3g}"),
      flops_per_image=_flops_per_image(config.task, model_cfg),
      evaluate=evaluation(config, model_cfg, graphdef, num_classes, mesh, eval_source),
      eval_every_epochs=int(config.eval_every))


def _flops_per_image(task: str, cfg) -> float:
  """Training FLOPs per image: 3x the encoder's forward (fine-tune) or 1x (the
  probe's frozen encoder needs no backward)."""
  fwd = (2 * cfg.num_patches * cfg.patch_dim * cfg.embed_dim
         + tower_flops(1 + cfg.num_patches, cfg.embed_dim, cfg.depth, cfg.mlp_ratio))
  return (3.0 if task == "finetune" else 1.0) * fwd


def _rules_summary(config, rules: dict, workdir: str) -> str:
  no_decay = [name for name, (_, decay, _) in rules.items() if not decay]
  text = [f"{len(rules)} trainable tensors; no weight decay on {len(no_decay)}: "
          f"{', '.join(no_decay[:6])}{' ...' if len(no_decay) > 6 else ''}"]
  if config.task == "finetune":
    scales = {}
    for name, (_, _, s) in rules.items():
      group = name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("blocks.") else "")
      scales.setdefault(group, s)
    text.append("layer-wise lr scales: " + ", ".join(f"{g} {s:.4g}" for g, s in scales.items()))
  text.append(f"full table: {os.path.join(workdir, 'param_groups.txt')}")
  return "\n".join(text)

