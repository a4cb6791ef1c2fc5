"""FGVC data: readers of the official extracted layouts, the shared pre-scan, stream sources.

Each reader (`data_source='folder'`) returns a `FolderDataset`: class names in label order,
and per split the image paths and 0-based labels, in a fixed order (sorted by the ids of the
label files). The label files are checked against each other and against the image folder;
any disagreement raises DataError naming the file. `verify_images` then pre-scans every listed
image with PIL and drops (with one warning naming them) the files that are corrupt, truncated
or not images (`drop_unreadable`, also used by the Re-ID readers).

The stream sources (`FolderSource`, `SyntheticSource`, `TfdsSource`) are what
`pipeline.Input` reads: this host's index records of a split, and one record -> (image,
label). The Re-ID one, `ReidSource`, is in reid_sources.py.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import warnings

import numpy as np
from absl import logging

from dca_jax.data import preprocess, synthetic
from dca_jax.data._tf import tensorflow
from dca_jax.data.errors import DataError, DataWarning
from dca_jax.data.preprocess import TF_FORMATS

AIRCRAFT_BANNER_PX = 20
TFDS_NAMES = {'cub': 'caltech_birds2011', 'cars': 'cars196', 'dogs': 'stanford_dogs',
              'pets': 'oxford_iiit_pet'}  # each builder's splits are 'train' and 'test'


class ImageSplit:
  """Base of the split dataclasses: `paths` and per-image numpy arrays (labels, pids, ...)."""

  def subset(self, keep):
    """The split with the images where `keep` is True (its paths and every per-image array)."""
    keep = np.asarray(keep, bool)
    arrays = {field.name: getattr(self, field.name)[keep] for field in dataclasses.fields(self)
              if isinstance(getattr(self, field.name), np.ndarray)}
    paths = [path for path, kept in zip(self.paths, keep) if kept]
    return dataclasses.replace(self, paths=paths, **arrays)


@dataclasses.dataclass
class FileSplit(ImageSplit):
  paths: list[str]
  labels: np.ndarray  # int32, 0-based
  label_file: str     # the file that defines this split (for messages)

  @property
  def listing(self) -> str:
    """Where messages say the split's images come from."""
    return f'listed by {self.label_file}'


@dataclasses.dataclass
class FolderDataset:
  name: str
  root: str
  class_names: list[str]
  train: FileSplit
  test: FileSplit
  crop_bottom: int = 0
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, reason)


def check_data_dir(data_dir: str, what: str) -> None:
  """DataError unless `data_dir` is an existing folder (`what`: the layout, for the message)."""
  if not data_dir:
    raise DataError(f'config.data_dir is empty: set it to the folder that holds the {what} '
                    'layout (data_source=folder)')
  if not os.path.isdir(data_dir):
    raise DataError(f'data_dir does not exist or is not a folder: {data_dir}')


def _find_root(data_dir: str, candidates: list[str], marker: str, what: str) -> str:
  check_data_dir(data_dir, what)
  for candidate in candidates:
    root = os.path.join(data_dir, candidate)
    if os.path.exists(os.path.join(root, marker)):
      return os.path.normpath(root)
  tried = ', '.join(os.path.normpath(os.path.join(data_dir, candidate, marker))
                    for candidate in candidates)
  raise DataError(f'{what} layout not found under {data_dir}: none of {tried} exists')


