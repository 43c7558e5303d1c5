"""Salience-based adaptive masking (SBAM), as a pure, jittable API.

Independent of any model: give it the patch tokens (N, L, D) an encoder would
see (patch embedding + position embedding, no cls token) and a PRNG key, get
back a `MaskPlan` in MAE's conventions. Other MIM methods can reuse it as is.

    salience  s_hat = minmax( sum_i softmax(x x^T)_ij )          (N, L)
    SBM order score = s_hat + u,  u ~ U[0, 0.5); lowest scores are kept
    AMR ratio       r = r0 - v + 2 v * mean(#{s_hat > delta}) / L  (per group)
                    (a salience within 1e-4 * delta of delta is a tie: not above)
    keep length     floor(L (1 - r)), clipped to [1, L - 1]

Random masking (MAE) is the same machinery with zero salience, u ~ U[0, 1) and
a fixed ratio.

Shapes stay static: the plan always holds the full shuffle order (N, L); a
model keeps the first `capacity` slots and treats slots past a sample's
`len_keep` as padding. `max_capacity` gives one capacity that fits every
possible keep length; `capacity_buckets` + `choose_capacity` give a few
smaller ones chosen per step (one tiny host read).

Keep lengths use exact rational arithmetic (ratios are read as the decimals
written, e.g. 0.1 == 1/10), so floor(196 * 0.35 - 0.2 * 3) is 68, not the 67
that float rounding gives. The public PyTorch code neither clips nor guards a
constant salience row; this module does both. Salience is the exact value for
the float32 tokens given, also when softmax rows are near one-hot, where the
public code returns NaN and a plain float32 port zeros (`token_salience`).
"""

from __future__ import annotations

import dataclasses
import fractions
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

RANDOM = "random"
SBAM = "sbam"
METHODS = (RANDOM, SBAM)
# Upper end of the SBM noise: score = salience + U[0, SBM_NOISE_SCALE).
SBM_NOISE_SCALE = 0.5


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
  """Static description of a masking method (hashable: safe as a jit static arg).

  method: "random" (MAE) or "sbam" (salience order; ratio_var=0 is plain SBM).
  mask_ratio: r0. ratio_var: v (AMR range is [r0 - v, r0 + v]).
  delta: salience threshold counted by AMR (strict >).
  group_size: samples that share one AMR ratio; 1 = per sample (paper),
    per-device batch = the public code, the global batch = one ratio a step.
    None means the whole batch given to the call.
  """
  method: str = SBAM
  mask_ratio: float = 0.75
  ratio_var: float = 0.1
  delta: float = 0.5
  group_size: Optional[int] = None

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"masking method must be one of {METHODS}, got {self.method!r}")
    if not 0.0 < self.mask_ratio < 1.0:
      raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
    if self.ratio_var < 0:
      raise ValueError(f"ratio_var must be >= 0, got {self.ratio_var}")
    if self.adaptive and not 0.0 < self.mask_ratio - self.ratio_var < self.mask_ratio + self.ratio_var < 1.0:
      raise ValueError(
          f"[mask_ratio - ratio_var, mask_ratio + ratio_var] must lie inside (0, 1); got "
          f"mask_ratio={self.mask_ratio}, ratio_var={self.ratio_var}")
    if self.group_size is not None and self.group_size < 1:
      raise ValueError(f"group_size must be >= 1 or None, got {self.group_size}")

  @property
  def adaptive(self) -> bool:
    return self.method == SBAM and self.ratio_var > 0


@struct.dataclass
class MaskPlan:
  """Which tokens an encoder sees, in MAE's conventions.

  ids_shuffle: (N, L) int32, tokens in keep-first order; ids_shuffle[:, :len_keep] are kept.
  ids_restore: (N, L) int32, argsort of ids_shuffle (un-shuffles decoder input).
  mask: (N, L) float32, 1 = masked, 0 = kept, in the original token order.
  len_keep: (N,) int32, kept tokens per sample.
  min_keep / max_keep: static bounds on len_keep (a capacity equal to both needs
    no padding mask).
  """
  ids_shuffle: jax.Array
  ids_restore: jax.Array
  mask: jax.Array
  len_keep: jax.Array
  min_keep: int = struct.field(pytree_node=False, default=0)
  max_keep: int = struct.field(pytree_node=False, default=0)

  def ids_keep(self, capacity: int) -> jax.Array:
    """(N, capacity) token ids of the kept slots; slots >= len_keep are padding."""
    return self.ids_shuffle[:, :capacity]

  def keep_valid(self, capacity: int) -> jax.Array:
    """(N, capacity) bool, True for the slots that hold a kept token."""
    return jnp.arange(capacity)[None, :] < self.len_keep[:, None]


