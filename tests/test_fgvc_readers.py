"""NABirds, Stanford Dogs and Oxford-IIIT Pets: tiny real-JPEG copies of the official folder
layouts (tests/layouts.py) read back through data.build_input, their TFDS builders (mocked),
and a bad layout = one line naming the file. Tiny images (32-72 px), input 32, resize 40."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest
from conftest import data_config, folder_config, one_line_error

from dca_jax import checks, data
from dca_jax.data import fgvc_readers, registry

try:
  from tests import layouts  # pylint: disable=g-import-not-at-top
except ImportError:
  import layouts  # pylint: disable=g-import-not-at-top

NEW_SETS = ('nabirds', 'dogs', 'pets')


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  return {name: layouts.write_layout(name, tmp_path_factory.mktemp(name)) for name in NEW_SETS}


# ------------------------------------------------------------------------------ read back
@pytest.mark.parametrize('dataset', NEW_SETS)
def test_layout_reads_back_labels_splits_and_names(dataset, written):
  lay = written[dataset]
  inp = data.build_input(folder_config(lay))
  assert inp.info.class_names == lay.class_names
  assert (inp.info.num_train, inp.info.num_test) == (len(lay.train), len(lay.test))
  assert [p.decode() for p in inp.source.paths['test'].numpy()] == [p for p, _ in lay.test]
  assert [p.decode() for p in inp.source.paths['train'].numpy()] == [p for p, _ in lay.train]
  # eval: every test image once, in the files' order, with the label the writer gave it
  seen = []
  for batch in inp.eval_iter(with_index=True):
    seen += list(zip(batch['index'][batch['mask']].tolist(),
                     batch['label'][batch['mask']].tolist()))
  assert seen == [(i, label) for i, (_, label) in enumerate(lay.test)]
  # train: an epoch's labels are drawn from the train split's, decoded to the input size
  batch = next(inp.train_iter())
  assert batch['image'].shape == (4, 32, 32, 3) and batch['image'].dtype == np.uint8
  want = collections.Counter(label for _, label in lay.train)
  assert all(want[label] > 0 for label in batch['label'].tolist())


def test_nabirds_class_ids_are_not_contiguous(written):
  """The leaf ids that label images (and only those) become 0..C-1 in id order; the inner
  nodes of classes.txt (no images) are not classes."""
  lay = written['nabirds']
  with open(os.path.join(lay.root, 'classes.txt')) as f:
    ids = [int(line.split()[0]) for line in f]
  assert len(ids) > lay.num_classes and ids != list(range(len(ids)))
  read = fgvc_readers.read_folder('nabirds', lay.data_dir)
  assert read.class_names == lay.class_names and 'Birds' not in read.class_names
  folders = sorted({os.path.basename(os.path.dirname(p)) for p, _ in lay.train})
  by_folder = {os.path.basename(os.path.dirname(p)): label
               for p, label in zip(read.train.paths, read.train.labels.tolist())}
  assert [by_folder[f] for f in folders] == list(range(lay.num_classes))


def test_dogs_lists_in_the_root_and_tfds_label_order(tmp_path):
  """lists.tar extracts flat: the .mat files may sit beside Images/. The 1-based labels follow
  the wnid order, which is TFDS's order (sorted lower-cased folder names)."""
  lay = layouts.write_dogs_layout(tmp_path, num_classes=4, train_per_class=1, test_per_class=1,
                                  lists_folder='.')
  read = fgvc_readers.read_folder('dogs', lay.data_dir)
  assert read.class_names == ['Chihuahua', 'Shih-Tzu', 'black-and-tan_coonhound', 'Great_Dane']
  assert read.train.labels.tolist() == [label for _, label in lay.train]
  folders = [os.path.basename(os.path.dirname(p)).lower() for p in read.test.paths]
  tfds_label = {name: k for k, name in enumerate(sorted(set(folders)))}
  assert [tfds_label[f] for f in folders] == read.test.labels.tolist()


def test_pets_class_names_are_tfds_names(written):
  """The folder reader names a class by its images' names less the number: TFDS's names."""
  import tensorflow_datasets as tfds
  lay = written['pets']
  tfds_names = tfds.builder('oxford_iiit_pet').info.features['label'].names
  read = fgvc_readers.read_folder('pets', lay.data_dir)
  assert len(tfds_names) == 37
  assert set(read.class_names) <= set(tfds_names)
  assert [tfds_names.index(n) for n in read.class_names] == sorted(
      tfds_names.index(n) for n in read.class_names)


