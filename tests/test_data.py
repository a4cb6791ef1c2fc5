"""Tests of dca_jax.data: layouts, TFDS (mocked), synthetic, determinism, resume, eval padding,
robustness and errors. Tiny images (32-72 px), input_size 32, resize_size 40."""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import data_config, folder_config
from PIL import Image

from dca_jax import data, predict
from dca_jax.data import preprocess

try:
  from tests import layouts  # pylint: disable=g-import-not-at-top
except ImportError:
  import layouts  # pylint: disable=g-import-not-at-top


def eval_records(inp):
  """(index, label) of every masked-in eval element, and the number of batches."""
  seen, n = [], 0
  for batch in inp.eval_iter(with_index=True):
    n += 1
    assert batch['image'].shape[1:] == (inp.input_size, inp.input_size, 3)
    m = batch['mask']
    seen += list(zip(batch['index'][m].tolist(), batch['label'][m].tolist()))
    assert (batch['index'][~m] == -1).all()
  return seen, n


def one_epoch_labels(inp):
  it = inp.train_iter()
  return [l for _ in range(inp.steps_per_epoch) for l in next(it)['label'].tolist()]


# ------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize('dataset', ['cub', 'aircraft', 'cars'])
def test_folder_layout_counts_labels_names(dataset, tmp_path, cub):
  lay = cub if dataset == 'cub' else layouts.write_layout(dataset, tmp_path)
  inp = data.build_input(folder_config(lay))
  assert inp.info.class_names == lay.class_names
  assert inp.info.num_classes == lay.num_classes
  assert (inp.info.num_train, inp.info.num_test) == (len(lay.train), len(lay.test))
  assert inp.steps_per_epoch == len(lay.train) // 4
  # Eval: in file order, every test image once with its label.
  seen, _ = eval_records(inp)
  assert seen == [(i, l) for i, (_, l) in enumerate(lay.test)]
  # Train: one epoch is a permutation of (a batch-multiple of) the train labels.
  got = collections.Counter(one_epoch_labels(inp))
  want = collections.Counter(l for _, l in lay.train)
  assert sum(got.values()) == inp.steps_per_epoch * 4
  assert all(got[k] <= want[k] for k in got)
  # The loader's table equals what was written, in order.
  src = inp.source
  assert [p.decode() for p in src.paths['test'].numpy()] == [p for p, _ in lay.test]


def test_cars_mat_files_have_the_devkit_layout(tmp_path):
  import scipy.io
  lay = layouts.write_cars_layout(tmp_path)
  ann = scipy.io.loadmat(os.path.join(lay.root, 'devkit', 'cars_train_annos.mat'))['annotations']
  assert ann.shape == (1, len(lay.train))
  assert set(ann.dtype.names) == {'bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2', 'class', 'fname'}
  meta = scipy.io.loadmat(os.path.join(lay.root, 'devkit', 'cars_meta.mat'))['class_names']
  assert meta.shape == (1, lay.num_classes)


def test_aircraft_banner_is_cropped(tmp_path):
  lay = layouts.write_aircraft_layout(tmp_path, num_classes=2, train_per_class=2,
                                      test_per_class=1)
  inp = data.build_input(folder_config(lay))
  for k, (path, _) in enumerate(lay.train):
    img = inp.source.load('train', k).numpy()
    w, h = Image.open(path).size
    assert img.shape == (h - layouts.AIRCRAFT_BANNER_PX, w, 3)
    magenta = (img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] > 200)
    assert magenta.mean(axis=1).max() < 0.5, 'a banner row survived the crop'
    # The original does have the banner in its last 20 rows.
    orig = np.asarray(Image.open(path).convert('RGB'))
    assert (np.abs(orig[-layouts.AIRCRAFT_BANNER_PX:].astype(int) - layouts.BANNER_RGB)
            .max(axis=-1) < 40).mean() > 0.9


