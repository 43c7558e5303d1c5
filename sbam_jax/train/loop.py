"""The generic training loop: any registered task -> jitted steps over its
input pipeline, with checkpoints (resume, pre-emption), logs, and the
evaluators listed in the config. The loop knows only the task protocol
(`task.py`) and the evaluator protocol (`sbam_jax/evals/base.py`); what a
step computes and what an evaluation reports live with them."""

from __future__ import annotations

import os
import time
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from sbam_jax import checkpoints as param_ckpt
from sbam_jax import registry, sharding
from sbam_jax.errors import ConfigError
from sbam_jax.train import checkpointing, logging_utils

# bf16 dense matmul peaks, for the MFU estimate (None elsewhere, e.g. CPU).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6 lite": 918e12}


def run(config, workdir: str) -> int:
  """Build the task `config.task` names and run it; returns the exit status."""
  task_cls = registry.lookup("task", config.get("task", "pretrain"), where="task")
  return fit(task_cls(config, workdir), workdir)


def _restore_or_init(task, ckpt):
  """(state, its shardings): the workdir's latest checkpoint, else a fresh
  state (reading `init_from`)."""
  abstract = jax.eval_shape(lambda: task.init_state(False))  # shapes only, reads no file
  replicated = NamedSharding(task.mesh, P())
  state_sh = sharding.tree_shardings(task.mesh, abstract).replace(rng=replicated, step=replicated)
  found = ckpt.restore_latest(checkpointing.abstract_like(abstract, state_sh))  # verified
  if found is None:
    return jax.device_put(task.init_state(True), state_sh), state_sh
  state, step = found
  if jax.process_index() == 0:
    print(f"resuming from {ckpt.directory}/{step}", flush=True)
  return state, state_sh


class Reporter:
  """Progress lines (process 0), metrics.jsonl and TensorBoard."""

  def __init__(self, task, workdir: str):
    self.task, self.main = task, jax.process_index() == 0
    self.writer = logging_utils.MetricWriter(workdir, enabled=self.main)
    device = jax.devices()[0].device_kind
    self.peak = next((v for k, v in PEAK_FLOPS.items() if k in device), None)
    self.headlines: dict = {}
    self.restart()

  def restart(self) -> None:
    """Start a new timing window (after evaluation or figures, which are not steps)."""
    self.t0, self.seen = time.time(), 0

  def train(self, step: int, metrics: dict, data) -> None:
    task = self.task
    dt = time.time() - self.t0
    img_s = self.seen / max(dt, 1e-9)
    lr = float(task.lr(step - 1))
    flops, n_dev = task.flops_per_image, jax.device_count()
    mfu = img_s * flops / (self.peak * n_dev) if self.peak and flops else None
    epoch = step / task.steps_per_epoch
    if self.main:
      eta = (task.total_steps - step) * dt / max(self.seen, 1) * task.batch_size
      line = logging_utils.progress_line(step, task.total_steps, epoch, metrics, lr, img_s,
                                         mfu, eta)
      print(" ".join([line, *self.headlines.values()]), flush=True)
    self.writer.scalars(step, {**metrics, "lr": lr, "img_per_s": img_s, "epoch": epoch,
                               "skipped_images": getattr(data, "skipped", 0)})
    self.restart()

  def evaluation(self, evaluator, step: int, metrics: dict, *, final_only: bool = False) -> None:
    if self.main:
      where = (f"of the weights at step {step}" if final_only else
               f"step {step} ep {step / self.task.steps_per_epoch:.2f}")
      print(f"{evaluator.name} {where}: {evaluator.describe(metrics)}", flush=True)
    head = evaluator.headline(metrics)
    if head:
      self.headlines[evaluator.name] = head
    self.writer.scalars(step, {f"{evaluator.name}/{k}": v for k, v in metrics.items()})


