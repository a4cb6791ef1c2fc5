"""Tests of the Re-ID input: readers of the official layouts and of identity folders (your own
data), the synthetic set, the P x K sampler, the train/query/gallery streams and their errors. Tiny JPEGs, 32 x 16 px input."""

from __future__ import annotations

import contextlib
import os
import shutil

import numpy as np
import pytest
from conftest import one_line_error

from dca_jax import checks, config_lib, data, predict
from dca_jax.data import preprocess, reid_sources, sampler, synthetic_reid

try:
  from tests import layouts, reid_layouts  # pylint: disable=g-import-not-at-top
except ImportError:
  import layouts  # pylint: disable=g-import-not-at-top
  import reid_layouts  # pylint: disable=g-import-not-at-top

H, W = 32, 16


def reid_config(**overrides):
  c = config_lib.base_config()
  c.task = 'reid'
  c.input_size, c.input_width = H, W
  c.batch_size, c.eval_batch_size, c.num_instances = 4, 4, 2
  c.crop_padding, c.random_erasing = 2, 0.5
  c.num_classes = 5
  c.dataset, c.data_source = 'synthetic_reid', 'synthetic'
  c.synthetic_num_train, c.synthetic_num_test, c.synthetic_image_size = 24, 40, 32
  for k, v in overrides.items():
    c[k] = v
  return c


def folder_config(lay, **overrides):
  return reid_config(**{'dataset': lay.dataset, 'data_source': 'folder',
                        'data_dir': lay.data_dir, 'num_classes': len(lay.train_pids),
                        **overrides})


# ------------------------------------------------------------------------------ readers
@pytest.mark.parametrize('name', ['market1501', 'dukemtmc', 'veri776', 'msmt17', 'msmt17_v2'])
def test_reader_matches_the_written_layout(name, tmp_path):
  lay = reid_layouts.write_reid_layout(name, tmp_path)
  ds = reid_sources.read_reid(lay.dataset, lay.data_dir)
  assert ds.version == lay.version
  assert ds.root == os.path.normpath(lay.root)
  for which in ('query', 'gallery'):
    split = getattr(ds, which)
    assert list(zip(split.paths, split.pids.tolist(), split.camids.tolist())) == \
        getattr(lay, which), which
  assert ds.train.paths == [p for p, _, _ in lay.train]
  assert ds.train.pids.tolist() == lay.train_labels
  assert ds.train.camids.tolist() == [c for _, _, c in lay.train]
  assert ds.train_pids.tolist() == lay.train_pids and ds.num_train_ids == len(lay.train_pids)
  assert ds.num_junk == lay.num_junk
  assert sorted(p for p, _ in ds.skipped) == lay.non_jpg
  assert all(r == reid_sources.NOT_JPG for _, r in ds.skipped)


def test_market_junk_dropped_distractors_kept_relabelled(market):
  inp = data.build_input(folder_config(market))
  info = inp.info
  assert (info.counted, info.version) == ('train identities', 'Market-1501')
  # Facts of the written layout (reid_layouts.TRAIN_IDS / TEST_IDS, 4 junk, 3 distractors).
  assert info.train_pids == [2, 7, 9, 15, 40] and info.num_classes == 5
  assert info.class_names == ['2', '7', '9', '15', '40']
  assert (info.num_train, info.num_query, info.num_gallery) == (15, 4, 9)
  assert info.num_test == 13 and info.num_junk == 4
  assert len(info.skipped_files) == 2  # Thumbs.db, readme.txt
  gallery = [r[1] for r in market.gallery]
  assert gallery.count(0) == 3 and -1 not in gallery
  assert -1 not in [r[1] for r in market.train + market.query]


def test_version_and_root_recorded_for_both_msmt17_versions(tmp_path):
  for v in (1, 2):
    lay = reid_layouts.write_msmt17(tmp_path / f'v{v}', version=v)
    info = data.build_input(folder_config(lay)).info
    assert info.version == f'MSMT17_V{v} (train+val)'
    # train + val merged: 4 ids, 10 images; test pid 0 is a real id (kept in the query).
    assert (info.num_classes, info.num_train) == (4, 10)
    assert info.train_pids == [0, 2, 4, 10]
    assert 0 in [pid for _, pid, _ in lay.query]
    assert info.num_query == len(lay.query) == 4


