"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) as torchreid's `re_ranking`, vectorised
in plain numpy and bounded in memory: the same distances, checked against torchreid itself
(tests/test_reid_metrics.py). The same from features, without the dense matrix: rerank_knn.py."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dca_jax.reid.arrays import (GiB, int_at_least, query_gallery_matrix, run_positions,
                                 run_starts)

# Re-ranking works on slices of the dense (Q+G)^2 matrix and on blocks of items, to bound the
# temporaries; no result depends on these sizes.
_SLICE_ELEMENTS = 1 << 24  # elements of the dense matrix (or of the output) handled at once
_RECIPROCAL_BLOCK = 4096  # items whose neighbour lists are cross-checked at once
_EXPANSION_BLOCK = 2048  # items whose neighbours' half-size sets are compared at once
_EXPANSION_ROWS = 8192  # rows of the query expansion built at once
_JACCARD_TERMS = 1 << 22  # (query, column, gallery item) terms of the Jaccard sums at once


class _Sparse(NamedTuple):
  """A sparse float32 matrix as (row, col, value) lists, sorted by row, then column."""
  row: np.ndarray
  col: np.ndarray
  value: np.ndarray


class _Columns(NamedTuple):
  """A sparse matrix's (row, value) lists grouped by column: j's from start[j], length[j] long."""
  start: np.ndarray
  length: np.ndarray
  row: np.ndarray
  value: np.ndarray


def _top_ranks(rows: np.ndarray, width: int) -> np.ndarray:
  """np.argsort(rows, axis=1)[:, :width], without sorting whole rows where that is provably equal.

  A row's first `width` indices are unique when its `width` smallest values are distinct and
  all below the rest: then a partial sort gives exactly what any full sort gives. Other rows
  (ties or NaN near the cut) take the full np.argsort, i.e. the reference's tie order.
  """
  if width >= rows.shape[1]:
    return np.argsort(rows, axis=1)[:, :width]
  partition = np.argpartition(rows, width, axis=1)
  top = partition[:, :width]
  top_values = np.take_along_axis(rows, top, axis=1)
  by_value = np.argsort(top_values, axis=1, kind='stable')
  top = np.take_along_axis(top, by_value, axis=1)
  top_values = np.take_along_axis(top_values, by_value, axis=1)
  next_value = np.take_along_axis(rows, partition[:, width:width + 1], axis=1)[:, 0]
  provable = (np.all(top_values[:, 1:] > top_values[:, :-1], axis=1)
              & (top_values[:, -1] < next_value))
  if not provable.all():
    unproven = np.flatnonzero(~provable)
    top[unproven] = np.argsort(rows[unproven], axis=1)[:, :width]
  return top


def _reciprocal(neighbours: np.ndarray) -> np.ndarray:
  """mask[i, t]: is i among the neighbours of its t-th neighbour (k-reciprocal)?"""
  num_items = neighbours.shape[0]
  mask = np.empty(neighbours.shape, bool)
  for start in range(0, num_items, _RECIPROCAL_BLOCK):
    items = np.arange(start, min(start + _RECIPROCAL_BLOCK, num_items))
    mask[items] = (neighbours[neighbours[items]] == items[:, None, None]).any(axis=2)
  return mask


