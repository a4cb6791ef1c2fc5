"""The Re-ID validation split (config.val_split > 0, dca_jax/data/reid_val.py): held-out train
identities, the same for every seed, as a val query/gallery that chooses `--checkpoint best`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import one_line_error, tiny_reid_config

from dca_jax import data, evaluate, evaluators, train
from dca_jax.data import reid_sources, reid_val


# ------------------------------------------------------------------------------ which identities
def test_held_out_ids_are_disjoint_from_train_and_the_same_for_every_seed():
  inputs = [data.build_input(tiny_reid_config(val_split=0.34, seed=seed, num_classes=6))
            for seed in (0, 1)]
  datasets = [inp.source.dataset for inp in inputs]
  val_ids = [sorted(set(ds.val['val_gallery'].pids.tolist())) for ds in datasets]
  assert val_ids[0] == val_ids[1] and len(val_ids[0]) == 2         # round(0.34 x 6)
  assert datasets[0].train_pids.tolist() == datasets[1].train_pids.tolist()
  assert not set(val_ids[0]) & set(datasets[0].train_pids.tolist())
  assert set(datasets[0].val['val_query'].pids.tolist()) <= set(val_ids[0])
  info = inputs[0].info
  assert info.num_classes == 4 and info.num_val_ids == 2
  assert info.train_pids == datasets[0].train_pids.tolist()
  assert sorted(set(datasets[0].train.pids.tolist())) == [0, 1, 2, 3]   # relabelled 0..n-1
  assert info.num_val == sum(len(split) for split in datasets[0].val.values())
  assert info.num_train + info.num_val == 48
  labels = next(inputs[0].train_iter())['label']
  assert labels.min() >= 0 and labels.max() <= 3


def test_held_out_ids_are_a_fixed_draw_of_at_least_one_never_all():
  pids = np.arange(10, 20)
  assert reid_val.held_out_ids(pids, 0.0).size == 0
  assert reid_val.held_out_ids(pids, 0.01).size == 1
  assert reid_val.held_out_ids(pids, 0.9).size == 9
  np.testing.assert_array_equal(reid_val.held_out_ids(pids, 0.3),
                                reid_val.held_out_ids(pids, 0.3))


# ------------------------------------------------------------------------------ query / gallery
def test_val_query_is_one_image_per_camera_and_every_query_has_a_cross_camera_match(market):
  ds = reid_sources.read_reid(market.dataset, market.data_dir)
  held = reid_val.hold_out(ds, 0.8)  # 4 of the 5 train ids
  query, gallery = held.val['val_query'], held.val['val_gallery']
  rows = {(p, pid, cam) for p, pid, cam in market.train if pid not in held.train_pids}
  val_rows = [set(zip(s.paths, s.pids.tolist(), s.camids.tolist())) for s in (query, gallery)]
  assert val_rows[0] | val_rows[1] == rows and not val_rows[0] & val_rows[1]
  for pid in {pid for _, pid, _ in rows}:
    cameras = sorted({cam for _, p, cam in rows if p == pid})
    q_cams = query.camids[query.pids == pid].tolist()
    assert len(q_cams) == len(set(q_cams))                       # one query per camera
    if len(cameras) < 2:
      assert not q_cams, pid                                      # one camera: gallery only
      continue
    assert q_cams, pid
    for cam in q_cams:  # a true match the Market rule keeps: same id, another camera
      assert np.any((gallery.pids == pid) & (gallery.camids != cam)), (pid, cam)
  # market's id 15: cameras 0, 0, 1, 1, 2 -> the first of camera 0 and of camera 1
  assert sorted(query.camids[query.pids == 15].tolist()) == [0, 1]
  assert held.train.pids.tolist() == list(np.searchsorted(held.train_pids, [
      pid for _, pid, _ in market.train if pid in held.train_pids]))


def _split(paths, pids, camids):
  return reid_sources.ReidSplit(list(paths), np.asarray(pids, np.int32),
                                np.asarray(camids, np.int32), 'test')


def _dataset(train, protocol='camera-aware'):
  empty = _split([], [], [])
  pids = np.unique(train.pids)
  train.pids = np.searchsorted(pids, train.pids).astype(np.int32)
  return reid_sources.ReidDataset('own', 'own', '/', train, empty, empty, pids,
                                  protocol=protocol)


def test_no_camera_identities_give_one_query_and_single_images_stay_in_the_gallery(tmp_path):
  paths = []
  for i in range(7):  # ids 1, 2 (one image), 3 (three images, two of them identical)
    paths.append(str(tmp_path / f'{i}.jpg'))
    with open(paths[-1], 'wb') as f:
      f.write(bytes([min(i, 5)]))  # 5.jpg and 6.jpg: the same image
  ds = _dataset(_split(paths, [1, 1, 2, 3, 3, 3, 3], [0] * 7), 'no-camera')
  held = reid_val.hold_out(ds, 0.9)  # 2 of 3 ids
  query, gallery = held.val['val_query'], held.val['val_gallery']
  assert len(np.unique(gallery.pids)) == 2
  for pid in np.unique(gallery.pids):
    images = int((gallery.pids == pid).sum() + (query.pids == pid).sum())
    assert (query.pids == pid).sum() == (images >= 2), pid
  rows = dict(zip(query.paths + gallery.paths, query.camids.tolist() + gallery.camids.tolist()))
  assert len(set(rows.values())) == len(rows) - (paths[6] in rows)  # camera = file content
  if paths[6] in rows:
    assert rows[paths[5]] == rows[paths[6]]


def test_held_out_ids_seen_by_one_camera_only_are_refused_in_one_line():
  ds = _dataset(_split([f'/{i}.jpg' for i in range(6)], [1, 1, 2, 2, 3, 3], [0, 0, 1, 1, 2, 2]))
  one_line_error(lambda: reid_val.hold_out(ds, 0.5), 'none has images from 2 cameras',
                 data.DataError)


# ------------------------------------------------------------------------------ streams, config
def test_val_streams_and_the_num_classes_check(market):
  config = tiny_reid_config(dataset=market.dataset, data_source='folder',
                            data_dir=market.data_dir, val_split=0.4, num_classes=5)
  inp = data.build_input(config)
  for split in reid_val.VAL_SPLITS:
    batches = list(inp.eval_iter(split=split))
    mask = np.concatenate([b['mask'] for b in batches]).astype(bool)
    pids = np.concatenate([b['label'] for b in batches])[mask]
    assert sorted(pids.tolist()) == sorted(inp.source.dataset.val[split].pids.tolist())
  assert inp.info.splits['val_query']['images'] == len(inp.source.dataset.val['val_query'])
  line = one_line_error(lambda: train._with_data_classes(config, inp.info),
                        r'has 3 train identities \(2 more held out by config.val_split\)')
  assert '--config.num_classes=3' in line
  plain = data.build_input(tiny_reid_config(dataset=market.dataset, data_source='folder',
                                            data_dir=market.data_dir, num_classes=5))
  one_line_error(lambda: plain.eval_iter(split='val_query'), 'with config.val_split > 0',
                 data.DataError)


def test_default_evals_choose_best_on_val_map():
  config = tiny_reid_config(val_split=0.3)
  assert evaluators.entries(config)['val'] == {'type': 'retrieval', 'split': 'val',
                                               'prefix': 'val/'}
  assert evaluators.best_metric(config) == 'val/mAP'
  assert evaluators.selected_on(config) == 'val' and evaluators.selection_warning(config) == ''
  assert 'val' not in evaluators.entries(tiny_reid_config())


# ------------------------------------------------------------------------------ a trained run
@pytest.mark.slow
def test_a_run_writes_val_map_and_best_is_selected_on_val(market, tmp_path):
  config = tiny_reid_config(dataset=market.dataset, data_source='folder',
                            data_dir=market.data_dir, val_split=0.4, num_classes=0, max_steps=2)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert any('eval/val/mAP' in r and 'eval/mAP' in r for r in records), records[-1]
  result = evaluate.run_eval(config, workdir, 'best', output='eval_best.json')
  with open(os.path.join(workdir, 'eval_best.json')) as f:
    assert json.load(f)['selected_on'] == 'val'
  assert result['selected_on'] == 'val' and 'val/mAP' in result
