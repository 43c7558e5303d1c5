"""The demo: a tiny SBAM model on the bundled photos, about two minutes on 2 CPU cores.

  python train.py --config configs/demo.py --workdir runs/demo

Writes checkpoints, TensorBoard events, metrics.jsonl and figures under the
workdir: figures/step_*.png (reconstruction sheets), figures/progress.png
(the same images across the run) and figures/metrics.png (at the end).

Chosen so the reconstructions show the photos' colours and large shapes
after 600 steps: the loss is on pixels (no norm-pix: the figure shows what
the model predicts, not a per-patch normalised guess de-normalised with
borrowed statistics) and the learning rate is 20x the ImageNet recipe's base
rate, as 600 steps are all there is. A wider decoder (128, 2 blocks) cleans
up the visible patches' reconstruction but costs ~6x a step and hardly
changes the hidden patches' predictions, so the tiny size's is kept.
"""

from configs import common
from configs import pretrain


def get_config(arg: str = ""):
  del arg
  c = pretrain.get_config("base,sbam")
  c.model = common.model("tiny", img_size=64, patch_size=8, norm_pix_loss=False)
  c.masking.group = "sample"
  c.random_epochs = 2
  c.data.source = "demo"
  c.batch_size = 32
  c.accum_steps = 1
  c.epochs = 40
  c.warmup_epochs = 2
  c.blr = 3e-2
  c.log_every = 15
  c.checkpoint_every = 300
  c.figure_every = 120
  # The representation monitor: k-NN top-1 of the frozen encoder (10 classes,
  # chance 10 %) at the start, after epoch 20 and at the end: 240 of the 480
  # training crops (seeded) against the 160 val crops; ~2 % of the run
  # (benchmarks/bench_monitor.py).
  c.evals.knn = common.knn_monitor(every=20, bank=240, queries=160)
  return c
