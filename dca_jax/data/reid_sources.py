"""Readers for the official Re-ID layouts: Market-1501, DukeMTMC-reID, MSMT17 (V1/V2), VeRi-776.

Each reader returns a `ReidDataset`: train (paths, labels relabelled to 0..C-1 in the order of
the sorted original ids, camids), query and gallery (paths, ORIGINAL pids, camids), with camids
0-based. Protocol rules applied here (docs/REID_DATA.md):

* junk images (pid -1) are dropped from every split and counted (`num_junk`);
* pid 0 is a distractor in Market-1501 naming (Market, Duke, the synthetic set): kept in the
  gallery, dropped (and listed in `skipped`) from train and query;
* every query id must have at least one gallery image, else the layout is broken (DataError);
* folder-read splits take `*.jpg` only; any other entry is skipped and listed in `skipped`.

Bad inputs raise `DataError` with one line naming the folder, list file or file name.

Each layout's reader registers it as a dataset (`@layout`: registry.py); `sources.ReidSource`
is what `streams.ReidInput` streams from.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import warnings

import numpy as np
from absl import logging

from dca_jax.data import builders, folders, registry, streams
from dca_jax.data.errors import DataError, DataWarning
from dca_jax.data.folders import content_keys

REID_SPLITS = ('query', 'gallery')
ALL_SPLITS = ('train',) + REID_SPLITS
NOT_JPG = 'not a .jpg file'
NOT_IMAGE = 'not an image file'


@dataclasses.dataclass
class ReidSplit(folders.ImageSplit):
  paths: list[str]
  pids: np.ndarray    # int32: train = relabelled 0..C-1; query/gallery = the original ids
  camids: np.ndarray  # int32, 0-based
  where: str          # the folder or list file that defines the split (for messages)

  def __len__(self) -> int:
    return len(self.paths)

  @property
  def listing(self) -> str:
    """Where messages say the split's images come from."""
    return f'in {self.where}'


@dataclasses.dataclass
class ReidDataset:
  name: str           # config.dataset
  version: str        # what was read, e.g. 'Market-1501', 'MSMT17_V2 (train+val)'
  root: str
  train: ReidSplit
  query: ReidSplit
  gallery: ReidSplit
  train_pids: np.ndarray  # original pid of each train label: train_pids[label] = pid
  num_junk: int = 0       # pid -1 images dropped (all splits)
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, reason)
  # 'camera-aware': a query's gallery loses the same id seen by the same camera (Market-1501's
  # rule); 'no-camera': only the identical image (an identity folder without cameras.csv).
  protocol: str = 'camera-aware'
  identity_names: list[str] = dataclasses.field(default_factory=list)  # id i = names[i - 1]
  # config.val_split > 0: {'val_query', 'val_gallery'} of held-out train ids (reid_val.py)
  val: dict = dataclasses.field(default_factory=dict)

  @property
  def num_train_ids(self) -> int:
    return len(self.train_pids)

  def splits(self) -> dict:
    """{name: ReidSplit} of every split: train, query, gallery and the val ones."""
    return {**{name: getattr(self, name) for name in ALL_SPLITS}, **self.val}


@dataclasses.dataclass(frozen=True)
class _NameFormat:
  """A file-name convention: regex with named groups pid and cam, camera range, an example."""
  regex: re.Pattern
  num_cameras: int
  example: str


MARKET_NAMES = _NameFormat(re.compile(r'^(?P<pid>-?\d+)_c(?P<cam>\d+)s\d+_\d+_\d+\.jpg$'), 6,
                           '0002_c1s1_000451_03.jpg')
DUKE_NAMES = _NameFormat(re.compile(r'^(?P<pid>-?\d+)_c(?P<cam>\d+)_f\d+\.jpg$'), 8,
                         '0001_c2_f0046182.jpg')
VERI_NAMES = _NameFormat(re.compile(r'^(?P<pid>-?\d+)_c(?P<cam>\d+)_\d+_\d+\.jpg$'), 20,
                         '0001_c001_00016450_0.jpg')
# <pid>_<index of the image of this person>_<camera>_<date+time slot>_<frame>_<n>.jpg
MSMT17_NAMES = _NameFormat(re.compile(r'^(?P<pid>\d+)_\d+_(?P<cam>\d+)_\w+\.jpg$'), 15,
                           '0000_000_01_0303morning_0015_0.jpg')


