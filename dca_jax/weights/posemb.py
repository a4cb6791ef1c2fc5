"""Position-embedding resize: the grid part of a `pos_embed` to another grid (square or not).

bicubic (timm's, antialiased when shrinking) or bilinear with aligned corners (the original ViT
code); the CLS (and distillation) slots are kept as they are.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import numpy as np

Grid = Union[int, Tuple[int, int]]


POSEMB_METHODS = ('bicubic', 'bilinear')


def _cubic_antialias_kernel(distance: np.ndarray, a: float = -0.5) -> np.ndarray:
  """PIL's / ATen's antialiasing cubic filter (a = -0.5, support 2)."""
  distance = np.abs(distance)
  return np.where(distance < 1.0,
                  ((a + 2.0) * distance - (a + 3.0)) * distance * distance + 1.0,
                  np.where(distance < 2.0,
                           (((distance - 5.0) * distance + 8.0) * distance - 4.0) * a, 0.0))


def _bicubic_antialias_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of PyTorch's `interpolate(mode='bicubic', antialias=True,
  align_corners=False)` (ATen `_upsample_bicubic2d_aa`, PIL's filter: a = -0.5, support 2
  widened by the scale when shrinking, window clipped at the border and renormalised)."""
  scale = n_in / n_out
  support = 2.0 * scale if scale >= 1.0 else 2.0
  inverse_scale = 1.0 / scale if scale >= 1.0 else 1.0
  matrix = np.zeros((n_out, n_in), np.float64)
  for out_index in range(n_out):
    center = scale * (out_index + 0.5)
    first = max(int(center - support + 0.5), 0)  # C++ static_cast truncation (argument >= -0.5)
    stop = min(int(center + support + 0.5), n_in)
    inputs = np.arange(first, stop)
    taps = _cubic_antialias_kernel((inputs - center + 0.5) * inverse_scale)
    total = taps.sum()
    matrix[out_index, first:stop] = taps / total if total != 0 else taps
  return matrix


def _linear_align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of `scipy.ndimage.zoom(order=1)` (grid_mode=False: the corner samples
  are aligned, output o reads input o * (n_in - 1) / (n_out - 1))."""
  matrix = np.zeros((n_out, n_in), np.float64)
  if n_out == 1 or n_in == 1:
    matrix[:, 0] = 1.0
    return matrix
  position = np.arange(n_out) * ((n_in - 1) / (n_out - 1))
  below = np.clip(np.floor(position).astype(int), 0, n_in - 1)
  above = np.minimum(below + 1, n_in - 1)
  fraction = position - below
  matrix[np.arange(n_out), below] += 1.0 - fraction
  matrix[np.arange(n_out), above] += fraction
  return matrix


def grid_height_width(grid: Grid) -> Tuple[int, int]:
  """(height, width) of a grid given as one side (square) or as (height, width)."""
  if isinstance(grid, (int, np.integer)):
    height = width = int(grid)
  else:
    height, width = (int(side) for side in grid)
  if height < 1 or width < 1:
    raise ValueError(f'grid must be positive, got {grid}')
  return height, width


def square_side(num_tokens: int) -> Optional[int]:
  """g when num_tokens = g * g, else None."""
  side = int(round(math.sqrt(num_tokens)))
  return side if side * side == num_tokens else None


def resize_posemb(posemb: np.ndarray, new_grid: Grid, method: str = 'bicubic',
                  num_prefix_tokens: int = 1) -> np.ndarray:
  """Resizes a [1, prefix + g*g, D] position embedding to a new grid, square or not.

  `new_grid` is one side (square) or (height, width), e.g. (16, 8) for 256x128 Re-ID inputs at
  patch 16. The prefix (CLS) slots are kept as they are; only the square grid part is resampled,
  rows and columns separably:
  - 'bicubic': numerically timm's `resample_abs_pos_embed(new_size=(height, width))` (what
    `checkpoint_filter_fn` uses): `F.interpolate(mode='bicubic', antialias=True,
    align_corners=False)`, i.e. PyTorch's antialiased (PIL-style, a = -0.5) bicubic — *not* the
    a = -0.75 non-antialiased kernel.
  - 'bilinear': the original ViT code (`vit_jax/checkpoint.py`): `scipy.ndimage.zoom(order=1)`
    with zoom (height / g, width / g), bilinear with aligned corners.
  Computed in float64, returned in the input dtype.
  """
  if method not in POSEMB_METHODS:
    raise ValueError(f'unknown posemb interpolation {method!r}; use one of {POSEMB_METHODS}')
  new_height, new_width = grid_height_width(new_grid)
  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f'posemb must be [1, tokens, D], got {posemb.shape}')
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
  old_side = square_side(grid.shape[0])
  if old_side is None:
    raise ValueError(f'posemb grid of {grid.shape[0]} tokens is not square')
  if (old_side, old_side) == (new_height, new_width):
    return posemb.copy()
  make_matrix = _bicubic_antialias_matrix if method == 'bicubic' else _linear_align_corners_matrix
  rows = make_matrix(old_side, new_height)
  columns = make_matrix(old_side, new_width)
  table = grid.reshape(old_side, old_side, -1).astype(np.float64)
  table = np.einsum('hi,ijd->hjd', rows, table)
  table = np.einsum('wj,hjd->hwd', columns, table)
  table = table.reshape(1, new_height * new_width, -1).astype(posemb.dtype)
  return np.concatenate([prefix, table], axis=1)
