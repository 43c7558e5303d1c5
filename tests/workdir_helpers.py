"""Reading what a training run left in its workdir (a local folder or a
bucket URL)."""

import json
import os

from sbam_jax import files


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
