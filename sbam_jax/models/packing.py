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
  """`num_budgets` budgets in geometric steps from [per_group * min_len] to
  [per_group * max_len], rounded up to `multiple` tokens (matmul tiles).

  Geometric, so a group's total is never more than a fixed fraction short of
  its budget: each budget is at most r = (max_len / min_len)^(1 / (num_budgets
  - 1)) times the one below, and the tokens computed exceed those kept by less
  than r - 1 (+ the rounding) whatever the keep lengths (4.5 % for the
  default 20 budgets over 30..69 tokens). The first fits every image at
  min_len, the last every image at max_len (the exact fallback). min_len /
  max_len: sequence lengths (len_keep + 1)."""
  if num_budgets < 1:
    raise ValueError(f"num_budgets must be >= 1, got {num_budgets}")
  lo, hi = per_group * min_len, per_group * max_len
  up = lambda t: int(math.ceil(t / multiple - 1e-9) * multiple)
  if num_budgets == 1 or lo >= hi:
    return (up(hi),)
  ratio = (hi / lo) ** (1 / (num_budgets - 1))
  return tuple(sorted({up(lo * ratio ** i) for i in range(num_budgets - 1)} | {up(hi)}))


@struct.dataclass
class PackedLayout:
  """Where each image's tokens lie in the flat buffers of its group.

  to_flat: (G, B) index into the group's (n * S) view slots for each buffer slot.
  to_view: (G, n * S) buffer index of each view slot.
  flat_used / view_used: (G, B) / (G, n * S) masks of the slots that hold a
    token (before the group's total / before the image's length); the others
    read as zeros (computed, never read; attention masks them).
  lengths: (G * n,) tokens per image (len_keep + 1).

  On the used slots `to_flat` and `to_view` are inverse one-to-one maps, so
  `pack` and `unpack` are each other's transposes: each one's backward is the
  other gather, not a scatter-add, which XLA serialises (ViT-B width, 1,600
  tokens, CPU, forward + backward: unpack + pack beside the qkv matmul cost
  9 ms against 23 ms with scatters, the matmul 60 ms).
  """
  to_flat: jax.Array
  to_view: jax.Array
  flat_used: jax.Array
  view_used: jax.Array
  lengths: jax.Array
  seq: int = struct.field(pytree_node=False, default=0)

  def pack(self, view: jax.Array) -> jax.Array:
    """(N, S, C) per-image view -> (G, B, C) packed buffers."""
    g = self.to_flat.shape[0]
    x = view.reshape((g, -1) + view.shape[2:])
    return _move_rows(x, self.to_flat, self.flat_used, self.to_view, self.view_used)

  def unpack(self, flat: jax.Array) -> jax.Array:
    """(G, B, C) packed buffers -> (N, S, C), zeros past each image's length."""
    x = _move_rows(flat, self.to_view, self.view_used, self.to_flat, self.flat_used)
    return x.reshape((-1, self.seq) + flat.shape[2:])


def _gather_used(x: jax.Array, index: jax.Array, used: jax.Array) -> jax.Array:
  """x[g, index[g, i]] where used[g, i], else 0."""
  tail = (1,) * (x.ndim - 2)
  rows = jnp.take_along_axis(x, index.reshape(index.shape + tail), axis=1)
  return jnp.where(used.reshape(used.shape + tail), rows, jnp.zeros((), x.dtype))


@jax.custom_vjp
def _move_rows(x, index, used, back, back_used):
  """`_gather_used(x, index, used)`, whose transpose is `_gather_used(g, back,
  back_used)` when (index, used) and (back, back_used) are inverse maps."""
  return _gather_used(x, index, used)


def _move_rows_fwd(x, index, used, back, back_used):
  return _gather_used(x, index, used), (back, back_used)


def _move_rows_bwd(saved, g):
  return (_gather_used(g, *saved), None, None, None, None)


_move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


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
  view_used = (j < lens[..., None]).reshape(groups, n * seq)
  p = jnp.arange(budget, dtype=jnp.int32)
  img = jax.vmap(lambda e: jnp.searchsorted(e, p, side="right"))(ends).astype(jnp.int32)
  img = jnp.minimum(img, n - 1)
  slot = p[None, :] - jnp.take_along_axis(starts, img, axis=1)
  valid = p[None, :] < ends[:, -1:]
  to_flat = jnp.where(valid, img * seq + slot, 0)
  return PackedLayout(to_flat, to_view, valid, view_used, lengths.astype(jnp.int32), seq)


def choose_budget(lengths: jax.Array, spec: PackSpec) -> jax.Array:
  """Index of the smallest budget that holds every group's total (on device).
  Totals above the last budget cannot happen (it fits every image at S)."""
  need = lengths.reshape(spec.groups, -1).sum(axis=1).max()
  over = (need > jnp.asarray(spec.budgets, jnp.int32)).sum()
  return jnp.minimum(over, len(spec.budgets) - 1)