def _read_lines(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise DataError(f'missing label file: {path}')
  with open(path, encoding='utf-8') as f:
    return [line.strip() for line in f if line.strip()]


def _read_id_table(path: str, cast=str) -> dict[int, object]:
  """'<id> <value>' lines -> {id: value}; the value may contain spaces."""
  table = {}
  for line_number, line in enumerate(_read_lines(path), 1):
    parts = line.split(maxsplit=1)
    if len(parts) != 2:
      raise DataError(f'{path}:{line_number}: expected "<id> <value>", got {line!r}')
    try:
      key, value = int(parts[0]), cast(parts[1].strip())
    except ValueError:
      raise DataError(f'{path}:{line_number}: cannot parse {line!r}') from None
    if key in table:
      raise DataError(f'{path}:{line_number}: id {key} appears twice')
    table[key] = value
  return table


def check_files_exist(paths: list[str], label_file: str) -> None:
  """DataError naming `label_file` and a missing file when any of `paths` does not exist."""
  missing = [path for path in paths if not os.path.isfile(path)]
  if missing:
    more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
    raise DataError(f'{label_file} lists {len(missing)} image(s) that do not exist, e.g. '
                    f'{missing[0]}{more}')


def _nonempty(split: FileSplit, which: str) -> FileSplit:
  if not split.paths:
    raise DataError(f'the {which} split is empty: {split.label_file} lists no {which} images')
  return split


def _check_tables(images, images_file, labels, labels_file, is_train, split_file) -> None:
  """The CUB-style id tables agree: the same image ids in each, split flags 0|1."""
  for table_file, table in ((labels_file, labels), (split_file, is_train)):
    if set(table) != set(images):
      raise DataError(f'{table_file} does not match {images_file}: {len(table)} vs '
                      f'{len(images)} ids, {len(set(images) ^ set(table))} ids in only one of '
                      'them')
  bad = [i for i in images if is_train[i] not in (0, 1)]
  if bad:
    raise DataError(f'{split_file}: image id {bad[0]} has flag {is_train[bad[0]]}, expected '
                    '0|1')


# ----------------------------------------------------------------------------- CUB-200-2011
def read_cub(data_dir: str) -> FolderDataset:
  root = _find_root(data_dir, ['CUB_200_2011', '.'], 'images.txt', 'CUB-200-2011')
  images_file, labels_file, split_file, classes_file = (os.path.join(root, name) for name in (
      'images.txt', 'image_class_labels.txt', 'train_test_split.txt', 'classes.txt'))
  images = _read_id_table(images_file)
  labels = _read_id_table(labels_file, int)
  is_train = _read_id_table(split_file, int)
  classes = _read_id_table(classes_file)
  class_names = [classes[class_id] for class_id in sorted(classes)]
  if sorted(classes) != list(range(1, len(classes) + 1)):
    raise DataError(f'{classes_file}: class ids must be 1..{len(classes)}')
  _check_tables(images, images_file, labels, labels_file, is_train, split_file)
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
    splits[which] = _nonempty(FileSplit(paths, split_labels, split_file), which)
  return FolderDataset('cub', root, class_names, splits['train'], splits['test'])


# ----------------------------------------------------------------------------- FGVC-Aircraft
def read_aircraft(data_dir: str) -> FolderDataset:
  root = _find_root(data_dir, [os.path.join('fgvc-aircraft-2013b', 'data'), 'data', '.'],
                    'variants.txt', 'FGVC-Aircraft (fgvc-aircraft-2013b/data)')
  variants_file = os.path.join(root, 'variants.txt')
  class_names = _read_lines(variants_file)
  if len(set(class_names)) != len(class_names):
    raise DataError(f'{variants_file}: a variant name appears twice')
  label_of = {name: label for label, name in enumerate(class_names)}
  splits = {}
  for which, file_name in (('train', 'images_variant_trainval.txt'),
                           ('test', 'images_variant_test.txt')):
    label_file = os.path.join(root, file_name)
    paths, labels = [], []
    for line_number, line in enumerate(_read_lines(label_file), 1):
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
    splits[which] = _nonempty(FileSplit(paths, np.asarray(labels, np.int32), label_file), which)
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
  return _nonempty(FileSplit(paths, labels.astype(np.int32), annotations_file), which)


def read_cars(data_dir: str) -> FolderDataset:
  root = _find_root(data_dir, ['.', 'stanford_cars', 'stanford-cars'],
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
  for line_number, line in enumerate(_read_lines(path), 1):
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
  root = _find_root(data_dir, ['nabirds', '.'], 'images.txt', 'NABirds (nabirds/)')
  images_file, labels_file, split_file, classes_file = (os.path.join(root, name) for name in (
      'images.txt', 'image_class_labels.txt', 'train_test_split.txt', 'classes.txt'))
  images = _read_key_table(images_file)
  labels = _int_values(_read_key_table(labels_file), labels_file)
  is_train = _int_values(_read_key_table(split_file), split_file)
  classes = _read_id_table(classes_file)
  _check_tables(images, images_file, labels, labels_file, is_train, split_file)
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
    splits[which] = _nonempty(FileSplit(paths, split_labels, split_file), which)
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
  root = _find_root(data_dir, ['.', 'stanford_dogs', 'StanfordDogs'], 'Images',
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
    splits[which] = _nonempty(FileSplit(paths, (class_ids - 1).astype(np.int32), list_file),
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
  root = _find_root(data_dir, ['.', 'oxford-iiit-pet', 'oxford_iiit_pet'],
                    os.path.join('annotations', 'trainval.txt'), 'Oxford-IIIT Pets')
  name_of, splits = {}, {}
  for which, file_name in (('train', 'trainval.txt'), ('test', 'test.txt')):
    label_file = os.path.join(root, 'annotations', file_name)
    paths, labels = [], []
    for line_number, line in enumerate(_read_lines(label_file), 1):
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
    splits[which] = _nonempty(FileSplit(paths, np.asarray(labels, np.int32), label_file), which)
  missing = sorted(set(range(1, max(name_of) + 1)) - set(name_of))
  if missing:
    raise DataError(f'{splits["train"].label_file}: no image of class {missing[0]} in either '
                    f'list (class ids must be 1..{max(name_of)})')
  class_names = [name_of[i] for i in sorted(name_of)]
  return FolderDataset('pets', root, class_names, splits['train'], splits['test'])


# ----------------------------------------------------------------------------- image folder
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')


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
    splits[which] = _nonempty(FileSplit(paths, np.asarray(labels, np.int32), split_dir), which)
  empty = [name for label, name in enumerate(class_names)
           if not np.any(splits['train'].labels == label)]
  if empty:
    raise DataError(f'{os.path.join(data_dir, "train", empty[0])}: no image of this class')
  return FolderDataset('imagefolder', os.fspath(data_dir), class_names, splits['train'],
                       splits['test'])


# Folder readers of the official layouts; with the TFDS builders and the generated set they are
# the FGVC datasets (tasks.fgvc.datasets). A new dataset: a reader here (and a config).
READERS = {'cub': read_cub, 'cars': read_cars, 'aircraft': read_aircraft,
           'nabirds': read_nabirds, 'dogs': read_dogs, 'pets': read_pets,
           'imagefolder': read_imagefolder}
FGVC_DATASETS = tuple(dict.fromkeys([*READERS, *TFDS_NAMES, 'synthetic']))


def read_folder(dataset: str, data_dir: str) -> FolderDataset:
  if dataset not in READERS:
    raise DataError(f'unknown dataset {dataset!r} for data_source=folder; expected one of '
                    f'{sorted(READERS)}')
  return READERS[dataset](data_dir)


# ----------------------------------------------------------------------------- pre-scan
def check_image(path: str, crop_bottom: int = 0) -> str | None:
  """Returns None if TF can decode `path`, else a short reason. Fully decodes the file (JPEG at
  1/8 scale: still reads every entropy-coded byte, so truncation is caught) with PIL."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as image:
      if image.format not in TF_FORMATS:
        return f'unsupported image format {image.format}'
      if image.height <= crop_bottom + 1 or image.width < 2:
        return f'image too small ({image.width}x{image.height})'
      if image.format == 'JPEG':
        image.draft('RGB', (max(1, image.width // 8), max(1, image.height // 8)))
      image.load()
  except Exception as e:  # pylint: disable=broad-except
    return f'{type(e).__name__}: {e}'
  return None


def scan_images(paths: list[str], crop_bottom: int = 0, num_threads: int = 0) -> list:
  """check_image over many files with a thread pool (PIL decodes without the GIL)."""
  num_threads = num_threads or min(32, 4 * (os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    return list(pool.map(lambda path: check_image(path, crop_bottom), paths, chunksize=64))


def drop_unreadable(dataset, num_threads: int = 0, splits=('train', 'test'), *,
                    stacklevel: int = 3):
  """Pre-scans `splits`; removes unreadable files and warns once, naming them.

  Args:
    dataset: a FolderDataset, or a reid_sources.ReidDataset (its splits have no banner to
      crop); changed in place and returned.
    num_threads: of the scan (0: 4 per core, at most 32).
    splits: the names of the splits to scan.
    stacklevel: of the warning, counted from this function (3: its caller's caller).

  Returns:
    `dataset`, its unreadable files moved from the splits to `dataset.skipped`.
  """
  crop_bottom = getattr(dataset, 'crop_bottom', 0)
  unreadable = []
  for which in splits:
    split = getattr(dataset, which)
    reasons = scan_images(split.paths, crop_bottom, num_threads)
    found = [(path, reason) for path, reason in zip(split.paths, reasons) if reason is not None]
    if found:
      unreadable += found
      setattr(dataset, which, split.subset([reason is None for reason in reasons]))
      if not getattr(dataset, which).paths:
        raise DataError(f'the {which} split is empty: every image {split.listing} is '
                        f'unreadable (e.g. {found[0][0]}: {found[0][1]})')
  if unreadable:
    dataset.skipped.extend(unreadable)
    shown = '; '.join(f'{path} ({reason})' for path, reason in unreadable[:20])
    more = f'; ... and {len(unreadable) - 20} more' if len(unreadable) > 20 else ''
    message = (f'{dataset.name}: skipped {len(unreadable)} unreadable image(s) under '
               f'{dataset.root}: {shown}{more}')
    logging.warning(message)
    warnings.warn(message, DataWarning, stacklevel=stacklevel)
  return dataset


# ----------------------------------------------------------------------------- stream sources
def _seed_mix(seed: int, salt: int) -> int:
  """A seed for one use (`salt`) of config.seed, independent of its other uses."""
  return int(np.random.default_rng([int(seed) & 0xFFFFFFFF, salt]).integers(1, 2**62))


def hold_out(labels, fraction: float) -> np.ndarray:
  """Which train images form the validation split: round(fraction x n) of each class of n >= 2
  images (at least one), by a fixed draw: the same images whatever config.seed, so the runs of
  several seeds choose their `best` on one validation set."""
  labels = np.asarray(labels)
  held = np.zeros(labels.shape, bool)
  if fraction <= 0:
    return held
  rng = np.random.default_rng(20221)  # fixed: the split is part of the data, not of a run
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    count = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
    if count > 0:
      held[rng.permutation(members)[:count]] = True
  return held


class IndexedSource:
  """Splits held as indexable tables (file paths or in-memory images) + labels: 'train', 'test'
  and, with a validation split, 'val'.

  Train epoch `epoch` is a seeded permutation of the whole train split; each host takes every
  `process_count`-th element of it, from its `process_index`.
  """

  def __init__(self, labels: dict):
    tf = tensorflow()
    self.labels = {split: tf.constant(np.asarray(values, np.int32))
                   for split, values in labels.items()}
    self.sizes = {split: len(values) for split, values in labels.items()}
    self.num_train, self.num_test = self.sizes['train'], self.sizes['test']

  def load(self, split: str, index):
    """Image `index` of `split` ('train' | 'test' | 'val'), uint8 [h, w, 3]."""
    raise NotImplementedError

  def train_records(self, epoch, host_epoch_size: int, seed: int, process_index: int,
                    process_count: int):
    """This host's {'id', 'epoch'} records of train epoch `epoch` (an int64 scalar tensor)."""
    tf = tensorflow()
    permutation = tf.random.experimental.stateless_shuffle(
        tf.range(self.num_train, dtype=tf.int64),
        seed=tf.stack([tf.constant(_seed_mix(seed, 1), tf.int64), epoch]))
    host_ids = permutation[process_index::process_count][:host_epoch_size]
    return tf.data.Dataset.from_tensor_slices(host_ids).map(
        lambda example_id: {'id': example_id, 'epoch': epoch})

  def train_element(self, record):
    return self.load('train', record['id']), tensorflow().gather(self.labels['train'], record['id'])

  def test_records(self, process_index: int, process_count: int, split: str = 'test'):
    """This host's {'id', 'index'} records of an eval split ('test' | 'val'), in order."""
    indices = np.arange(process_index, self.sizes[split], process_count, dtype=np.int64)
    return tensorflow().data.Dataset.from_tensor_slices({'id': indices, 'index': indices})

  def test_element(self, record, split: str = 'test'):
    return self.load(split, record['id']), tensorflow().gather(self.labels[split], record['id'])


def _with_val(splits: dict, fraction: float) -> dict:
  """{'train', 'test'} -> train less the held-out images, test, and 'val' (the held out)."""
  if fraction <= 0:
    return splits
  held = hold_out(splits['train'].labels, fraction)
  return {**splits, 'train': splits['train'].subset(~held), 'val': splits['train'].subset(held)}


class FolderSource(IndexedSource):
  """A FolderDataset: the files are read and decoded in the stream."""

  def __init__(self, dataset: FolderDataset, val_split: float = 0.0):
    splits = _with_val({'train': dataset.train, 'test': dataset.test}, val_split)
    super().__init__({name: split.labels for name, split in splits.items()})
    tf = tensorflow()
    self.paths = {name: tf.constant(split.paths) for name, split in splits.items()}
    self.crop_bottom = dataset.crop_bottom

  def load(self, split, index):
    tf = tensorflow()
    encoded = tf.io.read_file(tf.gather(self.paths[split], index))
    return preprocess.decode(encoded, self.crop_bottom)


class SyntheticSource(IndexedSource):
  """The generated set, held in memory."""

  def __init__(self, generated: synthetic.SyntheticData, val_split: float = 0.0):
    images = {'train': generated.train_images, 'test': generated.test_images}
    labels = {'train': generated.train_labels, 'test': generated.test_labels}
    if val_split > 0:
      held = hold_out(generated.train_labels, val_split)
      for name, keep in (('val', held), ('train', ~held)):
        images[name], labels[name] = images['train'][keep], labels['train'][keep]
    super().__init__(labels)
    tf = tensorflow()
    self.images = {name: tf.constant(values) for name, values in images.items()}

  def load(self, split, index):
    return tensorflow().gather(self.images[split], index)


class TfdsSource:
  """TFDS reader: encoded images (decoding skipped in the reader), decoded in the map.

  Each host reads its own `tfds.split_for_jax_process` share; a train epoch is that share
  shuffled with a seeded buffer (`config.shuffle_buffer`).
  """

  def __init__(self, config, process_index: int, process_count: int):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tensorflow()  # Hide GPUs before TFDS touches TensorFlow.
    name = TFDS_NAMES[config.dataset]
    data_dir = config.data_dir or None
    try:
      self.builder = tfds.builder(name, data_dir=data_dir)
      self.builder.download_and_prepare()  # No-op (a quick check) when already prepared.
    except Exception as e:  # pylint: disable=broad-except
      where = data_dir or '~/tensorflow_datasets'
      raise DataError(f'TFDS dataset {name} is not prepared under {where} and could not be '
                      f'downloaded/prepared: {type(e).__name__}: {str(e).splitlines()[0]}'
                      ) from None
    self.class_names = list(self.builder.info.features['label'].names)
    self.decoders = tfds.decode.PartialDecoding(
        {'image': True, 'label': True}, decoders={'image': tfds.decode.SkipDecoding()})
    self.num_train = self._split_size('train')
    self.num_test = self._split_size('test')
    self.shuffle_buffer = int(config.get('shuffle_buffer', 2048))
    if process_count == 1:
      self.splits = {'train': 'train', 'test': 'test'}
    else:
      self.splits = {split: tfds.split_for_jax_process(split, process_index=process_index,
                                                       process_count=process_count)
                     for split in ('train', 'test')}

  def _split_size(self, split: str) -> int:
    try:
      return int(self.builder.info.splits[split].num_examples)
    except (KeyError, IndexError):  # Not in the metadata (e.g. tfds.testing.mock_data).
      examples = self.builder.as_dataset(split=split, decoders=self.decoders)
      count = int(examples.cardinality().numpy())
      if count >= 0:
        return count
      return int(examples.reduce(0, lambda counted, _: counted + 1).numpy())

  def _read(self, split: str):
    examples = self.builder.as_dataset(split=self.splits[split], decoders=self.decoders,
                                       shuffle_files=False)
    return examples.enumerate()  # (position in this host's share, example)

  def train_records(self, epoch, host_epoch_size: int, seed: int, process_index: int,
                    process_count: int):
    """This host's {'id', 'epoch', 'raw', 'label'} records of train epoch `epoch`."""
    del process_index, process_count  # The share was chosen in __init__.
    tf = tensorflow()
    epoch_seed = tf.bitwise.bitwise_xor(tf.constant(_seed_mix(seed, 2), tf.int64),
                                        epoch * 1_000_003)
    examples = self._read('train').shuffle(self.shuffle_buffer, seed=epoch_seed,
                                           reshuffle_each_iteration=False)
    return examples.take(host_epoch_size).map(
        lambda position, example: {'id': position, 'epoch': epoch, 'raw': example['image'],
                                   'label': example['label']})

  def train_element(self, record):
    tf = tensorflow()
    return preprocess.decode(record['raw']), tf.cast(record['label'], tf.int32)

  def test_records(self, process_index: int, process_count: int, split: str = 'test'):
    """This host's {'index', 'raw', 'label'} records of the test split; 'index' is the
    position inside this host's share."""
    del process_index, process_count, split  # The share was chosen in __init__; test only.
    return self._read('test').map(
        lambda position, example: {'index': position, 'raw': example['image'],
                                   'label': example['label']})

  def test_element(self, record, split: str = 'test'):
    del split
    return self.train_element(record)