def _exact(x) -> fractions.Fraction:
  # repr() is the shortest decimal that round-trips: 0.1 -> Fraction(1, 10).
  if isinstance(x, (fractions.Fraction, int)):
    return fractions.Fraction(x)
  return fractions.Fraction(repr(float(x)))


def fixed_keep_length(num_tokens: int, mask_ratio: float) -> int:
  """floor(L * (1 - r)) in exact arithmetic, clipped to [1, L - 1]."""
  keep = math.floor(num_tokens * (1 - _exact(mask_ratio)))
  return int(min(max(keep, 1), num_tokens - 1))


def keep_length_bounds(spec: MaskingSpec, num_tokens: int) -> tuple[int, int]:
  """(smallest, largest) keep length the spec can produce for L tokens."""
  if not spec.adaptive:
    k = fixed_keep_length(num_tokens, spec.mask_ratio)
    return k, k
  lo = fixed_keep_length(num_tokens, _exact(spec.mask_ratio) + _exact(spec.ratio_var))
  hi = fixed_keep_length(num_tokens, _exact(spec.mask_ratio) - _exact(spec.ratio_var))
  return lo, hi


def max_capacity(spec: MaskingSpec, num_tokens: int) -> int:
  """One static capacity that fits every keep length (one compilation, no host sync)."""
  return keep_length_bounds(spec, num_tokens)[1]


def capacity_buckets(spec: MaskingSpec, num_tokens: int, num_buckets: int = 4) -> tuple[int, ...]:
  """A few capacities evenly covering [min keep, max keep]; the last is max_capacity."""
  lo, hi = keep_length_bounds(spec, num_tokens)
  if num_buckets < 1:
    raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
  edges = {int(math.ceil(lo + (hi - lo) * (i + 1) / num_buckets)) for i in range(num_buckets)}
  return tuple(sorted(edges | {hi}))


def choose_capacity(max_len_keep: int, buckets: tuple[int, ...]) -> int:
  """Smallest bucket that holds `max_len_keep` (a host-side int)."""
  for b in buckets:
    if b >= max_len_keep:
      return b
  raise ValueError(f"keep length {max_len_keep} exceeds the largest capacity bucket {buckets[-1]}")