def parse_name(path: str, name_format: _NameFormat, what: str) -> tuple[int, int]:
  """File name -> (pid, 0-based camid); DataError naming the file when it does not parse."""
  match = name_format.regex.match(os.path.basename(path))
  if not match:
    raise DataError(f'{path}: file name does not parse as {what} (expected names like '
                    f'{name_format.example}); is config.dataset right for this folder?')
  pid, camera = int(match.group('pid')), int(match.group('cam'))
  if not 1 <= camera <= name_format.num_cameras:
    raise DataError(f'{path}: camera {camera} outside 1..{name_format.num_cameras} of {what}')
  if pid < -1:
    raise DataError(f'{path}: person id {pid} < -1')
  return pid, camera - 1


# ----------------------------------------------------------------------------- layout finding
@dataclasses.dataclass(frozen=True)
class Layout:
  """How a Re-ID dataset's official layout is found (its registry entry's `layout`)."""
  title: str                 # its name in messages
  marker: str                # a path that only its root holds (tells the layouts apart)
  roots: list[str]           # folders under data_dir where its root may be (data_dir itself last)


def layout(name: str, title: str, marker: str, roots: list[str]):
  """Registers the decorated `read(data_dir, verify_images) -> ReidDataset` as Re-ID dataset
  `name` (data_source='folder'): a new layout is one decorated reader here (and a config)."""
  def register(read):
    registry.register(name, task='reid', sources={'folder': builders.reid_folder(read)},
                      input_class=streams.ReidInput, read=read,
                      layout=Layout(title, marker, roots))
    return read
  return register


def _layout(dataset: str) -> Layout:
  return registry.get(dataset).layout


def _other_layouts(data_dir: str, dataset: str) -> str:
  """' (found: ...)' listing the other Re-ID layouts present under data_dir, or ''."""
  found = []
  own_marker = _layout(dataset).marker
  for entry in registry.entries():
    name, other = entry.name, entry.layout
    if name == dataset or other is None:
      continue
    # data_dir itself only counts where its marker tells the layouts apart.
    for candidate in other.roots + ([] if other.marker == own_marker else ['.']):
      if os.path.exists(os.path.join(data_dir, candidate, other.marker)):
        root = os.path.normpath(os.path.join(data_dir, candidate))
        found.append(f"a {other.title} layout in {root} (config.dataset='{name}')")
  return f' (found {"; ".join(found)})' if found else ''


def _find_roots(data_dir: str, dataset: str) -> list[str]:
  """Candidate roots under data_dir holding the dataset's marker (data_dir itself last)."""
  layout_ = _layout(dataset)
  title, marker, candidates = layout_.title, layout_.marker, layout_.roots
  folders.check_data_dir(data_dir, title)
  candidates = candidates + ['.']
  roots = [os.path.normpath(os.path.join(data_dir, candidate)) for candidate in candidates
           if os.path.exists(os.path.join(data_dir, candidate, marker))]
  if not roots:
    tried = ', '.join(os.path.normpath(os.path.join(data_dir, candidate, marker))
                      for candidate in candidates)
    raise DataError(f'{title} layout not found under {data_dir}: none of {tried} '
                    f'exists{_other_layouts(data_dir, dataset)}')
  return roots


def _require_dirs(root: str, names: list[str], what: str) -> list[str]:
  folders = [os.path.join(root, name) for name in names]
  for folder in folders:
    if not os.path.isdir(folder):
      expected = ', '.join(name + '/' for name in names)
      raise DataError(f'missing folder {folder}: a {what} layout has {expected} under {root}')
  return folders


# ----------------------------------------------------------------------------- split readers
def _read_folder_split(folder: str, name_format: _NameFormat, what: str, skipped: list):
  """*.jpg of one folder (sorted by name) -> (paths, pids, camids); others -> skipped."""
  paths, pids, camids = [], [], []
  with os.scandir(folder) as scanned:
    entries = sorted(scanned, key=lambda entry: entry.name)
  for entry in entries:
    if not (entry.name.lower().endswith('.jpg') and entry.is_file()):
      skipped.append((entry.path, NOT_JPG))
      continue
    pid, camid = parse_name(entry.path, name_format, what)
    paths.append(entry.path)
    pids.append(pid)
    camids.append(camid)
  return paths, pids, camids


