"""The masking API against a float64 numpy reference and hand-worked cases."""

import fractions

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sbam_jax import masking
from torch_reference import exact_keep_length


def np_outgoing(x):
  """Float64, log domain: (d, span, B) with d_j = e^-M (s_j - 1), M the largest
  off-diagonal log-probability, B the documented float32 rounding bound of the
  spread (evaluated on these exact terms)."""
  x = np.asarray(x, np.float64)
  L = x.shape[1]
  a = x @ np.swapaxes(x, -1, -2)
  m = a.max(-1, keepdims=True)
  logp = a - m - np.log(np.exp(a - m).sum(-1, keepdims=True))
  logp = np.where(np.eye(L, dtype=bool), -np.inf, logp)
  q = np.exp(logp - logp.max(axis=(1, 2), keepdims=True))
  anti = q - np.swapaxes(q, 1, 2)
  d = anti.sum(axis=1)
  eps = float(np.finfo(np.float32).eps)
  bound = 2 * eps * (8 * (q.sum(1) + q.sum(2)) + L * np.abs(anti).sum(1)).max(-1)
  return d, d.max(-1) - d.min(-1), bound


def np_salience(x):
  """Exact salience of float32 tokens: min-max of d, zeros where span <= B."""
  d, span, bound = np_outgoing(x)
  ok = (span > bound)[:, None]
  return np.where(ok, (d - d.min(-1, keepdims=True)) / np.where(ok, span[:, None], 1), 0.0)


def np_keep_lengths(sal, r0, v, delta, g, tie_rtol=masking.DELTA_TIE_RTOL):
  n, L = sal.shape
  y = (sal > delta + tie_rtol * delta).sum(-1)
  out = []
  for i in range(0, n, g):
    out += [exact_keep_length(L, r0, v, fractions.Fraction(int(y[i:i + g].sum()), g))] * g
  return np.asarray(out)


def tokens(seed, n=8, L=49, d=16, scale=0.35):
  return np.random.default_rng(seed).normal(size=(n, L, d)).astype(np.float32) * scale


def test_salience_matches_float64_reference():
  x = tokens(0)
  got = np.asarray(jax.jit(masking.token_salience)(x))
  want = np_salience(x)
  assert got.dtype == np.float32 and got.shape == (8, 49)
  np.testing.assert_allclose(got, want, atol=2e-6)
  assert np.all(got.min(-1) == 0) and np.allclose(got.max(-1), 1)


def test_salience_uses_full_precision_at_large_logits():
  # Logits ~1e3 as at initialisation: a bf16 / TF32 affinity would reorder tokens.
  x = tokens(1, d=64, scale=4.0)
  np.testing.assert_allclose(np.asarray(masking.token_salience(x)), np_salience(x), atol=2e-5)


def test_constant_tokens_give_zero_salience_not_nan():
  x = np.ones((2, 16, 8), np.float32)
  s = np.asarray(masking.token_salience(x))
  assert not np.isnan(s).any() and np.all(s == 0)
  keep = masking.amr_keep_lengths(jnp.asarray(s), mask_ratio=0.75, ratio_var=0.1, delta=0.5,
                                  group_size=1)
  # No token above delta: ratio r0 - v = 0.65, keep floor(16 * 0.35) = 5.
  assert np.all(np.asarray(keep) == 5)


def test_salience_carries_no_gradient():
  g = jax.grad(lambda x: masking.token_salience(x).sum() * 3.0)(jnp.asarray(tokens(2)))
  assert np.all(np.asarray(g) == 0)


@pytest.mark.parametrize("group", [1, 4, 8])
def test_keep_lengths_match_exact_reference(group):
  rng = np.random.default_rng(3)
  for trial in range(20):
    sal = rng.uniform(size=(8, 196)) ** rng.uniform(0.3, 3.0)
    got = masking.amr_keep_lengths(jnp.asarray(sal, jnp.float32), mask_ratio=0.75, ratio_var=0.1,
                                   delta=0.5, group_size=group)
    want = np_keep_lengths(sal.astype(np.float32), 0.75, 0.1, 0.5, group)
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"trial {trial}")
    assert got.dtype == jnp.int32
  # Groups share one keep length.
  assert np.all(np.asarray(got).reshape(-1, group) == np.asarray(got).reshape(-1, group)[:, :1])


