"""How each kind of dataset becomes a stream source: builders `(spec, process_index,
process_count, with_train) -> (source, DataInfo)`, which registry.py gives its entries.

    folder(read)          an FGVC layout read by `read(data_dir) -> FolderDataset`
    tfds(name)            an FGVC TFDS builder
    synthetic             the generated FGVC set (synthetic.py), in memory
    reid_folder(read)     a Re-ID layout read by `read(data_dir, verify_images) -> ReidDataset`
    reid_generated(read)  the generated Re-ID set (synthetic_reid.py), written once, then read
                          by `read` (the Market-1501 reader)

with_train=False (eval, visualize, predict): the train split is listed but never pre-scanned
or read.
"""

from __future__ import annotations

import os

import numpy as np

from dca_jax.data import folders, reid_val, sampler, sources, synthetic
from dca_jax.data.errors import DataError


def _skipped_files(skipped: list[tuple[str, str]]) -> list[str]:
  return [f'{path} ({reason})' for path, reason in skipped]


def _class_splits(source) -> dict:
  """{split: {'images', 'classes'}} of a source with label tables (TFDS: images only)."""
  if not hasattr(source, 'labels'):
    return {'train': {'images': source.num_train}, 'test': {'images': source.num_test}}
  return {split: {'images': int(source.sizes[split]),
                  'classes': int(np.unique(labels.numpy()).size)}
          for split, labels in source.labels.items()}


def _classes(spec, source, class_names, skipped_files=()) -> tuple:
  """(source, DataInfo) of a classification source."""
  info = sources.DataInfo(num_classes=len(class_names), class_names=list(class_names),
                          num_train=source.num_train, num_test=source.num_test,
                          skipped_files=list(skipped_files),
                          version=f'{spec.dataset} ({spec.data_source})',
                          num_val=source.sizes.get('val', 0), splits=_class_splits(source))
  return source, info


# ----------------------------------------------------------------------------- FGVC
def folder(read):
  """The builder of an official FGVC layout read by `read`, pre-scanned if asked."""
  def build(spec, process_index: int, process_count: int, with_train: bool):
    del process_index, process_count  # every host lists the whole layout
    dataset = read(spec.data_dir)
    if spec.verify_images:
      dataset = folders.drop_unreadable(  # Its warning points at the caller of build_input.
          dataset, splits=('train', 'test') if with_train else ('test',), stacklevel=5)
    return _classes(spec, sources.FolderSource(dataset, spec.val_split), dataset.class_names,
                    _skipped_files(dataset.skipped))
  return build


def tfds(name: str):
  """The builder of the TFDS dataset `name`: this host's shares of its train and test."""
  def build(spec, process_index: int, process_count: int, with_train: bool):
    del with_train  # TFDS streams what it reads; nothing is listed ahead
    if spec.val_split > 0:
      raise DataError('config.val_split needs data_source=folder or synthetic (a TFDS source '
                      'streams its train split; prepare the folder layout instead)')
    source = sources.TfdsSource(name, spec, process_index, process_count)
    if not source.num_train or not source.num_test:
      raise DataError(f'TFDS {name} under {spec.data_dir or "default"}: empty split '
                      f'(train={source.num_train}, test={source.num_test})')
    return _classes(spec, source, source.class_names)
  return build


def synthetic_fgvc(spec, process_index: int, process_count: int, with_train: bool):
  """The generated FGVC set (synthetic.py), config.num_classes classes (0: its default)."""
  del process_index, process_count, with_train  # generated whole, deterministically
  generated = synthetic.generate(
      spec.num_classes or synthetic.DEFAULT_CLASSES, spec.synthetic_num_train,
      spec.synthetic_num_test, spec.synthetic_image_size, spec.synthetic_seed,
      spec.synthetic_distractors, spec.synthetic_detail_size)
  if not len(generated.train_labels) or not len(generated.test_labels):
    raise DataError('synthetic split is empty: set config.synthetic_num_train / '
                    'synthetic_num_test > 0')
  source = sources.ArraySource({'train': generated.train_images, 'test': generated.test_images},
                               {'train': generated.train_labels, 'test': generated.test_labels},
                               spec.val_split)
  return _classes(spec, source, generated.class_names)


# ----------------------------------------------------------------------------- Re-ID
def _verify(spec, with_train: bool):
  """What the pre-scan decodes: every split, only query and gallery (no training), or none."""
  if spec.verify_images and not with_train:
    return ('query', 'gallery')
  return spec.verify_images


def _identities(spec, dataset) -> tuple:
  """(ReidSource, DataInfo) of a read Re-ID dataset; with config.val_split > 0 some train
  identities are held out as val_query / val_gallery (reid_val.py)."""
  dataset = reid_val.hold_out(dataset, spec.val_split)
  splits = dataset.splits()
  val_ids = set().union(*(split.pids.tolist() for split in dataset.val.values()))
  info = sources.DataInfo(
      num_classes=dataset.num_train_ids,
      class_names=[str(int(pid)) for pid in dataset.train_pids],
      num_train=len(dataset.train), num_test=len(dataset.query) + len(dataset.gallery),
      skipped_files=_skipped_files(dataset.skipped), counted='train identities',
      version=dataset.version, num_query=len(dataset.query), num_gallery=len(dataset.gallery),
      num_junk=dataset.num_junk, train_pids=[int(pid) for pid in dataset.train_pids],
      root=dataset.root, protocol=dataset.protocol,
      num_val=sum(len(split) for split in dataset.val.values()), num_val_ids=len(val_ids),
      splits={which: {'images': len(split), 'identities': int(np.unique(split.pids).size)}
              for which, split in splits.items()})
  pk = sampler.PKSampler(dataset.train.pids, spec.batch_size, spec.num_instances, spec.seed)
  return sources.ReidSource(dataset, pk), info


def reid_folder(read):
  """The builder of a Re-ID layout read by `read(data_dir, verify_images)`."""
  def build(spec, process_index: int, process_count: int, with_train: bool):
    del process_index, process_count  # every host lists the whole layout
    return _identities(spec, read(spec.data_dir, _verify(spec, with_train)))
  return build


def reid_generated(read):
  """The builder of the generated Re-ID set: written once per parameter set (under
  config.data_dir, else a temp folder), then read by `read` (its Market-1501 layout)."""
  def build(spec, process_index: int, process_count: int, with_train: bool):
    del process_index, process_count
    # Imported here so that `python -m dca_jax.data.synthetic_reid` runs without a warning.
    from dca_jax.data import synthetic_reid  # pylint: disable=g-import-not-at-top
    params = synthetic_reid.Params(
        num_train_ids=spec.num_classes or synthetic_reid.DEFAULT_TRAIN_IDS,
        num_train=spec.synthetic_num_train, num_test=spec.synthetic_num_test,
        image_size=spec.synthetic_image_size, seed=spec.synthetic_seed)
    folder = synthetic_reid.ensure(params, spec.data_dir)
    dataset = read(folder, _verify(spec, with_train),
                   version=f'synthetic_reid (Market-1501 layout, {os.path.basename(folder)})')
    return _identities(spec, dataset)
  return build
