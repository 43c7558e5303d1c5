"""Linear probing with MAE's recipe (main_linprobe.py / LINPROBE.md).

  python train.py --config configs/linprobe.py:base --workdir runs/lin_base \
      --config.init_from=ckpt/mae_pretrain_base --config.data.path=/data/imagenet

arg = base | large | huge. Frozen encoder, cls-token feature (after the
encoder's final norm), BatchNorm without affine + Linear (std 0.01), LARS
(momentum 0.9, trust 0.001), blr 0.1, no weight decay, global batch 16384,
10 warm-up epochs then cosine to 0, 90 epochs (base) or 50 (large, huge);
RandomResizedCrop + flip, no mixup / smoothing / erasing.
"""

import ml_collections

from configs import finetune

EPOCHS = {"base": 90, "large": 50, "huge": 50, "tiny": 10}


def get_config(arg: str = "base") -> ml_collections.ConfigDict:
  size = arg or "base"
  c = finetune.get_config(size)
  c.task = "linprobe"
  c.global_pool = False
  c.drop_path = 0.0
  c.batch_size = 16384
  c.epochs = EPOCHS[size]
  c.warmup_epochs = 10
  c.blr = 0.1
  c.min_lr = 0.0
  c.weight_decay = 0.0
  c.layer_decay = 1.0         # unused by LARS
  c.smoothing = 0.0
  c.mixup.prob = 0.0
  c.rand_augment = ""
  c.reprob = 0.0
  return c
