"""Fine-tune (or linearly probe) the demo's pre-trained tiny model on the
bundled photos: 10 classes (one per photo), 480 train / 160 val crops.

  python train.py --config configs/demo.py --workdir runs/demo          # pre-train first
  python train.py --config configs/demo_finetune.py --workdir runs/demo_ft
  python train.py --config configs/demo_finetune.py:linprobe --workdir runs/demo_lin
"""

from configs import common
from configs import finetune
from configs import linprobe


def get_config(arg: str = "finetune"):
  task = arg or "finetune"
  c = (linprobe if task == "linprobe" else finetune).get_config("tiny")
  c.model = common.model("tiny", img_size=64, patch_size=8)
  c.init_from = "runs/demo"
  c.data.source = "demo"
  c.batch_size = 32
  c.eval_batch_size = 48      # 160 val images: the last batch is padded
  c.epochs = 10
  c.warmup_epochs = 1
  # 150 steps instead of tens of thousands: larger base learning rates than
  # the ImageNet recipes (LARS moves a weight by ~lr * 0.001 of its norm a step).
  c.blr = 50.0 if task == "linprobe" else 2e-2
  c.log_every = 15
  c.checkpoint_every = 75
  return c
