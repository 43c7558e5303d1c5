"""Salience-based adaptive masking (SBAM), as a pure, jittable API.

Independent of any model: give it the patch tokens (N, L, D) an encoder would
see (patch embedding + position embedding, no cls token) and a PRNG key, get
back a `MaskPlan` in MAE's conventions. Other MIM methods can reuse it as is.

    salience  s_hat = minmax( sum_i softmax(x x^T)_ij )          (N, L)
    SBM order score = s_hat + u,  u ~ U[0, 0.5); lowest scores are kept
    AMR ratio       r = r0 - v + 2 v * mean(#{s_hat > delta}) / L  (per group)
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
constant salience row; this module does both.
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


def token_salience(tokens: jax.Array) -> jax.Array:
  """Outgoing-attention salience, (N, L, D) -> (N, L) float32 in [0, 1].

  A = x x^T (no scale, float32, full matmul precision: logits reach ~1e3, and
  TF32 / bf16 passes would reorder tokens); row softmax; column sums; per-image
  min-max. The column sums are computed shifted by the (exactly 1) row sums,
  which min-max ignores, to avoid cancellation. A constant row (max == min)
  gives zeros instead of NaN. No gradient.
  """
  x = jax.lax.stop_gradient(tokens).astype(jnp.float32)
  affinity = jnp.einsum("nld,nmd->nlm", x, x, precision=jax.lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32)
  attn = jax.nn.softmax(affinity, axis=-1)
  # s_j = sum_i P_ij; rows of P sum to 1, so s_j - 1 = sum_i P_ij - sum_k P_jk,
  # where the diagonal P_jj cancels exactly. Summing only off-diagonal terms
  # keeps float32 precision when rows are near one-hot (s_j = 1 + tiny), which
  # a plain column sum loses before min-max normalisation magnifies it.
  L = attn.shape[-1]
  off = jnp.where(jnp.eye(L, dtype=bool), 0.0, attn)
  outgoing = off.sum(axis=1) - off.sum(axis=2)
  lo = outgoing.min(axis=-1, keepdims=True)
  span = outgoing.max(axis=-1, keepdims=True) - lo
  safe = jnp.where(span > 0, span, 1.0)
  return jnp.where(span > 0, (outgoing - lo) / safe, 0.0)


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
                     group_size: Optional[int]) -> jax.Array:
  """AMR keep lengths (N,) int32: `group_size` consecutive samples share one ratio.

  y_j = #{s_hat > delta}; r = r0 - v + 2 v mean_group(y) / L;
  len_keep = floor(L (1 - r)) clipped to [1, L - 1]. With v = 0 this is
  floor(L (1 - r0)) for every sample (SBM). group_size None = whole batch.
  """
  n, L = salience.shape
  g = n if group_size is None else int(group_size)
  if n % g:
    raise ValueError(f"batch of {n} samples does not split into AMR groups of {g}")
  if ratio_var == 0:
    return jnp.full((n,), fixed_keep_length(L, mask_ratio), jnp.int32)
  count = (salience > delta).sum(axis=-1, dtype=jnp.int32)
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
                   noise: Optional[jax.Array] = None) -> tuple[MaskPlan, jax.Array]:
  """SBM / SBAM plan from patch tokens (N, L, D); returns (plan, salience).

  `noise` (N, L) replaces u ~ U[0, 0.5) (pass it already scaled) so results can
  be compared with other implementations. ratio_var = 0 gives plain SBM.
  """
  n, L, _ = tokens.shape
  salience = token_salience(tokens)
  if noise is None:
    noise = jax.random.uniform(rng, (n, L), jnp.float32, 0.0, SBM_NOISE_SCALE)
  len_keep = amr_keep_lengths(salience, mask_ratio=mask_ratio, ratio_var=ratio_var, delta=delta,
                              group_size=group_size)
  spec = MaskingSpec(SBAM, mask_ratio, ratio_var, delta, group_size)
  lo, hi = keep_length_bounds(spec, L)
  return plan_from_scores(salience + noise, len_keep, min_keep=lo, max_keep=hi), salience


def make_mask_plan(spec: MaskingSpec, tokens: jax.Array, rng: Optional[jax.Array], *,
                   noise: Optional[jax.Array] = None) -> tuple[MaskPlan, Optional[jax.Array]]:
  """Dispatch on `spec.method`; salience is None for random masking."""
  n, L, _ = tokens.shape
  if spec.method == RANDOM:
    return random_mask_plan(rng, n, L, mask_ratio=spec.mask_ratio, noise=noise), None
  return sbam_mask_plan(tokens, rng, mask_ratio=spec.mask_ratio, ratio_var=spec.ratio_var,
                        delta=spec.delta, group_size=spec.group_size, noise=noise)


def masking_stats(plan: MaskPlan, salience: Optional[jax.Array], delta: float) -> dict:
  """Scalars worth logging each step: masking ratio mean/min/max, fraction of
  tokens above delta, mean salience entropy (of s_hat normalised to sum 1)."""
  L = plan.mask.shape[-1]
  ratio = 1.0 - plan.len_keep.astype(jnp.float32) / L
  stats = {"mask_ratio_mean": ratio.mean(), "mask_ratio_min": ratio.min(),
           "mask_ratio_max": ratio.max()}
  if salience is not None:
    stats["frac_above_delta"] = (salience > delta).mean()
    p = salience / jnp.maximum(salience.sum(-1, keepdims=True), 1e-12)
    stats["salience_entropy"] = -(p * jnp.log(jnp.where(p > 0, p, 1.0))).sum(-1).mean()
  return stats
