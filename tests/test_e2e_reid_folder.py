"""Re-ID on your own data, through main.py: an identity-folder set without cameras trains,
evaluates under the no-camera protocol (recorded in eval.json with the data and the
checkpoint), embeds images to embeddings.npz exactly as eval computes features, and searches a
gallery (search.jsonl, ranking pictures, the gallery cache) from the checkpoint and from an
exported file."""

import json
import os

import numpy as np
import pytest
from conftest import TINY_CONFIG, count_build, run_main

try:
  from tests import reid_layouts  # pylint: disable=g-import-not-at-top
except ImportError:
  import reid_layouts  # pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.slow
REID = f'{TINY_CONFIG}:reid'


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  count_build('test_e2e_reid_folder.run')
  root = tmp_path_factory.mktemp('reid_folder')
  lay = reid_layouts.write_reid_folder(str(root / 'data'))
  workdir = root / 'run'
  r = run_main(workdir, '--config.dataset=reid_folder', '--config.data_source=folder',
               f'--config.data_dir={lay.data_dir}', '--config.num_classes=0',
               '--config.batch_size=4', '--config.num_instances=2', '--config.max_steps=2',
               config=REID)
  assert r.returncode == 0, r.stderr[-3000:]
  return {'lay': lay, 'workdir': str(workdir), 'train': r, 'root': root}


def test_training_says_the_protocol(run):
  assert 'Re-ID protocol: no-camera' in run['train'].stdout


def test_eval_records_the_data_the_protocol_and_the_checkpoint(run):
  r = run_main(run['workdir'], mode='eval', config=None)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'no-camera protocol' in r.stdout
  with open(os.path.join(run['workdir'], 'eval.json')) as f:
    result = json.load(f)
  on = result['measured_on']
  assert on['dataset'] == 'reid_folder' and on['layout'] == 'identity folders'
  assert on['splits'] == {'train': {'images': 9, 'identities': 3},
                          'query': {'images': 4, 'identities': 4},
                          'gallery': {'images': 8, 'identities': 4}}
  assert on['protocol']['cameras'] == 'no-camera' and on['protocol']['re_ranking'] is False
  assert on['checkpoint']['step'] == result['step'] == 2
  assert len(on['config_sha256']) == 64
  # 'query only' has no gallery image: left out of mAP/CMC and counted, not an error
  assert result['num_skipped'] == 1 and result['num_query'] == 4


def test_embed_writes_the_features_eval_computes(run):
  lay = run['lay']
  query_dir = os.path.join(lay.data_dir, 'query')
  bad = os.path.join(run['root'], 'bad.jpg')
  with open(bad, 'wb') as f:
    f.write(b'not a jpeg')
  r = run_main(run['workdir'], f'--images={query_dir},{bad}', mode='embed', config=None)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'error: {bad}:' in r.stderr and '1 skipped (unreadable)' in r.stdout
  with np.load(os.path.join(run['workdir'], 'embeddings.npz')) as f:
    features, paths = f['features'], f['paths']
  assert list(paths) == [p for p, _ in lay.splits['query']]
  assert features.dtype == np.float32 and features.shape[0] == 4
  np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)  # reid_normalize
  # the features eval ranks with: the restored model's forward on the eval stream's crops
  from conftest import tiny_reid_config  # pylint: disable=g-import-not-at-top

  from dca_jax import checks, data, predict  # pylint: disable=g-import-not-at-top
  config = checks.checked(tiny_reid_config(dataset='reid_folder', data_source='folder',
                                           data_dir=lay.data_dir, num_classes=3))
  model = predict.Predictor(config, run['workdir'], outputs=('feature',))
  images = np.stack([data.load_image_for_eval(p, predict.eval_transform(config))
                     for p in paths])
  np.testing.assert_allclose(features, model(images)['feature'], atol=1e-5)


def _search(run, workdir, *extra, config=None):
  lay = run['lay']
  return run_main(workdir, f'--images={os.path.join(lay.data_dir, "query")}',
                  f'--gallery={os.path.join(lay.data_dir, "gallery")}', '--top_k=3', *extra,
                  mode='search', config=config)


@pytest.fixture(scope='module')
def searched(run):
  """The gallery searched once from the run's checkpoint: main.py's output and the records of
  search.jsonl (read here, so no test reads a file another test wrote)."""
  count_build('test_e2e_reid_folder.searched')
  first = _search(run, run['workdir'])
  assert first.returncode == 0, first.stderr[-3000:]
  with open(os.path.join(run['workdir'], 'search.jsonl')) as f:
    return first, [json.loads(line) for line in f]


def test_search_ranks_the_gallery_and_caches_it(run, searched):
  lay = run['lay']
  first, records = searched
  assert 'embedded' in first.stdout and '-> cache' in first.stdout
  assert [r['query'] for r in records] == [p for p, _ in lay.splits['query']]
  gallery = dict(lay.splits['gallery'])
  for record in records:
    assert len(record['results']) == 3
    assert record['identity'] == dict(lay.splits['query'])[record['query']]
    distances = [x['distance'] for x in record['results']]
    assert distances == sorted(distances)
    assert all(x['identity'] == gallery[x['path']] for x in record['results'])
  copy_of = {lay.duplicate[0]: lay.duplicate[1]}
  for record in records:  # the identical file is never a query's own result
    assert copy_of.get(record['query']) not in [x['path'] for x in record['results']]
  pictures = sorted(os.listdir(os.path.join(run['workdir'], 'search')))
  assert len(pictures) == 4 and all(p.endswith('.png') for p in pictures)
  second = _search(run, run['workdir'])
  assert second.returncode == 0 and 'embedding(s) from the cache' in second.stdout
  with open(os.path.join(run['workdir'], 'search.jsonl')) as f:
    assert [json.loads(line) for line in f] == records


def test_search_from_an_exported_file(run, searched, tmp_path):
  export = run_main(run['workdir'], '--format=stablehlo', mode='export', config=None)
  assert export.returncode == 0, export.stderr[-3000:]
  exported = os.path.join(run['workdir'], 'export', 'model.stablehlo')
  r = _search(run, tmp_path / 'served', f'--exported={exported}')
  assert r.returncode == 0, r.stderr[-3000:]
  with open(tmp_path / 'served' / 'search.jsonl') as f:
    served = [json.loads(line) for line in f]
  restored = searched[1]
  assert len(served) == len(restored) == 4
  for a, b in zip(served, restored):
    assert [x['path'] for x in a['results']] == [x['path'] for x in b['results']]
    np.testing.assert_allclose([x['distance'] for x in a['results']],
                               [x['distance'] for x in b['results']], atol=1e-4)