# Machine epsilon of float32 (2^-23, twice the unit roundoff: a safety factor of 2).
EPS32 = float(np.finfo(np.float32).eps)
# AMR tie band: a salience within DELTA_TIE_RTOL * delta of delta is not "above" delta.
DELTA_TIE_RTOL = 1e-4


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """s + e == a + b exactly (Knuth's TwoSum; no ordering assumption on |a|, |b|)."""
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def _gram(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum("nld,nmd->nlm", a, b, precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)


def _affinity(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x x^T as an unevaluated sum hi + lo, accurate to ~2^-40 of |x_i| |x_j|.

  A plain float32 matmul is off by ~1e-7 |A|: 1e-3 at the logits of ~1e4 a
  trained encoder reaches, which moves softmax terms by 0.1 %. Split each row,
  scaled by a power of two to |x| < 1, into two b-bit integer slices and a
  remainder (all exact). Slice products summed over D stay below 2^24, so those
  three matmuls are exact on any backend; the two that involve the remainder
  (2^-2b of the row) round at ~2^-24-2b. TwoSum gathers the five terms.
  """
  d = x.shape[-1]
  bits = max(1, (24 - math.ceil(math.log2(max(d, 2)))) // 2)  # D * 2^(2 bits) <= 2^24
  _, e = jnp.frexp(jnp.abs(x).max(-1, keepdims=True))
  row = jnp.ldexp(jnp.ones_like(x[..., :1]), e)  # 2^e > max |x_i|, exact
  step, unit = 2.0 ** bits, row * 2.0 ** (-2 * bits)
  t = x / row * step
  s0 = jnp.round(t)
  t = (t - s0) * step
  s1 = jnp.round(t)
  rest = (t - s1) * unit                      # exact remainder, |rest| <= unit / 2
  head = (s0 * step + s1) * unit              # x - rest, exact
  scale = unit * jnp.swapaxes(unit, 1, 2)     # (N, L, L) powers of two
  g01 = _gram(s0, s1) * (scale * step)
  cross = _gram(head, rest)
  hi, lo = _gram(s0, s0) * (scale * step * step), jnp.zeros(())
  for term in (g01, jnp.swapaxes(g01, 1, 2), _gram(s1, s1) * scale, cross,
               jnp.swapaxes(cross, 1, 2), _gram(rest, rest)):
    hi, err = _two_sum(hi, term)
    lo = lo + err
  return hi, lo


def outgoing_attention(tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(shifted outgoing attention d, its rounding bound B): (N, L), (N, 1).

  d_j = e^-M (s_j - 1) = e^-M sum_{i != j} (P_ij - P_ji), with M the image's
  largest off-diagonal log-probability, so the largest term is ~1 however
  one-hot the rows are (a plain float32 s_j - 1 underflows to 0 once
  off-diagonal terms fall below ~1e-38). Rescaling by e^-M and dropping the
  constant 1 leave min-max unchanged. Logits come from `_affinity`; the row
  shift (A_ij - max_k A_ik) is formed exactly; terms below e^-87 of the largest
  flush to zero (< 1e-37 of the spread).

  B bounds the float32 rounding of the spread max d - min d: each d_j is a sum
  of L - 1 differences of terms Q = e^-M P, each with relative error <= 4 eps
  (exp, shift, normalisation, logits), so
      |err d_j| <= 4 eps sum_i (Q_ij + Q_ji) + (L - 1) eps sum_i |Q_ij - Q_ji|
  and B = 2 eps max_j [8 sum_i (Q_ij + Q_ji) + L sum_i |Q_ij - Q_ji|]
  (eps = 2^-23, twice the unit roundoff).
  """
  x = jax.lax.stop_gradient(tokens).astype(jnp.float32)
  n, L, _ = x.shape
  hi, lo = _affinity(x)
  u_hi, u_lo = _two_sum(hi, -hi.max(-1, keepdims=True))
  u_lo = u_lo + lo
  z = jnp.exp(u_hi + u_lo).sum(-1, keepdims=True)      # softmax denominators, in [1, L]
  off = ~jnp.eye(L, dtype=bool)
  top = jnp.where(off, u_hi - jnp.log(z), -jnp.inf).max(axis=(1, 2), keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)         # L = 1: no off-diagonal term
  q = jnp.where(off, jnp.exp((u_hi - top) + u_lo) / z, 0.0)
  anti = q - jnp.swapaxes(q, 1, 2)                     # Q_ij - Q_ji
  shifted = anti.sum(axis=1)
  size = q.sum(axis=1) + q.sum(axis=2)
  bound = 2 * EPS32 * (8 * size + L * jnp.abs(anti).sum(axis=1)).max(-1, keepdims=True)
  return shifted, bound


def token_salience(tokens: jax.Array) -> jax.Array:
  """Outgoing-attention salience, (N, L, D) -> (N, L) float32 in [0, 1].

  The exact value of: A = x x^T (no scale), row softmax, column sums
  s_j = sum_i P_ij, per-image min-max; computed on the float32 tokens given,
  within ~1e-7 of a float64 reference (2e-5 when rows are near uniform and the
  spread is ~0.5 % of the sums), at logits from 1 to 1e4, near one-hot rows
  included (see `outgoing_attention`).

  A row whose spread is within its rounding bound B (`outgoing_attention`;
  ~(8 + L) eps of the sums' size) cannot be told from a constant row: zeros,
  like a constant row, instead of rounding noise stretched to [0, 1] (identical
  tokens at L = 196 gave a spread of ~1e-7 before). Normalised values carry an
  error of at most ~B / spread. No gradient.
  """
  shifted, bound = outgoing_attention(tokens)
  lo = shifted.min(axis=-1, keepdims=True)
  span = shifted.max(axis=-1, keepdims=True) - lo
  ok = span > bound
  return jnp.where(ok, (shifted - lo) / jnp.where(ok, span, 1.0), 0.0)


def delta_band(delta, tie_rtol: float = DELTA_TIE_RTOL):
  """Half-width of the AMR tie band around delta (0 for delta = 0)."""
  return tie_rtol * abs(delta)


def salient_counts(salience: jax.Array, delta: float,
                   tie_rtol: float = DELTA_TIE_RTOL) -> jax.Array:
  """y = #{s_hat > delta + band} per sample, (N,) int32.

  Salience within the band of delta is a tie, not "above": on texture-like
  images near one-hot rows leave ~190 of 196 tokens within 1e-9 of 0.5, and
  whether they land above 0.5 is decided by rounding in any float32
  implementation; with the band they deterministically do not count.
  """
  return (salience > delta + delta_band(delta, tie_rtol)).sum(axis=-1, dtype=jnp.int32)


def in_delta_band(salience: jax.Array, delta: float,
                  tie_rtol: float = DELTA_TIE_RTOL) -> jax.Array:
  """(N,) bool: the sample has a token inside the tie band (its count was
  decided by the band, not by a clear margin)."""
  return (jnp.abs(salience - delta) <= delta_band(delta, tie_rtol)).any(axis=-1)


def _keep_thresholds(num_tokens: int, mask_ratio, ratio_var, group_size: int) -> np.ndarray:
  """T[k-1] = largest group count S (sum of y over the group) with keep length >= k.

  keep(S) = floor(L (1 - r0 + v) - 2 v S / G) is non-increasing in S, so
  keep(S) = #{k in 1..L : S <= T_k}. Exact rationals here make the device
  side integer-only.
  """
  L, G = num_tokens, group_size
  a = L * (1 - _exact(mask_ratio) + _exact(ratio_var))
  b = 2 * _exact(ratio_var) / G
  out = []
  for k in range(1, L + 1):
    # a - b S >= k  <=>  S <= (a - k) / b
    out.append(math.floor((a - k) / b))
  big = np.iinfo(np.int32).max
  return np.clip(np.asarray(out, dtype=np.int64), -1, big).astype(np.int32)


def amr_keep_lengths(salience: jax.Array, *, mask_ratio: float, ratio_var: float, delta: float,
                     group_size: Optional[int], tie_rtol: float = DELTA_TIE_RTOL) -> jax.Array:
  """AMR keep lengths (N,) int32: `group_size` consecutive samples share one ratio.

  y = #{s_hat > delta} (ties within `tie_rtol` * delta of delta do not count,
  see `salient_counts`); r = r0 - v + 2 v mean_group(y) / L;
  len_keep = floor(L (1 - r)) clipped to [1, L - 1]. With v = 0 this is
  floor(L (1 - r0)) for every sample (SBM). group_size None = whole batch.
  """
  n, L = salience.shape
  g = n if group_size is None else int(group_size)
  if n % g:
    raise ValueError(f"batch of {n} samples does not split into AMR groups of {g}")
  if ratio_var == 0:
    return jnp.full((n,), fixed_keep_length(L, mask_ratio), jnp.int32)
  count = salient_counts(salience, delta, tie_rtol)
  group_count = count.reshape(n // g, g).sum(axis=-1)
  thresholds = jnp.asarray(_keep_thresholds(L, mask_ratio, ratio_var, g))
  keep = (group_count[:, None] <= thresholds[None, :]).sum(axis=-1, dtype=jnp.int32)
  keep = jnp.clip(keep, 1, L - 1)
  return jnp.repeat(keep, g, total_repeat_length=n)


def plan_from_scores(scores: jax.Array, len_keep: jax.Array, *, min_keep: int = 0,
                     max_keep: int = 0) -> MaskPlan:
  """Sort scores ascending: the first `len_keep` tokens of each row are kept."""
  n, L = scores.shape
  ids_shuffle = jnp.argsort(scores, axis=-1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=-1).astype(jnp.int32)
  # Position of each token in the shuffle order decides masked (>= len_keep) or kept.
  mask = (ids_restore >= len_keep[:, None]).astype(jnp.float32)
  return MaskPlan(ids_shuffle, ids_restore, mask, len_keep.astype(jnp.int32),
                  min_keep=min_keep or 1, max_keep=max_keep or L - 1)


def random_mask_plan(rng: Optional[jax.Array], batch: int, num_tokens: int, *,
                     mask_ratio: float = 0.75, noise: Optional[jax.Array] = None) -> MaskPlan:
  """MAE's random masking: noise ~ U[0, 1), keep the lowest floor(L (1 - r)).

  Pass `noise` (N, L) to reproduce another implementation's mask exactly.
  """
  if noise is None:
    noise = jax.random.uniform(rng, (batch, num_tokens), jnp.float32)
  keep = fixed_keep_length(num_tokens, mask_ratio)
  return plan_from_scores(noise, jnp.full((batch,), keep, jnp.int32), min_keep=keep,
                          max_keep=keep)


def sbam_mask_plan(tokens: jax.Array, rng: Optional[jax.Array], *, mask_ratio: float = 0.75,
                   ratio_var: float = 0.1, delta: float = 0.5, group_size: Optional[int] = None,
                   noise: Optional[jax.Array] = None,
                   salience: Optional[jax.Array] = None) -> tuple[MaskPlan, jax.Array]:
  """SBM / SBAM plan from patch tokens (N, L, D); returns (plan, salience).

  `noise` (N, L) replaces u ~ U[0, 0.5) (pass it already scaled) so results can
  be compared with other implementations. ratio_var = 0 gives plain SBM.
  `salience` (N, L): `token_salience(tokens)` computed earlier (a host-side
  pre-pass that chose the encoder capacity), not computed again.
  """
  n, L, _ = tokens.shape
  salience = token_salience(tokens) if salience is None else salience
  if noise is None:
    noise = jax.random.uniform(rng, (n, L), jnp.float32, 0.0, SBM_NOISE_SCALE)
  len_keep = amr_keep_lengths(salience, mask_ratio=mask_ratio, ratio_var=ratio_var, delta=delta,
                              group_size=group_size)
  spec = MaskingSpec(SBAM, mask_ratio, ratio_var, delta, group_size)
  lo, hi = keep_length_bounds(spec, L)
  return plan_from_scores(salience + noise, len_keep, min_keep=lo, max_keep=hi), salience


def make_mask_plan(spec: MaskingSpec, tokens: jax.Array, rng: Optional[jax.Array], *,
                   noise: Optional[jax.Array] = None,
                   salience: Optional[jax.Array] = None) -> tuple[MaskPlan, Optional[jax.Array]]:
  """Dispatch on `spec.method`; salience is None for random masking (a given
  `salience` is then ignored)."""
  n, L, _ = tokens.shape
  if spec.method == RANDOM:
    return random_mask_plan(rng, n, L, mask_ratio=spec.mask_ratio, noise=noise), None
  return sbam_mask_plan(tokens, rng, mask_ratio=spec.mask_ratio, ratio_var=spec.ratio_var,
                        delta=spec.delta, group_size=spec.group_size, noise=noise,
                        salience=salience)


def masking_stats(plan: MaskPlan, salience: Optional[jax.Array], delta: float,
                  tie_rtol: float = DELTA_TIE_RTOL) -> dict:
  """Scalars worth logging each step: masking ratio mean/min/max, fraction of
  tokens counted above delta (tie band applied, as AMR counts), mean salience
  entropy (of s_hat normalised to sum 1), and `frac_delta_band`: the fraction
  of images with a token inside the tie band, whose AMR count the band decided
  (degenerate, near one-hot images)."""
  L = plan.mask.shape[-1]
  ratio = 1.0 - plan.len_keep.astype(jnp.float32) / L
  stats = {"mask_ratio_mean": ratio.mean(), "mask_ratio_min": ratio.min(),
           "mask_ratio_max": ratio.max()}
  if salience is not None:
    stats["frac_above_delta"] = salient_counts(salience, delta, tie_rtol).mean() / L
    stats["frac_delta_band"] = in_delta_band(salience, delta, tie_rtol).mean()
    p = salience / jnp.maximum(salience.sum(-1, keepdims=True), 1e-12)
    stats["salience_entropy"] = -(p * jnp.log(jnp.where(p > 0, p, 1.0))).sum(-1).mean()
  return stats
