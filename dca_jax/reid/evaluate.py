"""Re-ID evaluation of stored features, without a model or images:

  python -m dca_jax.reid.evaluate QUERY.npz GALLERY.npz [--rerank] [--k1 20 --k2 6 --lambda 0.3]

Each .npz holds `features` [N, D], `ids` [N] and optionally `cameras` [N] (both files, or
neither). Prints one JSON line: mAP, rank1, rank5, rank10, mINP, num_query, num_gallery,
num_skipped (queries without a true match, left out of the means), protocol, rerank (with k1,
k2, lambda when on), metric and seconds (the evaluation, not the loading). Distances are
squared Euclidean (`--metric cosine`: 1 - cosine), the protocol Market-1501's (metrics.py):
rows of (integer) id -1 are its junk, left out of both files before anything is counted, as the
dataset readers leave them out of `--mode eval` (`--mode embed` writes them with that id).

Without cameras the protocol is 'no-camera', as for an identity folder without cameras.csv:
every distinct image counts as seen by its own camera, so a query's gallery loses only its
identical copies (same id and the same image), not its other views. The same image: the same
`content` key where both files hold one ([N] strings, e.g. the hex SHA-256 of each image file,
as `--mode embed` writes them for identity folders without cameras.csv), else bit-identical
features (an image embedded in another batch may differ in the last bits: its copy then counts).

Bad input is one `error:` line on stderr, nothing on stdout, exit status 1 (as main.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zipfile

import numpy as np

from dca_jax import errors
from dca_jax.reid import metrics

def npz_array(path: str, data, key: str) -> np.ndarray:
  if key not in data.files:
    raise errors.DataError(f'{path} has no `{key}` array (it holds: '
                           f'{", ".join(data.files) or "nothing"}); expected features [N, D], '
                           'ids [N] and optionally cameras [N]')
  try:
    return data[key]
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # e.g. an object array
    raise errors.DataError(f'{path}: `{key}` cannot be read ({" ".join(str(e).split())})') from e


def checked_features(path: str, features: np.ndarray) -> np.ndarray:
  if features.ndim != 2 or 0 in features.shape:
    raise errors.DataError(f'{path}: `features` must be a non-empty [N, D] array, got shape '
                           f'{features.shape}')
  if not (np.issubdtype(features.dtype, np.integer) or np.issubdtype(features.dtype, np.floating)):
    raise errors.DataError(f'{path}: `features` must be numbers, got dtype {features.dtype}')
  features = features.astype(np.float32, copy=False)
  bad = ~np.isfinite(features).all(axis=1)
  if bad.any():
    raise errors.DataError(f'{path}: `features` holds NaN or infinite values in {bad.sum()} of '
                           f'{len(features)} rows (the first: row {np.flatnonzero(bad)[0]})')
  return features


def read_npz(path: str, label: str, required: tuple, optional: tuple, expected: str) -> dict:
  """{key: array, or None for an absent optional one} of the .npz `path` ('features' checked
  and float32, the others one entry per feature row); a file that cannot be used is one line
  naming `label` (the path, or the flag and the path). Both readers of feature files use it:
  `load_split` here and `reid/index.py`'s `load_features`."""
  try:
    data = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise errors.DataError(f'{label}: not a readable .npz file '
                           f'({" ".join(str(e).split())})') from e
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise errors.DataError(f'{label} holds one array, not an .npz archive (np.savez) of '
                           f'{expected}')
  with data:
    if 'features' not in data.files:
      raise errors.DataError(f'{label} has no `features` array (it holds: '
                             f'{", ".join(data.files) or "nothing"}); expected {expected}')
    found = {key: npz_array(label, data, key) for key in required}
    found.update({key: npz_array(label, data, key) if key in data.files else None
                  for key in optional})
  found['features'] = checked_features(label, found['features'])
  rows = len(found['features'])
  for key, values in found.items():
    if key != 'features' and values is not None and (values.ndim != 1 or len(values) != rows):
      raise errors.DataError(f'{label}: `{key}` must be a 1-D array of one entry per feature '
                             f'row ({rows}), got shape {values.shape}')
  return found


def load_split(path: str) -> dict:
  """{'features' float32 [N, D], 'ids' [N], 'cameras' [N] or None, 'content' [N] or None} of
  one .npz file, checked."""
  if not os.path.isfile(path):
    raise errors.DataError(f'{path}: no such file')
  return read_npz(path, path, ('features', 'ids'), ('cameras', 'content'),
                  'features [N, D], ids [N] and optionally cameras [N]')