def _rowwise_sum(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """Sums of consecutive runs of `values`, each equal to np.sum of its run in float32.

  Runs of one length are stacked and summed along rows: numpy then uses the same pairwise
  summation as for a 1-D np.sum, so the sums match the reference's per-row np.sum bit for bit.
  """
  sums = np.zeros(lengths.size, values.dtype)
  starts = run_starts(lengths)
  for length in np.unique(lengths[lengths > 0]):
    rows = np.flatnonzero(lengths == length)
    positions = starts[rows][:, None] + np.arange(length)
    sums[rows] = values[positions].sum(axis=1)
  return sums


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
               *, max_bytes: int = 8 * GiB) -> np.ndarray:
  """k-reciprocal re-ranking (Zhong et al., CVPR 2017), equal to torchreid's `re_ranking`.

  Steps, as the reference: the (Q+G)^2 matrix of the given distances is squared (so a squared
  euclidean input ends up to the 4th power, as in torchreid), normalised by each column's
  maximum and transposed; each item's k1-reciprocal neighbours (mutual top k1+1), expanded by
  the round(k1/2)-reciprocal sets of those neighbours that share more than 2/3 of their members
  with it, get weights exp(-d) normalised to sum 1; with k2 > 1 each row is replaced by the mean
  of its k2 nearest rows (query expansion); the Jaccard distance 1 - sum(min)/sum(max) of these
  vectors is mixed with the normalised distance: (1 - lambda) * jaccard + lambda * original.

  Here the neighbour sets and weights are sparse and computed for all items at once instead of
  per item in python; sums run in the reference's order, so the results are equal bit for bit
  (tests measure max |difference| 0 on random inputs). Only the (Q+G)^2 float32 matrix is dense.

  Args:
    q_g_dist: (Q, G) query-gallery distances; q_q_dist: (Q, Q); g_g_dist: (G, G).
    k1, k2, lambda_value: the paper's parameters (20, 6, 0.3).
    max_bytes: refuse inputs whose (Q+G)^2 float32 matrix would need more memory than this.

  Returns:
    (Q, G) float32 re-ranked distances.

  Raises:
    ValueError: for mismatched shapes, bad k1/k2, or when the dense matrix exceeds max_bytes.
  """
  q_g, q_q, g_g = _rerank_inputs(q_g_dist, q_q_dist, g_g_dist, k1, k2, max_bytes)
  lambda_value = float(lambda_value)  # a python float keeps the arithmetic in float32
  original = _normalized_distance(q_g, q_q, g_g)
  num_items = original.shape[0]
  nearest = _nearest(original, min(max(k1 + 1, k2), num_items))
  keys = _k_reciprocal_sets(nearest, k1)
  encoding = _neighbour_weights(keys, original[keys // num_items, keys % num_items], num_items)
  if k2 != 1:
    encoding = _query_expansion(encoding, nearest[:, :min(k2, num_items)])
  num_query = q_g.shape[0]
  final = np.empty((num_query, num_items - num_query), np.float32)
  for start, stop, block in reranked_blocks(encoding, num_query, num_items, lambda_value,
                                            lambda s, e: original[s:e, num_query:]):
    final[start:stop] = block
  return final


def _rerank_inputs(q_g_dist, q_q_dist, g_g_dist, k1, k2, max_bytes):
  """(q_g, q_q, g_g) as arrays, checked before anything large is allocated."""
  q_g, q_q, g_g = np.asarray(q_g_dist), np.asarray(q_q_dist), np.asarray(g_g_dist)
  query_gallery_matrix('q_g_dist', q_g)
  num_query, num_gallery = q_g.shape
  num_items = num_query + num_gallery
  need = 4 * num_items * num_items
  if need > max_bytes:
    raise ValueError(f're_ranking needs the (Q+G)^2 = {num_items}x{num_items} float32 distance '
                     f'matrix, {need / GiB:.1f} GiB, over max_bytes={max_bytes / GiB:.1f} GiB: '
                     'raise max_bytes if the memory is there, or evaluate without re-ranking')
  if q_q.shape != (num_query, num_query) or g_g.shape != (num_gallery, num_gallery):
    raise ValueError(f'with q_g_dist of shape {q_g.shape}, q_q_dist must be '
                     f'{(num_query, num_query)} and g_g_dist {(num_gallery, num_gallery)}; got '
                     f'{q_q.shape} and {g_g.shape}')
  int_at_least('k1', k1, 0)
  int_at_least('k2', k2, 1)
  return q_g, q_q, g_g


def _normalized_distance(q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray) -> np.ndarray:
  """The reference's `original_dist`: [[QQ, QG], [GQ, GG]] squared, over column maxima, transposed.

  Each block is squared in the inputs' common dtype and then cast to float32, as the reference
  does with the whole matrix; in slices, so that no wider copy of the whole matrix exists.
  """
  num_query = q_q.shape[0]
  num_items = num_query + g_g.shape[0]
  dtype = np.result_type(q_q, q_g, g_g)
  dist = np.empty((num_items, num_items), np.float32)
  blocks = ((q_q, 0, 0), (q_g, 0, num_query), (q_g.T, num_query, 0), (g_g, num_query, num_query))
  for block, first_row, first_col in blocks:
    num_rows, num_cols = block.shape
    rows_per_slice = max(1, _SLICE_ELEMENTS // num_cols)
    for start in range(0, num_rows, rows_per_slice):
      stop = min(start + rows_per_slice, num_rows)
      dist[first_row + start:first_row + stop, first_col:first_col + num_cols] = np.square(
          block[start:stop].astype(dtype))
  dist /= dist.max(axis=0)
  return dist.T  # original[i, j] = dist[j, i] / max(column i)


def _nearest(original: np.ndarray, width: int) -> np.ndarray:
  """(n, width): each item's `width` nearest items, as np.argsort of its row of `original`."""
  num_items = original.shape[0]
  rows_per_slice = max(1, _SLICE_ELEMENTS // num_items)
  return np.concatenate([_top_ranks(np.ascontiguousarray(original[s:s + rows_per_slice]), width)
                         for s in range(0, num_items, rows_per_slice)])


def _k_reciprocal_sets(nearest: np.ndarray, k1: int) -> np.ndarray:
  """Each item's expanded k1-reciprocal set, as sorted unique keys item * n + member.

  R(i, k1) holds the items j among i's k1+1 nearest that have i among their k1+1 nearest. A
  member c of R(i, k1) adds its whole R(c, round(k1/2)) (numpy rounds half to even) when more
  than 2/3 of that set lies in R(i, k1).
  """
  num_items = nearest.shape[0]
  half = int(np.around(k1 / 2.))
  k1_nearest = nearest[:, :k1 + 1]
  is_mutual = _reciprocal(k1_nearest)
  mutual = np.where(is_mutual, k1_nearest, -1)  # R(i, k1), padded with -1
  half_nearest = nearest[:, :half + 1]
  is_half_mutual = _reciprocal(half_nearest)
  half_sets = np.where(is_half_mutual, half_nearest, -2)  # other pads than `mutual`: never equal
  half_set_size = is_half_mutual.sum(axis=1)
  items, members = [np.nonzero(is_mutual)[0]], [mutual[is_mutual]]
  for start in range(0, num_items, _EXPANSION_BLOCK):
    block = np.arange(start, min(start + _EXPANSION_BLOCK, num_items))
    candidates = half_sets[k1_nearest[block]]  # (B, k1+1, half+1): R(c, k1/2) of each neighbour
    shared = (candidates[..., None] == mutual[block][:, None, None, :]).any(axis=3).sum(axis=2)
    accepted = is_mutual[block] & (shared > 2. / 3 * half_set_size[k1_nearest[block]])
    item, neighbour, member = np.nonzero(accepted[..., None] & (candidates >= 0))
    items.append(block[item])
    members.append(candidates[item, neighbour, member])
  return np.unique(np.concatenate(items).astype(np.int64) * num_items + np.concatenate(members))


def _neighbour_weights(keys: np.ndarray, distances: np.ndarray, num_items: int) -> _Sparse:
  """V, the paper's k-reciprocal encoding of each item's expanded set (sorted unique keys).

  V[i, j] = exp(-original[i, j]) for j in i's set, normalised to sum 1 per row; `distances`
  holds original[i, j] of each key.
  """
  row, col = keys // num_items, keys % num_items
  weight = np.exp(-distances)
  lengths = np.bincount(row, minlength=num_items)
  return _Sparse(row, col, 1. * weight / np.repeat(_rowwise_sum(weight, lengths), lengths))


def _query_expansion(encoding: _Sparse, nearest_rows: np.ndarray) -> _Sparse:
  """V_qe[i] = mean of V's rows nearest_rows[i] (the k2 nearest items); zeros are dropped.

  Each entry sums its terms t = 0, 1, ..., k2-1 in that order, in float32, as the reference's
  np.mean(V[nearest_rows[i]], axis=0). Blocks of rows bound the temporaries.
  """
  num_items = nearest_rows.shape[0]
  row_length = np.bincount(encoding.row, minlength=num_items)
  row_start = run_starts(row_length)
  parts = [_expanded_rows(encoding, nearest_rows, row_length, row_start, start,
                          min(start + _EXPANSION_ROWS, num_items))
           for start in range(0, num_items, _EXPANSION_ROWS)]
  return _Sparse(*(np.concatenate([part[i] for part in parts]) for i in range(3)))


def _expanded_rows(encoding: _Sparse, nearest_rows: np.ndarray, row_length: np.ndarray,
                   row_start: np.ndarray, start: int, stop: int) -> _Sparse:
  """`_query_expansion`'s rows start..stop-1."""
  num_items, k2 = nearest_rows.shape
  block = nearest_rows[start:stop]
  terms = row_length[block].ravel()  # entries that row block[i, t] brings to V_qe[start + i]
  target_row = np.repeat(np.repeat(np.arange(start, stop), k2), terms)
  term_index = np.repeat(np.tile(np.arange(k2), stop - start), terms)
  entry = run_positions(row_start[block].ravel(), terms)
  keys, slot = np.unique(target_row * num_items + encoding.col[entry], return_inverse=True)
  del target_row
  sums = np.zeros(keys.size, np.float32)
  for t in range(k2):
    chosen = term_index == t  # one term per key, so the buffered += is exact
    sums[slot[chosen]] += encoding.value[entry[chosen]]
  # np.mean divides the float32 sum by an np.intp count (in float64, cast back): same here.
  mean = np.true_divide(sums, np.intp(k2), out=sums, casting='unsafe')
  keep = mean != 0
  return _Sparse(keys[keep] // num_items, keys[keep] % num_items, mean[keep])


def _gallery_columns(encoding: _Sparse, num_query: int, num_items: int) -> _Columns:
  """V's gallery rows (row - Q), grouped by column, in row order within a column."""
  in_gallery = encoding.row >= num_query
  col = encoding.col[in_gallery]
  by_column = np.argsort(col, kind='stable')
  length = np.bincount(col, minlength=num_items)
  return _Columns(run_starts(length), length, (encoding.row[in_gallery] - num_query)[by_column],
                  encoding.value[in_gallery][by_column])


def _query_blocks(encoding: _Sparse, column_length: np.ndarray, num_query: int,
                  num_gallery: int):
  """Yields (start, stop, V's entries of those queries) for blocks of consecutive queries.

  A block has at most ~_JACCARD_TERMS (query, column, gallery item) terms and _SLICE_ELEMENTS
  outputs, and at least one query. V's query rows come first (sorted by row, then column).
  """
  num_entries = np.searchsorted(encoding.row, num_query)
  rows = encoding.row[:num_entries]
  row_start = np.searchsorted(rows, np.arange(num_query + 1))
  terms_to = np.cumsum(np.bincount(rows, weights=column_length[encoding.col[:num_entries]],
                                   minlength=num_query))  # terms of queries 0..i
  start = 0
  while start < num_query:
    done = terms_to[start - 1] if start else 0.
    stop = max(start + 1, int(np.searchsorted(terms_to, done + _JACCARD_TERMS, side='right')))
    stop = min(stop, start + max(1, _SLICE_ELEMENTS // num_gallery), num_query)
    yield start, stop, slice(row_start[start], row_start[stop])
    start = stop


def _min_sums(block: _Sparse, columns: _Columns, num_rows: int, num_gallery: int) -> np.ndarray:
  """(num_rows, G): sum over j of min(V[i, j], V[Q + g, j]), `block` holding rows i from 0.

  The (i, j, g) terms come in order i, j ascending: np.add.at accumulates each (i, g) over j in
  ascending order, in float32, as the reference's loop over indNonZero.
  """
  terms = columns.length[block.col]  # gallery items sharing column j, per entry (i, j)
  positions = run_positions(columns.start[block.col], terms)
  sums = np.zeros(num_rows * num_gallery, np.float32)
  np.add.at(sums, np.repeat(block.row, terms) * num_gallery + columns.row[positions],
            np.minimum(np.repeat(block.value, terms), columns.value[positions]))
  return sums.reshape(num_rows, num_gallery)


def reranked_blocks(encoding: _Sparse, num_query: int, num_items: int, lambda_value: float,
                    original_rows):
  """Yields (start, stop, (stop - start, G) float32 re-ranked distances) for blocks of queries:
  (1 - lambda) * Jaccard distance of V's query and gallery rows + lambda * original, where
  `original_rows(start, stop)` gives those queries' (normalised) distances to the gallery.

  With rows of V summing to 1, Jaccard = 1 - sum(min) / sum(max) = 1 - m / (2 - m), m = sum(min).
  """
  num_gallery = num_items - num_query
  columns = _gallery_columns(encoding, num_query, num_items)
  for start, stop, entries in _query_blocks(encoding, columns.length, num_query, num_gallery):
    block = _Sparse(encoding.row[entries] - start, encoding.col[entries], encoding.value[entries])
    min_sum = _min_sums(block, columns, stop - start, num_gallery)
    jaccard = 1 - min_sum / (2. - min_sum)
    yield start, stop, jaccard * (1 - lambda_value) + original_rows(start, stop) * lambda_value
