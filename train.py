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


def init_distributed():
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")):
    jax.distributed.initialize()


def main(argv):
  del argv
  init_distributed()
  from sbam_jax.errors import ConfigError, DataError, WriteError  # pylint: disable=g-import-not-at-top
  from sbam_jax.train import loop  # pylint: disable=g-import-not-at-top
  try:
    status = loop.run(FLAGS.config, FLAGS.workdir, dry_run=FLAGS.dry_run)
  except (ConfigError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    status = 2
  except WriteError as e:
    print(f"error: {e}", file=sys.stderr)
    status = 4
  sys.exit(status)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main, flags_parser=parse_flags)
