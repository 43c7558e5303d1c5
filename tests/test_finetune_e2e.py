"""train.py end to end for the classification tasks: the demo pre-train, then
fine-tuning and linear probing on the bundled photos (10 classes), and the
eval-only mode reproducing the fine-tune's final numbers."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from sbam_jax import checkpoints
from workdir_helpers import metrics, run_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(config, workdir, cache, *overrides):
  env = run_env(overrides, SBAM_JAX_CACHE=cache, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
         os.path.join(ROOT, "configs", config), "--workdir", str(workdir), *overrides]
  return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def train(config, workdir, cache, *overrides):
  proc = launch(config, workdir, cache, *overrides)
  out = proc.communicate(timeout=600)[0]
  return proc.returncode, out


def evals(workdir):
  return [r for r in metrics(workdir) if "eval/top1" in r]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("cache"))
  workdir = tmp_path_factory.mktemp("pre")
  code, out = train("demo.py", workdir, cache, "--config.epochs=4", "--config.warmup_epochs=1",
                    "--config.random_epochs=1", "--config.figure_every=1000",
                    "--config.evals.knn.every=0")
  assert code == 0, out
  return str(workdir), cache


@pytest.fixture(scope="module")
def finetuned(pretrained, tmp_path_factory):
  pre, cache = pretrained
  ft = tmp_path_factory.mktemp("ft")
  code, out = train("demo_finetune.py", ft, cache, f"--config.init_from={pre}")
  assert code == 0, out
  return ft, out


def test_finetune_learns_and_eval_only_reproduces_it(pretrained, finetuned, tmp_path):
  _, cache = pretrained
  ft, out = finetuned
  assert "initialised fresh: fc_norm, head" in out
  assert "layer-wise lr scales: blocks.0 0.5625, blocks.1 0.75" in out
  rows = evals(ft)
  assert len(rows) == 10 and all(r["eval/count"] == 160 for r in rows)  # every epoch, every image
  final = rows[-1]
  assert final["eval/top1"] >= 40.0, rows  # 10 classes: chance is 10 %
  table = open(ft / "param_groups.txt").read()
  assert "pos_embed" in table and "wd=no" in table

  # MAE's --eval: a fresh workdir evaluating the fine-tuned run's weights.
  ev = tmp_path / "eval"
  code, out = train("demo_finetune.py", ev, cache, "--config.eval_only=True",
                    f"--config.init_from={ft}")
  assert code == 0, out
  again = evals(ev)[-1]
  assert again["eval/count"] == 160
  assert again["eval/top1"] == final["eval/top1"] and again["eval/top5"] == final["eval/top5"]
  assert again["eval/loss"] == pytest.approx(final["eval/loss"], rel=1e-6)
  # ... and in its own workdir (the latest checkpoint), as --eval --resume.
  code, out = train("demo_finetune.py", ft, cache, "--config.eval_only=True")
  assert code == 0 and f"top-1 {final['eval/top1']:.3f}%" in out, out


def test_linear_probe_keeps_the_encoder_bit_identical(pretrained, tmp_path):
  pre, cache = pretrained
  lin = tmp_path / "lin"
  code, out = train("demo_finetune.py:linprobe", lin, cache, f"--config.init_from={pre}",
                    "--config.epochs=5")
  assert code == 0, out
  assert "2 trainable tensors" in out
  before, _ = checkpoints.load_weights(pre)
  after, card = checkpoints.load_weights(str(lin))
  assert card["kind"] == "linprobe"
  for key in ("blocks", "cls_token", "patch_embed", "pos_embed", "norm"):
    for a, b in zip(_leaves(after["encoder"][key]), _leaves(before["encoder"][key])):
      np.testing.assert_array_equal(a, b)
  assert evals(lin)[-1]["eval/top1"] >= 30.0


def _leaves(tree):
  if isinstance(tree, dict):
    for k in sorted(tree):
      yield from _leaves(tree[k])
  else:
    yield tree


@pytest.mark.parametrize("overrides,message", [
    (["--config.mixup.prob=1.0"], "unset: mixup"),
    (["--config.eval_batch_size=0"], "eval_batch_size 0"),
    (["--config.init_from=/nonexistent"], "init_from: /nonexistent is neither"),
])
def test_bad_classification_configs_fail_clearly(pretrained, tmp_path, overrides, message):
  _, cache = pretrained
  code, out = train("demo_finetune.py:linprobe", tmp_path / "bad", cache, *overrides)
  assert code == 2 and message in out, out


def test_eval_only_without_weights_fails_clearly(pretrained, tmp_path):
  _, cache = pretrained
  code, out = train("demo_finetune.py", tmp_path / "none", cache, "--config.eval_only=True",
                    "--config.init_from=")
  assert code == 2 and "eval_only needs init_from" in out, out


def test_two_processes_evaluate_the_split_exactly_once(pretrained, finetuned, tmp_path):
  import socket
  _, cache = pretrained
  ft, _ = finetuned
  final = evals(ft)[-1]
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [launch("demo_finetune.py", tmp_path / "ev2", cache, "--config.eval_only=True",
                  f"--config.init_from={ft}", f"--coordinator_address=127.0.0.1:{port}",
                  "--num_processes=2", f"--process_id={i}") for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  got = evals(tmp_path / "ev2")[-1]  # 160 images, 2 x 24 per batch: 32 padding slots
  assert got["eval/count"] == 160
  assert got["eval/top1"] == final["eval/top1"] and got["eval/top5"] == final["eval/top5"]
  assert got["eval/loss"] == pytest.approx(final["eval/loss"], rel=1e-5)


def test_a_finetune_workdir_exports_to_pytorch(finetuned, tmp_path):
  """to-torch reads a training workdir; the reference ViT loads it strictly
  and computes the same logits."""
  import jax
  import torch
  from flax import nnx
  sys.path.insert(0, ROOT)
  import convert_checkpoints as cli
  from sbam_jax.models import VisionTransformer, model_config
  from sbam_jax.data import device as device_ops
  from torch_reference import TorchViT
  ft, _ = finetuned
  out_pth = str(tmp_path / "ft.pth")
  assert cli.main(["to-torch", str(ft), out_pth]) == 0
  cfg = model_config("tiny", img_size=64, patch_size=8)
  ref = TorchViT(64, 8, cfg.embed_dim, cfg.depth, cfg.num_heads, 10, global_pool=True)
  ref.load_state_dict(torch.load(out_pth, weights_only=True)["model"], strict=True)
  weights, _ = checkpoints.load_weights(str(ft))
  model = VisionTransformer(cfg, 10, rngs=nnx.Rngs(0))
  checkpoints.load_into(model, weights)
  imgs = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3)).astype(np.uint8)
  x = np.asarray(device_ops.normalize(imgs))
  want = ref(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).detach().numpy()
  got = np.asarray(jax.device_get(model(x)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # The Python API: the workdir as a ready model, its architecture from the card.
  loaded = checkpoints.load_model(str(ft))
  # (execution options such as dtype='auto' are kept as the run asked for them)
  arch = lambda c: {k: v for k, v in dataclasses.asdict(c).items()
                    if k not in ("dtype", "attention", "scan_layers", "remat")}
  assert isinstance(loaded.model, VisionTransformer) and arch(loaded.config) == arch(cfg)
  np.testing.assert_allclose(np.asarray(loaded.model(x)), want, rtol=1e-4, atol=1e-5)