def test_layout_found_at_data_dir_itself(tmp_path):
  lay = reid_layouts.write_market1501(tmp_path, top='')
  ds = reid_sources.read_reid('market1501', str(tmp_path))
  assert ds.query.paths == [p for p, _, _ in lay.query]


# ------------------------------------------------------------------------------ verify_images
def test_unreadable_images_are_skipped_counted_and_named(tmp_path):
  lay = reid_layouts.write_market1501(tmp_path)
  bad_train, bad_gallery = lay.train[0][0], lay.gallery[1][0]
  reid_layouts.truncate_file(bad_train, 0.4)
  reid_layouts.write_non_image(bad_gallery)
  with pytest.warns(data.DataWarning) as rec:
    info = data.build_input(folder_config(lay)).info
  msg = ' '.join(str(w.message) for w in rec)
  assert 'skipped 2' in msg and bad_train in msg and bad_gallery in msg
  assert (info.num_train, info.num_gallery) == (len(lay.train) - 1, len(lay.gallery) - 1)
  assert len(info.skipped_files) == 2 + len(lay.non_jpg)
  assert any(bad_train in s for s in info.skipped_files)


# ------------------------------------------------------------------------------ sampler
def check_pk(labels, batch, p, k):
  groups = np.asarray(labels)[batch].reshape(p, k)
  assert (groups == groups[:, :1]).all(), groups       # K images of one identity each
  assert len(set(groups[:, 0].tolist())) == p, groups  # P different identities


def test_sampler_batches_are_p_by_k():
  labels = np.repeat(np.arange(12), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 3])
  s = sampler.PKSampler(labels, batch_size=12, num_instances=3, seed=5)
  # c_i = max(1, n_i // 3) = 1,1,1,1,1,2,2,2,3,3,1,1 -> 19 chunks, 4 per batch -> 4 batches.
  assert s.steps_per_epoch == 4
  for e in range(3):
    batches = s.epoch(e)
    assert batches.shape == (4, 12)
    for b in batches:
      check_pk(labels, b, 4, 3)
    # Identities with >= K images never repeat an image within an epoch.
    flat = batches.reshape(-1)
    many = flat[np.bincount(labels)[labels[flat]] >= 3]
    assert len(set(many.tolist())) == len(many)
  # An identity with 1 image (< K) is drawn with replacement: its group is that image K times.
  groups = np.concatenate([s.epoch(e).reshape(-1, 3) for e in range(6)])
  lone = groups[labels[groups[:, 0]] == 0]
  assert len(lone) and (lone == np.flatnonzero(labels == 0)[0]).all()


def test_sampler_epochs_are_pure_functions_of_seed_and_epoch():
  labels = np.repeat(np.arange(10), 6)
  a, b = sampler.PKSampler(labels, 8, 4, seed=1), sampler.PKSampler(labels, 8, 4, seed=1)
  np.testing.assert_array_equal(a.epoch(7), b.epoch(7))
  assert not np.array_equal(a.epoch(0), a.epoch(1))
  assert not np.array_equal(a.epoch(0), sampler.PKSampler(labels, 8, 4, seed=2).epoch(0))


def test_sampler_caps_an_identity_at_one_group_per_batch():
  # 40 images of id 0 = 10 chunks, ids 1 and 2: 1 chunk each. P = 2: only 2 batches can hold
  # two different identities (id 0 with id 1, id 0 with id 2).
  labels = np.repeat([0, 1, 2], [40, 4, 4])
  s = sampler.PKSampler(labels, batch_size=8, num_instances=4)
  assert s.steps_per_epoch == 2
  for e in range(5):
    for b in s.epoch(e):
      check_pk(labels, b, 2, 4)


@pytest.mark.parametrize('batch,k,hosts,whole', [(8, 2, 2, True), (12, 4, 2, False),
                                                 (16, 4, 4, True)])