# ------------------------------------------------------------------------------ TFDS
@pytest.mark.parametrize('dataset,num_classes', [('dogs', 120), ('pets', 37)])
def test_tfds_mock(dataset, num_classes, tmp_path, monkeypatch):
  monkeypatch.setenv('DCA_JAX_OFFLINE', '0')  # the mock prepares nothing: no look-up
  import tensorflow_datasets as tfds
  assert registry.get(dataset).tfds_name in ('stanford_dogs', 'oxford_iiit_pet')
  with tfds.testing.mock_data(num_examples=6):
    inp = data.build_input(data_config(dataset=dataset, data_source='tfds',
                                       data_dir=str(tmp_path), num_classes=num_classes))
    assert inp.info.num_classes == num_classes == len(inp.info.class_names)
    assert (inp.info.num_train, inp.info.num_test) == (6, 6)
    batch = next(inp.train_iter())
    assert batch['image'].shape == (4, 32, 32, 3) and batch['image'].dtype == np.uint8
    assert ((0 <= batch['label']) & (batch['label'] < num_classes)).all()
    assert sum(int(b['mask'].sum()) for b in inp.eval_iter()) == 6
  if dataset == 'pets':
    assert inp.info.class_names[:2] == ['Abyssinian', 'american_bulldog']


# ------------------------------------------------------------------------------ bad layouts
def _rewrite(path, edit):
  with open(path) as f:
    lines = f.readlines()
  with open(path, 'w') as f:
    f.writelines(edit(lines))


@pytest.mark.parametrize('case', ['empty', 'labels_short', 'unknown_class', 'flag', 'missing'])
def test_nabirds_bad_layout_is_one_line(case, tmp_path):
  if case == 'empty':
    empty = layouts.Layout('nabirds', str(tmp_path), '', ['x'], [], [])
    one_line_error(lambda: data.build_input(folder_config(empty)),
                   r'NABirds.*nabirds/images.txt')
    return
  lay = layouts.write_nabirds_layout(tmp_path, num_classes=2, train_per_class=1,
                                     test_per_class=1)
  labels, split = (os.path.join(lay.root, n) for n in ('image_class_labels.txt',
                                                       'train_test_split.txt'))
  if case == 'labels_short':
    _rewrite(labels, lambda lines: lines[:-1])
    one_line_error(lambda: data.build_input(folder_config(lay)),
                   'image_class_labels.txt does not match .*images.txt')
  elif case == 'unknown_class':
    _rewrite(labels, lambda lines: [lines[0].split()[0] + ' 5\n'] + lines[1:])
    one_line_error(lambda: data.build_input(folder_config(lay)),
                   'image_class_labels.txt: image id .* class 5, .*not in .*classes.txt')
  elif case == 'flag':
    _rewrite(split, lambda lines: [lines[0].split()[0] + ' 2\n'] + lines[1:])
    one_line_error(lambda: data.build_input(folder_config(lay)),
                   'train_test_split.txt: .* flag 2')
  else:
    os.remove(lay.test[0][0])
    one_line_error(lambda: data.build_input(folder_config(lay)),
                   'images.txt lists 1 image.*do not exist')


@pytest.mark.parametrize('case', ['no_lists', 'no_labels', 'two_folders', 'missing'])
def test_dogs_bad_layout_is_one_line(case, tmp_path):
  import scipy.io
  lay = layouts.write_dogs_layout(tmp_path, num_classes=2, train_per_class=1, test_per_class=1)
  test_list = os.path.join(lay.root, 'lists', 'test_list.mat')
  if case == 'no_lists':
    os.remove(test_list)
    one_line_error(lambda: data.build_input(folder_config(lay)),
                   'missing split file: .*lists/test_list.mat')
  elif case == 'no_labels':
    scipy.io.savemat(test_list, {'file_list': scipy.io.loadmat(test_list)['file_list']})
    one_line_error(lambda: data.build_input(folder_config(lay)),
                   'test_list.mat lacks the file_list/labels fields')
  elif case == 'two_folders':
    mat = scipy.io.loadmat(test_list)
    mat['labels'][:] = 1
    scipy.io.savemat(test_list, {k: v for k, v in mat.items() if not k.startswith('__')})
    one_line_error(lambda: data.build_input(folder_config(lay)),
                   'test_list.mat: .* has label 1, the label of folder .*Chihuahua')
  else:
    os.remove(lay.train[0][0])
    one_line_error(lambda: data.build_input(folder_config(lay)),
                   'train_list.mat lists 1 image.*do not exist')