def run_packed(fn, params, view: jax.Array, lengths: jax.Array, spec: PackSpec) -> jax.Array:
  """fn(params, flat (G, B, C), layout) -> (G, B, C') on the packed tokens of
  `view` (N, S, C); returns the unpacked (N, S, C'). One branch per budget;
  only the chosen one runs, forward and backward."""
  seq = view.shape[1]

  def branch(budget):
    def go(p, x, lens):
      layout = make_layout(lens, spec.groups, budget, seq)
      return layout.unpack(fn(p, layout.pack(x), layout))
    return go

  if len(spec.budgets) == 1:
    return branch(spec.budgets[0])(params, view, lengths)
  return switch_sharing_residuals(choose_budget(lengths, spec),
                                  [branch(b) for b in spec.budgets], params, view, lengths)


def switch_sharing_residuals(index, branches, params, x, aux):
  """`lax.switch(index, branches, params, x, aux)`, differentiable in (params,
  x), whose backward keeps the residuals of the branch that ran in buffers
  sized for the largest branch.

  Under autodiff `lax.switch` keeps every branch's residuals side by side
  (zeros for the branches that did not run): K budgets would cost the
  activation memory of all K. Here each branch's forward is `jax.vjp`, its
  residuals (the same tree in every branch, only the token axis differs) are
  padded into shared slots of the largest shape, and the backward switches
  again and slices them back. Memory is that of the largest budget, compute
  that of the chosen one. `aux` (integer arrays) gets no gradient."""
  trees = {}

  def forward(i):
    def go(p, y, a):
      out, pull = jax.vjp(lambda p_, y_: branches[i](p_, y_, a), p, y)
      leaves, trees[i] = jax.tree.flatten(pull)
      return out, leaves
    return go

  shapes = []  # each branch's residuals; traced only under autodiff (in run_fwd)

  @jax.custom_vjp
  def run(index, p, y, a):
    return jax.lax.switch(index, branches, p, y, a)

  def run_fwd(index, p, y, a):
    shapes[:] = [jax.eval_shape(forward(i), p, y, a)[1] for i in range(len(branches))]
    slots = _shared_slots(shapes)

    def padded(i):
      def go(p_, y_, a_):
        out, leaves = forward(i)(p_, y_, a_)
        return out, [_pad(v, s.shape) for v, s in zip(leaves, slots)]
      return go
    out, res = jax.lax.switch(index, [padded(i) for i in range(len(branches))], p, y, a)
    return out, (index, res, a)

  def run_bwd(saved, g):
    index, res, a = saved

    def backward(i):
      def go(res_, g_):
        leaves = [v[tuple(slice(0, d) for d in s.shape)] for v, s in zip(res_, shapes[i])]
        return jax.tree.unflatten(trees[i], leaves)(g_)
      return go
    dp, dy = jax.lax.switch(index, [backward(i) for i in range(len(branches))], res, g)
    return None, dp, dy, jax.tree.map(lambda _: None, a)

  run.defvjp(run_fwd, run_bwd)
  return run(index, params, x, aux)


def _shared_slots(shapes: list) -> list:
  """One slot per residual position, of the largest shape any branch needs
  there; the branches must save the same tree of the same dtypes and ranks."""
  first = shapes[0]
  for other in shapes[1:]:
    if len(other) != len(first) or any(
        (a.dtype, len(a.shape)) != (b.dtype, len(b.shape)) for a, b in zip(first, other)):
      raise ValueError("packing budgets save different residuals; cannot share them")
  return [jax.ShapeDtypeStruct(tuple(max(dims) for dims in zip(*(s[k].shape for s in shapes))),
                               first[k].dtype) for k in range(len(first))]


def _pad(v: jax.Array, shape: tuple) -> jax.Array:
  if v.shape == shape:
    return v
  return jnp.pad(v, [(0, t - d) for d, t in zip(v.shape, shape)])


def switch_with_gradients(index, branches, params, args):
  """`lax.switch(index, branches, params, *args)` for scalar losses
  `branch(params, *args) -> (loss, aux)`, differentiable in `params` only,
  where the branch that runs computes its own gradient in the forward.

  Nothing but that gradient (the same tree in every branch) leaves the
  switch for the backward, which scales it by the loss's cotangent. A switch
  differentiated the usual way hands every activation of the branch out as a
  residual: sharing their slots (`switch_sharing_residuals`) bounds the
  memory, but copying them in and out cost the CPU step 5-8 %. `aux` and
  `args` get no gradient; the branches must not close over traced values
  (pass them in `args`): a custom_vjp cannot carry them."""

  @jax.custom_vjp
  def run(i, p, a):
    return jax.lax.switch(i, branches, p, *a)

  def run_fwd(i, p, a):
    with_grad = [jax.value_and_grad(b, has_aux=True) for b in branches]
    out, grad = jax.lax.switch(i, with_grad, p, *a)
    return out, (grad, i, a)

  def run_bwd(saved, ct):
    grad, i, a = saved
    scale = ct[0]
    return (None, jax.tree.map(lambda g: (g * scale).astype(g.dtype), grad),
            jax.tree.map(lambda _: None, a))

  run.defvjp(run_fwd, run_bwd)
  return run(index, params, tuple(args))
