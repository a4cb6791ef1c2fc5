"""Re-ID metrics: equal to torchreid / fast-reid on stored cases, hand-checked, blockwise == full.

tests/fixtures/reid_metrics.npz comes from tests/fixtures/make_reid.py, which runs the reference
libraries themselves (torchreid 0.2.5, its compiled rank_cy via pyppbox-torchreid, fastreid
1.4.0); see docs/REID.md.
"""

import os

import numpy as np
import pytest

from dca_jax.reid import metrics, rerank

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'reid_metrics.npz')
TOL = 1e-6
IDS = ('q_pids', 'g_pids', 'q_camids', 'g_camids')


@pytest.fixture(scope='module')
def ref():
  with np.load(FIXTURE) as z:
    return {k: z[k] for k in z.files}


def _ids(ref, prefix):
  return [ref[f'{prefix}_{k}'] for k in IDS]


def _has_true_match(q_pids, g_pids, q_camids, g_camids):
  """Independent count of valid queries: same pid in the gallery under another camera."""
  return np.array([np.any((g_pids == p) & (g_camids != c)) for p, c in zip(q_pids, q_camids)])


# --- a hand-computed example -------------------------------------------------------------------

# Gallery: g0 pid 1 cam 1, g1 pid 2 cam 2, g2 pid 1 cam 2, g3 pid 0 cam 3 (distractor),
#          g4 pid 1 cam 3, g5 pid 3 cam 1, g6 pid 3 cam 3.
HAND_G_PIDS, HAND_G_CAMS = np.array([1, 2, 1, 0, 1, 3, 3]), np.array([1, 2, 2, 3, 3, 1, 3])
HAND_Q_PIDS, HAND_Q_CAMS = np.array([1, 3, 4, 2]), np.array([1, 2, 1, 2])
HAND_DIST = np.array([
    # q0 (pid 1, cam 1): order g0..g6; g0 is junk (same pid and cam), removed. Kept list:
    # g1 miss, g2 HIT (rank 2), g3 miss, g4 HIT (rank 4), g5, g6.
    # AP = (1/2 + 2/4) / 2 = 0.5; INP = 2 hits / last hit rank 4 = 0.5; first hit 2.
    [.1, .2, .3, .4, .5, .6, .7],
    # q1 (pid 3, cam 2): order g5, g0, g1, g2, g6, g3, g4; nothing junk (g1 is pid 2).
    # g5 HIT rank 1, g6 HIT rank 5: AP = (1/1 + 2/5) / 2 = 0.7; INP = 2/5 = 0.4; first hit 1.
    [.2, .3, .4, .6, .7, .1, .5],
    # q2 (pid 4): no pid 4 in the gallery -> skipped.
    [.1, .2, .3, .4, .5, .6, .7],
    # q3 (pid 2, cam 2): its only gallery image g1 is in cam 2 too (junk) -> skipped.
    [.7, .6, .5, .4, .3, .2, .1],
], np.float32)
# Over the 2 valid queries: CMC@1 = (0 + 1) / 2 = 0.5, CMC@k>=2 = 1; the CMC has 7 entries
# (gallery of 7 < max_rank 50); mAP = (0.5 + 0.7) / 2 = 0.6; mINP = (0.5 + 0.4) / 2 = 0.45.


def test_hand_example():
  stats = metrics.rank_stats(HAND_DIST, HAND_Q_PIDS, HAND_G_PIDS, HAND_Q_CAMS, HAND_G_CAMS)
  np.testing.assert_array_equal(stats['valid'], [True, True, False, False])
  np.testing.assert_allclose(stats['ap'][:2], [0.5, 0.7], rtol=0, atol=1e-12)
  np.testing.assert_allclose(stats['inp'][:2], [0.5, 0.4], rtol=0, atol=1e-12)
  np.testing.assert_array_equal(stats['first_hit'][:2], [2, 1])
  cmc, m_ap, m_inp = metrics.evaluate_rank(HAND_DIST, HAND_Q_PIDS, HAND_G_PIDS, HAND_Q_CAMS,
                                           HAND_G_CAMS)
  np.testing.assert_array_equal(cmc, [0.5, 1, 1, 1, 1, 1, 1])
  assert cmc.dtype == np.float32
  assert m_ap == pytest.approx(0.6, abs=1e-12) and m_inp == pytest.approx(0.45, abs=1e-12)


