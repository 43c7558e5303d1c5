"""Pure-PyTorch reference of MAE pre-training and SBAM masking, for parity tests.

Written after facebookresearch/mae `models_mae.py` + timm's `Block` (the key
names of SPEC section 5), without timm. Masking takes explicit shuffle ids and
a keep length per sample, so JAX and torch see the same masks; samples are
encoded one at a time, which is the variable-length computation that the JAX
padded version must equal.
"""

from __future__ import annotations

import fractions
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def sincos_table(dim: int, grid: int, cls: bool = True) -> np.ndarray:
  """MAE's get_2d_sincos_pos_embed, written again in float64 numpy."""
  gh = np.arange(grid, dtype=np.float64)
  gw = np.arange(grid, dtype=np.float64)
  mesh = np.meshgrid(gw, gh)  # w first, as MAE
  mesh = np.stack(mesh, axis=0).reshape(2, 1, grid, grid)

  def one_d(d, pos):
    omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  emb = np.concatenate([one_d(dim // 2, mesh[0]), one_d(dim // 2, mesh[1])], axis=1)
  if cls:
    emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
  return emb


class Attention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, dim * 3, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
    attn = attn.softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, dim, heads, mlp_ratio=4.0):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
  def __init__(self, patch, chans, dim):
    super().__init__()
    self.proj = nn.Conv2d(chans, dim, kernel_size=patch, stride=patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class TorchMAE(nn.Module):
  def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, decoder_embed_dim,
               decoder_depth, decoder_num_heads, mlp_ratio=4.0, norm_pix_loss=True, in_chans=3):
    super().__init__()
    self.patch_size = patch_size
    self.norm_pix_loss = norm_pix_loss
    grid = img_size // patch_size
    L = grid * grid
    self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, embed_dim), requires_grad=False)
    self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
    self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, decoder_embed_dim),
                                          requires_grad=False)
    self.decoder_blocks = nn.ModuleList(
        [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)])
    self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
    self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
    if self.pos_embed.device.type != "meta":
      self.pos_embed.data.copy_(torch.from_numpy(sincos_table(embed_dim, grid)).float()[None])
      self.decoder_pos_embed.data.copy_(
          torch.from_numpy(sincos_table(decoder_embed_dim, grid)).float()[None])

  @classmethod
  def from_config(cls, cfg, **kw):
    return cls(cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads,
               cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads, cfg.mlp_ratio,
               cfg.norm_pix_loss, cfg.in_chans, **kw)

  def patchify(self, imgs):
    p = self.patch_size
    n, c, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)

  def tokens(self, imgs):
    return self.patch_embed(imgs) + self.pos_embed[:, 1:, :]

  def forward_encoder(self, x, ids_shuffle, len_keep):
    """x: patch tokens (N, L, D) of samples that share `len_keep`."""
    n, L, d = x.shape
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones(n, L)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(n, -1, -1)
    x = torch.cat([cls, x], dim=1)
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x), mask, ids_restore

  def forward_decoder(self, x, ids_restore):
    x = self.decoder_embed(x)
    n, L = ids_restore.shape
    mask_tokens = self.mask_token.repeat(n, L + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      x = blk(x)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

  def forward_loss(self, imgs, pred, mask):
    target = self.patchify(imgs)
    if self.norm_pix_loss:
      mean = target.mean(dim=-1, keepdim=True)
      var = target.var(dim=-1, keepdim=True)
      target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()

  def forward(self, imgs, ids_shuffle, len_keep):
    """imgs NCHW; ids_shuffle (N, L); len_keep: per-sample ints.
    Returns loss, pred, mask, and the per-sample latents (variable length)."""
    x = self.tokens(imgs)
    latents, preds, masks = [], [], []
    for i in range(imgs.shape[0]):
      lat, mask, restore = self.forward_encoder(x[i:i + 1], ids_shuffle[i:i + 1], int(len_keep[i]))
      latents.append(lat)
      masks.append(mask)
      preds.append(self.forward_decoder(lat, restore))
    pred, mask = torch.cat(preds), torch.cat(masks)
    return self.forward_loss(imgs, pred, mask), pred, mask, latents


def exact_keep_length(L, mask_ratio, ratio_var=0.0, mean_count=fractions.Fraction(0)):
  """floor(L (1 - r)) with r = r0 - v + 2 v * mean_count / L, in exact rationals,
  clipped to [1, L - 1]."""
  r0 = fractions.Fraction(repr(mask_ratio))
  v = fractions.Fraction(repr(ratio_var))
  r = r0 - v + 2 * v * fractions.Fraction(mean_count) / L
  return min(max(math.floor(L * (1 - r)), 1), L - 1)


def torch_salience(tokens: torch.Tensor) -> torch.Tensor:
  """Outgoing attention of the public SBAM code, in float64, guarded min-max."""
  x = tokens.detach().double()
  attn = (x @ x.transpose(-2, -1)).softmax(dim=-1)
  s = attn.sum(dim=1)
  lo = s.min(dim=-1, keepdim=True).values
  span = s.max(dim=-1, keepdim=True).values - lo
  return torch.where(span > 0, (s - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                     torch.zeros_like(s))


def torch_sbam_ids(tokens, noise, mask_ratio, ratio_var, delta, group_size, tie_rtol=1e-4):
  """(ids_shuffle, len_keep list) for SBM/AMR with explicit noise. A salience
  within tie_rtol * delta of delta is a tie, not above (the documented AMR
  rule: SPEC section 2, "AMR near the threshold")."""
  s = torch_salience(tokens)
  n, L = s.shape
  counts = (s > delta + tie_rtol * delta).sum(dim=-1).tolist()
  keep = []
  for g in range(0, n, group_size):
    mean = fractions.Fraction(sum(counts[g:g + group_size]), group_size)
    keep += [exact_keep_length(L, mask_ratio, ratio_var, mean)] * group_size
  ids_shuffle = torch.argsort(s + noise.double(), dim=1)
  return ids_shuffle, keep


class TorchViT(nn.Module):
  """MAE's models_vit.VisionTransformer (timm layout), inference path."""

  def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, num_classes,
               global_pool=True, mlp_ratio=4.0, in_chans=3):
    super().__init__()
    L = (img_size // patch_size) ** 2
    self.global_pool = global_pool
    self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, embed_dim))
    self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
    if global_pool:
      self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)  # MAE deletes `norm` here
    else:
      self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
    self.head = nn.Linear(embed_dim, num_classes)

  def encode(self, imgs, token_order=None):
    """The tokens after the last block (cls first). `token_order` permutes the
    patch tokens (same result, other summation order)."""
    x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
    if token_order is not None:
      x = x[:, token_order]
    cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    for blk in self.blocks:
      x = blk(x)
    return x

  def forward(self, imgs, token_order=None):
    x = self.encode(imgs, token_order)
    if self.global_pool:
      feat = self.fc_norm(x[:, 1:, :].mean(dim=1))
    else:
      feat = self.norm(x)[:, 0]
    return self.head(feat)


