"""The FGVC datasets' official extracted layouts (`data_source='folder'`), one reader each.

CUB-200-2011, FGVC-Aircraft, Stanford Cars (devkit), NABirds, Stanford Dogs, Oxford-IIIT Pets,
and `imagefolder` (your own `train/<class>/`, `test/<class>/`). Each returns a
`folders.FolderDataset`: class names in label order, and per split the image paths and labels
(sorted by the ids of the label files). They and the TFDS builders register at the end
(`_fgvc`: registry.py); a new layout is a reader here and its `_fgvc` line.
"""

from __future__ import annotations

import os

import numpy as np

from dca_jax.data import builders, registry, streams
from dca_jax.data.errors import DataError
from dca_jax.data.folders import (IMAGE_EXTENSIONS, FileSplit, FolderDataset, check_data_dir,
                                  check_files_exist, check_tables, find_root, nonempty,
                                  read_id_table, read_lines)

AIRCRAFT_BANNER_PX = 20


# ----------------------------------------------------------------------------- CUB-200-2011
def read_cub(data_dir: str) -> FolderDataset:
  root = find_root(data_dir, ['CUB_200_2011', '.'], 'images.txt', 'CUB-200-2011')
  images_file, labels_file, split_file, classes_file = (os.path.join(root, name) for name in (
      'images.txt', 'image_class_labels.txt', 'train_test_split.txt', 'classes.txt'))
  images = read_id_table(images_file)
  labels = read_id_table(labels_file, int)
  is_train = read_id_table(split_file, int)
  classes = read_id_table(classes_file)
  class_names = [classes[class_id] for class_id in sorted(classes)]
  if sorted(classes) != list(range(1, len(classes) + 1)):
    raise DataError(f'{classes_file}: class ids must be 1..{len(classes)}')
  check_tables(images, images_file, labels, labels_file, is_train, split_file)
  bad = [i for i in images if not 1 <= labels[i] <= len(class_names)]
  if bad:
    raise DataError(f'{labels_file}: image id {bad[0]} has label {labels[bad[0]]}, outside '
                    f'1..{len(class_names)} ({classes_file})')
  splits = {}
  for flag, which in ((1, 'train'), (0, 'test')):
    ids = sorted(i for i in images if is_train[i] == flag)
    paths = [os.path.join(root, 'images', images[i]) for i in ids]
    check_files_exist(paths, images_file)
    split_labels = np.asarray([labels[i] - 1 for i in ids], np.int32)
    splits[which] = nonempty(FileSplit(paths, split_labels, split_file), which)
  return FolderDataset('cub', root, class_names, splits['train'], splits['test'])


# ----------------------------------------------------------------------------- FGVC-Aircraft
def read_aircraft(data_dir: str) -> FolderDataset:
  root = find_root(data_dir, [os.path.join('fgvc-aircraft-2013b', 'data'), 'data', '.'],
                    'variants.txt', 'FGVC-Aircraft (fgvc-aircraft-2013b/data)')
  variants_file = os.path.join(root, 'variants.txt')
  class_names = read_lines(variants_file)
  if len(set(class_names)) != len(class_names):
    raise DataError(f'{variants_file}: a variant name appears twice')
  label_of = {name: label for label, name in enumerate(class_names)}
  splits = {}
  for which, file_name in (('train', 'images_variant_trainval.txt'),
                           ('test', 'images_variant_test.txt')):
    label_file = os.path.join(root, file_name)
    paths, labels = [], []
    for line_number, line in enumerate(read_lines(label_file), 1):
      parts = line.split(maxsplit=1)
      if len(parts) != 2:
        raise DataError(f'{label_file}:{line_number}: expected "<image id> <variant>", got '
                        f'{line!r}')
      if parts[1] not in label_of:
        raise DataError(f'{label_file}:{line_number}: variant {parts[1]!r} is not in '
                        f'{variants_file}')
      paths.append(os.path.join(root, 'images', parts[0] + '.jpg'))
      labels.append(label_of[parts[1]])
    check_files_exist(paths, label_file)
    splits[which] = nonempty(FileSplit(paths, np.asarray(labels, np.int32), label_file), which)
  return FolderDataset('aircraft', root, class_names, splits['train'], splits['test'],
                       crop_bottom=AIRCRAFT_BANNER_PX)


# ----------------------------------------------------------------------------- Stanford Cars
def _loadmat(path: str) -> dict:
  import scipy.io  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise DataError(f'missing annotation file: {path}')
  try:
    return scipy.io.loadmat(path, squeeze_me=True)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'cannot read {path}: {type(e).__name__}: {e}') from None


