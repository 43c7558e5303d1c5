"""Values outside their meaningful range are refused: one ConfigError line
naming the key, the value and the allowed range; the edges of each range
are accepted. The table below is the specification, written out by hand."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from sbam_jax import config as C
from sbam_jax.train import classify, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import demo, demo_finetune  # noqa: E402

# key: (task, values refused, values accepted, the range as the message states it)
RANGES = {
    "seed": ("pretrain", [-1], [0], ">= 0"),
    "batch_size": ("pretrain", [0, -32], [], ">= 1"),
    "accum_steps": ("pretrain", [0], [1], ">= 1"),
    "epochs": ("pretrain", [0], [3], ">= 1"),
    "warmup_epochs": ("pretrain", [-1], [0, 24], ">= 0"),
    "blr": ("pretrain", [0.0, -1e-3], [1e-9], "> 0"),
    "min_lr": ("pretrain", [-1e-6], [0.0], ">= 0"),
    "weight_decay": ("pretrain", [-0.05], [0.0], ">= 0"),
    "b1": ("pretrain", [1.0, -0.1], [0.0], "in [0, 1)"),
    "b2": ("pretrain", [1.0], [0.999], "in [0, 1)"),
    "log_every": ("pretrain", [0], [1], ">= 1"),
    "checkpoint_every": ("pretrain", [0], [1], ">= 1"),
    "keep_checkpoints": ("pretrain", [0], [1], ">= 1"),
    "mesh.fsdp": ("pretrain", [0], [1], ">= 1"),
    "data.threads": ("pretrain", [-1], [0], ">= 0"),
    "masking.mask_ratio": ("pretrain", [0.0, 1.0, 1.2], [0.5], "in (0, 1)"),
    "masking.ratio_var": ("pretrain", [-0.1], [0.0], "in [0, 1)"),
    "masking.delta": ("pretrain", [-0.01, 1.5], [0.0, 1.0], "in [0, 1]"),
    "masking.num_buckets": ("pretrain", [0], [1], ">= 1"),
    "random_epochs": ("pretrain", [-1], [0], ">= 0"),
    "figure_every": ("pretrain", [0], [1], ">= 1"),
    "figure_images": ("pretrain", [0], [1], ">= 1"),
    "num_classes": ("finetune", [-1], [0], ">= 0"),
    "drop_path": ("finetune", [1.0, -0.1], [0.0, 0.99], "in [0, 1)"),
    "layer_decay": ("finetune", [0.0, 1.5], [1.0], "in (0, 1]"),
    "smoothing": ("finetune", [1.0, -0.1], [0.0], "in [0, 1)"),
    "reprob": ("finetune", [1.5], [0.0, 1.0], "in [0, 1]"),
    "eval_every": ("finetune", [0], [1], ">= 1"),
    "mixup.mixup_alpha": ("finetune", [-0.5], [0.0], ">= 0"),
    "mixup.cutmix_alpha": ("finetune", [-1.0], [0.0], ">= 0"),
    "mixup.prob": ("finetune", [1.5, -0.1], [0.0, 1.0], "in [0, 1]"),
    "mixup.switch_prob": ("finetune", [2.0], [1.0], "in [0, 1]"),
}
CASES = [(k, v, text) for k, (_, bad, _, text) in RANGES.items() for v in bad]
EDGES = [(k, v) for k, (_, _, good, _) in RANGES.items() for v in good]


def parsed(key: str, value):
  """Parse the task's demo config with `key` set to `value`."""
  task = RANGES[key][0] if key in RANGES else "pretrain"
  c = demo.get_config() if task == "pretrain" else demo_finetune.get_config(task)
  *sections, name = key.split(".")
  section = c
  for s in sections:
    section = section[s]
  section[name] = value
  schema = pretrain.PretrainConfig if task == "pretrain" else classify.ClassifyConfig
  return C.parse(schema, c)


@pytest.mark.parametrize("key,value,text", CASES)
def test_out_of_range_values_are_one_line_naming_key_value_range(key, value, text):
  with pytest.raises(C.ConfigError) as e:
    parsed(key, value)
  message = str(e.value)
  assert message.startswith(f"{key} = {value!r} is outside its range: it must be {text}"), message
  assert "\n" not in message


