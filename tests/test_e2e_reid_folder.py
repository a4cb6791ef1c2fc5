"""Re-ID on your own data, through main.py: an identity-folder set without cameras trains,
evaluates under the no-camera protocol (recorded in eval.json with the data and the
checkpoint), embeds images to embeddings.npz exactly as eval computes features, and searches a
gallery (search.jsonl, ranking pictures, the gallery cache and index, a gallery that grows, .npz
features on either side) from the checkpoint and from an
exported file."""

import json
import os

import numpy as np
import pytest
from conftest import TINY_CONFIG, count_build, run_main

from dca_jax.reid import evaluate as reid_evaluate

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


def test_embedded_query_and_gallery_evaluate_as_eval(run, tmp_path):
  """`--mode embed` of the query and the gallery identity folders (ids: the folders' names; no
  cameras.csv: no cameras, each file's content key instead), then reid.evaluate on the two
  files: eval.json's figures (the no-camera protocol; the gallery's byte copy of a query, whose
  features from another batch differ in the last bits, is left out by its content key as eval
  leaves out the same file)."""
  lay = run['lay']
  r = run_main(run['workdir'], mode='eval', config=None)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(run['workdir'], 'eval.json')) as f:
    saved = json.load(f)
  splits = {}
  for split in ('query', 'gallery'):
    out = str(tmp_path / f'{split}.npz')
    r = run_main(run['workdir'], f'--images={os.path.join(lay.data_dir, split)}', f'--out={out}',
                 mode='embed', config=None)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'ids from the identity folders of {os.path.join(lay.data_dir, split)}' in r.stdout
    assert 'cameras: not written (no ' in r.stdout and 'the no-camera protocol' in r.stdout
    splits[split] = reid_evaluate.load_split(out)
    assert splits[split]['ids'].tolist() == [name for _, name in lay.splits[split]]
    assert splits[split]['cameras'] is None and splits[split]['content'] is not None
  record = reid_evaluate.evaluate(splits['query'], splits['gallery'])
  assert record['protocol'] == 'no-camera'
  for key in ('num_query', 'num_gallery', 'num_skipped'):
    assert record[key] == saved[key], key
  for key in ('mAP', 'rank1'):
    assert record[key] == pytest.approx(saved[key], abs=1e-4), key


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
  assert 'index: flat (exact) of 8 vector(s) built' in first.stdout
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
  _assert_pictures(records, os.path.join(run['workdir'], 'search'))
  second = _search(run, run['workdir'])
  assert second.returncode == 0 and 'embedding(s) from the cache' in second.stdout
  assert 'image(s) embedded' not in second.stdout and 'of 8 vector(s), reused' in second.stdout
  with open(os.path.join(run['workdir'], 'search.jsonl')) as f:
    assert [json.loads(line) for line in f] == records


def _assert_pictures(records, folder):
  """One picture per query, named after it (every query of the layout is <identity>/0.jpg:
  0.png, 0_2.png, ...), named in its record, with a caption band under the ranking row."""
  names = ['0.png', '0_2.png', '0_3.png', '0_4.png']
  assert [os.path.basename(r['query']) for r in records] == ['0.jpg'] * 4
  assert [r['picture'] for r in records] == [os.path.join(folder, n) for n in names]
  assert sorted(os.listdir(folder)) == names
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from dca_jax import drawing  # pylint: disable=g-import-not-at-top
  for record in records:
    with Image.open(record['picture']) as picture:
      assert picture.size[1] > drawing.RANK_PANEL_HEIGHT   # the query's name, ranks, distances