def test_keep_length_hand_worked_boundary():
  # L = 196, r0 = 0.75, v = 0.1, 3 tokens above delta: 196 * 0.35 - 0.2 * 3 = 68 exactly;
  # float arithmetic would give 67.999... and floor to 67.
  sal = np.zeros((1, 196), np.float32)
  sal[0, :3] = 0.9
  keep = masking.amr_keep_lengths(jnp.asarray(sal), mask_ratio=0.75, ratio_var=0.1, delta=0.5,
                                  group_size=1)
  assert int(keep[0]) == 68
  # delta is strict: a token exactly at delta does not count.
  sal[0, 3] = 0.5
  assert int(masking.amr_keep_lengths(jnp.asarray(sal), mask_ratio=0.75, ratio_var=0.1,
                                      delta=0.5, group_size=1)[0]) == 68
  # All tokens salient: r = 0.85, keep floor(196 * 0.15) = 29.
  assert int(masking.amr_keep_lengths(jnp.ones((1, 196)), mask_ratio=0.75, ratio_var=0.1,
                                      delta=0.5, group_size=1)[0]) == 29


def test_keep_lengths_are_clipped():
  # L = 8, r0 = 0.9, v = 0.05: floor(8 * (0.1 - 0.05)) = 0 when all are salient -> 1.
  ones, zeros = jnp.ones((2, 8)), jnp.zeros((2, 8))
  kw = dict(mask_ratio=0.9, ratio_var=0.05, delta=0.5, group_size=1)
  assert np.all(np.asarray(masking.amr_keep_lengths(ones, **kw)) == 1)
  assert np.all(np.asarray(masking.amr_keep_lengths(zeros, **kw)) == 1)  # floor(1.2) = 1
  # L = 4, r0 = 0.1, v = 0.05: floor(4 * 0.95) = 3 stays; r0 = 0.02 would give 4 -> 3.
  assert masking.fixed_keep_length(4, 0.02) == 3
  assert masking.fixed_keep_length(4, 0.9) == 1


def test_no_adaptation_without_ratio_var():
  sal = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 196)), jnp.float32)
  keep = masking.amr_keep_lengths(sal, mask_ratio=0.75, ratio_var=0.0, delta=0.5, group_size=1)
  assert np.all(np.asarray(keep) == 49)


def test_batch_must_split_into_groups():
  with pytest.raises(ValueError, match="groups of 3"):
    masking.amr_keep_lengths(jnp.zeros((8, 16)), mask_ratio=0.75, ratio_var=0.1, delta=0.5,
                             group_size=3)


def test_sbm_plan_keeps_lowest_salience_plus_noise():
  x = tokens(4)
  noise = np.random.default_rng(5).uniform(0, 0.5, size=(8, 49)).astype(np.float32)
  plan, sal = jax.jit(lambda t, u: masking.sbam_mask_plan(t, None, ratio_var=0.1, group_size=2,
                                                          noise=u))(x, noise)
  ref_sal = np_salience(x)
  ref_keep = np_keep_lengths(np.asarray(sal), 0.75, 0.1, 0.5, 2)
  np.testing.assert_array_equal(np.asarray(plan.len_keep), ref_keep)
  order = np.argsort(np.asarray(sal) + noise, axis=-1, kind="stable")
  np.testing.assert_array_equal(np.asarray(plan.ids_shuffle), order)
  np.testing.assert_allclose(np.asarray(sal), ref_sal, atol=2e-6)
  score = ref_sal + noise
  mask = np.asarray(plan.mask)
  for i in range(8):
    k = ref_keep[i]
    kept = np.flatnonzero(mask[i] == 0)
    assert len(kept) == k
    # every kept token scores below every masked token
    assert score[i, kept].max() < score[i, mask[i] == 1].min()


