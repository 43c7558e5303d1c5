"""Fine-tuning / linear-probe pieces against MAE's PyTorch rules: layer-wise lr
decay and weight-decay mask, AdamW with per-group lr scales, LARS, the probe's
frozen encoder and BatchNorm, exact evaluation, starting weights."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

from sbam_jax import checkpoints, optim
from sbam_jax import config as C
from sbam_jax.convert import params_to_torch
from sbam_jax.models import MaskedAutoencoder, model_config
from sbam_jax.models.pos_embed import resample_pos_embed
from sbam_jax.evals import classification
from sbam_jax.train import classify
from sbam_jax.train.step import TrainState, make_train_step
from torch_reference import TorchLARS, TorchViT, mae_param_groups_lrd

TINY = model_config("tiny")


def cls_config(task="finetune", **kw):
  c = ml_collections.ConfigDict(dict(task=task, global_pool=task == "finetune",
                                     drop_path=0.0, init_from="", eval_only=False))
  c.update(kw)
  return c


def torch_vit(cfg, num_classes, global_pool, device=None):
  with torch.device(device or "cpu"):
    return TorchViT(cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads,
                    num_classes, global_pool=global_pool)


def test_layer_decay_and_weight_decay_of_every_base_parameter_follow_mae():
  cfg = model_config("base")
  abstract = nnx.eval_shape(lambda: classify.build_model(cls_config(), cfg, 1000))
  _, params, _, _ = classify.split_model(abstract, "finetune")
  rules = optim.parameter_rules(params, optim.finetune_decay_mask(params),
                                optim.layer_decay_scales(params, cfg.depth, 0.65))
  _, table = mae_param_groups_lrd(torch_vit(cfg, 1000, True, "meta"), 0.05, 0.65)
  assert sorted(rules) == sorted(table)
  assert len(rules) == 4 + 12 * 12 + 4
  for name, (wd, scale) in table.items():
    _, decay, got = rules[name]
    assert decay == (wd > 0), name
    assert got == pytest.approx(scale, rel=1e-6), name
  assert rules["head.weight"][1:] == (True, 1.0)
  assert rules["pos_embed"][1] is False and rules["cls_token"][1] is False
  assert rules["blocks.11.attn.qkv.weight"][2] == pytest.approx(0.65)
  assert rules["patch_embed.proj.weight"][2] == pytest.approx(0.65 ** 13)


def _random_like(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  return treedef.unflatten([rng.normal(size=x.shape).astype(np.float32) for x in leaves])


def _to_torch_named(tree):
  return {k: torch.from_numpy(v.copy()) for k, v in params_to_torch(tree).items()}


def test_finetune_adamw_with_layer_scales_equals_torch_param_groups():
  model = classify.build_model(cls_config(), TINY, 7, seed=1)
  _, params, _, _ = classify.split_model(model, "finetune")
  params = jax.tree.map(np.asarray, params)
  scales = optim.layer_decay_scales(params, TINY.depth, 0.75)
  lr = 3e-3
  tx = optim.build("adamw", lambda s: lr, decay_mask=optim.finetune_decay_mask(params),
                   scales=scales, defaults=dict(b1=0.9, b2=0.999, weight_decay=0.05))
  ref = torch_vit(TINY, 7, True)
  ref.load_state_dict(_to_torch_named(params), strict=True)
  groups, _ = mae_param_groups_lrd(ref, 0.05, 0.75)
  for g in groups:
    g["lr"] = lr * g["lr_scale"]
  opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
  state, p = tx.init(params), params
  for k in range(3):
    grads = _random_like(params, k)
    for name, param in ref.named_parameters():
      param.grad = _to_torch_named(grads)[name]
    opt.step()
    updates, state = tx.update(grads, state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
  got = params_to_torch(jax.tree.map(np.asarray, p))
  for name, param in ref.named_parameters():
    np.testing.assert_allclose(got[name], param.detach().numpy(), rtol=1e-5, atol=1e-7,
                               err_msg=name)


def test_lars_equals_mae_lars_under_a_changing_lr():
  rng = np.random.default_rng(0)
  params = {"head": {"kernel": rng.normal(size=(6, 4)).astype(np.float32) * 0.1,
                     "bias": rng.normal(size=(4,)).astype(np.float32)}}
  lrs = [0.5, 2.0, 1.0, 0.25]
  tx = optim.lars(lambda s: jnp.asarray(lrs)[s], weight_decay=0.05)
  w = torch.nn.Parameter(torch.from_numpy(params["head"]["kernel"].T.copy()))
  b = torch.nn.Parameter(torch.from_numpy(params["head"]["bias"].copy()))
  opt = TorchLARS([w, b], weight_decay=0.05)
  state, p = tx.init(params), params
  for k, lr in enumerate(lrs):
    g = _random_like(params, 10 + k)
    w.grad, b.grad = torch.from_numpy(g["head"]["kernel"].T.copy()), torch.from_numpy(g["head"]["bias"])
    for group in opt.param_groups:
      group["lr"] = lr
    opt.step()
    updates, state = tx.update(g, state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
  np.testing.assert_allclose(p["head"]["kernel"], w.detach().numpy().T, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(p["head"]["bias"], b.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_linear_probe_trains_head_only_and_batchnorm_matches_torch():
  cfg = model_config("tiny", img_size=16)
  model = classify.build_model(cls_config("linprobe"), cfg, 5, seed=3)
  graphdef, params, stats, fixed = classify.split_model(model, "linprobe")
  assert set(params) == {"head"} and set(stats) == {"head_bn"} and "encoder" in fixed
  tx = optim.lars(lambda s: 0.5)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, fixed=fixed,
                     opt_state=tx.init(params), rng=jax.random.PRNGKey(0), stats=stats)
  step = jax.jit(make_train_step(classify.probe_loss(graphdef, 16), tx, accum_steps=2))
  rng = np.random.default_rng(0)
  batches = [{"image": rng.integers(0, 256, (8, 16, 16, 3)).astype(np.uint8),
              "label": rng.integers(0, 5, 8).astype(np.int32)} for _ in range(2)]
  fixed_before = jax.tree.map(np.array, fixed)
  for b in batches:
    state, m = step(state, b)
    assert bool(m["finite"])
  # The encoder is bit-identical; the head moved.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.fixed), fixed_before)
  assert not np.allclose(state.params["head"]["kernel"], params["head"]["kernel"])
  # Running statistics: torch BatchNorm1d(affine=False, eps=1e-6), one update per micro-batch.
  from sbam_jax.data import device as device_ops
  bn = torch.nn.BatchNorm1d(cfg.embed_dim, affine=False, eps=1e-6)
  bn.train()
  for b in batches:
    for half in (slice(0, 4), slice(4, 8)):
      feats = model.features(device_ops.normalize(b["image"][half]))
      bn(torch.from_numpy(np.asarray(feats, np.float32)))
  np.testing.assert_allclose(state.stats["head_bn"]["mean"], bn.running_mean.numpy(), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(state.stats["head_bn"]["var"], bn.running_var.numpy(), rtol=1e-5,
                             atol=1e-6)


def test_soft_target_cross_entropy_with_smoothing_equals_torch():
  from sbam_jax.data.mixup import smooth_one_hot
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(6, 10)).astype(np.float32) * 3
  labels = rng.integers(0, 10, 6)
  got = classify.soft_cross_entropy(jnp.asarray(logits), smooth_one_hot(jnp.asarray(labels), 10, 0.1))
  want = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels),
                                           label_smoothing=0.1)
  assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_eval_step_counts_valid_examples_once_against_numpy():
  cfg = model_config("tiny", img_size=16)
  model = classify.build_model(cls_config(), cfg, 7, seed=0)
  # a head large enough that the ranking is not a tie
  model.head.kernel[...] = jax.random.normal(jax.random.PRNGKey(1), model.head.kernel.shape)
  graphdef, params, stats, fixed = classify.split_model(model, "finetune")
  logits_fn = lambda st, x: nnx.merge(graphdef, st["params"], st["stats"], st["fixed"])(x)
  step = jax.jit(classification.make_eval_step(logits_fn, 7))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (13, 16, 16, 3)).astype(np.uint8)
  labels = rng.integers(0, 7, 13).astype(np.int32)
  totals = {"loss_sum": 0.0, "top1": 0, "top5": 0, "count": 0}
  for start in range(0, 13, 6):  # batches of 6, the last padded with 5 invalid rows
    n = min(6, 13 - start)
    pad = lambda a: np.concatenate([a[start:start + n], np.zeros((6 - n,) + a.shape[1:], a.dtype)])
    state = {"params": params, "stats": stats, "fixed": fixed}
    out = step(state, {"image": pad(images), "label": pad(labels), "valid": np.arange(6) < n})
    for k in totals:
      totals[k] += np.asarray(out[k]).item()
  from sbam_jax.data import device as device_ops
  logits = np.asarray(model(device_ops.normalize(images)), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
      - logits.max(1, keepdims=True)
  order = np.argsort(-logits, axis=1)
  assert totals["count"] == 13
  assert totals["top1"] == int((order[:, 0] == labels).sum())
  assert totals["top5"] == int((order[:, :5] == labels[:, None]).any(1).sum())
  assert totals["loss_sum"] / 13 == pytest.approx(-logp[np.arange(13), labels].mean(), rel=1e-5)


@pytest.fixture(scope="module")
def pretrain_dir(tmp_path_factory):
  """A tiny pre-train checkpoint (32 px) in this project's parameter format."""
  model = MaskedAutoencoder(TINY, rngs=nnx.Rngs(5))
  path = str(tmp_path_factory.mktemp("ckpt") / "pre")
  card = {"kind": "pretrain", "model": {f: getattr(TINY, f) for f in TINY.__dataclass_fields__}}
  checkpoints.save_params(path, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model))),
                          card)
  return path, model


