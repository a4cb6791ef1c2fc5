"""k-reciprocal re-ranking from features, in memory O((Q+G) k1 k2), its output by blocks.

The same algorithm as rerank.py's `re_ranking` (torchreid's), fed from k-nearest-neighbour
lists instead of the dense (Q+G)^2 matrix, as SpCL's `compute_jaccard_distance` and fast-reid's
sparse re-ranking do: the items' distances are computed one block of rows at a time (a matrix
product against all items), normalised, cut to each row's nearest k1+1 (exactly: the same
`_top_ranks` the dense path uses), and dropped. Everything after — the k-reciprocal sets, the
weights, the query expansion, the Jaccard distances — is rerank.py's sparse code itself.

Where it can differ from `re_ranking(distance_matrix(qf, gf), distance_matrix(qf, qf),
distance_matrix(gf, gf))`: only in the float32 rounding of dot products (a row here is one
matrix product against all items, there a block of three products, one of them symmetric), and
in the few weights of set members outside an item's own k1+1 nearest (from a per-pair dot
product). Both move a distance by the float32 rounding of a dot product; a neighbour list
changes only where two distances of one row are that close (docs/REID.md, "Scale", measures it).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from dca_jax.reid import rerank
from dca_jax.reid.arrays import int_at_least
from dca_jax.reid.distances import ItemDistances, feature_pair

# Elements of a (rows, all items) block of distances handled at once: ~64 MiB float32 plus the
# partial sort's temporaries. No result depends on it.
_ROW_ELEMENTS = 1 << 24


def _neighbours(items: ItemDistances, width: int):
  """(nearest, their original distances, row maxima): each item's `width` nearest items as
  np.argsort of its row of the reference's `original` (distance^2 / the row's max)."""
  num_items = len(items)
  nearest = np.empty((num_items, width), np.intp)
  nearest_original = np.empty((num_items, width), np.float32)
  row_max = np.empty(num_items, np.float32)
  rows_per_block = max(1, _ROW_ELEMENTS // num_items)
  for start in range(0, num_items, rows_per_block):
    stop = min(start + rows_per_block, num_items)
    original = np.square(items.rows(start, stop))
    row_max[start:stop] = original.max(axis=1)
    original /= row_max[start:stop, None]
    top = rerank._top_ranks(original, width)
    nearest[start:stop] = top
    nearest_original[start:stop] = np.take_along_axis(original, top, axis=1)
    del original, top
  return nearest, nearest_original, row_max


def _member_distances(keys: np.ndarray, nearest: np.ndarray, nearest_original: np.ndarray,
                      items: ItemDistances, row_max: np.ndarray) -> np.ndarray:
  """original[i, j] for each key i * N + j of the expanded sets: from the neighbour lists where
  j is among i's nearest, else computed for the pair (members taken from a neighbour's set)."""
  num_items = len(items)
  listed = (np.arange(num_items)[:, None] * num_items + nearest).ravel()
  order = np.argsort(listed)
  listed = listed[order]
  at = np.minimum(np.searchsorted(listed, keys), listed.size - 1)
  known = listed[at] == keys
  values = np.empty(keys.size, np.float32)
  values[known] = nearest_original.ravel()[order[at[known]]]
  row, col = keys[~known] // num_items, keys[~known] % num_items
  values[~known] = np.square(items.pairs(row, col)) / row_max[row]
  return values


def _checked(qf, gf, k1, k2) -> tuple[np.ndarray, np.ndarray]:
  qf, gf = feature_pair(qf, gf)
  if 0 in (len(qf), len(gf)):
    raise ValueError(f'need at least one query and one gallery item, got {len(qf)} and {len(gf)}')
  for name, values in (('qf', qf), ('gf', gf)):
    if not np.isfinite(values).all():
      raise ValueError(f'{name} holds NaN or infinite values: the distances would be meaningless')
  int_at_least('k1', k1, 0)
  int_at_least('k2', k2, 1)
  return qf, gf


def reranked_blocks(qf, gf, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, *,
                    metric: str = 'euclidean') -> Iterator[tuple[int, int, np.ndarray]]:
  """k-reciprocal re-ranking of query vs gallery features, one block of queries at a time.

  The same steps and parameters as `rerank.re_ranking` on `distance_matrix` inputs of this
  metric (the given distances squared, normalised by each item's maximum, k1-reciprocal sets
  expanded by round(k1/2)-reciprocal ones, exp(-d) weights, query expansion over k2 rows,
  (1 - lambda) * Jaccard + lambda * original), without the (Q+G)^2 matrix. The neighbour lists
  and sparse weights are built here, before the first block; the blocks then follow.

  Args:
    qf, gf: (Q, D) query and (G, D) gallery features.
    k1, k2, lambda_value: the paper's parameters (20, 6, 0.3).
    metric: 'euclidean' (squared) or 'cosine', as `distance_matrix`.

  Returns:
    an iterator of (start, stop, (stop - start, G) float32 re-ranked distances), queries in order.

  Raises:
    ValueError: for mismatched or empty features, NaN or infinite values, bad k1/k2 or metric.
  """
  qf, gf = _checked(qf, gf, k1, k2)
  num_query = len(qf)
  items = ItemDistances(np.concatenate([qf, gf]), num_query, metric)
  num_items = len(items)
  nearest, nearest_original, row_max = _neighbours(items, min(max(k1 + 1, k2), num_items))
  keys = rerank._k_reciprocal_sets(nearest, k1)
  encoding = rerank._neighbour_weights(
      keys, _member_distances(keys, nearest, nearest_original, items, row_max), num_items)
  del keys, nearest_original
  if k2 != 1:
    encoding = rerank._query_expansion(encoding, nearest[:, :min(k2, num_items)])
  del nearest

  def original_rows(start, stop):
    return np.square(items.gallery_rows(start, stop)) / row_max[start:stop, None]

  return rerank.reranked_blocks(encoding, num_query, num_items, float(lambda_value),
                                original_rows)


def re_ranking_features(qf, gf, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, *,
                        metric: str = 'euclidean') -> np.ndarray:
  """(Q, G) float32 re-ranked distances of query vs gallery features: `reranked_blocks`
  gathered into one matrix."""
  blocks = reranked_blocks(qf, gf, k1, k2, lambda_value, metric=metric)
  final = np.empty((len(qf), len(gf)), np.float32)
  for start, stop, block in blocks:
    final[start:stop] = block
  return final
