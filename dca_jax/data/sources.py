"""The stream sources `pipeline.Input` reads: this host's index records of a split, and one
record -> (image, label). `FolderSource` (an extracted layout, fgvc_readers.py), `SyntheticSource`
(the generated set), `TfdsSource` (a TFDS builder) and `ReidSource` (the three splits of a
Re-ID layout, reid_sources.py).
"""

from __future__ import annotations

import os
import socket

import numpy as np

from dca_jax.data import preprocess, reid_sources, synthetic
from dca_jax.data._tf import tensorflow
from dca_jax.data.errors import DataError
from dca_jax.data.fgvc_readers import TFDS_NAMES
from dca_jax.data.folders import FolderDataset

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


# DCA_JAX_OFFLINE=1: never try a download; 0: always try (no look-up first); unset: look up.
OFFLINE_ENV = 'DCA_JAX_OFFLINE'
DOWNLOAD_HOST = 'storage.googleapis.com'  # TFDS's own mirror, asked before any dataset's site


def offline() -> bool:
  """Whether a download cannot work (see OFFLINE_ENV); unset: whether the download host fails
  to resolve (a name look-up answers in about a second where there is no network, where TFDS
  itself would retry each file for minutes)."""
  setting = os.environ.get(OFFLINE_ENV, '').strip()
  if setting:
    return setting != '0'
  try:
    socket.getaddrinfo(DOWNLOAD_HOST, 443)
  except OSError:
    return True
  return False


def _not_prepared(name: str, where: str, dataset: str, reason: str) -> str:
  return (f'TFDS dataset {name} is not prepared under {where} and {reason}: prepare it where '
          f'there is network (tfds build {name} --data_dir DIR) and pass '
          f'--config.data_dir=DIR, or read the extracted official files with '
          f'--config.data_source=folder --config.data_dir=DIR (docs/DATA.md: the {dataset} '
          'layout)')


class TfdsSource:
  """TFDS reader: encoded images (decoding skipped in the reader), decoded in the map.

  Each host reads its own `tfds.split_for_jax_process` share; a train epoch is that share
  shuffled with a seeded buffer (`config.shuffle_buffer`).
  """

  def __init__(self, config, process_index: int, process_count: int):
    tensorflow()  # first: TFDS imports TensorFlow (quietly, GPUs hidden: _tf.py)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    name = TFDS_NAMES[config.dataset]
    data_dir = config.data_dir or None
    where = data_dir or '~/tensorflow_datasets'
    try:
      self.builder = tfds.builder(name, data_dir=data_dir)
      if not self.builder.is_prepared():
        if offline():  # TFDS would retry its downloads for minutes before failing
          raise DataError(_not_prepared(name, where, config.dataset, 'there is no network to '
                                        'download it'))
        self.builder.download_and_prepare()
    except DataError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      reason = f'it could not be downloaded: {type(e).__name__}: {str(e).splitlines()[0]}'
      raise DataError(_not_prepared(name, where, config.dataset, reason)) from None
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


class ReidSource:
  """The Re-ID splits (train, query, gallery; val_query, val_gallery with config.val_split)
  as path tables; train labels, eval pids and camids."""

  def __init__(self, dataset: reid_sources.ReidDataset):
    tf = tensorflow()
    self.dataset = dataset
    splits = {**{name: getattr(dataset, name) for name in reid_sources.ALL_SPLITS},
              **dataset.val}
    self.paths = {name: tf.constant(split.paths) for name, split in splits.items()}
    self.pids = {name: tf.constant(split.pids) for name, split in splits.items()}
    self.camids = {name: tf.constant(split.camids) for name, split in splits.items()}
    self.sizes = {name: len(split) for name, split in splits.items()}

  def load(self, split: str, index):
    """Image `index` of `split`, uint8 [h, w, 3]."""
    tf = tensorflow()
    return preprocess.decode(tf.io.read_file(tf.gather(self.paths[split], index)))

  def eval_records(self, split: str, process_index: int, process_count: int):
    """This host's indices (int64) into `split`, in order."""
    indices = np.arange(process_index, self.sizes[split], process_count, dtype=np.int64)
    return tensorflow().data.Dataset.from_tensor_slices(indices)