# ------------------------------------------------------------------------------ TFDS
@pytest.mark.parametrize('dataset,num_classes', [('cub', 200), ('cars', 196)])
def test_tfds_mock(dataset, num_classes, tmp_path, monkeypatch):
  monkeypatch.setenv('DCA_JAX_OFFLINE', '0')  # the mock prepares nothing: no look-up
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=9):
    inp = data.build_input(data_config(dataset=dataset, data_source='tfds',
                                       data_dir=str(tmp_path), num_classes=num_classes))
    assert inp.info.num_classes == num_classes == len(inp.info.class_names)
    assert (inp.info.num_train, inp.info.num_test) == (9, 9)
    assert inp.steps_per_epoch == 2
    it = inp.train_iter()
    batches = [next(it) for _ in range(5)]
    for b in batches:
      assert b['image'].shape == (4, 32, 32, 3) and b['image'].dtype == np.uint8
      assert b['label'].dtype == np.int32 and ((0 <= b['label']) & (b['label'] < num_classes)).all()
    resumed = inp.train_iter(start_step=3)
    for want in batches[3:]:
      got = next(resumed)
      np.testing.assert_array_equal(got['image'], want['image'])
      np.testing.assert_array_equal(got['label'], want['label'])
    ev = list(inp.eval_iter())
    assert len(ev) == 3 and sum(int(b['mask'].sum()) for b in ev) == 9


def test_tfds_aircraft_is_a_clear_error():
  with pytest.raises(data.DataError, match='aircraft.*folder'):
    data.build_input(data_config(dataset='aircraft', data_source='tfds'))


# ------------------------------------------------------------------------------ synthetic / stream
@pytest.mark.parametrize('normalization,lo,hi', [('imagenet', -2.1179, 2.6400),
                                                 ('inception', -1.0, 1.0)])
def test_shapes_dtypes_ranges(normalization, lo, hi):
  inp = data.build_input(data_config(normalization=normalization))
  assert inp.info.class_names == ['class_00', 'class_01', 'class_02']
  b = next(inp.train_iter())
  assert b['image'].shape == (4, 32, 32, 3) and b['image'].dtype == np.uint8
  assert b['label'].shape == (4,) and b['label'].dtype == np.int32
  # uint8 travels; the step normalises it into the backbone's range
  x = np.asarray(preprocess.device_normalize(b['image'], normalization))
  assert x.min() >= lo - 1e-3 and x.max() <= hi + 1e-3
  assert x.max() - x.min() > 0.5 * (hi - lo)
  e = next(inp.eval_iter())
  assert e['image'].shape == (4, 32, 32, 3) and e['mask'].dtype == np.bool_


def test_determinism_epochs_and_resume():
  inp = data.build_input(data_config(batch_size=8))  # 48 train -> 6 steps per epoch.
  spe = inp.steps_per_epoch
  assert spe == 6
  it = inp.train_iter()
  stream = [next(it) for _ in range(2 * spe + 3)]
  again = data.build_input(data_config(batch_size=8)).train_iter()
  for want in stream[:spe + 1]:
    got = next(again)
    np.testing.assert_array_equal(got['image'], want['image'])
    np.testing.assert_array_equal(got['label'], want['label'])
  # Each epoch is a permutation of the split; epochs differ in order.
  labels = [np.concatenate([b['label'] for b in stream[e * spe:(e + 1) * spe]])
            for e in range(2)]
  assert sorted(labels[0]) == sorted(labels[1])
  assert not np.array_equal(labels[0], labels[1])
  # The same image gets different augmentation crops in different epochs.
  assert not np.array_equal(stream[0]['image'], stream[spe]['image'])
  # Resume: inside the first epoch and across an epoch boundary.
  for k in (4, spe, spe + 5):
    resumed = inp.train_iter(start_step=k)
    for want in stream[k:k + 2]:
      got = next(resumed)
      np.testing.assert_array_equal(got['image'], want['image'])
      np.testing.assert_array_equal(got['label'], want['label'])
  # Another seed -> another stream.
  other = next(data.build_input(data_config(batch_size=8, seed=7)).train_iter())
  assert not np.array_equal(other['image'], stream[0]['image'])


