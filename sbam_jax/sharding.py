"""Device mesh and sharding rules.

Mesh axes: 'data' (pure data parallel) and 'fsdp' (data parallel whose
devices also split parameters and optimizer state). The batch is split over
both. An array of at least `min_fsdp_size` elements is split over 'fsdp'
along its last dimension divisible by the axis size (for stacked blocks
(depth, in, out) that is `out`, so a scanned layer never needs the depth axis
gathered); everything else is replicated. One rule for parameters, AdamW
moments and anything shaped like them.
"""

from __future__ import annotations

import numpy as np
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} does not divide the {n} devices")
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f"mesh.data={data} x mesh.fsdp={fsdp} != {n} devices")
  return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def leaf_spec(shape, fsdp_size: int, min_fsdp_size: int = 2 ** 12) -> P:
  if fsdp_size == 1 or int(np.prod(shape)) < min_fsdp_size:
    return P()
  for axis in reversed(range(len(shape))):
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(mesh: Mesh, tree, min_fsdp_size: int = 2 ** 12):
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, leaf_spec(np.shape(x), fsdp, min_fsdp_size)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(mesh: Mesh, local: np.ndarray) -> jax.Array:
  """Assemble the global batch from this process's rows (process order)."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh), local)
