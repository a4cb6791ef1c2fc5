"""A Re-ID set of REAL images in the official Market-1501 layout (docs/REID.md, "Real images").

scikit-learn's bundled handwritten digits (1,797 8 x 8 scans by 43 writers, no download): an
identity is a 3-digit number, every view writes it with other real scans of its digits, filmed
by one of 4 cameras of the synthetic Re-ID set (`synthetic_reid.cameras`); train and test
identities are other numbers from disjoint halves of the scans, distractors (id 0000) other
numbers, gallery only. `--train_eval` also writes `<out>/train_ids/Market-1501` (retrieval on
the training identities).

  python -m tools.real_reid --out runs/digits_reid            # writes + prints the pixel mAP
  python -m tools.real_reid --pretrain --out runs/digits_pretrain_set   # the 10-class set
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

import numpy as np

from dca_jax.data import synthetic_reid as world

NUM_CAMERAS = 4   # the first 4 of the synthetic set's cameras
DIGITS_PER_ID = 3
DIGIT_SIDE = 0.2  # a digit's side over the person height the camera frames
MARKER = 'digits_reid.json'
VERSION = 2  # Bump when the rendering changes: the sets' marker files record it.


@dataclasses.dataclass(frozen=True)
class Params:
  num_train_ids: int = 300
  images_per_train_id: int = 6
  num_test_ids: int = 150
  gallery_per_test_id: int = 3   # plus 1 query, all from distinct cameras
  num_distractors: int = 75
  height: int = 64
  width: int = 32
  seed: int = 0
  same_scans: int = 0            # 1: an identity keeps its three scans in every view


def load_scans():
  """(images float32 [n, 8, 8] in [0, 1], digit labels int [n]) of sklearn's bundled digits."""
  try:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit('error: tools/real_reid.py needs scikit-learn (pip install -r requirements-dev.txt)')
  digits = load_digits()
  return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def cameras(seed: int) -> list:
  return world.cameras(seed)[:NUM_CAMERAS]


def _ink(camera) -> np.ndarray:
  """Ink that stands out from the camera's scene: dark on a light one, light on a dark one,
  tinted by the camera's colour cast."""
  light = np.mean([camera.wall.mean(), camera.floor.mean()]) > 128
  return np.clip(camera.gain / camera.gain.mean() * (40.0 if light else 215.0), 0, 255)


