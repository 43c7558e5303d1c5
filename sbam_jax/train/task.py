"""What a training task is: the protocol the generic loop (`loop.py`) runs.

A task turns a config into the pieces of a run, each a named method:

  init_state(load)        the starting TrainState (load: read `init_from`)
  loss()                  loss_fn(params, fixed, stats, batch, key, step)
  transform()             the host transform of each training image
  data(start_step)        host batches from any step (ends after the last epoch)
  train_step(shardings)   (state, host batch) -> (state, metrics), jitted
  compiled_step(...)      the same step compiled for shapes only (dry runs)
  evaluators()            the plug-ins listed in `config.evals`
  features_fn(), logits_fn()   what evaluators run on a state
  after_step / at_end / close  figures and other side outputs
  has_side_output(step)   whether after_step does work at that step

`Task` implements everything that is the same for every task (config
parsing, mesh, schedule, optimizer by name, input pipeline, the jitted step);
a task subclasses it, registers itself under its config name
(`@registry.register("task", name)`), and fills in its model and loss.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sbam_jax import config as config_lib
from sbam_jax import optim, sharding
from sbam_jax.errors import ConfigError
from sbam_jax.train import schedule
from sbam_jax.train.step import make_train_step


class Task:
  Config = config_lib.TrainConfig   # the schema of this task's config
  kind = ""                         # what its workdir's weights are (the card)
  recipe_optimizer = "adamw"        # `config.optimizer = ''` means this
  eval_only = False

  def __init__(self, config, workdir: str):
    self.workdir = workdir
    self.config = cfg = config_lib.parse(self.Config, config)
    self.process, self.num_processes = jax.process_index(), jax.process_count()
    self.num_devices = jax.device_count()
    self.micro_batch = cfg.check(num_devices=self.num_devices, num_processes=self.num_processes)
    self.model_cfg = config_lib.build_model_config(cfg.model)
    self.mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    self._sources: dict = {}
    self.steps_per_epoch = 1

  # ---- data -------------------------------------------------------------------

  def source(self, split: Optional[str] = None):
    """The config's data source for `split` (default: the training split), built once."""
    from sbam_jax.data import sources  # pylint: disable=g-import-not-at-top
    split = split or self.config.data.split
    if split not in self._sources:
      self._sources[split] = sources.build_source(self.config.data, split)
    return self._sources[split]

  def set_epoch_length(self, num_examples: int) -> None:
    """Steps per epoch: whole global batches (the reference drops the rest)."""
    if num_examples < self.config.batch_size:
      raise ConfigError(f"{num_examples} images is less than one batch of "
                        f"{self.config.batch_size}")
    self.steps_per_epoch = num_examples // self.config.batch_size

  @property
  def total_steps(self) -> int:
    return self.steps_per_epoch * self.config.epochs

  @property
  def batch_size(self) -> int:
    return self.config.batch_size

  @property
  def image_size(self) -> int:
    return self.model_cfg.img_size

  def transform(self) -> Callable:
    raise NotImplementedError

  def batch_keys(self) -> tuple:
    """What the host sends per image (the transform's outputs, and labels)."""
    return tuple(self.transform().spec)

  def data(self, start_step: int):
    from sbam_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    cfg = self.config
    return pipeline.InputPipeline(
        self.source(), self.transform(), global_batch=cfg.batch_size,
        image_size=self.image_size, seed=cfg.seed, process_index=self.process,
        process_count=self.num_processes, start_step=start_step, num_epochs=cfg.epochs,
        threads=cfg.data.threads or None)

  # ---- optimisation -------------------------------------------------------------

  @property
  def peak_lr(self) -> float:
    return schedule.peak_lr(self.config.blr, self.config.batch_size)

  def lr(self, step):
    cfg = self.config
    return schedule.mae_lr(step, lr=self.peak_lr, min_lr=cfg.min_lr,
                           warmup_epochs=cfg.warmup_epochs, epochs=cfg.epochs,
                           steps_per_epoch=self.steps_per_epoch)

  @property
  def optimizer_spec(self) -> dict:
    """What the optimizer state in this task's checkpoints belongs to."""
    return {"name": self.config.optimizer or self.recipe_optimizer,
            "args": dict(self.config.optimizer_args)}

  def make_optimizer(self, params, decay_mask, scales=None):
    """`config.optimizer` (or the recipe's) with this task's decay mask and lr
    scales, checked on the (abstract) parameters before anything compiles."""
    cfg = self.config
    spec = self.optimizer_spec["name"]
    tx = optim.build(spec, self.lr, decay_mask=decay_mask, scales=scales,
                     args=cfg.optimizer_args,
                     defaults=dict(b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
    optim.check_update(tx, params, spec)
    if cfg.weight_decay and not optim.takes_weight_decay(spec) and self.process == 0:
      print(f"note: optimizer {spec!r} has no weight decay; the recipe's weight_decay="
            f"{cfg.weight_decay} is not applied", flush=True)
    return tx

  def loss(self) -> Callable:
    raise NotImplementedError

  def init_state(self, load: bool):
    raise NotImplementedError

  def _jit_step(self, state_shardings):
    bsh = sharding.batch_sharding(self.mesh)
    return sharding.jit(make_train_step(self.loss(), self.tx, accum_steps=self.config.accum_steps),
                        self.mesh, in_shardings=(state_shardings, {k: bsh for k in self.batch_keys()}),
                        out_shardings=(state_shardings, NamedSharding(self.mesh, P())),
                        donate_argnums=0)

  def train_step(self, state_shardings) -> Callable:
    """The pure step (`step.py`) jitted with explicit shardings, state donated;
    host batches are assembled into global arrays first."""
    keys, mesh, fn = self.batch_keys(), self.mesh, self._jit_step(state_shardings)
    return lambda state, batch: fn(state, {k: sharding.global_batch(mesh, batch[k])
                                           for k in keys})

  def compiled_step(self, state_shardings, abstract_state):
    """The step compiled for shapes only (dry runs, memory estimates)."""
    spec, bsh = self.transform().spec, sharding.batch_sharding(self.mesh)
    batch = {}
    for k in self.batch_keys():
      shape, dtype = spec.get(k, ((), np.int32))  # labels are int32 scalars
      batch[k] = jax.ShapeDtypeStruct((self.batch_size, *shape), dtype, sharding=bsh)
    return self._jit_step(state_shardings).lower(abstract_state, batch).compile()

  # ---- evaluation and side outputs ----------------------------------------------------

  def evaluators(self) -> list:
    from sbam_jax.evals import base  # pylint: disable=g-import-not-at-top
    return base.build_evaluators(self, self.config.evals)

  def features_fn(self) -> Callable:
    """(state, normalised images) -> {name: (N, D) features}, for representation evaluators."""
    raise ConfigError(f"task {self.config.task!r} has no features to evaluate")

  def logits_fn(self) -> Callable:
    """(state, normalised images) -> (N, classes) logits, for classification evaluators."""
    raise ConfigError(f"task {self.config.task!r} has no classifier to evaluate; "
                      f"remove its 'classification' evaluator")

  def has_side_output(self, step: int) -> bool:
    """Whether `after_step(step)` does real work (a figure): the loop then
    times it apart from training."""
    del step
    return False

  def after_step(self, state, step: int, batch: dict, writer) -> None:
    """Called after every step (figures)."""

  def at_end(self, state, step: int, writer) -> None:
    """Called once after the last step."""

  def close(self) -> None:
    """Called when the run ends, however it ends."""

  # ---- description ----------------------------------------------------------------

  @property
  def card(self) -> dict:
    raise NotImplementedError

  def summary(self) -> str:
    return f"{self.config.task} of a {self.model_cfg.embed_dim}-wide ViT, lr {self.peak_lr:.3g}"

  flops_per_image: Optional[float] = None
