"""Fine-tuning with MAE's recipe (main_finetune.py / FINETUNE.md).

  python train.py --config configs/finetune.py:base --workdir runs/ft_base \
      --config.init_from=ckpt/mae_pretrain_base --config.data.path=/data/imagenet

arg = base | large | huge. Global batch 1024, AdamW (0.9, 0.999), weight decay
0.05, layer-wise lr decay, drop-path, 5 warm-up epochs then cosine to 1e-6,
label smoothing 0.1, mixup 0.8 / cutmix 1.0 (prob 1, switch 0.5), RandAugment
rand-m9-mstd0.5-inc1, random erasing 0.25, global pool; evaluation every
epoch on the val split (resize 256 + centre crop 224). `init_from`: a
converted checkpoint or a pre-training workdir of this project.
Evaluate a fine-tuned checkpoint only (MAE's --eval):
  python train.py --config configs/finetune.py:base --workdir runs/eval_base \
      --config.eval_only=True --config.init_from=ckpt/mae_finetuned_base
"""

import ml_collections

from configs import common

RECIPES = {  # blr, layer_decay, drop_path, epochs
    "base": (5e-4, 0.65, 0.1, 100),
    "large": (1e-3, 0.75, 0.2, 50),
    "huge": (1e-3, 0.75, 0.3, 50),
    "tiny": (1e-3, 0.75, 0.1, 10),
}


def get_config(arg: str = "base") -> ml_collections.ConfigDict:
  size = arg or "base"
  if size not in RECIPES:
    raise ValueError(f"size must be one of {sorted(RECIPES)}, got {size!r}")
  blr, layer_decay, drop_path, epochs = RECIPES[size]
  c = ml_collections.ConfigDict()
  c.task = "finetune"
  c.seed = 0
  c.model = common.model(size)
  c.num_classes = 0           # 0 = the number of classes in the data (1000 for ImageNet)
  c.global_pool = True        # mean of patch tokens + fc_norm; False = cls token + norm
  c.drop_path = drop_path
  c.init_from = ""            # pre-trained weights (--finetune of the reference)
  c.eval_only = False         # evaluate init_from (or the workdir's checkpoint) and exit (--eval)
  c.data = common.data()
  c.batch_size = 1024         # global (--batch_size x GPUs x --accum_iter)
  c.accum_steps = 1
  c.eval_batch_size = 1024
  c.epochs = epochs
  c.warmup_epochs = 5
  c.blr = blr                 # lr = blr * batch_size / 256
  c.min_lr = 1e-6
  c.weight_decay = 0.05
  c.b1 = 0.9
  c.b2 = 0.999
  c.layer_decay = layer_decay
  c.smoothing = 0.1
  c.mixup = ml_collections.ConfigDict(dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0,
                                           switch_prob=0.5))
  c.rand_augment = "rand-m9-mstd0.5-inc1"   # '' = off
  c.reprob = 0.25             # random erasing probability
  c.eval_every = 1            # epochs
  common.run_control(c)
  return c
