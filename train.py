"""Pre-train MAE / SBM / SBAM.

  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config configs/pretrain.py:large,sbam --workdir runs/sbam_l \
      --config.data.path=/data/imagenet [--config.key=value ...]

Multi-host: on TPU pods and SLURM `jax.distributed.initialize()` finds its
peers; elsewhere pass --coordinator_address, --num_processes, --process_id.
Re-running with the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file, `path.py[:arg]`", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, logs and figures go here")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host)")
flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
flags.DEFINE_integer("process_id", None, "this process's index (multi-host)")
flags.mark_flags_as_required(["config", "workdir"])


def init_distributed():
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")):
    jax.distributed.initialize()


def main(argv):
  del argv
  init_distributed()
  from sbam_jax.errors import ConfigError, DataError  # pylint: disable=g-import-not-at-top
  from sbam_jax.train import loop  # pylint: disable=g-import-not-at-top
  try:
    status = loop.run(FLAGS.config, FLAGS.workdir)
  except (ConfigError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    status = 2
  sys.exit(status)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main)
