"""`build_input`: the per-host tf.data train/eval streams for every source.

Train stream (resume-exact): epoch e = step // steps_per_epoch has an order fixed by
(config.seed, e); augmentation keys are folded from (config.seed, e, example id). The stream
started at `start_step` is the tail of the stream started at 0 (only index records are
skipped, nothing is decoded). For the folder and synthetic sources epoch e is a global
permutation of the whole train split; host p takes every P-th element of it, so the union of
the hosts' batches at a step is the single-host batch whatever P is. For TFDS each host reads
its own `tfds.split_for_jax_process` share and shuffles it with a seeded buffer
(`config.shuffle_buffer`). Every host yields `steps_per_epoch` batches per epoch.

Eval stream: host p reads its share in order, pads the last batch with mask=False elements,
and every host yields ceil(ceil(N / P) / b) batches (the eval is a collective).

task='reid' (`ReidInput`): the train stream is identity-balanced (sampler.PKSampler: every
batch holds P identities x K images); host p takes a contiguous slice of each global batch.
`eval_iter(split='query' | 'gallery')` streams the two retrieval sets. See docs/REID_DATA.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterator

import numpy as np
from absl import logging

from dca_jax import config_lib
from dca_jax.data import preprocess, reid_sources, sampler, sources, synthetic
from dca_jax.data._tf import tf
from dca_jax.data.errors import DataError

TFDS_NAMES = sources.TFDS_NAMES
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
    self.eval_steps = math.ceil(math.ceil(info.num_test / process_count) /
                                self.host_eval_batch_size)
    self.seed = int(config.get('seed', 0))
    self.input_size = int(config.input_size)
    self.input_width = int(config.get('input_width') or config.input_size)
    self.resize_size = int(config.resize_size)
    self.normalization = preprocess._normalization_name(config)  # pylint: disable=protected-access
    self.test_crop = config.get('test_crop', 'center_crop')
    npc = int(config.get('num_parallel_calls', -1))
    self.num_parallel_calls = tf().data.AUTOTUNE if npc <= 0 else npc

  def _options(self):
    t = tf()
    opts = t.data.Options()
    opts.deterministic = True
    opts.threading.private_threadpool_size = max(2, os.cpu_count() or 2)
    opts.threading.max_intra_op_parallelism = 1
    opts.autotune.enabled = True
    return opts

  # ---------------------------------------------------------------- train
  def train_dataset(self, start_step: int = 0):
    """The infinite per-host train `tf.data.Dataset` (batched, normalised)."""
    t = tf()
    if self.steps_per_epoch <= 0:
      raise DataError(f'the train split has {self.info.num_train} images, fewer than '
                      f'config.batch_size={self.config.batch_size}: no full batch')
    if start_step < 0:
      raise ValueError(f'start_step={start_step} must be >= 0')
    start_epoch, offset = divmod(int(start_step), self.steps_per_epoch)
    b, src, seed = self.host_batch_size, self.source, self.seed
    n_host = self.steps_per_epoch * b
    p, P = self.process_index, self.process_count

    def process(elem):
      image, label = src.train_element(elem)
      key = preprocess.example_key(seed, elem['epoch'], elem['id'])
      image = preprocess.train_transform(image, key, resize_size=self.resize_size,
                                         input_size=self.input_size,
                                         input_width=self.input_width)
      return {'image': image, 'label': label}

    ds = t.data.Dataset.range(start_epoch, _NEVER_ENDS)
    ds = ds.flat_map(lambda e: src.train_epoch(e, n_host, seed, p, P))
    ds = ds.skip(offset * b)  # Index records only: cheap.
    ds = ds.map(process, num_parallel_calls=self.num_parallel_calls, deterministic=True)
    # Last-resort net for a file the pre-scan passed but TF cannot decode: logged and dropped
    # (the pre-scan normally removes such files first, keeping epochs aligned to batches).
    ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(b, drop_remainder=True)
    ds = ds.prefetch(t.data.AUTOTUNE)
    return ds.with_options(self._options())

  def train_iter(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Infinite iterator of {'image': uint8 [b, S, W, 3], 'label': i32 [b]} for this host."""
    return self.train_dataset(start_step).as_numpy_iterator()

  # ---------------------------------------------------------------- eval
  def eval_dataset(self, with_index: bool = False, split: str | None = None):
    t = tf()
    if split not in (None, 'test'):
      raise DataError(f"eval split {split!r}: task='fgvc' has one eval split, 'test'")
    b, src, S, W = self.host_eval_batch_size, self.source, self.input_size, self.input_width

    def process(elem):
      image, label = src.test_element(elem)
      image = preprocess.eval_transform(image, resize_size=self.resize_size, input_size=S,
                                        test_crop=self.test_crop, input_width=W)
      out = {'image': image, 'label': label, 'mask': t.constant(True)}
      if with_index:
        out['index'] = t.cast(elem['index'], t.int64)
      return out

    pad = {'image': t.zeros((S, W, 3), t.uint8), 'label': t.constant(0, t.int32),
           'mask': t.constant(False)}
    if with_index:
      pad['index'] = t.constant(-1, t.int64)
    ds = src.test_host(self.process_index, self.process_count)
    ds = ds.map(process, num_parallel_calls=self.num_parallel_calls, deterministic=True)
    ds = ds.ignore_errors(log_warning=True)  # See train_dataset; padding keeps hosts aligned.
    ds = ds.concatenate(t.data.Dataset.from_tensors(pad).repeat())
    ds = ds.take(self.eval_steps * b).batch(b, drop_remainder=True)
    ds = ds.prefetch(t.data.AUTOTUNE)
    return ds.with_options(self._options())

  def eval_iter(self, with_index: bool = False,
                split: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Finite iterator of {'image', 'label', 'mask'} (+ 'index' when with_index) batches."""
    return self.eval_dataset(with_index, split).as_numpy_iterator()


# ============================================================================ Re-ID
class ReidInput(Input):
  """task='reid': P x K train stream, query/gallery eval streams. See docs/REID_DATA.md.

  train_iter(start_step) -> {'image': uint8 [b, H, W, 3], 'label': i32 [b]} (relabelled train id);
  every global batch is P = batch_size // num_instances identities x K images, identity by
  identity; host p gets the contiguous slice [p * b, (p + 1) * b) of it.
  eval_iter(split='query' | 'gallery') -> {'image', 'label' (original pid), 'camid', 'mask',
  'index'} with padding (mask False, label/camid/index -1) as in the FGVC eval.
  """

  def __init__(self, config, source: reid_sources.ReidSource, info: DataInfo, process_index: int,
               process_count: int):
    super().__init__(config, source, info, process_index, process_count)
    self.num_instances = int(config.get('num_instances', 4))
    self.crop_padding = int(config.get('crop_padding', 10))
    self.random_erasing = float(config.get('random_erasing', 0.5))
    self.erasing_fill = config.get('random_erasing_fill', 'random')
    self.sampler = sampler.PKSampler(source.dataset.train.pids, int(config.batch_size),
                                     self.num_instances, self.seed)
    self.steps_per_epoch = self.sampler.steps_per_epoch
    self.eval_steps_per_split = {
        w: math.ceil(math.ceil(source.sizes[w] / process_count) / self.host_eval_batch_size)
        for w in REID_SPLITS}
    self.eval_steps = sum(self.eval_steps_per_split.values())

  # ---------------------------------------------------------------- train
  def train_dataset(self, start_step: int = 0):
    """The infinite per-host P x K train `tf.data.Dataset` (batched, augmented)."""
    t = tf()
    if start_step < 0:
      raise ValueError(f'start_step={start_step} must be >= 0')
    start_epoch, offset = divmod(int(start_step), self.steps_per_epoch)
    b, src, seed, pk = self.host_batch_size, self.source, self.seed, self.sampler
    p, P = self.process_index, self.process_count
    n_host = self.steps_per_epoch * b

    def epoch_elements(epoch):
      idx, pos = t.numpy_function(lambda e: pk.host_epoch(int(e), p, P), [epoch],
                                  (t.int64, t.int64), stateful=False)
      idx.set_shape([n_host])
      pos.set_shape([n_host])
      return t.data.Dataset.from_tensor_slices({'id': idx, 'pos': pos}).map(
          lambda e: {**e, 'epoch': epoch})

    def process(elem):
      image = src.load('train', elem['id'])
      # Keyed by the position in the epoch, not the image: an image drawn twice in an epoch
      # (identities with < K images) gets two different augmentations.
      key = preprocess.example_key(seed, elem['epoch'], elem['pos'])
      image = preprocess.reid_train_transform(
          image, key, height=self.input_size, width=self.input_width,
          padding=self.crop_padding, erasing=self.random_erasing,
          normalization=self.normalization, erasing_fill=self.erasing_fill)
      return {'image': image, 'label': t.gather(src.pids['train'], elem['id'])}

    ds = t.data.Dataset.range(start_epoch, _NEVER_ENDS)
    ds = ds.flat_map(epoch_elements)
    ds = ds.skip(offset * b)  # Index records only: cheap.
    ds = ds.map(process, num_parallel_calls=self.num_parallel_calls, deterministic=True)
    # No ignore_errors here: dropping one element would shift every later P x K group.
    ds = ds.batch(b, drop_remainder=True)
    ds = ds.prefetch(t.data.AUTOTUNE)
    return ds.with_options(self._options())

  # ---------------------------------------------------------------- eval
  def eval_dataset(self, with_index: bool = True, split: str | None = None):
    """Finite per-host stream of one retrieval split ('query' | 'gallery'), padded."""
    del with_index  # Re-ID eval batches always carry 'index'.
    t = tf()
    if split not in REID_SPLITS:
      raise DataError(f"task='reid' eval needs split='query' or split='gallery', got {split!r}")
    b, src, H, W = self.host_eval_batch_size, self.source, self.input_size, self.input_width
    idx = np.arange(self.process_index, src.sizes[split], self.process_count, dtype=np.int64)

    def process(i):
      image = preprocess.reid_eval_transform(src.load(split, i), height=H, width=W)
      return {'image': image, 'label': t.gather(src.pids[split], i),
              'camid': t.gather(src.camids[split], i), 'mask': t.constant(True), 'index': i}

    pad = {'image': t.zeros((H, W, 3), t.uint8), 'label': t.constant(-1, t.int32),
           'camid': t.constant(-1, t.int32), 'mask': t.constant(False),
           'index': t.constant(-1, t.int64)}
    ds = t.data.Dataset.from_tensor_slices(idx)
    ds = ds.map(process, num_parallel_calls=self.num_parallel_calls, deterministic=True)
    ds = ds.ignore_errors(log_warning=True)  # As FGVC (verify_images=False); padding aligns.
    ds = ds.concatenate(t.data.Dataset.from_tensors(pad).repeat())
    ds = ds.take(self.eval_steps_per_split[split] * b).batch(b, drop_remainder=True)
    ds = ds.prefetch(t.data.AUTOTUNE)
    return ds.with_options(self._options())

  def eval_iter(self, with_index: bool = True,
                split: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Finite iterator of {'image', 'label' (pid), 'camid', 'mask', 'index'} of `split`."""
    return self.eval_dataset(with_index, split).as_numpy_iterator()


def _build_reid(config, process_index: int, process_count: int, with_train: bool) -> ReidInput:
  source_name, dataset = config.data_source, config.dataset
  verify = bool(config.get('verify_images', True))
  if verify and not with_train:
    verify = ('query', 'gallery')
  if dataset == 'synthetic_reid':
    # Imported here so that `python -m dca_jax.data.synthetic_reid` runs without a warning.
    from dca_jax.data import synthetic_reid  # pylint: disable=g-import-not-at-top
    if source_name != 'synthetic':
      raise DataError(f"dataset='synthetic_reid' needs data_source='synthetic', got "
                      f"{source_name!r}")
    params = synthetic_reid.params_from_config(config)
    folder = synthetic_reid.ensure(params, config.get('data_dir') or '')
    ds = reid_sources.read_market1501(
        folder, verify, version=f'synthetic_reid (Market-1501 layout, {os.path.basename(folder)})')
  else:
    if source_name != 'folder':
      raise DataError(f"dataset={dataset!r} is read from its official layout: set "
                      f"data_source='folder' (got {source_name!r})")
    ds = reid_sources.read_reid(dataset, config.data_dir, verify)
  info = DataInfo(
      num_classes=ds.num_train_ids, class_names=[str(int(x)) for x in ds.train_pids],
      num_train=len(ds.train), num_test=len(ds.query) + len(ds.gallery),
      skipped_files=[f'{p} ({r})' for p, r in ds.skipped], task='reid', version=ds.version,
      num_query=len(ds.query), num_gallery=len(ds.gallery), num_junk=ds.num_junk,
      train_pids=[int(x) for x in ds.train_pids], root=ds.root)
  if int(config.get('num_classes', info.num_classes)) != info.num_classes:
    logging.warning('config.num_classes=%s but %s has %d train identities (use '
                    'info.num_classes)', config.num_classes, ds.version, info.num_classes)
  return ReidInput(config, reid_sources.ReidSource(ds), info, process_index, process_count)


# ============================================================================ build
def _check_config(config, process_index: int, process_count: int) -> None:
  """config_lib.validate (the one validator), then what depends on the process count."""
  config_lib.validate(config)
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index={process_index} not in [0, {process_count})')
  for key in ('batch_size', 'eval_batch_size'):
    if int(config[key]) % process_count:
      raise DataError(f'config.{key}={config[key]} must be a multiple of the process count '
                      f'{process_count}')


def build_input(config, process_index: int = 0, process_count: int = 1, *,
                with_train: bool = True) -> Input:
  """Builds this host's input for `config` (an ml_collections ConfigDict from config_lib).

  with_train=False (eval, visualize, predict): the train split is listed but never pre-scanned
  or read.
  """
  _check_config(config, process_index, process_count)
  if config.get('task', 'fgvc') == 'reid':
    return _build_reid(config, process_index, process_count, with_train)
  source_name, dataset = config.data_source, config.dataset
  skipped = []
  if source_name == 'synthetic' or dataset == 'synthetic':
    if source_name != dataset:
      raise DataError(f'dataset={dataset!r} with data_source={source_name!r}: the synthetic '
                      "set needs both dataset='synthetic' and data_source='synthetic'")
    d = synthetic.generate(int(config.num_classes), int(config.synthetic_num_train),
                           int(config.synthetic_num_test), int(config.synthetic_image_size),
                           int(config.synthetic_seed), int(config.synthetic_distractors),
                           float(config.synthetic_detail_size))
    if not len(d.train_labels) or not len(d.test_labels):
      raise DataError('synthetic split is empty: set config.synthetic_num_train / '
                      'synthetic_num_test > 0')
    src, names = sources.SyntheticSource(d), d.class_names
  elif source_name == 'folder':
    fd = sources.read_folder(dataset, config.data_dir)
    if config.get('verify_images', True):
      fd = sources.drop_unreadable(fd, splits=('train', 'test') if with_train else ('test',))
    skipped = [f'{p} ({r})' for p, r in fd.skipped]
    src, names = sources.FolderSource(fd), fd.class_names
  else:  # tfds
    if dataset not in TFDS_NAMES:
      raise DataError(f'dataset {dataset!r} has no TFDS builder; use data_source=folder '
                      f'(TFDS datasets: {sorted(TFDS_NAMES)})')
    src = sources.TfdsSource(config, process_index, process_count)
    names = src.class_names
    if not src.num_train or not src.num_test:
      raise DataError(f'TFDS {TFDS_NAMES[dataset]} under {config.data_dir or "default"}: '
                      f'empty split (train={src.num_train}, test={src.num_test})')
  info = DataInfo(num_classes=len(names), class_names=list(names), num_train=src.num_train,
                  num_test=src.num_test, skipped_files=skipped,
                  version=f'{dataset} ({source_name})')
  if int(config.get('num_classes', info.num_classes)) != info.num_classes:
    logging.warning('config.num_classes=%s but %s/%s has %d classes (use info.num_classes)',
                    config.num_classes, dataset, source_name, info.num_classes)
  return Input(config, src, info, process_index, process_count)
