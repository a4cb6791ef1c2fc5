"""Writers of tiny copies of the official Re-ID layouts, with real JPEG files (PIL).

    lay = write_reid_layout('market1501', tmp_path)       # -> ReidLayout
    config.task, config.dataset = 'reid', lay.dataset
    config.data_source, config.data_dir = 'folder', lay.data_dir

Each writer returns what the loader must produce, computed from what was written (not from
the loader): per split the (path, pid, camid 0-based) rows in the loader's order (folders:
sorted by file name; MSMT17: list order, train then val), the sorted original train ids, the
number of junk (-1) files, the non-.jpg entries, and the expected version string.
Every layout has: train ids that are neither contiguous nor written in order, identities with
fewer images than K = 2 or 4, query ids present in the gallery under other cameras, and for
the Market-style sets junk (-1) files in every split folder and distractors (0000) in the gallery.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image

try:
  from tests import layouts  # pylint: disable=g-import-not-at-top
except ImportError:
  import layouts  # pylint: disable=g-import-not-at-top

Row = tuple  # (path, pid, camid)


@dataclasses.dataclass
class ReidLayout:
  dataset: str      # config.dataset
  data_dir: str     # config.data_dir
  root: str         # the folder holding the split folders / list files
  version: str      # expected info.version
  train: list       # [(path, original pid, camid)]
  query: list
  gallery: list
  num_junk: int
  non_jpg: list     # paths that must be skipped as 'not a .jpg file'

  @property
  def train_pids(self) -> list[int]:
    return sorted({pid for _, pid, _ in self.train})

  @property
  def train_labels(self) -> list[int]:
    """Relabelled train ids: the rank of the original id among the sorted train ids."""
    rank = {pid: k for k, pid in enumerate(self.train_pids)}
    return [rank[pid] for _, pid, _ in self.train]


def write_jpeg(path: str, pid: int, rng: np.random.Generator, size=(12, 24)) -> None:
  """A small w x h JPEG: noise + a pid-coloured block (so decoding is real work)."""
  w, h = size
  img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
  img[h // 4:h // 2, :] = ((pid * 53) % 256, (pid * 97 + 30) % 256, (pid * 31 + 80) % 256)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(img).save(path, 'JPEG', quality=90)


# Identities: (pid, [camera (1-based) of each image]).
TRAIN_IDS = [(15, [1, 2, 2, 3, 1]), (2, [1, 3]), (7, [2]), (40, [3, 1, 1, 2]), (9, [2, 3, 3])]
# (pid, query cameras, gallery cameras): every query id has a gallery image in another camera.
TEST_IDS = [(3, [1], [2, 3, 1]), (11, [2, 3], [1, 1]), (5, [3], [1])]


def _market_style(base: str, dataset: str, top: str, name_fn, seed: int,
                  folders=('bounding_box_train', 'query', 'bounding_box_test'),
                  with_junk: bool = True, with_distractors: bool = True,
                  version: str = '') -> ReidLayout:
  rng = np.random.default_rng(seed)
  root = os.path.join(os.fspath(base), top) if top else os.fspath(base)
  rows = {f: [] for f in folders}
  frame = [100]

  def add(folder, pid, cam):
    frame[0] += int(rng.integers(1, 40))
    path = os.path.join(root, folder, name_fn(pid, cam, frame[0]))
    write_jpeg(path, max(pid, 0), rng, (int(rng.integers(8, 17)), int(rng.integers(16, 33))))
    if pid != -1:
      rows[folder].append((path, pid, cam - 1))

  f_train, f_query, f_gallery = folders
  for pid, cams in TRAIN_IDS:
    for cam in cams:
      add(f_train, pid, cam)
  for pid, q_cams, g_cams in TEST_IDS:
    for cam in q_cams:
      add(f_query, pid, cam)
    for cam in g_cams:
      add(f_gallery, pid, cam)
  num_junk = 0
  if with_junk:
    for folder, cam in ((f_train, 1), (f_query, 2), (f_gallery, 3), (f_gallery, 1)):
      add(folder, -1, cam)
      num_junk += 1
  if with_distractors:
    for cam in (1, 2, 3):
      add(f_gallery, 0, cam)
  non_jpg = [os.path.join(root, f_train, 'Thumbs.db'), os.path.join(root, f_gallery,
                                                                     'readme.txt')]
  for p in non_jpg:
    with open(p, 'w') as f:
      f.write('not an image\n')
  key = lambda r: os.path.basename(r[0])
  return ReidLayout(dataset, os.fspath(base), root, version,
                    *(sorted(rows[f], key=key) for f in folders), num_junk, sorted(non_jpg))


def write_market1501(base: str, seed: int = 0, top: str = 'Market-1501-v15.09.15',
                     **kwargs) -> ReidLayout:
  """Market-1501-v15.09.15/{bounding_box_train, query, bounding_box_test}/
  <pid>_c<cam>s<seq>_<frame>_<det>.jpg; junk -1_c..., distractors 0000_c...; Thumbs.db."""
  name = lambda pid, cam, fr: f'{"-1" if pid < 0 else f"{pid:04d}"}_c{cam}s1_{fr:06d}_01.jpg'
  return _market_style(base, 'market1501', top, name, seed, version='Market-1501', **kwargs)


def write_dukemtmc(base: str, seed: int = 1, **kwargs) -> ReidLayout:
  """DukeMTMC-reID/{bounding_box_train, query, bounding_box_test}/<pid>_c<cam>_f<frame>.jpg."""
  name = lambda pid, cam, fr: f'{"-1" if pid < 0 else f"{pid:04d}"}_c{cam}_f{fr:07d}.jpg'
  return _market_style(base, 'dukemtmc', 'DukeMTMC-reID', name, seed, version='DukeMTMC-reID',
                       **kwargs)


def write_veri776(base: str, seed: int = 2, **kwargs) -> ReidLayout:
  """VeRi/{image_train, image_query, image_test}/<vid>_c<cam:03d>_<time>_<n>.jpg, no junk and
  no distractors (vehicle ids start at 1); cameras are shifted to exercise c0NN > 9."""
  name = lambda pid, cam, fr: f'{pid:04d}_c{cam + 9:03d}_{fr:08d}_0.jpg'
  lay = _market_style(base, 'veri776', 'VeRi', name, seed,
                      folders=('image_train', 'image_query', 'image_test'), with_junk=False,
                      with_distractors=False, version='VeRi-776', **kwargs)
  shift = lambda rows: [(p, pid, cam + 9) for p, pid, cam in rows]
  lay.train, lay.query, lay.gallery = shift(lay.train), shift(lay.query), shift(lay.gallery)
  return lay


MSMT17_DIRS = {1: ('MSMT17_V1', 'train', 'test'), 2: ('MSMT17_V2', 'mask_train_v2',
                                                      'mask_test_v2')}


def write_msmt17(base: str, version: int = 1, seed: int = 3) -> ReidLayout:
  """MSMT17_V<n>/{<train dir>, <test dir>, list_train.txt, list_val.txt, list_query.txt,
  list_gallery.txt}; lines '<pid:04d>/<pid:04d>_<k:03d>_<cam:02d>_0303morning_<frame>_<n>.jpg
  <pid>'. Test pid 0 is a real identity here (no distractors in MSMT17)."""
  rng = np.random.default_rng(seed)
  top, train_dir, test_dir = MSMT17_DIRS[version]
  root = os.path.join(os.fspath(base), top)
  lists = {n: [] for n in ('train', 'val', 'query', 'gallery')}
  rows = {n: [] for n in lists}
  counter = {}

  def add(which, image_dir, pid, cam):
    k = counter[(image_dir, pid)] = counter.get((image_dir, pid), -1) + 1
    frame = int(rng.integers(1, 9999))
    rel = f'{pid:04d}/{pid:04d}_{k:03d}_{cam:02d}_0303morning_{frame:04d}_0.jpg'
    path = os.path.join(root, image_dir, rel)
    write_jpeg(path, pid, rng)
    lists[which].append(f'{rel} {pid}\n')
    rows[which].append((path, pid, cam - 1))

  train_ids = [(4, [1, 13, 13]), (0, [2, 5]), (2, [15]), (10, [3, 4, 4, 6])]
  for n, (pid, cams) in enumerate(train_ids):
    for j, cam in enumerate(cams):  # The last image of the first two ids goes to list_val.
      add('val' if n < 2 and j == len(cams) - 1 else 'train', train_dir, pid, cam)
  for pid, q_cams, g_cams in [(0, [1], [2, 2]), (3, [14, 2], [1]), (1, [5], [6, 5])]:
    for cam in q_cams:
      add('query', test_dir, pid, cam)
    for cam in g_cams:
      add('gallery', test_dir, pid, cam)
  for n, lines in lists.items():
    with open(os.path.join(root, f'list_{n}.txt'), 'w') as f:
      f.writelines(lines)
  return ReidLayout('msmt17', os.fspath(base), root, f'{top} (train+val)',
                    rows['train'] + rows['val'], rows['query'], rows['gallery'], 0, [])


