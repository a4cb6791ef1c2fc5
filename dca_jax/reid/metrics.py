"""Re-ID retrieval metrics (CMC, mAP, mINP) and k-reciprocal re-ranking, in plain numpy.

The protocol is the Market-1501 one of torchreid's `evaluate_rank` (non-cuhk03 path), with
mINP as fast-reid computes it (the AGW paper's inverse negative penalty); re-ranking is
torchreid's `re_ranking` (Zhong et al., CVPR 2017). Both are vectorised here and checked
against the libraries themselves (tests/test_reid_metrics.py, docs/REID.md).

Distances follow torchreid's `compute_distance_matrix`: 'euclidean' is the SQUARED euclidean
distance, 'cosine' is 1 - cosine similarity; smaller means more similar.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

GiB = 1 << 30
METRICS = ('euclidean', 'cosine')
# Elements of a (queries x gallery) block ranked at once: ~40 bytes of temporaries each.
_BLOCK_ELEMENTS = 1 << 23


def _ids(name: str, x, n: int, n_name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 1 or x.shape[0] != n:
    raise ValueError(f'{name} must be a 1-D array of length {n} ({n_name}), got shape {x.shape}')
  return x


def _all_ids(nq: int, ng: int, q_pids, g_pids, q_camids, g_camids):
  return (_ids('q_pids', q_pids, nq, 'queries'), _ids('g_pids', g_pids, ng, 'gallery'),
          _ids('q_camids', q_camids, nq, 'queries'), _ids('g_camids', g_camids, ng, 'gallery'))


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f'{name} must be a positive integer, got {value!r}')
  return int(value)


def _block(block_size, num_gallery: int) -> int:
  if block_size is None:
    return max(1, _BLOCK_ELEMENTS // max(1, num_gallery))
  return _positive_int('block_size', block_size)


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
  nq, ng = dist.shape
  q_pids, g_pids, q_camids, g_camids = _all_ids(nq, ng, q_pids, g_pids, q_camids, g_camids)
  if np.issubdtype(dist.dtype, np.floating) and np.isnan(dist).any():
    raise ValueError('dist contains NaN: the ranking would be meaningless')

  order = np.argsort(dist, axis=1)
  match = g_pids[order] == q_pids[:, None]
  junk = match & (g_camids[order] == q_camids[:, None])
  hit = match ^ junk
  del order, match
  # Hits and junk are sparse: work on their (row, column) lists, both in row-major order.
  h_row, h_col = np.nonzero(hit)
  j_row, j_col = np.nonzero(junk)
  del hit, junk
  j_key = j_row.astype(np.int64) * ng + j_col
  h_key = h_row.astype(np.int64) * ng + h_col
  junk_before = np.searchsorted(j_key, h_key) - np.searchsorted(j_key, h_row.astype(np.int64) * ng)
  rank = h_col + 1 - junk_before  # 1-based rank among the kept items
  num_hits = np.bincount(h_row, minlength=nq)
  valid = num_hits > 0
  start = np.cumsum(num_hits) - num_hits  # index of each row's first hit
  k = np.arange(h_row.size) - start[h_row] + 1  # 1, 2, ... within each row
  precision = k / rank  # float64, as the reference
  ap = np.zeros(nq)
  inp = np.zeros(nq)
  first_hit = np.zeros(nq, np.int64)
  ap[valid] = np.bincount(h_row, weights=precision, minlength=nq)[valid] / num_hits[valid]
  last = start[valid] + num_hits[valid] - 1
  inp[valid] = num_hits[valid] / rank[last]
  first_hit[valid] = rank[start[valid]]
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
  max_rank = _positive_int('max_rank', max_rank)
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
  distmat = np.asarray(distmat)
  if distmat.ndim != 2 or 0 in distmat.shape:
    raise ValueError(f'distmat must be a non-empty 2-D (queries, gallery) array, got shape '
                     f'{distmat.shape}')
  max_rank = _positive_int('max_rank', max_rank)
  nq, ng = distmat.shape
  q_pids, g_pids, q_camids, g_camids = _all_ids(nq, ng, q_pids, g_pids, q_camids, g_camids)
  block = _block(block_size, ng)
  stats = [rank_stats(distmat[i:i + block], q_pids[i:i + block], g_pids, q_camids[i:i + block],
                      g_camids) for i in range(0, nq, block)]
  result = summarize(stats, ng, max_rank)
  return result['cmc'], result['mAP'], result['mINP']


def _normalize(x: np.ndarray) -> np.ndarray:
  # torch.nn.functional.normalize: x / max(||x||, 1e-12).
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))


def _features(name: str, x) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim != 2:
    raise ValueError(f'{name} must be a 2-D (items, dims) array, got shape {x.shape}')
  return x


def _gallery_distance(gf: np.ndarray, metric: str) -> Callable[[np.ndarray], np.ndarray]:
  """q_block -> (B, G) float32 distances, with the gallery's part computed once."""
  if metric == 'euclidean':
    g_sq = np.einsum('ij,ij->i', gf, gf)
    return lambda q: (np.einsum('ij,ij->i', q, q)[:, None] + g_sq[None, :]) - 2 * (q @ gf.T)
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
  qf, gf = _features('qf', qf), _features('gf', gf)
  if qf.shape[1] != gf.shape[1]:
    raise ValueError(f'qf and gf must have the same feature size, got {qf.shape} and {gf.shape}')
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
  qf, gf = _features('qf', qf), _features('gf', gf)
  if qf.shape[1] != gf.shape[1]:
    raise ValueError(f'qf and gf must have the same feature size, got {qf.shape} and {gf.shape}')
  nq, ng = qf.shape[0], gf.shape[0]
  if nq == 0 or ng == 0:
    raise ValueError(f'need at least one query and one gallery item, got {nq} and {ng}')
  max_rank = _positive_int('max_rank', max_rank)
  q_pids, g_pids, q_camids, g_camids = _all_ids(nq, ng, q_pids, g_pids, q_camids, g_camids)
  if distance_fn is None:
    gallery_fn = _gallery_distance(gf, metric)
    distance_fn = lambda q, _: gallery_fn(q)  # noqa: E731
  block = _block(block_size, ng)
  stats = []
  for i in range(0, nq, block):
    dist = np.asarray(distance_fn(qf[i:i + block], gf))
    if dist.shape != (min(block, nq - i), ng):
      raise ValueError(f'distance_fn returned shape {dist.shape} for a block of '
                       f'{min(block, nq - i)} queries and {ng} gallery items')
    stats.append(rank_stats(dist, q_pids[i:i + block], g_pids, q_camids[i:i + block], g_camids))
  return summarize(stats, ng, max_rank)