def _image_folder(root: str, name: str) -> str:
  folder = os.path.join(root, name)
  nested = os.path.join(folder, name)  # Some mirrors extract to cars_train/cars_train/.
  if os.path.isdir(nested):
    return nested
  if not os.path.isdir(folder):
    raise DataError(f'missing image folder: {folder}')
  return folder


def _cars_test_annotations(root: str) -> str:
  """The test annotations with labels (not the label-less devkit/cars_test_annos.mat)."""
  for candidate in ('cars_test_annos_withlabels.mat',
                    os.path.join('devkit', 'cars_test_annos_withlabels.mat')):
    if os.path.isfile(os.path.join(root, candidate)):
      return os.path.join(root, candidate)
  raise DataError(f'missing {os.path.join(root, "cars_test_annos_withlabels.mat")} (the '
                  'test labels; devkit/cars_test_annos.mat has none)')


def _read_cars_split(annotations_file: str, root: str, folder: str, class_names: list[str],
                     meta_file: str, which: str) -> FileSplit:
  """One split: the annotations' file names (in `folder`) and labels, checked."""
  mat = _loadmat(annotations_file)
  if 'annotations' not in mat:
    raise DataError(f'{annotations_file} has no annotations struct')
  annotations = np.atleast_1d(mat['annotations'])
  fields = annotations.dtype.names or ()
  if 'fname' not in fields or 'class' not in fields:
    raise DataError(f'{annotations_file}: annotations lack the fname/class fields (found '
                    f'{fields})')
  image_dir = _image_folder(root, folder)
  file_names = [str(name) for name in np.atleast_1d(annotations['fname'])]
  class_ids = [int(class_id) for class_id in np.atleast_1d(annotations['class'])]
  labels = np.asarray(class_ids, np.int64) - 1
  bad = np.flatnonzero((labels < 0) | (labels >= len(class_names)))
  if bad.size:
    raise DataError(f'{annotations_file}: {file_names[bad[0]]} has class {labels[bad[0]] + 1}, '
                    f'outside 1..{len(class_names)} ({meta_file})')
  paths = [os.path.join(image_dir, name) for name in file_names]
  check_files_exist(paths, annotations_file)
  return nonempty(FileSplit(paths, labels.astype(np.int32), annotations_file), which)


def read_cars(data_dir: str) -> FolderDataset:
  root = find_root(data_dir, ['.', 'stanford_cars', 'stanford-cars'],
                    os.path.join('devkit', 'cars_meta.mat'), 'Stanford Cars devkit')
  meta_file = os.path.join(root, 'devkit', 'cars_meta.mat')
  meta = _loadmat(meta_file)
  if 'class_names' not in meta:
    raise DataError(f'{meta_file} has no class_names')
  class_names = [str(name).strip() for name in np.atleast_1d(meta['class_names'])]
  test_file = _cars_test_annotations(root)
  splits = {}
  for which, annotations_file, folder in (
      ('train', os.path.join(root, 'devkit', 'cars_train_annos.mat'), 'cars_train'),
      ('test', test_file, 'cars_test')):
    splits[which] = _read_cars_split(annotations_file, root, folder, class_names, meta_file,
                                     which)
  return FolderDataset('cars', root, class_names, splits['train'], splits['test'])


# ----------------------------------------------------------------------------- NABirds
def _read_key_table(path: str) -> dict[str, str]:
  """'<key> <value>' lines -> {key: value} in file order; keys are strings (NABirds: UUIDs)."""
  table = {}
  for line_number, line in enumerate(read_lines(path), 1):
    parts = line.split(maxsplit=1)
    if len(parts) != 2:
      raise DataError(f'{path}:{line_number}: expected "<id> <value>", got {line!r}')
    if parts[0] in table:
      raise DataError(f'{path}:{line_number}: id {parts[0]} appears twice')
    table[parts[0]] = parts[1].strip()
  return table


def _int_values(table: dict, path: str) -> dict:
  try:
    return {key: int(value) for key, value in table.items()}
  except ValueError as e:
    raise DataError(f'{path}: a value is not an integer ({e})') from None


