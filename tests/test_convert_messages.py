"""Ambiguous layouts and files that are not what a command expects: one line on
stderr with the exact reason, exit 2, nothing written."""

import argparse
import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("safetensors")
from safetensors.torch import save_file  # noqa: E402

from torch_reference import TorchMAE, TorchViT  # noqa: E402
from sbam_jax import checkpoints  # noqa: E402
from sbam_jax.models import model_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import convert_checkpoints as cli  # noqa: E402

POOL_REFUSED = ("error: the weights cannot tell the pooling: keys 'norm' + 'head' are a cls-token "
                "classifier (MAE --cls_token, timm global_pool='token', Hugging Face) or timm "
                "global_pool='avg' with fc_norm=False; pass --global-pool token or "
                "--global-pool avg\n")


def cls_vit(seed=0):
  torch.manual_seed(seed)
  return TorchViT(32, 8, 64, 2, 4, 5, global_pool=False)


def refused(capsys, tmp_path, *argv, out="out"):
  """Run expecting exit 2; `out` is the destination appended (None: argv has it)."""
  before = set(os.listdir(tmp_path))
  extra = [str(tmp_path / out)] if out else []
  assert cli.main([str(a) for a in argv] + extra) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: "), err
  assert set(os.listdir(tmp_path)) == before
  assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
  return err


def test_norm_plus_head_needs_the_flag(tmp_path, capsys):
  save_file(cls_vit().state_dict(), tmp_path / "vit.safetensors")
  err = refused(capsys, tmp_path, "to-jax", tmp_path / "vit.safetensors")
  assert err == POOL_REFUSED
  err = refused(capsys, tmp_path, "to-jax", tmp_path / "vit.safetensors", "--global-pool", "avg")
  assert "--global-pool avg with keys 'norm' + 'head' is timm's global_pool='avg'" in err
  assert cli.main(["to-jax", str(tmp_path / "vit.safetensors"), str(tmp_path / "ok"),
                   "--global-pool", "token"]) == 0
  assert json.loads((tmp_path / "ok" / "sbam_jax.json").read_text())["global_pool"] is False


def test_pooling_read_from_training_args(tmp_path):
  torch.save({"model": cls_vit().state_dict(), "args": argparse.Namespace(global_pool=False)},
             tmp_path / "ft.pth")
  assert cli.main(["to-jax", str(tmp_path / "ft.pth"), str(tmp_path / "ok")]) == 0


def test_flag_contradicting_fc_norm_is_refused(tmp_path, capsys):
  torch.manual_seed(0)
  save_file(TorchViT(32, 8, 64, 2, 4, 5, global_pool=True).state_dict(),
            tmp_path / "gap.safetensors")
  err = refused(capsys, tmp_path, "to-jax", tmp_path / "gap.safetensors", "--global-pool", "token")
  assert err == ("error: --global-pool token contradicts the weights: they hold 'fc_norm' (a "
                 "global-pool head, no final 'norm'); use --global-pool avg\n")


def test_decoder_mlp_width_is_read_from_its_shapes(tmp_path, capsys):
  cfg = model_config("tiny", depth=2, img_size=32, patch_size=8)
  sd = TorchMAE.from_config(cfg).state_dict()
  sd["decoder_blocks.0.mlp.fc1.weight"] = torch.zeros(64, 32)  # ratio 2, encoder's is 4
  sd["decoder_blocks.0.mlp.fc1.bias"] = torch.zeros(64)
  sd["decoder_blocks.0.mlp.fc2.weight"] = torch.zeros(32, 64)
  torch.save(sd, tmp_path / "mae.pth")
  assert cli.main(["to-jax", str(tmp_path / "mae.pth"), str(tmp_path / "jax")]) == 0
  params, card = checkpoints.load_params(str(tmp_path / "jax"))
  assert card["model"]["decoder_mlp_ratio"] == 2.0 and card["model"]["mlp_ratio"] == 4.0
  assert params["decoder_blocks"]["layers"]["mlp"]["fc1"]["kernel"].shape[-1] == 64


class _RunsCode:
  def __reduce__(self):
    return (os.system, ("echo owned > /tmp/sbam_convert_owned_2",))


