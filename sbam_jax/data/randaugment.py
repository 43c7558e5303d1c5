"""RandAugment with timm's semantics ("rand-m9-mstd0.5-inc1"), in TensorFlow.

As timm's `rand_augment_transform` with the *increasing* op set: 2 ops drawn
uniformly with replacement from 15; each applied with probability 0.5 at
magnitude ~ N(m, mstd) clipped to [0, 10] (drawn per application); signed ops
flip sign with probability 0.5; fill colour = ImageNet mean in uint8
(124, 116, 104); translations are 0.45 * size * magnitude / 10.

Geometric ops (rotate, shear, translate) are PIL's own Image.rotate /
Image.transform(AFFINE) with bicubic resampling and the mean fill, as timm
calls them (through tf.numpy_function; PIL releases the GIL while it
resamples, and it is ~10x faster than TensorFlow's projective transform).
Deviation from timm, documented: blends round to nearest where PIL truncates.
"""

from __future__ import annotations

import re

import numpy as np

from sbam_jax.data.tf_env import import_tf, split_seed

tf = import_tf()

FILL = (124.0, 116.0, 104.0)  # round(255 * ImageNet mean), timm's img_mean
TRANSLATE_PCT = 0.45
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
       "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
       "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
       "TranslateYRel")


def parse(spec: str) -> dict:
  """'rand-m9-mstd0.5-inc1' -> {'m': 9.0, 'mstd': 0.5, 'n': 2, 'inc': 1}."""
  parts = spec.split("-")
  if parts[0] != "rand":
    raise ValueError(f"RandAugment spec must start with 'rand', got {spec!r}")
  out = {"m": 10.0, "mstd": 0.0, "n": 2, "inc": 0, "p": 0.5}
  for part in parts[1:]:
    key, val = re.match(r"([a-z]+)([\d.]+)$", part).groups()
    if key not in out:
      raise ValueError(f"unsupported RandAugment option {key!r} in {spec!r}")
    out[key] = type(out[key])(float(val)) if key != "n" else int(val)
  if not out["inc"]:
    raise ValueError(f"only the increasing op set (inc1) is implemented, got {spec!r}")
  return out


def _gray(img):
  # PIL convert('L'): (299 R + 587 G + 114 B) / 1000, rounded.
  return tf.round(tf.tensordot(img, tf.constant([0.299, 0.587, 0.114]), axes=1))[..., None]


def _blend(degenerate, img, factor):
  return tf.clip_by_value(tf.round(degenerate + factor * (img - degenerate)), 0.0, 255.0)


def _lut_per_channel(img, luts):
  """Apply a (3, 256) lookup table per channel."""
  idx = tf.cast(img, tf.int32)
  return tf.stack([tf.gather(luts[c], idx[..., c]) for c in range(3)], axis=-1)


def autocontrast(img):
  lo = tf.reduce_min(img, axis=[0, 1])
  hi = tf.reduce_max(img, axis=[0, 1])
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  offset = tf.where(hi > lo, -lo * scale, 0.0)
  return tf.clip_by_value(tf.floor(img * scale + offset), 0.0, 255.0)


