"""How each kind of dataset becomes a stream source: builders `(spec, process_index,
process_count, with_train) -> (source, DataInfo)`, which registry.py gives its entries.

    folder(read)          an FGVC layout read by `read(data_dir) -> FolderDataset`
    tfds(name)            an FGVC TFDS builder
    reid_folder(read)     a Re-ID layout read by `read(data_dir, verify_images) -> ReidDataset`

and what every classification or Re-ID builder ends with (`classes`, `identities`: the source
and its DataInfo); the generated sets' builders are in generated.py.

with_train=False (eval, visualize, predict): the train split is listed but never pre-scanned
or read.
"""

from __future__ import annotations

import numpy as np

from dca_jax.data import folders, reid_val, sampler, sources
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


def classes(spec, source, class_names, skipped_files=()) -> tuple:
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
    return classes(spec, sources.FolderSource(dataset, spec.val_split), dataset.class_names,
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
    return classes(spec, source, source.class_names)
  return build


# ----------------------------------------------------------------------------- Re-ID
def verify(spec, with_train: bool):
  """What the pre-scan decodes: every split, only query and gallery (no training), or none."""
  if spec.verify_images and not with_train:
    return ('query', 'gallery')
  return spec.verify_images


def identities(spec, dataset) -> tuple:
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
    return identities(spec, read(spec.data_dir, verify(spec, with_train)))
  return build