def _top_ranks(rows: np.ndarray, width: int) -> np.ndarray:
  """np.argsort(rows, axis=1)[:, :width], without sorting whole rows where that is provably equal.

  A row's first `width` indices are unique when its `width` smallest values are distinct and
  all below the rest: then a partial sort gives exactly what any full sort gives. Other rows
  (ties or NaN near the cut) take the full np.argsort, i.e. the reference's tie order.
  """
  n = rows.shape[1]
  if width >= n:
    return np.argsort(rows, axis=1)[:, :width]
  part = np.argpartition(rows, width, axis=1)
  top = part[:, :width]
  top_vals = np.take_along_axis(rows, top, axis=1)
  inner = np.argsort(top_vals, axis=1, kind='stable')
  top = np.take_along_axis(top, inner, axis=1)
  top_vals = np.take_along_axis(top_vals, inner, axis=1)
  next_val = np.take_along_axis(rows, part[:, width:width + 1], axis=1)[:, 0]
  ok = (np.all(top_vals[:, 1:] > top_vals[:, :-1], axis=1) & (top_vals[:, -1] < next_val))
  if not ok.all():
    bad = np.flatnonzero(~ok)
    top[bad] = np.argsort(rows[bad], axis=1)[:, :width]
  return top


def _reciprocal(neighbours: np.ndarray, block: int = 4096) -> np.ndarray:
  """mask[i, t]: is i among the neighbours of its t-th neighbour (k-reciprocal)?"""
  n = neighbours.shape[0]
  mask = np.empty(neighbours.shape, bool)
  for s in range(0, n, block):
    idx = np.arange(s, min(s + block, n))
    mask[idx] = (neighbours[neighbours[idx]] == idx[:, None, None]).any(axis=2)
  return mask


