"""Training-curve parity: our tasks against the plain-PyTorch MAE recipe, many steps.

Trains the reference (`tests/torch_reference.py`) and our trainer side by side
on the same images in the same order, from the same initial weights (through
the converter), with the same masks, in float32:

  pretrain_* PretrainTask (AdamW + decay mask, warm-up + cosine, accumulation,
             random masking until `random_epochs`, then the mode's: random,
             SBM, or SBAM with the AMR ratio per sample / device / global batch)
  finetune   FinetuneTask (AdamW, layer-wise lr decay, label smoothing)
  linprobe   LinprobeTask (frozen encoder, BatchNorm + Linear, LARS)

Our side is the task objects' `init_state` and jitted `train_step`; its loss
reports each micro-batch's masking key and mask (`pretrain_loss(on_plan=)`).
The reference runs MAE's engine (lr set per optimizer step, `loss /
accum_iter` backward) on exactly those masks and builds its own from the
reported key (its own switch step, salience, AMR group, SBM order): a sample
whose kept tokens differ is a mask mismatch, which fails the comparison.

The float32 noise ours is held to: the reference run again in another
summation order (micro-batches, the samples in each and the tokens of each
sequence reversed: the same mathematics) and in float64 (the reference's own
float32 error); ours must stay within `BOUND_FACTOR` x the larger of the two.

  python benchmarks/parity_curves.py --out benchmarks/parity   # long version, ~8 min

The long version runs on two simulated CPU devices (XLA_FLAGS, unless set), so
that the 'device' AMR group (half of each micro-batch) differs from 'global'.
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
if __name__ == "__main__":  # before jax starts: two devices, so 'device' != 'global' groups
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from PIL import Image  # noqa: E402

import torch_reference as tr  # noqa: E402
from sbam_jax import checkpoints as param_ckpt  # noqa: E402
from sbam_jax import masking, sharding  # noqa: E402
from sbam_jax.convert import params_to_torch  # noqa: E402
from sbam_jax.data.demo import PHOTO_DIR, photo_names  # noqa: E402
from sbam_jax.train.classify import FinetuneTask, LinprobeTask  # noqa: E402
from sbam_jax.train.pretrain import PretrainTask  # noqa: E402

from benchmarks.parity_figures import FLOOR, loss_rel, plot, write_curves  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BOUND_FACTOR = 4.0    # ours vs ref <= this x max(ref vs reordered ref, ref vs float64 ref)


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
  b2: float = 0.999     # ours only: the reference always uses MAE's 0.999
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
        c.update(layer_decay=self.layer_decay, b2=self.b2)
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


def key_noise(key, shape, method: str) -> torch.Tensor:
  """The masking API's documented draw from a masking key: U[0, 1) for random
  masking, U[0, SBM_NOISE_SCALE) for SBM / SBAM (`masking.random_mask_plan`,
  `masking.sbam_mask_plan`)."""
  key = jnp.asarray(key, jnp.uint32)
  hi = 1.0 if method == masking.RANDOM else masking.SBM_NOISE_SCALE
  return torch.from_numpy(np.array(jax.random.uniform(key, shape, jnp.float32, 0.0, hi)))


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
  """Train with the task's jitted step; per-step loss and lr, final parameters
  and (pre-training) per step and micro-batch the (key, ids_shuffle, len_keep)
  the loss used."""
  records = []
  if run.task == "pretrain":
    task.on_plan = lambda *a: records.append(tuple(np.asarray(x) for x in a))
  state, state_sh = initial_state(task)
  step_fn = task.train_step(state_sh)
  losses, lrs, plans = [], [], []
  for t, idx in enumerate(batch_order(run)):
    batch = {"image": images[idx]}
    if run.task != "pretrain":
      batch["label"] = labels[idx]
    lrs.append(float(task.lr(t)))
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics["loss"]))
    if run.task == "pretrain":
      jax.effects_barrier()  # every micro-batch's report has arrived
      if [int(r[0]) for r in records] != [t] * run.accum:
        raise RuntimeError(f"step {t}: mask reports for steps {[int(r[0]) for r in records]}")
      plans.append([r[1:] for r in records])  # micro-batches in order (scan order)
      records.clear()
  out = {"loss": np.asarray(losses), "lr": np.asarray(lrs), "params": torch_named(state.params),
         "plans": plans}
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

def group_size(run: Run) -> int:
  """Samples per AMR ratio, in the reference's words: the micro-batch is what
  one MAE process sees per GPU times the devices."""
  micro = run.batch // run.accum
  return {"sample": 1, "device": micro // jax.device_count(),
          "global": micro}[run.masking.get("group", "device")]


def reference_plan(model, run: Run, t: int, x, key):
  """(ids_shuffle, keep lengths) the reference's own rule gives: random
  masking before its switch step or for method 'random', else SBM / AMR on its
  own tokens, with the noise drawn from the reported key."""
  m, L = run.masking, model.pos_embed.shape[1] - 1
  r0 = m.get("mask_ratio", 0.75)
  if t < run.steps_per_epoch * run.random_epochs or m.get("method", "sbam") == "random":
    ids = torch.argsort(key_noise(key, (len(x), L), masking.RANDOM), dim=1)
    return ids, [tr.exact_keep_length(L, r0)] * len(x)
  with torch.no_grad():
    tokens = model.tokens(x)
  return tr.torch_sbam_ids(tokens, key_noise(key, (len(x), L), masking.SBAM), r0,
                           m.get("ratio_var", 0.1), m.get("delta", 0.5), group_size(run))


def _pretrain_reference(run: Run, weights, model_cfg, own: list | None):
  """`own` (a list) collects the reference's own plan of every micro-batch."""
  model = tr.TorchMAE.from_config(model_cfg)
  model.load_state_dict(weights, strict=True)
  opt = torch.optim.AdamW(tr.pretrain_param_groups(model, run.weight_decay), lr=0.0,
                          betas=(0.9, 0.95), eps=1e-8)

  def loss_at(t):
    def loss(mb, rev):
      x, (key, ids, keep) = mb
      if own is not None:
        own.append((t, *reference_plan(model, run, t, x, key)))
      ids, keep = torch.from_numpy(ids.astype(np.int64)), keep.tolist()
      if rev:  # samples, and kept and masked tokens each, in reverse order: the same loss
        ids = torch.stack([torch.cat([r[:k].flip(0), r[k:].flip(0)]) for r, k in zip(ids, keep)])
        x, ids, keep = x.flip(0), ids.flip(0), keep[::-1]
      return model(x, ids, keep)[0]
    return loss

  return model, opt, loss_at


