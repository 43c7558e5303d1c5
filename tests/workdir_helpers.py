"""Reading what a training run left in its workdir (a local folder or a
bucket URL)."""

import atexit
import json
import os
import shutil
import tempfile

from sbam_jax import files

_XLA_CACHE = []


def run_env(args=(), **extra) -> dict:
  """Environment for a train.py / convert subprocess: os.environ + `extra`,
  with one persistent XLA compilation cache shared by the test session's
  single-process runs. Those start the same few programs many times over
  (a run, its resume, a second strategy to compare with), and compiling
  was most of each run's time. Multi-process runs (`--num_processes` or
  `--coordinator_address` in `args`) go without it: with a shared cache,
  multi-process gloo runs on the CPU failed."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", **extra)
  if any(str(a).startswith(("--num_processes", "--coordinator_address")) for a in args):
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env
  if not _XLA_CACHE:
    _XLA_CACHE.append(tempfile.mkdtemp(prefix="sbam-jax-test-xla-"))
    atexit.register(shutil.rmtree, _XLA_CACHE[0], True)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE[0])
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  return env


def metrics(workdir):
  """Every row of <workdir>/metrics.jsonl."""
  text = files.read_text(files.join(str(workdir), "metrics.jsonl"))
  return [json.loads(line) for line in text.splitlines()]


def final_state(workdir):
  """(step, restored TrainState tree) of the workdir's latest checkpoint."""
  import jax
  import orbax.checkpoint as ocp
  ckpt = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
  path = os.path.join(ckpt, str(step), "default")
  reader = ocp.StandardCheckpointer()
  # Onto this process's first device: the run may have saved from several.
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  tree = reader.metadata(path).item_metadata.tree
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree)
  return step, reader.restore(path, target)


def tensorboard_steps(workdir, tag):
  """The sorted steps of every TensorBoard event with `tag` in <workdir>/tensorboard."""
  import tensorflow as tf
  folder = files.join(str(workdir), "tensorboard")
  steps = []
  for name in files.listdir(folder):
    with files.local_copy(files.join(folder, name)) as local:
      for raw in tf.data.TFRecordDataset(local):
        event = tf.compat.v1.Event.FromString(raw.numpy())
        steps += [event.step for v in event.summary.value if v.tag == tag]
  return sorted(steps)