def test_two_hosts_train_shares_union_is_the_global_batch():
  single = data.build_input(data_config(batch_size=8))
  hosts = [data.build_input(data_config(batch_size=8), p, 2) for p in range(2)]
  its = [h.train_iter() for h in hosts]
  s = single.train_iter()
  for _ in range(single.steps_per_epoch + 1):
    want = next(s)
    parts = [next(i) for i in its]
    assert all(p['label'].shape == (4,) for p in parts)
    assert sorted(np.concatenate([p['label'] for p in parts])) == sorted(want['label'])
    assert sorted(np.concatenate([p['image'] for p in parts]).sum((1, 2, 3)).round(2)) == \
        sorted(want['image'].sum((1, 2, 3)).round(2))


@pytest.mark.parametrize('num_test,eval_batch,hosts', [(10, 5, 1), (10, 4, 1), (10, 4, 2),
                                                       (11, 6, 2), (3, 4, 2)])
def test_eval_padding_counts_every_image_once(num_test, eval_batch, hosts):
  cfg = data_config(synthetic_num_test=num_test, eval_batch_size=eval_batch)
  labels = data.build_input(cfg).source.labels['test'].numpy()
  union, counts = [], []
  for p in range(hosts):
    seen, n = eval_records(data.build_input(cfg, p, hosts))
    union += seen
    counts.append(n)
  assert len(set(counts)) == 1, counts
  assert sorted(union) == [(i, int(labels[i])) for i in range(num_test)]


# ------------------------------------------------------------------------------ robustness
def test_truncated_and_non_image_files_are_skipped_and_named(tmp_path):
  lay = layouts.write_cub_layout(tmp_path, num_classes=2, train_per_class=4, test_per_class=2)
  bad_train, bad_test = lay.train[1][0], lay.test[0][0]
  layouts.truncate_file(bad_train, 0.4)
  layouts.write_non_image(bad_test)
  with pytest.warns(data.DataWarning) as rec:
    inp = data.build_input(folder_config(lay))
  msg = ' '.join(str(w.message) for w in rec)
  assert 'skipped 2' in msg and bad_train in msg and bad_test in msg
  assert (inp.info.num_train, inp.info.num_test) == (len(lay.train) - 1, len(lay.test) - 1)
  assert len(inp.info.skipped_files) == 2
  seen, _ = eval_records(inp)
  assert len(seen) == len(lay.test) - 1
  it = inp.train_iter()
  for _ in range(inp.steps_per_epoch + 1):
    next(it)


def test_missing_data_dir():
  with pytest.raises(data.DataError, match='data_dir'):
    data.build_input(data_config(dataset='cub', data_source='folder', data_dir=''))
  with pytest.raises(data.DataError, match='/nonexistent/x'):
    data.build_input(data_config(dataset='cub', data_source='folder', data_dir='/nonexistent/x'))


def test_missing_layout_names_the_folder(tmp_path):
  with pytest.raises(data.DataError, match='images.txt'):
    data.build_input(data_config(dataset='cub', data_source='folder', data_dir=str(tmp_path)))


def test_label_file_names_a_missing_image(tmp_path):
  lay = layouts.write_cub_layout(tmp_path, num_classes=2, train_per_class=2, test_per_class=1)
  os.remove(lay.train[0][0])
  with pytest.raises(data.DataError, match='images.txt.*do not exist'):
    data.build_input(folder_config(lay))


def test_label_file_count_disagrees(tmp_path):
  lay = layouts.write_cub_layout(tmp_path, num_classes=2, train_per_class=2, test_per_class=1)
  f = os.path.join(lay.root, 'image_class_labels.txt')
  lines = open(f).readlines()
  open(f, 'w').writelines(lines[:-1])
  with pytest.raises(data.DataError, match='image_class_labels.txt'):
    data.build_input(folder_config(lay))


def test_aircraft_unknown_variant(tmp_path):
  lay = layouts.write_aircraft_layout(tmp_path, num_classes=2, train_per_class=1,
                                      test_per_class=1)
  f = os.path.join(lay.root, 'images_variant_test.txt')
  open(f, 'a').write('1234567 Not A Plane\n')
  with pytest.raises(data.DataError, match='images_variant_test.txt'):
    data.build_input(folder_config(lay))


