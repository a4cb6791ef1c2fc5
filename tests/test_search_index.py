"""`--mode search` on stored features and through the gallery's index (dca_jax/reid/index.py):
two .npz files rank without a model (names from `paths` or row indices, eval's distances, the
identical row left out), the index is saved, reused and grown, IVF and HNSW find a small set's
neighbours, each bad input is one line with nothing written, and the scale benchmark runs at a
tiny size. Image galleries through main.py: tests/test_e2e_reid_folder.py."""

import json
import os

import faiss
import numpy as np
import pytest
from conftest import one_line_error, run_main

from dca_jax import search
from dca_jax.reid import index as gallery_index
from dca_jax.reid import metrics


def _clustered(rng, n, dim=16, identities=10, noise=0.3):
  ids = np.arange(n) % identities
  centres = np.random.default_rng(99).standard_normal((identities, dim)).astype(np.float32)
  return (centres[ids] + noise * rng.standard_normal((n, dim))).astype(np.float32), ids


@pytest.fixture
def files(tmp_path):
  """A 60-row gallery with paths and ids, 5 queries without (the first a gallery row's copy)."""
  rng = np.random.default_rng(0)
  gallery, ids = _clustered(rng, 60)
  queries = np.concatenate([gallery[:1], _clustered(rng, 4)[0]])
  paths = np.asarray([f'g/{i:03d}.jpg' for i in range(60)])
  np.savez(tmp_path / 'gallery.npz', features=gallery, paths=paths, ids=ids)
  np.savez(tmp_path / 'queries.npz', features=queries)
  return {'gallery': gallery, 'queries': queries, 'paths': list(paths), 'ids': ids,
          'g': str(tmp_path / 'gallery.npz'), 'q': str(tmp_path / 'queries.npz')}


def _search(files, workdir, top=5, **kw):
  return search.run_search(None, str(workdir), [files['q']], files['g'], top=top, **kw)


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_two_npz_files_rank_with_eval_distances_and_no_model(files, tmp_path, capsys):
  records = _search(files, tmp_path / 'w')
  assert records == _read(tmp_path / 'w' / 'search.jsonl')
  assert [r['query'] for r in records] == [0, 1, 2, 3, 4]   # no `paths`: the row index
  dist = metrics.distance_matrix(files['queries'], files['gallery'])
  dist[0, 0] = np.inf   # query 0 is gallery row 0's copy: left out
  for q, record in enumerate(records):
    order = np.argsort(dist[q], kind='stable')[:5]
    assert [x['path'] for x in record['results']] == [files['paths'][g] for g in order]
    assert [x['distance'] for x in record['results']] == [float(d) for d in dist[q][order]]
    assert [x['identity'] for x in record['results']] == [int(files['ids'][g]) for g in order]
    assert 'picture' not in record and record['identity'] is None
  out = capsys.readouterr().out
  assert 'index: flat (exact) of 60 vector(s) built' in out and 'no pictures' in out
  assert not os.path.exists(tmp_path / 'w' / 'search')
  again = _search(files, tmp_path / 'w')
  assert again == records and 'reused' in capsys.readouterr().out


def test_rows_without_paths_are_named_by_index_and_queries_by_paths(files, tmp_path):
  np.savez(files['g'], features=files['gallery'])
  np.savez(files['q'], features=files['queries'], paths=np.asarray(['a', 'b', 'c', 'd', 'e']),
           ids=np.arange(5))
  records = _search(files, tmp_path / 'w', top=3)
  assert [r['query'] for r in records] == ['a', 'b', 'c', 'd', 'e']
  assert [r['identity'] for r in records] == [0, 1, 2, 3, 4]
  assert all(isinstance(x['path'], int) and 'identity' not in x
             for r in records for x in r['results'])