def test_cmc_of_a_short_kept_list_stays_matched():
  # Gallery of 3 (< max_rank): g0 is junk, so q0 keeps 2 items: g2 miss, g1 hit (rank 2).
  # The CMC has 3 entries; the one past the kept list stays 1 (torchreid's python path would
  # fail on such ragged rows).
  dist = np.array([[.1, .3, .2]], np.float32)
  cmc, m_ap, m_inp = metrics.evaluate_rank(dist, [1], [1, 1, 2], [1], [1, 2, 2])
  np.testing.assert_array_equal(cmc, [0, 1, 1])
  assert m_ap == m_inp == 0.5


# --- equal to the reference libraries -------------------------------------------------------


@pytest.mark.parametrize('case', ['market', 'random', 'small'])
def test_evaluate_rank_matches_torchreid_and_fastreid(ref, case):
  dist, ids = ref[f'{case}_dist'], _ids(ref, case)
  valid = _has_true_match(*ids)
  cmc, m_ap, m_inp = metrics.evaluate_rank(dist, *ids)
  # torchreid's python path (the brief's reference) and its cython path.
  for path in ('tr_py', 'tr_cy'):
    np.testing.assert_allclose(cmc, ref[f'{case}_{path}_cmc'], rtol=0, atol=TOL)
    assert abs(m_ap - float(ref[f'{case}_{path}_map'])) <= TOL
  # fast-reid (torchreid's protocol + mINP): per valid query AP and INP, python and cython.
  stats = metrics.rank_stats(dist, *ids)
  np.testing.assert_array_equal(stats['valid'], valid)
  for path in ('fr_py', 'fr_cy'):
    np.testing.assert_allclose(cmc, ref[f'{case}_{path}_cmc'], rtol=0, atol=TOL)
    np.testing.assert_allclose(stats['ap'][valid], ref[f'{case}_{path}_ap'], rtol=0, atol=TOL)
    np.testing.assert_allclose(stats['inp'][valid], ref[f'{case}_{path}_inp'], rtol=0, atol=TOL)
    assert abs(m_inp - ref[f'{case}_{path}_inp'].mean()) <= TOL
  # What each case is there for.
  q_pids, g_pids, q_camids, g_camids = ids
  junk = (q_pids[:, None] == g_pids[None]) & (q_camids[:, None] == g_camids[None])
  if case == 'market':
    assert junk.any() and np.isin([0, -1], g_pids).all() and (~valid).sum() >= 2
    assert any(np.isin(p, g_pids) and not v for p, v in zip(q_pids, valid))  # junk-only query
  if case == 'random':
    assert junk.sum() > 50 and valid.all()
  if case == 'small':
    assert dist.shape[1] < 50 and cmc.shape == (dist.shape[1],) and not junk.any()


@pytest.mark.parametrize('metric', ['euclidean', 'cosine'])
def test_re_ranking_matches_torchreid(ref, metric):
  p = f'rr_{metric}'
  ids = _ids(ref, p)
  for k1, k2, lam in ref['rerank_params']:
    k1, k2 = int(k1), int(k2)
    final = metrics.re_ranking(ref[f'{p}_q_g'], ref[f'{p}_q_q'], ref[f'{p}_g_g'], k1, k2, lam)
    expected = ref[f'{p}_k{k1}_{k2}_final']
    assert final.dtype == np.float32 and final.shape == expected.shape
    np.testing.assert_allclose(final, expected, rtol=0, atol=TOL)
    cmc, m_ap, _ = metrics.evaluate_rank(final, *ids)
    np.testing.assert_allclose(cmc, ref[f'{p}_k{k1}_{k2}_cmc'], rtol=0, atol=TOL)
    assert abs(m_ap - float(ref[f'{p}_k{k1}_{k2}_map'])) <= TOL
  # Re-ranking changed the distances (the test would notice a no-op).
  assert np.abs(final - ref[f'{p}_q_g']).max() > 0.1


@pytest.mark.parametrize('metric', ['euclidean', 'cosine'])
def test_distances_match_torchreid(ref, metric):
  p = f'rr_{metric}'
  qf, gf = ref[f'{p}_qf'], ref[f'{p}_gf']
  for name, a, b in (('q_g', qf, gf), ('q_q', qf, qf), ('g_g', gf, gf)):
    expected = ref[f'{p}_{name}']
    got = metrics.distance_matrix(a, b, metric)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * max(1, np.abs(expected).max()))


