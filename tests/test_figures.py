"""Figures: overlays against hand-worked pixels, reconstruction maths against
a float64 numpy reference, the sheet's structure (titles, tile sizes, colour
bar), file permissions under the umask, the progress log across a resume,
the metrics plot, and the pre-training task's figure bookkeeping (each step
drawn and sent to TensorBoard once)."""

import io
import json
import os
import stat

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from sbam_jax import masking, registry
from sbam_jax.data import device as device_ops
from sbam_jax.data import sources
from sbam_jax.models import MaskedAutoencoder
from sbam_jax.models.sizes import model_config
from sbam_jax.train import figures, plots

PHOTOS = os.path.join(os.path.dirname(__file__), "..", "sbam_jax", "data", "demo_photos")
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
NAMES = ("astronaut", "coffee", "rocket", "chelsea", "brick", "camera", "grass", "gravel")


def photos(size=32, names=("astronaut", "coffee", "rocket")):
  return np.stack([np.asarray(Image.open(os.path.join(PHOTOS, n + ".jpg")).convert("RGB")
                              .resize((size, size), Image.BICUBIC)) for n in names])


def test_hidden_overlay_darkens_and_hatches_only_hidden_pixels():
  rng = np.random.default_rng(0)
  img = rng.uniform(0.2, 1, (16, 16, 3))
  hidden = np.zeros((16, 16), bool)
  hidden[:8, 8:] = True
  out = figures.overlay_hidden(img, hidden, dim=0.3, period=8)
  np.testing.assert_array_equal(out[~hidden], img[~hidden])
  for y in range(8):
    for x in range(8, 16):
      want = 0.85 if (x + y) % 8 == 0 else 0.3 * img[y, x]
      np.testing.assert_allclose(out[y, x], want)


def test_outline_draws_a_grid_over_hidden_patches_only():
  img = np.zeros((6, 6, 3))
  hidden = np.zeros((6, 6), bool)
  hidden[:3] = True  # the top two of four 3x3 patches
  img[..., 2] = 0.5
  out = figures.outline_hidden(img, hidden, 3, color=(1.0, 0.5, 0.0), alpha=0.4)
  line = np.zeros((6, 6), bool)
  line[[0, 2]] = True         # each hidden patch's top edge; the region's lower border
  line[:3, [0, 3]] = True     # each hidden patch's left edge
  np.testing.assert_allclose(out[line], np.tile([0.4, 0.2, 0.3], (line.sum(), 1)))
  np.testing.assert_array_equal(out[~line], img[~line])  # patch interiors and visible patches
  # without a patch side: the region's border only, never the image frame
  border = figures.outline_hidden(img, hidden, color=(1.0, 0.5, 0.0), alpha=1.0)
  np.testing.assert_array_equal(border[2, :, 0], 1.0)
  assert border[:2, :, 0].sum() == 0 and border[3:, :, 0].sum() == 0


@pytest.fixture(scope="module")
def tiny():
  return MaskedAutoencoder(model_config("tiny", img_size=32, patch_size=8), rngs=nnx.Rngs(0))


def test_reconstruction_matches_a_float64_reference(tiny):
  imgs = photos()
  spec = masking.MaskingSpec("sbam", ratio_var=0.1, group_size=1)
  key = jax.random.PRNGKey(3)
  parts = figures.reconstruct(tiny, imgs, spec, key)
  out = tiny(device_ops.normalize(imgs), key, spec)
  p, g, n = 8, 4, len(imgs)
  x = (imgs / 255.0 - MEAN) / STD                                    # float64
  patches = x.reshape(n, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, p * p, 3)
  pred = np.asarray(out.pred, np.float64).reshape(n, g * g, p * p, 3)
  hidden = np.asarray(out.mask) > 0
  vis = ~hidden
  # norm-pix: predictions in pixels with the visible patches' mean / variance, per image, channel
  mean = np.stack([patches[i][vis[i]].mean(1).mean(0) for i in range(n)])[:, None, None]
  var = np.stack([patches[i][vis[i]].var(1, ddof=1).mean(0) for i in range(n)])[:, None, None]
  pix = pred * np.sqrt(var + 1e-6) + mean
  pasted = np.where(hidden[..., None, None], pix, patches)
  to_img = lambda t: np.clip(t.reshape(n, g, g, p, p, 3).transpose(0, 1, 3, 2, 4, 5)
                             .reshape(n, 32, 32, 3) * STD + MEAN, 0, 1)
  np.testing.assert_allclose(parts["recon"], to_img(pix), atol=2e-5)
  np.testing.assert_allclose(parts["pasted"], to_img(pasted), atol=2e-5)
  np.testing.assert_array_equal(parts["hidden"], hidden.reshape(n, g, g))
  # salience: jitted here, eager there (near-uniform rows: within 2e-5, README)
  np.testing.assert_allclose(parts["salience"].reshape(n, -1), out.salience, atol=5e-5)
  np.testing.assert_allclose(parts["original"], imgs / 255.0, atol=1e-7)