def test_a_grown_gallery_is_added_to_the_index_and_a_changed_one_rebuilt(files, tmp_path,
                                                                           capsys):
  first = _search(files, tmp_path / 'w')
  grown = np.concatenate([files['gallery'], files['queries'][1:2] + 1e-3])
  np.savez(files['g'], features=grown, paths=np.asarray(files['paths'] + ['new.jpg']))
  records = _search(files, tmp_path / 'w')
  assert '1 new vector(s) added to the 60 it held' in capsys.readouterr().out
  assert records[1]['results'][0]['path'] == 'new.jpg'
  assert [r['results'] for r in records[2:]] == [
      [{k: v for k, v in x.items() if k != 'identity'} for x in r['results']]
      for r in first[2:]]
  np.savez(files['g'], features=grown[1:], paths=np.asarray(files['paths'][1:] + ['new.jpg']))
  _search(files, tmp_path / 'w')
  assert '(rebuilt: gallery rows gone or changed)' in capsys.readouterr().out


@pytest.mark.parametrize('kind', ['ivf', 'hnsw'])
def test_approximate_indexes_find_a_small_sets_neighbours(files, tmp_path, kind, capsys):
  exact = _search(files, tmp_path / 'flat', index='flat')
  found = _search(files, tmp_path / kind, index=kind)
  assert f'index: {kind} (' in capsys.readouterr().out
  for a, b in zip(found, exact):
    assert [x['path'] for x in a['results']] == [x['path'] for x in b['results']]
    np.testing.assert_allclose([x['distance'] for x in a['results']],
                               [x['distance'] for x in b['results']], rtol=1e-5, atol=1e-5)
  assert files['paths'][0] not in [x['path'] for x in found[0]['results']]   # the copy


def test_sync_reuses_grows_and_rebuilds(tmp_path):
  rng = np.random.default_rng(1)
  features, _ = _clustered(rng, 201)
  path = str(tmp_path / 'idx')
  said = []
  built, rows = gallery_index.sync(path, 'ivf', np.arange(100, dtype=np.uint64), features[:100],
                                   said.append)
  assert 'built' in said[-1] and list(rows) == list(range(100)) and built.trained == 100
  current = features[:150][::-1]   # the old rows moved, 50 new ones
  grown, rows = gallery_index.sync(path, 'ivf', np.arange(150, dtype=np.uint64)[::-1], current,
                                   said.append)
  assert '50 new vector(s) added to the 100' in said[-1] and sorted(rows) == list(range(150))
  np.testing.assert_array_equal(grown.vectors(), current[rows])   # index row -> gallery row
  _, rows = gallery_index.sync(path, 'ivf', np.arange(150, dtype=np.uint64)[::-1], current,
                               said.append)
  assert 'reused' in said[-1]
  gallery_index.sync(path, 'ivf', np.arange(201, dtype=np.uint64), features, said.append)
  assert 'more than doubled' in said[-1]   # lists trained on 100 of 201 rows
  gallery_index.sync(path, 'hnsw', np.arange(201, dtype=np.uint64), features, said.append)
  assert 'rebuilt: it was ivf' in said[-1]


def test_the_exact_top_k_is_the_stable_full_sort():
  rng = np.random.default_rng(2)
  ranked = rng.integers(0, 5, (20, 400)).astype(np.float32)   # ties everywhere
  ranked[3, :] = np.inf
  for k in (1, 3, 7):
    order, values = search._top(ranked, k)   # pylint: disable=protected-access
    np.testing.assert_array_equal(order, np.argsort(ranked, axis=1, kind='stable')[:, :k])
    np.testing.assert_array_equal(values, np.take_along_axis(ranked, order, axis=1))


def test_auto_is_flat_below_the_size_and_with_re_ranking():
  assert gallery_index.resolve('auto', gallery_index.FLAT_MAX) == 'flat'
  assert gallery_index.resolve('auto', gallery_index.FLAT_MAX + 1) == 'ivf'
  assert gallery_index.resolve('auto', 10**7, exact=True) == 'flat'
  one_line_error(lambda: gallery_index.resolve('ivf', 10, exact=True), 'needs every distance')
  one_line_error(lambda: gallery_index.resolve('tree', 10), '--index tree: choose one of')


