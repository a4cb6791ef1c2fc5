"""The identities and cameras of loose Re-ID images (`--mode embed`), read by the layouts' own
parsers (reid_sources.py), so that an embedded query and gallery evaluate as `--mode eval` does:

* one folder of identity folders (DIR/<identity>/..., a split of configs/reid_folder.py's
  layout): ids = the identity folders' names; cameras from DIR/../cameras.csv where that file
  is (every image needs its row), else none, and `content` instead: each file's hex SHA-256
  (reid_sources.content_keys), the no-camera protocol's "same image" (as eval tells it: an
  image's copy embedded in another batch may differ from it in the features' last bits);
* else Market-1501, DukeMTMC-reID, VeRi-776 or MSMT17 file names, every image under the same
  one: ids and cameras (1-based, as in the name) from the names; junk keeps its id -1 and
  Market's distractors their id 0 (reid/evaluate.py leaves id -1 out, as the readers do).

Otherwise, or when some image is in neither, no ids and no cameras (a line says why).
"""

from __future__ import annotations

import os

import numpy as np

from dca_jax.data import reid_sources
from dca_jax.data.errors import DataError

NAME_FORMATS = {'Market-1501': reid_sources.MARKET_NAMES,
                'DukeMTMC-reID': reid_sources.DUKE_NAMES,
                'VeRi-776': reid_sources.VERI_NAMES,
                'MSMT17': reid_sources.MSMT17_NAMES}
NOT_KNOWN = ('not every image is in a known layout: one folder of identity folders, or '
             f'{", ".join(NAME_FORMATS)} file names')


def _key(path: str) -> str:
  return os.path.normpath(os.path.abspath(path))


def from_names(paths) -> tuple[str, np.ndarray, np.ndarray] | None:
  """(the naming's title, int32 ids, int32 1-based cameras) when every file name parses under
  one naming (reid_sources' parser: its camera range, ids >= -1), else None."""
  for title, name_format in NAME_FORMATS.items():
    try:
      parsed = [reid_sources.parse_name(p, name_format, title) for p in paths]
    except DataError:
      continue
    pids, camids = np.asarray(parsed, np.int32).reshape(-1, 2).T
    return title, pids, camids + 1
  return None


def _cameras(folder: str, paths) -> tuple[np.ndarray | None, str]:
  """(str cameras of `paths` from FOLDER/../cameras.csv, or None; the line saying why not)."""
  root = os.path.dirname(_key(folder))
  where = os.path.join(root, reid_sources.CAMERAS_FILE)
  try:
    table = reid_sources.read_cameras(root)
  except DataError as e:
    return None, f'cameras: not written ({e})'
  if table is None:
    return None, (f'cameras: not written (no {where}: the no-camera protocol; each file\'s '
                  'content key instead)')
  table = {_key(p): camera for p, camera in table.items()}
  missing = [p for p in paths if _key(p) not in table]
  if missing:
    more = f' and {len(missing) - 1} more' if len(missing) > 1 else ''
    return None, f'cameras: not written ({where} has no row for {missing[0]}{more})'
  return np.asarray([table[_key(p)] for p in paths]), f'cameras from {where}'


def from_identity_folders(images, paths) -> tuple[np.ndarray, np.ndarray | None, str] | None:
  """(str ids, str cameras or None, a line) when `images` is one folder of identity folders
  (reid_sources' reader: every entry a folder) holding every one of `paths`, else None."""
  entries = [str(e).strip() for e in (images or ()) if str(e).strip()]
  if len(entries) != 1 or not os.path.isdir(entries[0]):
    return None
  try:
    listed = reid_sources._identity_files(entries[0], [])
  except DataError:
    return None
  identity = {_key(p): name for name, p in listed}
  if not paths or any(_key(p) not in identity for p in paths):
    return None
  cameras, said = _cameras(entries[0], paths)
  return (np.asarray([identity[_key(p)] for p in paths]), cameras,
          f'ids from the identity folders of {entries[0]}; {said}')


def _identity_labels(ids, cameras, paths) -> dict:
  if cameras is not None:
    return {'ids': ids, 'cameras': cameras}
  return {'ids': ids, 'content': np.asarray(reid_sources.content_keys(paths))}


def image_labels(images, paths) -> tuple[dict, str]:
  """({'ids': [n], 'cameras' or 'content': [n]} of what is known of every one of `paths` (those
  read from `--images` `images`), one line saying where they come from or why they are not
  there)."""
  folders = from_identity_folders(images, paths)
  if folders is not None:
    ids, cameras, said = folders
    return _identity_labels(ids, cameras, paths), said
  named = from_names(paths) if paths else None
  if named is not None:
    title, ids, cameras = named
    return {'ids': ids, 'cameras': cameras}, f'ids and cameras from {title} file names'
  return {}, f'ids, cameras: not written ({NOT_KNOWN})'