def test_plan_follows_mae_conventions():
  noise = np.random.default_rng(6).uniform(size=(3, 10)).astype(np.float32)
  plan = masking.random_mask_plan(None, 3, 10, mask_ratio=0.7, noise=jnp.asarray(noise))
  ids_shuffle = np.argsort(noise, axis=1)
  ids_restore = np.argsort(ids_shuffle, axis=1)
  mask = np.ones((3, 10))
  mask[:, :3] = 0
  mask = np.take_along_axis(mask, ids_restore, axis=1)
  np.testing.assert_array_equal(np.asarray(plan.ids_restore), ids_restore)
  np.testing.assert_array_equal(np.asarray(plan.mask), mask)
  np.testing.assert_array_equal(np.asarray(plan.ids_keep(3)), ids_shuffle[:, :3])
  assert plan.min_keep == plan.max_keep == 3


def test_random_masking_statistics():
  n, L = 4000, 49
  plan = jax.jit(lambda k: masking.random_mask_plan(k, n, L, mask_ratio=0.75))(jax.random.key(0))
  mask = np.asarray(plan.mask)
  assert np.all(mask.sum(-1) == L - 12)  # floor(49 * 0.25) = 12 kept
  # Every position is masked with probability 37/49; binomial std over 4000 samples ~ 0.0068.
  freq = mask.mean(0)
  assert np.abs(freq - 37 / 49).max() < 5 * np.sqrt(37 / 49 * 12 / 49 / n)
  # Masks of different samples differ (fresh noise per sample).
  assert len({m.tobytes() for m in mask[:100]}) == 100


def test_sbam_masks_salient_tokens_more_often():
  x = tokens(7, n=256, L=49, d=16, scale=0.5)
  plan, sal = masking.sbam_mask_plan(jnp.asarray(x), jax.random.key(1), ratio_var=0.0)
  sal, mask = np.asarray(sal), np.asarray(plan.mask)
  hi, lo = sal > 0.5, sal < 0.2
  assert mask[hi].mean() > mask[lo].mean() + 0.2


def test_capacity_helpers():
  spec = masking.MaskingSpec(mask_ratio=0.75, ratio_var=0.1)
  assert masking.keep_length_bounds(spec, 196) == (29, 68)
  assert masking.max_capacity(spec, 196) == 68
  buckets = masking.capacity_buckets(spec, 196, 4)
  assert buckets[-1] == 68 and list(buckets) == sorted(buckets) and buckets[0] >= 29
  assert masking.choose_capacity(40, buckets) == min(b for b in buckets if b >= 40)
  with pytest.raises(ValueError, match="exceeds"):
    masking.choose_capacity(69, buckets)
  assert masking.max_capacity(masking.MaskingSpec("random"), 196) == 49


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="mae"), "method"),
    (dict(mask_ratio=1.0), "mask_ratio"),
    (dict(mask_ratio=0.75, ratio_var=0.3), "inside"),
    (dict(ratio_var=-0.1), "ratio_var"),
    (dict(group_size=0), "group_size"),
])
def test_spec_rejects_impossible_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    masking.MaskingSpec(**kwargs)


def test_masking_stats():
  sal = jnp.asarray([[0.0, 0.6, 1.0, 0.2], [0.0, 0.0, 0.0, 0.0]])
  plan = masking.plan_from_scores(jnp.zeros((2, 4)), jnp.asarray([1, 2]))
  st = masking.masking_stats(plan, sal, 0.5)
  assert np.isclose(st["mask_ratio_mean"], (0.75 + 0.5) / 2)
  assert np.isclose(st["mask_ratio_min"], 0.5) and np.isclose(st["mask_ratio_max"], 0.75)
  assert np.isclose(st["frac_above_delta"], 2 / 8)
  assert np.isclose(st["frac_delta_band"], 0.0)
  p = np.array([0.0, 0.6, 1.0, 0.2]) / 1.8
  ent = -(p[p > 0] * np.log(p[p > 0])).sum()
  assert np.isclose(st["salience_entropy"], ent / 2, atol=1e-6)
  # 0.50004 is inside the tie band (5e-5 at delta 0.5): a tie, not above.
  tie = jnp.asarray([[0.0, 0.50004, 1.0, 0.2], [0.0, 0.50006, 0.0, 0.0]])
  st = masking.masking_stats(plan, tie, 0.5)
  assert np.isclose(st["frac_delta_band"], 0.5) and np.isclose(st["frac_above_delta"], 2 / 8)