def test_search_writes_out_and_a_failed_search_writes_nothing(run, searched, tmp_path):
  lay = run['lay']
  out = tmp_path / 'found' / 'mine.jsonl'
  r = _search(run, run['workdir'], f'--out={out}')   # the gallery from the cache
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'-> {out}' in r.stdout and f'-> {tmp_path / "found" / "mine"}' in r.stdout
  with open(out) as f:
    records = [json.loads(line) for line in f]
  _assert_pictures(records, str(tmp_path / 'found' / 'mine'))
  assert [x['results'] for x in records] == [x['results'] for x in searched[1]]
  bad = tmp_path / 'bad.jpg'
  bad.write_bytes(b'not a jpeg')
  failed = run_main(run['workdir'], f'--images={bad}', '--out=never.jsonl',
                    f'--gallery={os.path.join(lay.data_dir, "gallery")}', mode='search',
                    config=None)
  assert failed.returncode == 1 and f'error: {bad}:' in failed.stderr
  assert 'none of the 1 query image(s) could be read' in failed.stderr
  for name in ('never.jsonl', 'never'):
    assert not os.path.exists(os.path.join(run['workdir'], name))


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


def test_search_adds_new_gallery_images_without_embedding_the_old(run, tmp_path):
  """A gallery that grew: only the new file is embedded and added to the index; the old
  results stand, each distance as it was (the flat index's exact distances)."""
  import shutil  # pylint: disable=g-import-not-at-top
  gallery = tmp_path / 'gallery'
  shutil.copytree(os.path.join(run['lay'].data_dir, 'gallery'), gallery)
  query = os.path.join(run['lay'].data_dir, 'query')
  common = (f'--images={query}', f'--gallery={gallery}', '--top_k=20')
  first = run_main(run['workdir'], *common, f'--out={tmp_path / "a.jsonl"}', mode='search',
                   config=None)
  assert first.returncode == 0 and '8 image(s) embedded' in first.stdout, first.stderr[-3000:]
  reid_layouts.write_jpeg(str(gallery / 'bob_2' / 'new.jpg'), 2, np.random.default_rng(5))
  grown = run_main(run['workdir'], *common, f'--out={tmp_path / "b.jsonl"}', mode='search',
                   config=None)
  assert grown.returncode == 0, grown.stderr[-3000:]
  assert '8 embedding(s) from the cache, 1 image(s) embedded' in grown.stdout
  assert '1 new vector(s) added to the 8 it held' in grown.stdout
  with open(tmp_path / 'a.jsonl') as f, open(tmp_path / 'b.jsonl') as g:
    before, after = [json.loads(x) for x in f], [json.loads(x) for x in g]
  new = str(gallery / 'bob_2' / 'new.jpg')
  for a, b in zip(before, after):
    assert [x for x in b['results'] if x['path'] != new] == a['results']
    assert new in [x['path'] for x in b['results']]


def test_search_with_npz_features_on_either_side(run, searched, tmp_path):
  """`--mode embed` files as the gallery (results named by their paths, drawn from them) or
  as the queries (no pictures): the image search's results and distances."""
  lay = run['lay']
  for split in ('query', 'gallery'):
    r = run_main(run['workdir'], f'--images={os.path.join(lay.data_dir, split)}',
                 f'--out={tmp_path / split}.npz', mode='embed', config=None)
    assert r.returncode == 0, r.stderr[-3000:]
  restored = {x['query']: x for x in searched[1]}
  for images, gallery, name in ((os.path.join(lay.data_dir, 'query'), tmp_path / 'gallery.npz',
                                 'g'), (tmp_path / 'query.npz', os.path.join(lay.data_dir,
                                                                             'gallery'), 'q')):
    r = run_main(run['workdir'], f'--images={images}', f'--gallery={gallery}', '--top_k=3',
                 f'--out={tmp_path / name}.jsonl', mode='search', config=None)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / f'{name}.jsonl') as f:
      records = [json.loads(line) for line in f]
    assert [x['query'] for x in records] == list(restored)
    for record in records:
      same = restored[record['query']]['results']
      assert [x['path'] for x in record['results']] == [x['path'] for x in same]
      np.testing.assert_allclose([x['distance'] for x in record['results']],
                                 [x['distance'] for x in same], atol=1e-5)
    drawn = [os.path.exists(x.get('picture', '')) for x in records]
    assert drawn == [name == 'g'] * len(records), r.stdout
