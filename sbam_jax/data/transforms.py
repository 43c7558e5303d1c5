"""Host-side image transforms in TensorFlow, with the reference semantics.

pre-train : RandomResizedCrop(224, scale=(0.2, 1), ratio=(3/4, 4/3), bicubic)
            + horizontal flip                                (MAE main_pretrain)
fine-tune : RandomResizedCrop(scale=(0.08, 1)) + flip + RandAugment
            rand-m9-mstd0.5-inc1
eval      : resize shorter side to 256 (bicubic, antialiased) + centre crop 224

The host emits uint8 images: ImageNet mean/std normalisation, random erasing
(fine-tune) and mixup/cutmix run on the accelerator (`sbam_jax.data.device`,
`sbam_jax.data.mixup`), which also sends 4x fewer bytes to the device.

Every random draw is stateless, from a per-image seed that the pipeline
derives from (seed, epoch, position): the same image at the same step gets
the same crop whatever the parallelism, so resumed runs replay exactly.
Crops follow torchvision's RandomResizedCrop.get_params (10 attempts, then a
centre crop) and JPEGs are decoded only inside the crop window
(decode_and_crop_jpeg, with libjpeg's accurate integer IDCT as PIL uses).
Resizes are PIL's own bicubic resampler, so pixels match torchvision's.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from sbam_jax.data.tf_env import import_tf, split_seed

tf = import_tf()


def _randint(seed, shape, high):
  """Uniform integers in [0, high) for a tensor `high` (broadcast)."""
  u = tf.random.stateless_uniform(shape, seed)
  return tf.minimum(tf.cast(tf.floor(u * tf.cast(high, tf.float32)), tf.int32),
                    tf.cast(high, tf.int32) - 1)


def rrc_window(height, width, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10):
  """torchvision RandomResizedCrop.get_params -> (top, left, h, w) int32."""
  s_area, s_ratio, s_top, s_left = split_seed(seed, 4)
  hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  target = hf * wf * tf.random.stateless_uniform([attempts], s_area, scale[0], scale[1])
  aspect = tf.exp(tf.random.stateless_uniform([attempts], s_ratio, math.log(ratio[0]),
                                              math.log(ratio[1])))
  w = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
  h = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
  ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  top = _randint(s_top, [attempts], tf.maximum(height - h + 1, 1))
  left = _randint(s_left, [attempts], tf.maximum(width - w + 1, 1))
  k = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
  # Fallback: the largest centre crop whose aspect ratio is inside `ratio`.
  in_ratio = wf / hf
  fw = tf.where(in_ratio < ratio[0], width,
                tf.where(in_ratio > ratio[1], tf.cast(tf.round(hf * ratio[1]), tf.int32), width))
  fh = tf.where(in_ratio < ratio[0], tf.cast(tf.round(wf / ratio[0]), tf.int32), height)
  fallback = tf.stack([(height - fh) // 2, (width - fw) // 2, fh, fw])
  chosen = tf.stack([top[k], left[k], h[k], w[k]])
  return tf.where(tf.reduce_any(ok), chosen, fallback)


def decode_cropped(encoded, window_fn: Callable):
  """Decode only the window `window_fn(height, width)` of an encoded image, RGB uint8.

  JPEGs (grayscale and CMYK included) use the fused decode-and-crop; other
  formats (PNG, also when named .JPEG) decode fully, then crop.
  """
  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded)
    return tf.io.decode_and_crop_jpeg(encoded, window_fn(shape[0], shape[1]), channels=3,
                                      dct_method="INTEGER_ACCURATE")

  def other():
    img = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    t, l, h, w = tf.unstack(window_fn(tf.shape(img)[0], tf.shape(img)[1]))
    return img[t:t + h, l:l + w]

  img = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  img.set_shape([None, None, 3])
  return img


def decode_full(encoded):
  return decode_cropped(encoded, lambda h, w: tf.stack([0, 0, h, w]))


def _pil_bicubic(img: np.ndarray, height, width) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = Image.fromarray(img).resize((int(width), int(height)), Image.BICUBIC)
  return np.asarray(out)


def resize_uint8(img, size):
  """PIL's bicubic resize (antialiased, what torchvision applies to PIL images),
  uint8 in and out. PIL releases the GIL while it resamples, and its
  separable fixed-point kernel is ~3x faster than tf.image.resize(antialias)."""
  out = tf.numpy_function(_pil_bicubic, [img, size[0], size[1]], tf.uint8, stateful=False)
  out.set_shape([None, None, 3])
  return out


def flip_draw(seed):
  """The horizontal-flip decision (p = 0.5), wherever the flip is applied."""
  return tf.random.stateless_uniform([], seed) < 0.5


def random_flip(img, seed):
  return tf.cond(flip_draw(seed), lambda: img[:, ::-1], lambda: img)


def pretrain_transform(encoded, seed, size: int = 224, scale=(0.2, 1.0)):
  s_crop, s_flip = split_seed(seed, 2)
  img = decode_cropped(encoded, lambda h, w: rrc_window(h, w, s_crop, scale))
  return random_flip(resize_uint8(img, [size, size]), s_flip)


def pretrain_crop_transform(encoded, seed, size: int = 224, scale=(0.2, 1.0)):
  """RandomResizedCrop + flip with the resize and the flip left to the
  accelerator (`sbam_jax.data.device.pixels`): the host decodes the crop
  window and sends it top-left in a zero canvas (2 x size) with its (h, w)
  and the flip decision. A crop larger than the canvas is resized here (PIL)
  and sent as (size, size), which the device resize leaves as it is. Either
  way the pixels are PIL's bicubic resize of the crop, then flipped, as
  torchvision's RandomResizedCrop + RandomHorizontalFlip."""
  canvas = 2 * size
  s_crop, s_flip = split_seed(seed, 2)
  img = decode_cropped(encoded, lambda h, w: rrc_window(h, w, s_crop, scale))
  big = (tf.shape(img)[0] > canvas) | (tf.shape(img)[1] > canvas)
  img = tf.cond(big, lambda: resize_uint8(img, [size, size]), lambda: img)
  hw = tf.shape(img)[:2]
  img = tf.pad(img, [[0, canvas - hw[0]], [0, canvas - hw[1]], [0, 0]])
  img.set_shape([canvas, canvas, 3])
  return {"image": img, "size": hw, "flip": flip_draw(s_flip)}


