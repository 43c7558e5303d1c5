"""Fixed 2-D sin-cos position tables, MAE's formula, computed in float64."""

import numpy as np


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """(M,) positions -> (M, dim) as [sin | cos], frequencies 1 / 10000^(i / (dim/2))."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
  """(grid^2 [+1], dim) float32 table; tokens row-major; first half of the
  channels encodes the column index, second half the row index; a zero row
  for the cls slot comes first when `cls_token`."""
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
  table = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
  if cls_token:
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
  return table.astype(np.float32)


def _bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """(n_out, n_in) weights of torch's bicubic interpolation (align_corners=False,
  no antialias): source x = (i + 0.5) n_in / n_out - 0.5, cubic convolution
  with a = -0.75 over floor(x) - 1 .. floor(x) + 2, indices clamped to the edge."""
  def cubic(d):
    d = np.abs(d)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))

  x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
  x0 = np.floor(x)
  w = np.zeros((n_out, n_in))
  for k in range(-1, 3):
    idx = np.clip(x0 + k, 0, n_in - 1).astype(int)
    np.add.at(w, (np.arange(n_out), idx), cubic(x - (x0 + k)))
  return w


def resample_pos_embed(table: np.ndarray, new_grid: int) -> np.ndarray:
  """MAE's interpolate_pos_embed: (1, 1 + g*g, D) -> (1, 1 + n*n, D), the cls
  row kept, patch rows resampled bicubically as torch's F.interpolate (float64
  here, so within float32 rounding of the reference)."""
  table = np.asarray(table)
  cls, patches = table[:, :1], table[:, 1:]
  g = int(round(np.sqrt(patches.shape[1])))
  if g * g != patches.shape[1]:
    raise ValueError(f"position table has {patches.shape[1]} patch rows, not a square grid")
  if g == new_grid:
    return table
  w = _bicubic_matrix(g, new_grid)
  grid = patches.reshape(g, g, -1).astype(np.float64)
  out = np.einsum("yi,xj,ijd->yxd", w, w, grid).reshape(1, new_grid * new_grid, -1)
  return np.concatenate([cls, out.astype(table.dtype)], axis=1)
