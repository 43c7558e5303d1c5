"""Host transforms against PIL and torchvision's algorithms."""

import math
import random

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from data_helpers import encode, photo
from sbam_jax.data import randaugment as ra
from sbam_jax.data import transforms as T

tf = T.tf


@pytest.mark.parametrize("name", ["chelsea", "astronaut", "camera"])
def test_eval_transform_equals_torchvision_resize_and_centre_crop(name):
  img = photo(name)  # real photos: landscape, square, grayscale-in-RGB
  data = encode(img, quality=95)
  got = T.eval_transform(tf.constant(data), size=224, resize=256).numpy().astype(np.float64)
  ref = Image.open(__import__("io").BytesIO(data)).convert("RGB")
  w, h = ref.size
  # torchvision Resize(256): shorter side 256, the other int(256 * long / short)
  new_w, new_h = (int(256 * w / h), 256) if h <= w else (256, int(256 * h / w))
  ref = ref.resize((new_w, new_h), Image.BICUBIC)
  left, top = int(round((new_w - 224) / 2.0)), int(round((new_h - 224) / 2.0))
  ref = np.asarray(ref.crop((left, top, left + 224, top + 224)), np.float64)
  # Same libjpeg IDCT (accurate integer) and PIL's own bicubic resampler: the
  # eval transform reproduces torchvision's pixels exactly.
  assert got.shape == (224, 224, 3)
  np.testing.assert_array_equal(got, ref)