def test_sheet_has_titles_large_tiles_and_a_salience_colour_bar(tiny):
  imgs = photos()
  parts = figures.reconstruct(tiny, imgs, masking.MaskingSpec("sbam", ratio_var=0.1),
                              jax.random.PRNGKey(0))
  title = figures.sheet_title(120, 8.0, "sbam", parts["hidden"])
  r = parts["hidden"].reshape(3, -1).mean(1)
  assert title == (f"step 120 (epoch 8.0), sbam masking: mask ratio {r.mean():.3f} "
                   f"[{r.min():.3f}, {r.max():.3f}]")
  fig = figures.sheet_figure(parts, title=title, delta=0.5)
  tiles = [ax for ax in fig.axes if ax.images]
  bar = [ax for ax in fig.axes if not ax.images]
  assert len(tiles) == 3 * 5 and len(bar) == 1
  assert [ax.get_title() for ax in tiles[:5]] == list(figures.COLUMNS)
  assert all(ax.get_title() == "" for ax in tiles[5:])
  fig.canvas.draw()
  for ax in tiles:
    box = ax.get_window_extent()
    assert round(box.width) >= 128 and round(box.height) >= 128, box
    assert ax.images[0].get_array().shape[:2] == (128, 128)  # 32 px at 4x, no resampling
  texts = [t.get_text() for t in fig.texts]
  assert title in texts and any("hatched" in t for t in texts)
  assert "salience" in bar[0].get_ylabel()
  assert [t.get_text() for t in bar[0].get_yticklabels()] == ["0.00", "0.25", "0.50", "0.75",
                                                              "1.00"]
  assert any(ln.get_ydata()[0] == 0.5 for ln in bar[0].lines)  # delta marked
  # the mask column is the photo with hidden patches darkened, not a grey tile
  mask_tile = np.asarray(tiles[2].images[0].get_array())
  hidden = figures.cells_to_pixels(parts["hidden"][0], 32)
  original = figures.upscale(parts["original"][0], 4)
  np.testing.assert_array_equal(mask_tile[~hidden], original[~hidden])
  assert mask_tile[hidden].mean() < 0.5 * original[hidden].mean() + 0.1
  assert [ax.get_xlabel() for ax in tiles[2::5]] == [f"{v:.3f} hidden" for v in r]
  rgb = figures.rgb_pixels(fig)
  assert rgb.dtype == np.uint8 and rgb.shape[1] >= 5 * 128 and rgb.shape[0] >= 3 * 128


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_pngs_honour_the_umask_and_leave_no_temporary_file(tmp_path, umask, mode):
  old = os.umask(umask)
  try:
    figures.save_png(np.zeros((4, 4, 3), np.uint8), str(tmp_path / "sub" / "a.png"))
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / "sub" / "a.png").st_mode) == mode
  assert stat.S_IMODE(os.stat(tmp_path / "sub").st_mode) == 0o777 & ~umask
  assert os.listdir(tmp_path / "sub") == ["a.png"]
  assert np.asarray(Image.open(tmp_path / "sub" / "a.png")).shape == (4, 4, 3)


def fake_parts(n, value, size=16, g=2):
  hidden = np.zeros((n, g, g), bool)
  hidden[:, 0, 0] = True
  return {"pasted": np.full((n, size, size, 3), value), "hidden": hidden}


def test_progress_log_chooses_distinct_photos_and_survives_a_resume(tmp_path):
  log = figures.FigureLog(str(tmp_path), 3)
  batch = {"image": np.arange(6)[:, None, None, None] * np.ones((6, 16, 16, 3), np.uint8),
           "label": np.array([4, 4, 7, 4, 1, 7])}
  log.choose(batch, lambda b: b["image"])
  assert log.images[:, 0, 0, 0].tolist() == [0, 2, 4]  # first of labels 4, 7, 1
  for step, v in ((10, 0.1), (20, 0.2), (30, 0.3)):
    log.add(step, fake_parts(3, v))
  again = figures.FigureLog(str(tmp_path), 3)  # a resumed run, from a checkpoint at step 10
  again.choose({"image": np.zeros((6, 16, 16, 3), np.uint8)}, lambda b: b["image"])
  np.testing.assert_array_equal(again.images, log.images)  # the same photos as before
  assert list(again.steps) == [10, 20, 30]
  again.add(20, fake_parts(3, 0.9))  # drawn again after the resume: later ones are stale
  assert list(again.steps) == [10, 20]
  assert again.pasted[1][0, 0, 0, 0] == round(0.9 * 255)
  sheet = again.progress()
  assert sheet.shape[0] >= 3 * 128 and sheet.dtype == np.uint8