def read_nabirds(data_dir: str) -> FolderDataset:
  """nabirds/: images.txt, image_class_labels.txt, train_test_split.txt (UUID image ids) and
  classes.txt (every node of the taxonomy). The class ids that label images (555 leaves in the
  full set) become 0..C-1 in increasing id order. Order: as in images.txt."""
  root = find_root(data_dir, ['nabirds', '.'], 'images.txt', 'NABirds (nabirds/)')
  images_file, labels_file, split_file, classes_file = (os.path.join(root, name) for name in (
      'images.txt', 'image_class_labels.txt', 'train_test_split.txt', 'classes.txt'))
  images = _read_key_table(images_file)
  labels = _int_values(_read_key_table(labels_file), labels_file)
  is_train = _int_values(_read_key_table(split_file), split_file)
  classes = read_id_table(classes_file)
  check_tables(images, images_file, labels, labels_file, is_train, split_file)
  bad = [i for i in images if labels[i] not in classes]
  if bad:
    raise DataError(f'{labels_file}: image id {bad[0]} has class {labels[bad[0]]}, which is '
                    f'not in {classes_file}')
  class_ids = sorted(set(labels.values()))  # not contiguous: the taxonomy's leaves with images
  label_of = {class_id: label for label, class_id in enumerate(class_ids)}
  splits = {}
  for flag, which in ((1, 'train'), (0, 'test')):
    ids = [i for i in images if is_train[i] == flag]
    paths = [os.path.join(root, 'images', images[i]) for i in ids]
    check_files_exist(paths, images_file)
    split_labels = np.asarray([label_of[labels[i]] for i in ids], np.int32)
    splits[which] = nonempty(FileSplit(paths, split_labels, split_file), which)
  return FolderDataset('nabirds', root, [classes[i] for i in class_ids], splits['train'],
                       splits['test'])


# ----------------------------------------------------------------------------- Stanford Dogs
def _dogs_list(root: str, name: str) -> str:
  """lists.tar extracts flat: its .mat files in lists/ or in the root itself."""
  for candidate in (os.path.join(root, 'lists', name), os.path.join(root, name)):
    if os.path.isfile(candidate):
      return candidate
  raise DataError(f'missing split file: {os.path.join(root, "lists", name)} (nor '
                  f'{os.path.join(root, name)}; from lists.tar)')


def read_dogs(data_dir: str) -> FolderDataset:
  """Images/<wnid>-<breed>/<file>.jpg and lists.tar's train_list.mat / test_list.mat
  (`file_list`: paths under Images/, `labels`: 1-based, in synset order). Class names: the
  breed part of the folder names. Order: as in the .mat files."""
  root = find_root(data_dir, ['.', 'stanford_dogs', 'StanfordDogs'], 'Images',
                    'Stanford Dogs (Images/)')
  folder_of, splits = {}, {}
  for which in ('train', 'test'):
    list_file = _dogs_list(root, f'{which}_list.mat')
    mat = _loadmat(list_file)
    if 'file_list' not in mat or 'labels' not in mat:
      raise DataError(f'{list_file} lacks the file_list/labels fields (found '
                      f'{sorted(k for k in mat if not k.startswith("__"))})')
    files = [str(name) for name in np.atleast_1d(mat['file_list'])]
    class_ids = np.atleast_1d(mat['labels']).astype(np.int64)
    if len(files) != len(class_ids):
      raise DataError(f'{list_file}: {len(files)} files but {len(class_ids)} labels')
    for name, class_id in zip(files, class_ids.tolist()):
      folder = os.path.dirname(name)
      if class_id < 1:
        raise DataError(f'{list_file}: {name} has label {class_id}, expected 1..')
      if folder_of.setdefault(class_id, folder) != folder:
        raise DataError(f'{list_file}: {name} has label {class_id}, the label of folder '
                        f'{folder_of[class_id]!r}: one folder per label')
    paths = [os.path.join(root, 'Images', name) for name in files]
    check_files_exist(paths, list_file)
    splits[which] = nonempty(FileSplit(paths, (class_ids - 1).astype(np.int32), list_file),
                              which)
  missing = sorted(set(range(1, max(folder_of) + 1)) - set(folder_of))
  if missing:
    raise DataError(f'{splits["train"].label_file}: no image of label {missing[0]} in either '
                    f'list (labels must be 1..{max(folder_of)})')
  class_names = [folder_of[i].split('-', 1)[-1] for i in sorted(folder_of)]
  return FolderDataset('dogs', root, class_names, splits['train'], splits['test'])