def _classify_reference(run: Run, weights, model_cfg, num_classes: int):
  model, opt, loss = tr.classify_reference(
      run.task, model_cfg, weights, num_classes, weight_decay=run.weight_decay,
      layer_decay=run.layer_decay, smoothing=run.smoothing)
  return model, opt, lambda t: loss


VARIANTS = ("plain", "reorder", "float64")


def run_reference(run: Run, task, images, labels, plans=None, variant: str = "plain") -> dict:
  """The PyTorch recipe from the task's initial weights, pre-training on our
  `plans` ('plain' also builds its own to compare). 'reorder': the same
  arithmetic in another summation order (micro-batches, samples and tokens
  reversed); 'float64': the same recipe in float64 (what the float32 runs
  approximate)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # a tiny model: one thread is as fast and never waits on a busy core
  try:
    return _run_reference(run, task, images, labels, plans, VARIANTS.index(variant))
  finally:
    torch.set_num_threads(threads)


def _run_reference(run: Run, task, images, labels, plans, variant: int) -> dict:
  weights = initial_weights(task)
  own = [] if variant == 0 and run.task == "pretrain" else None
  if run.task == "pretrain":
    model, opt, loss_at = _pretrain_reference(run, weights, task.model_cfg, own)
  else:
    model, opt, loss_at = _classify_reference(run, weights, task.model_cfg, task.num_classes)
  dtype = torch.float64 if variant == 2 else torch.float32
  model.to(dtype)  # the optimizers' state is created lazily: float64 too
  loop = tr.ReferenceLoop(opt, run.lr_fn(), run.steps_per_epoch, run.accum, reorder=variant == 1)
  model.train()
  losses, lrs = [], []
  for t, idx in enumerate(batch_order(run)):
    x = torch_images(images[idx]).to(dtype).chunk(run.accum)
    if run.task == "pretrain":
      mbs = list(zip(x, plans[t]))
    else:
      mbs = list(zip(x, torch.from_numpy(labels[idx].astype(np.int64)).chunk(run.accum)))
    loss, lr = loop.step(t, mbs, loss_at(t))
    losses.append(loss)
    lrs.append(lr)
  params = {k.removeprefix("vit."): p.detach().numpy().copy()
            for k, p in model.named_parameters() if p.requires_grad}
  if run.task == "linprobe":
    params.update({f"head_bn.running_{k}": getattr(model.head_bn, f"running_{k}").numpy().copy()
                   for k in ("mean", "var")})
  return {"loss": np.asarray(losses), "lr": np.asarray(lrs), "params": params, "own_plans": own}


# ---- comparison --------------------------------------------------------------------

def param_rel(a: dict, b: dict) -> float:
  """||a - b|| / ||b|| over every trainable tensor (and BatchNorm statistics)."""
  if sorted(a["params"]) != sorted(b["params"]):
    raise ValueError(f"different tensors: {sorted(set(a['params']) ^ set(b['params']))}")
  num = sum(np.sum((a["params"][k].astype(np.float64) - v) ** 2) for k, v in b["params"].items())
  den = sum(np.sum(v.astype(np.float64) ** 2) for v in b["params"].values())
  return float(np.sqrt(num / den))


def mask_check(ours: dict, ref: dict, switch: int) -> dict:
  """Samples whose kept tokens (as a set) or keep length differ between the
  masks our loss used and the reference's own; the keep lengths from step
  `switch` on (how the AMR group spreads them)."""
  mismatch, total, keeps = 0, 0, []
  for (t, own_ids, own_keep), (step, (_, ids, keep)) in zip(
      ref["own_plans"], ((t, p) for t, step in enumerate(ours["plans"]) for p in step)):
    if t != step:
      raise ValueError(f"reference plan of step {t} beside ours of step {step}")
    for a, ka, b, kb in zip(ids, keep, own_ids.numpy(), own_keep):
      total += 1
      mismatch += int(ka != kb or set(a[:ka].tolist()) != set(b[:kb].tolist()))
    keeps += keep.tolist() if t >= switch else []
  return {"mask_mismatch": mismatch, "masks": total,
          "keep_min": int(min(keeps)), "keep_max": int(max(keeps))}


def summarize(ours: dict, ref: dict, reord: dict, ref64: dict, factor: float = BOUND_FACTOR,
              switch: int = 0) -> dict:
  """Ours against the reference, held to `factor` x the larger of what
  reordering alone gives and the reference's own float32 error (against its
  float64 run); pre-training also needs every mask to agree."""
  ours_loss = loss_rel(ours, ref)
  s = {"steps": len(ref["loss"]),
       "loss_rel_max": float(ours_loss.max()), "loss_rel_final": float(ours_loss[-1]),
       "reorder_loss_rel_max": float(loss_rel(reord, ref).max()),
       "f32_loss_rel_max": float(loss_rel(ref, ref64).max()),
       "ours_f64_loss_rel_max": float(loss_rel(ours, ref64).max()),
       "param_rel": param_rel(ours, ref), "reorder_param_rel": param_rel(reord, ref),
       "f32_param_rel": param_rel(ref, ref64), "ours_f64_param_rel": param_rel(ours, ref64),
       "lr_rel_max": float(np.max(np.abs(ours["lr"] - ref["lr"]) / np.maximum(ref["lr"], 1e-30))),
       "loss_first": float(ref["loss"][0]), "loss_last": float(ref["loss"][-1]),
       "factor": factor}
  s["loss_bound"] = factor * max(s["reorder_loss_rel_max"], s["f32_loss_rel_max"], FLOOR)
  s["param_bound"] = factor * max(s["reorder_param_rel"], s["f32_param_rel"], FLOOR)
  s["ok"] = s["loss_rel_max"] <= s["loss_bound"] and s["param_rel"] <= s["param_bound"]
  if ref.get("own_plans") is not None:
    s.update(mask_check(ours, ref, switch))
    s["ok"] = s["ok"] and s["mask_mismatch"] == 0
  return s


def compare_task(run: Run, root: str, images, labels, workdir: str, patch=None,
                 references=None) -> tuple:
  """(summary, ours, references): the reference runs of VARIANTS; `references`
  reuses earlier ones (the negative controls change ours only)."""
  task = build_task(run, root, workdir, patch)
  ours = run_ours(task, run, images, labels)
  if references is None:
    references = tuple(run_reference(run, task, images, labels, ours.get("plans"), v)
                       for v in VARIANTS)
  return summarize(ours, *references, switch=switch_step(run)), ours, references


def switch_step(run: Run) -> int:
  """The first step with the mode's own masking (0 for random masking throughout)."""
  return 0 if run.masking.get("method") == "random" else run.steps_per_epoch * run.random_epochs


