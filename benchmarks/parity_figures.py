"""What the long training-curve parity run writes beside its numbers: a figure
and a CSV of the per-step curves per task, and the relative loss difference
both they and the summary in `parity_curves.py` are built on.

Kept apart from the runs so that reading or redrawing the curves needs
neither jax nor torch.
"""

from __future__ import annotations

import os

import numpy as np

FLOOR = 2.0 ** -23    # float32 epsilon: a bound is never below one rounding


def loss_rel(a: dict, b: dict) -> np.ndarray:
  return np.abs(a["loss"] - b["loss"]) / np.abs(b["loss"])


def plot(name: str, ours: dict, refs: tuple, s: dict, path: str, *, switch: int,
         warmup_end: int) -> None:
  """Both loss curves (top) and the per-step relative differences against the
  bound (bottom); `switch`: the first step of the mode's masking (0: none),
  `warmup_end`: the step the learning-rate warm-up ends."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ref, reord, ref64 = refs
  steps = np.arange(len(ref["loss"]))
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
  top.plot(steps, ref["loss"], label="PyTorch reference", lw=2.5, color="0.6")
  top.plot(steps, ours["loss"], label="sbam_jax", lw=1.0, color="C0")
  if switch:
    top.axvline(switch, ls=":", color="C3", label="random -> " + name.split("_", 1)[1])
  top.axvline(warmup_end, ls="--", color="C2", label="warm-up end")
  top.set_ylabel("training loss")
  top.set_title(f"{name}: {s['steps']} optimizer steps, tiny ViT, float32, "
                f"{s['devices']} device(s)")
  top.legend()
  floor = lambda r: np.maximum(r, FLOOR / 10)
  bottom.semilogy(steps, floor(loss_rel(ours, ref)), label="|ours - ref| / |ref|", color="C0")
  bottom.semilogy(steps, floor(loss_rel(reord, ref)), label="|ref reordered - ref| / |ref|",
                  color="0.5")
  bottom.semilogy(steps, floor(loss_rel(ref, ref64)), label="|ref - ref float64| / |ref float64|",
                  color="C1", lw=0.8)
  bottom.axhline(s["loss_bound"], ls="--", color="C3",
                 label=f"bound: {s['factor']:g} x max(reordering, ref float32 error)")
  bottom.set_xlabel("optimizer step")
  bottom.set_ylabel("per-step loss relative difference")
  bottom.legend(fontsize=8)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=90)
  plt.close(fig)
  os.replace(tmp, path)


def write_curves(path: str, ours: dict, refs: tuple) -> None:
  """Per-step lr and losses, so another implementation can be laid beside them."""
  ref, reord, ref64 = refs
  lines = ["step,lr,loss_reference,loss_reference_reordered,loss_reference_float64,loss_sbam_jax"]
  for t in range(len(ref["loss"])):
    lines.append(f"{t},{ref['lr'][t]:.9g},{ref['loss'][t]:.9g},{reord['loss'][t]:.9g},"
                 f"{ref64['loss'][t]:.12g},{ours['loss'][t]:.9g}")
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(path + ".tmp", path)
