"""Token packing: the encoder's cost follows the sum of per-image keep lengths.

With per-image AMR ratios every image keeps its own number of tokens. The
'max' strategy pads each to the largest keep length the spec allows; here the
kept tokens (+ cls) of the images of one packing group (one device's share
of the batch) lie end to end in one flat buffer of a static `budget` tokens,
as in NaViT's "Patch n' Pack". Everything that acts per token (layer norms,
qkv, projection, MLP: ~99 % of the encoder's FLOPs at ~50 tokens) runs on
that buffer; attention gathers each image's own tokens into a (images,
1 + max keep) view with key lengths, so a token attends to its own image only
(the block-diagonal mask of a packed row, without its cost: attention on the
view is N S^2, a row of R tokens would cost R^2 per row, and the view keeps
the fused kernels' key-length interface).

Because images are never split between rows, there are no holes: the buffer
needs exactly sum(len_keep + 1) tokens, and the budget is chosen on the device
from a few static buckets (`token_budgets`) with `lax.switch`: no host read.
The last bucket holds every image at its largest length, the exact fallback.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct


@dataclasses.dataclass(frozen=True)
class PackSpec:
  """Static packing plan (hashable).

  groups: packing groups; the batch splits into `groups` consecutive equal
    shares, each packed on its own (one per device, so no gather crosses devices).
  budgets: ascending token budgets per group; the last one fits any batch.
  """
  groups: int
  budgets: tuple

  def __post_init__(self):
    if self.groups < 1 or not self.budgets or list(self.budgets) != sorted(self.budgets):
      raise ValueError(f"bad packing spec: groups={self.groups}, budgets={self.budgets}")


def token_budgets(per_group: int, min_len: int, max_len: int, num_budgets: int,
                  multiple: int = 8) -> tuple:
  """`num_budgets` budgets evenly covering [per_group * min_len, per_group * max_len],
  rounded up to `multiple` tokens (matmul tiles); the last fits every image at
  max_len. min_len / max_len: sequence lengths (len_keep + 1)."""
  if num_budgets < 1:
    raise ValueError(f"num_budgets must be >= 1, got {num_budgets}")
  lo, hi = per_group * min_len, per_group * max_len
  up = lambda t: int(math.ceil(t / multiple) * multiple)
  edges = {up(lo + (hi - lo) * (i + 1) / num_budgets) for i in range(num_budgets)}
  return tuple(sorted(edges | {up(hi)}))


@struct.dataclass
class PackedLayout:
  """Where each image's tokens lie in the flat buffers of its group.

  to_flat: (G, B) index into the group's (n * S) view slots for each buffer slot
    (slots past the group's total repeat slot 0: computed, never read).
  to_view: (G, n * S) buffer index of each view slot (slots past an image's
    length repeat its last token: attention masks them, unpacking drops them).
  lengths: (G * n,) tokens per image (len_keep + 1).
  """
  to_flat: jax.Array
  to_view: jax.Array
  lengths: jax.Array
  seq: int = struct.field(pytree_node=False, default=0)

  def pack(self, view: jax.Array) -> jax.Array:
    """(N, S, C) per-image view -> (G, B, C) packed buffers."""
    g = self.to_flat.shape[0]
    x = view.reshape((g, -1) + view.shape[2:])
    return jnp.take_along_axis(x, self.to_flat[..., None], axis=1)

  def unpack(self, flat: jax.Array) -> jax.Array:
    """(G, B, C) packed buffers -> (N, S, C); rows past an image's length are
    copies of its last token (padding)."""
    x = jnp.take_along_axis(flat, self.to_view[..., None], axis=1)
    return x.reshape((-1, self.seq) + flat.shape[2:])


def make_layout(lengths: jax.Array, groups: int, budget: int, seq: int) -> PackedLayout:
  """Layout for images of `lengths` (N,) tokens (each <= seq), packed end to end
  in `groups` buffers of `budget` tokens. The caller guarantees that each
  group's total fits the budget (`choose_budget`)."""
  n_all = lengths.shape[0]
  if n_all % groups:
    raise ValueError(f"batch of {n_all} does not split into {groups} packing groups")
  lens = lengths.reshape(groups, -1).astype(jnp.int32)
  n = lens.shape[1]
  ends = jnp.cumsum(lens, axis=1)
  starts = ends - lens
  j = jnp.arange(seq, dtype=jnp.int32)
  to_view = starts[..., None] + jnp.minimum(j, lens[..., None] - 1)
  to_view = jnp.clip(to_view, 0, budget - 1).reshape(groups, n * seq)
  p = jnp.arange(budget, dtype=jnp.int32)
  img = jax.vmap(lambda e: jnp.searchsorted(e, p, side="right"))(ends).astype(jnp.int32)
  img = jnp.minimum(img, n - 1)
  slot = p[None, :] - jnp.take_along_axis(starts, img, axis=1)
  valid = p[None, :] < ends[:, -1:]
  to_flat = jnp.where(valid, img * seq + slot, 0)
  return PackedLayout(to_flat, to_view, lengths.astype(jnp.int32), seq)


def choose_budget(lengths: jax.Array, spec: PackSpec) -> jax.Array:
  """Index of the smallest budget that holds every group's total (on device).
  Totals above the last budget cannot happen (it fits every image at S)."""
  need = lengths.reshape(spec.groups, -1).sum(axis=1).max()
  over = (need > jnp.asarray(spec.budgets, jnp.int32)).sum()
  return jnp.minimum(over, len(spec.budgets) - 1)


def run_packed(fn, view: jax.Array, lengths: jax.Array, spec: PackSpec) -> jax.Array:
  """fn(flat (G, B, C), layout) -> (G, B, C') on the packed tokens of `view`
  (N, S, C); returns the unpacked (N, S, C'). One branch per budget; only the
  chosen one runs."""
  seq = view.shape[1]

  def branch(budget):
    def go(x):
      layout = make_layout(lengths, spec.groups, budget, seq)
      return layout.unpack(fn(layout.pack(x), layout))
    return go

  if len(spec.budgets) == 1:
    return branch(spec.budgets[0])(view)
  return jax.lax.switch(choose_budget(lengths, spec), [branch(b) for b in spec.budgets], view)
