"""Pre-train MAE / SBM / SBAM.

  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config configs/pretrain.py:large,sbam --workdir runs/sbam_l \
      --config.data.path=/data/imagenet [--config.key=value ...]

Multi-host: on TPU pods and SLURM `jax.distributed.initialize()` finds its
peers; elsewhere pass --coordinator_address, --num_processes, --process_id.
Re-running with the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import ast
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file, `path.py[:arg]`", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, logs and figures go here")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host)")
flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
flags.DEFINE_integer("process_id", None, "this process's index (multi-host)")
flags.DEFINE_bool("dry_run", False, "print the resolved config, the run's header and the "
                  "train step's memory per device; train and write nothing")
flags.DEFINE_integer("distributed_timeout", 300, "seconds a process waits for all processes "
                     "of a multi-process run to join before it stops with an error")
flags.mark_flags_as_required(["config", "workdir"])


def _last_line(error: BaseException) -> str:
  """The line of an exception's text that says what is wrong (config-file
  errors arrive with a whole traceback inside their message, key errors as a
  quoted repr)."""
  text = str(error)
  while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    try:
      text = str(ast.literal_eval(text))
    except (ValueError, SyntaxError):
      break
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if len(lines) > 1 and lines[-1].lower().startswith("did you mean"):
    return f"unknown key {lines[-2]}; {lines[-1]}"
  return lines[-1] if lines else type(error).__name__


def parse_flags(argv):
  """absl's flag parsing, but a config file that cannot be loaded, an override
  of a key that does not exist or a value of the wrong type is one line on
  stderr (exit 2), not a traceback."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.get("task")  # a broken config file only raises when first read
    return rest
  except (flags.Error, OSError, AttributeError, KeyError, TypeError, ValueError, ImportError,
          SyntaxError) as e:
    line = _last_line(e)
    key = line.split("'")[1] if line.startswith("unknown key '") else None
    named = [a.split("=")[0] for a in argv[1:]
             if a.startswith("--config.") and key and key in a.split("=")[0]]
    names_a_flag = "flag --" in line or "command line flag" in line
    where = named[0] if named else ("" if names_a_flag else "--config")
    print(f"error: {where + ': ' if where else ''}{line}", file=sys.stderr)
    sys.exit(2)


CLUSTER_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def _fail(line: str):
  print(f"error: {line}", file=sys.stderr, flush=True)
  os._exit(2)  # pylint: disable=protected-access


def _timed_out(address: str, process, count, timeout: int) -> str:
  """What a start-up that timed out tells the user to check."""
  import socket  # pylint: disable=g-import-not-at-top
  if not address:
    return (f"the processes of this job did not all join within {timeout} s (coordinator found "
            f"from {', '.join(k for k in CLUSTER_ENV if k in os.environ)}); check that every "
            f"process started, or raise --distributed_timeout")
  if process == 0:
    who, state = f"{count - 1} other process{'es' * (count != 2)}", "the coordinator"
  else:
    host, _, port = address.rpartition(":")
    try:
      socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
      state = "the coordinator answers, so another process is missing"
    except (OSError, ValueError):
      state = "nothing answers at that address"
    who = "the coordinator (process 0)"
  return (f"timed out after {timeout} s waiting for {who} at {address} (this is process "
          f"{process} of {count}, {state}): check that all {count} processes were started with "
          f"--coordinator_address={address} --num_processes={count} and distinct --process_id "
          f"0..{count - 1}, that process 0 runs on that host and its port is reachable from "
          f"every host, or raise --distributed_timeout")


def _port_taken(address: str) -> bool:
  """Whether something already listens on the coordinator's port here (XLA
  crashes with a segmentation fault when it cannot bind it)."""
  import socket  # pylint: disable=g-import-not-at-top
  try:
    port = int(address.rpartition(":")[2])
  except ValueError:
    return False
  with socket.socket() as sock:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      sock.bind(("", port))
    except OSError:
      return True
  return False


def init_distributed():
  """Join a multi-process run, saying at once whom this process waits for.

  jax.distributed.initialize blocks until every process has joined; when its
  `initialization_timeout` runs out, XLA aborts the process with a C++ stack
  trace. A watchdog thread ends the wait first (at --distributed_timeout
  seconds; jax's own deadline is set a little later as a backstop) with one
  `error:` line and exit status 2."""
  import threading  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  address, count, process = FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
  auto = any(k in os.environ for k in CLUSTER_ENV)
  if not address and not auto:
    return
  timeout = FLAGS.distributed_timeout
  if timeout < 1:
    _fail(f"--distributed_timeout={timeout}: must be >= 1 (seconds)")
  if address and (count is None or process is None):
    _fail("--coordinator_address needs --num_processes and --process_id")
  if address and not (count >= 1 and 0 <= process < count):
    _fail(f"--process_id={process} must be in [0, --num_processes={count})")
  if address and process == 0 and _port_taken(address):
    _fail(f"cannot start the coordinator at {address}: its port is in use on this host (another "
          f"run, or a process of an earlier one still alive?); stop that process or pick "
          f"another port in --coordinator_address")
  if not address:
    print(f"waiting for the other processes of this job (found from the environment; "
          f"timeout {timeout} s)", flush=True)
  elif process == 0:
    print(f"waiting for {count - 1} peer{'s' * (count != 2)} at {address} (process 0 of "
          f"{count}, timeout {timeout} s)", flush=True)
  else:
    print(f"waiting for the coordinator at {address} (process {process} of {count}, timeout "
          f"{timeout} s)", flush=True)
  watchdog = threading.Timer(timeout, lambda: _fail(_timed_out(address, process, count,
                                                               timeout)))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(address, count, process, initialization_timeout=timeout + 10)
  except (RuntimeError, ValueError) as e:
    _fail(f"could not join the multi-process run at {address or 'the address jax found'}: "
          f"{str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}")
  finally:
    watchdog.cancel()


def main(argv):
  del argv
  init_distributed()
  from sbam_jax.errors import ConfigError, DataError, StoreError, WriteError  # pylint: disable=g-import-not-at-top
  from sbam_jax.train import loop  # pylint: disable=g-import-not-at-top
  try:
    status = loop.run(FLAGS.config, FLAGS.workdir, dry_run=FLAGS.dry_run)
  except WriteError as e:  # (a failed checkpoint save is one too)
    print(f"error: {e}", file=sys.stderr)
    status = 4
  except (ConfigError, DataError, StoreError) as e:
    print(f"error: {e}", file=sys.stderr)
    status = 2
  sys.exit(status)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main, flags_parser=parse_flags)