# ----------------------------------------------------------------------------- Oxford-IIIT Pets
def read_pets(data_dir: str) -> FolderDataset:
  """images/<Breed_name>_<n>.jpg, annotations/trainval.txt and test.txt ('<name> <class id,
  1-based> <species> <breed id>'). Class names: the image names less their number (TFDS's
  names). Order: as in the files."""
  root = find_root(data_dir, ['.', 'oxford-iiit-pet', 'oxford_iiit_pet'],
                    os.path.join('annotations', 'trainval.txt'), 'Oxford-IIIT Pets')
  name_of, splits = {}, {}
  for which, file_name in (('train', 'trainval.txt'), ('test', 'test.txt')):
    label_file = os.path.join(root, 'annotations', file_name)
    paths, labels = [], []
    for line_number, line in enumerate(read_lines(label_file), 1):
      if line.startswith('#'):
        continue
      parts = line.split()
      if len(parts) != 4 or not all(part.isdigit() for part in parts[1:]):
        raise DataError(f'{label_file}:{line_number}: expected "<name> <class id> <species> '
                        f'<breed id>", got {line!r}')
      class_id, breed = int(parts[1]), parts[0].rsplit('_', 1)[0]
      if class_id < 1:
        raise DataError(f'{label_file}:{line_number}: class id {class_id}, expected 1..')
      if name_of.setdefault(class_id, breed) != breed:
        raise DataError(f'{label_file}:{line_number}: {parts[0]} has class {class_id}, the class '
                        f'of {name_of[class_id]!r}: one breed per class id')
      paths.append(os.path.join(root, 'images', parts[0] + '.jpg'))
      labels.append(class_id - 1)
    check_files_exist(paths, label_file)
    splits[which] = nonempty(FileSplit(paths, np.asarray(labels, np.int32), label_file), which)
  missing = sorted(set(range(1, max(name_of) + 1)) - set(name_of))
  if missing:
    raise DataError(f'{splits["train"].label_file}: no image of class {missing[0]} in either '
                    f'list (class ids must be 1..{max(name_of)})')
  class_names = [name_of[i] for i in sorted(name_of)]
  return FolderDataset('pets', root, class_names, splits['train'], splits['test'])


# ----------------------------------------------------------------------------- image folder
def read_imagefolder(data_dir: str) -> FolderDataset:
  """Your own classes: data_dir/train/<class>/<image> and data_dir/test/<class>/<image> (the
  torchvision ImageFolder convention). Class names: the train folder names, sorted (label i =
  the i-th); a test class must be one of them. Order: sorted paths. Files that are not images
  by extension are ignored; unreadable images are dropped by the pre-scan as in every reader."""
  check_data_dir(data_dir, 'imagefolder (train/<class>/, test/<class>/)')
  splits, class_names = {}, None
  for which in ('train', 'test'):
    split_dir = os.path.join(data_dir, which)
    if not os.path.isdir(split_dir):
      raise DataError(f'missing image folder: {split_dir} (imagefolder: {which}/<class>/<image>)')
    names = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not names:
      raise DataError(f'{split_dir}: no class folders (imagefolder: {which}/<class>/<image>)')
    if class_names is None:
      class_names = names
    unknown = sorted(set(names) - set(class_names))
    if unknown:
      raise DataError(f'{split_dir}: class folder {unknown[0]!r} is not among the '
                      f'{len(class_names)} train classes')
    paths, labels = [], []
    for label, name in enumerate(class_names):
      folder = os.path.join(split_dir, name)
      if not os.path.isdir(folder):
        continue
      files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
      paths += [os.path.join(folder, f) for f in files]
      labels += [label] * len(files)
    splits[which] = nonempty(FileSplit(paths, np.asarray(labels, np.int32), split_dir), which)
  empty = [name for label, name in enumerate(class_names)
           if not np.any(splits['train'].labels == label)]
  if empty:
    raise DataError(f'{os.path.join(data_dir, "train", empty[0])}: no image of this class')
  return FolderDataset('imagefolder', os.fspath(data_dir), class_names, splits['train'],
                       splits['test'])


# ----------------------------------------------------------------------------- the datasets
def _fgvc(name: str, read=None, tfds_name: str = '') -> None:
  """Registers an FGVC dataset read from its official layout (`read`) and/or TFDS (`tfds_name`:
  a builder whose splits are 'train' and 'test')."""
  sources = {**({'folder': builders.folder(read)} if read else {}),
             **({'tfds': builders.tfds(tfds_name)} if tfds_name else {})}
  registry.register(name, task='fgvc', sources=sources, input_class=streams.Input, read=read,
                    tfds_name=tfds_name)


_fgvc('cub', read_cub, 'caltech_birds2011')
_fgvc('cars', read_cars, 'cars196')
_fgvc('aircraft', read_aircraft)
_fgvc('nabirds', read_nabirds)
_fgvc('dogs', read_dogs, 'stanford_dogs')
_fgvc('pets', read_pets, 'oxford_iiit_pet')
_fgvc('imagefolder', read_imagefolder)


def read_folder(dataset: str, data_dir: str) -> FolderDataset:
  """The official layout of FGVC `dataset` under `data_dir`, read by its registered reader."""
  readers = registry.names(task='fgvc', source='folder')
  if dataset not in readers:
    raise DataError(f'unknown dataset {dataset!r} for data_source=folder; expected one of '
                    f'{sorted(readers)}')
  return registry.get(dataset).read(data_dir)
