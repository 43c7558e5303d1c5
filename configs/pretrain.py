"""MAE / SBM / SBAM pre-training with the reference recipe.

  python train.py --config configs/pretrain.py:large,sbam --workdir runs/sbam_large \
      --config.data.path=/data/imagenet

arg = "<size>,<method>": size base | large | huge; method mae (random
masking) | sbm (salience order, fixed ratio) | sbam (salience + AMR).
Defaults reproduce the seed command: ViT-L, global batch 4096 (= 256 per
device x 8 devices x accumulation 2), 400 epochs, 40 warm-up, blr 1.5e-4,
AdamW (0.9, 0.95), weight decay 0.05, norm-pix loss, mask ratio 0.75, and
the SBAM run continuing a 100-epoch random-masking warm-up
(`random_epochs=100`, or `init_from` a converted checkpoint-99.pth).
"""

import ml_collections

from configs import common

METHODS = {"mae": dict(method="random", ratio_var=0.0),
           "sbm": dict(method="sbam", ratio_var=0.0),
           "sbam": dict(method="sbam")}


def get_config(arg: str = "large,sbam") -> ml_collections.ConfigDict:
  size, method = (arg.split(",") + ["sbam"])[:2]
  if method not in METHODS:
    raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
  c = ml_collections.ConfigDict()
  c.task = "pretrain"
  c.seed = 0
  c.model = common.model(size)
  c.masking = common.masking(**METHODS[method])
  # Random masking for the first `random_epochs` epochs, then `masking` (SBAM's
  # warm-up); 0 = `masking` from the start.
  c.random_epochs = 100 if method != "mae" else 0
  c.data = common.data()
  c.batch_size = 4096         # global images per optimizer step (all devices, all micro-steps)
  c.accum_steps = 2           # micro-steps per optimizer step (--accum_iter)
  c.epochs = 400
  c.warmup_epochs = 40
  c.blr = 1.5e-4              # lr = blr * batch_size / 256
  c.min_lr = 0.0
  c.weight_decay = 0.05
  c.b1 = 0.9
  c.b2 = 0.95
  c.init_from = ""            # converted checkpoint (convert_checkpoints.py): weights, AdamW, epoch
  common.run_control(c)
  c.figure_every = 10000
  c.figure_images = 4
  return c