def torchvision_rrc(height, width, scale, ratio, rnd):
  """torchvision RandomResizedCrop.get_params, written again with `random`."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rnd.uniform(*scale)
    aspect = math.exp(rnd.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return rnd.randint(0, height - h), rnd.randint(0, width - w), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("shape,scale", [((375, 500), (0.2, 1.0)), ((100, 400), (0.08, 1.0))])
def test_crop_statistics_match_torchvision(shape, scale):
  n = 3000
  fn = tf.function(lambda s: T.rrc_window(shape[0], shape[1], s, scale))
  ours = np.array([fn(tf.constant([7, i], tf.int64)).numpy() for i in range(n)], np.float64)
  rnd = random.Random(0)
  ref = np.array([torchvision_rrc(shape[0], shape[1], scale, (3 / 4, 4 / 3), rnd)
                  for _ in range(n)], np.float64)
  for arr in (ours, ref):
    assert (arr[:, 0] >= 0).all() and (arr[:, 0] + arr[:, 2] <= shape[0]).all()
    assert (arr[:, 1] >= 0).all() and (arr[:, 1] + arr[:, 3] <= shape[1]).all()
  stat = lambda a: (a[:, 2] * a[:, 3] / (shape[0] * shape[1]), np.log(a[:, 3] / a[:, 2]),
                    (a[:, 0] + a[:, 2] / 2) / shape[0])
  for o, r in zip(stat(ours), stat(ref)):
    # means and spreads agree within ~4 standard errors of 3000 samples
    se = r.std() / np.sqrt(n)
    assert abs(o.mean() - r.mean()) < 4 * np.sqrt(2) * se + 1e-9
    assert abs(o.std() - r.std()) < 0.08 * r.std() + 1e-9


def test_flip_probability_is_one_half():
  img = tf.reshape(tf.range(2 * 3 * 3, dtype=tf.float32), [2, 3, 3])
  flips = [bool(np.array_equal(T.random_flip(img, tf.constant([1, i], tf.int64)).numpy(),
                               img.numpy()[:, ::-1])) for i in range(2000)]
  assert abs(np.mean(flips) - 0.5) < 4 * 0.5 / np.sqrt(2000)


def test_pretrain_crop_keeps_photo_content():
  data = encode(photo("coffee"))
  out = T.pretrain_transform(tf.constant(data), tf.constant([0, 1], tf.int64), size=64).numpy()
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8 and out.std() > 10


# ---- RandAugment ops against PIL -----------------------------------------

def sample_image():
  return photo("astronaut").resize((48, 40), Image.BICUBIC)


def ours(op, magnitude=9.0, sign=1.0, img=None):
  img = np.asarray(img or sample_image(), np.float32)
  out = ra.apply_op(tf.constant(ra.OPS.index(op)), tf.constant(img), tf.constant(magnitude),
                    tf.constant(sign))
  return out.numpy()


def pil_affine(img, matrix):
  return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BICUBIC,
                       fillcolor=tuple(int(v) for v in ra.FILL))


LEVEL = 0.9  # magnitude 9 of 10
PIL_OPS = {
    "AutoContrast": lambda im: ImageOps.autocontrast(im),
    "Equalize": lambda im: ImageOps.equalize(im),
    "Invert": lambda im: ImageOps.invert(im),
    "PosterizeIncreasing": lambda im: ImageOps.posterize(im, 4 - int(LEVEL * 4)),
    "SolarizeIncreasing": lambda im: ImageOps.solarize(im, 256 - int(LEVEL * 256)),
    "SolarizeAdd": lambda im: im.point(
        [min(255, i + int(LEVEL * 110)) if i < 128 else i for i in range(256)] * 3),
    "ColorIncreasing": lambda im: ImageEnhance.Color(im).enhance(1 + LEVEL * 0.9),
    "ContrastIncreasing": lambda im: ImageEnhance.Contrast(im).enhance(1 + LEVEL * 0.9),
    "BrightnessIncreasing": lambda im: ImageEnhance.Brightness(im).enhance(1 + LEVEL * 0.9),
    "SharpnessIncreasing": lambda im: ImageEnhance.Sharpness(im).enhance(1 + LEVEL * 0.9),
    "ShearX": lambda im: pil_affine(im, (1, LEVEL * 0.3, 0, 0, 1, 0)),
    "ShearY": lambda im: pil_affine(im, (1, 0, 0, LEVEL * 0.3, 1, 0)),
    "TranslateXRel": lambda im: pil_affine(im, (1, 0, LEVEL * 0.45 * im.size[0], 0, 1, 0)),
    "TranslateYRel": lambda im: pil_affine(im, (1, 0, 0, 0, 1, LEVEL * 0.45 * im.size[1])),
    "Rotate": lambda im: im.rotate(LEVEL * 30, resample=Image.BICUBIC,
                                   fillcolor=tuple(int(v) for v in ra.FILL)),
}
# (mean, max) absolute difference in grey levels: pixel-exact ops (geometric
# ops run PIL itself: exact when the matrix, sign and fill are right), ops that
# differ by rounding only.
TOLERANCE = {"ShearX": (0, 0), "ShearY": (0, 0), "TranslateXRel": (0, 0),
             "TranslateYRel": (0, 0), "Rotate": (0, 0),
             "AutoContrast": (0, 1), "Equalize": (0, 1), "Invert": (0, 0),
             "PosterizeIncreasing": (0, 0), "SolarizeIncreasing": (0, 0), "SolarizeAdd": (0, 0),
             "ColorIncreasing": (0.6, 2), "ContrastIncreasing": (0.6, 2),
             "BrightnessIncreasing": (0.6, 2), "SharpnessIncreasing": (0.6, 2)}


@pytest.mark.parametrize("op", ra.OPS)
def test_randaugment_op_matches_pil(op):
  img = sample_image()
  got = ours(op, img=img)
  want = np.asarray(PIL_OPS[op](img), np.float64)
  diff = np.abs(got - want)
  mean_tol, max_tol = TOLERANCE[op]
  assert diff.mean() <= mean_tol + 1e-9 and diff.max() <= max_tol, (op, diff.mean(), diff.max())


def test_randaugment_parse_and_randomness():
  assert ra.parse("rand-m9-mstd0.5-inc1") == {"m": 9.0, "mstd": 0.5, "n": 2, "inc": 1, "p": 0.5}
  with pytest.raises(ValueError, match="inc1"):
    ra.parse("rand-m9")
  img = tf.constant(np.asarray(sample_image(), np.float32))
  fn = tf.function(lambda s: ra.rand_augment(img, s))
  outs = [fn(tf.constant([0, i], tf.int64)).numpy() for i in range(200)]
  unchanged = np.mean([np.array_equal(o, img.numpy()) for o in outs])
  # Both ops skipped with probability 1/4 (a few applied ops leave the image as is).
  assert 0.15 < unchanged < 0.4
  np.testing.assert_array_equal(fn(tf.constant([0, 3], tf.int64)).numpy(), outs[3])


@pytest.mark.parametrize("size", [224, 32])  # the device path; crops beyond the canvas (host path)
def test_crops_resized_on_device_equal_the_host_transform(size):
  from sbam_jax.data import device
  import jax.numpy as jnp
  data = tf.constant(encode(photo("chelsea"), quality=95))
  for i in range(6):
    seed = tf.constant([3, i], tf.int64)
    host = T.pretrain_transform(data, seed, size=size).numpy().astype(np.float64)
    out = T.pretrain_crop_transform(data, seed, size=size)
    assert out["image"].shape == (2 * size, 2 * size, 3)
    got = np.asarray(device.pixels({k: jnp.asarray(v.numpy()[None]) for k, v in out.items()},
                                   size))[0]
    diff = np.abs(got - host)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (i, diff.max(), (diff > 0).mean())
