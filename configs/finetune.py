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
Every key and its default: sbam_jax/train/classify.py (ClassifyConfig).
"""

import ml_collections

from configs import common
from sbam_jax import config as config_lib
from sbam_jax.train.classify import ClassifyConfig

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
  c = config_lib.defaults(ClassifyConfig)
  c.blr, c.layer_decay, c.drop_path, c.epochs = RECIPES[size]
  c.model = common.model(size)
  return c