WRITERS = {'market1501': write_market1501, 'dukemtmc': write_dukemtmc,
           'veri776': write_veri776, 'msmt17': write_msmt17,
           'msmt17_v2': lambda base, **kw: write_msmt17(base, version=2, **kw)}


def write_reid_layout(name: str, base: str, **kwargs) -> ReidLayout:
  """name: market1501 | dukemtmc | veri776 | msmt17 (V1) | msmt17_v2."""
  return WRITERS[name](base, **kwargs)


truncate_file = layouts.truncate_file
write_non_image = layouts.write_non_image


@dataclasses.dataclass
class FolderReidLayout:
  """An identity-folder Re-ID set (`dataset='reid_folder'`): what the reader must produce."""
  data_dir: str
  identities: list          # every identity name, sorted: id i (1-based) = identities[i - 1]
  splits: dict              # split -> [(path, identity name)] in the reader's order
  cameras: dict | None      # path -> camera label, or None without cameras.csv
  duplicate: tuple          # (query path, gallery path): the same file in both splits
  dataset: str = 'reid_folder'


# identity -> images per split (train, query, gallery): names any string; 'zz gallery only' a
# distractor; 'query only' has no gallery match; 'q-and-g' is never trained on.
FOLDER_IDS = {'Ada': (3, 1, 2), 'bob_2': (2, 1, 1), 'Cy': (4, 0, 0), 'q-and-g': (0, 1, 2),
              'query only': (0, 1, 0), 'zz gallery only': (0, 0, 2)}