def test_starting_weights_take_the_encoder_and_resample_positions(pretrain_dir):
  path, mae = pretrain_dir
  cfg = model_config("tiny", img_size=48)  # 12x12 grid instead of 8x8
  config = cls_config(init_from=path)
  model = classify.build_model(config, cfg, 3, seed=0)
  fresh = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  full, notes = classify.starting_weights(config, cfg, fresh)
  enc = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(mae))["encoder"])
  np.testing.assert_array_equal(full["encoder"]["blocks"]["layers"]["attn"]["qkv"]["kernel"],
                                enc["blocks"]["layers"]["attn"]["qkv"]["kernel"])
  np.testing.assert_array_equal(full["head"]["kernel"], fresh["head"]["kernel"])
  assert "norm" not in full["encoder"]  # global pool: MAE drops the encoder's norm
  table = torch.from_numpy(enc["pos_embed"][:, 1:]).reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
  want = torch.nn.functional.interpolate(table, size=(12, 12), mode="bicubic",
                                         align_corners=False).permute(0, 2, 3, 1).reshape(1, 144, -1)
  np.testing.assert_allclose(full["encoder"]["pos_embed"][:, 1:], want.numpy(), atol=1e-5)
  np.testing.assert_array_equal(full["encoder"]["pos_embed"][:, 0], enc["pos_embed"][:, 0])
  assert any("resampled to 12x12" in n for n in notes)


