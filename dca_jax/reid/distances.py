"""Feature distances as torchreid's `compute_distance_matrix`, in float32 numpy: whole
matrices, rows of one set against another, and chosen pairs (what the k-NN re-ranking needs).

'euclidean' is the SQUARED euclidean distance, 'cosine' is 1 - cosine similarity; smaller means
more similar.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

METRICS = ('euclidean', 'cosine')


def normalize(x: np.ndarray) -> np.ndarray:
  # torch.nn.functional.normalize: x / max(||x||, 1e-12).
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))


def features(name: str, values) -> np.ndarray:
  values = np.asarray(values, np.float32)
  if values.ndim != 2:
    raise ValueError(f'{name} must be a 2-D (items, dims) array, got shape {values.shape}')
  return values


def feature_pair(qf, gf) -> tuple[np.ndarray, np.ndarray]:
  qf, gf = features('qf', qf), features('gf', gf)
  if qf.shape[1] != gf.shape[1]:
    raise ValueError(f'qf and gf must have the same feature size, got {qf.shape} and {gf.shape}')
  return qf, gf


def check_metric(metric: str) -> str:
  if metric not in METRICS:
    raise ValueError(f'unknown metric {metric!r}: choose one of {METRICS}')
  return metric


def gallery_distance(gf: np.ndarray, metric: str) -> Callable[[np.ndarray], np.ndarray]:
  """q_block -> (B, G) float32 distances, with the gallery's part computed once."""
  if check_metric(metric) == 'euclidean':
    g_squared_norm = np.einsum('ij,ij->i', gf, gf)
    return lambda q: ((np.einsum('ij,ij->i', q, q)[:, None] + g_squared_norm[None, :])
                      - 2 * (q @ gf.T))
  g_unit = normalize(gf)
  return lambda q: 1 - normalize(q) @ g_unit.T


def distance_matrix(qf, gf, metric: str = 'euclidean') -> np.ndarray:
  """torchreid's `compute_distance_matrix` in float32 numpy.

  'euclidean': the SQUARED euclidean distance ||q||^2 + ||g||^2 - 2 q.g (not clamped: it can be
  slightly negative from rounding, as in torchreid); 'cosine': 1 - cos(q, g) with torch's
  `F.normalize` (norms floored at 1e-12).
  """
  qf, gf = feature_pair(qf, gf)
  return gallery_distance(gf, metric)(qf)


class ItemDistances:
  """Distances among the items of one set (queries then gallery, stacked), by rows or pairs.

  A row is what `gallery_distance` gives against the whole set, so it equals the matching
  row (or, distances being symmetric, column) of `distance_matrix` blocks up to the float32
  rounding of the dot products (the matrix product's order of summation is the library's).
  """

  def __init__(self, items: np.ndarray, num_query: int, metric: str):
    self.items, self.num_query = items, num_query
    self._to_all = gallery_distance(items, metric)
    self._to_gallery = gallery_distance(items[num_query:], metric)
    self._euclidean = metric == 'euclidean'
    self._vectors = items if self._euclidean else normalize(items)
    self._squared_norm = np.einsum('ij,ij->i', items, items)

  def __len__(self) -> int:
    return self.items.shape[0]

  def rows(self, start: int, stop: int) -> np.ndarray:
    """(stop - start, N) distances of items start..stop-1 to every item."""
    return self._to_all(self.items[start:stop])

  def gallery_rows(self, start: int, stop: int) -> np.ndarray:
    """(stop - start, G) distances of items start..stop-1 to the gallery items."""
    return self._to_gallery(self.items[start:stop])

  def pairs(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(P,) distances of items first[p] and second[p]."""
    dot = np.einsum('ij,ij->i', self._vectors[first], self._vectors[second])
    if self._euclidean:
      return (self._squared_norm[first] + self._squared_norm[second]) - 2 * dot
    return 1 - dot