def write_reid_folder(base: str, cameras: bool = False, seed: int = 7) -> FolderReidLayout:
  """DATA/{train,query,gallery}/<identity>/<i>.jpg (+ a PNG, a text file to skip), the first
  query of 'Ada' copied byte for byte into the gallery, and with `cameras` a cameras.csv."""
  rng = np.random.default_rng(seed)
  root = os.path.join(base, 'mine')
  names = sorted(FOLDER_IDS)
  splits = {'train': [], 'query': [], 'gallery': []}
  for which_index, which in enumerate(splits):
    for name in names:
      for i in range(FOLDER_IDS[name][which_index]):
        ext = 'png' if (which, name, i) == ('train', 'Cy', 3) else 'jpg'
        path = os.path.join(root, which, name, f'{i}.{ext}')
        write_jpeg(path, names.index(name) + 1, rng)
        if ext == 'png':  # a real PNG (the reader takes any image type)
          Image.open(path).save(path, 'PNG')
        splits[which].append((path, name))
  with open(os.path.join(root, 'train', 'Ada', 'notes.txt'), 'w') as f:
    f.write('not an image')
  query_copy = splits['query'][0][0]
  copy = os.path.join(root, 'gallery', 'Ada', 'z_copy_of_query.jpg')
  with open(query_copy, 'rb') as src, open(copy, 'wb') as dst:
    dst.write(src.read())
  splits['gallery'].insert([p for p, _ in splits['gallery']].index(
      os.path.join(root, 'gallery', 'Ada', '1.jpg')) + 1, (copy, 'Ada'))
  camera_of = None
  if cameras:
    camera_of = {path: f'cam{(k % 3) + 1}' for which in splits
                 for k, (path, _) in enumerate(splits[which])}
    with open(os.path.join(root, 'cameras.csv'), 'w') as f:
      f.write('path,camera\n')
      for path, camera in camera_of.items():
        f.write(f'{os.path.relpath(path, root)},{camera}\n')
  return FolderReidLayout(root, names, splits, camera_of, (query_copy, copy))
