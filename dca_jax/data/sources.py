"""What the streams read: `DataInfo` (what was read) and the stream sources, one protocol
(`Source`): this host's records of a split, and a record -> its decoded element.
`FolderSource` (an extracted layout, fgvc_readers.py), `ArraySource` (images in memory: a
generated set), `TfdsSource` (a TFDS builder) and `ReidSource` (the splits of a Re-ID layout,
reid_sources.py). builders.py makes them from an `InputSpec`.
"""

from __future__ import annotations

import dataclasses
import os
import socket

import numpy as np

from dca_jax.data import preprocess
from dca_jax.data._tf import tensorflow
from dca_jax.data.errors import DataError
from dca_jax.data.folders import FolderDataset
from dca_jax.data.sampler import PKSampler


@dataclasses.dataclass
class DataInfo:
  num_classes: int
  class_names: list[str]
  num_train: int
  num_test: int
  # Extra (not required by callers): files the folder pre-scan dropped, as 'path (reason)'.
  skipped_files: list[str] = dataclasses.field(default_factory=list)
  # What num_classes counts, in words ('classes'; Re-ID: 'train identities', class_names =
  # their original ids, num_test = num_query + num_gallery).
  counted: str = 'classes'
  version: str = ''         # what was read, e.g. 'MSMT17_V2 (train+val)'
  num_query: int = 0
  num_gallery: int = 0
  num_junk: int = 0         # pid -1 images dropped by the reader
  train_pids: list[int] = dataclasses.field(default_factory=list)  # label -> original id
  root: str = ''            # folder read (Re-ID)
  num_val: int = 0          # train images held out as the validation split (val_split)
  num_val_ids: int = 0      # Re-ID: train identities held out (val_split; not in num_classes)
  protocol: str = ''        # Re-ID: 'camera-aware' | 'no-camera' (reid_sources.ReidDataset)
  # {split: {'images': n, 'classes' | 'identities': k}}: what a result was measured on
  splits: dict = dataclasses.field(default_factory=dict)


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


class Source:
  """The protocol of every stream source: `streams.Input` calls only these.

    sizes                          {split: images}: 'train' and the eval splits
    steps_per_epoch(batch_size)    full train batches of an epoch (the same every epoch)
    train_records(epoch, host_epoch_size, seed, process_index, process_count)
                                   this host's records of train epoch `epoch` (an int64 scalar
                                   tensor): a tf.data Dataset of dicts holding 'epoch' and 'key'
                                   (the id the record's augmentation is keyed by)
    eval_records(split, process_index, process_count)
                                   this host's records of an eval split, in order: dicts
                                   holding 'index' (what an eval batch's 'index' reports)
    element(split, record)         record -> {'image': uint8 [h, w, 3], 'label': int32, ...}
                                   (Re-ID adds 'camid')
  """
  sizes: dict

  def steps_per_epoch(self, batch_size: int) -> int:
    return self.sizes['train'] // batch_size


def _host_indices(size: int, process_index: int, process_count: int):
  """This host's {'index'} records of a split of `size` images: every process_count-th one."""
  indices = np.arange(process_index, size, process_count, dtype=np.int64)
  return tensorflow().data.Dataset.from_tensor_slices({'index': indices})


class IndexedSource(Source):
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
    tf = tensorflow()
    permutation = tf.random.experimental.stateless_shuffle(
        tf.range(self.num_train, dtype=tf.int64),
        seed=tf.stack([tf.constant(_seed_mix(seed, 1), tf.int64), epoch]))
    host_ids = permutation[process_index::process_count][:host_epoch_size]
    return tf.data.Dataset.from_tensor_slices(host_ids).map(
        lambda example_id: {'index': example_id, 'key': example_id, 'epoch': epoch})

  def eval_records(self, split: str, process_index: int, process_count: int):
    return _host_indices(self.sizes[split], process_index, process_count)

  def element(self, split: str, record) -> dict:
    return {'image': self.load(split, record['index']),
            'label': tensorflow().gather(self.labels[split], record['index'])}


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


class ArraySource(IndexedSource):
  """Images held in memory (uint8 [n, h, w, 3] per split, with their labels): a generated set.
  With `val_split` > 0 the held-out train images (`hold_out`) form 'val'."""

  def __init__(self, images: dict, labels: dict, val_split: float = 0.0):
    images, labels = dict(images), dict(labels)
    if val_split > 0:
      held = hold_out(labels['train'], val_split)
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