def test_sampler_hosts_union_is_the_global_batch(batch, k, hosts, whole):
  labels = np.repeat(np.arange(9), 7)
  s = sampler.PKSampler(labels, batch, k, seed=3)
  idx, pos = s.host_epoch(2)
  parts = [s.host_epoch(2, p, hosts) for p in range(hosts)]
  hb = batch // hosts
  for step in range(s.steps_per_epoch):
    got = np.concatenate([i[step * hb:(step + 1) * hb] for i, _ in parts])
    np.testing.assert_array_equal(got, idx[step * batch:(step + 1) * batch])
    gpos = np.concatenate([q[step * hb:(step + 1) * hb] for _, q in parts])
    np.testing.assert_array_equal(gpos, np.arange(step * batch, (step + 1) * batch))
    if whole:  # Every host's share is whole identity groups.
      for i, _ in parts:
        check_pk(labels, i[step * hb:(step + 1) * hb], hb // k, k)


def test_sampler_errors():
  one_line_error(lambda: sampler.PKSampler(np.arange(20), 10, 4), 'batch_size=10.*'
                 'num_instances=4')
  one_line_error(lambda: sampler.PKSampler(np.repeat([0, 1, 2], 4), 16, 4),
                 r'3 identities \(3 of them with 4 or more images\), fewer than the 4 per batch')


# ------------------------------------------------------------------------------ train stream
def test_train_stream_pk_resume_and_hosts(market):
  cfg = folder_config(market, batch_size=4, num_instances=2)
  inp = data.build_input(cfg)
  # Written: ids with 5, 2, 1, 4, 3 images -> chunks of 2: 2, 1, 1, 2, 1 = 7 -> 3 batches of 2.
  assert inp.steps_per_epoch == 3
  it = inp.train_iter()
  stream = [next(it) for _ in range(2 * 3 + 2)]
  for b in stream:
    assert b['image'].shape == (4, H, W, 3) and b['image'].dtype == np.uint8
    assert b['label'].dtype == np.int32
    check_pk(b['label'], np.arange(4), 2, 2)
    assert set(b['label'].tolist()) <= set(range(5))
  for start in (2, 4):  # inside the first epoch; across the epoch boundary
    resumed = inp.train_iter(start_step=start)
    for want in stream[start:start + 2]:
      got = next(resumed)
      np.testing.assert_array_equal(got['image'], want['image'])
      np.testing.assert_array_equal(got['label'], want['label'])
  hosts = [data.build_input(cfg, p, 2).train_iter() for p in range(2)]
  for want in stream[:4]:
    parts = [next(h) for h in hosts]
    # Host p holds the contiguous slice p of the global batch (one identity group each here).
    np.testing.assert_array_equal(np.concatenate([p['label'] for p in parts]), want['label'])
    np.testing.assert_array_equal(np.concatenate([p['image'] for p in parts]), want['image'])


def test_train_augmentation_is_flip_pad_crop_of_the_eval_image(market):
  """With erasing off, a train image is the eval image (same resize), maybe mirrored, shifted by
  at most crop_padding with black borders; both uint8."""
  pad = 3
  cfg = folder_config(market, batch_size=4, num_instances=2, crop_padding=pad,
                      random_erasing=0.0, normalization='imagenet')
  inp = data.build_input(cfg)
  src = inp.source
  black = np.zeros(3, np.uint8)
  ids = inp.sampler.host_epoch(0)[0]
  batch = next(inp.train_iter())
  for j in range(4):
    ref = preprocess.reid_eval_transform(src.load('train', int(ids[j])), height=H,
                                         width=W).numpy()
    padded = np.broadcast_to(black, (H + 2 * pad, W + 2 * pad, 3)).copy()
    found = False
    for cand in (ref, ref[:, ::-1]):
      padded[pad:pad + H, pad:pad + W] = cand
      for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
          if np.array_equal(padded[dy:dy + H, dx:dx + W], batch['image'][j]):
            found = True
    assert found, f'train image {j} is not a flip/shift of its eval image'


@pytest.mark.parametrize('fill', ['mean', 'random'])
def test_random_erasing_area_and_fill(fill):
  import tensorflow as tf
  img = tf.fill((64, 32, 3), 5.0)
  areas = []
  for n in range(24):
    key = tf.constant([n, 7], tf.int64)
    out = preprocess.random_erase(img, key, 1.0, fill).numpy()
    erased = (out != 5.0).any(-1)
    np.testing.assert_array_equal(out, preprocess.random_erase(img, key, 1.0, fill).numpy())
    if erased.any():
      ys, xs = np.nonzero(erased)
      box = erased[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
      assert box.all(), 'the erased region is not one rectangle'
      areas.append(box.size / erased.size)
      if fill == 'mean':   # the ImageNet mean colour, 0 once normalised
        np.testing.assert_allclose(out[erased], np.broadcast_to(
            255 * np.array([0.485, 0.456, 0.406]), out[erased].shape), rtol=1e-6)
      else:                # N(0, 1) once normalised: mean ~0, std ~1 (clipped at the tails)
        z = preprocess.normalize(out[erased][None], 'imagenet')[0]
        if z.size > 300:
          assert abs(z.mean()) < 0.2 and 0.7 < z.std() < 1.1
  assert len(areas) >= 18  # probability 1: nearly always (unless no draw fits)
  assert 0.012 <= min(areas) and max(areas) <= 0.43  # 2-40 %, up to side rounding
  assert (preprocess.random_erase(img, tf.constant([1, 2], tf.int64), 0.0, fill).numpy()
          == 5.0).all()


def test_train_stream_random_erasing_changes_images(market):
  base = folder_config(market, crop_padding=0, random_erasing=0.0, normalization='imagenet',
                       random_erasing_fill='mean')
  plain = next(data.build_input(base).train_iter())['image']
  base['random_erasing'] = 1.0
  erased = next(data.build_input(base).train_iter())['image']
  diff = (plain != erased).any(-1)
  assert diff.any(axis=(1, 2)).sum() >= 3
  np.testing.assert_array_equal(  # the mean colour, as uint8
      erased[diff], np.broadcast_to(np.round(255 * np.array([0.485, 0.456, 0.406])),
                                    erased[diff].shape))


# ------------------------------------------------------------------------------ eval streams
@pytest.mark.parametrize('eval_batch,hosts', [(3, 1), (4, 2), (20, 2)])
def test_eval_streams_count_every_image_once(market, eval_batch, hosts):
  cfg = folder_config(market, eval_batch_size=eval_batch)
  for split in ('query', 'gallery'):
    want = [(i, pid, cam) for i, (_, pid, cam) in enumerate(getattr(market, split))]
    union, counts = [], []
    for p in range(hosts):
      inp = data.build_input(cfg, p, hosts)
      n = 0
      for b in inp.eval_iter(split=split):
        n += 1
        assert b['image'].shape == (eval_batch // hosts, H, W, 3)
        assert set(b) == {'image', 'label', 'camid', 'mask', 'index'}
        m = b['mask']
        union += list(zip(b['index'][m].tolist(), b['label'][m].tolist(),
                          b['camid'][m].tolist()))
        assert (b['index'][~m] == -1).all() and (b['label'][~m] == -1).all()
        assert (b['image'][~m] == 0).all()
      assert n == inp.eval_steps_per_split[split]
      counts.append(n)
    assert len(set(counts)) == 1
    assert sorted(union) == want


def test_eval_images_are_resized_and_normalised(market):
  from PIL import Image
  cfg = folder_config(market, normalization='inception')
  batch = next(data.build_input(cfg).eval_iter(split='query'))
  for j in range(2):
    with Image.open(market.query[j][0]) as im:
      ref = np.asarray(im.convert('RGB').resize((W, H), Image.BILINEAR), np.float32)
    assert batch['image'][j].shape == (H, W, 3)
    assert batch['image'].dtype == np.uint8      # normalised on the device, not here
    assert np.abs(batch['image'][j] - ref).mean() < 0.06 * 127.5
    img = data.load_image_for_eval(market.query[j][0], predict.eval_transform(cfg))
    np.testing.assert_array_equal(img, batch['image'][j])


def test_reid_eval_needs_a_split(market):
  inp = data.build_input(folder_config(market))
  one_line_error(lambda: inp.eval_iter(), "split='query' or split='gallery'")


# ------------------------------------------------------------------------------ FGVC width
def fgvc_config(**overrides):
  c = config_lib.base_config()
  c.input_size, c.resize_size, c.batch_size, c.eval_batch_size = 32, 40, 4, 4
  c.synthetic_num_train, c.synthetic_num_test, c.synthetic_image_size = 8, 4, 48
  c.num_classes = 3
  for k, v in overrides.items():
    c[k] = v
  return c


def test_fgvc_input_width_crops_a_rectangle():
  inp = data.build_input(fgvc_config(input_width=24))  # 32 x 24 from the 40 x 40 resize
  assert next(inp.train_iter())['image'].shape == (4, 32, 24, 3)
  centre = next(inp.eval_iter())['image']
  assert centre.shape == (4, 32, 24, 3)
  full = next(data.build_input(fgvc_config(input_size=40, test_crop='resize')).eval_iter())
  np.testing.assert_array_equal(centre, full['image'][:, 4:36, 8:32])
  assert next(data.build_input(fgvc_config()).train_iter())['image'].shape == (4, 32, 32, 3)
  one_line_error(lambda: checks.checked(fgvc_config(input_width=48)),
                 'input_width=48 exceeds config.resize_size=40')


# ------------------------------------------------------------------------------ synthetic
SYN = dict(num_classes=4, synthetic_num_train=24, synthetic_num_test=40,
           synthetic_image_size=32)


def test_synthetic_reid_market_layout_counts_and_protocol(tmp_path):
  cfg = reid_config(data_dir=str(tmp_path), **SYN)
  inp = data.build_input(cfg)
  info = inp.info
  folder = info.root
  assert os.path.dirname(folder) == str(tmp_path)
  assert sorted(os.listdir(folder)) == ['bounding_box_test', 'bounding_box_train', 'query',
                                        synthetic_reid.MARKER]
  assert info.version.startswith('synthetic_reid (Market-1501 layout')
  assert info.num_classes == 4 and info.num_train == 24
  assert info.num_query + info.num_gallery == 40
  names = {d: os.listdir(os.path.join(folder, d))
           for d in ('bounding_box_train', 'query', 'bounding_box_test')}
  pid = lambda n: int(n.split('_')[0])
  assert len(names['bounding_box_train']) == 24
  # Distractors (0000) and junk (-1) in the gallery folder; junk not counted by the reader.
  assert sum(pid(n) == 0 for n in names['bounding_box_test']) >= 1
  junk = sum(pid(n) == -1 for n in names['bounding_box_test'])
  assert junk >= 1 and info.num_junk == junk
  assert len(names['query']) + len(names['bounding_box_test']) - junk == 40
  train_ids = {pid(n) for n in names['bounding_box_train']}
  query_ids = {pid(n) for n in names['query']}
  assert len(train_ids) == 4 and not train_ids & query_ids  # test ids are unseen ids
  cam = lambda n: int(n.split('_')[1][1])
  for q in names['query']:  # a match in another camera exists for every query
    assert any(pid(g) == pid(q) and cam(g) != cam(q) for g in names['bounding_box_test'])
  b = next(inp.train_iter())
  assert b['image'].shape == (4, H, W, 3)


def test_synthetic_reid_is_deterministic_cached_and_atomic(tmp_path):
  a = data.build_input(reid_config(data_dir=str(tmp_path / 'a'), **SYN)).info.root
  b = data.build_input(reid_config(data_dir=str(tmp_path / 'b'), **SYN)).info.root
  assert os.path.basename(a) == os.path.basename(b)
  files = lambda root: sorted(os.path.relpath(os.path.join(d, f), root)
                              for d, _, fs in os.walk(root) for f in fs)
  assert files(a) == files(b)
  for f in files(a):
    if f.endswith('.jpg'):
      assert open(os.path.join(a, f), 'rb').read() == open(os.path.join(b, f), 'rb').read()
  mtime = os.path.getmtime(os.path.join(a, synthetic_reid.MARKER))
  again = data.build_input(reid_config(data_dir=str(tmp_path / 'a'), **SYN)).info.root
  assert again == a and os.path.getmtime(os.path.join(a, synthetic_reid.MARKER)) == mtime
  assert os.listdir(tmp_path / 'a') == [os.path.basename(a)]  # no temp folder left behind
  # the training seed does not change the data; the generation seed does
  same = data.build_input(reid_config(data_dir=str(tmp_path / 'a'), seed=1, **SYN)).info.root
  assert same == a
  other = data.build_input(reid_config(data_dir=str(tmp_path / 'a'), synthetic_seed=1,
                                       **SYN)).info.root
  assert other != a


def test_retrieval_map_on_a_constructed_case():
  # Query pid 1 cam 0; gallery: [pid 1 cam 0 (ignored), pid 2, pid 1 cam 1, pid 1 cam 2].
  dist = np.asarray([[0.0, 1.0, 2.0, 3.0]])
  m, r1 = synthetic_reid.retrieval_map(dist, np.asarray([1]), np.asarray([0]),
                                       np.asarray([1, 2, 1, 1]), np.asarray([0, 0, 1, 2]))
  assert r1 == 0.0 and m == pytest.approx((1 / 2 + 2 / 3) / 2)


# ------------------------------------------------------------------------------ errors
def test_missing_data_dir_and_layout(tmp_path):
  one_line_error(lambda: data.build_input(reid_config(dataset='market1501',
                                                      data_source='folder', data_dir='')),
                 'data_dir is empty')
  one_line_error(lambda: data.build_input(reid_config(
      dataset='veri776', data_source='folder', data_dir=str(tmp_path / 'nope'))),
                 'does not exist.*nope')
  one_line_error(lambda: reid_sources.read_reid('market1501', str(tmp_path)),
                 'Market-1501 layout not found.*bounding_box_train')


def test_wrong_layout_is_named(tmp_path):
  reid_layouts.write_veri776(tmp_path)
  msg = one_line_error(lambda: reid_sources.read_reid('market1501', str(tmp_path)),
                       'Market-1501 layout not found')
  assert "VeRi-776 layout in" in msg and "config.dataset='veri776'" in msg
  duke = reid_layouts.write_dukemtmc(tmp_path / 'd')
  one_line_error(lambda: reid_sources.read_reid('market1501', duke.root),
                 r'_c\d_f\d+\.jpg: file name does not parse as Market-1501')


def test_missing_split_folder(tmp_path):
  lay = reid_layouts.write_market1501(tmp_path)
  os.rename(os.path.join(lay.root, 'query'), os.path.join(lay.root, 'queries'))
  one_line_error(lambda: reid_sources.read_reid('market1501', lay.data_dir),
                 f'missing folder {os.path.join(lay.root, "query")}')


@pytest.mark.parametrize('folder,name,pid,pattern', [
    ('bounding_box_test', 'IMG_0001.jpg', 1, 'IMG_0001.jpg: file name does not parse'),
    ('query', '0003_c9s1_000001_01.jpg', 3, '0003_c9s1_000001_01.jpg: camera 9 outside 1..6'),
    ('query', '0777_c1s1_000001_01.jpg', 777,
     'query id 777 .*0777_c1s1_000001_01.jpg.*no image in the gallery'),
], ids=['unparsable_file_name', 'camera_out_of_range', 'query_id_absent_from_gallery'])
def test_one_bad_file_is_named_in_one_line(tmp_path, folder, name, pid, pattern):
  lay = reid_layouts.write_market1501(tmp_path)
  reid_layouts.write_jpeg(os.path.join(lay.root, folder, name), pid, np.random.default_rng(0))
  one_line_error(lambda: reid_sources.read_reid('market1501', lay.data_dir), pattern)


@pytest.mark.parametrize('folder', ['bounding_box_train', 'query'])
def test_empty_split(tmp_path, folder):
  lay = reid_layouts.write_market1501(tmp_path)
  d = os.path.join(lay.root, folder)
  for f in os.listdir(d):
    if not f.startswith('-1'):  # junk only: empty once junk is dropped
      os.remove(os.path.join(d, f))
  which = 'train' if folder == 'bounding_box_train' else 'query'
  one_line_error(lambda: reid_sources.read_reid('market1501', lay.data_dir),
                 f'the {which} split is empty: .*{folder}')


def test_msmt17_errors(tmp_path):
  v1 = reid_layouts.write_msmt17(tmp_path, version=1)
  reid_layouts.write_msmt17(tmp_path, version=2)
  one_line_error(lambda: reid_sources.read_reid('msmt17', str(tmp_path)),
                 'both MSMT17 versions found.*MSMT17_V1.*MSMT17_V2')
  lst = os.path.join(v1.root, 'list_query.txt')
  with open(lst, 'a') as f:
    f.write('0003/0003_009_02_0303morning_0001_0.jpg\n')
  one_line_error(lambda: reid_sources.read_reid('msmt17', v1.root),
                 r'list_query.txt:5: expected "<relative/path.jpg> <pid>"')
  val = os.path.join(v1.root, 'list_val.txt')
  os.remove(val)
  one_line_error(lambda: reid_sources.read_reid('msmt17', v1.root), f'missing list file: {val}')


def test_msmt17_missing_image_is_named(tmp_path):
  lay = reid_layouts.write_msmt17(tmp_path)
  os.remove(lay.gallery[0][0])
  one_line_error(lambda: reid_sources.read_reid('msmt17', lay.data_dir),
                 'list_gallery.txt lists 1 image.*do not exist')


def _checked_input(config):
  """What a mode does: the config checked at the entry, then the input built."""
  return data.build_input(checks.checked(config))


def test_config_errors(market):
  one_line_error(lambda: _checked_input(folder_config(market, batch_size=6,
                                                        num_instances=4)),
                 'batch_size=6 is not a multiple of config.num_instances=4')
  one_line_error(lambda: _checked_input(folder_config(market, batch_size=12,
                                                        num_instances=2)),
                 r'5 identities \(\d+ of them with 2 or more images\), fewer than the 6 per batch')
  one_line_error(lambda: _checked_input(reid_config(dataset='cub')),
                 "dataset='cub' is not a reid dataset")
  one_line_error(lambda: _checked_input(reid_config(task='fgvc')),
                 "dataset='synthetic_reid' is not a fgvc dataset.*task='reid'")
  one_line_error(lambda: _checked_input(reid_config(data_source='folder')),
                 "synthetic_reid' needs data_source='synthetic'")
  one_line_error(lambda: _checked_input(folder_config(market, data_source='tfds')),
                 "set data_source='folder'")
  one_line_error(lambda: _checked_input(reid_config(random_erasing=1.5)),
                 'random_erasing=1.5')
  one_line_error(lambda: _checked_input(reid_config(synthetic_num_test=10)),
                 'synthetic_num_test=10 is too small')


# ------------------------------------------------------------------------------ your own data
@pytest.mark.parametrize('cameras', [False, True])
def test_identity_folders_read_back_with_and_without_cameras(cameras, tmp_path):
  lay = reid_layouts.write_reid_folder(str(tmp_path), cameras=cameras)
  dataset = reid_sources.read_reid('reid_folder', lay.data_dir)
  number = {name: i + 1 for i, name in enumerate(lay.identities)}
  for which in ('train', 'query', 'gallery'):
    split = getattr(dataset, which)
    assert split.paths == [p for p, _ in lay.splits[which]], which
  assert dataset.identity_names == lay.identities
  assert dataset.train_pids.tolist() == sorted(number[n] for n in ('Ada', 'bob_2', 'Cy'))
  assert dataset.query.pids.tolist() == [number[n] for _, n in lay.splits['query']]
  assert dataset.gallery.pids.tolist() == [number[n] for _, n in lay.splits['gallery']]
  assert any(reason == reid_sources.NOT_IMAGE for _, reason in dataset.skipped)
  q, g = (dataset.query.paths.index(lay.duplicate[0]), dataset.gallery.paths.index(lay.duplicate[1]))
  if cameras:
    assert dataset.protocol == 'camera-aware'
    labels = sorted(set(lay.cameras.values()))
    assert dataset.gallery.camids.tolist() == [labels.index(lay.cameras[p])
                                               for p, _ in lay.splits['gallery']]
  else:  # no cameras: one camera id per distinct file, so only the identical file is junk
    assert dataset.protocol == 'no-camera'
    camids = np.concatenate([dataset.query.camids, dataset.gallery.camids])
    assert dataset.query.camids[q] == dataset.gallery.camids[g]
    assert len(set(camids.tolist())) == len(camids) - 1


def test_identity_folders_through_the_pipeline_record_the_protocol(tmp_path):
  lay = reid_layouts.write_reid_folder(str(tmp_path))
  inp = data.build_input(reid_config(dataset='reid_folder', data_source='folder',
                                     data_dir=lay.data_dir, num_classes=3, batch_size=4,
                                     num_instances=2))
  assert inp.info.protocol == 'no-camera' and inp.info.num_classes == 3
  assert inp.info.splits['query'] == {'images': 4, 'identities': 4}
  assert inp.info.splits['gallery'] == {'images': 8, 'identities': 4}


@pytest.mark.parametrize('case,match', [
    ('empty_split', r'the gallery split is empty'),
    ('no_image_folder', r'identity folder .*train/Cy holds no image'),
    ('loose_file', r'train/stray.jpg: images go in identity folders'),
    ('unreadable_identity', r'identity folder .*train/bob_2 holds no readable image'),
    ('camera_row_missing_file', r'cameras.csv:2: train/nobody/0.jpg does not exist'),
    ('camera_missing_row', r'cameras.csv has no row for .*: every image needs its camera'),
    ('one_identity', r'has 1 identity: training needs at least 2'),
])
def test_bad_identity_folders_are_one_line_each(case, match, tmp_path):
  lay = reid_layouts.write_reid_folder(str(tmp_path), cameras=case.startswith('camera'))
  root = lay.data_dir
  if case == 'empty_split':
    shutil.rmtree(os.path.join(root, 'gallery'))
    os.makedirs(os.path.join(root, 'gallery'))
  elif case == 'no_image_folder':
    for name in os.listdir(os.path.join(root, 'train', 'Cy')):
      os.remove(os.path.join(root, 'train', 'Cy', name))
  elif case == 'loose_file':
    shutil.copy(lay.splits['train'][0][0], os.path.join(root, 'train', 'stray.jpg'))
  elif case == 'unreadable_identity':
    for path, name in lay.splits['train']:
      if name == 'bob_2':
        layouts.truncate_file(path, 0.3)
  elif case == 'camera_row_missing_file':
    with open(os.path.join(root, 'cameras.csv')) as f:
      rows = f.read().splitlines()
    rows.insert(1, 'train/nobody/0.jpg,cam1')
    with open(os.path.join(root, 'cameras.csv'), 'w') as f:
      f.write('\n'.join(rows) + '\n')
  elif case == 'camera_missing_row':
    with open(os.path.join(root, 'cameras.csv')) as f:
      rows = f.read().splitlines()
    with open(os.path.join(root, 'cameras.csv'), 'w') as f:
      f.write('\n'.join(rows[:-1]) + '\n')
  elif case == 'one_identity':
    for name in ('bob_2', 'Cy'):
      shutil.rmtree(os.path.join(root, 'train', name))
  with pytest.warns() if case == 'unreadable_identity' else contextlib.nullcontext():
    one_line_error(lambda: reid_sources.read_reid('reid_folder', root), match)
  assert not os.path.exists(os.path.join(root, 'checkpoints'))  # nothing written
