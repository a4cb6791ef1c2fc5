"""The ids and cameras `--mode embed` writes (dca_jax/data/reid_labels.py): the Re-ID readers'
own reading of the official file names and of identity folders, or nothing and why."""

import os
import shutil

import numpy as np
import pytest

from dca_jax import predict
from dca_jax.data import registry, reid_labels, reid_sources

try:
  from tests import reid_layouts  # pylint: disable=g-import-not-at-top
except ImportError:
  import reid_layouts  # pylint: disable=g-import-not-at-top


def _labels(images):
  return reid_labels.image_labels(images, predict.image_paths(images, say=lambda _: None))


@pytest.mark.parametrize('name, test_folders', [
    ('market1501', ('query', 'bounding_box_test')), ('dukemtmc', ('query', 'bounding_box_test')),
    ('veri776', ('image_query', 'image_test')), ('msmt17', None)])
def test_official_names_give_the_readers_ids_and_cameras(tmp_path, name, test_folders):
  """Each test split as the reader reads it (ids, 0-based cameras): the same ids, cameras + 1;
  the junk files the reader drops come with id -1 (as Market-1501's distractors keep id 0)."""
  lay = reid_layouts.write_reid_layout(name, str(tmp_path))
  dataset = reid_sources.read_reid(lay.dataset, lay.data_dir, verify_images=False)
  for which, split in (('query', dataset.query), ('gallery', dataset.gallery)):
    # MSMT17's test folder holds both splits in identity folders: its files, listed
    images = ([os.path.join(lay.root, test_folders[which == 'gallery'])] if test_folders
              else split.paths)
    paths = predict.image_paths(images, say=lambda _: None)
    labels, said = reid_labels.image_labels(images, paths)
    assert said == f'ids and cameras from {registry.get(lay.dataset).layout.title} file names'
    assert labels['ids'].dtype == labels['cameras'].dtype == np.int32
    read = dict(zip(split.paths, zip(split.pids.tolist(), (split.camids + 1).tolist())))
    got = dict(zip(paths, zip(labels['ids'].tolist(), labels['cameras'].tolist())))
    assert {p: v for p, v in got.items() if v[0] != -1} == read
    junk = [p for p, v in got.items() if v[0] == -1]
    assert len(junk) == {'query': 1, 'gallery': 2}[which] * (name in ('market1501', 'dukemtmc'))
    assert all(os.path.basename(p).startswith('-1_') for p in junk)


def test_identity_folders_give_names_and_the_cameras_csv(tmp_path):
  lay = reid_layouts.write_reid_folder(str(tmp_path), cameras=True)
  for which in ('query', 'gallery'):
    labels, said = _labels([os.path.join(lay.data_dir, which)])
    assert labels['ids'].tolist() == [name for _, name in lay.splits[which]]
    assert labels['cameras'].tolist() == [lay.cameras[p] for p, _ in lay.splits[which]]
    assert said == (f'ids from the identity folders of {os.path.join(lay.data_dir, which)}; '
                    f'cameras from {os.path.join(lay.data_dir, "cameras.csv")}')
  os.remove(os.path.join(lay.data_dir, 'cameras.csv'))
  labels, said = _labels([os.path.join(lay.data_dir, 'gallery')])   # with the query's copy
  assert set(labels) == {'ids', 'content'} and 'the no-camera protocol' in said
  paths = [p for p, _ in lay.splits['gallery']]
  assert labels['content'].tolist() == reid_sources.content_keys(paths)
  assert len(set(labels['content'].tolist())) == len(paths)
  assert labels['content'][paths.index(lay.duplicate[1])] == (
      reid_sources.content_keys([lay.duplicate[0]])[0])


def test_no_ids_unless_every_image_is_in_one_known_layout(tmp_path):
  lay = reid_layouts.write_market1501(str(tmp_path / 'm'))
  query = os.path.join(lay.root, 'query')
  folders = reid_layouts.write_reid_folder(str(tmp_path / 'f'))
  cases = {'an unknown name': [query, str(tmp_path / 'photo.jpg')],
           'camera 9 of 6': [str(tmp_path / '0002_c9s1_000451_03.jpg')],
           'two namings': [query, str(tmp_path / '0001_c2_f0046182.jpg')],
           'two identity folders': [os.path.join(folders.data_dir, w) for w in ('query',
                                                                                'gallery')],
           'a file beside them': [os.path.join(folders.data_dir, 'train')]}  # loose.jpg below
  shutil.copy(lay.query[0][0], tmp_path / 'photo.jpg')
  for name in ('0002_c9s1_000451_03.jpg', '0001_c2_f0046182.jpg'):
    shutil.copy(lay.query[0][0], tmp_path / name)
  shutil.copy(lay.query[0][0], os.path.join(folders.data_dir, 'train', 'loose.jpg'))
  for case, images in cases.items():
    labels, said = _labels(images)
    assert labels == {} and said == ('ids, cameras: not written (not every image is in a '
                                     'known layout: one folder of identity folders, or '
                                     'Market-1501, DukeMTMC-reID, VeRi-776, MSMT17 file '
                                     'names)'), case