class TfdsSource(Source):
  """TFDS reader: encoded images (decoding skipped in the reader), decoded in the map.

  Each host reads its own `tfds.split_for_jax_process` share; a train epoch is that share
  shuffled with a seeded buffer (`config.shuffle_buffer`). Its splits: 'train' and 'test'.
  """

  def __init__(self, name: str, spec, process_index: int, process_count: int):
    """`name`: the TFDS builder (the registry entry's `tfds_name`) of `spec.dataset`."""
    tensorflow()  # first: TFDS imports TensorFlow (quietly, GPUs hidden: _tf.py)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    data_dir = spec.data_dir or None
    where = data_dir or '~/tensorflow_datasets'
    try:
      self.builder = tfds.builder(name, data_dir=data_dir)
      if not self.builder.is_prepared():
        if offline():  # TFDS would retry its downloads for minutes before failing
          raise DataError(_not_prepared(name, where, spec.dataset, 'there is no network to '
                                        'download it'))
        self.builder.download_and_prepare()
    except DataError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      reason = f'it could not be downloaded: {type(e).__name__}: {str(e).splitlines()[0]}'
      raise DataError(_not_prepared(name, where, spec.dataset, reason)) from None
    self.class_names = list(self.builder.info.features['label'].names)
    self.decoders = tfds.decode.PartialDecoding(
        {'image': True, 'label': True}, decoders={'image': tfds.decode.SkipDecoding()})
    self.num_train = self._split_size('train')
    self.num_test = self._split_size('test')
    self.sizes = {'train': self.num_train, 'test': self.num_test}
    self.shuffle_buffer = spec.shuffle_buffer
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
    """The records also carry the encoded image ('raw') and its 'label'."""
    del process_index, process_count  # The share was chosen in __init__.
    tf = tensorflow()
    epoch_seed = tf.bitwise.bitwise_xor(tf.constant(_seed_mix(seed, 2), tf.int64),
                                        epoch * 1_000_003)
    examples = self._read('train').shuffle(self.shuffle_buffer, seed=epoch_seed,
                                           reshuffle_each_iteration=False)
    return examples.take(host_epoch_size).map(
        lambda position, example: {'key': position, 'epoch': epoch, 'raw': example['image'],
                                   'label': example['label']})

  def eval_records(self, split: str, process_index: int, process_count: int):
    """'index' is the position inside this host's share of the test split."""
    del split, process_index, process_count  # The share was chosen in __init__; test only.
    return self._read('test').map(
        lambda position, example: {'index': position, 'raw': example['image'],
                                   'label': example['label']})

  def element(self, split: str, record) -> dict:
    del split
    tf = tensorflow()
    return {'image': preprocess.decode(record['raw']),
            'label': tf.cast(record['label'], tf.int32)}


class ReidSource(Source):
  """The Re-ID splits (train, query, gallery; val_query, val_gallery with config.val_split)
  as path tables; train labels, eval pids and camids. Train epochs come from `sampler`
  (P x K batches: sampler.py), each host taking its contiguous slice of every batch."""

  def __init__(self, dataset, sampler: PKSampler):
    """`dataset`: a reid_sources.ReidDataset; `sampler` over its train labels."""
    tf = tensorflow()
    self.dataset, self.sampler = dataset, sampler
    splits = dataset.splits()
    self.paths = {name: tf.constant(split.paths) for name, split in splits.items()}
    self.pids = {name: tf.constant(split.pids) for name, split in splits.items()}
    self.camids = {name: tf.constant(split.camids) for name, split in splits.items()}
    self.sizes = {name: len(split) for name, split in splits.items()}

  def steps_per_epoch(self, batch_size: int) -> int:
    del batch_size  # The sampler's (it was built with it).
    return self.sampler.steps_per_epoch

  def load(self, split: str, index):
    """Image `index` of `split`, uint8 [h, w, 3]."""
    tf = tensorflow()
    return preprocess.decode(tf.io.read_file(tf.gather(self.paths[split], index)))

  def train_records(self, epoch, host_epoch_size: int, seed: int, process_index: int,
                    process_count: int):
    """Keyed by the position in the epoch, not the image: an image drawn twice in an epoch
    (identities with < K images) gets two different augmentations."""
    del seed  # The sampler's.
    tf = tensorflow()
    sampler = self.sampler
    indices, positions = tf.numpy_function(
        lambda epoch_number: sampler.host_epoch(int(epoch_number), process_index, process_count),
        [epoch], (tf.int64, tf.int64), stateful=False)
    indices.set_shape([host_epoch_size])
    positions.set_shape([host_epoch_size])
    return tf.data.Dataset.from_tensor_slices({'index': indices, 'key': positions}).map(
        lambda record: {**record, 'epoch': epoch})

  def eval_records(self, split: str, process_index: int, process_count: int):
    return _host_indices(self.sizes[split], process_index, process_count)

  def element(self, split: str, record) -> dict:
    """'label': the relabelled train id (train) or the original id (eval splits)."""
    tf = tensorflow()
    index = record['index']
    return {'image': self.load(split, index), 'label': tf.gather(self.pids[split], index),
            'camid': tf.gather(self.camids[split], index)}
