"""The end-of-run plot of metrics.jsonl: loss, learning rate, masking ratio
and the monitor's metrics against the step, one panel each.

A resumed run logs again the steps after its last checkpoint; the last record
of a step wins, as it is the one the finished run stands on.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np

from sbam_jax import files
from sbam_jax.train import figures

RATIO = ("mask_ratio_mean", "mask_ratio_min", "mask_ratio_max")


def read_metrics(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """metrics.jsonl -> {key: (steps, values)}, steps ascending, one value a step."""
  series: dict[str, dict[int, float]] = {}
  for line in files.read_text(path).splitlines():
    line = line.strip()
    if not line:
      continue
    row = json.loads(line)
    step = int(row.pop("step"))
    row.pop("time", None)
    for k, v in row.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        series.setdefault(k, {})[step] = float(v)
  return {k: (np.array(sorted(d)), np.array([d[s] for s in sorted(d)])) for k, d in series.items()}


def panels(series: dict) -> list[tuple[str, list[str]]]:
  """(panel title, keys) for what the log holds: loss, lr, mask ratio (with
  the fraction of tokens above delta), then one panel per monitor (keys
  'name/metric', e.g. knn/cls_top1)."""
  out = []
  if "loss" in series:
    out.append(("training loss", ["loss"]))
  if "lr" in series:
    out.append(("learning rate", ["lr"]))
  ratio = [k for k in (*RATIO, "frac_above_delta") if k in series]
  if ratio:
    out.append(("mask ratio (mean, min-max band); tokens above delta", ratio))
  groups: dict[str, list[str]] = {}
  for k in sorted(series):
    if "/" in k:
      groups.setdefault(k.split("/")[0], []).append(k)
  out.extend((f"monitor: {name}", keys) for name, keys in groups.items())
  return out


def draw(series: dict, title: str = "") -> np.ndarray:
  """The plot as an RGB uint8 image (two panels a row)."""
  chosen = panels(series)
  cols = 2
  rows = max(1, -(-len(chosen) // cols))
  fig = figures.canvas(1000, 80 + 280 * rows)
  if title:
    fig.suptitle(title, fontsize=11)
  for i, (name, keys) in enumerate(chosen):
    ax = fig.add_subplot(rows, cols, i + 1)
    _panel(ax, series, keys)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
  fig.tight_layout(rect=(0, 0, 1, 0.95 if title else 1))
  return figures.rgb_pixels(fig)


def _panel(ax, series: dict, keys: list[str]) -> None:
  if "mask_ratio_mean" in keys:
    s, v = series["mask_ratio_mean"]
    ax.plot(s, v, marker=".", label="mask ratio mean")
    if "mask_ratio_min" in keys and "mask_ratio_max" in keys:
      ax.fill_between(series["mask_ratio_min"][0], series["mask_ratio_min"][1],
                      series["mask_ratio_max"][1], alpha=0.25, label="min-max")
    if "frac_above_delta" in keys:
      ax.plot(*series["frac_above_delta"], marker=".", label="tokens above delta")
    ax.legend(fontsize=7)
    return
  for k in keys:
    ax.plot(*series[k], marker="." if len(series[k][0]) < 60 else None, label=k)
  if len(keys) > 1:
    ax.legend(fontsize=7)
  if keys == ["lr"]:
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))


def write_metrics_plot(workdir: str, path: str | None = None) -> str | None:
  """Draw `workdir/metrics.jsonl` into `path` (default workdir/figures/metrics.png);
  returns the path, or None when there is nothing to plot."""
  src = files.join(workdir, "metrics.jsonl")
  if not files.exists(src):
    return None
  series = read_metrics(src)
  if not panels(series):
    return None
  path = path or files.join(workdir, "figures", "metrics.png")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(draw(series, title=files.basename(files.abspath(workdir)))).save(buf, "PNG")
  figures.write_atomic(path, buf.getvalue())
  return path
