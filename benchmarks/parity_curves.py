"""Training-curve parity: our tasks against the plain-PyTorch MAE recipe, many steps.

Trains the reference (`tests/torch_reference.py`) and our trainer side by side
on the same images in the same order, from the same initial weights (through
the converter), with the same masking noise, in float32:

  pretrain   PretrainTask (AdamW + decay mask, warm-up + cosine, accumulation,
             random masking then SBAM at `random_epochs`)
  finetune   FinetuneTask (AdamW, layer-wise lr decay, label smoothing;
             drop-path, mixup / cutmix and random erasing off)
  linprobe   LinprobeTask (frozen encoder, BatchNorm + Linear, LARS)

Our side runs through the task objects only: `init_state`, `train_step` (the
jitted step the training loop uses, with the task's own loss, optimizer and
schedule). The reference side runs MAE's engine (lr set per optimizer step,
`loss / accum_iter` backward) with its own masking from the same noise.

What float32 reordering alone does is measured by running the reference a
second time in another summation order (micro-batches, the samples in each and
the tokens of each sequence reversed: the same mathematics);
ours must stay within a small factor of that (`BOUND_FACTOR`).

  python benchmarks/parity_curves.py --out benchmarks/parity   # long version, a few minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from PIL import Image  # noqa: E402

import torch_reference as tr  # noqa: E402
from sbam_jax import checkpoints as param_ckpt  # noqa: E402
from sbam_jax import masking, sharding  # noqa: E402
from sbam_jax.convert import params_to_torch  # noqa: E402
from sbam_jax.data.demo import PHOTO_DIR, photo_names  # noqa: E402
from sbam_jax.train.classify import FinetuneTask, LinprobeTask  # noqa: E402
from sbam_jax.train.pretrain import PretrainTask  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BOUND_FACTOR = 10.0   # ours vs reference <= this x (reference vs reordered reference)
FLOOR = 2.0 ** -23    # float32 epsilon: a bound is never below one rounding


@dataclasses.dataclass
class Run:
  """A task's recipe in the reference's words; `config()` is ours."""
  task: str
  images: int           # training images (steps per epoch = images // batch)
  batch: int
  epochs: int
  warmup_epochs: float
  blr: float
  accum: int = 1
  min_lr: float = 0.0
  weight_decay: float = 0.05
  random_epochs: int = 0
  masking: dict = dataclasses.field(default_factory=dict)
  layer_decay: float = 0.75
  smoothing: float = 0.1
  seed: int = 0

  @property
  def steps_per_epoch(self) -> int:
    return self.images // self.batch

  @property
  def steps(self) -> int:
    return self.steps_per_epoch * self.epochs

  def lr_fn(self):
    lr = self.blr * self.batch / 256
    return lambda epoch: tr.mae_adjust_lr(epoch, lr=lr, min_lr=self.min_lr,
                                          warmup_epochs=self.warmup_epochs, epochs=self.epochs)

  def config(self, root: str) -> dict:
    c = dict(task=self.task, seed=self.seed, model=dict(size="tiny", img_size=32),
             data=dict(source="folder", path=root, device_resize=False),
             batch_size=self.batch, accum_steps=self.accum, epochs=self.epochs,
             warmup_epochs=self.warmup_epochs, blr=self.blr, min_lr=self.min_lr,
             weight_decay=self.weight_decay)
    if self.task == "pretrain":
      c.update(random_epochs=self.random_epochs, masking=self.masking)
    else:
      c.update(drop_path=0.0, reprob=0.0, rand_augment="", mixup=dict(prob=0.0), evals={},
               smoothing=self.smoothing if self.task == "finetune" else 0.0,
               global_pool=self.task == "finetune")
      if self.task == "finetune":
        c.update(layer_decay=self.layer_decay, b2=0.999)
    return c


# ---- data --------------------------------------------------------------------

def demo_images(n: int, size: int = 32, seed: int = 0):
  """n random crops of the bundled photos (label = photo), uint8 NHWC."""
  rng = np.random.default_rng(seed)
  names = photo_names()
  photos = [Image.open(os.path.join(PHOTO_DIR, f + ".jpg")).convert("RGB") for f in names]
  out, labels = np.zeros((n, size, size, 3), np.uint8), np.arange(n) % len(names)
  for i, label in enumerate(labels):
    w, h = photos[label].size
    side = int(min(w, h) * np.sqrt(rng.uniform(0.05, 0.5)))
    x, y = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
    crop = photos[label].crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
    out[i] = np.asarray(crop)
  return out, labels.astype(np.int32)


def write_folder(root: str, images, labels) -> str:
  """The MAE folder layout (lossless PNGs) of the images, as train and val:
  the tasks read its length and classes (the batches come from here)."""
  for split in ("train", "val"):
    for i, (img, label) in enumerate(zip(images, labels)):
      folder = os.path.join(root, split, f"c{label:02d}")
      os.makedirs(folder, exist_ok=True)
      Image.fromarray(img).save(os.path.join(folder, f"{i:04d}.png"))
  return root


def batch_order(run: Run) -> list[np.ndarray]:
  """Image indices of every optimizer step: a seeded permutation per epoch."""
  rng = np.random.default_rng(run.seed + 1)
  order = []
  for _ in range(run.epochs):
    perm = rng.permutation(run.images)
    order += [perm[s * run.batch:(s + 1) * run.batch] for s in range(run.steps_per_epoch)]
  return order


def torch_images(images) -> torch.Tensor:
  x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
  return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def masking_noise(run: Run, num_tokens: int) -> list:
  """Per optimizer step and micro-batch, the uniform draws our step makes from
  its key (state.rng -> split -> one key per micro-batch; U[0, 1) for random
  masking, U[0, SBM_NOISE_SCALE) for SBM / SBAM): the reference masks with them."""
  rng, micro = jax.random.PRNGKey(run.seed), run.batch // run.accum
  out = []
  for _ in range(run.steps):
    rng, step_key = jax.random.split(rng)
    step = []
    for key in jax.random.split(step_key, run.accum):
      shape = (micro, num_tokens)
      step.append((np.asarray(jax.random.uniform(key, shape, np.float32)),
                   np.asarray(jax.random.uniform(key, shape, np.float32, 0.0,
                                                 masking.SBM_NOISE_SCALE))))
    out.append(step)
  return out


# ---- our side ------------------------------------------------------------------

TASKS = {"pretrain": PretrainTask, "finetune": FinetuneTask, "linprobe": LinprobeTask}


def build_task(run: Run, root: str, workdir: str, patch=None):
  """The task as train.py builds it; `patch(task)` may change it before the
  step is compiled (the negative controls)."""
  task = TASKS[run.task](run.config(root), workdir)
  if patch is not None:
    patch(task)
  return task


def initial_state(task):
  """A fresh state and its shardings, as the training loop makes them."""
  abstract = jax.eval_shape(lambda: task.init_state(False))
  replicated = NamedSharding(task.mesh, P())
  state_sh = sharding.tree_shardings(task.mesh, abstract).replace(rng=replicated, step=replicated)
  return jax.device_put(task.init_state(False), state_sh), state_sh


def torch_named(tree) -> dict:
  return {k: np.array(v) for k, v in params_to_torch(jax.device_get(tree)).items()}


def run_ours(task, run: Run, images, labels) -> dict:
  """Train with the task's jitted step; per-step loss and lr, final parameters."""
  state, state_sh = initial_state(task)
  step_fn = task.train_step(state_sh)
  losses, lrs = [], []
  for t, idx in enumerate(batch_order(run)):
    batch = {"image": images[idx]}
    if run.task != "pretrain":
      batch["label"] = labels[idx]
    lrs.append(float(task.lr(t)))
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics["loss"]))
  out = {"loss": np.asarray(losses), "lr": np.asarray(lrs), "params": torch_named(state.params)}
  if run.task == "linprobe":
    stats = jax.device_get(state.stats)["head_bn"]
    out["params"].update({"head_bn.running_mean": np.array(stats["mean"]),
                          "head_bn.running_var": np.array(stats["var"])})
  return out


