"""Re-ID retrieval metrics (CMC, mAP, mINP) and k-reciprocal re-ranking, in plain numpy.

The protocol is the Market-1501 one of torchreid's `evaluate_rank` (non-cuhk03 path), with
mINP as fast-reid computes it (the AGW paper's inverse negative penalty); re-ranking is
torchreid's `re_ranking` (Zhong et al., CVPR 2017). Both are vectorised here and checked
against the libraries themselves (tests/test_reid_metrics.py, docs/REID.md).

Distances follow torchreid's `compute_distance_matrix`: 'euclidean' is the SQUARED euclidean
distance, 'cosine' is 1 - cosine similarity; smaller means more similar.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

GiB = 1 << 30
METRICS = ('euclidean', 'cosine')
# Elements of a (queries x gallery) block ranked at once: ~40 bytes of temporaries each.
_BLOCK_ELEMENTS = 1 << 23


def _ids(name: str, values, length: int, what: str) -> np.ndarray:
  values = np.asarray(values)
  if values.ndim != 1 or values.shape[0] != length:
    raise ValueError(f'{name} must be a 1-D array of length {length} ({what}), got shape '
                     f'{values.shape}')
  return values


def _all_ids(shape: tuple[int, int], q_pids, g_pids, q_camids, g_camids):
  """The four id arrays, checked against the (queries, gallery) `shape`."""
  num_query, num_gallery = shape
  return (_ids('q_pids', q_pids, num_query, 'queries'),
          _ids('g_pids', g_pids, num_gallery, 'gallery'),
          _ids('q_camids', q_camids, num_query, 'queries'),
          _ids('g_camids', g_camids, num_gallery, 'gallery'))


def _int_at_least(name: str, value, low: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    wanted = 'a positive integer' if low == 1 else f'an integer >= {low}'
    raise ValueError(f'{name} must be {wanted}, got {value!r}')
  return int(value)


def _queries_per_block(block_size, num_gallery: int) -> int:
  if block_size is None:
    return max(1, _BLOCK_ELEMENTS // max(1, num_gallery))
  return _int_at_least('block_size', block_size)


def _query_gallery_matrix(name: str, values) -> np.ndarray:
  values = np.asarray(values)
  if values.ndim != 2 or 0 in values.shape:
    raise ValueError(f'{name} must be a non-empty 2-D (queries, gallery) array, got shape '
                     f'{values.shape}')
  return values


def _run_starts(lengths: np.ndarray) -> np.ndarray:
  """Where each of consecutive runs of these lengths starts."""
  return np.cumsum(lengths) - lengths


def _run_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """starts[0] + (0, 1, ..., lengths[0] - 1), starts[1] + (0, ...), ... concatenated."""
  within = np.arange(lengths.sum()) - np.repeat(_run_starts(lengths), lengths)
  return np.repeat(starts, lengths) + within


def _hit_ranks(dist: np.ndarray, q_pids, g_pids, q_camids, g_camids):
  """(query, rank) of every true match, in query then rank order.

  rank: 1-based, among the gallery items kept once the query's junk is removed.
  """
  order = np.argsort(dist, axis=1)
  match = g_pids[order] == q_pids[:, None]
  junk = match & (g_camids[order] == q_camids[:, None])
  hit = match ^ junk
  del order, match
  # Hits and junk are sparse: work on their (query, position) lists, both in row-major order,
  # keyed query * G + position so that one searchsorted counts the junk before each hit.
  hit_query, hit_position = np.nonzero(hit)
  junk_query, junk_position = np.nonzero(junk)
  del hit, junk
  num_gallery = dist.shape[1]
  junk_key = junk_query.astype(np.int64) * num_gallery + junk_position
  hit_key = hit_query.astype(np.int64) * num_gallery + hit_position
  row_key = hit_query.astype(np.int64) * num_gallery
  junk_before = np.searchsorted(junk_key, hit_key) - np.searchsorted(junk_key, row_key)
  return hit_query, hit_position + 1 - junk_before


def rank_stats(dist: np.ndarray, q_pids, g_pids, q_camids, g_camids) -> dict:
  """Per-query retrieval statistics for a block of queries against the whole gallery.

  For each query the gallery is sorted by `dist` (numpy's default argsort, as the reference:
  tied distances come out in the same order), gallery items with the query's pid AND camid
  (junk) are removed, and the remaining true matches (hits) give
  - AP = mean over hits of precision at the hit = mean_k k / rank_k (rank among kept items),
  - INP = num_hits / rank of the last hit (the AGW paper's inverse negative penalty),
  - first_hit = rank of the first hit (1-based, among kept items): CMC@k counts first_hit <= k.
  A query without any hit is invalid (valid False, ap = inp = 0, first_hit = 0).

  Args:
    dist: (B, G) distances of B queries to the G gallery items.
    q_pids, q_camids: (B,) identities and cameras of the queries.
    g_pids, g_camids: (G,) identities and cameras of the gallery.

  Returns:
    dict of (B,) arrays: 'ap' and 'inp' float64, 'valid' bool, 'first_hit' int64.
  """
  dist = np.asarray(dist)
  if dist.ndim != 2:
    raise ValueError(f'dist must be a 2-D (queries, gallery) array, got shape {dist.shape}')
  num_query = dist.shape[0]
  q_pids, g_pids, q_camids, g_camids = _all_ids(dist.shape, q_pids, g_pids, q_camids, g_camids)
  if np.issubdtype(dist.dtype, np.floating) and np.isnan(dist).any():
    raise ValueError('dist contains NaN: the ranking would be meaningless')

  hit_query, rank = _hit_ranks(dist, q_pids, g_pids, q_camids, g_camids)
  num_hits = np.bincount(hit_query, minlength=num_query)
  valid = num_hits > 0
  first_index = _run_starts(num_hits)  # where each query's hits start
  hit_number = np.arange(hit_query.size) - first_index[hit_query] + 1  # 1, 2, ... per query
  precision = hit_number / rank  # float64, as the reference
  ap = np.zeros(num_query)
  inp = np.zeros(num_query)
  first_hit = np.zeros(num_query, np.int64)
  precision_sum = np.bincount(hit_query, weights=precision, minlength=num_query)
  ap[valid] = precision_sum[valid] / num_hits[valid]
  last_index = first_index[valid] + num_hits[valid] - 1
  inp[valid] = num_hits[valid] / rank[last_index]
  first_hit[valid] = rank[first_index[valid]]
  return dict(ap=ap, inp=inp, valid=valid, first_hit=first_hit)


def summarize(stats: Sequence[dict] | dict, num_gallery: int, max_rank: int = 50) -> dict:
  """Combines `rank_stats` of all query blocks into CMC, mAP and mINP.

  The CMC has length min(max_rank, num_gallery) (torchreid shortens it the same way for a
  small gallery); its value at rank k is the fraction of valid queries with first_hit <= k, in
  float32 as torchreid. A valid query that has fewer kept gallery items than the CMC length
  counts as matched up to the end (torchreid's python path fails on such ragged rows).

  Returns:
    dict: cmc (float32), mAP, mINP, rank1, rank5, rank10 (floats), num_query, num_gallery,
    num_valid, num_skipped (queries without a true match, left out of the means).

  Raises:
    ValueError: when no query has a true match in the gallery.
  """
  max_rank = _int_at_least('max_rank', max_rank)
  if isinstance(stats, dict):
    stats = [stats]
  ap, inp, valid, first_hit = (np.concatenate([s[key] for s in stats])
                               for key in ('ap', 'inp', 'valid', 'first_hit'))
  num_valid = int(valid.sum())
  if num_valid == 0:
    raise ValueError(f'no valid query: none of the {valid.size} queries has a true match in the '
                     'gallery once same-id same-camera images are removed')
  length = min(max_rank, int(num_gallery))
  counts = np.cumsum(np.bincount(first_hit[valid], minlength=length + 1)[1:length + 1])

  def rank_k(k):
    return float(np.float32(np.count_nonzero(first_hit[valid] <= k)) / np.float32(num_valid))

  return dict(cmc=counts.astype(np.float32) / np.float32(num_valid),
              mAP=float(np.mean(ap[valid])), mINP=float(np.mean(inp[valid])),
              rank1=rank_k(1), rank5=rank_k(5), rank10=rank_k(10),
              num_query=int(valid.size), num_gallery=int(num_gallery), num_valid=num_valid,
              num_skipped=int(valid.size - num_valid))


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50,
                  block_size: int | None = None):
  """CMC, mAP and mINP of a (queries, gallery) distance matrix, Market-1501 protocol.

  Same inputs and results as torchreid's `evaluate_rank(..., use_metric_cuhk03=False)`, plus
  mINP (fast-reid's). See `rank_stats` for the per-query definitions and `summarize` for the
  averaging.

  Args:
    distmat: (Q, G) distances, smaller = more similar.
    q_pids, q_camids: (Q,) query identities and cameras.
    g_pids, g_camids: (G,) gallery identities and cameras.
    max_rank: length of the CMC curve (shortened to G for a smaller gallery).
    block_size: queries ranked at once (memory only; the results do not depend on it).

  Returns:
    (cmc, mAP, mINP): float32 (min(max_rank, G),) array and two floats, over valid queries.

  Raises:
    ValueError: for mismatched shapes, NaN distances, or when no query has a true match.
  """
  distmat = _query_gallery_matrix('distmat', distmat)
  max_rank = _int_at_least('max_rank', max_rank)
  num_query, num_gallery = distmat.shape
  q_pids, g_pids, q_camids, g_camids = _all_ids(distmat.shape, q_pids, g_pids, q_camids, g_camids)
  block = _queries_per_block(block_size, num_gallery)
  stats = [rank_stats(distmat[i:i + block], q_pids[i:i + block], g_pids, q_camids[i:i + block],
                      g_camids) for i in range(0, num_query, block)]
  result = summarize(stats, num_gallery, max_rank)
  return result['cmc'], result['mAP'], result['mINP']


def _normalize(x: np.ndarray) -> np.ndarray:
  # torch.nn.functional.normalize: x / max(||x||, 1e-12).
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))


def _features(name: str, values) -> np.ndarray:
  values = np.asarray(values, np.float32)
  if values.ndim != 2:
    raise ValueError(f'{name} must be a 2-D (items, dims) array, got shape {values.shape}')
  return values


def _feature_pair(qf, gf) -> tuple[np.ndarray, np.ndarray]:
  qf, gf = _features('qf', qf), _features('gf', gf)
  if qf.shape[1] != gf.shape[1]:
    raise ValueError(f'qf and gf must have the same feature size, got {qf.shape} and {gf.shape}')
  return qf, gf


def _gallery_distance(gf: np.ndarray, metric: str) -> Callable[[np.ndarray], np.ndarray]:
  """q_block -> (B, G) float32 distances, with the gallery's part computed once."""
  if metric == 'euclidean':
    g_squared_norm = np.einsum('ij,ij->i', gf, gf)
    return lambda q: ((np.einsum('ij,ij->i', q, q)[:, None] + g_squared_norm[None, :])
                      - 2 * (q @ gf.T))
  if metric == 'cosine':
    g_unit = _normalize(gf)
    return lambda q: 1 - _normalize(q) @ g_unit.T
  raise ValueError(f'unknown metric {metric!r}: choose one of {METRICS}')


def distance_matrix(qf, gf, metric: str = 'euclidean') -> np.ndarray:
  """torchreid's `compute_distance_matrix` in float32 numpy.

  'euclidean': the SQUARED euclidean distance ||q||^2 + ||g||^2 - 2 q.g (not clamped: it can be
  slightly negative from rounding, as in torchreid); 'cosine': 1 - cos(q, g) with torch's
  `F.normalize` (norms floored at 1e-12).
  """
  qf, gf = _feature_pair(qf, gf)
  return _gallery_distance(gf, metric)(qf)


def evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, *, metric: str = 'euclidean',
                      max_rank: int = 50, block_size: int | None = None,
                      distance_fn: Callable | None = None) -> dict:
  """Re-ID evaluation from features, one block of queries at a time.

  The (Q, G) distance matrix is never formed: each block of `block_size` queries gets its
  distances (float32, `distance_matrix`'s conventions, or `distance_fn(q_block, gf)`, e.g. on an
  accelerator), is ranked by `rank_stats` and dropped. The results equal `evaluate_rank` on the
  full matrix.

  Args:
    qf, gf: (Q, D) query and (G, D) gallery features.
    q_pids, g_pids, q_camids, g_camids: identities and cameras, as in `evaluate_rank`.
    metric: 'euclidean' (squared) or 'cosine' (1 - cosine similarity); unused with distance_fn.
    max_rank: length of the CMC curve.
    block_size: queries per block; default: ~8M distances per block.
    distance_fn: optional (q_block, gf) -> (B, G) distances replacing the built-in metric.

  Returns:
    dict with mAP, mINP, rank1, rank5, rank10 (floats), cmc (float32 array), num_query,
    num_gallery, num_valid and num_skipped (queries without a true match, left out of the means).

  Raises:
    ValueError: for bad shapes, an unknown metric, or when no query has a true match.
  """
  qf, gf = _feature_pair(qf, gf)
  num_query, num_gallery = qf.shape[0], gf.shape[0]
  if num_query == 0 or num_gallery == 0:
    raise ValueError(f'need at least one query and one gallery item, got {num_query} and '
                     f'{num_gallery}')
  max_rank = _int_at_least('max_rank', max_rank)
  q_pids, g_pids, q_camids, g_camids = _all_ids((num_query, num_gallery), q_pids, g_pids,
                                                q_camids, g_camids)
  if distance_fn is None:
    gallery_fn = _gallery_distance(gf, metric)
    distance_fn = lambda q, _: gallery_fn(q)  # noqa: E731
  block = _queries_per_block(block_size, num_gallery)
  stats = []
  for start in range(0, num_query, block):
    stop = min(start + block, num_query)
    dist = np.asarray(distance_fn(qf[start:stop], gf))
    if dist.shape != (stop - start, num_gallery):
      raise ValueError(f'distance_fn returned shape {dist.shape} for a block of '
                       f'{stop - start} queries and {num_gallery} gallery items')
    stats.append(rank_stats(dist, q_pids[start:stop], g_pids, q_camids[start:stop], g_camids))
  return summarize(stats, num_gallery, max_rank)


RESULT_KEYS = ('mAP', 'rank1', 'rank5', 'rank10', 'mINP', 'num_query', 'num_gallery',
               'num_skipped')


def retrieval(qf, gf, q_pids, g_pids, q_camids, g_camids, *, rerank: bool = False) -> dict:
  """mAP, rank-1/5/10, mINP and the counts (RESULT_KEYS) of query vs gallery features: squared
  Euclidean distances computed in blocks, or k-reciprocal re-ranked (k1 20, k2 6, λ 0.3)."""
  if rerank:
    q_g = re_ranking(distance_matrix(qf, gf), distance_matrix(qf, qf), distance_matrix(gf, gf))
    stats = summarize(rank_stats(q_g, q_pids, g_pids, q_camids, g_camids), len(gf))
  else:
    stats = evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids)
  return {k: stats[k] for k in RESULT_KEYS}


def ranked_gallery(dist, q_pids, g_pids, q_camids, g_camids, top: int):
  """(order, matches): per query the `top` nearest gallery positions with the protocol's junk
  (same identity AND camera) left out, and whether each shows the query's identity: the
  ranking `rank_stats` scores, for drawing it."""
  dist = _query_gallery_matrix('dist', dist)
  q_pids, g_pids, q_camids, g_camids = _all_ids(dist.shape, q_pids, g_pids, q_camids, g_camids)
  junk = (q_pids[:, None] == g_pids[None]) & (q_camids[:, None] == g_camids[None])
  order = np.argsort(np.where(junk, np.inf, dist), axis=1, kind='stable')[:, :top]
  return order, g_pids[order] == q_pids[:, None]


# Re-ranking works on slices of the dense (Q+G)^2 matrix and on blocks of items, to bound the
# temporaries; no result depends on these sizes.
_SLICE_ELEMENTS = 1 << 24  # elements of the dense matrix (or of the output) handled at once
_RECIPROCAL_BLOCK = 4096  # items whose neighbour lists are cross-checked at once
_EXPANSION_BLOCK = 2048  # items whose neighbours' half-size sets are compared at once
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
  starts = _run_starts(lengths)
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
  encoding = _neighbour_weights(original, _k_reciprocal_sets(nearest, k1))
  if k2 != 1:
    encoding = _query_expansion(encoding, nearest[:, :min(k2, num_items)])
  return _mix_with_jaccard(encoding, original, q_g.shape[0], lambda_value)


def _rerank_inputs(q_g_dist, q_q_dist, g_g_dist, k1, k2, max_bytes):
  """(q_g, q_q, g_g) as arrays, checked before anything large is allocated."""
  q_g, q_q, g_g = np.asarray(q_g_dist), np.asarray(q_q_dist), np.asarray(g_g_dist)
  _query_gallery_matrix('q_g_dist', q_g)
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
  _int_at_least('k1', k1, 0)
  _int_at_least('k2', k2, 1)
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


def _neighbour_weights(original: np.ndarray, keys: np.ndarray) -> _Sparse:
  """V, the paper's k-reciprocal encoding of each item's expanded set (sorted unique keys).

  V[i, j] = exp(-original[i, j]) for j in i's set, normalised to sum 1 per row.
  """
  num_items = original.shape[0]
  row, col = keys // num_items, keys % num_items
  weight = np.exp(-original[row, col])
  lengths = np.bincount(row, minlength=num_items)
  return _Sparse(row, col, 1. * weight / np.repeat(_rowwise_sum(weight, lengths), lengths))


def _query_expansion(encoding: _Sparse, nearest_rows: np.ndarray) -> _Sparse:
  """V_qe[i] = mean of V's rows nearest_rows[i] (the k2 nearest items); zeros are dropped.

  Each entry sums its terms t = 0, 1, ..., k2-1 in that order, in float32, as the reference's
  np.mean(V[nearest_rows[i]], axis=0).
  """
  num_items, k2 = nearest_rows.shape
  row_length = np.bincount(encoding.row, minlength=num_items)
  terms = row_length[nearest_rows].ravel()  # entries that row nearest_rows[i, t] brings to V_qe[i]
  target_row = np.repeat(np.repeat(np.arange(num_items), k2), terms)
  term_index = np.repeat(np.tile(np.arange(k2), num_items), terms)
  entry = _run_positions(_run_starts(row_length)[nearest_rows].ravel(), terms)
  keys, slot = np.unique(target_row * num_items + encoding.col[entry], return_inverse=True)
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
  return _Columns(_run_starts(length), length, (encoding.row[in_gallery] - num_query)[by_column],
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
  positions = _run_positions(columns.start[block.col], terms)
  sums = np.zeros(num_rows * num_gallery, np.float32)
  np.add.at(sums, np.repeat(block.row, terms) * num_gallery + columns.row[positions],
            np.minimum(np.repeat(block.value, terms), columns.value[positions]))
  return sums.reshape(num_rows, num_gallery)


def _mix_with_jaccard(encoding: _Sparse, original: np.ndarray, num_query: int,
                      lambda_value: float) -> np.ndarray:
  """(Q, G): (1 - lambda) * Jaccard distance of V's query and gallery rows + lambda * original.

  With rows of V summing to 1, Jaccard = 1 - sum(min) / sum(max) = 1 - m / (2 - m), m = sum(min).
  """
  num_items = original.shape[0]
  num_gallery = num_items - num_query
  columns = _gallery_columns(encoding, num_query, num_items)
  final = np.empty((num_query, num_gallery), np.float32)
  for start, stop, entries in _query_blocks(encoding, columns.length, num_query, num_gallery):
    block = _Sparse(encoding.row[entries] - start, encoding.col[entries], encoding.value[entries])
    min_sum = _min_sums(block, columns, stop - start, num_gallery)
    jaccard = 1 - min_sum / (2. - min_sum)
    final[start:stop] = (jaccard * (1 - lambda_value)
                         + original[start:stop, num_query:] * lambda_value)
  return final
