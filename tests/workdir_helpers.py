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
