"""Salience at the edges of float32, against the exact float64 log-domain
reference of test_masking (identical tokens, near one-hot rows, AMR ties)."""

import fractions

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sbam_jax import masking
from torch_reference import exact_keep_length
import test_masking as ref

salience = jax.jit(masking.token_salience)


def scaled_tokens(seed, n, L, d, logit):
  """Gaussian tokens with |x_i|^2 ~ logit (the self-affinity logit)."""
  z = np.random.default_rng(seed).normal(size=(n, L, d))
  return (z * np.sqrt(logit / d)).astype(np.float32)


@pytest.mark.parametrize("L", [144, 196, 256])
@pytest.mark.parametrize("d", [16, 768])
def test_identical_tokens_give_zeros(L, d):
  consts = np.asarray([0.0, 1.0, -0.37, 3.0, 1e-3, 0.1], np.float32)
  x = np.broadcast_to(consts[:, None, None], (len(consts), L, d)).copy()
  s = np.asarray(salience(x))
  assert s.dtype == np.float32 and np.all(s == 0)
  keep = masking.amr_keep_lengths(jnp.asarray(s), mask_ratio=0.75, ratio_var=0.1, delta=0.5,
                                  group_size=1)
  assert np.all(np.asarray(keep) == exact_keep_length(L, 0.75, 0.1, 0))


def test_near_identical_tokens_follow_the_rounding_bound():
  # Perturbations from 1e-9 (below float32 resolution: a constant row) to 1e-2.
  rng = np.random.default_rng(1)
  base = rng.normal(size=(1, 1, 64))
  eps = 10.0 ** np.arange(-9, -1)[:, None, None]
  x = (base + eps * rng.normal(size=(len(eps), 196, 64))).astype(np.float32)
  s = np.asarray(salience(x))
  _, span, bound = ref.np_outgoing(x)
  want = ref.np_salience(x)
  for i in range(len(eps)):
    if span[i] < bound[i] / 4:
      assert np.all(s[i] == 0), i
    elif span[i] > 4 * bound[i]:  # the documented error: at most ~bound / span
      np.testing.assert_allclose(s[i], want[i], atol=bound[i] / span[i], err_msg=str(i))
  assert np.all(s[0] == 0) and np.isclose(np.ptp(s[-1]), 1)  # both regimes are exercised


@pytest.mark.parametrize("logit", [1.0, 10.0, 100.0, 1e3, 1e4])
def test_near_one_hot_rows_match_exact_reference(logit):
  x = scaled_tokens(int(logit), 12, 196, 768, logit)
  got = np.asarray(salience(x))
  _, span, bound = ref.np_outgoing(x)
  want = ref.np_salience(x)
  assert np.all(span > bound)  # the reference is defined on every row here
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  assert np.all(got.min(-1) == 0) and np.allclose(got.max(-1), 1, rtol=0, atol=1e-6)
  if logit >= 1e3:
    # The regime is real: off-diagonal softmax terms underflow float32 entirely.
    p = jax.nn.softmax(jnp.einsum("nld,nmd->nlm", x, x, precision="highest"), -1)
    assert float(jnp.where(jnp.eye(196, dtype=bool), 0, p).max()) == 0


def clustered_tokens(seed, n, logit):
  """Patch-like tokens: a shared component plus per-token detail, with several
  close pairs competing (the hard case for exponent accuracy)."""
  rng = np.random.default_rng(seed)
  shared = rng.normal(size=(n, 1, 768)) * 2
  detail = rng.normal(size=(n, 196, 768)) * np.exp(rng.normal(size=(n, 196, 1)) * 0.1)
  x = shared + detail
  return (x * np.sqrt(logit / (x ** 2).sum(-1).mean())).astype(np.float32)


@pytest.mark.parametrize("logit", [30.0, 3e3, 1e4])
def test_kept_sets_equal_reference_where_gaps_are_clear(logit):
  n, L, tol = 16, 196, 1e-5  # tol: well above the measured error (~1e-7)
  x = clustered_tokens(int(logit), n, logit)
  u = np.random.default_rng(2).uniform(0, 0.5, size=(n, L)).astype(np.float32)
  plan, sal = jax.jit(lambda t, v: masking.sbam_mask_plan(t, None, group_size=1, noise=v))(x, u)
  want = ref.np_salience(x)
  np.testing.assert_allclose(np.asarray(sal), want, atol=tol, rtol=0)
  band = masking.delta_band(0.5)
  counts = (want > 0.5 + band).sum(-1)
  score = want + u.astype(np.float64)
  mask, checked = np.asarray(plan.mask), 0
  for i in range(n):
    if np.any(np.abs(np.abs(want[i] - 0.5) - band) < tol):
      continue  # a token within our error of the band edge: the count is not clear
    k = exact_keep_length(L, 0.75, 0.1, fractions.Fraction(int(counts[i])))
    assert int(plan.len_keep[i]) == k, i
    order = np.sort(score[i])
    if order[k] - order[k - 1] <= 2 * tol:
      continue
    np.testing.assert_array_equal(np.flatnonzero(mask[i] == 0),
                                  np.sort(np.argsort(score[i])[:k]))
    checked += 1
  assert checked >= n // 2


def test_degenerate_image_count_is_decided_by_the_band():
  # One dominant pair, every other token within ~1e-9 of 0.5 (SPEC: AMR near
  # the threshold): the exact count is a coin toss of second-order terms.
  x = scaled_tokens(5, 4, 196, 768, 1e4)
  want = ref.np_salience(x)
  near = (np.abs(want - 0.5) < 1e-6).sum(-1)
  assert np.all(near >= 190)
  s = masking.token_salience(x)
  counts = np.asarray(masking.salient_counts(s, 0.5))
  assert np.all(counts == 1)  # only the token at 1.0 is above
  keep = masking.amr_keep_lengths(s, mask_ratio=0.75, ratio_var=0.1, delta=0.5, group_size=1)
  assert np.all(np.asarray(keep) == exact_keep_length(196, 0.75, 0.1, 1))
  plan = masking.random_mask_plan(jax.random.key(0), 4, 196)
  st = masking.masking_stats(plan, s, 0.5)
  assert float(st["frac_delta_band"]) == 1.0
  assert np.isclose(float(st["frac_above_delta"]), 1 / 196)