def _rowwise_sum(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """Sums of consecutive runs of `values`, each equal to np.sum of its run in float32.

  Runs of one length are stacked and summed along rows: numpy then uses the same pairwise
  summation as for a 1-D np.sum, so the sums match the reference's per-row np.sum bit for bit.
  """
  sums = np.zeros(lengths.size, values.dtype)
  starts = np.cumsum(lengths) - lengths
  for length in np.unique(lengths[lengths > 0]):
    rows = np.flatnonzero(lengths == length)
    idx = starts[rows][:, None] + np.arange(length)
    sums[rows] = values[idx].sum(axis=1)
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
  q_g, q_q, g_g = np.asarray(q_g_dist), np.asarray(q_q_dist), np.asarray(g_g_dist)
  if q_g.ndim != 2 or 0 in q_g.shape:
    raise ValueError(f'q_g_dist must be a non-empty 2-D (queries, gallery) array, got shape '
                     f'{q_g.shape}')
  nq, ng = q_g.shape
  n = nq + ng
  need = 4 * n * n
  if need > max_bytes:
    raise ValueError(f're_ranking needs the (Q+G)^2 = {n}x{n} float32 distance matrix, '
                     f'{need / GiB:.1f} GiB, over max_bytes={max_bytes / GiB:.1f} GiB: raise '
                     'max_bytes if the memory is there, or evaluate without re-ranking')
  if q_q.shape != (nq, nq) or g_g.shape != (ng, ng):
    raise ValueError(f'with q_g_dist of shape {q_g.shape}, q_q_dist must be {(nq, nq)} and '
                     f'g_g_dist {(ng, ng)}; got {q_q.shape} and {g_g.shape}')
  for name, value, low in (('k1', k1, 0), ('k2', k2, 1)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f'{name} must be an integer >= {low}, got {value!r}')
  lambda_value = float(lambda_value)  # a python float keeps the arithmetic in float32
  # The reference squares the concatenated matrix (in the inputs' common dtype), then casts.
  dtype = np.result_type(q_q, q_g, g_g)
  dist = np.empty((n, n), np.float32)
  parts = ((q_q, 0, 0), (q_g, 0, nq), (q_g.T, nq, 0), (g_g, nq, nq))
  for part, r0, c0 in parts:
    step = max(1, (1 << 24) // part.shape[1])
    for s in range(0, part.shape[0], step):
      e = min(s + step, part.shape[0])
      dist[r0 + s:r0 + e, c0:c0 + part.shape[1]] = np.square(part[s:e].astype(dtype))
  dist /= dist.max(axis=0)
  orig = dist.T  # orig[i, j] = dist[j, i] / max(column i): the reference's `original_dist`

  half = int(np.around(k1 / 2.))
  width = min(max(k1 + 1, k2), n)
  step = max(1, (1 << 24) // n)
  ranks = np.concatenate([_top_ranks(np.ascontiguousarray(orig[s:s + step]), width)
                          for s in range(0, n, step)])
  near = ranks[:, :k1 + 1]
  recip_mask = _reciprocal(near)
  recip = np.where(recip_mask, near, -1)
  half_near = ranks[:, :half + 1]
  half_mask = _reciprocal(half_near)
  cand = np.where(half_mask, half_near, -2)  # pads differ from recip's so they never match
  cand_size = half_mask.sum(axis=1)

  # Expansion: candidate c of item i joins when |R(c, k1/2) & R(i, k1)| > 2/3 |R(c, k1/2)|.
  rows, cols = [], []
  for s in range(0, n, 2048):
    idx = np.arange(s, min(s + 2048, n))
    members = cand[near[idx]]                                           # (B, k1+1, half+1)
    common = (members[..., None] == recip[idx][:, None, None, :]).any(axis=3).sum(axis=2)
    accept = recip_mask[idx] & (common > 2. / 3 * cand_size[near[idx]])
    r, t, u = np.nonzero(accept[..., None] & (members >= 0))
    rows += [idx[np.nonzero(recip_mask[idx])[0]], idx[r]]
    cols += [recip[idx][recip_mask[idx]], members[r, t, u]]
  key = np.unique(np.concatenate(rows).astype(np.int64) * n + np.concatenate(cols))
  v_row, v_col = key // n, key % n
  weight = np.exp(-orig[v_row, v_col])
  lengths = np.bincount(v_row, minlength=n)
  v_val = 1. * weight / np.repeat(_rowwise_sum(weight, lengths), lengths)

  if k2 != 1:
    # V_qe[i] = mean of V's rows ranks[i, :k2], summed in that order as np.mean does.
    kk = min(k2, n)
    starts = np.cumsum(lengths) - lengths
    src = ranks[:, :kk]                                                 # (n, kk) rows to average
    cnt = lengths[src]
    tgt = np.repeat(np.repeat(np.arange(n), kk), cnt.ravel())
    t_of = np.repeat(np.tile(np.arange(kk), n), cnt.ravel())
    first = np.repeat(starts[src].ravel(), cnt.ravel())
    offset = np.arange(first.size) - np.repeat(np.cumsum(cnt.ravel()) - cnt.ravel(), cnt.ravel())
    entry = first + offset
    key, inverse = np.unique(tgt * n + v_col[entry], return_inverse=True)
    acc = np.zeros(key.size, np.float32)
    for t in range(kk):
      sel = t_of == t
      acc[inverse[sel]] += v_val[entry[sel]]
    # np.mean divides the float32 sum by an np.intp count (in float64, cast back): same here.
    v_val = np.true_divide(acc, np.intp(kk), out=acc, casting='unsafe')
    v_row, v_col = key // n, key % n
    keep = v_val != 0
    v_row, v_col, v_val = v_row[keep], v_col[keep], v_val[keep]

  # Gallery columns of V in column order (the Jaccard term only needs r >= Q).
  g_sel = v_row >= nq
  g_col, g_row, g_val = v_col[g_sel], v_row[g_sel] - nq, v_val[g_sel]
  col_order = np.argsort(g_col, kind='stable')
  g_row, g_val = g_row[col_order], g_val[col_order]
  col_len = np.bincount(g_col, minlength=n)
  col_start = np.cumsum(col_len) - col_len

  # V's query rows come first (sorted by row, then column); blocks of queries with at most
  # ~4M (query, column, gallery row) triples each.
  q_end = np.searchsorted(v_row, nq)
  row_start = np.searchsorted(v_row[:q_end], np.arange(nq + 1))
  triples = np.cumsum(np.bincount(v_row[:q_end], weights=col_len[v_col[:q_end]], minlength=nq))
  final = np.empty((nq, ng), np.float32)
  s = 0
  while s < nq:
    done = triples[s - 1] if s else 0.
    e = max(s + 1, int(np.searchsorted(triples, done + (1 << 22), side='right')))
    e = min(e, s + max(1, (1 << 24) // ng), nq)
    a, b = row_start[s], row_start[e]
    i_row, j_col, i_val = v_row[a:b] - s, v_col[a:b], v_val[a:b]
    cnt = col_len[j_col]
    pos = (np.repeat(col_start[j_col], cnt)
           + np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt))
    # (i, j, r) triples in the order i, j ascending: np.add.at accumulates each (i, r) over j
    # in ascending order, in float32, as the reference's loop over indNonZero.
    temp = np.zeros((e - s) * ng, np.float32)
    np.add.at(temp, np.repeat(i_row, cnt) * ng + g_row[pos],
              np.minimum(np.repeat(i_val, cnt), g_val[pos]))
    temp = temp.reshape(e - s, ng)
    jaccard = 1 - temp / (2. - temp)
    final[s:e] = jaccard * (1 - lambda_value) + orig[s:e, nq:] * lambda_value
    s = e
  return final