def test_empty_split(tmp_path):
  lay = layouts.write_cub_layout(tmp_path, num_classes=2, train_per_class=2, test_per_class=1)
  f = os.path.join(lay.root, 'train_test_split.txt')
  lines = [l.split()[0] + ' 1\n' for l in open(f)]
  open(f, 'w').writelines(lines)
  with pytest.raises(data.DataError, match='test split is empty.*train_test_split.txt'):
    data.build_input(folder_config(lay))


@pytest.mark.parametrize('key,value', [('dataset', 'imagenet'), ('data_source', 'hdf5')])
def test_unknown_dataset_or_source(key, value):
  with pytest.raises(ValueError, match=value):  # config_lib.ConfigError
    data.build_input(data_config(**{key: value}))


# ------------------------------------------------------------------------------ single files
@pytest.mark.parametrize('kind', ['gray_png', 'rgba_png', 'odd_jpeg', 'palette_png'])
def test_load_image_for_eval(kind, tmp_path):
  rng = np.random.default_rng(0)
  path = str(tmp_path / f'{kind}.{"jpg" if "jpeg" in kind else "png"}')
  if kind == 'gray_png':
    Image.fromarray(rng.integers(0, 256, (37, 53), dtype=np.uint8), 'L').save(path)
  elif kind == 'rgba_png':
    Image.fromarray(rng.integers(0, 256, (61, 29, 4), dtype=np.uint8), 'RGBA').save(path)
  elif kind == 'palette_png':
    Image.fromarray(rng.integers(0, 256, (33, 33, 3), dtype=np.uint8)).convert('P').save(path)
  else:
    layouts.write_image(path, (77, 41), 1, rng)
  cfg = data_config()
  img = data.load_image_for_eval(path, predict.eval_transform(cfg))
  assert img.shape == (32, 32, 3) and img.dtype == np.uint8   # what the eval stream yields
  if kind == 'gray_png':
    assert (img == img[..., :1]).all()
  if kind == 'rgba_png':   # the alpha composited on white: a brighter image than the RGB alone
    rgb = np.asarray(Image.open(path).convert('RGB'), np.float64)
    assert img.mean() > rgb.mean()


def test_load_image_for_eval_matches_the_eval_pipeline(cub):
  for test_crop in ('center_crop', 'resize'):
    cfg = folder_config(cub, test_crop=test_crop)
    batch = next(data.build_input(cfg).eval_iter())
    for k in range(2):
      img = data.load_image_for_eval(cub.test[k][0], predict.eval_transform(cfg))
      assert batch['image'].dtype == np.uint8
      np.testing.assert_array_equal(img, batch['image'][k])


def test_load_image_for_eval_errors(tmp_path):
  with pytest.raises(data.ImageLoadError, match='nope.jpg'):
    data.load_image_for_eval(str(tmp_path / 'nope.jpg'), predict.eval_transform(data_config()))
  bad = str(tmp_path / 'bad.jpg')
  layouts.write_non_image(bad)
  with pytest.raises(data.ImageLoadError, match='bad.jpg'):
    data.load_image_for_eval(bad, predict.eval_transform(data_config()))
  trunc = str(tmp_path / 'trunc.jpg')
  layouts.write_image(trunc, (64, 48), 0, np.random.default_rng(0))
  layouts.truncate_file(trunc, 0.5)
  with pytest.raises(data.ImageLoadError, match='trunc.jpg'):
    data.load_image_for_eval(trunc, predict.eval_transform(data_config()))
  assert issubclass(data.ImageLoadError, data.DataError)
  assert issubclass(data.DataError, ValueError)