# ------------------------------------------------------------------------- bad input
def _bad_gallery(files, **arrays):
  np.savez(files['g'], **arrays)


BAD = {
    'no features': (lambda f: _bad_gallery(f, vectors=f['gallery']), 'has no `features` array'),
    'widths differ': (lambda f: _bad_gallery(f, features=f['gallery'][:, :8]),
                      'feature widths differ: --images .* has 16-d features, --gallery .* 8-d'),
    'ids of another length': (lambda f: _bad_gallery(f, features=f['gallery'], ids=np.arange(3)),
                              r'`ids` must be a 1-D array of one entry per feature row \(60\)'),
    'NaN features': (lambda f: _bad_gallery(f, features=np.where(
        np.arange(60)[:, None] == 7, np.nan, f['gallery'])), r'NaN or infinite values .*row 7'),
    'paths and images mixed': (None, 'give one .npz of features, or images'),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_bad_input_is_one_line_and_writes_nothing(files, tmp_path, case):
  spoil, match = BAD[case]
  images = [files['q']]
  if spoil is None:
    images = [files['q'], str(tmp_path / 'x.jpg')]
  else:
    spoil(files)
  workdir = tmp_path / 'w'
  one_line_error(lambda: search.run_search(None, str(workdir), images, files['g']), match)
  assert not os.path.exists(workdir)


def test_an_index_of_another_width_is_one_line_and_left_alone(files, tmp_path):
  workdir = tmp_path / 'w'
  _search(files, workdir)
  folder = workdir / 'search_index'
  name = next(n for n in os.listdir(folder) if n.endswith('.faiss'))
  foreign = faiss.IndexFlatL2(4)
  foreign.add(np.zeros((60, 4), np.float32))
  faiss.write_index(foreign, str(folder / name))
  before = {n: (folder / n).read_bytes() for n in os.listdir(folder)}
  one_line_error(lambda: _search(files, workdir, out='again.jsonl'),
                 'holds 4-d vectors but the gallery\'s features are 16-d')
  assert not os.path.exists(workdir / 'again.jsonl')
  assert {n: (folder / n).read_bytes() for n in os.listdir(folder)} == before


def test_main_searches_two_npz_without_a_config_and_says_bad_input_in_one_line(files, tmp_path):
  r = run_main(tmp_path / 'w', f'--images={files["q"]}', f'--gallery={files["g"]}',
               '--top_k=2', mode='search', config=None)
  assert r.returncode == 0, r.stderr[-3000:]
  assert len(_read(tmp_path / 'w' / 'search.jsonl')) == 5
  np.savez(files['g'], features=files['gallery'], ids=np.arange(3))
  bad = run_main(tmp_path / 'new', f'--images={files["q"]}', f'--gallery={files["g"]}',
                 mode='search', config=None)
  assert bad.returncode == 1 and bad.stderr.count('\n') == 1, bad.stderr[-3000:]
  assert bad.stderr.startswith('error: --gallery') and not os.path.exists(tmp_path / 'new')


# ------------------------------------------------------------------------- the benchmark
def test_the_scale_benchmark_runs_at_a_tiny_size(capsys):
  from benchmarks import search_index  # pylint: disable=g-import-not-at-top
  record = search_index.main(['--num_gallery', '400', '--num_query', '20', '--dim', '16',
                              '--per_identity', '10', '--noise', '0.5', '--index', 'ivf'])
  assert json.loads(capsys.readouterr().out) == record
  assert record['kind'] == 'ivf' and record['recall_at_10'] >= 0.9
  assert record['index_bytes'] > 400 * 16 * 4 and record['ms_per_query'] > 0
  assert record['build_seconds'] >= 0 and record['peak_rss_gib'] > 0