# ---- fine-tuning / linear-probe optimizer rules, as MAE's util/lr_decay.py and util/lars.py

def mae_layer_id(name, num_layers):
  if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
    return 0
  if name.startswith("blocks"):
    return int(name.split(".")[1]) + 1
  return num_layers


def mae_param_groups_lrd(model, weight_decay, layer_decay, no_weight_decay=("pos_embed", "cls_token", "dist_token")):
  """torch param groups {'params', 'weight_decay', 'lr_scale'} and a name -> (wd, scale) table."""
  num_layers = len(model.blocks) + 1
  scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
  groups, table = {}, {}
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    no_decay = p.ndim == 1 or name in no_weight_decay
    wd = 0.0 if no_decay else weight_decay
    lid = mae_layer_id(name, num_layers)
    g = groups.setdefault((lid, no_decay), {"params": [], "weight_decay": wd,
                                            "lr_scale": scales[lid]})
    g["params"].append(p)
    table[name] = (wd, scales[lid])
  return list(groups.values()), table


class TorchLARS(torch.optim.Optimizer):
  """LARS as MAE's util/lars.py: decay and trust ratio for tensors of 2+ dims,
  momentum on the raw update, lr applied to the momentum."""

  def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
    super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                  trust_coefficient=trust_coefficient))

  @torch.no_grad()
  def step(self):
    for g in self.param_groups:
      for p in g["params"]:
        dp = p.grad
        if p.ndim > 1:
          dp = dp.add(p, alpha=g["weight_decay"])
          pn, un = torch.norm(p), torch.norm(dp)
          one = torch.ones_like(pn)
          q = torch.where(pn > 0.0, torch.where(un > 0, g["trust_coefficient"] * pn / un, one), one)
          dp = dp.mul(q)
        state = self.state[p]
        if "mu" not in state:
          state["mu"] = torch.zeros_like(p)
        state["mu"].mul_(g["momentum"]).add_(dp)
        p.add_(state["mu"], alpha=-g["lr"])