def test_progress_keeps_at_most_eight_columns_with_the_first_and_last():
  assert figures._spread(5, 8) == [0, 1, 2, 3, 4]
  cols = figures._spread(20, 8)
  assert len(cols) == 8 and cols[0] == 0 and cols[-1] == 19


def test_metrics_plot_reads_the_log_last_record_per_step_wins(tmp_path):
  rows = [{"step": 0, "knn/cls_top1": 50.0},
          {"step": 5, "loss": 1.0, "lr": 1e-4, "mask_ratio_mean": 0.75, "mask_ratio_min": 0.75,
           "mask_ratio_max": 0.75},
          {"step": 10, "loss": 0.8, "lr": 2e-4, "mask_ratio_mean": 0.66, "mask_ratio_min": 0.65,
           "mask_ratio_max": 0.7, "frac_above_delta": 0.05},
          {"step": 10, "loss": 0.7, "lr": 2e-4, "mask_ratio_mean": 0.66, "mask_ratio_min": 0.65,
           "mask_ratio_max": 0.7, "frac_above_delta": 0.05},   # re-logged after a resume
          {"step": 10, "knn/cls_top1": 60.0, "knn/mean_top1": 70.0}]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write("".join(json.dumps({**r, "time": 1.0}) + "\n" for r in rows))
  series = plots.read_metrics(str(tmp_path / "metrics.jsonl"))
  assert series["loss"][0].tolist() == [5, 10] and series["loss"][1].tolist() == [1.0, 0.7]
  assert series["knn/cls_top1"][1].tolist() == [50.0, 60.0] and "time" not in series
  names = [name for name, _ in plots.panels(series)]
  assert names == ["training loss", "learning rate",
                   "mask ratio (mean, min-max band); tokens above delta", "monitor: knn"]
  path = plots.write_metrics_plot(str(tmp_path))
  assert path == str(tmp_path / "figures" / "metrics.png")
  w, h = Image.open(path).size
  assert w == 1000 and h == 80 + 2 * 280
  assert plots.write_metrics_plot(str(tmp_path / "none")) is None


@registry.register("source", "figures_test_memory")
class FewPhotos(sources.IndexedSource):
  """Eight bundled photos, one class each, held in memory."""

  def __init__(self, split):
    self.classes, self.blobs = NAMES, []
    for img in photos(64, NAMES):
      buf = io.BytesIO()
      Image.fromarray(img).save(buf, "PNG")
      self.blobs.append(buf.getvalue())
    self.labels = np.arange(len(NAMES), dtype=np.int32)
    self.num_examples = len(NAMES)

  @classmethod
  def from_config(cls, data, split):
    return cls(split)

  def records(self, positions):
    return [self.blobs[p] for p in positions], self.labels[positions]


class Writer:
  def __init__(self):
    self.images = []

  def image(self, step, name, image):
    self.images.append((step, name, image.shape))


def test_pretrain_draws_each_figure_step_once(tmp_path):
  """The last step is a figure step: at_end must not draw (nor log) it again."""
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from configs import demo  # pylint: disable=g-import-not-at-top
  from sbam_jax.train.pretrain import PretrainTask  # pylint: disable=g-import-not-at-top
  c = demo.get_config()
  c.data.source, c.data.device_resize = "figures_test_memory", False
  c.batch_size, c.epochs, c.warmup_epochs, c.random_epochs = 8, 4, 1, 1
  c.figure_every, c.evals = 2, {}
  task = PretrainTask(c, str(tmp_path))
  state = task.init_state(True)
  images = photos(64, NAMES)
  batch = {"image": images, "label": np.array([3, 3, 0, 1, 2, 5, 6, 7], np.int32)}
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write(json.dumps({"step": 1, "loss": 1.0, "lr": 1e-4}) + "\n")
  writer = Writer()
  for step in (1, 2, 3, 4):
    task.after_step(state, step, batch, writer)
  task.at_end(state, 4, writer)
  assert [(s, n) for s, n, _ in writer.images] == [(2, "reconstruction"), (4, "reconstruction")]
  np.testing.assert_array_equal(task._figures.images[:, 0, 0], images[[0, 2, 3, 4], 0, 0])
  got = sorted(os.listdir(tmp_path / "figures"))
  assert got == ["metrics.png", "progress.npz", "progress.png", "step_0000002.png",
                 "step_0000004.png"]
  assert Image.open(tmp_path / "figures" / "step_0000004.png").size[::-1] == writer.images[1][2][:2]