def test_evaluate_features_matches_torchreid(ref):
  ids = _ids(ref, 'market')
  result = metrics.evaluate_features(ref['market_qf'], ref['market_gf'], *ids, block_size=7)
  np.testing.assert_allclose(result['cmc'], ref['market_tr_py_cmc'], rtol=0, atol=TOL)
  assert abs(result['mAP'] - float(ref['market_tr_py_map'])) <= TOL
  assert abs(result['mINP'] - ref['market_fr_py_inp'].mean()) <= TOL
  assert result['num_skipped'] == len(ids[0]) - len(ref['market_fr_py_ap']) == 5


# --- conventions, streaming, errors ----------------------------------------------------------


def _random_problem(seed, nq=37, ng=150, dim=12):
  rng = np.random.default_rng(seed)
  qf = rng.normal(size=(nq, dim)).astype(np.float32)
  gf = rng.normal(size=(ng, dim)).astype(np.float32)
  ids = (rng.integers(1, 30, nq), rng.integers(0, 25, ng), rng.integers(1, 4, nq),
         rng.integers(1, 4, ng))
  return qf, gf, ids


def test_distance_conventions():
  qf, gf, _ = _random_problem(0)
  q, g = qf.astype(np.float64), gf.astype(np.float64)
  squared = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)  # torchreid's 'euclidean' is squared
  cosine = 1 - (q @ g.T) / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(g, axis=1)[None]
  np.testing.assert_allclose(metrics.distance_matrix(qf, gf, 'euclidean'), squared, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(metrics.distance_matrix(qf, gf, 'cosine'), cosine, rtol=0, atol=1e-6)


@pytest.mark.parametrize('metric', ['euclidean', 'cosine'])
def test_evaluate_features_blockwise_equals_full_matrix(metric):
  qf, gf, ids = _random_problem(1)
  cmc, m_ap, m_inp = metrics.evaluate_rank(metrics.distance_matrix(qf, gf, metric), *ids)
  expected_valid = _has_true_match(*ids)
  assert 0 < expected_valid.sum() < len(qf)  # some queries are skipped
  for block in (1, 5, 16, 37, 1000, None):
    result = metrics.evaluate_features(qf, gf, *ids, metric=metric, block_size=block)
    np.testing.assert_array_equal(result['cmc'], cmc)
    assert result['mAP'] == m_ap and result['mINP'] == m_inp
    assert (result['rank1'], result['rank5'], result['rank10']) == (cmc[0], cmc[4], cmc[9])
    assert result['num_query'] == len(qf) and result['num_gallery'] == len(gf)
    assert result['num_skipped'] == (~expected_valid).sum()


def test_evaluate_features_distance_fn():
  qf, gf, ids = _random_problem(2)
  calls = []

  def neg_dot(q_block, g):  # any callable, e.g. an accelerator's matmul
    calls.append(len(q_block))
    return -(q_block.astype(np.float64) @ g.T.astype(np.float64))

  result = metrics.evaluate_features(qf, gf, *ids, block_size=10, distance_fn=neg_dot)
  cmc, m_ap, _ = metrics.evaluate_rank(-(qf.astype(np.float64) @ gf.T.astype(np.float64)), *ids)
  assert calls == [10, 10, 10, 7]
  np.testing.assert_array_equal(result['cmc'], cmc)
  assert result['mAP'] == m_ap


def test_top_ranks_equal_argsort_with_ties_and_nan():
  rng = np.random.default_rng(3)
  rows = rng.integers(0, 6, size=(50, 40)).astype(np.float32)  # many ties: full-sort fallback
  rows[::7] = rng.random((8, 40))                                # tie-free rows: partial sort
  rows[3, 5] = np.nan
  for width in (1, 7, 21, 40, 60):
    np.testing.assert_array_equal(rerank._top_ranks(rows, width),
                                  np.argsort(rows, axis=1)[:, :width])


def test_errors():
  dist, args = HAND_DIST, (HAND_Q_PIDS, HAND_G_PIDS, HAND_Q_CAMS, HAND_G_CAMS)
  with pytest.raises(ValueError, match='no valid query'):
    metrics.evaluate_rank(dist[2:], HAND_Q_PIDS[2:], HAND_G_PIDS, HAND_Q_CAMS[2:], HAND_G_CAMS)
  with pytest.raises(ValueError, match=r'g_pids must be a 1-D array of length 7'):
    metrics.evaluate_rank(dist, HAND_Q_PIDS, HAND_G_PIDS[:6], HAND_Q_CAMS, HAND_G_CAMS)
  with pytest.raises(ValueError, match=r'q_camids must be a 1-D array of length 4'):
    metrics.evaluate_rank(dist, HAND_Q_PIDS, HAND_G_PIDS, HAND_Q_CAMS[:, None], HAND_G_CAMS)
  with pytest.raises(ValueError, match='2-D'):
    metrics.evaluate_rank(dist[0], *args)
  with pytest.raises(ValueError, match='NaN'):
    metrics.evaluate_rank(np.where(dist > .6, np.nan, dist), *args)
  with pytest.raises(ValueError, match='max_rank'):
    metrics.evaluate_rank(dist, *args, max_rank=0)
  with pytest.raises(ValueError, match='block_size'):
    metrics.evaluate_rank(dist, *args, block_size=0)
  qf, gf, ids = _random_problem(4, nq=6, ng=20)
  with pytest.raises(ValueError, match='unknown metric'):
    metrics.evaluate_features(qf, gf, *ids, metric='l1')
  with pytest.raises(ValueError, match='same feature size'):
    metrics.evaluate_features(qf, gf[:, :5], *ids)
  with pytest.raises(ValueError, match='distance_fn returned shape'):
    metrics.evaluate_features(qf, gf, *ids, distance_fn=lambda q, g: (q @ g.T)[:, :3])
  with pytest.raises(ValueError, match=r'g_g_dist'):
    metrics.re_ranking(np.zeros((3, 4)), np.zeros((3, 3)), np.zeros((3, 3)))
  with pytest.raises(ValueError, match='k2'):
    metrics.re_ranking(np.ones((3, 4)), np.ones((3, 3)), np.ones((4, 4)), k2=0)
  # Market-1501 with re-ranking needs (3368 + 19732)^2 float32 = 2.0 GiB.
  with pytest.raises(ValueError, match=r'23100x23100 float32 distance matrix, 2\.0 GiB, over '
                     r'max_bytes=1\.0 GiB'):
    metrics.re_ranking(np.broadcast_to(np.float32(0), (3368, 19732)), None, None,
                       max_bytes=1 << 30)


def test_the_no_camera_protocol_by_hand(tmp_path):
  """Own data without cameras: the reader gives every distinct file its own camera id, so the
  junk rule (same id AND same camera) leaves out of a query's gallery only the identical file.
  Query 0 (id 1) has its copy in the gallery (g0, distance 0); query 2 (id 3) has no match.
    q0: g0 (copy: left out), g2 .2 x, g1 .5 v, g4 .7 v, g3 .9 x  -> AP = (1/2 + 2/3) / 2
    q1: g3 .1 x, g2 .3 v, g1 .6 x, g0 .8 x, g4 .9 x             -> AP = 1/2
  mAP = (7/12 + 1/2) / 2 = 13/24; rank-1 0, rank-2 1; query 2 counted as without a match."""
  from dca_jax.data import reid_sources  # pylint: disable=g-import-not-at-top
  files = {}
  for name, content in (('q0', b'a'), ('q1', b'b'), ('q2', b'c'), ('g0', b'a'), ('g1', b'd'),
                        ('g2', b'e'), ('g3', b'f'), ('g4', b'g')):
    files[name] = str(tmp_path / name)
    with open(files[name], 'wb') as f:
      f.write(content)
  keys = {}
  camids = [keys.setdefault(k, len(keys)) for k in reid_sources.content_keys(files.values())]
  q_cams, g_cams = camids[:3], camids[3:]
  assert q_cams[0] == g_cams[0] and len(set(camids)) == 7
  dist = np.array([[0.0, 0.5, 0.2, 0.9, 0.7],
                   [0.8, 0.6, 0.3, 0.1, 0.9],
                   [0.4, 0.4, 0.4, 0.4, 0.4]])
  stats = metrics.summarize(metrics.rank_stats(dist, [1, 2, 3], [1, 1, 2, 4, 1], q_cams, g_cams),
                            num_gallery=5)
  assert stats['mAP'] == pytest.approx(13 / 24, abs=1e-6)
  assert stats['rank1'] == 0.0 and stats['cmc'][1] == 1.0
  assert stats['num_skipped'] == 1 and stats['num_query'] == 3
