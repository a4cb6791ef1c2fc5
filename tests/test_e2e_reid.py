"""Re-ID end to end: a tiny DCAL trains with SGD (the Re-ID recipe's optimizer) on the synthetic
Re-ID set (Market-1501 files), its checkpoint is restored and evaluated with the standard
protocol; the features, the padding and the metrics are checked against computations that do
not go through the Evaluator; a run resumed from its middle checkpoint ends where it ended."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import count_build, run_main, tiny_reid_config

from dca_jax import data, drawing, evaluate, evaluators, inference, train, visualize
from dca_jax.data import preprocess
from dca_jax.evaluators import retrieval
from dca_jax.models import dcal
from dca_jax.reid import evaluate as reid_evaluate
from dca_jax.reid import metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  count_build('test_e2e_reid.run')
  root = tmp_path_factory.mktemp('reid')
  # SGD with momentum and coupled L2 decay; a save at step 3 for the resume test
  config = tiny_reid_config(max_steps=6, save_every_steps=3, optimizer='sgd',
                            data_dir=str(root / 'data'))
  workdir = str(root / 'run')
  trained = train.train_and_evaluate(config, workdir)
  return config, workdir, trained


def _files(folder):
  """(pid, camid) of the images in a Market-1501 folder, junk (-1) left out: read by hand."""
  out = []
  for name in sorted(os.listdir(folder)):
    if name.endswith('.jpg'):
      pid, cam = name.split('_')[:2]
      if int(pid) != -1:
        out.append((int(pid), int(cam[1]) - 1))
  return out


def test_train_then_eval_reports_the_protocol_on_every_image(run):
  config, workdir, trained = run
  result = evaluate.run_eval(config, workdir)
  with open(os.path.join(workdir, 'eval.json')) as f:
    saved = json.load(f)
  for key in ('mAP', 'rank1', 'rank5', 'rank10', 'mINP', 'num_query', 'num_gallery',
              'num_skipped', 'pixel_baseline_mAP', 'dataset_version', 'step'):
    assert key in saved, key
  # the restored model = the trained one: every figure, not only mAP
  for key in ('mAP', 'rank1', 'rank5', 'rank10', 'mINP', 'num_skipped', 'pixel_baseline_mAP'):
    assert saved[key] == pytest.approx(trained[key], abs=1e-6), key
  assert saved['step'] == 6 and 'Market-1501 layout' in saved['dataset_version']
  root = data.build_input(config, with_train=False).info.root
  assert result['num_query'] == len(_files(os.path.join(root, 'query')))
  assert result['num_gallery'] == len(_files(os.path.join(root, 'bounding_box_test')))


def test_embedded_query_and_gallery_evaluate_as_eval(run, tmp_path):
  """`--mode embed` of the query folder and of the gallery folder (ids and cameras from the
  Market-1501 names; the gallery's junk written with id -1, its distractors with id 0), then
  reid.evaluate on the two files: eval.json's figures (its junk left out as the reader does)."""
  config, workdir, _ = run
  evaluate.run_eval(config, workdir)
  with open(os.path.join(workdir, 'eval.json')) as f:
    saved = json.load(f)
  root = data.build_input(config, with_train=False).info.root
  splits = {}
  for split, folder in (('query', 'query'), ('gallery', 'bounding_box_test')):
    out = str(tmp_path / f'{split}.npz')
    r = run_main(workdir, f'--images={os.path.join(root, folder)}', f'--out={out}',
                 mode='embed', config=None)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'ids and cameras from Market-1501 file names' in r.stdout
    splits[split] = reid_evaluate.load_split(out)
  gallery_ids = splits['gallery']['ids']
  assert (gallery_ids == -1).sum() > 0 and (gallery_ids == 0).sum() > 0   # junk, distractors
  record = reid_evaluate.evaluate(splits['query'], splits['gallery'])
  assert record['protocol'] == 'camera-aware'
  for key in ('num_query', 'num_gallery', 'num_skipped'):
    assert record[key] == saved[key], key
  for key in ('mAP', 'rank1'):
    assert record[key] == pytest.approx(saved[key], abs=1e-4), key


def _state(workdir, step):
  """{path: array} of the whole train state saved at `step` (params, neck statistics, SGD
  momentum, counters)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  from dca_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  ck = ckpt_lib.Checkpointer(str(workdir), read_only=True)
  restored = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  ck.close()
  return {jax.tree_util.keystr(path, simple=True, separator='/'): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(restored['state'])}


def test_resume_from_the_middle_equals_the_whole_run(run, tmp_path):
  """As if killed after the save of step 3: the resumed run (P x K sampler, partners, necks'
  statistics, SGD momentum) ends at the state and the figures of the uninterrupted one."""
  config, workdir, trained = run
  copy = tmp_path / 'killed'
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / 'checkpoints' / '6')
  resumed = train.train_and_evaluate(config, str(copy))
  whole, again = _state(workdir, 6), _state(copy, 6)
  assert whole.keys() == again.keys()
  assert any('batch_stats' in k for k in whole) and any('trace' in k for k in whole)  # momentum
  for key in whole:
    np.testing.assert_allclose(again[key], whole[key], rtol=1e-6, atol=1e-7, err_msg=key)
  middle = _state(workdir, 3)
  moved = max(np.abs(whole[k] - middle[k]).max() for k in whole if 'params' in k)
  assert moved > 0  # steps 4-6 changed the weights: the comparison is not of two copies
  for key in ('mAP', 'rank1', 'mINP'):
    assert resumed[key] == pytest.approx(trained[key], abs=1e-6), key


def test_features_and_metrics_equal_an_independent_computation(run):
  """Features straight from model.apply on the eval stream (not the jitted, sharded Evaluator),
  L2-normalised in numpy; mAP/CMC from evaluate_rank on a float64 distance matrix."""
  config, workdir, _ = run
  restored = inference.load_for_inference(config, workdir)
  assert set(restored.variables) == {'params', 'batch_stats'}   # the necks' statistics restored
  input_data = data.build_input(config, with_train=False)
  evaluator = retrieval.Evaluator(evaluators.Context(
      config, restored.model, input_data, restored.mesh, restored.variables_sharding,
      restored.dtype))
  apply = jax.jit(restored.model.apply)
  mine = {}
  for split in ('query', 'gallery'):
    feats, pids, cams, seen = [], [], [], []
    for batch in input_data.eval_iter(split=split):
      keep = np.asarray(batch['mask'], bool)
      images = preprocess.normalize(batch['image'][keep], config)   # numpy, on the host
      out = apply(jax.device_get(restored.variables), images)
      f = np.asarray(dcal.reid_feature(out), np.float64)   # before the neck (reid_feature)
      feats.append(f / np.linalg.norm(f, axis=1, keepdims=True))
      pids.append(batch['label'][keep])
      cams.append(batch['camid'][keep])
      seen += list(batch['index'][keep])
    assert sorted(seen) == list(range(len(seen)))          # every image once, padding dropped
    got = evaluator.features(restored.variables, split)
    np.testing.assert_allclose(got['feature'], np.concatenate(feats), atol=2e-5)
    np.testing.assert_array_equal(got['pid'], np.concatenate(pids))
    mine[split] = (np.concatenate(feats), np.concatenate(pids), np.concatenate(cams))
  (qf, qp, qc), (gf, gp, gc) = mine['query'], mine['gallery']
  dist = ((qf[:, None, :] - gf[None, :, :]) ** 2).sum(-1)
  cmc, m_ap, m_inp = metrics.evaluate_rank(dist, qp, gp, qc, gc)
  result = dict(evaluator.run(restored.variables))
  assert result['mAP'] == pytest.approx(m_ap, abs=1e-6)
  assert result['mINP'] == pytest.approx(m_inp, abs=1e-6)
  assert result['rank1'] == pytest.approx(cmc[0], abs=1e-6)


def test_flip_and_after_bn_features(run):
  config, workdir, _ = run
  restored = inference.load_for_inference(config, workdir)
  input_data = data.build_input(config, with_train=False)
  batch = next(input_data.eval_iter(split='query'))
  variables = jax.device_get(restored.variables)
  flip_config = config.copy_and_resolve_references()
  flip_config.reid_feature, flip_config.reid_flip_test, flip_config.reid_normalize = (
      'after_bn', True, False)
  flipped = inference.forward_fn(restored.model, flip_config, np.float32, ('feature',))(
      variables, batch['image'])['feature']
  images = preprocess.normalize(batch['image'], config)
  out = restored.model.apply(variables, images)
  out_mirror = restored.model.apply(variables, images[:, :, ::-1])
  want = 0.5 * (dcal.reid_feature(out, after_bn=True)
                + dcal.reid_feature(out_mirror, after_bn=True))
  np.testing.assert_allclose(flipped, want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(dcal.reid_feature(out, after_bn=True), dcal.reid_feature(out))


def test_visualize_draws_rankings_with_frames(run):
  config, workdir, _ = run
  written = visualize.run_visualize(config, workdir, num_images=2)
  assert len(written) == 2 and all(os.path.basename(p).startswith('query_') for p in written)
  with pytest.raises(ValueError, match='Re-ID'):
    visualize.run_visualize(config, workdir, images=['a.jpg'])


def test_ranking_picture_frames_matches_green_and_others_red():
  query = np.full((32, 16, 3), 100, np.uint8)
  picture = visualize.ranking_picture(query, query, [query, query], [True, False])
  h = drawing.RANK_PANEL_HEIGHT
  assert picture.shape[0] == h
  first = 2 * (h // 2) + 2 + drawing.RANK_GAP        # x of the first gallery frame
  assert tuple(picture[0, first]) == drawing.GREEN
  second = first + (h - 2 * drawing.RANK_FRAME) // 2 + 2 * drawing.RANK_FRAME + 2
  assert tuple(picture[h // 2, second]) == drawing.RED
