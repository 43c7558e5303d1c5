"""convert_checkpoints.py: every kind both ways, outputs equal the reference,
bad files refused with nothing written."""

import argparse
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import nchw
from sbam_jax import checkpoints, masking
from sbam_jax.convert import formats
from sbam_jax.models import model_config
from torch_reference import TorchMAE, TorchViT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import convert_checkpoints as cli  # noqa: E402

CFG = model_config("tiny", depth=3)


def reference(kind, global_pool=True, seed=0):
  torch.manual_seed(seed)
  if kind == "pretrain":
    model = TorchMAE.from_config(CFG)
    with torch.no_grad():  # non-zero tokens, as after training
      model.cls_token.normal_(std=0.02)
      model.mask_token.normal_(std=0.02)
  else:
    model = TorchViT(CFG.img_size, CFG.patch_size, CFG.embed_dim, CFG.depth, CFG.num_heads, 7,
                     global_pool=global_pool)
    with torch.no_grad():
      model.pos_embed.normal_(std=0.02)
      model.cls_token.normal_(std=0.02)
  return model


def encoder_state(model):
  return {k: v for k, v in model.state_dict().items()
          if not k.startswith(("decoder", "mask_token"))}


CASES = {  # name: (state dict maker, expected kind, flags)
    "pretrain": (lambda: reference("pretrain").state_dict(), "pretrain", ()),
    "encoder": (lambda: encoder_state(reference("pretrain")), "encoder", ()),
    "finetuned_gap": (lambda: reference("vit", True).state_dict(), "finetuned", ()),
    # keys norm + head do not tell the pooling: the flag says it (see test_convert_messages)
    "finetuned_cls": (lambda: reference("vit", False).state_dict(), "finetuned",
                      ("--global-pool", "token")),
}


def convert(tmp_path, obj, *extra, name="in.pth"):
  src = str(tmp_path / name)
  torch.save(obj, src)
  dst = str(tmp_path / "jax")
  assert cli.main(["to-jax", src, dst, *extra]) == 0
  return dst


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bit_exact(case, tmp_path):
  make, kind, flags = CASES[case]
  sd = make()
  # A training checkpoint: model + epoch + args Namespace (allowed by the allow-list).
  dst = convert(tmp_path, {"model": sd, "epoch": 99,
                           "args": argparse.Namespace(blr=1.5e-4, mask_ratio=0.75)}, *flags)
  params, card = checkpoints.load_params(dst)
  assert card["kind"] == kind and card["epoch"] == 99
  out = str(tmp_path / "back.pth")
  assert cli.main(["to-torch", dst, out]) == 0
  back = torch.load(out, weights_only=True)["model"]
  assert set(back) == set(sd)
  for k in sd:
    assert back[k].dtype == torch.float32 and torch.equal(back[k], sd[k]), k


def test_converted_pretrain_model_equals_reference(tmp_path, assert_close):
  ref = reference("pretrain", seed=3)
  dst = convert(tmp_path, ref.state_dict())
  params, card = checkpoints.load_params(dst)
  det = formats.detect(ref.state_dict())
  model = formats.build_model(det, abstract=False)
  checkpoints.load_into(model, params)
  rng = np.random.default_rng(0)
  imgs = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  noise = rng.uniform(size=(3, CFG.num_patches)).astype(np.float32)
  out = model(jnp.asarray(imgs), None, masking.MaskingSpec("random"), noise=jnp.asarray(noise))
  keep = masking.fixed_keep_length(CFG.num_patches, 0.75)
  with torch.no_grad():
    loss, pred, mask, _ = ref(nchw(imgs), torch.argsort(torch.from_numpy(noise), dim=1), [keep] * 3)
  assert_close(out.loss, loss.item(), 1e-5, "loss")
  assert_close(out.pred, pred.numpy(), 1e-5, "pred")


@pytest.mark.parametrize("global_pool", [True, False])
def test_converted_classifier_equals_reference(global_pool, tmp_path, assert_close):
  ref = reference("vit", global_pool, seed=4)
  pool = "avg" if global_pool else "token"
  dst = convert(tmp_path, {"model": ref.state_dict()}, "--global-pool", pool)
  params, card = checkpoints.load_params(dst)
  assert card["global_pool"] == global_pool and card["num_classes"] == 7
  model = formats.build_model(formats.detect(ref.state_dict(), global_pool=pool), abstract=False)
  checkpoints.load_into(model, params)
  imgs = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref.eval()(nchw(imgs)).numpy()
  assert_close(model(jnp.asarray(imgs)), want, 1e-5, "logits")


def test_half_precision_goes_through_float32(tmp_path):
  sd = {k: v.half() for k, v in reference("vit").state_dict().items()}
  params, _ = checkpoints.load_params(convert(tmp_path, sd))
  got = params["head"]["kernel"]
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, sd["head.weight"].float().numpy().T)


def test_position_table_resampled_to_new_grid(tmp_path):
  sd = reference("vit").state_dict()
  dst = convert(tmp_path, sd, "--img-size", "48")
  params, card = checkpoints.load_params(dst)
  table = params["encoder"]["pos_embed"]
  assert card["model"]["img_size"] == 48 and table.shape == (1, 1 + 12 * 12, CFG.embed_dim)
  np.testing.assert_array_equal(table[:, 0], sd["pos_embed"][:, 0].numpy())
  # Bicubic with align_corners=False keeps a constant table constant.
  flat = np.ones((1, 1 + 64, 4), np.float32)
  np.testing.assert_allclose(formats.resample_pos_embed(flat, 12), 1.0, atol=1e-6)


class _RunsCode:
  def __reduce__(self):
    return (os.system, ("echo owned > /tmp/sbam_convert_owned",))


