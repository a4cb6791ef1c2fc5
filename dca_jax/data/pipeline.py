"""`build_input`: the per-host tf.data train/eval streams for every source.

Train stream (resume-exact): epoch e = step // steps_per_epoch has an order fixed by
(config.seed, e); augmentation keys are folded from (config.seed, e, example id). The stream
started at `start_step` is the tail of the stream started at 0 (only index records are
skipped, nothing is decoded). For the folder and synthetic sources epoch e is a global
permutation of the whole train split; host `process_index` takes every `process_count`-th
element of it, so the union of the hosts' batches at a step is the single-host batch whatever
the process count. For TFDS each host reads its own `tfds.split_for_jax_process` share and
shuffles it with a seeded buffer (`config.shuffle_buffer`). Every host yields
`steps_per_epoch` batches per epoch.

Eval stream: each host reads its share in order, pads the last batch with mask=False
elements, and every host yields ceil(ceil(num_test / process_count) / host eval batch size)
batches (the eval is a collective).

task='reid' (`ReidInput`): the train stream is identity-balanced (sampler.PKSampler: every
batch holds P identities x K images); each host takes a contiguous slice of each global batch.
`eval_iter(split='query' | 'gallery')` streams the two retrieval sets (and 'val_query' |
'val_gallery', held-out train identities, with config.val_split > 0: reid_val.py).
See docs/REID_DATA.md.

The stream sources (what the streams read) live in sources.py (FGVC) and reid_sources.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterator

import numpy as np

from dca_jax import config_lib
from dca_jax.data import (fgvc_readers, folders, preprocess, reid_sources, reid_val, sampler,
                          sources,
                          synthetic)
from dca_jax.data._tf import tensorflow
from dca_jax.data.errors import DataError

TFDS_NAMES = fgvc_readers.TFDS_NAMES
REID_SPLITS = reid_sources.REID_SPLITS
_NEVER_ENDS = 2**62  # Last epoch number of the "infinite" train stream.


@dataclasses.dataclass
class DataInfo:
  num_classes: int
  class_names: list[str]
  num_train: int
  num_test: int
  # Extra (not required by callers): files the folder pre-scan dropped, as 'path (reason)'.
  skipped_files: list[str] = dataclasses.field(default_factory=list)
  # task='reid' (num_classes = train identities; class_names = their original ids;
  # num_test = num_query + num_gallery).
  task: str = 'fgvc'
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


def _num_eval_steps(num_examples: int, process_count: int, host_batch_size: int) -> int:
  """Batches every host yields for a split of `num_examples`: the largest host share, padded."""
  return math.ceil(math.ceil(num_examples / process_count) / host_batch_size)


# ============================================================================ Input
class Input:
  """What the training loop, eval, predict and visualize use. See `build_input`."""

  def __init__(self, config, source, info: DataInfo, process_index: int, process_count: int):
    self.config = config
    self.source = source
    self.info = info
    self.process_index, self.process_count = process_index, process_count
    self.host_batch_size = int(config.batch_size) // process_count
    self.host_eval_batch_size = int(config.eval_batch_size) // process_count
    self.steps_per_epoch = info.num_train // int(config.batch_size)
    self.eval_steps_per_split = {
        split: _num_eval_steps(size, process_count, self.host_eval_batch_size)
        for split, size in getattr(source, 'sizes', {'test': info.num_test}).items()
        if split != 'train'}
    self.eval_steps = self.eval_steps_per_split.get('test', 0)  # Re-ID: set by ReidInput
    self.seed = int(config.get('seed', 0))
    self.input_size = int(config.input_size)
    self.input_width = int(config.get('input_width') or config.input_size)
    self.resize_size = int(config.resize_size)
    self.train_interpolation = config.get('train_interpolation', 'bilinear')
    self.normalization = preprocess.normalization_name(config)
    self.test_crop = config.get('test_crop', 'center_crop')
    parallel_calls = int(config.get('num_parallel_calls', -1))
    self.num_parallel_calls = tensorflow().data.AUTOTUNE if parallel_calls <= 0 else parallel_calls

  def _options(self):
    options = tensorflow().data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = max(2, os.cpu_count() or 2)
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = True
    return options

  def _batched(self, stream, batch_size: int):
    """Full batches of `stream`, prefetched, with the pipeline's options."""
    stream = stream.batch(batch_size, drop_remainder=True)
    stream = stream.prefetch(tensorflow().data.AUTOTUNE)
    return stream.with_options(self._options())

  def _train_stream(self, start_step: int, epoch_records, process, *, drop_errors: bool):
    """The infinite batched stream from `start_step`, shared by FGVC and Re-ID.

    Args:
      start_step: the first step the stream yields.
      epoch_records: epoch (int64 scalar tensor) -> this host's index records of that epoch.
      process: index record -> {'image', 'label'}, decoded and augmented.
      drop_errors: log and drop the elements that `process` fails on.
    """
    if start_step < 0:
      raise ValueError(f'start_step={start_step} must be >= 0')
    start_epoch, offset = divmod(int(start_step), self.steps_per_epoch)
    stream = tensorflow().data.Dataset.range(start_epoch, _NEVER_ENDS)
    stream = stream.flat_map(epoch_records)
    stream = stream.skip(offset * self.host_batch_size)  # Index records only: cheap.
    stream = stream.map(process, num_parallel_calls=self.num_parallel_calls, deterministic=True)
    if drop_errors:
      stream = stream.ignore_errors(log_warning=True)
    return self._batched(stream, self.host_batch_size)

  def _eval_stream(self, records, process, padding: dict, num_steps: int):
    """`num_steps` eval batches of processed `records`, then `padding` (mask=False) elements."""
    tf = tensorflow()
    stream = records.map(process, num_parallel_calls=self.num_parallel_calls, deterministic=True)
    # As in the train stream, a file TF cannot decode is logged and dropped; the padding keeps
    # every host at `num_steps` batches (verify_images=False, or the pre-scan missed it).
    stream = stream.ignore_errors(log_warning=True)
    stream = stream.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
    stream = stream.take(num_steps * self.host_eval_batch_size)
    return self._batched(stream, self.host_eval_batch_size)

  # ---------------------------------------------------------------- train
  def train_dataset(self, start_step: int = 0):
    """The infinite per-host train `tf.data.Dataset` (batched, augmented, uint8)."""
    if self.steps_per_epoch <= 0:
      raise DataError(f'the train split has {self.info.num_train} images, fewer than '
                      f'config.batch_size={self.config.batch_size}: no full batch')
    source, seed = self.source, self.seed
    host_epoch_size = self.steps_per_epoch * self.host_batch_size
    process_index, process_count = self.process_index, self.process_count

    def epoch_records(epoch):
      return source.train_records(epoch, host_epoch_size, seed, process_index, process_count)

    def process(record):
      image, label = source.train_element(record)
      key = preprocess.example_key(seed, record['epoch'], record['id'])
      image = preprocess.train_transform(image, key, resize_size=self.resize_size,
                                         input_size=self.input_size,
                                         input_width=self.input_width,
                                         interpolation=self.train_interpolation)
      return {'image': image, 'label': label}

    # Last-resort net for a file the pre-scan passed but TF cannot decode: logged and dropped
    # (the pre-scan normally removes such files first, keeping epochs aligned to batches).
    return self._train_stream(start_step, epoch_records, process, drop_errors=True)

  def train_iter(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Infinite iterator of {'image': uint8 [host batch, input_size, input_width, 3],
    'label': int32 [host batch]} for this host."""
    return self.train_dataset(start_step).as_numpy_iterator()

  # ---------------------------------------------------------------- eval
  def eval_dataset(self, with_index: bool = False, split: str | None = None):
    """The finite per-host eval `tf.data.Dataset` of `split` ('test', or 'val' with
    config.val_split > 0), padded."""
    tf = tensorflow()
    split = split or 'test'
    if split not in self.eval_steps_per_split:
      hint = " (set config.val_split > 0 for a 'val' split)" if split == 'val' else ''
      raise DataError(f'eval split {split!r}: this input has {sorted(self.eval_steps_per_split)}'
                      f'{hint}')
    source, height, width = self.source, self.input_size, self.input_width

    def process(record):
      image, label = source.test_element(record, split)
      image = preprocess.eval_transform(image, resize_size=self.resize_size, input_size=height,
                                        test_crop=self.test_crop, input_width=width)
      out = {'image': image, 'label': label, 'mask': tf.constant(True)}
      if with_index:
        out['index'] = tf.cast(record['index'], tf.int64)
      return out

    padding = {'image': tf.zeros((height, width, 3), tf.uint8),
               'label': tf.constant(0, tf.int32), 'mask': tf.constant(False)}
    if with_index:
      padding['index'] = tf.constant(-1, tf.int64)
    records = source.test_records(self.process_index, self.process_count, split)
    return self._eval_stream(records, process, padding, self.eval_steps_per_split[split])

  def eval_iter(self, with_index: bool = False,
                split: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Finite iterator of {'image', 'label', 'mask'} (+ 'index' when with_index) batches."""
    return self.eval_dataset(with_index, split).as_numpy_iterator()


# ============================================================================ Re-ID
class ReidInput(Input):
  """task='reid': P x K train stream, query/gallery eval streams. See docs/REID_DATA.md.

  train_iter(start_step) -> {'image': uint8 [host batch, input_size, input_width, 3],
  'label': int32 [host batch]} (relabelled train id); every global batch is
  P = batch_size // num_instances identities x K images, identity by identity; host
  `process_index` gets the contiguous slice starting at process_index * host batch of it.
  eval_iter(split='query' | 'gallery' | 'val_query' | 'val_gallery') -> {'image', 'label'
  (original pid), 'camid', 'mask', 'index'} with padding (mask False, label/camid/index -1)
  as in the FGVC eval.
  """

  def __init__(self, config, source: sources.ReidSource, info: DataInfo,
               process_index: int, process_count: int):
    super().__init__(config, source, info, process_index, process_count)
    self.num_instances = int(config.get('num_instances', 4))
    self.crop_padding = int(config.get('crop_padding', 10))
    self.random_erasing = float(config.get('random_erasing', 0.5))
    self.erasing_fill = config.get('random_erasing_fill', 'random')
    self.erasing_max_area = float(config.get('random_erasing_max_area', 1 / 3))
    self.sampler = sampler.PKSampler(source.dataset.train.pids, int(config.batch_size),
                                     self.num_instances, self.seed)
    self.steps_per_epoch = self.sampler.steps_per_epoch
    self.eval_steps_per_split = {
        split: _num_eval_steps(size, process_count, self.host_eval_batch_size)
        for split, size in source.sizes.items() if split != 'train'}
    self.eval_steps = sum(self.eval_steps_per_split[split] for split in REID_SPLITS)

  # ---------------------------------------------------------------- train
  def train_dataset(self, start_step: int = 0):
    """The infinite per-host P x K train `tf.data.Dataset` (batched, augmented, uint8)."""
    tf = tensorflow()
    source, seed, pk_sampler = self.source, self.seed, self.sampler
    process_index, process_count = self.process_index, self.process_count
    host_epoch_size = self.steps_per_epoch * self.host_batch_size

    def epoch_records(epoch):
      indices, positions = tf.numpy_function(
          lambda epoch_number: pk_sampler.host_epoch(int(epoch_number), process_index,
                                                     process_count),
          [epoch], (tf.int64, tf.int64), stateful=False)
      indices.set_shape([host_epoch_size])
      positions.set_shape([host_epoch_size])
      return tf.data.Dataset.from_tensor_slices({'id': indices, 'pos': positions}).map(
          lambda record: {**record, 'epoch': epoch})

    def process(record):
      image = source.load('train', record['id'])
      # Keyed by the position in the epoch, not the image: an image drawn twice in an epoch
      # (identities with < K images) gets two different augmentations.
      key = preprocess.example_key(seed, record['epoch'], record['pos'])
      image = preprocess.reid_train_transform(
          image, key, height=self.input_size, width=self.input_width,
          padding=self.crop_padding, erasing=self.random_erasing,
          normalization=self.normalization, erasing_fill=self.erasing_fill,
          erasing_max_area=self.erasing_max_area, interpolation=self.train_interpolation)
      return {'image': image, 'label': tf.gather(source.pids['train'], record['id'])}

    # No dropping of errors here: dropping one element would shift every later P x K group.
    return self._train_stream(start_step, epoch_records, process, drop_errors=False)

  # ---------------------------------------------------------------- eval
  def eval_dataset(self, with_index: bool = True, split: str | None = None):
    """Finite per-host stream of one retrieval split ('query' | 'gallery'; 'val_query' |
    'val_gallery' with config.val_split > 0), padded."""
    del with_index  # Re-ID eval batches always carry 'index'.
    tf = tensorflow()
    if split not in self.eval_steps_per_split:
      raise DataError(f"task='reid' eval needs split='query' or split='gallery' (or "
                      f"{' / '.join(map(repr, reid_val.VAL_SPLITS))} with config.val_split > 0)"
                      f', got {split!r}')
    source, height, width = self.source, self.input_size, self.input_width

    def process(index):
      image = preprocess.reid_eval_transform(source.load(split, index), height=height,
                                             width=width)
      return {'image': image, 'label': tf.gather(source.pids[split], index),
              'camid': tf.gather(source.camids[split], index), 'mask': tf.constant(True),
              'index': index}

    padding = {'image': tf.zeros((height, width, 3), tf.uint8),
               'label': tf.constant(-1, tf.int32), 'camid': tf.constant(-1, tf.int32),
               'mask': tf.constant(False), 'index': tf.constant(-1, tf.int64)}
    records = source.eval_records(split, self.process_index, self.process_count)
    return self._eval_stream(records, process, padding, self.eval_steps_per_split[split])

  def eval_iter(self, with_index: bool = True,
                split: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Finite iterator of {'image', 'label' (pid), 'camid', 'mask', 'index'} of `split`."""
    return self.eval_dataset(with_index, split).as_numpy_iterator()


# ============================================================================ build
SOURCES = config_lib.CHOICES['data_source']


def _check_config(config, process_index: int, process_count: int) -> None:
  """What the data needs of the config (checked with the rest at the entry: dca_jax/checks.py;
  repeated here, cheaply, for direct callers) and what depends on the process count."""
  known = (*fgvc_readers.FGVC_DATASETS, *reid_sources.DATASETS)
  if config.dataset not in known:
    raise DataError(f'config.dataset={config.dataset!r} is not a dataset dca_jax reads: one of '
                    f'{known}')
  if config.data_source not in SOURCES:
    raise DataError(f'config.data_source={config.data_source!r} is not one of {SOURCES}')
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index={process_index} not in [0, {process_count})')
  for key in ('batch_size', 'eval_batch_size'):
    if int(config[key]) % process_count:
      raise DataError(f'config.{key}={config[key]} must be a multiple of the process count '
                      f'{process_count}')


def _skipped_files(skipped: list[tuple[str, str]]) -> list[str]:
  return [f'{path} ({reason})' for path, reason in skipped]


def _read_reid(config, with_train: bool) -> reid_sources.ReidDataset:
  """The Re-ID dataset of `config`: the synthetic set (generated if needed) or a folder."""
  source_name, dataset = config.data_source, config.dataset
  verify_images = bool(config.get('verify_images', True))
  if verify_images and not with_train:
    verify_images = ('query', 'gallery')
  if dataset != 'synthetic_reid':
    if source_name != 'folder':
      raise DataError(f"dataset={dataset!r} is read from its official layout: set "
                      f"data_source='folder' (got {source_name!r})")
    return reid_sources.read_reid(dataset, config.data_dir, verify_images)
  # Imported here so that `python -m dca_jax.data.synthetic_reid` runs without a warning.
  from dca_jax.data import synthetic_reid  # pylint: disable=g-import-not-at-top
  if source_name != 'synthetic':
    raise DataError(f"dataset='synthetic_reid' needs data_source='synthetic', got "
                    f"{source_name!r}")
  params = synthetic_reid.params_from_config(config)
  folder = synthetic_reid.ensure(params, config.get('data_dir') or '')
  return reid_sources.read_market1501(
      folder, verify_images,
      version=f'synthetic_reid (Market-1501 layout, {os.path.basename(folder)})')


def build_reid(config, process_index: int, process_count: int, with_train: bool) -> ReidInput:
  """A Re-ID dataset: the P x K train stream and query/gallery (and, with config.val_split > 0,
  val_query/val_gallery of held-out train identities: reid_val.py)."""
  dataset = reid_val.hold_out(_read_reid(config, with_train),
                             float(config.get('val_split', 0.0)))
  splits = {**{which: getattr(dataset, which) for which in reid_sources.ALL_SPLITS},
            **dataset.val}
  info = DataInfo(
      num_classes=dataset.num_train_ids,
      class_names=[str(int(pid)) for pid in dataset.train_pids],
      num_train=len(dataset.train), num_test=len(dataset.query) + len(dataset.gallery),
      skipped_files=_skipped_files(dataset.skipped), task='reid', version=dataset.version,
      num_query=len(dataset.query), num_gallery=len(dataset.gallery),
      num_junk=dataset.num_junk, train_pids=[int(pid) for pid in dataset.train_pids],
      root=dataset.root, protocol=dataset.protocol,
      num_val=sum(len(split) for split in dataset.val.values()),
      num_val_ids=len(set().union(*(split.pids.tolist() for split in dataset.val.values()))),
      splits={which: {'images': len(split), 'identities': int(np.unique(split.pids).size)}
              for which, split in splits.items()})
  return ReidInput(config, sources.ReidSource(dataset), info, process_index,
                   process_count)


def _synthetic_source(config):
  """(source, class names, skipped files) of the generated FGVC set."""
  if config.data_source != config.dataset:
    raise DataError(f'dataset={config.dataset!r} with data_source={config.data_source!r}: the '
                    "synthetic set needs both dataset='synthetic' and data_source='synthetic'")
  generated = synthetic.generate(
      int(config.num_classes) or synthetic.DEFAULT_CLASSES, int(config.synthetic_num_train),
      int(config.synthetic_num_test),
      int(config.synthetic_image_size), int(config.synthetic_seed),
      int(config.synthetic_distractors), float(config.synthetic_detail_size))
  if not len(generated.train_labels) or not len(generated.test_labels):
    raise DataError('synthetic split is empty: set config.synthetic_num_train / '
                    'synthetic_num_test > 0')
  return (sources.SyntheticSource(generated, float(config.get('val_split', 0.0))),
          generated.class_names, [])


def _folder_source(config, with_train: bool):
  """(source, class names, skipped files) of an official layout, pre-scanned if asked."""
  dataset = fgvc_readers.read_folder(config.dataset, config.data_dir)
  if config.get('verify_images', True):
    dataset = folders.drop_unreadable(  # Its warning points at the caller of build_input.
        dataset, splits=('train', 'test') if with_train else ('test',), stacklevel=4)
  return (sources.FolderSource(dataset, float(config.get('val_split', 0.0))), dataset.class_names,
          _skipped_files(dataset.skipped))


def _tfds_source(config, process_index: int, process_count: int):
  """(source, class names, skipped files) of a TFDS dataset, this host's shares."""
  if config.dataset not in TFDS_NAMES:
    raise DataError(f'dataset {config.dataset!r} has no TFDS builder; use data_source=folder '
                    f'(TFDS datasets: {sorted(TFDS_NAMES)})')
  if config.get('val_split', 0.0) > 0:
    raise DataError('config.val_split needs data_source=folder or synthetic (a TFDS source '
                    'streams its train split; prepare the folder layout instead)')
  source = sources.TfdsSource(config, process_index, process_count)
  if not source.num_train or not source.num_test:
    raise DataError(f'TFDS {TFDS_NAMES[config.dataset]} under {config.data_dir or "default"}: '
                    f'empty split (train={source.num_train}, test={source.num_test})')
  return source, source.class_names, []


def build_input(config, process_index: int = 0, process_count: int = 1, *,
                with_train: bool = True) -> Input:
  """Builds this host's input for `config` (an ml_collections ConfigDict from config_lib): a
  Re-ID dataset's P x K stream and query/gallery splits (`build_reid`), else the
  classification splits (`build_fgvc`). The dataset belongs to the config's task (checked at
  the entry, dca_jax/checks.py).

  with_train=False (eval, visualize, predict): the train split is listed but never pre-scanned
  or read.
  """
  _check_config(config, process_index, process_count)
  build = build_reid if config.dataset in reid_sources.DATASETS else build_fgvc
  return build(config, process_index, process_count, with_train)


def build_fgvc(config, process_index: int, process_count: int, with_train: bool) -> Input:
  """A classification dataset: TFDS, an official folder layout or the synthetic set; train,
  test and (config.val_split > 0) val."""
  source_name, dataset = config.data_source, config.dataset
  if source_name == 'synthetic' or dataset == 'synthetic':
    source, class_names, skipped_files = _synthetic_source(config)
  elif source_name == 'folder':
    source, class_names, skipped_files = _folder_source(config, with_train)
  else:  # tfds
    source, class_names, skipped_files = _tfds_source(config, process_index, process_count)
  info = DataInfo(num_classes=len(class_names), class_names=list(class_names),
                  num_train=source.num_train, num_test=source.num_test,
                  skipped_files=skipped_files, version=f'{dataset} ({source_name})',
                  num_val=getattr(source, 'sizes', {}).get('val', 0),
                  splits=_class_splits(source))
  return Input(config, source, info, process_index, process_count)


def _class_splits(source) -> dict:
  """{split: {'images', 'classes'}} of a source with label tables (TFDS: images only)."""
  if not hasattr(source, 'labels'):
    return {'train': {'images': source.num_train}, 'test': {'images': source.num_test}}
  return {split: {'images': int(source.sizes[split]),
                  'classes': int(np.unique(labels.numpy()).size)}
          for split, labels in source.labels.items()}
