"""The generic training loop: a task's Job -> jitted steps over the input
pipeline, with checkpoints (resume, pre-emption), logs, and per-epoch
evaluation. Tasks (`pretrain.py`, `classify.py`) say what a step computes;
everything numeric lives in `step.py` and the task modules."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Iterable, Optional

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from sbam_jax import checkpoints as param_ckpt
from sbam_jax import config as cfg_lib
from sbam_jax.train import checkpointing, logging_utils, sharding

# bf16 dense matmul peaks, for the MFU estimate (None elsewhere, e.g. CPU).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6 lite": 918e12}


@dataclasses.dataclass
class Job:
  """What a task hands the loop."""
  mesh: Any
  card: dict                                   # written to <workdir>/sbam_jax.json
  init_state: Callable[[bool], Any]            # (load init_from?) -> starting TrainState
  build_step: Callable[[Any], Callable]        # state shardings -> (state, host batch) -> (state, metrics)
  make_data: Callable[[int], Iterable[dict]]   # start step -> host batches (ends after the last epoch)
  steps_per_epoch: int
  total_steps: int
  batch_size: int
  lr_fn: Callable
  summary: str                                 # printed once at the start
  flops_per_image: Optional[float] = None
  evaluate: Optional[Callable[[Any], dict]] = None   # state -> metrics (exact over a split)
  eval_every_epochs: int = 1
  on_step: Optional[Callable] = None   # (state, step, host batch, writer), after each step
  on_end: Optional[Callable] = None    # (state, step, writer), after the last step
  on_close: Optional[Callable[[], None]] = None


def make_source(data, split: Optional[str] = None):
  from sbam_jax.data import demo, sources  # pylint: disable=g-import-not-at-top
  split = split or data.split
  if data.source == "demo":
    return sources.folder_source(demo.write_demo_dataset(), split)
  if data.source == "tfds":
    return sources.tfds_source(data.tfds_name, split, data.tfds_data_dir or None)
  return sources.folder_source(data.path, split)


def run(config, workdir: str) -> int:
  """Dispatch on `config.task`; returns the process exit status."""
  from sbam_jax.train import classify, pretrain  # pylint: disable=g-import-not-at-top
  task = config.get("task", "pretrain")
  if task == "pretrain":
    job = pretrain.make_job(config, workdir)
  elif task in classify.TASKS:
    job = classify.make_job(config, workdir)
  else:
    raise cfg_lib.ConfigError(f"task must be 'pretrain' or one of {classify.TASKS}, got {task!r}")
  return fit(job, config, workdir, eval_only=bool(config.get("eval_only", False)))


def _log_eval(writer, step: int, epoch: Optional[float], metrics: dict,
              best: Optional[float]) -> None:
  if jax.process_index() == 0:
    where = f"step {step} ep {epoch:.2f}" if epoch is not None else f"of the weights at step {step}"
    text = (f"eval {where}: top-1 {metrics['top1']:.3f}% top-5 "
            f"{metrics['top5']:.3f}% loss {metrics['loss']:.4f} on {metrics['count']} images")
    if best is not None:
      text += f" (best top-1 {best:.3f}%)"
    print(text, flush=True)
  writer.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})


def fit(job: Job, config, workdir: str, *, eval_only: bool = False) -> int:
  proc, n_dev = jax.process_index(), jax.device_count()
  mesh = job.mesh
  if proc == 0:
    param_ckpt.write_workdir_card(workdir, job.card)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    keep=config.keep_checkpoints)
  abstract = jax.eval_shape(lambda: job.init_state(False))  # shapes only, reads no file
  state_sh = sharding.tree_shardings(mesh, abstract)
  replicated = NamedSharding(mesh, P())
  state_sh = state_sh.replace(rng=replicated, step=replicated)
  latest = ckpt.latest_step()
  if latest is not None:
    state = ckpt.restore(latest, checkpointing.abstract_like(abstract, state_sh))
    if proc == 0:
      print(f"resuming from {ckpt.directory}/{latest}", flush=True)
  else:
    state = jax.device_put(job.init_state(True), state_sh)
  start = int(state.step)
  writer = logging_utils.MetricWriter(workdir, enabled=proc == 0)
  epoch_of = lambda s: s / job.steps_per_epoch

  if eval_only:
    try:
      if job.evaluate is None:
        raise cfg_lib.ConfigError(f"task {config.get('task', 'pretrain')!r} has no evaluation")
      _log_eval(writer, start, None, job.evaluate(state), None)
    finally:
      ckpt.close()
      writer.flush()
    return 0

  step_fn = job.build_step(state_sh)
  data = job.make_data(start)
  peak = next((v for k, v in PEAK_FLOPS.items() if k in jax.devices()[0].device_kind), None)
  preempt = checkpointing.Preemption()
  if proc == 0:
    print(f"{job.summary}; {n_dev} devices, mesh {dict(mesh.shape)}, {job.steps_per_epoch} "
          f"steps/epoch, steps {start}..{job.total_steps}", flush=True)

  status, t0, seen, best = 0, time.time(), 0, None
  step = start
  try:
    for batch in data:  # ends after the last epoch
      state, metrics = step_fn(state, batch)
      step += 1
      seen += job.batch_size
      if step % config.log_every == 0 or step == job.total_steps:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not m.pop("finite"):
          print(f"step {step}: loss or gradient is not finite (loss {m['loss']}); stopping. "
                f"The last good checkpoint is kept; lower blr or check the data.", flush=True)
          status = 3
          break
        dt = time.time() - t0
        img_s = seen / max(dt, 1e-9)
        lr = float(job.lr_fn(step - 1))
        mfu = img_s * job.flops_per_image / (peak * n_dev) if peak and job.flops_per_image else None
        if proc == 0:
          print(logging_utils.progress_line(
              step, job.total_steps, epoch_of(step), m, lr, img_s, mfu,
              (job.total_steps - step) * dt / max(seen, 1) * job.batch_size), flush=True)
        writer.scalars(step, {**m, "lr": lr, "img_per_s": img_s, "epoch": epoch_of(step),
                              "skipped_images": getattr(data, "skipped", 0)})
        t0, seen = time.time(), 0
      if step % config.checkpoint_every == 0:
        ckpt.save(step, state)
      if job.on_step is not None:
        job.on_step(state, step, batch, writer)
      epoch_end = step % job.steps_per_epoch == 0
      epoch = step // job.steps_per_epoch
      if job.evaluate is not None and epoch_end and (
          epoch % job.eval_every_epochs == 0 or step == job.total_steps):
        metrics_eval = job.evaluate(state)
        best = max(best or 0.0, metrics_eval["top1"])
        _log_eval(writer, step, epoch_of(step), metrics_eval, best)
        t0, seen = time.time(), 0
      if preempt.requested(step):
        print(f"SIGTERM: saving step {step} and exiting", flush=True)
        ckpt.save(step, state, force=True)
        status = 143
        break
    if status == 0:
      ckpt.save(step, state, force=True)
      if job.on_end is not None:
        job.on_end(state, step, writer)
  finally:
    ckpt.close()
    writer.flush()
    preempt.restore()
  if job.on_close is not None:
    job.on_close()
  skipped = getattr(data, "skipped", 0)
  if skipped and proc == 0:
    print(f"skipped {skipped} undecodable images, e.g. {data.skipped_names[:3]}")
  return status
