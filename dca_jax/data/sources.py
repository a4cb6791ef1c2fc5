"""Readers for the official extracted dataset layouts (`data_source='folder'`).

Each reader returns a `FolderDataset`: class names in label order, and per split the image
paths and 0-based labels, in a fixed order (sorted by the ids of the label files). The label
files are checked against each other and against the image folder; any disagreement raises
DataError naming the file. `verify_images` then pre-scans every listed image with PIL and drops
(with one warning naming them) the files that are corrupt, truncated or not images.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import warnings

import numpy as np
from absl import logging

from dca_jax.data import preprocess, synthetic
from dca_jax.data._tf import tf
from dca_jax.data.errors import DataError, DataWarning
from dca_jax.data.preprocess import TF_FORMATS

AIRCRAFT_BANNER_PX = 20
TFDS_NAMES = {'cub': 'caltech_birds2011', 'cars': 'cars196'}


@dataclasses.dataclass
class FileSplit:
  paths: list[str]
  labels: np.ndarray  # int32, 0-based
  label_file: str     # the file that defines this split (for messages)


@dataclasses.dataclass
class FolderDataset:
  name: str
  root: str
  class_names: list[str]
  train: FileSplit
  test: FileSplit
  crop_bottom: int = 0
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, reason)


def _find_root(data_dir: str, candidates: list[str], marker: str, what: str) -> str:
  if not data_dir:
    raise DataError(f'config.data_dir is empty: set it to the folder that holds the {what} '
                    'layout (data_source=folder)')
  if not os.path.isdir(data_dir):
    raise DataError(f'data_dir does not exist or is not a folder: {data_dir}')
  for c in candidates:
    root = os.path.join(data_dir, c)
    if os.path.exists(os.path.join(root, marker)):
      return os.path.normpath(root)
  tried = ', '.join(os.path.normpath(os.path.join(data_dir, c, marker)) for c in candidates)
  raise DataError(f'{what} layout not found under {data_dir}: none of {tried} exists')


def _read_lines(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise DataError(f'missing label file: {path}')
  with open(path, encoding='utf-8') as f:
    return [line.strip() for line in f if line.strip()]


def _read_id_table(path: str, cast=str) -> dict[int, object]:
  """'<id> <value>' lines -> {id: value}; the value may contain spaces."""
  table = {}
  for n, line in enumerate(_read_lines(path), 1):
    parts = line.split(maxsplit=1)
    if len(parts) != 2:
      raise DataError(f'{path}:{n}: expected "<id> <value>", got {line!r}')
    try:
      key, value = int(parts[0]), cast(parts[1].strip())
    except ValueError:
      raise DataError(f'{path}:{n}: cannot parse {line!r}') from None
    if key in table:
      raise DataError(f'{path}:{n}: id {key} appears twice')
    table[key] = value
  return table


def _check_files_exist(paths: list[str], label_file: str) -> None:
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
    raise DataError(f'{label_file} lists {len(missing)} image(s) that do not exist, e.g. '
                    f'{missing[0]}{more}')


def _nonempty(split: FileSplit, which: str) -> FileSplit:
  if not split.paths:
    raise DataError(f'the {which} split is empty: {split.label_file} lists no {which} images')
  return split


# ----------------------------------------------------------------------------- CUB-200-2011
def read_cub(data_dir: str) -> FolderDataset:
  root = _find_root(data_dir, ['CUB_200_2011', '.'], 'images.txt', 'CUB-200-2011')
  f_images, f_labels, f_split, f_classes = (os.path.join(root, n) for n in (
      'images.txt', 'image_class_labels.txt', 'train_test_split.txt', 'classes.txt'))
  images = _read_id_table(f_images)
  labels = _read_id_table(f_labels, int)
  is_train = _read_id_table(f_split, int)
  classes = _read_id_table(f_classes)
  class_names = [classes[k] for k in sorted(classes)]
  if sorted(classes) != list(range(1, len(classes) + 1)):
    raise DataError(f'{f_classes}: class ids must be 1..{len(classes)}')
  for f, table in ((f_labels, labels), (f_split, is_train)):
    if set(table) != set(images):
      raise DataError(f'{f} does not match {f_images}: {len(table)} vs {len(images)} ids, '
                      f'{len(set(images) ^ set(table))} ids in only one of them')
  bad = [i for i in images if not 1 <= labels[i] <= len(class_names)]
  if bad:
    raise DataError(f'{f_labels}: image id {bad[0]} has label {labels[bad[0]]}, outside '
                    f'1..{len(class_names)} ({f_classes})')
  bad = [i for i in images if is_train[i] not in (0, 1)]
  if bad:
    raise DataError(f'{f_split}: image id {bad[0]} has flag {is_train[bad[0]]}, expected 0|1')
  splits = {}
  for flag, name in ((1, 'train'), (0, 'test')):
    ids = sorted(i for i in images if is_train[i] == flag)
    paths = [os.path.join(root, 'images', images[i]) for i in ids]
    _check_files_exist(paths, f_images)
    splits[name] = _nonempty(FileSplit(paths, np.asarray([labels[i] - 1 for i in ids],
                                                         np.int32), f_split), name)
  return FolderDataset('cub', root, class_names, splits['train'], splits['test'])


# ----------------------------------------------------------------------------- FGVC-Aircraft
def read_aircraft(data_dir: str) -> FolderDataset:
  root = _find_root(data_dir, [os.path.join('fgvc-aircraft-2013b', 'data'), 'data', '.'],
                    'variants.txt', 'FGVC-Aircraft (fgvc-aircraft-2013b/data)')
  f_variants = os.path.join(root, 'variants.txt')
  class_names = _read_lines(f_variants)
  if len(set(class_names)) != len(class_names):
    raise DataError(f'{f_variants}: a variant name appears twice')
  index = {n: i for i, n in enumerate(class_names)}
  splits = {}
  for which, fname in (('train', 'images_variant_trainval.txt'),
                       ('test', 'images_variant_test.txt')):
    f = os.path.join(root, fname)
    paths, labels = [], []
    for n, line in enumerate(_read_lines(f), 1):
      parts = line.split(maxsplit=1)
      if len(parts) != 2:
        raise DataError(f'{f}:{n}: expected "<image id> <variant>", got {line!r}')
      if parts[1] not in index:
        raise DataError(f'{f}:{n}: variant {parts[1]!r} is not in {f_variants}')
      paths.append(os.path.join(root, 'images', parts[0] + '.jpg'))
      labels.append(index[parts[1]])
    _check_files_exist(paths, f)
    splits[which] = _nonempty(FileSplit(paths, np.asarray(labels, np.int32), f), which)
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


def read_cars(data_dir: str) -> FolderDataset:
  root = _find_root(data_dir, ['.', 'stanford_cars', 'stanford-cars'],
                    os.path.join('devkit', 'cars_meta.mat'), 'Stanford Cars devkit')
  f_meta = os.path.join(root, 'devkit', 'cars_meta.mat')
  meta = _loadmat(f_meta)
  if 'class_names' not in meta:
    raise DataError(f'{f_meta} has no class_names')
  class_names = [str(n).strip() for n in np.atleast_1d(meta['class_names'])]
  f_test = None
  for c in ('cars_test_annos_withlabels.mat',
            os.path.join('devkit', 'cars_test_annos_withlabels.mat')):
    if os.path.isfile(os.path.join(root, c)):
      f_test = os.path.join(root, c)
      break
  if f_test is None:
    raise DataError(f'missing {os.path.join(root, "cars_test_annos_withlabels.mat")} (the '
                    'test labels; devkit/cars_test_annos.mat has none)')
  splits = {}
  for which, f, folder in (
      ('train', os.path.join(root, 'devkit', 'cars_train_annos.mat'), 'cars_train'),
      ('test', f_test, 'cars_test')):
    mat = _loadmat(f)
    if 'annotations' not in mat:
      raise DataError(f'{f} has no annotations struct')
    ann = np.atleast_1d(mat['annotations'])
    names = ann.dtype.names or ()
    if 'fname' not in names or 'class' not in names:
      raise DataError(f'{f}: annotations lack the fname/class fields (found {names})')
    image_dir = _image_folder(root, folder)
    fnames = [str(x) for x in np.atleast_1d(ann['fname'])]
    labels = np.asarray([int(x) for x in np.atleast_1d(ann['class'])], np.int64) - 1
    bad = np.flatnonzero((labels < 0) | (labels >= len(class_names)))
    if bad.size:
      raise DataError(f'{f}: {fnames[bad[0]]} has class {labels[bad[0]] + 1}, outside '
                      f'1..{len(class_names)} ({f_meta})')
    paths = [os.path.join(image_dir, n) for n in fnames]
    _check_files_exist(paths, f)
    splits[which] = _nonempty(FileSplit(paths, labels.astype(np.int32), f), which)
  return FolderDataset('cars', root, class_names, splits['train'], splits['test'])


READERS = {'cub': read_cub, 'aircraft': read_aircraft, 'cars': read_cars}


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
    with Image.open(path) as im:
      if im.format not in TF_FORMATS:
        return f'unsupported image format {im.format}'
      if im.height <= crop_bottom + 1 or im.width < 2:
        return f'image too small ({im.width}x{im.height})'
      if im.format == 'JPEG':
        im.draft('RGB', (max(1, im.width // 8), max(1, im.height // 8)))
      im.load()
  except Exception as e:  # pylint: disable=broad-except
    return f'{type(e).__name__}: {e}'
  return None


def scan_images(paths: list[str], crop_bottom: int = 0, num_threads: int = 0) -> list:
  """check_image over many files with a thread pool (PIL decodes without the GIL)."""
  num_threads = num_threads or min(32, 4 * (os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    return list(pool.map(lambda p: check_image(p, crop_bottom), paths, chunksize=64))


def drop_unreadable(ds: FolderDataset, num_threads: int = 0,
                    splits=('train', 'test')) -> FolderDataset:
  """Pre-scans the splits; removes unreadable files and warns once, naming them."""
  for which in splits:
    split = getattr(ds, which)
    reasons = scan_images(split.paths, ds.crop_bottom, num_threads)
    keep = [r is None for r in reasons]
    bad = [(p, r) for p, r in zip(split.paths, reasons) if r is not None]
    if bad:
      ds.skipped.extend(bad)
      split = FileSplit([p for p, k in zip(split.paths, keep) if k],
                        split.labels[np.asarray(keep, bool)], split.label_file)
      setattr(ds, which, split)
      if not split.paths:
        raise DataError(f'the {which} split is empty: every image listed by '
                        f'{split.label_file} is unreadable (e.g. {bad[0][0]}: {bad[0][1]})')
  if ds.skipped:
    shown = '; '.join(f'{p} ({r})' for p, r in ds.skipped[:20])
    more = f'; ... and {len(ds.skipped) - 20} more' if len(ds.skipped) > 20 else ''
    msg = (f'{ds.name}: skipped {len(ds.skipped)} unreadable image(s) under {ds.root}: '
           f'{shown}{more}')
    logging.warning(msg)
    warnings.warn(msg, DataWarning, stacklevel=3)
  return ds


# ----------------------------------------------------------------------------- stream sources
# What `pipeline.Input` reads: this host's index records of a split (cheap to skip), and one
# record -> (image, label).
def _seed_mix(seed: int, salt: int) -> int:
  return int(np.random.default_rng([int(seed) & 0xFFFFFFFF, salt]).integers(1, 2**62))


class IndexedSource:
  """A split held as an indexable table (file paths or in-memory images) + labels."""

  def __init__(self, train_labels, test_labels):
    t = tf()
    self.train_labels = t.constant(np.asarray(train_labels, np.int32))
    self.test_labels = t.constant(np.asarray(test_labels, np.int32))
    self.num_train, self.num_test = len(train_labels), len(test_labels)

  def load(self, split: str, idx):
    raise NotImplementedError

  def train_epoch(self, epoch, n_host: int, seed: int, p: int, P: int):
    t = tf()
    perm = t.random.experimental.stateless_shuffle(
        t.range(self.num_train, dtype=t.int64),
        seed=t.stack([t.constant(_seed_mix(seed, 1), t.int64), epoch]))
    host = perm[p::P][:n_host]
    return t.data.Dataset.from_tensor_slices(host).map(lambda i: {'id': i, 'epoch': epoch})

  def train_element(self, elem):
    return self.load('train', elem['id']), tf().gather(self.train_labels, elem['id'])

  def test_host(self, p: int, P: int):
    idx = np.arange(p, self.num_test, P, dtype=np.int64)
    return tf().data.Dataset.from_tensor_slices({'id': idx, 'index': idx})

  def test_element(self, elem):
    return self.load('test', elem['id']), tf().gather(self.test_labels, elem['id'])


class FolderSource(IndexedSource):

  def __init__(self, ds: FolderDataset):
    super().__init__(ds.train.labels, ds.test.labels)
    t = tf()
    self.paths = {'train': t.constant(ds.train.paths), 'test': t.constant(ds.test.paths)}
    self.crop_bottom = ds.crop_bottom

  def load(self, split, idx):
    raw = tf().io.read_file(tf().gather(self.paths[split], idx))
    return preprocess.decode(raw, self.crop_bottom)


class SyntheticSource(IndexedSource):

  def __init__(self, d: synthetic.SyntheticData):
    super().__init__(d.train_labels, d.test_labels)
    t = tf()
    self.images = {'train': t.constant(d.train_images), 'test': t.constant(d.test_images)}

  def load(self, split, idx):
    return tf().gather(self.images[split], idx)


class TfdsSource:
  """TFDS reader: encoded images (decoding skipped in the reader), decoded in the map."""

  def __init__(self, config, p: int, P: int):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tf()  # Hide GPUs before TFDS touches TensorFlow.
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
    self.p, self.P = p, P
    self.shuffle_buffer = int(config.get('shuffle_buffer', 2048))
    split_fn = (lambda s: s) if P == 1 else (
        lambda s: tfds.split_for_jax_process(s, process_index=p, process_count=P))
    self.splits = {'train': split_fn('train'), 'test': split_fn('test')}

  def _split_size(self, split: str) -> int:
    try:
      return int(self.builder.info.splits[split].num_examples)
    except (KeyError, IndexError):  # Not in the metadata (e.g. tfds.testing.mock_data).
      ds = self.builder.as_dataset(split=split, decoders=self.decoders)
      n = int(ds.cardinality().numpy())
      return n if n >= 0 else int(ds.reduce(0, lambda c, _: c + 1).numpy())

  def _read(self, split: str):
    ds = self.builder.as_dataset(split=self.splits[split], decoders=self.decoders,
                                 shuffle_files=False)
    return ds.enumerate()  # (position in this host's share, example)

  def train_epoch(self, epoch, n_host: int, seed: int, p: int, P: int):
    t = tf()
    ep_seed = t.bitwise.bitwise_xor(t.constant(_seed_mix(seed, 2), t.int64),
                                    epoch * 1_000_003)
    ds = self._read('train').shuffle(self.shuffle_buffer, seed=ep_seed,
                                     reshuffle_each_iteration=False).take(n_host)
    return ds.map(lambda i, ex: {'id': i, 'epoch': epoch, 'raw': ex['image'],
                                 'label': ex['label']})

  def train_element(self, elem):
    return preprocess.decode(elem['raw']), tf().cast(elem['label'], tf().int32)

  def test_host(self, p, P):
    # 'index' is the position inside this host's share for TFDS.
    return self._read('test').map(lambda i, ex: {'index': i, 'raw': ex['image'],
                                                 'label': ex['label']})

  def test_element(self, elem):
    return self.train_element(elem)
