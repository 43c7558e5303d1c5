"""Reconstruction figures a person can read at a glance.

A *sheet* per figure step: per image, original | salience | mask | reconstruction
| pasted, with column titles, a salience colour bar (AMR's delta marked on it),
the hidden patches darkened and hatched over the image (never mistaken for a
grey photo) and, in the pasted column, outlined. A *progress* sheet holds the
same images' pasted reconstructions at every figure step so far; the images
and those reconstructions are kept in `progress.npz` beside the PNGs, so a
resumed run continues the same sheet.

With norm-pix loss the model predicts each patch normalised by its own mean
and variance, which are unknown for hidden patches. The figure puts
predictions back into pixels with the mean and variance averaged over the
image's *visible* patches (what the model could know), per image and channel.

Pixels are laid out here with numpy (overlays are exact and testable);
matplotlib only places tiles and draws text. Files are written atomically
through `sbam_jax.files` (locally a temporary name and a rename, with the
permissions the umask gives; in a bucket one upload).
"""

from __future__ import annotations

import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sbam_jax import files

from sbam_jax import masking
from sbam_jax.data import device as device_ops
from sbam_jax.models.layers import patchify, unpatchify

TILE = 128            # smallest tile side on a sheet, pixels
COLUMNS = ("original", "salience", "mask", "reconstruction", "pasted")
LEGEND = ("mask: hidden patches darkened and hatched.  reconstruction: the model's output.  "
          "pasted: visible patches\nof the original, hidden ones predicted (yellow grid).  "
          "Salience: one cell per patch, colour bar at the right.")
OUTLINE = np.array([1.0, 0.85, 0.0])  # the pasted column's hidden-region outline
MAX_PROGRESS_COLUMNS = 8


def reconstruct(model, images_uint8: np.ndarray, spec, key) -> dict:
  """One masked forward pass -> float arrays in [0, 1] for drawing:
  original, recon, pasted (N, H, W, 3); salience (N, g, g); hidden (N, g, g) bool."""
  graphdef, state = nnx.split(model)
  recon, pasted, sal, mask = _forward(graphdef, spec)(state, jnp.asarray(images_uint8), key)
  n, h = images_uint8.shape[:2]
  g = h // model.cfg.patch_size
  return {"original": np.asarray(images_uint8, np.float32) / 255.0,
          "recon": np.asarray(recon), "pasted": np.asarray(pasted),
          "salience": np.asarray(sal, np.float32).reshape(n, g, g),
          "hidden": np.asarray(mask).reshape(n, g, g) > 0}


@functools.lru_cache(maxsize=8)
def _forward(graphdef, spec):
  """The jitted pass for one model structure and masking spec (a figure step
  costs one compilation per spec, then milliseconds)."""

  def fn(state, images_uint8, key):
    model = nnx.merge(graphdef, state)
    imgs = device_ops.normalize(images_uint8)
    out = model(imgs, key, spec)
    p = model.cfg.patch_size
    n, _, _, c = imgs.shape
    target = patchify(imgs, p)
    mask = out.mask[..., None]
    pred = out.pred
    if model.cfg.norm_pix_loss:
      vis = 1.0 - mask
      count = jnp.maximum(vis.sum(1, keepdims=True), 1.0)
      # per-image, per-channel mean and variance of visible patches (layout: row, col, channel)
      t = target.reshape(n, -1, p * p, c)
      vis4 = vis[..., None]
      mean = (t.mean(2, keepdims=True) * vis4).sum(1, keepdims=True) / count[..., None]
      var = (t.var(2, ddof=1, keepdims=True) * vis4).sum(1, keepdims=True) / count[..., None]
      pred = (pred.reshape(n, -1, p * p, c) * jnp.sqrt(var + 1e-6) + mean).reshape(pred.shape)
    to_img = lambda x: jnp.clip(device_ops.denormalize(unpatchify(x, p, c)), 0, 1)
    sal = out.salience
    if sal is None:  # random masking: show the salience SBAM would use
      sal = masking.token_salience(model.embed_patches(imgs))
    return to_img(pred), to_img(target * (1 - mask) + pred * mask), sal, out.mask

  return jax.jit(fn)


def upscale(image: np.ndarray, k: int) -> np.ndarray:
  """Nearest-neighbour k x on the two leading axes (sharp patch edges)."""
  return np.repeat(np.repeat(image, k, 0), k, 1)


def cells_to_pixels(grid: np.ndarray, side: int) -> np.ndarray:
  """(g, g) patch grid -> (g * side, g * side), each cell a side x side block."""
  return upscale(grid, side)


def overlay_hidden(image: np.ndarray, hidden: np.ndarray, *, dim: float = 0.3,
                   period: int = 8) -> np.ndarray:
  """Hidden pixels darkened to `dim` of their value, with light diagonal
  hatching every `period` pixels; visible pixels unchanged."""
  yy, xx = np.indices(hidden.shape)
  hatch = hidden & ((xx + yy) % period == 0)
  out = np.where(hidden[..., None], image * dim, image)
  return np.where(hatch[..., None], 0.85, out)


