"""The generic training loop: any registered task -> jitted steps over its
input pipeline, with checkpoints (resume, pre-emption), logs, and the
evaluators listed in the config. The loop knows only the task protocol
(`task.py`) and the evaluator protocol (`sbam_jax/evals/base.py`); what a
step computes and what an evaluation reports live with them, what the user
reads with `report.py`, the workdir's lock and card with `workdir.py`.

Exit status: 0 done, 2 a user error, 3 a step was not finite, 4 an output
could not be written, 128 + n stopped by signal n (after saving).
"""

from __future__ import annotations

import os
import sys
import time

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from sbam_jax import checkpoints as param_ckpt
from sbam_jax import files, registry, sharding, store
from sbam_jax.errors import ConfigError, DataError, StoreError, WriteError
from sbam_jax.train import checkpointing, report as report_lib, signals
from sbam_jax.train import workdir as workdir_lib


def run(config, workdir: str, *, dry_run: bool = False) -> int:
  """Build the task `config.task` names and run it; returns the exit status.
  A run that fails validation leaves the workdir as it found it."""
  started, main = time.time(), jax.process_index() == 0
  try:
    store.check(workdir)  # (a URL: one line now, not a minute of retries later)
  except StoreError as e:
    raise StoreError(f"--workdir: {e}") from None
  task_cls = registry.lookup("task", config.get("task", "pretrain"), where="task")
  if dry_run:
    return dry(task_cls(config, workdir), workdir, started)
  undo = workdir_lib.Undo(workdir)
  lock = workdir_lib.Lock(workdir)
  run_state = {"committed": False}
  try:
    if main:
      _make_workdir(workdir)
      lock.acquire()
    return fit(task_cls(config, workdir), workdir, lock=lock, started=started,
               run_state=run_state)
  except (ConfigError, DataError):
    if main and not run_state["committed"]:
      lock.release()
      undo()
    raise
  finally:
    lock.release()


