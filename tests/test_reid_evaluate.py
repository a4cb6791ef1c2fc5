"""python -m dca_jax.reid.evaluate: Re-ID metrics of stored features (the same numbers as
metrics.py), the no-camera protocol, one-line errors; benchmarks/reid_scale.py at a tiny shape."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from benchmarks import reid_scale
from dca_jax.reid import evaluate, metrics

KEYS = {'mAP', 'rank1', 'rank5', 'rank10', 'mINP', 'num_query', 'num_gallery', 'num_skipped',
        'protocol', 'rerank', 'metric', 'seconds'}


def _splits(seed=0, nq=30, ng=120, dim=8, num_ids=20):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_ids, dim))
  out = []
  for n in (nq, ng):
    ids = rng.integers(0, num_ids, n)
    out.append({'features': (centres[ids] + rng.normal(size=(n, dim))).astype(np.float32),
                'ids': ids, 'cameras': rng.integers(0, 4, n)})
  return out


def _save(tmp_path, name, **arrays):
  path = str(tmp_path / name)
  np.savez(path, **arrays)
  return path


def _run(capsys, *argv):
  assert evaluate.main(list(argv)) == 0
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 1
  return json.loads(out[0])


def test_equals_the_metrics_with_and_without_re_ranking(tmp_path, capsys):
  query, gallery = _splits()
  q, g = _save(tmp_path, 'q.npz', **query), _save(tmp_path, 'g.npz', **gallery)
  ids = (query['ids'], gallery['ids'], query['cameras'], gallery['cameras'])
  plain = _run(capsys, q, g)
  assert set(plain) == KEYS and plain['protocol'] == 'camera-aware' and plain['rerank'] is False
  expected = metrics.evaluate_features(query['features'], gallery['features'], *ids)
  assert {k: plain[k] for k in metrics.RESULT_KEYS} == {k: expected[k] for k in metrics.RESULT_KEYS}
  reranked = _run(capsys, q, g, '--rerank', '--k1', '6', '--k2', '3', '--lambda', '0.5')
  assert set(reranked) == KEYS | {'k1', 'k2', 'lambda'} and reranked['rerank'] is True
  assert (reranked['k1'], reranked['k2'], reranked['lambda']) == (6, 3, 0.5)
  dist = metrics.re_ranking(*(metrics.distance_matrix(a, b) for a, b in (
      (query['features'], gallery['features']), (query['features'], query['features']),
      (gallery['features'], gallery['features']))), 6, 3, 0.5)
  assert abs(reranked['mAP'] - metrics.evaluate_rank(dist, *ids)[1]) <= 1e-4
  assert reranked['mAP'] != plain['mAP']


def test_no_camera_protocol_drops_only_identical_copies(tmp_path, capsys):
  """q0 (id 1) has its identical copy g0 and another view g1 in the gallery; q1 (id 2) only its
  copy g2. Squared distances from q0: g0 0 (copy: left out), g1 1 (hit), g2 4 (miss) -> AP 1;
  q1's only match is its copy -> skipped."""
  q = np.array([[0, 0], [2, 0]], np.float32)
  g = np.array([[0, 0], [1, 0], [2, 0]], np.float32)
  record = _run(capsys, _save(tmp_path, 'q.npz', features=q, ids=[1, 2]),
                _save(tmp_path, 'g.npz', features=g, ids=[1, 1, 2]))
  assert record['protocol'] == 'no-camera'
  assert (record['mAP'], record['rank1'], record['num_skipped']) == (1.0, 1.0, 1)
  q_cam, g_cam = evaluate.no_camera_ids(q, g)
  assert q_cam[0] == g_cam[0] and q_cam[1] == g_cam[2] and len({*q_cam, *g_cam}) == 3


def test_junk_id_minus_1_is_left_out_of_both_files(tmp_path, capsys):
  """Rows of id -1 (Market-1501's junk, which the readers drop before --mode eval) count for
  nothing: the record is that of the files without them, counts included."""
  query, gallery = _splits(seed=3)
  junk_q = {'features': query['features'][:4] + 0.01, 'ids': np.full(4, -1),
            'cameras': query['cameras'][:4]}
  junk_g = {'features': np.repeat(query['features'][:6], 3, axis=0), 'ids': np.full(18, -1),
            'cameras': np.repeat(query['cameras'][:6], 3)}   # the nearest to 6 queries
  both = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in ((query, junk_q),
                                                                      (gallery, junk_g))]
  clean = _run(capsys, _save(tmp_path, 'q.npz', **query), _save(tmp_path, 'g.npz', **gallery))
  record = _run(capsys, _save(tmp_path, 'qj.npz', **both[0]), _save(tmp_path, 'gj.npz', **both[1]))
  assert {k: record[k] for k in metrics.RESULT_KEYS} == {k: clean[k] for k in metrics.RESULT_KEYS}
  assert (record['num_query'], record['num_gallery']) == (30, 120)
  as_names = {k: v.astype(str) if k == 'ids' else v for k, v in both[1].items()}  # not integers
  assert evaluate.without_junk(as_names) is as_names
  kept = dict(both[1], ids=np.where(both[1]['ids'] == -1, 999, both[1]['ids']))
  counted = evaluate.evaluate(both[0], kept)   # the same rows under another id: they count
  assert counted['num_gallery'] == 138 and counted['mAP'] < clean['mAP'] - 0.01