def equalize(img):
  """PIL ImageOps.equalize per channel."""
  idx = tf.cast(img, tf.int32)
  luts = []
  for c in range(3):
    hist = tf.math.bincount(tf.reshape(idx[..., c], [-1]), minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    before = tf.concat([[0], tf.cumsum(hist)[:-1]], axis=0)
    lut = tf.minimum((step // 2 + before) // tf.maximum(step, 1), 255)
    luts.append(tf.where(step > 0, lut, tf.range(256)))
  return tf.cast(_lut_per_channel(img, tf.stack(luts)), tf.float32)


def _pil_affine(img, matrix):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pil = Image.fromarray(np.asarray(img, np.uint8))
  out = pil.transform(pil.size, Image.AFFINE, tuple(float(v) for v in matrix),
                      resample=Image.BICUBIC, fillcolor=tuple(int(v) for v in FILL))
  return np.asarray(out, np.float32)


def _pil_rotate(img, degrees):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pil = Image.fromarray(np.asarray(img, np.uint8))
  out = pil.rotate(float(degrees), resample=Image.BICUBIC, fillcolor=tuple(int(v) for v in FILL))
  return np.asarray(out, np.float32)


def _on_host(fn, img, values):
  """Run PIL function `fn(image, float64 values)` on the float32 image tensor."""
  out = tf.numpy_function(fn, [img, tf.cast(values, tf.float64)], tf.float32, stateful=False)
  out.set_shape(img.shape)
  return out


def affine(img, matrix):
  """PIL Image.transform(AFFINE, (a, b, c, d, e, f), BICUBIC): output (x, y)
  samples the input at (a x + b y + c, d x + e y + f); outside = FILL."""
  return _on_host(_pil_affine, img, tf.stack([tf.cast(v, tf.float64) for v in matrix]))


def rotate(img, degrees):
  """PIL Image.rotate(degrees, BICUBIC) about the centre (counter-clockwise)."""
  return _on_host(_pil_rotate, img, degrees)


def _sharpness_degenerate(img):
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.round(tf.nn.depthwise_conv2d(img[None], kernel, [1, 1, 1, 1], "VALID")[0])
  # PIL keeps the border pixels of the original.
  h, w = tf.shape(img)[0], tf.shape(img)[1]
  border = tf.pad(tf.zeros([h - 2, w - 2, 1]), [[1, 1], [1, 1], [0, 0]], constant_values=1.0)
  return tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]) + img * border


def apply_op(index, img, magnitude, sign):
  """Op `index` of OPS at `magnitude` in [0, 10]; sign in {-1, +1}."""
  level = magnitude / 10.0
  # Geometric parameters in float64, as timm's Python floats (PIL's bicubic
  # weights would otherwise round differently on a few pixels).
  level64 = tf.cast(magnitude, tf.float64) / 10.0
  sign64 = tf.cast(sign, tf.float64)
  h = tf.cast(tf.shape(img)[0], tf.float64)
  w = tf.cast(tf.shape(img)[1], tf.float64)
  enhance = 1.0 + sign * level * 0.9
  shear = sign64 * level64 * 0.3
  bits = 4 - tf.cast(level * 4, tf.int32)
  thresh = 256.0 - tf.floor(level * 256)
  add = tf.floor(level * 110)
  branches = [
      lambda: autocontrast(img),
      lambda: equalize(img),
      lambda: 255.0 - img,
      lambda: rotate(img, sign64 * level64 * 30.0),
      lambda: tf.cast(tf.bitwise.bitwise_and(
          tf.cast(img, tf.int32), -tf.bitwise.left_shift(1, 8 - bits)), tf.float32),
      lambda: tf.where(img < thresh, img, 255.0 - img),
      lambda: tf.where(img < 128.0, tf.minimum(img + add, 255.0), img),
      lambda: _blend(_gray(img), img, enhance),
      lambda: _blend(tf.floor(tf.reduce_mean(_gray(img)) + 0.5), img, enhance),
      lambda: _blend(tf.zeros_like(img), img, enhance),
      lambda: _blend(_sharpness_degenerate(img), img, enhance),
      lambda: affine(img, (1.0, shear, 0.0, 0.0, 1.0, 0.0)),
      lambda: affine(img, (1.0, 0.0, 0.0, shear, 1.0, 0.0)),
      lambda: affine(img, (1.0, 0.0, sign64 * level64 * TRANSLATE_PCT * w, 0.0, 1.0, 0.0)),
      lambda: affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, sign64 * level64 * TRANSLATE_PCT * h)),
  ]
  out = tf.switch_case(index, branches)
  out.set_shape(img.shape)
  return out


def rand_augment(img, seed, spec: str = "rand-m9-mstd0.5-inc1"):
  """img: (H, W, 3) float32 holding uint8 values -> same, augmented."""
  p = parse(spec)
  for s in split_seed(seed, p["n"]):
    s_op, s_apply, s_mag, s_sign = split_seed(s, 4)
    index = tf.random.stateless_uniform([], s_op, 0, len(OPS), dtype=tf.int32)
    magnitude = p["m"] + p["mstd"] * tf.random.stateless_normal([], s_mag)
    magnitude = tf.clip_by_value(magnitude, 0.0, 10.0)
    sign = tf.where(tf.random.stateless_uniform([], s_sign) < 0.5, -1.0, 1.0)
    applied = tf.random.stateless_uniform([], s_apply) < p["p"]
    img = tf.cond(applied, lambda: apply_op(index, img, magnitude, sign), lambda: img)
  return img