def _bad_inputs(tmp_path):
  good = reference("pretrain").state_dict()
  torch.save({"model": good}, tmp_path / "good.pth")
  data = (tmp_path / "good.pth").read_bytes()
  (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
  with open(tmp_path / "malicious.pth", "wb") as f:
    pickle.dump({"model": good, "payload": _RunsCode()}, f)
  torch.save({"model": {"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}},
             tmp_path / "resnet.pth")
  bad = dict(good)
  bad["blocks.1.mlp.fc1.weight"] = torch.zeros(100, CFG.embed_dim)
  torch.save(bad, tmp_path / "mismatch.pth")
  torch.save({"model": good, "payload": _RunsCode()}, tmp_path / "malicious_zip.pth")
  return {
      "malicious.pth": "refused to load: it asks for posix.system",
      "malicious_zip.pth": "refused to load: it asks for posix.system",
      "truncated.pth": "truncated or corrupt",
      "resnet.pth": "not a ViT",
      "mismatch.pth": "blocks.1.mlp.fc1.weight: got (100, 64), expected (256, 64)",
      "missing.pth": "no such file",
  }


def test_bad_files_give_clear_errors_and_write_nothing(tmp_path, capsys):
  expectations = _bad_inputs(tmp_path)
  for name, message in expectations.items():
    dst = tmp_path / ("out_" + name)
    assert cli.main(["to-jax", str(tmp_path / name), str(dst)]) == 2, name
    err = capsys.readouterr().err
    assert message in err, (name, err)
    assert not dst.exists(), name
  assert not os.path.exists("/tmp/sbam_convert_owned")
  leftovers = [p for p in os.listdir(tmp_path) if ".tmp" in p]
  assert not leftovers


def test_existing_output_needs_force(tmp_path, capsys):
  sd = reference("vit").state_dict()
  dst = convert(tmp_path, sd)
  before = os.listdir(dst)
  assert cli.main(["to-jax", str(tmp_path / "in.pth"), dst]) == 2
  assert "--force" in capsys.readouterr().err and os.listdir(dst) == before
  assert cli.main(["to-jax", str(tmp_path / "in.pth"), dst, "--force"]) == 0


def test_help_explains_each_mode():
  out = subprocess.run([sys.executable, os.path.join(ROOT, "convert_checkpoints.py"), "--help"],
                       capture_output=True, text=True, check=True, cwd=ROOT).stdout
  for word in ("to-jax", "to-torch", "pretrain", "encoder", "finetuned", "weights_only"):
    assert word in out


def test_adamw_step_from_converted_training_checkpoint_matches_torch(tmp_path, assert_close):
  import optax
  from flax import nnx
  from sbam_jax import optim
  from sbam_jax.convert import params_from_torch
  from sbam_jax.convert.optimizer import reference_group_order

  ref = reference("pretrain", seed=5)
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  no_decay, decay = reference_group_order(sd)
  named = dict(ref.named_parameters())
  # The reference recipe: timm add_weight_decay groups, AdamW betas (0.9, 0.95).
  opt = torch.optim.AdamW([{"params": [named[n] for n in no_decay], "weight_decay": 0.0},
                           {"params": [named[n] for n in decay], "weight_decay": 0.05}],
                          lr=1e-3, betas=(0.9, 0.95))
  gen = torch.Generator().manual_seed(0)

  def random_grads():
    return {n: torch.randn(p.shape, generator=gen) for n, p in named.items() if p.requires_grad}

  for _ in range(3):
    for n, g in random_grads().items():
      named[n].grad = g
    opt.step()
  dst = convert(tmp_path, {"model": ref.state_dict(), "optimizer": opt.state_dict(), "epoch": 9})
  params, card = checkpoints.load_params(dst)
  assert card["adamw_step"] == 3 and card["epoch"] == 9
  moments = checkpoints.load_extra(dst, "adamw")

  # One more step on both sides with the same gradients (copies: state_dict
  # tensors share storage with the parameters that torch updates in place).
  before = {n: v.detach().numpy().copy() for n, v in named.items() if v.requires_grad}
  grads = random_grads()
  for n, g in grads.items():
    named[n].grad = g
  opt.step()
  det = formats.detect(sd)
  trainable = nnx.to_pure_dict(nnx.state(formats.build_model(det), nnx.Param))
  p = params_from_torch(before, trainable)
  g = params_from_torch({k: v.numpy() for k, v in grads.items()}, trainable)
  tx = optax.adamw(1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
                   mask=optim.reference_decay_mask(p))
  state = optim.adamw_state(tx, p, moments["mu"], moments["nu"], int(moments["count"]))
  updates, _ = tx.update(g, state, p)
  new = optax.apply_updates(p, updates)
  want = params_from_torch({k: v.detach().numpy() for k, v in named.items() if v.requires_grad},
                           trainable)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(new), jax.tree.leaves(want)):
    assert_close(a, b, 1e-6, jax.tree_util.keystr(path))
  # cls_token and mask_token are decayed, as in the reference.
  mask = optim.reference_decay_mask(p)
  assert mask["encoder"]["cls_token"] and mask["mask_token"]
  assert not mask["encoder"]["blocks"]["layers"]["norm1"]["scale"]


def test_optimizer_groups_of_another_recipe_are_refused(tmp_path, capsys):
  ref = reference("pretrain")
  opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)  # one group: not MAE's recipe
  ref.cls_token.grad = torch.zeros_like(ref.cls_token)
  for p in ref.parameters():
    p.grad = torch.zeros_like(p)
  opt.step()
  src = tmp_path / "ckpt.pth"
  torch.save({"model": ref.state_dict(), "optimizer": opt.state_dict()}, src)
  assert cli.main(["to-jax", str(src), str(tmp_path / "out")]) == 2
  assert "parameter groups of sizes" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()