def test_starting_weights_refuse_what_cannot_work(pretrain_dir):
  path, _ = pretrain_dir
  wide = model_config("tiny", embed_dim=128)
  model = classify.build_model(cls_config(init_from=path), wide, 3)
  with pytest.raises(C.ConfigError, match="embed_dim: checkpoint 64 vs config 128"):
    classify.starting_weights(cls_config(init_from=path), wide,
                              nnx.to_pure_dict(nnx.state(model)))
  model = classify.build_model(cls_config(init_from=path), TINY, 3)
  with pytest.raises(C.ConfigError, match="eval_only needs a fine-tuned"):
    classify.starting_weights(cls_config(init_from=path, eval_only=True), TINY,
                              nnx.to_pure_dict(nnx.state(model)))
  with pytest.raises(C.ConfigError, match="init_from: .* neither"):
    classify.starting_weights(cls_config(init_from=path + "_missing"), TINY,
                              nnx.to_pure_dict(nnx.state(model)))


def test_resample_pos_embed_equals_torch_interpolate():
  rng = np.random.default_rng(0)
  for g, n in [(14, 16), (16, 14), (7, 12)]:
    t = rng.normal(size=(1, 1 + g * g, 8)).astype(np.float32)
    grid = torch.from_numpy(t[:, 1:]).reshape(1, g, g, 8).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(n, n), mode="bicubic",
                                           align_corners=False).permute(0, 2, 3, 1)
    got = resample_pos_embed(t, n)
    np.testing.assert_allclose(got[:, 1:], want.reshape(1, n * n, 8).numpy(), atol=1e-5)
