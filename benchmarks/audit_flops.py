"""FLOP audit of the compiled pre-training step: XLA's count against an analytic one.

The step is the trainer's own: `PretrainTask.train_step` (jit with the
trainer's shardings) on a synthetic batch of what the host sends (uint8 2S
crops + sizes + flips, resized on the device). Every `jax.jit` the task
creates while it runs one step is lowered and compiled with the step's real
arguments and its `cost_analysis()` read; the train step itself is not run
(compile only), helper functions (the bucketed path's keep-length pre-pass,
or any other pre-pass a capacity strategy adds) are run and counted too.

Layers are unrolled (`model.scan_layers=False`): XLA counts a scanned loop
body once. Keep lengths are set, not drawn: `masking.amr_keep_lengths` is
replaced by a profile (start of training: every image keeps 68; end: mean
49), so every strategy sees the same keep lengths; salience is still
computed as in training. Waste = counted / ideal, ideal being the analytic
count at the exact per-image keep lengths (`analytic_flops`).

  python benchmarks/audit_flops.py                       # ViT-B/L/H, every strategy
  python benchmarks/audit_flops.py --sizes base --out /tmp/flops.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import sys
import tempfile
import time
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import pretrain as pretrain_recipe  # noqa: E402
from sbam_jax import config as config_lib  # noqa: E402
from sbam_jax import masking, sharding  # noqa: E402
from sbam_jax.train import pretrain  # noqa: E402
from sbam_jax.train.step import TrainState  # noqa: E402

METHODS = ("random", "sbm", "sbam")
RECIPE_METHOD = {"random": "mae", "sbm": "sbm", "sbam": "sbam"}


# ---- the task, as the trainer builds it ---------------------------------------

class _Synthetic:
  """A data source that only states its size (no files, no TensorFlow)."""

  def __init__(self, num_examples: int):
    self.num_examples = num_examples


class AuditTask(pretrain.PretrainTask):
  """The pre-training task with a synthetic source; everything else as trained."""

  def source(self, split=None):
    return _Synthetic(self.config.batch_size * 10)

  def batch_keys(self) -> tuple:
    return tuple(input_spec(self))


def input_spec(task) -> dict:
  """{key: (shape, dtype)} per image the host sends: as
  `transforms.output_spec` (not imported: that module needs TensorFlow)."""
  s = task.image_size
  if task.config.data.device_resize:
    return {"image": ((2 * s, 2 * s, 3), np.uint8), "size": ((2,), np.int32),
            "flip": ((), np.bool_)}
  return {"image": ((s, s, 3), np.uint8)}


def make_config(size: str, method: str, *, group: str = "device", capacity: str = "max",
                batch: int = 8, fsdp: int = 1, remat: bool = False, scan: bool = False,
                dtype: str = "float32", depths: tuple | None = None):
  """The pre-train recipe for `size`/`method`, one micro-step of `batch`,
  masking as configured from step 0 (no random-masking phase, no evaluators)."""
  c = pretrain_recipe.get_config(f"{size},{RECIPE_METHOD[method]}")
  c.model.scan_layers = scan
  c.model.remat = remat
  c.model.dtype = dtype
  if depths is not None:  # (encoder, decoder) blocks; see `per_layer_counts`
    c.model.depth, c.model.decoder_depth = depths
  c.masking.group = group
  c.masking.capacity = capacity
  c.batch_size = batch
  c.accum_steps = 1
  c.random_epochs = 0
  c.mesh.fsdp = fsdp
  c.evals = {}
  return c


def make_task(config) -> AuditTask:
  return AuditTask(config, tempfile.mkdtemp(prefix="audit_"))


def abstract_state(task):
  """(abstract TrainState, its shardings) exactly as the loop builds them."""
  abstract = jax.eval_shape(lambda: task.init_state(False))
  replicated = sharding.NamedSharding(task.mesh, sharding.P())
  shardings = sharding.tree_shardings(task.mesh, abstract).replace(rng=replicated,
                                                                   step=replicated)
  return abstract, shardings


def sharded_abstract(abstract, shardings):
  """The abstract state with its shardings attached (compile only)."""
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                      abstract, shardings)


def light_state(abstract):
  """A state whose parameters are zeros (helpers run on them) and whose
  optimizer state stays abstract (the step is only compiled)."""
  zeros = lambda t: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), t)
  return abstract.replace(step=jnp.zeros((), jnp.int32), params=zeros(abstract.params),
                          fixed=zeros(abstract.fixed), rng=jax.random.PRNGKey(0),
                          stats=zeros(abstract.stats))


def host_batch(task, seed: int = 0) -> dict:
  """Random host arrays in the task's input spec (crops of at least S / 2)."""
  rng = np.random.default_rng(seed)
  n, s = task.config.batch_size, task.image_size
  out = {}
  for key, (shape, dtype) in input_spec(task).items():
    if key == "size":
      out[key] = rng.integers(s // 2, 2 * s + 1, (n,) + shape).astype(dtype)
    else:
      out[key] = rng.integers(0, 256 if dtype == np.uint8 else 2, (n,) + shape).astype(dtype)
  return out


# ---- capturing what the step compiles ------------------------------------------

@contextlib.contextmanager
def keep_lengths(profile):
  """AMR keep lengths set to `profile` (tiled to the batch) wherever computed."""
  if profile is None:
    yield
    return
  original = masking.amr_keep_lengths

  def fixed(salience, **kw):
    # The real keep lengths are still computed (and kept live, so salience is
    # not optimised away) but never selected: they are never negative.
    real = original(salience, **kw)
    want = jnp.asarray(np.resize(np.asarray(profile, np.int32), salience.shape[0]))
    return jnp.where(real < 0, real, want)

  with mock.patch.object(masking, "amr_keep_lengths", fixed):
    yield
  assert masking.amr_keep_lengths is original


def abstract_batch(task) -> dict:
  """ShapeDtypeStructs of the global host batch (for compile-only captures)."""
  n = task.config.batch_size
  return {k: jax.ShapeDtypeStruct((n,) + shape, dtype)
          for k, (shape, dtype) in input_spec(task).items()}


def _shape_key(lowered) -> str:
  """A program's text without constant values: equal keys, equal counts."""
  text = re.sub(r"constant\([^)]*\)", "constant()", lowered.as_text())
  return hashlib.sha256(text.encode()).hexdigest()


def capture_step(task, state, shardings, batch, cache: dict | None = None):
  """Run one trainer step with every project `jax.jit` replaced by
  lower + compile: returns [(name, compiled)] in call order; `cache` reuses
  a compiled step whose program differs only in constant values. The train step
  (first argument a TrainState) is compiled only; helpers (host pre-passes)
  are also run, which needs concrete arguments. With an abstract state and
  batch (ShapeDtypeStructs) only strategies without a pre-pass can be captured."""
  records = []
  real_jit = jax.jit

  def recording_jit(fn, *args, **kwargs):
    jitted = real_jit(fn, *args, **kwargs)
    caller = sys._getframe(1).f_globals.get("__name__", "")  # pylint: disable=protected-access
    if not caller.startswith("sbam_jax."):
      return jitted

    def call(*a):
      # Only the step (never run) is cached: helpers run, so their constants matter.
      is_step = isinstance(a[0], TrainState)
      lowered = jitted.lower(*a)
      key = _shape_key(lowered) if cache is not None and is_step else None
      if key is None or key not in cache:
        compiled = lowered.compile()
        if key is not None:
          cache[key] = compiled
      compiled = cache[key] if key is not None else compiled
      records.append(("step" if is_step else getattr(fn, "__name__", "helper"), compiled))
      return (a[0], {}) if is_step else compiled(*a)
    return call

  def assemble(mesh, local):
    if isinstance(local, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(local.shape, local.dtype,
                                  sharding=sharding.batch_sharding(mesh))
    return real_global_batch(mesh, local)

  real_global_batch = sharding.global_batch
  with mock.patch.object(jax, "jit", recording_jit), \
       mock.patch.object(sharding, "global_batch", assemble):
    task.train_step(shardings)(state, batch)
  return records


def flops_of(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


# ---- the analytic count -------------------------------------------------------------
# Matmuls: 2 FLOPs per multiply-add, a backward pass twice the forward. The
# elementwise constants are XLA's own per-element counts (forward + backward)
# of this implementation, read once off ViT-B depth-1/2 models (README of the
# audit in RESULTS.md); together they are ~1.5 % of a step.
EW_TOKEN = 530        # per token x width in one block (2 LayerNorms, exact GELU on 4x, residuals)
EW_LOGIT = 12.8       # per attention logit (scale, key mask, softmax)
EW_PIXEL = 60         # per target pixel value (norm-pix target, squared error, mask)
EW_SALIENCE = 220     # per token pair (exact affinity split, two-sums, softmax, sums)
OPT_PER_PARAM = 35    # per parameter and step (accumulate, AdamW, apply, norm, finite check)


def block_flops(tokens: int, d: int, heads: int, mlp_ratio: float) -> float:
  """One transformer block, forward + backward, on `tokens` tokens."""
  t = tokens
  matmul = 2 * t * (4 + 2 * mlp_ratio) * d * d + 4 * t * t * d
  return 3 * matmul + EW_TOKEN * t * d + EW_LOGIT * heads * t * t


def image_flops(cfg, keep: int, *, salience: bool, device_resize: bool = True) -> dict:
  """Per-image FLOPs of the pre-training step, by part, with the encoder on
  1 + keep tokens (keep = the exact keep length for the ideal, the compiled
  capacity for the static-shape step)."""
  L, D, dd, P, S = cfg.num_patches, cfg.embed_dim, cfg.decoder_embed_dim, cfg.patch_dim, cfg.img_size
  t = 1 + keep
  return {
      # PIL-bicubic resize of a 2S canvas: horizontal pass (2S rows) then vertical.
      "resize": (2 * (2 * S) * S * (2 * S) * 3 + 2 * S * S * (2 * S) * 3) if device_resize else 0,
      # patch embedding forward + its weight gradient (no gradient to the pixels)
      "embed": 2 * 2 * L * P * D,
      # five L x L x D Gram matmuls of the exact affinity, no gradient
      "salience": (5 * 2 * L * L * D + EW_SALIENCE * L * L) if salience else 0,
      "encoder": cfg.depth * block_flops(t, D, cfg.num_heads, cfg.mlp_ratio),
      "decoder_embed": 3 * 2 * t * D * dd,
      "decoder": cfg.decoder_depth * block_flops(1 + L, dd, cfg.decoder_num_heads,
                                                 cfg.decoder_ratio),
      "pred": 3 * 2 * (1 + L) * dd * P,
      "loss": EW_PIXEL * L * P,
  }


def ideal_flops(cfg, keeps, *, salience: bool, device_resize: bool = True) -> float:
  """Mean per-image FLOPs with every image at its exact keep length."""
  return float(np.mean([sum(image_flops(cfg, int(k), salience=salience,
                                        device_resize=device_resize).values()) for k in keeps]))


# ---- the grid -------------------------------------------------------------------------
BATCH = 8                                   # compile batch (FLOPs are linear in it)
END_SPREAD = (-9, -6, -3, 0, 0, 3, 6, 9)    # per-image keep lengths around the mean, end of training


def profile(method: str, group: str, phase: str, num_patches: int = 196):
  """Keep lengths of the BATCH images (None: the method's fixed length).
  Start of training: AMR at r0 - v for every image (no token above delta
  yet; 68 of 196). End: ratio r0 on average (49 of 196), spread per image
  when each image has its own ratio, the mean for a shared (group) ratio."""
  if method != "sbam":
    return None
  spec = masking.MaskingSpec()
  if phase == "start":
    return (masking.max_capacity(spec, num_patches),) * BATCH
  mean = masking.fixed_keep_length(num_patches, spec.mask_ratio)
  return tuple(mean + d for d in END_SPREAD) if group == "sample" else (mean,) * BATCH


def cells(sizes, capacities, methods=METHODS, groups=config_lib.GROUPS):
  """(size, method, group, capacity, phase); group and phase matter for SBAM only."""
  for size in sizes:
    for capacity in capacities:
      for method in methods:
        for group in (groups if method == "sbam" else ("device",)):
          for phase in (("start", "end") if method == "sbam" else ("fixed",)):
            yield size, method, group, capacity, phase


def counted(size, method, group, capacity, keeps, cache, depths) -> tuple[float, float]:
  """(step FLOPs, helper FLOPs) XLA counts at `depths` (enc, dec) blocks."""
  task = make_task(make_config(size, method, group=group, capacity=capacity, batch=BATCH,
                               depths=depths))
  if task.pack is not None and keeps is not None:
    task.pack = chosen_budget(task.pack, keeps)
  abstract, shardings = abstract_state(task)
  with keep_lengths(keeps):
    records = capture_step(task, light_state(abstract), shardings, host_batch(task), cache)
  step = sum(flops_of(c) for name, c in records if name == "step")
  return step, sum(flops_of(c) for name, c in records if name != "step")


def chosen_budget(pack, keeps):
  """The packing spec cut to the one budget the step picks for `keeps`: XLA's
  count of a `lax.switch` is that of its largest branch, not of the branch
  that runs, so the audit compiles the chosen branch alone."""
  from sbam_jax.models import packing  # pylint: disable=g-import-not-at-top
  lengths = jnp.asarray(np.resize(np.asarray(keeps, np.int32), BATCH) + 1)
  index = int(packing.choose_budget(lengths, pack))
  return packing.PackSpec(pack.groups, (pack.budgets[index],))


def audit_cell(size, method, group, capacity, phase, cache, decoder_delta) -> dict:
  """One row: counted (layers extrapolated from depth-1/2 unrolled compiles,
  exact since every block of a stack is the same program) against ideal."""
  from sbam_jax.models import model_config  # pylint: disable=g-import-not-at-top
  cfg = model_config(size)
  keeps = profile(method, group, phase, cfg.num_patches)
  t0 = time.perf_counter()
  f11, helper = counted(size, method, group, capacity, keeps, cache, (1, 1))
  f21, _ = counted(size, method, group, capacity, keeps, cache, (2, 1))
  if size not in decoder_delta:  # the decoder block does not depend on masking
    decoder_delta[size] = counted(size, method, group, capacity, keeps, cache, (1, 2))[0] - f11
  step = f11 + (cfg.depth - 1) * (f21 - f11) + (cfg.decoder_depth - 1) * decoder_delta[size]
  task = make_task(make_config(size, method, group=group, capacity=capacity, batch=BATCH))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state(task)[0].params))
  opt = OPT_PER_PARAM * n_params
  per_image = (step - opt + helper) / BATCH
  salience = method != "random"
  fixed = masking.fixed_keep_length(cfg.num_patches, task.spec.mask_ratio)
  exact = keeps if keeps is not None else (fixed,) * BATCH
  ideal = ideal_flops(cfg, exact, salience=salience)
  row = dict(size=size, method=method, group=group, capacity=capacity, phase=phase,
             mean_keep=float(np.mean(exact)), max_keep=int(max(exact)),
             counted_gflops_per_img=round(per_image / 1e9, 3),
             ideal_gflops_per_img=round(ideal / 1e9, 3), waste=round(per_image / ideal, 4),
             helper_gflops_per_img=round(helper / BATCH / 1e9, 3),
             optimizer_gflops_per_step=round(opt / 1e9, 2),
             audit_s=round(time.perf_counter() - t0, 1))
  if task.pack is not None and keeps is not None:  # tokens computed / tokens kept (+ cls)
    row["budget_tokens"] = chosen_budget(task.pack, keeps).budgets[0]
    row["kept_tokens"] = int(np.sum(np.asarray(keeps) + 1))
  if capacity == "max":  # the formula at the compiled shapes against XLA's count
    at_cap = ideal_flops(cfg, [task.capacity], salience=salience)
    row["formula_vs_counted"] = round(at_cap / per_image, 4)
  return row


def table(rows) -> str:
  head = ("| model | method | group | capacity | phase | mean keep | counted GFLOP/img "
          "| ideal GFLOP/img | waste | formula / counted |")
  out = [head, "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    check = f"{r['formula_vs_counted']:.4f}" if "formula_vs_counted" in r else ""
    out.append(f"| {r['size']} | {r['method']} | {r['group']} | {r['capacity']} | {r['phase']} "
               f"| {r['mean_keep']:.1f} | {r['counted_gflops_per_img']:.2f} "
               f"| {r['ideal_gflops_per_img']:.2f} | {r['waste']:.3f} | {check} |")
  return "\n".join(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--sizes", default="base,large,huge")
  ap.add_argument("--capacities", default=",".join(config_lib.CAPACITIES),
                  help="capacity strategies (default: every one in sbam_jax.config.CAPACITIES)")
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--groups", default=",".join(config_lib.GROUPS),
                  help="SBAM's AMR groups ('device' and 'global' compile the same program "
                       "on one device)")
  ap.add_argument("--out", default=None, help="JSON lines (written under a temporary name)")
  args = ap.parse_args(argv)
  header = dict(date=time.strftime("%Y-%m-%d"), machine=platform.processor() or platform.machine(),
                cores=os.cpu_count(), jax=jax.__version__, batch=BATCH)
  print(json.dumps(header), flush=True)
  rows, cache, decoder_delta = [], {}, {}
  for cell in cells(args.sizes.split(","), args.capacities.split(","), args.methods.split(","),
                    args.groups.split(",")):
    rows.append(audit_cell(*cell, cache, decoder_delta))
    print(json.dumps(rows[-1]), flush=True)
  print(table(rows))
  if args.out:
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in [header] + rows)
    os.replace(tmp, args.out)


if __name__ == "__main__":
  main()