@pytest.mark.parametrize("key,value", EDGES)
def test_values_at_the_edges_of_a_range_are_accepted(key, value):
  cfg = parsed(key, value)
  section = cfg
  for s in key.split("."):
    section = getattr(section, s)
  assert section == value


@pytest.mark.parametrize("key,value,text", [
    ("model.patch_size", 0, ">= 1"), ("model.depth", 0, ">= 1"), ("model.num_heads", -2, ">= 1"),
    ("model.decoder_depth", 0, ">= 1"), ("model.mlp_ratio", 0.0, "> 0"),
    ("model.decoder_mlp_ratio", -1.0, "> 0"), ("model.in_chans", 0, ">= 1"),
    ("model.img_size", 60, "a multiple of patch_size (8)"),
])
def test_model_sizes_out_of_range(key, value, text):
  with pytest.raises(C.ConfigError) as e:
    C.build_model_config({"size": "tiny", "img_size": 64, "patch_size": 8, key[6:]: value})
  assert str(e.value).startswith(f"{key} = {value!r} is outside its range: it must be {text}")


def test_model_values_of_the_wrong_type_are_named():
  with pytest.raises(C.ConfigError, match="model.depth must be int, got '3'"):
    C.build_model_config({"size": "tiny", "depth": "3"})


def test_ranges_that_depend_on_other_keys():
  # AMR: [0.75 - 0.3, 0.75 + 0.3] = [0.45, 1.05] leaves (0, 1); the largest ratio_var is 0.25.
  with pytest.raises(C.ConfigError, match=r"masking.ratio_var = 0.3 puts the AMR range "
                     r"\[0.45, 1.05\] .* must lie inside \(0, 1\).* must be < 0.25"):
    parsed("masking.ratio_var", 0.3)
  assert parsed("masking.ratio_var", 0.2).masking.ratio_var == 0.2
  # warm-up: at most the whole run (the demo's epochs E).
  d = demo.get_config()
  E = d.epochs
  with pytest.raises(C.ConfigError, match=rf"warmup_epochs = {E + 1} .* in \[0, epochs\] = \[0, {E}\]"):
    parsed("warmup_epochs", E + 1)
  with pytest.raises(C.ConfigError, match=rf"random_epochs = {E} .* in \[0, epochs\) = \[0, {E}\)"):
    parsed("random_epochs", E)
  assert parsed("random_epochs", E - 1).random_epochs == E - 1
  # min_lr above the peak lr blr * batch / 256 would make the cosine rise.
  peak = d.blr * d.batch_size / 256
  with pytest.raises(C.ConfigError, match=rf"min_lr = {2 * peak:g} .* \[0, {peak:g}\]"):
    parsed("min_lr", 2 * peak)
  assert parsed("min_lr", peak).min_lr == peak
  for bad in (0, -2):
    with pytest.raises(C.ConfigError, match=rf"mesh.data = {bad} .* -1 \(all devices not used "
                       rf"by fsdp\) or >= 1"):
      parsed("mesh.data", bad)


def test_train_py_refuses_an_out_of_range_value_in_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run([sys.executable, "train.py", "--config", "configs/demo.py",
                        "--config.masking.delta=1.5", "--workdir", str(tmp_path / "w")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip() == ("error: masking.delta = 1.5 is outside its range: it must be in "
                                "[0, 1] (a threshold on salience normalised to [0, 1])")
  assert not (tmp_path / "w").exists()


def test_check_refuses_a_config_not_made_by_parse():
  cfg = parsed("seed", 0)
  bad = dataclasses.replace(cfg, masking=dataclasses.replace(cfg.masking, delta=2.0))
  with pytest.raises(C.ConfigError, match=r"masking.delta = 2.0 is outside its range"):
    bad.check(num_devices=1, num_processes=1)
  with pytest.raises(C.ConfigError, match=r"accum_steps = 0 is outside its range"):
    dataclasses.replace(cfg, accum_steps=0).check(num_devices=1, num_processes=1)
  assert cfg.check(num_devices=2, num_processes=1) == 32
