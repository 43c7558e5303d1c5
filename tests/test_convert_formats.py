"""Hugging Face and timm formats, both ways, against transformers itself and the
reference (timm-layout) ViT. Models are built from small configs with seeded
random weights; nothing is downloaded."""

import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from helpers import nchw  # noqa: E402
from sbam_jax import checkpoints, masking  # noqa: E402
from sbam_jax.models import MaskedAutoencoder, VisionTransformer, model_config  # noqa: E402
from torch_reference import TorchViT  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import convert_checkpoints as cli  # noqa: E402

CFG = model_config("tiny", depth=2, img_size=32, patch_size=8)  # 16 tokens
HF_ARCH = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
               image_size=32, patch_size=8, layer_norm_eps=1e-6)
MAE_ARCH = dict(HF_ARCH, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                decoder_num_attention_heads=4, decoder_intermediate_size=128, norm_pix_loss=True)


def randomize(model, seed):
  """Every tensor, position tables included, seeded normal: nothing matches by chance."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for t in model.state_dict().values():
      t.copy_(torch.randn(t.shape, generator=gen) * 0.2)
  return model


def hf_mae(seed=0):
  return randomize(transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**MAE_ARCH)),
                   seed).eval()


def hf_classifier(seed=0):
  config = transformers.ViTConfig(**HF_ARCH, num_labels=5)
  return randomize(transformers.ViTForImageClassification(config), seed).eval()


def run(*argv):
  assert cli.main([str(a) for a in argv]) == 0, argv


def assert_loads_exactly(cls, folder, want):
  """from_pretrained: no missing / unexpected keys, every tensor bit-equal."""
  model, info = cls.from_pretrained(str(folder), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  got = model.state_dict()
  assert set(got) == set(want)
  for k in want:
    assert torch.equal(got[k], want[k]), k


def test_hf_pretrain_round_trip_is_bit_exact(tmp_path):
  ref = hf_mae()
  ref.save_pretrained(tmp_path / "hf")
  run("to-jax", tmp_path / "hf", tmp_path / "jax")
  run("to-torch", tmp_path / "jax", tmp_path / "back", "--format", "hf")
  assert_loads_exactly(transformers.ViTMAEForPreTraining, tmp_path / "back", ref.state_dict())
  written = load_file(tmp_path / "back" / "model.safetensors")  # the published 4.x names
  assert "vit.encoder.layer.1.attention.attention.query.weight" in written
  assert "decoder.decoder_layers.0.intermediate.dense.weight" in written
  assert json.loads((tmp_path / "back" / "config.json").read_text())["num_attention_heads"] == 4


def test_hf_5x_state_dict_names_read_like_4x(tmp_path):
  """A transformers 5.x module's own state_dict (q_proj / o_proj / mlp.fc1
  names) and a sharded save convert to the same parameters as its
  save_pretrained folder."""
  ref = hf_mae(seed=1)
  ref.save_pretrained(tmp_path / "v4")
  ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  os.makedirs(tmp_path / "v5")
  sd = ref.state_dict()
  assert "vit.layers.0.attention.q_proj.weight" in sd  # the installed version's names
  save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "v5" / "model.safetensors")
  (tmp_path / "v5" / "config.json").write_text((tmp_path / "v4" / "config.json").read_text())
  run("to-jax", tmp_path / "v4", tmp_path / "j4")
  run("to-jax", tmp_path / "v5", tmp_path / "j5")
  run("to-jax", tmp_path / "sharded", tmp_path / "js")
  a, _ = checkpoints.load_params(str(tmp_path / "j4"))
  for other in ("j5", "js"):
    b, _ = checkpoints.load_params(str(tmp_path / other))
    for x, y in zip(jax_leaves(a), jax_leaves(b), strict=True):
      np.testing.assert_array_equal(x, y)


def jax_leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def _compare_mae(ours, theirs, imgs, noise, assert_close):
  out = ours(jnp.asarray(imgs), None, masking.MaskingSpec("random"), noise=jnp.asarray(noise))
  with torch.no_grad():
    want = theirs(pixel_values=nchw(imgs), noise=torch.from_numpy(noise))
  assert_close(out.loss, want.loss.item(), 1e-5, "loss")
  assert_close(out.pred, want.logits.numpy(), 1e-5, "logits")
  np.testing.assert_array_equal(np.asarray(out.mask), want.mask.numpy())
  np.testing.assert_array_equal(np.asarray(out.plan.ids_restore), want.ids_restore.numpy())


@pytest.mark.parametrize("direction", ["hf_to_ours", "ours_to_hf"])
def test_hf_forward_with_noise_equals_ours(direction, tmp_path, assert_close):
  from flax import nnx
  if direction == "hf_to_ours":
    theirs = hf_mae(seed=2)
    theirs.save_pretrained(tmp_path / "hf")
    run("to-jax", tmp_path / "hf", tmp_path / "jax")
    ours = checkpoints.load_model(str(tmp_path / "jax")).model
  else:  # our init (real sin-cos tables; transformers' from-config decoder table is zeros)
    ours = MaskedAutoencoder(CFG, rngs=nnx.Rngs(3))
    checkpoints.save_model(str(tmp_path / "jax"), ours)
    run("to-torch", tmp_path / "jax", tmp_path / "hf", "--format", "hf")
    theirs = transformers.ViTMAEForPreTraining.from_pretrained(str(tmp_path / "hf")).eval()
  rng = np.random.default_rng(0)
  imgs = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  noise = rng.uniform(size=(3, 16)).astype(np.float32)
  _compare_mae(ours, theirs, imgs, noise, assert_close)


def test_a_decoder_mlp_narrower_than_the_encoders_is_read_from_its_shapes(tmp_path,
                                                                          assert_close):
  """Hugging Face ViTMAE sets decoder_intermediate_size on its own; the width is
  read from the decoder's fc1, not assumed from the encoder's ratio."""
  theirs = randomize(transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(
      **dict(MAE_ARCH, decoder_intermediate_size=64))), seed=4).eval()
  theirs.save_pretrained(tmp_path / "hf")
  run("to-jax", tmp_path / "hf", tmp_path / "jax")
  loaded = checkpoints.load_model(str(tmp_path / "jax"))
  assert loaded.config.decoder_mlp_ratio == 2.0 and loaded.config.mlp_ratio == 4.0
  rng = np.random.default_rng(1)
  imgs = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  noise = rng.uniform(size=(2, 16)).astype(np.float32)
  _compare_mae(loaded.model, theirs, imgs, noise, assert_close)
  run("to-torch", tmp_path / "jax", tmp_path / "back", "--format", "hf")
  assert_loads_exactly(transformers.ViTMAEForPreTraining, tmp_path / "back", theirs.state_dict())
  run("to-torch", tmp_path / "jax", tmp_path / "back.pth")
  run("to-jax", tmp_path / "back.pth", tmp_path / "again")
  a, _ = checkpoints.load_params(str(tmp_path / "jax"))
  b, card = checkpoints.load_params(str(tmp_path / "again"))
  assert card["model"]["decoder_mlp_ratio"] == 2.0
  for x, y in zip(jax_leaves(a), jax_leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_hf_classifier_both_ways(tmp_path, assert_close):
  ref = hf_classifier(seed=4)
  ref.save_pretrained(tmp_path / "hf")
  run("to-jax", tmp_path / "hf", tmp_path / "jax")
  loaded = checkpoints.load_model(str(tmp_path / "jax"))
  assert loaded.card["kind"] == "finetuned" and not loaded.card["global_pool"]
  imgs = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref(pixel_values=nchw(imgs)).logits.numpy()
  assert_close(loaded.model(jnp.asarray(imgs)), want, 1e-5, "logits")
  run("to-torch", tmp_path / "jax", tmp_path / "back", "--format", "hf")
  assert_loads_exactly(transformers.ViTForImageClassification, tmp_path / "back",
                       ref.state_dict())


@pytest.mark.parametrize("arch", ["ViTModel", "ViTMAEModel"])
def test_hf_encoders_read_and_export(arch, tmp_path, capsys):
  if arch == "ViTModel":  # has a pooler, which no model here uses
    ref = transformers.ViTModel(transformers.ViTConfig(**HF_ARCH))
  else:
    ref = transformers.ViTMAEModel(transformers.ViTMAEConfig(**MAE_ARCH))
  randomize(ref, 5).save_pretrained(tmp_path / "hf")
  run("to-jax", tmp_path / "hf", tmp_path / "jax")
  out = capsys.readouterr().out
  assert "detected encoder" in out and ("pooler.dense.weight" in out) == (arch == "ViTModel")
  run("to-torch", tmp_path / "jax", tmp_path / "back", "--format", "hf")
  want = {k: v for k, v in ref.state_dict().items() if not k.startswith("pooler")}
  assert_loads_exactly(transformers.ViTMAEModel, tmp_path / "back", want)


def timm_vit(global_pool, seed=6):
  torch.manual_seed(seed)
  model = TorchViT(32, 8, 64, 2, 4, 7, global_pool=global_pool)
  return randomize(model, seed).eval()


# timm's VisionTransformer(depth=1, num_classes>0) state-dict names, written out
# from its published module layout (timm is not importable here): the exported
# files must carry exactly these (block 0 shown; fc_norm for 'avg', norm for 'token').
TIMM_BLOCK = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
              "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
              "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
TIMM_TOP = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "head.weight", "head.bias"]


def timm_keys(depth, pool):
  norm = "fc_norm" if pool == "avg" else "norm"
  return set(TIMM_TOP + [f"{norm}.weight", f"{norm}.bias"]
             + [f"blocks.{i}.{k}" for i in range(depth) for k in TIMM_BLOCK])


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_timm_folder_in_and_out(pool, tmp_path, assert_close):
  ref = timm_vit(pool == "avg")
  folder = tmp_path / "timm"
  os.makedirs(folder)
  save_file(ref.state_dict(), folder / "model.safetensors")
  (folder / "config.json").write_text(json.dumps(
      {"architecture": "vit_base_patch16_224", "num_classes": 7, "global_pool": pool,
       "model_args": {"num_heads": 4}}))
  run("to-jax", folder, tmp_path / "jax")
  model = checkpoints.load_model(str(tmp_path / "jax")).model
  imgs = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    assert_close(model(jnp.asarray(imgs)), ref(nchw(imgs)).numpy(), 1e-5, "logits")
  run("to-torch", tmp_path / "jax", tmp_path / "out", "--format", "timm")
  run("to-torch", tmp_path / "jax", tmp_path / "one.safetensors", "--format", "timm")
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["global_pool"] == pool and config["num_classes"] == 7
  assert config["model_args"]["num_heads"] == 4
  for path in (tmp_path / "out" / "model.safetensors", tmp_path / "one.safetensors"):
    back = load_file(path)
    assert set(back) == timm_keys(2, pool)
    for k, v in ref.state_dict().items():
      assert torch.equal(back[k], v), k
    ref.load_state_dict(back, strict=True)


def test_timm_export_of_a_pretrain_model_keeps_the_encoder(tmp_path, capsys):
  from flax import nnx
  checkpoints.save_model(str(tmp_path / "jax"), MaskedAutoencoder(CFG, rngs=nnx.Rngs(0)))
  run("to-torch", tmp_path / "jax", tmp_path / "enc.safetensors", "--format", "timm")
  assert "timm has no MAE decoder" in capsys.readouterr().out
  keys = set(load_file(tmp_path / "enc.safetensors"))
  want = timm_keys(2, "token") - {"head.weight", "head.bias"}
  assert keys == want


def test_mae_safetensors_in_and_out(tmp_path):
  ref = timm_vit(True, seed=7)
  save_file(ref.state_dict(), tmp_path / "ft.safetensors")
  run("to-jax", tmp_path / "ft.safetensors", tmp_path / "jax")
  run("to-torch", tmp_path / "jax", tmp_path / "back.safetensors")
  back = load_file(tmp_path / "back.safetensors")
  assert set(back) == set(ref.state_dict())
  for k, v in ref.state_dict().items():
    assert torch.equal(back[k], v), k


def test_python_api_round_trip(tmp_path, assert_close):
  from flax import nnx
  vit = VisionTransformer(CFG, 3, global_pool=False, rngs=nnx.Rngs(1))
  card = checkpoints.save_model(str(tmp_path / "vit"), vit, CFG, classes=["a", "b", "c"])
  assert card["kind"] == "finetuned" and card["global_pool"] is False
  loaded = checkpoints.load_model(str(tmp_path / "vit"), scan_layers=False)
  assert loaded.config == model_config("tiny", depth=2, img_size=32, patch_size=8,
                                       scan_layers=False)
  imgs = jnp.asarray(np.random.default_rng(3).normal(size=(2, 32, 32, 3)), jnp.float32)
  assert_close(loaded.model(imgs), vit(imgs), 1e-6, "logits")
  run("to-torch", tmp_path / "vit", tmp_path / "hf", "--format", "hf")
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert config["id2label"] == {"0": "a", "1": "b", "2": "c"}
  with pytest.raises(ValueError, match="ModelConfig"):
    checkpoints.save_model(str(tmp_path / "x"), vit)