def _read_list_split(list_file: str, image_dir: str, name_format: _NameFormat, what: str):
  """MSMT17 list: '<relative/path.jpg> <pid>' lines; camera from the file name."""
  if not os.path.isfile(list_file):
    raise DataError(f'missing list file: {list_file}')
  paths, pids, camids = [], [], []
  with open(list_file, encoding='utf-8') as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      parts = line.split()
      if len(parts) != 2:
        raise DataError(f'{list_file}:{line_number}: expected "<relative/path.jpg> <pid>", got '
                        f'{line.strip()!r}')
      try:
        pid = int(parts[1])
      except ValueError:
        raise DataError(f'{list_file}:{line_number}: pid {parts[1]!r} is not an integer'
                        ) from None
      path = os.path.join(image_dir, parts[0])
      _, camid = parse_name(path, name_format, what)
      paths.append(path)
      pids.append(pid)
      camids.append(camid)
  folders.check_files_exist(paths, list_file)
  return paths, pids, camids


def _split(where: str, paths, pids, camids) -> ReidSplit:
  return ReidSplit(list(paths), np.asarray(pids, np.int32).reshape(-1),
                   np.asarray(camids, np.int32).reshape(-1), where)


def _drop_junk(split: ReidSplit) -> tuple[ReidSplit, int]:
  junk = split.pids == -1
  return split.subset(~junk), int(junk.sum())


def _drop_distractors(split: ReidSplit, which: str, skipped: list) -> ReidSplit:
  """Market naming: pid 0 = distractor, which belongs to the gallery only."""
  distractor = split.pids == 0
  skipped.extend((path, f'distractor id 0 in the {which} split (gallery only)')
                 for path, dropped in zip(split.paths, distractor) if dropped)
  return split.subset(~distractor)


def _check_nonempty(split: ReidSplit, which: str) -> None:
  if not len(split):
    raise DataError(f'the {which} split is empty: {split.where} holds no usable images')


def _check_query_in_gallery(query: ReidSplit, gallery: ReidSplit) -> None:
  missing = np.setdiff1d(np.unique(query.pids), np.unique(gallery.pids))
  if missing.size:
    example = query.paths[int(np.flatnonzero(query.pids == missing[0])[0])]
    more = f' ({missing.size - 1} more query ids likewise)' if missing.size > 1 else ''
    raise DataError(f'query id {int(missing[0])} (e.g. {example}) has no image in the '
                    f'gallery {gallery.where}: the Re-ID protocol needs every query id in the '
                    f'gallery{more}')


def _report_skipped(name: str, root: str, skipped: list) -> None:
  """Logs the non-.jpg entries; warns about the other skipped images (distractor ids ...)."""
  not_jpg = [path for path, reason in skipped if reason in (NOT_JPG, NOT_IMAGE)]
  if not_jpg:  # Normal (e.g. Thumbs.db): logged, listed in skipped, no warning.
    logging.info('%s: ignored %d non-.jpg entries under %s (e.g. %s)', name, len(not_jpg),
                 root, not_jpg[0])
  images = [(path, reason) for path, reason in skipped if reason not in (NOT_JPG, NOT_IMAGE)]
  if images:
    message = (f'{name}: skipped {len(images)} image(s) under {root}: '
               + '; '.join(f'{path} ({reason})' for path, reason in images[:5])
               + (' ...' if len(images) > 5 else ''))
    warnings.warn(message, DataWarning, stacklevel=5)


