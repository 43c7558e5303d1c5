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
Every key and its default: sbam_jax/train/pretrain.py (PretrainConfig).
"""

import ml_collections

from configs import common
from sbam_jax import config as config_lib
from sbam_jax.train.pretrain import PretrainConfig

METHODS = {"mae": dict(method="random", ratio_var=0.0),
           "sbm": dict(method="sbam", ratio_var=0.0),
           "sbam": dict(method="sbam")}


def get_config(arg: str = "large,sbam") -> ml_collections.ConfigDict:
  size, method = (arg.split(",") + ["sbam"])[:2]
  if method not in METHODS:
    raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
  c = config_lib.defaults(PretrainConfig)
  c.model = common.model(size)
  c.masking = common.masking(**METHODS[method])
  # Each device's kept tokens packed into one of 20 token budgets: the encoder
  # computes at most ~5 % more tokens than are kept, where 'max' (the library
  # default, kept by the demo: its tiny model compiles longer than it trains)
  # pads every image to the largest keep length (+17 % step FLOPs for ViT-B at
  # the end of training). Fixed-ratio methods keep a fixed number: no effect.
  c.masking.capacity = "packed"
  c.random_epochs = 100 if method != "mae" else 0
  # k-NN top-1 of the frozen encoder every 20 epochs: 10k training images
  # against 5k of the eval split (a forward pass of 15k images, well under
  # 1 % of 20 epochs of training). Off: --config.evals.knn.every=0.
  c.evals.knn = common.knn_monitor(every=20, bank=10_000, queries=5_000)
  return c