def outline_hidden(image: np.ndarray, hidden: np.ndarray, side: int | None = None,
                   color=OUTLINE, alpha: float = 0.5) -> np.ndarray:
  """Thin lines of `color` (blended by `alpha`) over the hidden region only: its
  border (hidden pixels with a visible 4-neighbour) and, given the patch `side`,
  each hidden patch's top and left edge, so hidden patches read as a faint grid
  and visible ones stay clear."""
  h = np.pad(hidden, 1, constant_values=True)
  edge = hidden & ~(h[:-2, 1:-1] & h[2:, 1:-1] & h[1:-1, :-2] & h[1:-1, 2:])
  if side:
    yy, xx = np.indices(hidden.shape)
    edge |= hidden & ((yy % side == 0) | (xx % side == 0))
  lines = (1 - alpha) * image + alpha * np.asarray(color, image.dtype)
  return np.where(edge[..., None], lines, image)


def tile_scale(size: int) -> int:
  """Integer zoom that makes a `size`-px image at least TILE px."""
  return max(1, -(-TILE // size))


def sheet_tiles(parts: dict) -> list[list[np.ndarray]]:
  """Rows of five display tiles (float RGB; salience stays (H, W) scalar)."""
  n, size = parts["original"].shape[:2]
  k, g = tile_scale(size), parts["hidden"].shape[1]
  side = size * k // g
  rows = []
  for i in range(n):
    hidden = cells_to_pixels(parts["hidden"][i], side)
    original = upscale(parts["original"][i], k)
    rows.append([original, cells_to_pixels(parts["salience"][i], side),
                 overlay_hidden(original, hidden), upscale(parts["recon"][i], k),
                 outline_hidden(upscale(parts["pasted"][i], k), hidden, side)])
  return rows


def canvas(width_px: int, height_px: int):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width_px / 100, height_px / 100), dpi=100, facecolor="white")
  FigureCanvasAgg(fig)
  return fig


def _axes(fig, x, y, w, h, W, H):
  """Axes at pixel box (x, y from the top-left), no ticks."""
  ax = fig.add_axes((x / W, 1 - (y + h) / H, w / W, h / H))
  ax.set_xticks([])
  ax.set_yticks([])
  return ax


def rgb_pixels(fig) -> np.ndarray:
  fig.canvas.draw()
  return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def draw_sheet(parts: dict, *, title: str, delta: float | None = None) -> np.ndarray:
  """The reconstruction sheet as an RGB uint8 image."""
  return rgb_pixels(sheet_figure(parts, title=title, delta=delta))


