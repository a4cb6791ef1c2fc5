"""Re-ID retrieval metrics (CMC, mAP, mINP), in plain numpy.

The protocol is the Market-1501 one of torchreid's `evaluate_rank` (non-cuhk03 path), with
mINP as fast-reid computes it (the AGW paper's inverse negative penalty); k-reciprocal
re-ranking (torchreid's `re_ranking`, Zhong et al., CVPR 2017) is in rerank.py (from distance
matrices) and rerank_knn.py (from features, without the (Q+G)^2 matrix). All are vectorised and
checked against the libraries themselves (tests/test_reid_metrics.py, tests/test_reid_rerank.py,
docs/REID.md).

Distances follow torchreid's `compute_distance_matrix`: 'euclidean' is the SQUARED euclidean
distance, 'cosine' is 1 - cosine similarity; smaller means more similar.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from dca_jax.reid.arrays import int_at_least, query_gallery_matrix, run_starts
from dca_jax.reid.distances import METRICS, distance_matrix, feature_pair, gallery_distance
from dca_jax.reid.rerank import re_ranking
from dca_jax.reid.rerank_knn import re_ranking_features, reranked_blocks

__all__ = ['METRICS', 'RESULT_KEYS', 'distance_matrix', 'evaluate_features', 'evaluate_rank',
           'evaluate_reranked', 'rank_stats', 'ranked_gallery', 're_ranking', 're_ranking_features',
           'retrieval', 'summarize']
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


def _queries_per_block(block_size, num_gallery: int) -> int:
  if block_size is None:
    return max(1, _BLOCK_ELEMENTS // max(1, num_gallery))
  return int_at_least('block_size', block_size)


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
  first_index = run_starts(num_hits)  # where each query's hits start
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
  max_rank = int_at_least('max_rank', max_rank)
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
  distmat = query_gallery_matrix('distmat', distmat)
  max_rank = int_at_least('max_rank', max_rank)
  num_query, num_gallery = distmat.shape
  q_pids, g_pids, q_camids, g_camids = _all_ids(distmat.shape, q_pids, g_pids, q_camids, g_camids)
  block = _queries_per_block(block_size, num_gallery)
  stats = [rank_stats(distmat[i:i + block], q_pids[i:i + block], g_pids, q_camids[i:i + block],
                      g_camids) for i in range(0, num_query, block)]
  result = summarize(stats, num_gallery, max_rank)
  return result['cmc'], result['mAP'], result['mINP']


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
  qf, gf = feature_pair(qf, gf)
  num_query, num_gallery = qf.shape[0], gf.shape[0]
  if num_query == 0 or num_gallery == 0:
    raise ValueError(f'need at least one query and one gallery item, got {num_query} and '
                     f'{num_gallery}')
  max_rank = int_at_least('max_rank', max_rank)
  q_pids, g_pids, q_camids, g_camids = _all_ids((num_query, num_gallery), q_pids, g_pids,
                                                q_camids, g_camids)
  if distance_fn is None:
    gallery_fn = gallery_distance(gf, metric)
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


def evaluate_reranked(qf, gf, q_pids, g_pids, q_camids, g_camids, *, k1: int = 20, k2: int = 6,
                      lambda_value: float = 0.3, metric: str = 'euclidean',
                      max_rank: int = 50) -> dict:
  """`evaluate_features` on k-reciprocal re-ranked distances (`rerank_knn.reranked_blocks`:
  memory O((Q+G) k1) plus one block of queries; the (Q, G) matrix is never formed).

  Returns:
    the dict of `evaluate_features`.
  """
  qf, gf = feature_pair(qf, gf)
  max_rank = int_at_least('max_rank', max_rank)
  q_pids, g_pids, q_camids, g_camids = _all_ids((len(qf), len(gf)), q_pids, g_pids, q_camids,
                                                g_camids)
  per_block = _queries_per_block(None, len(gf))  # the ranking's temporaries, as unranked
  stats = []
  for start, stop, dist in reranked_blocks(qf, gf, k1, k2, lambda_value, metric=metric):
    for first in range(start, stop, per_block):
      last = min(first + per_block, stop)
      stats.append(rank_stats(dist[first - start:last - start], q_pids[first:last], g_pids,
                              q_camids[first:last], g_camids))
  return summarize(stats, len(gf), max_rank)


RESULT_KEYS = ('mAP', 'rank1', 'rank5', 'rank10', 'mINP', 'num_query', 'num_gallery',
               'num_skipped')


def retrieval(qf, gf, q_pids, g_pids, q_camids, g_camids, *, rerank: bool = False) -> dict:
  """mAP, rank-1/5/10, mINP and the counts (RESULT_KEYS) of query vs gallery features: squared
  Euclidean distances computed in blocks, or k-reciprocal re-ranked (k1 20, k2 6, λ 0.3)."""
  if rerank:
    stats = evaluate_reranked(qf, gf, q_pids, g_pids, q_camids, g_camids)
  else:
    stats = evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids)
  return {k: stats[k] for k in RESULT_KEYS}


def ranked_gallery(dist, q_pids, g_pids, q_camids, g_camids, top: int):
  """(order, matches): per query the `top` nearest gallery positions with the protocol's junk
  (same identity AND camera) left out, and whether each shows the query's identity: the
  ranking `rank_stats` scores, for drawing it."""
  dist = query_gallery_matrix('dist', dist)
  q_pids, g_pids, q_camids, g_camids = _all_ids(dist.shape, q_pids, g_pids, q_camids, g_camids)
  junk = (q_pids[:, None] == g_pids[None]) & (q_camids[:, None] == g_camids[None])
  order = np.argsort(np.where(junk, np.inf, dist), axis=1, kind='stable')[:, :top]
  return order, g_pids[order] == q_pids[:, None]
