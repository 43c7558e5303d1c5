"""The seed's quick start: continue a converted PyTorch training checkpoint.

MAE's learning-rate rule is checked against its `adjust_learning_rate`
written out here, and train.py started from a converted checkpoint-1.pth must
begin at (epoch + 1) * steps_per_epoch with that rule's learning rate.
"""

import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from sbam_jax.models import model_config
from sbam_jax.train import schedule
from torch_reference import TorchMAE
from workdir_helpers import run_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def adjust_learning_rate(epoch, lr, min_lr, warmup_epochs, epochs):
  """MAE util/lr_sched.py, for a fractional epoch."""
  if epoch < warmup_epochs:
    return lr * epoch / warmup_epochs
  return min_lr + (lr - min_lr) * 0.5 * (
      1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


@pytest.mark.parametrize("step", [0, 1, 7, 149, 150, 151, 999, 5999])
def test_schedule_matches_mae(step):
  kw = dict(lr=1.5e-4 * 4096 / 256, min_lr=1e-6, warmup_epochs=10, epochs=40)
  got = float(schedule.mae_lr(step, steps_per_epoch=150, **kw))
  want = adjust_learning_rate(step / 150, **kw)
  assert got == pytest.approx(want, rel=1e-5, abs=1e-12)


def test_train_continues_a_converted_pytorch_checkpoint(tmp_path):
  cfg = model_config("tiny", img_size=64, patch_size=8)
  ref = TorchMAE.from_config(cfg)
  named = dict(ref.named_parameters())
  no_decay = [n for n, p in named.items() if p.requires_grad and (p.ndim == 1 or n.endswith(".bias"))]
  decay = [n for n, p in named.items() if p.requires_grad and n not in no_decay]
  opt = torch.optim.AdamW([{"params": [named[n] for n in no_decay], "weight_decay": 0.0},
                           {"params": [named[n] for n in decay], "weight_decay": 0.05}],
                          lr=1e-4, betas=(0.9, 0.95))
  for p in ref.parameters():
    if p.requires_grad:
      p.grad = torch.randn_like(p) * 1e-3
  opt.step()
  src = tmp_path / "checkpoint-1.pth"
  torch.save({"model": ref.state_dict(), "optimizer": opt.state_dict(), "epoch": 1,
              "args": argparse.Namespace(epochs=6)}, src)
  env = run_env(SBAM_JAX_CACHE=str(tmp_path / "cache"))
  conv = subprocess.run([sys.executable, "convert_checkpoints.py", "to-jax", str(src),
                         str(tmp_path / "warm")], cwd=ROOT, env=env, capture_output=True,
                        text=True)
  assert conv.returncode == 0, conv.stdout + conv.stderr
  work = tmp_path / "run"
  out = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/demo.py", "--workdir", str(work),
       f"--config.init_from={tmp_path / 'warm'}", "--config.epochs=4",
       "--config.warmup_epochs=1", "--config.random_epochs=0", "--config.log_every=1",
       "--config.checkpoint_every=1000", "--config.figure_every=1000",
       "--config.evals.knn.every=0"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  steps_per_epoch = 480 // 32
  assert f"steps {2 * steps_per_epoch}..{4 * steps_per_epoch} (from epoch 2.00)" in out.stdout
  with open(work / "metrics.jsonl") as f:
    first = json.loads(f.readline())
  assert first["step"] == 2 * steps_per_epoch + 1
  want = adjust_learning_rate(2.0, 3e-2 * 32 / 256, 0.0, 1, 4)  # configs/demo.py's blr
  assert first["lr"] == pytest.approx(want, rel=1e-5)
