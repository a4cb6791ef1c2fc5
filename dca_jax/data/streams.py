"""The per-host tf.data train/eval streams of a source (`Input`; `ReidInput` for Re-ID).

Train stream (resume-exact): epoch e = step // steps_per_epoch has an order fixed by
(config.seed, e); augmentation keys are folded from (config.seed, e, the record's key). The
stream started at `start_step` is the tail of the stream started at 0 (only index records are
skipped, nothing is decoded). For the folder and generated sources epoch e is a global
permutation of the whole train split; host `process_index` takes every `process_count`-th
element of it, so the union of the hosts' batches at a step is the single-host batch whatever
the process count. For TFDS each host reads its own `tfds.split_for_jax_process` share and
shuffles it with a seeded buffer (`config.shuffle_buffer`). Every host yields
`steps_per_epoch` batches per epoch.

Eval stream: each host reads its share in order, pads the last batch with mask=False
elements, and every host yields ceil(ceil(num_test / process_count) / host eval batch size)
batches (the eval is a collective).

`ReidInput`: the train stream is identity-balanced (the source's sampler.PKSampler: every
batch holds P identities x K images); each host takes a contiguous slice of each global batch.
`eval_iter(split='query' | 'gallery')` streams the two retrieval sets (and 'val_query' |
'val_gallery', held-out train identities, with config.val_split > 0: reid_val.py).
See docs/REID_DATA.md.

Both read their source through the one protocol of sources.py (`Source`); they differ in the
transforms, the eval splits and what padding carries.
"""

from __future__ import annotations

import math
import os
from typing import Iterator

import numpy as np

from dca_jax.data import preprocess
from dca_jax.data._tf import tensorflow
from dca_jax.data.errors import DataError
from dca_jax.data.sources import DataInfo, Source

_NEVER_ENDS = 2**62  # Last epoch number of the "infinite" train stream.


def _num_eval_steps(num_examples: int, process_count: int, host_batch_size: int) -> int:
  """Batches every host yields for a split of `num_examples`: the largest host share, padded."""
  return math.ceil(math.ceil(num_examples / process_count) / host_batch_size)