@pytest.mark.parametrize("how", ["torch_zip", "raw_pickle"])
def test_refused_pickle_names_the_global(how, tmp_path, capsys):
  obj = {"model": cls_vit().state_dict(), "payload": _RunsCode()}
  if how == "torch_zip":
    torch.save(obj, tmp_path / "bad.pth")
  else:
    with open(tmp_path / "bad.pth", "wb") as f:
      pickle.dump(obj, f)
  err = refused(capsys, tmp_path, "to-jax", tmp_path / "bad.pth")
  assert f"{tmp_path / 'bad.pth'}: refused to load: it asks for posix.system" in err
  assert "weights_only=False" not in err and "weights_only" not in err
  assert not os.path.exists("/tmp/sbam_convert_owned_2")


def test_not_a_checkpoint_at_all(tmp_path, capsys):
  (tmp_path / "notes.pth").write_text("these are not weights\n" * 20)
  (tmp_path / "noise.safetensors").write_bytes(bytes([1, 2, 3, 4])
                                               + np.random.default_rng(0).bytes(4092))
  err = refused(capsys, tmp_path, "to-jax", tmp_path / "notes.pth")
  assert err == (f"error: {tmp_path / 'notes.pth'} is not a checkpoint: neither a PyTorch .pth "
                 f"(zip or pickle) nor a .safetensors file (it looks like text)\n")
  err = refused(capsys, tmp_path, "to-jax", tmp_path / "noise.safetensors")
  assert err.startswith(f"error: {tmp_path / 'noise.safetensors'} is not a checkpoint: neither a "
                        f"PyTorch .pth (zip or pickle) nor a .safetensors file (it starts with "
                        f"bytes 01 02 03 04 ")


def test_folder_where_a_file_is_expected_and_the_reverse(tmp_path, capsys):
  os.makedirs(tmp_path / "plain")
  err = refused(capsys, tmp_path, "to-jax", tmp_path / "plain")
  assert err == (f"error: {tmp_path / 'plain'} is a folder without config.json; to-jax reads a "
                 f".pth or .safetensors file, or a Hugging Face / timm folder (config.json beside "
                 f"model.safetensors or pytorch_model.bin)\n")
  torch.save(cls_vit().state_dict(), tmp_path / "w.pth")
  err = refused(capsys, tmp_path, "to-torch", tmp_path / "w.pth")
  assert err == (f"error: {tmp_path / 'w.pth'} is a file; to-torch reads a sbam_jax checkpoint "
                 f"folder or a training workdir (convert .pth / .safetensors files with to-jax)\n")
  assert cli.main(["to-jax", str(tmp_path / "w.pth"), str(tmp_path / "jax"),
                   "--global-pool", "token"]) == 0
  err = refused(capsys, tmp_path, "to-jax", tmp_path / "w.pth", tmp_path / "w.pth", out=None)
  assert err == (f"error: {tmp_path / 'w.pth'} is a file; to-jax writes a checkpoint folder: "
                 f"give a folder name\n")
  err = refused(capsys, tmp_path, "to-torch", tmp_path / "jax", tmp_path / "x.pth", "--format",
                "hf", out=None)
  assert err == (f"error: {tmp_path / 'x.pth'}: --format hf writes a folder (config.json + "
                 f"model.safetensors), not a file: give a folder name\n")
  err = refused(capsys, tmp_path, "to-torch", tmp_path / "jax", tmp_path / "plain", out=None)
  assert err == (f"error: {tmp_path / 'plain'} is a folder; --format mae with a file name writes "
                 f"a file (.pth or .safetensors): give a file name\n")


def test_global_pool_classifier_refused_by_hf_export(tmp_path, capsys):
  torch.manual_seed(0)
  torch.save(TorchViT(32, 8, 64, 2, 4, 5, global_pool=True).state_dict(), tmp_path / "gap.pth")
  assert cli.main(["to-jax", str(tmp_path / "gap.pth"), str(tmp_path / "jax")]) == 0
  err = refused(capsys, tmp_path, "to-torch", tmp_path / "jax", "--format", "hf")
  assert err == ("error: this classifier pools the mean of patch tokens (fc_norm); Hugging Face's "
                 "ViTForImageClassification pools the cls token, so it cannot hold it: export "
                 "with --format timm (or mae) instead\n")