@pytest.mark.parametrize('case', ['no_layout', 'bad_line', 'two_breeds', 'gap', 'missing'])
def test_pets_bad_layout_is_one_line(case, tmp_path):
  lay = layouts.write_pets_layout(tmp_path, num_classes=3, train_per_class=1, test_per_class=1)
  trainval, test = (os.path.join(lay.root, 'annotations', n) for n in ('trainval.txt',
                                                                      'test.txt'))
  if case == 'no_layout':
    os.remove(trainval)
    one_line_error(lambda: data.build_input(folder_config(lay)),
                   'Oxford-IIIT Pets layout not found.*annotations/trainval.txt')
  elif case == 'bad_line':
    _rewrite(test, lambda lines: lines + ['Bengal_999 3\n'])
    one_line_error(lambda: data.build_input(folder_config(lay)),
                   r'test.txt:4: expected "<name> <class id> <species> <breed id>"')
  elif case == 'two_breeds':
    _rewrite(test, lambda lines: lines + ['Bengal_999 1 1 1\n'])
    one_line_error(lambda: data.build_input(folder_config(lay)),
                   'test.txt:4: Bengal_999 has class 1, the class of .Abyssinian.')
  elif case == 'gap':  # class 2 nowhere: ids must be 1..C
    drop = lambda lines: [line for line in lines if line.split()[1] != '2']
    _rewrite(trainval, drop)
    _rewrite(test, drop)
    one_line_error(lambda: data.build_input(folder_config(lay)),
                   r'trainval.txt: no image of class 2 .*1\.\.3')
  else:
    os.remove(lay.test[1][0])
    one_line_error(lambda: data.build_input(folder_config(lay)),
                   'test.txt lists 1 image.*do not exist')


def test_new_sets_are_fgvc_datasets_with_configs():
  """The task's list comes from the registry; each set has a config with its class count."""
  import importlib.util

  from dca_jax import tasks
  assert {'nabirds', 'dogs', 'pets'} <= set(tasks.get('fgvc').datasets())
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for name, dataset, num_classes, source in (('nabirds', 'nabirds', 555, 'folder'),
                                             ('dogs', 'dogs', 120, 'tfds'),
                                             ('pets', 'pets', 37, 'tfds')):
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, 'configs',
                                                                     f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    assert (c.dataset, c.num_classes, c.data_source) == (dataset, num_classes, source)
    checks.checked(c)


# ------------------------------------------------------------------------------ imagefolder


def test_imagefolder_reads_your_own_classes(tmp_path):
  root = layouts.write_imagefolder(str(tmp_path))
  dataset = fgvc_readers.read_folder('imagefolder', root)
  assert dataset.class_names == ['cat', 'dog', 'eel']
  assert len(dataset.train.paths) == 9 and len(dataset.test.paths) == 6
  assert list(dataset.train.labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  assert all(f'/train/{dataset.class_names[label]}/' in path
             for path, label in zip(dataset.train.paths, dataset.train.labels))
  info = data.build_input(data_config(dataset='imagefolder', data_source='folder',
                                      data_dir=root, num_classes=3))
  labels = collections.Counter()
  for batch in info.eval_iter():
    labels.update(int(x) for x, keep in zip(batch['label'], batch['mask']) if keep)
    assert batch['image'].shape[1:] == (32, 32, 3)
  assert labels == {0: 2, 1: 2, 2: 2}


@pytest.mark.parametrize('case', ['no_test', 'unknown_test_class', 'empty_class'])
def test_imagefolder_bad_layout_is_one_line(case, tmp_path):
  root = layouts.write_imagefolder(str(tmp_path))
  if case == 'no_test':
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(os.path.join(root, 'test'))
    match = 'missing image folder.*test'
  elif case == 'unknown_test_class':
    os.rename(os.path.join(root, 'test', 'eel'), os.path.join(root, 'test', 'owl'))
    match = "class folder 'owl' is not among the 3 train classes"
  else:
    for name in os.listdir(os.path.join(root, 'train', 'eel')):
      os.remove(os.path.join(root, 'train', 'eel', name))
    match = 'eel: no image of this class'
  with pytest.raises(data.DataError, match=match) as e:
    fgvc_readers.read_folder('imagefolder', root)
  assert '\n' not in str(e.value)