def test_normalize_roundtrip_and_on_device():
  x = np.arange(256, dtype=np.uint8).reshape(1, -1, 1).repeat(3, -1)
  for name in ('imagenet', 'inception'):
    np.testing.assert_array_equal(data.denormalize(data.normalize(x, name), name), x)
    # the jitted steps' normalisation is numpy's, on the device
    np.testing.assert_allclose(preprocess.device_normalize(x, name), data.normalize(x, name),
                               atol=1e-6)
  np.testing.assert_allclose(data.normalize(x, 'inception')[0, [0, 255], 0], [-1.0, 1.0])
  np.testing.assert_allclose(data.normalize(x, 'imagenet')[0, 0],
                             -np.array([0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225], rtol=1e-6)


def test_import_is_light():
  code = ('import sys, dca_jax.data; '
          'assert "tensorflow" not in sys.modules, "tensorflow imported eagerly"; '
          'assert not any(m.startswith(("dca_jax.models", "dca_jax.train")) for m in sys.modules)')
  subprocess.run([sys.executable, '-c', code], check=True,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_without_prescan_a_bad_file_does_not_crash(tmp_path):
  lay = layouts.write_cub_layout(tmp_path, num_classes=2, train_per_class=4, test_per_class=2)
  layouts.write_non_image(lay.train[0][0])
  layouts.write_non_image(lay.test[0][0])
  cfg = folder_config(lay)
  cfg['verify_images'] = False  # Proposed knob; default True.
  inp = data.build_input(cfg)
  assert inp.info.num_train == len(lay.train)  # Not pre-scanned: counted, dropped when read.
  it = inp.train_iter()
  for _ in range(inp.steps_per_epoch + 1):
    assert next(it)['image'].shape == (4, 32, 32, 3)
  seen, _ = eval_records(inp)
  assert len(seen) == len(lay.test) - 1


RESIZE, CROP = 550, 448


SPAN = RESIZE - CROP + 1  # 103 possible offsets per axis


@pytest.fixture(scope='module')
def photo():
  datasets = pytest.importorskip('sklearn.datasets')
  image = datasets.load_sample_image('china.jpg')  # 427 x 640 x 3, a photo shipped with sklearn
  resized = np.asarray(Image.fromarray(image).resize((RESIZE, RESIZE), Image.BILINEAR), np.float32)
  # every candidate window's pixels on a sparse grid: [8, SPAN (top), 8, SPAN (left), 3]
  shifted = GRID[:, None] + np.arange(SPAN)[None, :]
  return image, resized, resized[shifted][:, :, shifted]


GRID = np.arange(0, CROP, 56)


def locate(crop, reference, windows):
  """(top, left, mirrored, mean |error|, ...) of the best-matching 448 crop of `reference`:
  every offset and both orientations scored on a sparse grid of pixels, the best on all."""
  scores = []
  for mirrored in (False, True):
    view = crop[:, ::-1] if mirrored else crop
    probe = view[np.ix_(GRID, GRID)].astype(np.float32)          # [8, 8, 3]
    error = np.abs(windows - probe[:, None, :, None]).mean(axis=(0, 2, 4))  # [SPAN, SPAN]
    top, left = np.unravel_index(np.argmin(error), error.shape)
    full = np.abs(view.astype(np.float32) - reference[top:top + CROP, left:left + CROP]).mean()
    runner_up = np.partition(error.ravel(), 1)[1]
    scores.append((top, left, mirrored, full, error.min(), runner_up))
  return min(scores, key=lambda s: s[3])


def test_fgvc_train_crop_is_448_of_550_mirrored_or_not(photo):
  tf = pytest.importorskip('tensorflow')
  image, reference, windows = photo
  seen = []
  for seed in range(8):
    key = tf.constant([seed, 7], tf.int64)
    crop = preprocess.train_transform(tf.constant(image), key, resize_size=RESIZE,
                                      input_size=CROP).numpy()
    assert crop.shape == (CROP, CROP, 3) and crop.dtype == np.uint8
    top, left, mirrored, full, best, runner_up = locate(crop, reference, windows)
    # the crop is the resized photo's window, pixel for pixel (PIL vs TF rounding: < 1 level)
    assert full < 1.0, (seed, top, left, mirrored, full)
    assert runner_up > best + 2.0  # one offset fits, not a band of them
    seen.append((top, left, mirrored))
    again = preprocess.train_transform(tf.constant(image), key, resize_size=RESIZE,
                                       input_size=CROP).numpy()
    np.testing.assert_array_equal(again, crop)  # a stateless key: the same crop every epoch
  mirrored = [m for _, _, m in seen]
  assert any(mirrored) and not all(mirrored), seen           # flipped half of the time
  tops, lefts = [top for top, _, _ in seen], [left for _, left, _ in seen]
  assert len(set(tops)) > 4 and len(set(lefts)) > 4, seen   # offsets over the whole span
  assert max(tops + lefts) - min(tops + lefts) > SPAN // 2, seen
