"""The demo: a tiny SBAM model on the bundled photos, a few minutes on 2 CPU cores.

  python train.py --config configs/demo.py --workdir runs/demo

Writes checkpoints, TensorBoard events, metrics.jsonl and reconstruction
figures (figures/*.png) under the workdir.
"""

from configs import common
from configs import pretrain


def get_config(arg: str = ""):
  del arg
  c = pretrain.get_config("base,sbam")
  c.model = common.model("tiny", img_size=64, patch_size=8)
  c.masking.group = "sample"
  c.random_epochs = 2
  c.data.source = "demo"
  c.batch_size = 32
  c.accum_steps = 1
  c.epochs = 24
  c.warmup_epochs = 2
  c.blr = 1.5e-3
  c.log_every = 15
  c.checkpoint_every = 120
  c.figure_every = 180
  # The representation monitor: k-NN top-1 of the frozen encoder (10 classes,
  # chance 10 %) at the start, after epoch 12 and at the end: 240 of the 480
  # training crops (seeded) against the 160 val crops; ~2 % of the run
  # (benchmarks/bench_monitor.py).
  c.evals.knn = common.knn_monitor(every=12, bank=240, queries=160)
  return c
