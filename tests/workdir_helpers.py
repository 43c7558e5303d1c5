"""Reading what a training run left in its workdir."""

import json
import os


def metrics(workdir):
  """Every row of <workdir>/metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def final_state(workdir):
  """(step, restored TrainState tree) of the workdir's latest checkpoint."""
  import orbax.checkpoint as ocp
  ckpt = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
  return step, ocp.StandardCheckpointer().restore(os.path.join(ckpt, str(step), "default"))


def tensorboard_steps(workdir, tag):
  """The sorted steps of every TensorBoard event with `tag` in <workdir>/tensorboard."""
  import tensorflow as tf
  folder = os.path.join(workdir, "tensorboard")
  steps = []
  for name in os.listdir(folder):
    for raw in tf.data.TFRecordDataset(os.path.join(folder, name)):
      event = tf.compat.v1.Event.FromString(raw.numpy())
      steps += [event.step for v in event.summary.value if v.tag == tag]
  return sorted(steps)
