"""Writers of tiny copies of the official dataset layouts, with real JPEG files (PIL).

Used by the data tests and reusable by end-to-end tests:

    lay = write_cub_layout(tmp_path)          # -> Layout
    config.dataset, config.data_source, config.data_dir = 'cub', 'folder', lay.data_dir

Each writer returns what it wrote (class names in label order and per split the list of
(absolute image path, 0-based label) in the order of the label files), so tests can compute
expectations independently of the loader.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image

BANNER_RGB = (255, 0, 255)  # Aircraft copyright banner colour in the tiny layout.
AIRCRAFT_BANNER_PX = 20


@dataclasses.dataclass
class Layout:
  dataset: str               # config.dataset
  data_dir: str              # config.data_dir (data_source='folder')
  root: str                  # the folder holding the label files
  class_names: list[str]
  train: list[tuple[str, int]]
  test: list[tuple[str, int]]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def write_image(path: str, size: tuple[int, int], label: int, rng: np.random.Generator,
                banner_px: int = 0, fmt: str = 'JPEG', mode: str = 'RGB') -> None:
  """A w x h image: noise + a label-coloured square; optional magenta bottom banner."""
  w, h = size
  img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
  colour = np.asarray([(label * 67) % 256, (label * 131 + 40) % 256, (label * 29 + 90) % 256])
  img[h // 4:h // 2, w // 4:w // 2] = colour
  if banner_px:
    img[h - banner_px:] = BANNER_RGB
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im = Image.fromarray(img)
  if mode != 'RGB':
    im = im.convert(mode)
  im.save(path, fmt, **({'quality': 95} if fmt == 'JPEG' else {}))


def _sizes(rng, n, min_h=32):
  return [(int(rng.integers(36, 73)), int(rng.integers(min_h, min_h + 33))) for _ in range(n)]


def write_cub_layout(base: str, num_classes: int = 3, train_per_class: int = 3,
                     test_per_class: int = 2, seed: int = 0) -> Layout:
  """CUB_200_2011/{images/<class_dir>/<file>.jpg, images.txt, image_class_labels.txt,
  train_test_split.txt, classes.txt} under `base` (ids interleave train and test)."""
  rng = np.random.default_rng(seed)
  root = os.path.join(os.fspath(base), 'CUB_200_2011')
  names = [f'{c + 1:03d}.Bird_species_{c}' for c in range(num_classes)]
  rows, train, test = [], [], []
  image_id = 0
  for c, name in enumerate(names):
    n = train_per_class + test_per_class
    flags = [1] * train_per_class + [0] * test_per_class
    flags = list(rng.permutation(flags))
    for k, (flag, size) in enumerate(zip(flags, _sizes(rng, n))):
      image_id += 1
      rel = f'{name}/{name.split(".")[1]}_{k:04d}_{image_id}.jpg'
      path = os.path.join(root, 'images', rel)
      write_image(path, size, c, rng)
      rows.append((image_id, rel, c + 1, int(flag)))
  # Shuffle the id order in the files a little: loaders must sort/join by id, not by line.
  order = rng.permutation(len(rows))
  with open(os.path.join(root, 'images.txt'), 'w') as f:
    f.writelines(f'{rows[i][0]} {rows[i][1]}\n' for i in order)
  with open(os.path.join(root, 'image_class_labels.txt'), 'w') as f:
    f.writelines(f'{r[0]} {r[2]}\n' for r in rows)
  with open(os.path.join(root, 'train_test_split.txt'), 'w') as f:
    f.writelines(f'{r[0]} {r[3]}\n' for r in rows)
  with open(os.path.join(root, 'classes.txt'), 'w') as f:
    f.writelines(f'{c + 1} {n}\n' for c, n in enumerate(names))
  for _, rel, label, flag in sorted(rows):
    (train if flag else test).append((os.path.join(root, 'images', rel), label - 1))
  return Layout('cub', os.fspath(base), root, names, train, test)


def write_aircraft_layout(base: str, num_classes: int = 3, train_per_class: int = 3,
                          test_per_class: int = 2, seed: int = 1) -> Layout:
  """fgvc-aircraft-2013b/data/{images/<id>.jpg, images_variant_{trainval,test}.txt,
  variants.txt}; every image ends in a 20-px BANNER_RGB banner."""
  rng = np.random.default_rng(seed)
  root = os.path.join(os.fspath(base), 'fgvc-aircraft-2013b', 'data')
  names = [f'Boeing 7{c}7-{100 + c}' if c % 2 == 0 else f'F/A-{c}' for c in range(num_classes)]
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, 'variants.txt'), 'w') as f:
    f.writelines(n + '\n' for n in names)
  out = {}
  next_id = 1000000
  for which, per in (('trainval', train_per_class), ('test', test_per_class)):
    entries = []
    for c in range(num_classes):
      for size in _sizes(rng, per, min_h=48):
        next_id += int(rng.integers(1, 50))
        path = os.path.join(root, 'images', f'{next_id:07d}.jpg')
        write_image(path, size, c, rng, banner_px=AIRCRAFT_BANNER_PX)
        entries.append((f'{next_id:07d}', c, path))
    entries = [entries[i] for i in rng.permutation(len(entries))]
    with open(os.path.join(root, f'images_variant_{which}.txt'), 'w') as f:
      f.writelines(f'{i} {names[c]}\n' for i, c, _ in entries)
    out[which] = [(p, c) for _, c, p in entries]
  return Layout('aircraft', os.fspath(base), root, names, out['trainval'], out['test'])


def _cars_annotations(entries):
  """A 1 x N MATLAB struct array with the devkit fields."""
  dtype = [('bbox_x1', 'O'), ('bbox_y1', 'O'), ('bbox_x2', 'O'), ('bbox_y2', 'O'),
           ('class', 'O'), ('fname', 'O')]
  arr = np.zeros((1, len(entries)), dtype=dtype)
  for k, (fname, label, (w, h)) in enumerate(entries):
    arr[0, k] = (np.uint8(1), np.uint8(1), np.uint16(w - 2), np.uint16(h - 2),
                 np.uint8(label + 1), fname)
  return arr


def write_cars_layout(base: str, num_classes: int = 3, train_per_class: int = 3,
                      test_per_class: int = 2, seed: int = 2) -> Layout:
  """devkit/{cars_meta.mat, cars_train_annos.mat}, cars_test_annos_withlabels.mat,
  cars_train/, cars_test/ (fields bbox_x1..bbox_y2, class (1-based), fname)."""
  import scipy.io  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  root = os.fspath(base)
  names = [f'Make{c} Model {c} Sedan 20{10 + c}' for c in range(num_classes)]
  os.makedirs(os.path.join(root, 'devkit'), exist_ok=True)
  meta = np.empty((1, num_classes), dtype=object)
  meta[0, :] = names
  scipy.io.savemat(os.path.join(root, 'devkit', 'cars_meta.mat'), {'class_names': meta})
  out = {}
  for which, per, mat in (
      ('train', train_per_class, os.path.join(root, 'devkit', 'cars_train_annos.mat')),
      ('test', test_per_class, os.path.join(root, 'cars_test_annos_withlabels.mat'))):
    entries = []
    labels = [c for c in range(num_classes) for _ in range(per)]
    for k, (c, size) in enumerate(zip(rng.permutation(labels), _sizes(rng, len(labels)))):
      fname = f'{k + 1:05d}.jpg'
      write_image(os.path.join(root, f'cars_{which}', fname), size, int(c), rng)
      entries.append((fname, int(c), size))
    scipy.io.savemat(mat, {'annotations': _cars_annotations(entries)})
    out[which] = [(os.path.join(root, f'cars_{which}', f), c) for f, c, _ in entries]
  return Layout('cars', root, root, names, out['train'], out['test'])


def write_nabirds_layout(base: str, num_classes: int = 3, train_per_class: int = 3,
                         test_per_class: int = 2, seed: int = 3) -> Layout:
  """nabirds/{images/<class id, 4 digits>/<uuid hex>.jpg, images.txt (<uuid> <relpath>),
  image_class_labels.txt, train_test_split.txt (by uuid), classes.txt (every taxonomy node:
  the leaves with images have non-contiguous ids, the inner nodes have no images)}."""
  import uuid  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  root = os.path.join(os.fspath(base), 'nabirds')
  leaf_ids = sorted(int(i) for i in rng.choice(np.arange(100, 1000), num_classes, replace=False))
  names = [f"Bird's species {i} (adult)" for i in range(num_classes)]
  inner = [(0, 'Birds'), (1, 'Perching Birds'), (7, 'Hawks, Eagles, and Kites')]
  rows = []
  for c, class_id in enumerate(leaf_ids):
    flags = [1] * train_per_class + [0] * test_per_class
    for flag, size in zip(rng.permutation(flags), _sizes(rng, len(flags))):
      image_id = str(uuid.UUID(bytes=rng.bytes(16)))
      rel = f'{class_id:04d}/{image_id.replace("-", "")}.jpg'
      write_image(os.path.join(root, 'images', rel), size, c, rng)
      rows.append((image_id, rel, class_id, int(flag), c))
  rows = [rows[i] for i in rng.permutation(len(rows))]  # images.txt's order is the loader's
  for name, field in (('images.txt', 1), ('image_class_labels.txt', 2),
                      ('train_test_split.txt', 3)):
    order = range(len(rows)) if field == 1 else rng.permutation(len(rows))  # joined by id
    with open(os.path.join(root, name), 'w') as f:
      f.writelines(f'{rows[i][0]} {rows[i][field]}\n' for i in order)
  with open(os.path.join(root, 'classes.txt'), 'w') as f:
    f.writelines(f'{i} {n}\n' for i, n in sorted(inner + list(zip(leaf_ids, names))))
  split = {flag: [(os.path.join(root, 'images', r[1]), r[4]) for r in rows if r[3] == flag]
           for flag in (0, 1)}
  return Layout('nabirds', os.fspath(base), root, names, split[1], split[0])


def write_dogs_layout(base: str, num_classes: int = 3, train_per_class: int = 3,
                      test_per_class: int = 2, seed: int = 4, lists_folder: str = 'lists'
                      ) -> Layout:
  """Images/<wnid>-<Breed>/<wnid>_<n>.jpg and <lists_folder>/{train,test}_list.mat: N x 1
  cells file_list ('<wnid>-<Breed>/<file>.jpg') and annotation_list, N x 1 double labels
  (1-based, in wnid order), as lists.tar has them."""
  import scipy.io  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  root = os.fspath(base)
  breeds = ['Chihuahua', 'Shih-Tzu', 'black-and-tan_coonhound', 'Great_Dane'][:num_classes]
  breeds += [f'Breed_{c}' for c in range(len(breeds), num_classes)]
  folders = [f'n02{85620 + 7 * c:06d}-{breed}' for c, breed in enumerate(breeds)]
  out, number = {}, 0
  for which, per in (('train', train_per_class), ('test', test_per_class)):
    entries = []
    for c, folder in enumerate(folders):
      for size in _sizes(rng, per):
        number += int(rng.integers(1, 500))
        name = f'{folder}/{folder.split("-")[0]}_{number}.jpg'
        write_image(os.path.join(root, 'Images', name), size, c, rng)
        entries.append((name, c))
    entries = [entries[i] for i in rng.permutation(len(entries))]
    def cells(values):
      cell = np.empty((len(values), 1), dtype=object)
      cell[:, 0] = values
      return cell
    os.makedirs(os.path.join(root, lists_folder), exist_ok=True)
    scipy.io.savemat(os.path.join(root, lists_folder, f'{which}_list.mat'), {
        'file_list': cells([n for n, _ in entries]),
        'annotation_list': cells([n[:-len('.jpg')] for n, _ in entries]),
        'labels': np.array([[c + 1] for _, c in entries], np.float64)})
    out[which] = [(os.path.join(root, 'Images', n), c) for n, c in entries]
  return Layout('dogs', root, root, breeds, out['train'], out['test'])


def write_pets_layout(base: str, num_classes: int = 3, train_per_class: int = 3,
                      test_per_class: int = 2, seed: int = 5) -> Layout:
  """oxford-iiit-pet/{images/<Breed_name>_<n>.jpg, annotations/trainval.txt and test.txt
  ('<name> <class id 1-based> <species 1 cat | 2 dog> <breed id within the species>')}."""
  rng = np.random.default_rng(seed)
  root = os.path.join(os.fspath(base), 'oxford-iiit-pet')
  names = ['Abyssinian', 'american_pit_bull_terrier', 'Bengal', 'german_shorthaired'][:num_classes]
  names += [f'breed_{c}' for c in range(len(names), num_classes)]
  species = [1 if name[0].isupper() else 2 for name in names]  # cats are capitalised
  out = {}
  number = 0
  for which, file_name, per in (('train', 'trainval.txt', train_per_class),
                                ('test', 'test.txt', test_per_class)):
    entries = []
    for c, name in enumerate(names):
      for size in _sizes(rng, per):
        number += int(rng.integers(1, 9))
        write_image(os.path.join(root, 'images', f'{name}_{number}.jpg'), size, c, rng)
        entries.append((f'{name}_{number}', c))
    entries = [entries[i] for i in rng.permutation(len(entries))]
    os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
    with open(os.path.join(root, 'annotations', file_name), 'w') as f:
      f.writelines(f'{n} {c + 1} {species[c]} {species[:c + 1].count(species[c])}\n'
                   for n, c in entries)
    out[which] = [(os.path.join(root, 'images', n + '.jpg'), c) for n, c in entries]
  return Layout('pets', os.fspath(base), root, names, out['train'], out['test'])


WRITERS = {'cub': write_cub_layout, 'aircraft': write_aircraft_layout, 'cars': write_cars_layout,
           'nabirds': write_nabirds_layout, 'dogs': write_dogs_layout, 'pets': write_pets_layout}


def write_imagefolder(root, classes=('cat', 'dog', 'eel'), train=3, test=2):
  """Your own classes: ROOT/{train,test}/<class>/<i>.jpg (each class its own grey level, so a
  tiny model can tell them), and a text file a reader must ignore."""
  rng = np.random.default_rng(0)
  for which, count in (('train', train), ('test', test)):
    for label, name in enumerate(classes):
      os.makedirs(os.path.join(root, which, name), exist_ok=True)
      for i in range(count):
        pixels = np.full((40, 48, 3), 60 * label, np.uint8) + rng.integers(0, 20, (40, 48, 3),
                                                                          dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, which, name, f'{i}.jpg'))
  with open(os.path.join(root, 'train', 'cat', 'notes.txt'), 'w') as f:
    f.write('not an image: ignored')
  return root


def write_layout(dataset: str, base: str, **kwargs) -> Layout:
  return WRITERS[dataset](base, **kwargs)


def truncate_file(path: str, keep_fraction: float = 0.5) -> None:
  """Cuts a (JPEG) file short, like an interrupted download."""
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:max(1, int(len(data) * keep_fraction))])


def write_non_image(path: str) -> None:
  with open(path, 'w') as f:
    f.write('<html>404 Not Found</html>\n')
