"""The Re-ID validation split (config.val_split > 0): a share of the train IDENTITIES held out,
so that `--checkpoint best` is chosen without the test split.

* which identities: round(val_split x n) of the n train identities (at least 1, at most n - 1),
  by a fixed draw over the sorted original ids: the same whatever config.seed, as FGVC's
  `sources.hold_out`;
* train keeps the other identities, relabelled 0..n-1 in the order of their original ids
  (num_classes = the remaining count);
* their images form 'val_query' / 'val_gallery' (original ids, as query / gallery): per
  identity, the first image (file order) of each of its cameras that has 2 or more images is a
  query, or, where no camera has 2, the identity's first image; the rest is gallery. So every
  query has a gallery image of its id from another camera (Market-1501's rule drops the same
  id under the same camera). An identity seen by 1 camera only is gallery only (a distractor).
  No-camera protocol: an identity of 2 or more images gives its first image as the query, the
  rest gallery; one image: gallery only. Camera ids there are per file content, as in
  query / gallery (reid_sources.py's `_camids`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dca_jax.data.errors import DataError
from dca_jax.data.folders import content_keys

VAL_SPLITS = ('val_query', 'val_gallery')
_SEED = 20221  # fixed: the split is part of the data, not of a run (as sources.hold_out)


def held_out_ids(train_pids, fraction: float) -> np.ndarray:
  """The sorted original ids held out of `train_pids` (the sorted train ids) for `fraction`."""
  pids = np.asarray(train_pids)
  if fraction <= 0 or len(pids) < 2:
    return pids[:0]
  count = min(len(pids) - 1, max(1, int(round(fraction * len(pids)))))
  return np.sort(np.random.default_rng(_SEED).permutation(pids)[:count])


def _query_rows(camids) -> list[int]:
  """Positions (into one identity's images) that become queries; [] = gallery only."""
  camids = np.asarray(camids)
  cameras, first, counts = np.unique(camids, return_index=True, return_counts=True)
  if len(cameras) < 2:
    return []
  rows = [int(row) for row, count in zip(first, counts) if count >= 2]
  return rows or [int(min(first))]


def _val_splits(images, protocol: str) -> dict:
  """The held-out images (a reid_sources.ReidSplit, original pids) -> {'val_query',
  'val_gallery'}."""
  is_query = np.zeros(len(images), bool)
  for pid in np.unique(images.pids):
    members = np.flatnonzero(images.pids == pid)
    if protocol == 'no-camera':
      is_query[members[0]] = len(members) >= 2
    else:
      is_query[members[_query_rows(images.camids[members])]] = True
  if protocol == 'no-camera':  # per file content, as query / gallery
    keys = {}
    ids = [keys.setdefault(k, len(keys)) for k in content_keys(images.paths)]
    images = dataclasses.replace(images, camids=np.asarray(ids, np.int32))
  return {'val_query': images.subset(is_query), 'val_gallery': images.subset(~is_query)}


def hold_out(dataset, fraction: float):
  """`dataset` (a reid_sources.ReidDataset) with round(fraction x n) train identities moved to
  its val splits."""
  held = held_out_ids(dataset.train_pids, fraction)
  if not held.size:
    return dataset
  original = dataset.train_pids[dataset.train.pids]
  is_held = np.isin(original, held)
  kept_pids = dataset.train_pids[~np.isin(dataset.train_pids, held)]
  train = dataset.train.subset(~is_held)
  train = dataclasses.replace(
      train, pids=np.searchsorted(kept_pids, original[~is_held]).astype(np.int32))
  images = dataclasses.replace(dataset.train.subset(is_held),
                               pids=original[is_held].astype(np.int32))
  val = _val_splits(images, dataset.protocol)
  if not len(val['val_query']):
    raise DataError(f'config.val_split={fraction:g} held out {held.size} train identities but '
                    'none has images from 2 cameras (or 2 images) for a val query: raise it')
  return dataclasses.replace(dataset, train=train, train_pids=kept_pids.astype(np.int32),
                             val=val)