def _finish(name: str, version: str, root: str, train: ReidSplit, query: ReidSplit,
            gallery: ReidSplit, skipped: list, *, distractor_zero: bool,
            verify_images: bool, query_in_gallery: bool = True) -> ReidDataset:
  """Junk/distractor rules, protocol checks, optional pre-scan, train relabelling."""
  num_junk = 0
  splits = {}
  for which, split in zip(ALL_SPLITS, (train, query, gallery)):
    split, junk = _drop_junk(split)
    num_junk += junk
    if distractor_zero and which != 'gallery':
      split = _drop_distractors(split, which, skipped)
    _check_nonempty(split, which)
    splits[which] = split
  if query_in_gallery:  # the official sets' protocol; own data: such queries are counted
    _check_query_in_gallery(splits['query'], splits['gallery'])
  _report_skipped(name, root, skipped)
  dataset = ReidDataset(name, version, root, splits['train'], splits['query'],
                        splits['gallery'], np.zeros((0,), np.int32), num_junk, skipped)
  if verify_images:  # True: every split; or a tuple of the split names to scan.
    scanned = ALL_SPLITS if verify_images is True else tuple(verify_images)
    folders.drop_unreadable(dataset, splits=scanned, stacklevel=4)
  # Relabel after the pre-scan, so that every label has at least one image.
  train_pids, labels = np.unique(dataset.train.pids, return_inverse=True)
  dataset.train = ReidSplit(dataset.train.paths, labels.astype(np.int32).reshape(-1),
                            dataset.train.camids, dataset.train.where)
  dataset.train_pids = train_pids.astype(np.int32)
  logging.info('%s (%s): train %d images / %d ids, query %d, gallery %d, junk dropped %d',
               name, version, len(dataset.train), dataset.num_train_ids, len(dataset.query),
               len(dataset.gallery), num_junk)
  return dataset


# ----------------------------------------------------------------------------- datasets
MARKET_FOLDERS = ['bounding_box_train', 'query', 'bounding_box_test']
VERI_FOLDERS = ['image_train', 'image_query', 'image_test']


def _read_folder_layout(data_dir: str, dataset: str, name_format: _NameFormat,
                        folder_names: list[str], *, distractor_zero: bool, verify_images: bool,
                        version: str | None = None) -> ReidDataset:
  """A layout of three image folders (train, query, gallery); ids and cameras in the names."""
  title = _layout(dataset).title
  root = _find_roots(data_dir, dataset)[0]
  folders = _require_dirs(root, folder_names, title)
  skipped = []
  train, query, gallery = (
      _split(folder, *_read_folder_split(folder, name_format, title, skipped))
      for folder in folders)
  return _finish(dataset, version or title, root, train, query, gallery, skipped,
                 distractor_zero=distractor_zero, verify_images=verify_images)


@layout('market1501', 'Market-1501', 'bounding_box_train',
        ['Market-1501-v15.09.15', 'Market-1501', 'market1501',
         os.path.join('market1501', 'Market-1501-v15.09.15')])
def read_market1501(data_dir: str, verify_images: bool = True, *,
                    version: str | None = None) -> ReidDataset:
  """`Market-1501-v15.09.15/` (or data_dir itself): bounding_box_train/, query/,
  bounding_box_test/ with names like 0002_c1s1_000451_03.jpg (pid, camera 1..6)."""
  return _read_folder_layout(data_dir, 'market1501', MARKET_NAMES, MARKET_FOLDERS,
                             distractor_zero=True, verify_images=verify_images, version=version)


@layout('dukemtmc', 'DukeMTMC-reID', 'bounding_box_train',
        ['DukeMTMC-reID', 'dukemtmc-reid', os.path.join('dukemtmc-reid', 'DukeMTMC-reID')])
def read_dukemtmc(data_dir: str, verify_images: bool = True) -> ReidDataset:
  """`DukeMTMC-reID/` (or data_dir itself): the Market folders, names 0001_c2_f0046182.jpg."""
  return _read_folder_layout(data_dir, 'dukemtmc', DUKE_NAMES, MARKET_FOLDERS,
                             distractor_zero=True, verify_images=verify_images)


@layout('veri776', 'VeRi-776', 'image_train', ['VeRi', 'VeRi-776', 'veri776', 'VeRi_with_plate'])
def read_veri776(data_dir: str, verify_images: bool = True) -> ReidDataset:
  """`VeRi/` (or data_dir itself): image_train/, image_query/, image_test/, names like
  0001_c001_00016450_0.jpg (vehicle id, camera 1..20)."""
  return _read_folder_layout(data_dir, 'veri776', VERI_NAMES, VERI_FOLDERS,
                             distractor_zero=False, verify_images=verify_images)


MSMT17_VERSIONS = {'MSMT17_V1': ('train', 'test'), 'MSMT17_V2': ('mask_train_v2', 'mask_test_v2')}


def _msmt17_version(root: str) -> str | None:
  found = [version for version, folders in MSMT17_VERSIONS.items()
           if any(os.path.isdir(os.path.join(root, folder)) for folder in folders)]
  if len(found) > 1:
    raise DataError(f'{root} holds the image folders of both MSMT17_V1 (train/, test/) and '
                    'MSMT17_V2 (mask_train_v2/, mask_test_v2/): keep one')
  return found[0] if found else None