def initial_weights(task) -> dict:
  """The task's initial state as a reference state dict (all trees merged)."""
  state = jax.device_get(task.init_state(False))
  stats = {k: v for k, v in state.stats.items() if k != "head_bn"}
  return {k: torch.from_numpy(np.array(v))
          for k, v in params_to_torch(param_ckpt.deep_merge(state.params, state.fixed,
                                                            stats)).items()}


# ---- the reference side ----------------------------------------------------------

def _group_size(run: Run) -> int:
  group = run.masking.get("group", "device")
  return 1 if group == "sample" else run.batch // run.accum  # one device: device = global


def _pretrain_reference(run: Run, weights, model_cfg):
  model = tr.TorchMAE.from_config(model_cfg)
  model.load_state_dict(weights, strict=True)
  opt = torch.optim.AdamW(tr.pretrain_param_groups(model, run.weight_decay), lr=0.0,
                          betas=(0.9, 0.95), eps=1e-8)
  m = run.masking
  r0, v, delta = m.get("mask_ratio", 0.75), m.get("ratio_var", 0.1), m.get("delta", 0.5)
  L, switch = model_cfg.num_patches, run.steps_per_epoch * run.random_epochs

  def loss_at(t):
    def loss(mb, rev):
      x, u_rand, u_sbm = (a.flip(0) if rev else a for a in mb)
      if t < switch or m.get("method", "sbam") == "random":
        ids, keep = torch.argsort(u_rand, dim=1), [tr.exact_keep_length(L, r0)] * len(x)
      else:
        with torch.no_grad():
          tokens = model.tokens(x)
        ids, keep = tr.torch_sbam_ids(tokens, u_sbm, r0, v, delta, _group_size(run))
      if rev:  # kept and masked tokens each in reverse order: the same loss
        ids = torch.stack([torch.cat([r[:k].flip(0), r[k:].flip(0)]) for r, k in zip(ids, keep)])
      return model(x, ids, keep)[0]
    return loss

  return model, opt, loss_at


