"""Mixup / CutMix against timm's formulas on hand-worked cases."""

import jax
import jax.numpy as jnp
import numpy as np

from sbam_jax.data import mixup


def test_mixup_hand_worked():
  x = jnp.stack([jnp.full((4, 4, 3), 1.0), jnp.full((4, 4, 3), 3.0)])
  labels = jnp.array([0, 2])
  box = (0, 0, 0, 0)
  out, y = mixup.mix_with_lambda(x, labels, jnp.float32(0.3), jnp.asarray(False), box,
                                 num_classes=3, smoothing=0.1)
  # sample 0 = 0.3 * x0 + 0.7 * x1 = 2.4; sample 1 = 0.3 * 3 + 0.7 * 1 = 1.6
  np.testing.assert_allclose(out[0], 2.4, rtol=1e-6)
  np.testing.assert_allclose(out[1], 1.6, rtol=1e-6)
  off, on = 0.1 / 3, 0.9 + 0.1 / 3
  y0 = 0.3 * np.array([on, off, off]) + 0.7 * np.array([off, off, on])
  np.testing.assert_allclose(y[0], y0, rtol=1e-6)
  np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-6)


def test_cutmix_box_and_corrected_lambda():
  x = jnp.stack([jnp.zeros((8, 10, 1)), jnp.ones((8, 10, 1))])
  labels = jnp.array([1, 0])
  # Box rows [2, 6), cols [3, 8): 20 of 80 pixels come from the other image.
  out, y = mixup.mix_with_lambda(x, labels, jnp.float32(0.5), jnp.asarray(True), (2, 6, 3, 8),
                                 num_classes=2, smoothing=0.0)
  assert float(out[0].sum()) == 20 and float(out[1].sum()) == 80 - 20
  np.testing.assert_allclose(out[0, 2:6, 3:8], 1.0)
  lam = 1 - 20 / 80
  np.testing.assert_allclose(y[0], [1 - lam, lam], rtol=1e-6)
  np.testing.assert_allclose(y[1], [lam, 1 - lam], rtol=1e-6)


def test_rand_bbox_follows_timm():
  top, bottom, left, right = mixup.cutmix_box(jax.random.key(0), jnp.float32(0.75), 32, 32)
  cut = int(32 * np.sqrt(0.25))  # 16
  assert bottom - top <= cut and right - left <= cut
  assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 32


def test_random_mixing_targets_sum_to_one_and_both_modes_occur():
  x = jax.random.normal(jax.random.key(1), (6, 8, 8, 3))
  labels = jnp.arange(6) % 5
  modes = []
  fn = jax.jit(lambda k: mixup.mixup_cutmix(k, x, labels, num_classes=5))
  for i in range(40):
    out, y = fn(jax.random.key(i))
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-5)
    assert y.min() >= 0.1 / 5 - 1e-6
    # CutMix leaves some pixels exactly equal to the original image.
    modes.append(bool(jnp.any(out == x)))
  assert 5 < sum(modes) < 35