@layout('msmt17', 'MSMT17', 'list_query.txt',
        ['MSMT17_V1', 'MSMT17_V2', 'MSMT17', os.path.join('msmt17', 'MSMT17_V1'),
         os.path.join('msmt17', 'MSMT17_V2')])
def read_msmt17(data_dir: str, verify_images: bool = True) -> ReidDataset:
  """`MSMT17_V1/` (train/, test/) or `MSMT17_V2/` (mask_train_v2/, mask_test_v2/), each with
  list_train.txt, list_val.txt, list_query.txt, list_gallery.txt ('<rel/path.jpg> <pid>').
  Train = list_train + list_val (all 1,041 training ids); camera = 3rd '_' field of the name."""
  roots = _find_roots(data_dir, 'msmt17')
  versions = {}
  for root in roots:
    version = _msmt17_version(root)
    if version is None:
      raise DataError(f'{root} has list_query.txt but neither MSMT17_V1 image folders (train/, '
                      'test/) nor MSMT17_V2 ones (mask_train_v2/, mask_test_v2/)')
    versions.setdefault(version, root)
  if len(versions) > 1:
    found = ', '.join(f'{version}: {root}' for version, root in sorted(versions.items()))
    raise DataError(f'both MSMT17 versions found under {data_dir} ({found}): set '
                    'config.data_dir to the one to use (V1 and V2 give different mAP)')
  (version, root), = versions.items()
  train_dir, test_dir = _require_dirs(root, list(MSMT17_VERSIONS[version]), version)
  lists = {name: os.path.join(root, f'list_{name}.txt')
           for name in ('train', 'val', 'query', 'gallery')}
  parts = {name: _read_list_split(lists[name],
                                  train_dir if name in ('train', 'val') else test_dir,
                                  MSMT17_NAMES, version)
           for name in lists}
  # Train = list_train + list_val: (paths, pids, camids) of both, concatenated.
  train = _split(f'{lists["train"]} + {lists["val"]}',
                 *(train_part + val_part
                   for train_part, val_part in zip(parts['train'], parts['val'])))
  query, gallery = (_split(lists[name], *parts[name]) for name in REID_SPLITS)
  return _finish('msmt17', f'{version} (train+val)', root, train, query, gallery, [],
                 distractor_zero=False, verify_images=verify_images)


# ----------------------------------------------------------------------------- your own data
CAMERAS_FILE = 'cameras.csv'   # optional: '<path relative to the root>,<camera>' per image
IDENTITY_FOLDERS = ['train', 'query', 'gallery']


def _identity_files(split_dir: str, skipped: list) -> list[tuple[str, str]]:
  """[(identity, path)] of one split: every image file of DIR/<identity>/, sorted; other files
  skipped (listed), a file outside an identity folder or an empty identity folder one line."""
  found = []
  for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
    if not entry.is_dir():
      raise DataError(f'{entry.path}: images go in identity folders '
                      f'({split_dir}/<identity>/<image>), not in {split_dir} itself')
    images = []
    for root, dirs, names in os.walk(entry.path):
      dirs.sort()
      for name in sorted(names):
        path = os.path.join(root, name)
        if name.lower().endswith(folders.IMAGE_EXTENSIONS):
          images.append((entry.name, path))
        else:
          skipped.append((path, NOT_IMAGE))
    if not images:
      raise DataError(f'identity folder {entry.path} holds no image '
                      f'({", ".join(folders.IMAGE_EXTENSIONS)})')
    found += images
  return found


def read_cameras(root: str) -> dict[str, str] | None:
  """{absolute path: camera} from ROOT/cameras.csv, or None without it; a row naming a file
  that does not exist is one line."""
  path = os.path.join(root, CAMERAS_FILE)
  if not os.path.isfile(path):
    return None
  cameras = {}
  with open(path, newline='', encoding='utf-8') as f:
    for number, row in enumerate(csv.reader(f), 1):
      if not row or (number == 1 and [c.strip().lower() for c in row] == ['path', 'camera']):
        continue
      if len(row) != 2:
        raise DataError(f'{path}:{number}: expected "<relative path>,<camera>", got {row!r}')
      image = os.path.normpath(os.path.join(root, row[0].strip()))
      if not os.path.isfile(image):
        raise DataError(f'{path}:{number}: {row[0].strip()} does not exist under {root}')
      cameras[image] = row[1].strip()
  return cameras