def _classify_reference(run: Run, weights, model_cfg, num_classes: int):
  c = model_cfg
  vit = tr.TorchViT(c.img_size, c.patch_size, c.embed_dim, c.depth, c.num_heads, num_classes,
                    global_pool=run.task == "finetune")
  vit.load_state_dict(weights, strict=True)
  if run.task == "finetune":
    groups, _ = tr.mae_param_groups_lrd(vit, run.weight_decay, run.layer_decay)
    opt = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), eps=1e-8)
    model, smoothing = vit, run.smoothing
  else:
    model, smoothing = tr.TorchProbe(vit), 0.0
    opt = tr.TorchLARS(vit.head.parameters(), weight_decay=run.weight_decay)

  def loss_at(t):
    del t
    def loss(mb, rev):
      x, y = (a.flip(0) if rev else a for a in mb)
      order = torch.arange(model_cfg.num_patches).flip(0) if rev else None
      return F.cross_entropy(model(x, order), y, label_smoothing=smoothing)
    return loss

  return model, opt, loss_at


def run_reference(run: Run, task, images, labels, noise=None, reorder: bool = False) -> dict:
  """The PyTorch recipe from the task's initial weights; `reorder`: the same
  arithmetic in another summation order (micro-batches, samples and tokens
  reversed)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # a tiny model: one thread is as fast and never waits on a busy core
  try:
    return _run_reference(run, task, images, labels, noise, reorder)
  finally:
    torch.set_num_threads(threads)


def _run_reference(run: Run, task, images, labels, noise, reorder: bool) -> dict:
  weights = initial_weights(task)
  if run.task == "pretrain":
    model, opt, loss_at = _pretrain_reference(run, weights, task.model_cfg)
  else:
    model, opt, loss_at = _classify_reference(run, weights, task.model_cfg, task.num_classes)
  loop = tr.ReferenceLoop(opt, run.lr_fn(), run.steps_per_epoch, run.accum, reorder=reorder)
  model.train()
  losses, lrs = [], []
  for t, idx in enumerate(batch_order(run)):
    x = torch_images(images[idx]).chunk(run.accum)
    if run.task == "pretrain":
      mbs = [(xi, torch.tensor(a), torch.tensor(b)) for xi, (a, b) in zip(x, noise[t])]
    else:
      mbs = list(zip(x, torch.from_numpy(labels[idx].astype(np.int64)).chunk(run.accum)))
    loss, lr = loop.step(t, mbs, loss_at(t))
    losses.append(loss)
    lrs.append(lr)
  params = {k.removeprefix("vit."): p.detach().numpy().copy()
            for k, p in model.named_parameters() if p.requires_grad}
  if run.task == "linprobe":
    params.update({"head_bn.running_mean": model.head_bn.running_mean.numpy().copy(),
                   "head_bn.running_var": model.head_bn.running_var.numpy().copy()})
  return {"loss": np.asarray(losses), "lr": np.asarray(lrs), "params": params}


# ---- comparison --------------------------------------------------------------------

def loss_rel(a: dict, b: dict) -> np.ndarray:
  return np.abs(a["loss"] - b["loss"]) / np.abs(b["loss"])


def param_rel(a: dict, b: dict) -> float:
  """||a - b|| / ||b|| over every trainable tensor (and BatchNorm statistics)."""
  if sorted(a["params"]) != sorted(b["params"]):
    raise ValueError(f"different tensors: {sorted(set(a['params']) ^ set(b['params']))}")
  num = sum(np.sum((a["params"][k].astype(np.float64) - v) ** 2) for k, v in b["params"].items())
  den = sum(np.sum(v.astype(np.float64) ** 2) for v in b["params"].values())
  return float(np.sqrt(num / den))


def summarize(ours: dict, ref: dict, reord: dict, factor: float = BOUND_FACTOR) -> dict:
  """Ours against the reference, held to `factor` x what reordering alone gives."""
  ours_loss, noise_loss = loss_rel(ours, ref), loss_rel(reord, ref)
  s = {"steps": len(ref["loss"]),
       "loss_rel_max": float(ours_loss.max()), "loss_rel_final": float(ours_loss[-1]),
       "reorder_loss_rel_max": float(noise_loss.max()),
       "param_rel": param_rel(ours, ref), "reorder_param_rel": param_rel(reord, ref),
       "lr_rel_max": float(np.max(np.abs(ours["lr"] - ref["lr"]) / np.maximum(ref["lr"], 1e-30))),
       "loss_first": float(ref["loss"][0]), "loss_last": float(ref["loss"][-1]),
       "factor": factor}
  s["loss_bound"] = factor * max(s["reorder_loss_rel_max"], FLOOR)
  s["param_bound"] = factor * max(s["reorder_param_rel"], FLOOR)
  s["ok"] = s["loss_rel_max"] <= s["loss_bound"] and s["param_rel"] <= s["param_bound"]
  return s


def compare_task(run: Run, root: str, images, labels, workdir: str, patch=None,
                 references=None) -> tuple[dict, dict, dict, dict]:
  """(summary, ours, reference, reordered reference); `references` reuses a
  previous pair of reference runs (the negative controls change ours only)."""
  task = build_task(run, root, workdir, patch)
  noise = masking_noise(run, task.model_cfg.num_patches) if run.task == "pretrain" else None
  if references is None:
    references = (run_reference(run, task, images, labels, noise),
                  run_reference(run, task, images, labels, noise, reorder=True))
  ours = run_ours(task, run, images, labels)
  ref, reord = references
  return summarize(ours, ref, reord), ours, ref, reord


# ---- the long version ------------------------------------------------------------------

LONG = {
    # 4 steps an epoch: warm-up ends at step 40, SBAM (AMR per micro-batch) from step 60.
    "pretrain": Run("pretrain", images=32, batch=8, accum=2, epochs=50, warmup_epochs=10,
                    blr=5e-3, random_epochs=15, masking=dict(method="sbam", ratio_var=0.1,
                                                               group="device")),
    "finetune": Run("finetune", images=32, batch=8, epochs=26, warmup_epochs=5, blr=5e-3,
                    min_lr=1e-6, layer_decay=0.75),
    "linprobe": Run("linprobe", images=32, batch=8, epochs=26, warmup_epochs=5, blr=2.0,
                    weight_decay=0.0),
}


def plot(name: str, run: Run, ours: dict, ref: dict, reord: dict, s: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  steps = np.arange(len(ref["loss"]))
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
  top.plot(steps, ref["loss"], label="PyTorch reference", lw=2.5, color="0.6")
  top.plot(steps, ours["loss"], label="sbam_jax", lw=1.0, color="C0")
  if run.task == "pretrain":
    top.axvline(run.steps_per_epoch * run.random_epochs, ls=":", color="C3", label="random -> SBAM")
  top.axvline(run.steps_per_epoch * run.warmup_epochs, ls="--", color="C2", label="warm-up end")
  top.set_ylabel("training loss")
  top.set_title(f"{name}: {s['steps']} optimizer steps, tiny ViT, float32")
  top.legend()
  floor = lambda r: np.maximum(r, FLOOR / 10)
  bottom.semilogy(steps, floor(loss_rel(ours, ref)), label="|ours - ref| / |ref|", color="C0")
  bottom.semilogy(steps, floor(loss_rel(reord, ref)), label="|ref reordered - ref| / |ref|",
                  color="0.5")
  bottom.axhline(s["loss_bound"], ls="--", color="C3",
                 label=f"bound: {s['factor']:g} x max reordering")
  bottom.set_xlabel("optimizer step")
  bottom.set_ylabel("per-step loss relative difference")
  bottom.legend(fontsize=8)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=90)
  plt.close(fig)
  os.replace(tmp, path)


def write_curves(path: str, ours: dict, ref: dict, reord: dict) -> None:
  """Per-step lr and losses, so another implementation can be laid beside them."""
  lines = ["step,lr,loss_reference,loss_reference_reordered,loss_sbam_jax"]
  for t in range(len(ref["loss"])):
    lines.append(f"{t},{ref['lr'][t]:.9g},{ref['loss'][t]:.9g},{reord['loss'][t]:.9g},"
                 f"{ours['loss'][t]:.9g}")
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(path + ".tmp", path)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "parity"))
  ap.add_argument("--tasks", default=",".join(LONG))
  args = ap.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  rows, failed = {}, False
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.tasks.split(","):
      run = LONG[name]
      images, labels = demo_images(run.images, seed=run.seed)
      root = write_folder(os.path.join(tmp, name + "_data"), images, labels)
      t0 = time.time()
      print(f"{name}: {run.steps} optimizer steps, ours and the reference twice ...", flush=True)
      s, ours, ref, reord = compare_task(run, root, images, labels, os.path.join(tmp, name))
      s["seconds"] = round(time.time() - t0, 1)
      plot(name, run, ours, ref, reord, s, os.path.join(args.out, f"{name}.png"))
      write_curves(os.path.join(args.out, f"{name}.csv"), ours, ref, reord)
      rows[name] = s
      failed |= not s["ok"]
      print(json.dumps({"task": name, **s}), flush=True)
  path = os.path.join(args.out, "numbers.json")
  with open(path + ".tmp", "w") as f:
    json.dump(rows, f, indent=1)
  os.replace(path + ".tmp", path)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