def fit(task, workdir: str) -> int:
  evaluators = task.evaluators()  # their config errors come before anything is written
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    keep=task.config.keep_checkpoints)
  status, report = 0, None
  try:
    if not task.eval_only:
      _check_resumable(task, workdir, ckpt)
    if task.process == 0:
      param_ckpt.write_workdir_card(workdir, {**task.card, "optimizer": task.optimizer_spec})
    state, state_sh = _restore_or_init(task, ckpt)
    report = Reporter(task, workdir)
    if task.eval_only:
      chosen = [ev for ev in evaluators if ev.every]
      if not chosen:
        raise ConfigError(f"eval_only: config.evals lists no evaluator that is on for task "
                          f"{task.config.task!r}")
      for ev in chosen:
        report.evaluation(ev, int(state.step), ev.run(state), final_only=True)
    else:
      status = _train(task, state, state_sh, ckpt, evaluators, report)
  finally:
    ckpt.close()
    if report is not None:
      report.writer.flush()
  task.close()
  return status


def _check_resumable(task, workdir: str, ckpt) -> None:
  """A workdir's checkpoints hold the state of the optimizer they were made
  with; continuing with another cannot restore it."""
  if ckpt.latest_step() is None:
    return
  try:
    was = param_ckpt.read_card(workdir, "").get("optimizer")
  except FileNotFoundError:
    return
  now = task.optimizer_spec
  if was is not None and was != now:
    raise ConfigError(f"{workdir} holds checkpoints of optimizer {was['name']!r} "
                      f"{was['args'] or ''}, this config asks for {now['name']!r} "
                      f"{now['args'] or ''}: set config.optimizer (and optimizer_args) as the "
                      f"workdir's, or start a new workdir with init_from={workdir}")


def _train(task, state, state_sh, ckpt, evaluators, report: Reporter) -> int:
  step = start = int(state.step)
  step_fn, data = task.train_step(state_sh), task.data(start)
  preempt = checkpointing.Preemption()
  if task.process == 0:
    print(f"{task.summary()}; {jax.device_count()} devices, mesh {dict(task.mesh.shape)}, "
          f"{task.steps_per_epoch} steps/epoch, steps {start}..{task.total_steps}", flush=True)
  status, cfg = 0, task.config
  try:
    if start == 0:  # evaluators with first=True: the curve starts at the initialisation
      _evaluate(task, evaluators, report, state, step)
    for batch in data:  # ends after the last epoch
      state, metrics = step_fn(state, batch)
      step += 1
      report.seen += task.batch_size
      if step % cfg.log_every == 0 or step == task.total_steps:
        status = _log(report, step, metrics, data)
        if status:
          break
      if step % cfg.checkpoint_every == 0:
        ckpt.save(step, state)
      task.after_step(state, step, batch, report.writer)
      _evaluate(task, evaluators, report, state, step)
      if preempt.requested(step):
        print(f"SIGTERM: saving step {step} and exiting", flush=True)
        ckpt.save(step, state, force=True)
        status = 143
        break
    if status == 0:
      ckpt.save(step, state, force=True)
      task.at_end(state, step, report.writer)
  finally:
    preempt.restore()
  _report_skips(data)
  return status


def _log(report: Reporter, step: int, metrics, data) -> int:
  """Write a progress line; 3 (stop) when the step was not finite."""
  m = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not m.pop("finite"):
    print(f"step {step}: loss or gradient is not finite (loss {m['loss']}); stopping. "
          f"The last good checkpoint is kept; lower blr or check the data.", flush=True)
    return 3
  report.train(step, m, data)
  return 0


def _evaluate(task, evaluators, report: Reporter, state, step: int) -> None:
  ran = False
  for ev in evaluators:
    if ev.due(step, task.steps_per_epoch, task.total_steps):
      report.evaluation(ev, step, ev.run(state))
      ran = True
  if ran:
    report.restart()


def _report_skips(data) -> None:
  skipped = getattr(data, "skipped", 0)
  if skipped and jax.process_index() == 0:
    print(f"skipped {skipped} undecodable images, e.g. {data.skipped_names[:3]}")