def _camids(splits: dict, cameras: dict | None, root: str) -> dict:
  """0-based camera ids per split: from cameras.csv (every image needs a row), or, without
  cameras, one id per distinct file content in query and gallery (the protocol then removes
  from a query's gallery only the identical image: the junk rule is same id AND same camera)."""
  if cameras is not None:
    labels = sorted(set(cameras.values()))
    ids = {}
    for which, split in splits.items():
      missing = [p for p in split.paths if os.path.normpath(p) not in cameras]
      if missing:
        raise DataError(f'{os.path.join(root, CAMERAS_FILE)} has no row for {missing[0]} '
                        f'({len(missing)} {which} image(s) without a camera): every image '
                        'needs its camera, or remove the file (no-camera protocol)')
      ids[which] = [labels.index(cameras[os.path.normpath(p)]) for p in split.paths]
    return ids
  keys = {}
  ids = {'train': [0] * len(splits['train'])}
  for which in REID_SPLITS:
    ids[which] = [keys.setdefault(k, len(keys)) for k in content_keys(splits[which].paths)]
  return ids


def _check_every_identity_readable(listed, splits, train_pids, split_dirs, number) -> None:
  """An identity folder whose every image the pre-scan dropped is one line (not a silently
  smaller set)."""
  for (which, files), split_dir in zip(listed.items(), split_dirs):
    left = set(train_pids.tolist()) if which == 'train' else set(splits[which].pids.tolist())
    gone = sorted({identity for identity, _ in files if number[identity] not in left})
    if gone:
      raise DataError(f'identity folder {os.path.join(split_dir, gone[0])} holds no readable '
                      f'image (every one is corrupt or truncated)'
                      + (f'; {len(gone) - 1} more likewise' if len(gone) > 1 else ''))


@layout('reid_folder', 'identity folder', 'gallery', [])
def read_reid_folder(data_dir: str, verify_images: bool = True) -> ReidDataset:
  """Your own data: DATA/{train,query,gallery}/<identity>/<image> (any identity names; query
  and gallery identities need not be train ones), cameras optional (DATA/cameras.csv). See
  docs/REID_DATA.md, "Your own data"."""
  root = _find_roots(data_dir, 'reid_folder')[0]
  split_dirs = _require_dirs(root, IDENTITY_FOLDERS, 'identity-folder')
  skipped = []
  listed = {which: _identity_files(d, skipped) for which, d in zip(ALL_SPLITS, split_dirs)}
  names = sorted({identity for files in listed.values() for identity, _ in files})
  number = {name: i + 1 for i, name in enumerate(names)}  # ids 1.. (0 and -1 mean nothing here)
  splits = {which: _split(d, [p for _, p in files], [number[i] for i, _ in files],
                          [0] * len(files))
            for (which, files), d in zip(listed.items(), split_dirs)}
  cameras = read_cameras(root)
  dataset = _finish('reid_folder', 'identity folders', root, *splits.values(), skipped,
                    distractor_zero=False, verify_images=verify_images, query_in_gallery=False)
  splits = {which: getattr(dataset, which) for which in ALL_SPLITS}
  _check_every_identity_readable(listed, splits, dataset.train_pids, split_dirs, number)
  for which, ids in _camids(splits, cameras, root).items():
    split = splits[which]
    setattr(dataset, which, ReidSplit(split.paths, split.pids, np.asarray(ids, np.int32),
                                      split.where))
  if dataset.num_train_ids < 2:
    raise DataError(f'the train split {split_dirs[0]} has {dataset.num_train_ids} identity: '
                    'training needs at least 2')
  dataset.identity_names = names
  dataset.protocol = 'camera-aware' if cameras is not None else 'no-camera'
  return dataset


def read_reid(dataset: str, data_dir: str, verify_images: bool = True) -> ReidDataset:
  """The official layout of Re-ID `dataset` under `data_dir`, read by its `@layout` reader."""
  layouts = [entry.name for entry in registry.entries() if entry.layout is not None]
  if dataset not in layouts:
    raise DataError(f'unknown Re-ID dataset {dataset!r} for data_source=folder; expected one '
                    f'of {sorted(layouts)}')
  return registry.get(dataset).read(data_dir, verify_images)