def finetune_transform(encoded, seed, size: int = 224, scale=(0.08, 1.0),
                       rand_augment: str = "rand-m9-mstd0.5-inc1"):
  """Random erasing follows on the device (`sbam_jax.data.device.random_erasing`)."""
  from sbam_jax.data import randaugment  # pylint: disable=g-import-not-at-top
  s_crop, s_flip, s_aug = split_seed(seed, 3)
  img = decode_cropped(encoded, lambda h, w: rrc_window(h, w, s_crop, scale))
  img = random_flip(resize_uint8(img, [size, size]), s_flip)
  if rand_augment:
    img = randaugment.rand_augment(tf.cast(img, tf.float32), s_aug, rand_augment)
    img = tf.cast(img, tf.uint8)
  return img


def eval_window(height, width, resize: int, crop: int):
  """torchvision Resize(resize) (shorter side) then CenterCrop(crop): new size and crop box."""
  short, long_ = tf.minimum(height, width), tf.maximum(height, width)
  new_long = tf.cast(tf.floor(resize * tf.cast(long_, tf.float64) / tf.cast(short, tf.float64)),
                     tf.int32)
  new_h = tf.where(height <= width, resize, new_long)
  new_w = tf.where(height <= width, new_long, resize)
  top = tf.cast(tf.round(tf.cast(new_h - crop, tf.float64) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - crop, tf.float64) / 2.0), tf.int32)
  return new_h, new_w, top, left


def eval_transform(encoded, seed=None, size: int = 224, resize: int = 256):
  del seed  # deterministic
  img = decode_full(encoded)
  new_h, new_w, top, left = eval_window(tf.shape(img)[0], tf.shape(img)[1], resize, size)
  img = resize_uint8(img, tf.stack([new_h, new_w]))
  img = img[top:top + size, left:left + size]
  img.set_shape([size, size, 3])
  return img


TRANSFORMS = {"pretrain": pretrain_transform, "pretrain_crop": pretrain_crop_transform,
              "finetune": finetune_transform, "eval": eval_transform}


def output_spec(kind: str, image_size: int) -> dict:
  """{name: (shape, numpy dtype)} of what transform `kind` emits per image."""
  if kind == "pretrain_crop":
    return {"image": ((2 * image_size, 2 * image_size, 3), np.uint8), "size": ((2,), np.int32),
            "flip": ((), np.bool_)}
  return {"image": ((image_size, image_size, 3), np.uint8)}


def make_transform(kind: str, image_size: int, **kwargs) -> Callable:
  """(encoded, seed) -> (S, S, 3) uint8 image for 'pretrain' | 'finetune' | 'eval';
  'pretrain_crop' -> {'image': (2S, 2S, 3) canvas, 'size': (h, w), 'flip'}
  (resized and flipped on the device). The function's `spec` attribute is `output_spec(kind, S)`."""
  if kind not in TRANSFORMS:
    raise ValueError(f"unknown transform {kind!r}; choose from {sorted(TRANSFORMS)}")
  fn = TRANSFORMS[kind]
  out = lambda encoded, seed: fn(encoded, seed, size=image_size, **kwargs)
  out.spec = output_spec(kind, image_size)
  return out