class Input:
  """What the training loop, eval, predict and visualize use (`data.build_input`): FGVC-style
  classification streams, {'image', 'label'} (+ 'mask', 'index' in eval)."""

  EVAL_SPLITS = ('test',)     # what `eval_steps` counts
  VAL_SPLITS = ('val',)       # eval splits that exist with config.val_split > 0
  PADDING = {'label': 0}      # what a padded eval element carries beside a zero image
  DROP_TRAIN_ERRORS = True    # log and drop a train element TF cannot decode

  def __init__(self, spec, source: Source, info: DataInfo, process_index: int,
               process_count: int):
    self.spec, self.source, self.info = spec, source, info
    self.process_index, self.process_count = process_index, process_count
    self.host_batch_size = spec.batch_size // process_count
    self.host_eval_batch_size = spec.eval_batch_size // process_count
    self.steps_per_epoch = source.steps_per_epoch(spec.batch_size)
    self.eval_steps_per_split = {
        split: _num_eval_steps(size, process_count, self.host_eval_batch_size)
        for split, size in source.sizes.items() if split != 'train'}
    self.eval_steps = sum(self.eval_steps_per_split.get(split, 0) for split in self.EVAL_SPLITS)
    self.seed = spec.seed
    self.input_size, self.input_width = spec.input_size, spec.input_width
    parallel_calls = spec.num_parallel_calls
    self.num_parallel_calls = tensorflow().data.AUTOTUNE if parallel_calls <= 0 else parallel_calls

  # ---------------------------------------------------------------- transforms
  def train_transform(self, image, key):
    """A decoded train image -> its augmented uint8 [input_size, input_width, 3]."""
    spec = self.spec
    return preprocess.train_transform(image, key, resize_size=spec.resize_size,
                                      input_size=spec.input_size, input_width=spec.input_width,
                                      interpolation=spec.train_interpolation)

  def eval_transform(self, image):
    """A decoded eval image -> its uint8 [input_size, input_width, 3]."""
    spec = self.spec
    return preprocess.eval_transform(image, resize_size=spec.resize_size,
                                     input_size=spec.input_size, test_crop=spec.test_crop,
                                     input_width=spec.input_width)

  # ---------------------------------------------------------------- stream plumbing
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

  def _map(self, records, process):
    return records.map(process, num_parallel_calls=self.num_parallel_calls, deterministic=True)

  # ---------------------------------------------------------------- train
  def train_dataset(self, start_step: int = 0):
    """The infinite per-host train `tf.data.Dataset` (batched, augmented, uint8) from
    `start_step`."""
    if start_step < 0:
      raise ValueError(f'start_step={start_step} must be >= 0')
    if self.steps_per_epoch <= 0:
      raise DataError(f'the train split has {self.info.num_train} images, fewer than '
                      f'config.batch_size={self.spec.batch_size}: no full batch')
    tf = tensorflow()
    source, seed = self.source, self.seed
    host_epoch_size = self.steps_per_epoch * self.host_batch_size
    process_index, process_count = self.process_index, self.process_count

    def epoch_records(epoch):
      return source.train_records(epoch, host_epoch_size, seed, process_index, process_count)

    def process(record):
      element = source.element('train', record)
      key = preprocess.example_key(seed, record['epoch'], record['key'])
      return {'image': self.train_transform(element['image'], key), 'label': element['label']}

    start_epoch, offset = divmod(int(start_step), self.steps_per_epoch)
    stream = tf.data.Dataset.range(start_epoch, _NEVER_ENDS).flat_map(epoch_records)
    stream = self._map(stream.skip(offset * self.host_batch_size), process)  # skip: records only
    if self.DROP_TRAIN_ERRORS:
      # Last-resort net for a file the pre-scan passed but TF cannot decode (the pre-scan
      # normally removes such files first, keeping epochs aligned to batches).
      stream = stream.ignore_errors(log_warning=True)
    return self._batched(stream, self.host_batch_size)

  def train_iter(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Infinite iterator of {'image': uint8 [host batch, input_size, input_width, 3],
    'label': int32 [host batch]} for this host."""
    return self.train_dataset(start_step).as_numpy_iterator()

  # ---------------------------------------------------------------- eval
  def eval_dataset(self, with_index: bool = False, split: str | None = None):
    """The finite per-host eval `tf.data.Dataset` of `split` (default: the first of
    EVAL_SPLITS), padded: {'image', 'label', 'mask'} (+ 'index' with `with_index`)."""
    tf = tensorflow()
    split = split or self.EVAL_SPLITS[0]
    if split not in self.eval_steps_per_split:
      hint = ''
      if split in self.VAL_SPLITS:
        hint = (f" ({' / '.join(map(repr, self.VAL_SPLITS))} exist only with config.val_split "
                '> 0: set config.val_split > 0)')
      raise DataError(f'eval split {split!r}: this input has {sorted(self.eval_steps_per_split)}'
                      f'{hint}')
    source = self.source

    def process(record):
      element = source.element(split, record)
      out = {**element, 'image': self.eval_transform(element['image']),
             'mask': tf.constant(True)}
      if with_index:
        out['index'] = tf.cast(record['index'], tf.int64)
      return out

    padding = {'image': tf.zeros((self.input_size, self.input_width, 3), tf.uint8),
               **{name: tf.constant(value, tf.int32) for name, value in self.PADDING.items()},
               'mask': tf.constant(False)}
    if with_index:
      padding['index'] = tf.constant(-1, tf.int64)
    stream = self._map(source.eval_records(split, self.process_index, self.process_count),
                       process)
    # As in the train stream, a file TF cannot decode is logged and dropped; the padding keeps
    # every host at the same number of batches (verify_images=False, or the pre-scan missed it).
    stream = stream.ignore_errors(log_warning=True)
    stream = stream.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
    stream = stream.take(self.eval_steps_per_split[split] * self.host_eval_batch_size)
    return self._batched(stream, self.host_eval_batch_size)

  def eval_iter(self, with_index: bool = False,
                split: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Finite iterator of {'image', 'label', 'mask'} (+ 'index' when with_index) batches."""
    return self.eval_dataset(with_index, split).as_numpy_iterator()


class ReidInput(Input):
  """Re-ID: P x K train stream, query/gallery eval streams. See docs/REID_DATA.md.

  train_iter(start_step) -> {'image': uint8 [host batch, input_size, input_width, 3],
  'label': int32 [host batch]} (relabelled train id); every global batch is
  P = batch_size // num_instances identities x K images, identity by identity; host
  `process_index` gets the contiguous slice starting at process_index * host batch of it.
  eval_iter(split='query' | 'gallery' | 'val_query' | 'val_gallery') -> {'image', 'label'
  (original pid), 'camid', 'mask', 'index'} with padding (mask False, label/camid/index -1)
  as in the FGVC eval.
  """

  EVAL_SPLITS = ('query', 'gallery')
  VAL_SPLITS = ('val_query', 'val_gallery')
  PADDING = {'label': -1, 'camid': -1}
  DROP_TRAIN_ERRORS = False  # dropping one element would shift every later P x K group

  @property
  def sampler(self):
    """The P x K sampler of the train stream (the source's)."""
    return self.source.sampler

  def train_transform(self, image, key):
    spec = self.spec
    return preprocess.reid_train_transform(
        image, key, height=spec.input_size, width=spec.input_width, padding=spec.crop_padding,
        erasing=spec.random_erasing, normalization=spec.normalization,
        erasing_fill=spec.random_erasing_fill, erasing_max_area=spec.random_erasing_max_area,
        interpolation=spec.train_interpolation)

  def eval_transform(self, image):
    return preprocess.reid_eval_transform(image, height=self.spec.input_size,
                                          width=self.spec.input_width)

  def eval_dataset(self, with_index: bool = True, split: str | None = None):
    """Finite per-host stream of one retrieval split ('query' | 'gallery'; 'val_query' |
    'val_gallery' with config.val_split > 0), padded; it always carries 'index'."""
    del with_index
    if split is None:
      raise DataError("a Re-ID eval stream needs split='query' or split='gallery' (or "
                      f"{' / '.join(map(repr, self.VAL_SPLITS))} with config.val_split > 0)")
    return super().eval_dataset(True, split)

  def eval_iter(self, with_index: bool = True,
                split: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Finite iterator of {'image', 'label' (pid), 'camid', 'mask', 'index'} of `split`."""
    return self.eval_dataset(with_index, split).as_numpy_iterator()