def test_no_camera_protocol_tells_copies_by_content_where_both_files_have_it(tmp_path, capsys):
  """q0's copy g0, embedded in another batch, 3 off (to see it ranked); q1 and g2 bit-identical
  features of two different files. By features g0 is another view (q0: hits at ranks 1 and 3,
  AP 5/6) and g2 q1's copy (skipped); by the files' `content` keys g0 is q0's copy (left out:
  AP 1) and g2 q1's other view (AP 1)."""
  q = np.array([[0, 0], [2, 0]], np.float32)
  g = np.array([[3, 0], [1, 0], [2, 0]], np.float32)
  by_features = _run(capsys, _save(tmp_path, 'q.npz', features=q, ids=[1, 2]),
                     _save(tmp_path, 'g.npz', features=g, ids=[1, 1, 2]))
  assert by_features['mAP'] == pytest.approx(5 / 6) and by_features['num_skipped'] == 1
  by_content = _run(capsys, _save(tmp_path, 'qc.npz', features=q, ids=[1, 2], content=['a', 'b']),
                    _save(tmp_path, 'gc.npz', features=g, ids=[1, 1, 2], content=['a', 'c', 'd']))
  assert by_content['protocol'] == 'no-camera'
  assert (by_content['mAP'], by_content['num_skipped']) == (1.0, 0)
  one_side = _run(capsys, _save(tmp_path, 'qc.npz', features=q, ids=[1, 2], content=['a', 'b']),
                  _save(tmp_path, 'g.npz', features=g, ids=[1, 1, 2]))
  assert one_side == {**by_features, 'seconds': one_side['seconds']}   # one file: by features


@pytest.mark.parametrize('case, match', [
    ('no_features', r'q\.npz has no `features` array \(it holds: ids\)'),
    ('widths', 'features of different widths: .*q.npz has 8, .*g.npz 5'),
    ('ids_length', r'g\.npz: `ids` must be a 1-D array of one entry per feature row \(120\), got '
                   r'shape \(119,\)'),
    ('nan', r'q\.npz: `features` holds NaN or infinite values in 1 of 30 rows \(the first: row 3\)'),
    ('missing', r'nowhere\.npz: no such file'),
    ('one_camera_list', 'q.npz has `cameras` but .*g.npz has not'),
    ('not_npz', r'q\.npz: not a readable \.npz file'),
])
def test_bad_input_is_one_line(tmp_path, capsys, case, match):
  query, gallery = _splits()
  if case == 'no_features':
    query = {'ids': query['ids']}
  elif case == 'widths':
    gallery['features'] = gallery['features'][:, :5]
  elif case == 'ids_length':
    gallery['ids'] = gallery['ids'][1:]
  elif case == 'nan':
    query['features'][3, 1] = np.nan
  elif case == 'one_camera_list':
    del gallery['cameras']
  q, g = _save(tmp_path, 'q.npz', **query), _save(tmp_path, 'g.npz', **gallery)
  if case == 'missing':
    q = str(tmp_path / 'nowhere.npz')
  elif case == 'not_npz':
    open(q, 'w').write('not an archive')
  with pytest.raises(SystemExit) as e:
    evaluate.main([q, g])
  message = str(e.value.code)
  assert message.startswith('error: ') and '\n' not in message
  assert re.search(match, message), message
  assert capsys.readouterr().out == ''


def test_the_module_runs_and_fails_with_status_1(tmp_path):
  query, gallery = _splits()
  q, g = _save(tmp_path, 'q.npz', **query), _save(tmp_path, 'g.npz', **gallery)
  cmd = [sys.executable, '-m', 'dca_jax.reid.evaluate']
  ok = subprocess.run(cmd + [q, g, '--rerank'], cwd=ROOT, capture_output=True, text=True)
  assert ok.returncode == 0, ok.stderr
  assert json.loads(ok.stdout)['rerank'] is True
  bad = subprocess.run(cmd + [q, str(tmp_path / 'nowhere.npz')], cwd=ROOT, capture_output=True,
                       text=True)
  assert bad.returncode == 1 and bad.stdout == ''
  assert bad.stderr.splitlines() == [f'error: {tmp_path / "nowhere.npz"}: no such file']


def test_scale_benchmark_at_a_tiny_shape(capsys):
  record = reid_scale.main(['--num_query', '40', '--num_gallery', '200', '--dim', '16',
                            '--identities', '30', '--noise', '1.0'])
  assert json.loads(capsys.readouterr().out) == record
  assert record['shape'] == [40, 200, 16] and record['rerank'] is True
  assert record['peak_rss_gib'] > 0 and record['seconds'] >= 0 and 0 < record['mAP'] <= 1
