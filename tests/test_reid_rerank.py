"""k-reciprocal re-ranking from features (rerank_knn): equal to the dense `re_ranking` and to
torchreid, independent of its block sizes, and without the (Q+G)^2 matrix."""

import os
import tracemalloc

import numpy as np
import pytest

from dca_jax.reid import metrics, rerank, rerank_knn

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'reid_metrics.npz')
IDS = ('q_pids', 'g_pids', 'q_camids', 'g_camids')
DIST_TOL, MAP_TOL = 1e-5, 1e-4


def clustered(seed, nq, ng, dim, noise, num_ids=None, cameras=6):
  """Features around one centre per identity (about 6 images each), ids and cameras."""
  rng = np.random.default_rng(seed)
  num_ids = num_ids or max(2, (nq + ng) // 6)
  centres = rng.normal(size=(num_ids, dim)).astype(np.float32)
  q_pids, g_pids = rng.integers(0, num_ids, nq), rng.integers(0, num_ids, ng)
  qf = (centres[q_pids] + noise * rng.normal(size=(nq, dim))).astype(np.float32)
  gf = (centres[g_pids] + noise * rng.normal(size=(ng, dim))).astype(np.float32)
  return qf, gf, (q_pids, g_pids, rng.integers(0, cameras, nq), rng.integers(0, cameras, ng))


def dense(qf, gf, *args, metric='euclidean'):
  d = lambda a, b: metrics.distance_matrix(a, b, metric)
  return metrics.re_ranking(d(qf, gf), d(qf, qf), d(gf, gf), *args)


def test_equals_the_dense_path_at_300_x_1500():
  qf, gf, ids = clustered(0, 300, 1500, 64, noise=1.4)
  expected, got = dense(qf, gf), rerank_knn.re_ranking_features(qf, gf)
  assert got.dtype == np.float32 and got.shape == (300, 1500)
  assert np.abs(got - expected).max() <= DIST_TOL
  m_ap = metrics.evaluate_rank(expected, *ids)[1]
  assert 0.3 < m_ap < 0.9  # neither trivial nor chance
  assert abs(metrics.evaluate_rank(got, *ids)[1] - m_ap) <= MAP_TOL
  assert np.abs(got - metrics.distance_matrix(qf, gf)).max() > 0.1  # not a no-op


@pytest.mark.parametrize('metric', ['euclidean', 'cosine'])
@pytest.mark.parametrize('k1, k2, lam', [(6, 3, 0.5), (5, 1, 0.0), (1, 2, 0.3), (20, 25, 1.0)])
def test_equals_the_dense_path_for_other_parameters(metric, k1, k2, lam):
  qf, gf, ids = clustered(1, 40, 160, 16, noise=1.0)
  expected = dense(qf, gf, k1, k2, lam, metric=metric)
  got = rerank_knn.re_ranking_features(qf, gf, k1, k2, lam, metric=metric)
  assert np.abs(got - expected).max() <= DIST_TOL
  assert abs(metrics.evaluate_rank(got, *ids)[1] - metrics.evaluate_rank(expected, *ids)[1]) \
      <= MAP_TOL


@pytest.mark.parametrize('metric', ['euclidean', 'cosine'])
def test_matches_torchreid_from_the_features(metric):
  with np.load(FIXTURE) as z:
    ref = {k: z[k] for k in z.files}
  p = f'rr_{metric}'
  ids = [ref[f'{p}_{k}'] for k in IDS]
  for k1, k2, lam in ref['rerank_params']:
    k1, k2 = int(k1), int(k2)
    got = rerank_knn.re_ranking_features(ref[f'{p}_qf'], ref[f'{p}_gf'], k1, k2, lam,
                                         metric=metric)
    np.testing.assert_allclose(got, ref[f'{p}_k{k1}_{k2}_final'], rtol=0, atol=DIST_TOL)
    m_ap = metrics.evaluate_rank(got, *ids)[1]
    assert abs(m_ap - float(ref[f'{p}_k{k1}_{k2}_map'])) <= MAP_TOL


def integer_features(seed, nq, ng, dim=6):
  """Small whole numbers: every dot product is exact in float32 whatever the order of its sums
  (the matrix product's order depends on the block's shape), and distances tie often."""
  rng = np.random.default_rng(seed)
  return (rng.integers(-2, 3, (nq, dim)).astype(np.float32),
          rng.integers(-2, 3, (ng, dim)).astype(np.float32))


def _small_blocks(monkeypatch):
  monkeypatch.setattr(rerank_knn, '_ROW_ELEMENTS', 1000)      # 3 rows a block
  monkeypatch.setattr(rerank, '_SLICE_ELEMENTS', 1000)
  monkeypatch.setattr(rerank, '_JACCARD_TERMS', 500)          # about one query a block
  monkeypatch.setattr(rerank, '_EXPANSION_BLOCK', 7)
  monkeypatch.setattr(rerank, '_EXPANSION_ROWS', 13)
  monkeypatch.setattr(rerank, '_RECIPROCAL_BLOCK', 11)


def test_ties_and_block_sizes_give_the_dense_result_bit_for_bit(monkeypatch):
  qf, gf = integer_features(2, 50, 250)
  expected = dense(qf, gf)
  np.testing.assert_array_equal(rerank_knn.re_ranking_features(qf, gf), expected)
  _small_blocks(monkeypatch)
  blocks = list(rerank_knn.reranked_blocks(qf, gf))
  assert len(blocks) > 10 and [b[0] for b in blocks[1:]] == [b[1] for b in blocks[:-1]]
  np.testing.assert_array_equal(np.concatenate([b[2] for b in blocks]), expected)
  np.testing.assert_array_equal(dense(qf, gf), expected)  # the dense path's blocks too


def test_memory_stays_far_below_the_dense_matrix(monkeypatch):
  """6,000 items: the dense path's (Q+G)^2 float32 matrix alone is 144 MB. With the fixed-size
  blocks small, what is left grows with (Q+G) k1 k2; numpy reports its allocations to
  tracemalloc."""
  qf, gf, ids = clustered(3, 1000, 5000, 8, noise=1.0)
  for module, name, value in ((rerank_knn, '_ROW_ELEMENTS', 1 << 18),
                              (rerank, '_SLICE_ELEMENTS', 1 << 18),
                              (rerank, '_JACCARD_TERMS', 1 << 16),
                              (rerank, '_EXPANSION_BLOCK', 256), (rerank, '_EXPANSION_ROWS', 512),
                              (rerank, '_RECIPROCAL_BLOCK', 512)):
    monkeypatch.setattr(module, name, value)
  dense_bytes = 4 * 6000 ** 2  # measured peak: 18 MB
  tracemalloc.start()
  try:
    result = metrics.evaluate_reranked(qf, gf, *ids)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < dense_bytes / 4, peak
  assert result['num_query'] == 1000 and 0 < result['mAP'] <= 1


def test_evaluate_reranked_equals_ranking_the_matrix():
  qf, gf, ids = clustered(4, 60, 300, 16, noise=1.2)
  matrix = rerank_knn.re_ranking_features(qf, gf, 6, 3, 0.2, metric='cosine')
  expected = metrics.summarize(metrics.rank_stats(matrix, *ids), len(gf))
  got = metrics.evaluate_reranked(qf, gf, *ids, k1=6, k2=3, lambda_value=0.2, metric='cosine')
  np.testing.assert_array_equal(got['cmc'], expected['cmc'])
  assert {k: got[k] for k in metrics.RESULT_KEYS} == {k: expected[k] for k in metrics.RESULT_KEYS}
  retrieval = metrics.retrieval(qf, gf, *ids, rerank=True)
  assert set(retrieval) == set(metrics.RESULT_KEYS)
  assert abs(retrieval['mAP'] - metrics.evaluate_rank(dense(qf, gf), *ids)[1]) <= MAP_TOL


def test_errors():
  qf, gf, _ = clustered(5, 4, 10, 3, noise=1.0)
  for call, match in (
      (lambda: rerank_knn.reranked_blocks(qf, gf[:, :2]), 'same feature size'),
      (lambda: rerank_knn.reranked_blocks(qf[:0], gf), 'at least one query'),
      (lambda: rerank_knn.reranked_blocks(np.where(qf > 1, np.nan, qf), gf), 'qf holds NaN'),
      (lambda: rerank_knn.reranked_blocks(qf, gf, k2=0), 'k2 must be a positive integer'),
      (lambda: rerank_knn.reranked_blocks(qf, gf, k1=-1), 'k1 must be an integer >= 0'),
      (lambda: rerank_knn.reranked_blocks(qf, gf, metric='l1'), 'unknown metric')):
    with pytest.raises(ValueError, match=match) as e:
      call()  # raised at the call, before any block is asked for
    assert '\n' not in str(e.value)