def dry(task, workdir: str, started: float) -> int:
  """`--dry_run`: the resolved config, the header and the compiled step's
  per-device memory; reads the data's index, writes nothing."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  abstract, state_sh = _abstract_state(task)
  steps = checkpointing.list_steps(files.join(workdir, "checkpoints"))
  lines = [f"config.{k} = {v!r}" for k, v in _flat(dataclasses.asdict(task.config))]
  lines += report_lib.header_lines(task, abstract.params, workdir, max(steps, default=0))
  t0 = time.time()
  compiled = task.compiled_step(state_sh, checkpointing.abstract_like(abstract, state_sh))
  mem = compiled.memory_analysis()
  if mem is not None:
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)
    lines.append(f"memory   {total / 2**30:.2f} GiB per device for the train step "
                 f"(arguments {mem.argument_size_in_bytes / 2**30:.2f}, outputs "
                 f"{mem.output_size_in_bytes / 2**30:.2f}, temporaries "
                 f"{mem.temp_size_in_bytes / 2**30:.2f}, donated "
                 f"{mem.alias_size_in_bytes / 2**30:.2f}); compiled in {time.time() - t0:.1f} s")
  if jax.process_index() == 0:
    print("\n".join(lines + [f"dry run: nothing trained or written ({time.time() - started:.0f} s)"]),
          flush=True)
  task.close()
  return 0


def _flat(tree: dict, prefix: str = ""):
  for k, v in tree.items():
    if isinstance(v, dict) and v and k not in ("evals", "optimizer_args", "model"):
      yield from _flat(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def _make_workdir(workdir: str) -> None:
  try:
    files.makedirs(workdir)
  except OSError as e:
    raise ConfigError(f"cannot create workdir {workdir}: {e.strerror or e}") from None
  if files.is_remote(workdir):
    return  # (a bucket's permissions show at the first write)
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ConfigError(f"workdir {workdir} is not writable: choose another --workdir")


def _abstract_state(task):
  """(the state's shapes, its shardings): what restoring or compiling needs,
  from shapes only (reads no file)."""
  abstract = jax.eval_shape(lambda: task.init_state(False))
  replicated = NamedSharding(task.mesh, P())
  state_sh = sharding.tree_shardings(task.mesh, abstract).replace(rng=replicated, step=replicated)
  return abstract, state_sh


def _restore_or_init(task, ckpt):
  """(state, its shardings): the workdir's latest checkpoint, else a fresh
  state (reading `init_from`)."""
  abstract, state_sh = _abstract_state(task)
  found = ckpt.restore_latest(checkpointing.abstract_like(abstract, state_sh))  # verified
  if found is None:
    return jax.device_put(task.init_state(True), state_sh), state_sh
  state, step = found
  if jax.process_index() == 0:
    print(f"resuming from {ckpt.directory}/{step}", flush=True)
  return state, state_sh


def fit(task, workdir: str, *, lock=None, started=None, run_state=None) -> int:
  started = started or time.time()
  lock = lock or workdir_lib.Lock(workdir)
  run_state = {} if run_state is None else run_state
  evaluators = task.evaluators()  # their config errors come before anything is written
  ckpt = checkpointing.Checkpointer(files.join(workdir, "checkpoints"),
                                    keep=task.config.keep_checkpoints)
  status, report = 0, None
  try:
    card = {**task.card, "optimizer": task.optimizer_spec, "run": workdir_lib.run_card(task)}
    _check_resumable(task, workdir, ckpt, card)
    state, state_sh = _restore_or_init(task, ckpt)
    report = report_lib.Reporter(task, workdir, started)
    if task.process == 0:
      if not (task.eval_only and files.exists(files.join(workdir, param_ckpt.CARD))):
        param_ckpt.write_workdir_card(workdir, card)  # (evaluating a workdir keeps its card)
      for line in report_lib.header_lines(task, state.params, workdir, int(state.step)):
        report.say(line)
    run_state["committed"] = True
    report.seconds["startup"] = time.time() - started
    if task.eval_only:
      status = _eval_only(task, evaluators, report, state)
    else:
      if task.process == 0:
        report.writer.truncate(int(state.step))  # records past the restored step go
      status = _train(task, state, state_sh, ckpt, evaluators, report, lock)
  finally:
    failing = sys.exc_info()[1] is not None
    ckpt.close()
    if report is not None:
      try:
        report.writer.close()
      except WriteError:
        if not failing:
          raise  # (else the first error is the one to report, not the upload after it)
  task.close()
  return status


def _eval_only(task, evaluators, report, state) -> int:
  chosen = [ev for ev in evaluators if ev.every]
  if not chosen:
    raise ConfigError(f"eval_only: config.evals lists no evaluator that is on for task "
                      f"{task.config.task!r}")
  for ev in chosen:
    report.evaluation(ev, int(state.step), ev.run(state), final_only=True)
  return 0


def _check_resumable(task, workdir: str, ckpt, card: dict) -> None:
  """A workdir's checkpoints hold the state of one model, run and optimizer;
  a config that means another cannot continue them (nothing is written yet)."""
  if ckpt.latest_step() is None:
    return
  try:
    stored = param_ckpt.read_card(workdir, "")
  except FileNotFoundError:
    return
  if task.eval_only:
    stored = {k: v for k, v in stored.items() if k != "run"}
  workdir_lib.check_resume(workdir, stored, card, task.config.resume_override)
  was, now = stored.get("optimizer"), task.optimizer_spec
  if task.eval_only:
    return
  if was is not None and was != now:
    raise ConfigError(f"{workdir} holds checkpoints of optimizer {was['name']!r} "
                      f"{was['args'] or ''}, this config asks for {now['name']!r} "
                      f"{now['args'] or ''}: set config.optimizer (and optimizer_args) as the "
                      f"workdir's, or start a new workdir with init_from={workdir}")


def _train(task, state, state_sh, ckpt, evaluators, report, lock) -> int:
  step = start = int(state.step)
  step_fn, data = task.train_step(state_sh), task.data(start)
  preempt = signals.Preemption()
  status, cfg = 0, task.config
  try:
    if start == 0:  # evaluators with first=True: the curve starts at the initialisation
      _evaluate(task, evaluators, report, state, step)
    for batch in data:  # ends after the last epoch
      if step == start:
        state, metrics = _first_step(report, step_fn, state, batch)
      else:
        state, metrics = step_fn(state, batch)
        report.stepped(task.batch_size)
      step += 1
      if report.line_due(step, cfg.log_every, cfg.log_seconds):
        status = _log(report, step, metrics, data, state, ckpt)
        lock.heartbeat()
        if status:
          break
      if step % cfg.checkpoint_every == 0:
        status = _save(report, ckpt, step, state)
        if status:
          break
      if task.has_side_output(step):
        with report.side("figures", state):
          task.after_step(state, step, batch, report.writer)
      else:
        task.after_step(state, step, batch, report.writer)
      _evaluate(task, evaluators, report, state, step)
      if preempt.requested(step):
        print(f"{signals.name(preempt.signal)}: saving step {step} and exiting", flush=True)
        status = _save(report, ckpt, step, state, force=True) or preempt.exit_status
        break
    if status == 0:
      status = _save(report, ckpt, step, state, force=True)
    if status == 0:
      with report.side("figures", state):
        task.at_end(state, step, report.writer)
    with report.side("checkpoint", state):
      ckpt.wait()  # the summary names committed files only (a save may still be writing)
  finally:
    preempt.restore()
  _report_skips(data, report)
  report.summary(step, status)
  return status


def _first_step(report, step_fn, state, batch):
  """The first step compiles: say so, and time it apart from training."""
  report.say("compiling the train step (the first step includes compilation) ...")
  t0 = time.time()
  state, metrics = step_fn(state, batch)
  jax.block_until_ready(state)
  report.seconds["compile"] += time.time() - t0
  report.say(f"compiled and ran the first step in {time.time() - t0:.1f} s")
  report.training()
  return state, metrics


def _halted(report, state, ckpt) -> int:
  """3 (stop) with a message when a step was not finite (`step.py` marks the
  state with -n), else 0."""
  s = int(jax.device_get(state.step))
  if s >= 0:
    return 0
  last = ckpt.latest_step()
  report.say(f"step {-s}: loss or gradient is not finite; stopping. The state was not "
             f"updated by step {-s}; the last good checkpoint is "
             f"{'step ' + str(last) if last is not None else 'none (no save yet)'}: lower blr, "
             f"check the data, then resume from it")
  return 3


def _log(report, step: int, metrics, data, state, ckpt) -> int:
  """A progress line, or 3 (stop) when a step since the last one was not finite."""
  m = {k: float(v) for k, v in jax.device_get(metrics).items()}
  m.pop("finite", None)
  status = _halted(report, state, ckpt)
  if not status:
    report.train(step, m, data, state)
  return status


def _save(report, ckpt, step: int, state, *, force: bool = False) -> int:
  """Save `state` as `step` unless a step was not finite (never a checkpoint
  whose name is not its step)."""
  with report.side("checkpoint", state):
    status = _halted(report, state, ckpt)
    if not status:
      ckpt.save(step, state, force=force)
  return status


def _evaluate(task, evaluators, report, state, step: int) -> None:
  due = [ev for ev in evaluators if ev.due(step, task.steps_per_epoch, task.total_steps)]
  if due:
    with report.side("eval", state):
      for ev in due:
        report.evaluation(ev, step, ev.run(state))


def _report_skips(data, report) -> None:
  skipped = getattr(data, "skipped", 0)
  if skipped:
    report.say(f"skipped {skipped} undecodable images, e.g. {data.skipped_names[:3]}")