def no_camera_ids(query_features: np.ndarray, gallery_features: np.ndarray, content=None):
  """(query cameras, gallery cameras): one id per distinct image of both splits, so that the
  junk rule (same id and camera) removes only identical copies: per distinct (query, gallery)
  `content` key (the files' bytes: `--mode embed` writes them) when given, else per distinct
  feature vector."""
  if content is not None:
    rows = np.concatenate([np.asarray(keys).astype(str) for keys in content])
  else:
    both = np.ascontiguousarray(np.concatenate([query_features, gallery_features]))
    rows = both.view(np.dtype((np.void, both.dtype.itemsize * both.shape[1]))).ravel()
  _, camera = np.unique(rows, return_inverse=True)
  camera = camera.ravel()
  return camera[:len(query_features)], camera[len(query_features):]


JUNK_ID = -1  # Market-1501's junk images (and its kind's): left out of both splits


def without_junk(split: dict) -> dict:
  """The split less its rows of integer id -1 (junk: the Market-1501 protocol ignores them, and
  the readers drop them before `--mode eval`); the split itself when it has none."""
  ids = np.asarray(split['ids'])
  if not np.issubdtype(ids.dtype, np.integer) or not (ids == JUNK_ID).any():
    return split
  keep = ids != JUNK_ID
  return {key: None if value is None else np.asarray(value)[keep]
          for key, value in split.items()}


def _protocol(query: dict, gallery: dict, query_path: str, gallery_path: str):
  """(protocol, query cameras, gallery cameras), the splits checked against each other."""
  width_q, width_g = query['features'].shape[1], gallery['features'].shape[1]
  if width_q != width_g:
    raise errors.DataError(f'features of different widths: {query_path} has {width_q}, '
                           f'{gallery_path} {width_g}')
  has = [split['cameras'] is not None for split in (query, gallery)]
  if has[0] != has[1]:
    with_cameras, without = ((query_path, gallery_path) if has[0]
                             else (gallery_path, query_path))
    raise errors.DataError(f'{with_cameras} has `cameras` but {without} has not: give both '
                           '(camera-aware protocol) or neither (no-camera)')
  if has[0]:
    return 'camera-aware', query['cameras'], gallery['cameras']
  content = [split.get('content') for split in (query, gallery)]
  return ('no-camera',) + no_camera_ids(query['features'], gallery['features'],
                                        None if any(c is None for c in content) else content)


def evaluate(query: dict, gallery: dict, *, rerank: bool = False, k1: int = 20, k2: int = 6,
             lambda_value: float = 0.3, metric: str = 'euclidean',
             paths: tuple[str, str] = ('query', 'gallery')) -> dict:
  """The JSON record of query vs gallery splits (`load_split`'s dicts) less their junk (id -1);
  what the CLI prints."""
  query, gallery = without_junk(query), without_junk(gallery)
  protocol, q_cameras, g_cameras = _protocol(query, gallery, *paths)
  ids = (query['ids'], gallery['ids'], q_cameras, g_cameras)
  start = time.perf_counter()
  if rerank:
    result = metrics.evaluate_reranked(query['features'], gallery['features'], *ids, k1=k1, k2=k2,
                                       lambda_value=lambda_value, metric=metric)
  else:
    result = metrics.evaluate_features(query['features'], gallery['features'], *ids,
                                       metric=metric)
  seconds = time.perf_counter() - start
  record = {key: result[key] for key in metrics.RESULT_KEYS}
  record.update(protocol=protocol, rerank=bool(rerank))
  if rerank:
    record.update(k1=k1, k2=k2, **{'lambda': lambda_value})
  record.update(metric=metric, seconds=round(seconds, 3))
  return record


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m dca_jax.reid.evaluate',
      description='mAP, CMC and mINP of stored Re-ID features (docs/REID.md, "Scale").')
  parser.add_argument('query', help='.npz with features [N, D], ids [N], optionally cameras [N]')
  parser.add_argument('gallery', help='.npz likewise')
  parser.add_argument('--rerank', action='store_true', help='k-reciprocal re-ranking')
  parser.add_argument('--k1', type=int, default=20)
  parser.add_argument('--k2', type=int, default=6)
  parser.add_argument('--lambda', dest='lambda_value', type=float, default=0.3)
  parser.add_argument('--metric', choices=metrics.METRICS, default='euclidean')
  return parser


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    query, gallery = load_split(args.query), load_split(args.gallery)
    record = evaluate(query, gallery, rerank=args.rerank, k1=args.k1, k2=args.k2,
                      lambda_value=args.lambda_value, metric=args.metric,
                      paths=(args.query, args.gallery))
  except ValueError as e:  # errors.DataError and the metrics' checks: one line each
    sys.exit(f'error: {" ".join(str(e).split())}')
  print(json.dumps(record), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