def _resize(scan: np.ndarray, side: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = Image.fromarray(np.round(scan * 255).astype(np.uint8))
  return np.asarray(image.resize((side, side), Image.BILINEAR), np.float32) / 255.0


def render(rng, camera, scans: list, height: int, width: int, side: int | None = None):
  """The digits `scans` (8 x 8, [0, 1]) stacked top to bottom in the camera's scene, drawn as
  the synthetic set draws its persons (supersampled background, then its finish); `side` (px)
  overrides the camera's digit size."""
  s = world.SUPERSAMPLE
  canvas = world.background(rng, camera, height * s, width * s)
  if side is None:
    side = int(round(camera.scale * DIGIT_SIDE * height * rng.uniform(0.9, 1.1)))
  side = max(4, min(side, width - 2, (height - 2) // len(scans))) * s
  gap = int(rng.integers(0, 3)) * s
  total = len(scans) * side + (len(scans) - 1) * gap
  top = int(rng.integers(0, max(1, height * s - total + 1)))
  left = int(rng.integers(0, max(1, width * s - side + 1)))
  ink = np.clip(_ink(camera) + rng.normal(0, 25, 3), 0, 255)
  for i, scan in enumerate(scans):
    alpha = _resize(scan, side)[..., None]
    y = top + i * (side + gap)
    canvas[y:y + side, left:left + side] += alpha * (ink - canvas[y:y + side, left:left + side])
  return world.finish(canvas, rng, camera, height, width)


def _check(params: Params) -> None:
  if params.num_train_ids < 1 or params.num_test_ids < 1:
    raise ValueError('needs >= 1 train and >= 1 test identity')
  if params.images_per_train_id < 2 or not 1 <= params.gallery_per_test_id < NUM_CAMERAS:
    raise ValueError(f'images_per_train_id must be >= 2 and gallery_per_test_id in '
                     f'1..{NUM_CAMERAS - 1}')
  total = params.num_train_ids + params.num_test_ids + params.num_distractors
  if total > 10 ** DIGITS_PER_ID:
    raise ValueError(f'{total} identities + distractors need more than the '
                     f'{10 ** DIGITS_PER_ID} {DIGITS_PER_ID}-digit numbers')


def plan(params: Params):
  """[(folder, pid, camera, number, half)] in write order, plus the identity table."""
  _check(params)
  rng = np.random.default_rng([params.seed, 7])
  n_train, n_test = params.num_train_ids, params.num_test_ids
  numbers = rng.permutation(10 ** DIGITS_PER_ID)[:n_train + n_test + params.num_distractors]
  pids = rng.permutation(np.arange(1, n_train + n_test + 1))
  train = list(zip(pids[:n_train], numbers[:n_train]))
  test = list(zip(pids[n_train:], numbers[n_train:n_train + n_test]))
  items = []
  for pid, number in train:
    views = rng.permutation(NUM_CAMERAS)[:int(rng.integers(2, NUM_CAMERAS + 1))]
    items += [('bounding_box_train', int(pid), int(views[i % len(views)]), int(number), 0)
              for i in range(params.images_per_train_id)]
  for pid, number in test:
    views = rng.permutation(NUM_CAMERAS)[:1 + params.gallery_per_test_id]
    items.append(('query', int(pid), int(views[0]), int(number), 1))
    items += [('bounding_box_test', int(pid), int(c), int(number), 1) for c in views[1:]]
  for number in numbers[n_train + n_test:]:
    items.append(('bounding_box_test', 0, int(rng.integers(NUM_CAMERAS)), int(number), 1))
  table = {'train': {int(p): int(n) for p, n in train}, 'test': {int(p): int(n) for p, n in test}}
  return items, table


def _save(image: np.ndarray, path: str) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(image).save(path, 'JPEG', quality=95, subsampling=0)


def write(out_dir: str, params: Params = Params(), *, train_eval: bool = False) -> str:
  """Writes the set under `out_dir` (Market-1501-v15.09.15/...); returns that root."""
  scans, labels = load_scans()
  half = len(scans) // 2
  pools = [[np.flatnonzero(labels[:half] == d) for d in range(10)],
           [half + np.flatnonzero(labels[half:] == d) for d in range(10)]]
  items, table = plan(params)
  views = cameras(params.seed)
  root = os.path.join(out_dir, 'Market-1501-v15.09.15')
  for folder in ('bounding_box_train', 'query', 'bounding_box_test'):
    os.makedirs(os.path.join(root, folder), exist_ok=True)
  written = []
  for index, (folder, pid, camera, number, which) in enumerate(items):
    rng = np.random.default_rng([params.seed, 9, index])
    pick = np.random.default_rng([params.seed, 13, pid, number]) if params.same_scans else rng
    chosen = [scans[pick.choice(pools[which][int(d)])] for d in f'{number:03d}']
    path = os.path.join(root, folder, f'{pid:04d}_c{camera + 1}s1_{index:06d}_00.jpg')
    _save(render(rng, views[camera], chosen, params.height, params.width), path)
    written.append((folder, pid, path))
  if train_eval:
    _write_train_eval(out_dir, written)
  meta = {'version': VERSION, 'params': dataclasses.asdict(params), 'numbers': table,
          'source': 'sklearn.datasets.load_digits (UCI optdigits, 1,797 scans, 43 writers)',
          'images': len(items)}
  with open(os.path.join(out_dir, MARKER), 'w') as f:
    json.dump(meta, f, indent=1)
  return root


def _write_train_eval(out_dir: str, written) -> None:
  """<out>/train_ids/Market-1501: the train images again (hard links), each identity's first
  image a query, the others its gallery."""
  root = os.path.join(out_dir, 'train_ids', 'Market-1501')
  for folder in ('bounding_box_train', 'query', 'bounding_box_test'):
    os.makedirs(os.path.join(root, folder), exist_ok=True)
  seen = set()
  for folder, pid, path in written:
    if folder == 'bounding_box_train':
      name = os.path.basename(path)
      _link(path, os.path.join(root, 'bounding_box_train', name))
      _link(path, os.path.join(root, 'bounding_box_test' if pid in seen else 'query', name))
      seen.add(pid)


def _link(source: str, target: str) -> None:
  try:
    os.link(source, target)
  except OSError:
    shutil.copyfile(source, target)


# The pretraining set: the "ImageNet" of this world (docs/REID.md "Real images").
PRETRAIN_MARKER = 'digits_pretrain.json'
PRETRAIN_CAMERA_SEEDS = (1000, 1001)  # 8 cameras, none of them the Re-ID set's 4


@dataclasses.dataclass(frozen=True)
class PretrainParams:
  train_per_class: int = 500
  test_per_class: int = 50
  height: int = 64
  width: int = 64     # square, as ImageNet is
  min_side: int = 10  # digit side drawn from [min_side, max_side] px: objects at every scale
  max_side: int = 40
  seed: int = 0


def write_pretrain(out_dir: str, params: PretrainParams = PretrainParams()) -> str:
  """A 10-class imagefolder set (`out_dir/{train,test}/<digit>/*.jpg`): ONE real scan per image
  of the first half of the scans (the Re-ID train half), filmed by 8 cameras that are not the
  Re-ID set's; it shares only the world with the Re-ID set, as ImageNet does with Market-1501."""
  scans, labels = load_scans()
  pools = [np.flatnonzero(labels[:len(scans) // 2] == d) for d in range(10)]
  views = [camera for seed in PRETRAIN_CAMERA_SEEDS for camera in cameras(params.seed + seed)]
  index = 0
  for split, count in (('train', params.train_per_class), ('test', params.test_per_class)):
    for digit in range(10):
      os.makedirs(os.path.join(out_dir, split, str(digit)), exist_ok=True)
      for _ in range(count):
        rng = np.random.default_rng([params.seed, 17, index])
        camera = views[int(rng.integers(len(views)))]
        side = int(rng.integers(params.min_side, params.max_side + 1))
        image = render(rng, camera, [scans[rng.choice(pools[digit])]], params.height,
                       params.width, side=side)
        _save(image, os.path.join(out_dir, split, str(digit), f'{index:06d}.jpg'))
        index += 1
  with open(os.path.join(out_dir, PRETRAIN_MARKER), 'w') as f:
    json.dump({'version': VERSION, 'params': dataclasses.asdict(params), 'images': index,
               'source': 'sklearn.datasets.load_digits, first half of the scans'}, f, indent=1)
  return out_dir


def pixel_baseline(data_dir: str) -> tuple[float, float]:
  """Raw-pixel nearest-neighbour (mAP, rank-1) of the set under `data_dir`."""
  from dca_jax.data import reid_sources  # pylint: disable=g-import-not-at-top
  return world.raw_pixel_map(reid_sources.read_reid('market1501', data_dir, False))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='folder to write (config.data_dir)')
  for field in dataclasses.fields(Params):
    parser.add_argument(f'--{field.name}', type=int, default=field.default)
  parser.add_argument('--train_eval', action='store_true',
                      help='also write <out>/train_ids/ (retrieval on the train identities)')
  parser.add_argument('--pretrain', action='store_true',
                      help='write the 10-class pretraining set instead (imagefolder layout)')
  args = parser.parse_args(argv)
  marker = PRETRAIN_MARKER if args.pretrain else MARKER
  if os.path.exists(os.path.join(args.out, marker)):
    sys.exit(f'error: {args.out} already holds a set ({marker}); choose another --out')
  if args.pretrain:
    write_pretrain(args.out, PretrainParams(seed=args.seed))
    print(json.dumps({'data_dir': args.out, 'dataset': 'imagefolder', 'num_classes': 10}))
    return
  start = time.time()
  try:
    write(args.out, Params(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Params)}),
          train_eval=args.train_eval)
  except ValueError as e:
    sys.exit(f'error: {e}')
  seconds = time.time() - start
  mean_ap, rank1 = pixel_baseline(args.out)
  print(json.dumps({'data_dir': args.out, 'write_s': round(seconds, 1),
                    'raw_pixel_mAP': round(mean_ap, 4), 'raw_pixel_rank1': round(rank1, 4)}))


if __name__ == '__main__':
  main()