# ---- many-step training, as MAE's engine_pretrain / engine_finetune (float32, one process)

def mae_adjust_lr(epoch, *, lr, min_lr, warmup_epochs, epochs):
  """MAE util/lr_sched.adjust_learning_rate: the lr at fractional `epoch`."""
  if epoch < warmup_epochs:
    return lr * epoch / warmup_epochs
  return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) /
                                                         (epochs - warmup_epochs)))


def pretrain_param_groups(model, weight_decay):
  """timm's optim_factory.add_weight_decay as main_pretrain calls it: no decay
  for 1-D tensors and `*.bias`, decay for everything else."""
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
  return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


class TorchProbe(nn.Module):
  """main_linprobe's model: a frozen ViT (cls token + norm) whose head is
  BatchNorm1d(affine=False, eps=1e-6) + Linear."""

  def __init__(self, vit: "TorchViT"):
    super().__init__()
    self.vit = vit
    self.head_bn = nn.BatchNorm1d(vit.head.in_features, affine=False, eps=1e-6)
    for name, p in vit.named_parameters():
      p.requires_grad = name.startswith("head.")

  def forward(self, imgs, token_order=None):
    v = self.vit
    with torch.no_grad():
      feat = v.norm(v.encode(imgs, token_order))[:, 0]
    return v.head(self.head_bn(feat))


class ReferenceLoop:
  """engine_*.train_one_epoch: per optimizer step, set every group's lr to
  lr_sched(epoch) * lr_scale (evaluated at the first micro-step), then
  `loss / accum_iter` backward per micro-batch, then one optimizer step.

  `reorder` runs the same arithmetic in another float32 summation order:
  micro-batches in reverse order, samples reversed inside each (the closure
  gets the flag), which is what measures float32 reordering noise."""

  def __init__(self, optimizer, lr_fn, steps_per_epoch, accum_iter, reorder=False):
    self.opt, self.lr_fn, self.spe, self.accum = optimizer, lr_fn, steps_per_epoch, accum_iter
    self.reorder = reorder

  def step(self, step, micro_batches, loss_fn):
    """micro_batches: list of whatever `loss_fn(mb, reversed)` takes. Returns
    the mean micro-batch loss (what the JAX step reports)."""
    lr = self.lr_fn(step / self.spe)
    for g in self.opt.param_groups:
      g["lr"] = lr * g.get("lr_scale", 1.0)
    self.opt.zero_grad(set_to_none=True)
    order = range(len(micro_batches))
    total = 0.0
    for i in (reversed(order) if self.reorder else order):
      loss = loss_fn(micro_batches[i], self.reorder)
      (loss / self.accum).backward()
      total += loss.item()
    self.opt.step()
    return total / len(micro_batches), lr


def classify_reference(kind, cfg, weights, num_classes, *, weight_decay, layer_decay, smoothing):
  """(model, optimizer, loss(micro_batch, reversed)) of main_finetune (AdamW,
  param_groups_lrd, label smoothing, global pool) or main_linprobe (LARS,
  BatchNorm head, cls token); `reversed`: samples and patch tokens in reverse
  order (the same loss, another float32 summation order)."""
  vit = TorchViT(cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads,
                 num_classes, global_pool=kind == "finetune")
  vit.load_state_dict(weights, strict=True)
  if kind == "finetune":
    groups, _ = mae_param_groups_lrd(vit, weight_decay, layer_decay)
    opt = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), eps=1e-8)
    model = vit
  else:
    model, smoothing = TorchProbe(vit), 0.0
    opt = TorchLARS(vit.head.parameters(), weight_decay=weight_decay)

  def loss(mb, rev):
    x, y = (a.flip(0) if rev else a for a in mb)
    order = torch.arange(cfg.num_patches).flip(0) if rev else None
    return F.cross_entropy(model(x, order), y, label_smoothing=smoothing)

  return model, opt, loss