# ---- the long version ------------------------------------------------------------------

# Pre-training masking modes: (random_epochs, masking config). SBM is SBAM with v = 0.
MODES = {
    "random": (0, dict(method="random")),
    "sbm": (None, dict(method="sbam", ratio_var=0.0)),
    "sbam_sample": (None, dict(method="sbam", ratio_var=0.1, group="sample")),
    "sbam_device": (None, dict(method="sbam", ratio_var=0.1, group="device")),
    "sbam_global": (None, dict(method="sbam", ratio_var=0.1, group="global")),
}


def pretrain_runs(random_epochs: int, **kw) -> dict:
  """'pretrain_<mode>' -> Run for every mode (None: the given random_epochs)."""
  return {f"pretrain_{mode}": Run("pretrain", masking=m, **kw,
                                  random_epochs=random_epochs if r is None else r)
          for mode, (r, m) in MODES.items()}


FINETUNE = dict(images=32, batch=8, epochs=26, warmup_epochs=5, blr=5e-3, min_lr=1e-6,
                layer_decay=0.75)
LONG = {
    # 4 steps an epoch: warm-up ends at step 40, the mode's masking from step 60.
    **pretrain_runs(15, images=32, batch=8, accum=2, epochs=50, warmup_epochs=10, blr=5e-3),
    "finetune": Run("finetune", **FINETUNE),
    "linprobe": Run("linprobe", images=32, batch=8, epochs=26, warmup_epochs=5, blr=2.0,
                    weight_decay=0.0),
}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "parity"))
  ap.add_argument("--tasks", default=",".join(LONG))
  args = ap.parse_args(argv)
  names = args.tasks.split(",")
  if set(names) - set(LONG):
    print(f"error: --tasks: unknown {sorted(set(names) - set(LONG))}; choose from {list(LONG)}",
          file=sys.stderr)
    return 2
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "numbers.json")
  rows, failed = {}, False
  if os.path.exists(path):  # a run of a few tasks keeps the others' numbers
    with open(path) as f:
      rows = {k: v for k, v in json.load(f).items() if k in LONG}
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      run = LONG[name]
      images, labels = demo_images(run.images, seed=run.seed)
      root = write_folder(os.path.join(tmp, name + "_data"), images, labels)
      t0 = time.time()
      print(f"{name}: {run.steps} optimizer steps, ours and the reference three times (plain, reordered, float64) ...", flush=True)
      s, ours, refs = compare_task(run, root, images, labels, os.path.join(tmp, name))
      s.update(seconds=round(time.time() - t0, 1), devices=jax.device_count())
      plot(name, ours, refs, s, os.path.join(args.out, f"{name}.png"), switch=switch_step(run),
           warmup_end=run.steps_per_epoch * run.warmup_epochs)
      write_curves(os.path.join(args.out, f"{name}.csv"), ours, refs)
      rows[name] = s
      failed |= not s["ok"]
      print(json.dumps({"task": name, **s}), flush=True)
  with open(path + ".tmp", "w") as f:
    json.dump({k: rows[k] for k in LONG if k in rows}, f, indent=1)
  os.replace(path + ".tmp", path)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