def sheet_figure(parts: dict, *, title: str, delta: float | None = None):
  """The reconstruction sheet (a matplotlib Figure, one pixel per dot):
  tiles at an integer zoom of at least TILE px, salience colour bar with
  AMR's `delta` marked (None: not drawn, e.g. under random masking)."""
  rows = sheet_tiles(parts)
  t = rows[0][0].shape[0]
  gap, top, left, bar = 8, 84, 8, 90
  W = left + 5 * t + 4 * gap + bar
  H = top + len(rows) * (t + 20) + 10
  fig = canvas(W, H)
  fig.text(0.5, 1 - 8 / H, title, ha="center", va="top", fontsize=11)
  fig.text(0.5, 1 - 30 / H, LEGEND, ha="center", va="top", fontsize=7.5, color="0.25")
  ratios = parts["hidden"].reshape(len(rows), -1).mean(1)
  for r, tiles in enumerate(rows):
    y = top + r * (t + 20)
    for c, tile in enumerate(tiles):
      ax = _axes(fig, left + c * (t + gap), y, t, t, W, H)
      if c == 1:
        ax.imshow(tile, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
      else:
        ax.imshow(np.clip(tile, 0, 1), interpolation="nearest")
      if r == 0:
        ax.set_title(COLUMNS[c], fontsize=8.5)
      if c == 2:
        ax.set_xlabel(f"{ratios[r]:.3f} hidden", fontsize=8, labelpad=2)
  _colorbar(fig, left + 5 * t + 4 * gap + 14, top, 14, len(rows) * (t + 20) - 20, W, H, delta)
  return fig


def _colorbar(fig, x, y, w, h, W, H, delta):
  from matplotlib import cm, colors  # pylint: disable=g-import-not-at-top
  ax = fig.add_axes((x / W, 1 - (y + h) / H, w / W, h / H))
  sm = cm.ScalarMappable(norm=colors.Normalize(0, 1), cmap="viridis")
  cb = fig.colorbar(sm, cax=ax, ticks=[0, 0.25, 0.5, 0.75, 1])
  cb.ax.tick_params(labelsize=8)
  cb.set_label("salience (per image, min-max to [0, 1])", fontsize=8)
  if delta is not None:
    cb.ax.axhline(delta, color="red", lw=1.5)
    cb.ax.text(-0.3, delta, "δ", color="red", ha="right", va="center", fontsize=9,
               transform=cb.ax.get_yaxis_transform())


def draw_progress(images: np.ndarray, steps, pasted: np.ndarray, hidden: np.ndarray,
                  *, title: str) -> np.ndarray:
  """Rows: images; columns: the original, then the pasted reconstruction at
  each step (at most MAX_PROGRESS_COLUMNS, spread evenly, the last kept)."""
  keep = _spread(len(steps), MAX_PROGRESS_COLUMNS)
  n, size = images.shape[:2]
  k, g = tile_scale(size), hidden.shape[2]
  t, side = size * k, size * k // g
  gap, top, left = 6, 72, 8
  W = max(left + (len(keep) + 1) * (t + gap), 560)
  H = top + n * (t + gap) + 4
  fig = canvas(W, H)
  fig.text(0.5, 1 - 8 / H, title, ha="center", va="top", fontsize=11)
  for r in range(n):
    y = top + r * (t + gap)
    ax = _axes(fig, left, y, t, t, W, H)
    ax.imshow(upscale(images[r] / 255.0, k), interpolation="nearest")
    if r == 0:
      ax.set_title("original", fontsize=8.5)
    for c, s in enumerate(keep):
      tile = outline_hidden(upscale(pasted[s, r] / 255.0, k), cells_to_pixels(hidden[s, r], side),
                            side)
      ax = _axes(fig, left + (c + 1) * (t + gap), y, t, t, W, H)
      ax.imshow(tile, interpolation="nearest")
      if r == 0:
        ax.set_title(f"step {int(steps[s])}", fontsize=8.5)
  return rgb_pixels(fig)


def _spread(count: int, most: int) -> list[int]:
  if count <= most:
    return list(range(count))
  return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def write_atomic(path: str, data: bytes) -> None:
  """Readers see the whole file or none (see `sbam_jax.files.write_atomic`)."""
  files.write_atomic(path, data, fsync=False)


def save_png(image: np.ndarray, path: str) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  write_atomic(path, buf.getvalue())


class FigureLog:
  """The figure images (chosen once) and the reconstructions drawn so far,
  kept in `folder/progress.npz` so a resumed run goes on with them."""

  def __init__(self, folder: str, count: int):
    self.folder, self.count = folder, count
    self.images = None
    self.steps, self.pasted, self.hidden = [], [], []
    path = files.join(folder, "progress.npz")
    if files.exists(path):
      with np.load(io.BytesIO(files.read_bytes(path))) as z:
        self.images = z["images"]
        self.steps = [int(x) for x in z["steps"]]
        self.pasted, self.hidden = list(z["pasted"]), list(z["hidden"])

  def choose(self, batch: dict, to_pixels) -> None:
    """Images from different classes where the batch has labels (a sheet of
    four crops of one photo shows little); `to_pixels(sub_batch)` -> uint8."""
    if self.images is not None:
      return
    n = len(batch["image"])
    order = list(range(n))
    if "label" in batch:
      labels = np.asarray(batch["label"])
      first = [i for i in range(n) if labels[i] not in labels[:i]]
      order = first + [i for i in range(n) if i not in first]
    idx = np.asarray(order[: self.count])
    self.images = np.asarray(to_pixels({k: np.asarray(v)[idx] for k, v in batch.items()}),
                             np.uint8)

  def add(self, step: int, parts: dict) -> None:
    """Remember a step's reconstructions (replacing any from that step on:
    a run resumed from an earlier checkpoint draws them again)."""
    keep = [i for i, s in enumerate(self.steps) if s < step]
    self.steps = [self.steps[i] for i in keep] + [step]
    self.pasted = [self.pasted[i] for i in keep] + [to_uint8(parts["pasted"])]
    self.hidden = [self.hidden[i] for i in keep] + [parts["hidden"]]
    buf = io.BytesIO()
    np.savez(buf, images=self.images, steps=np.asarray(self.steps, np.int64),
             pasted=np.stack(self.pasted), hidden=np.stack(self.hidden))
    write_atomic(files.join(self.folder, "progress.npz"), buf.getvalue())

  def progress(self) -> np.ndarray:
    return draw_progress(self.images, self.steps, np.stack(self.pasted), np.stack(self.hidden),
                         title="the same images across the run\n(pasted: hidden patches "
                               "predicted, in the yellow grid)")


def to_uint8(image: np.ndarray) -> np.ndarray:
  return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def sheet_title(step: int, epoch: float, method: str, hidden: np.ndarray) -> str:
  r = hidden.reshape(len(hidden), -1).mean(1)
  return (f"step {step} (epoch {epoch:.1f}), {method} masking: mask ratio {r.mean():.3f} "
          f"[{r.min():.3f}, {r.max():.3f}]")
