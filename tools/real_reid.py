"""A Re-ID set from REAL images, written in the official Market-1501 layout (`digits_reid`).

The images are scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`:
1,797 8 x 8 scans of digits written by 43 people, UCI "optdigits"; shipped inside the
scikit-learn wheel, no download). Nobody here drew them. What is an identity and what a view:

* identity = a 3-digit number ("house number" / plate), e.g. 472. Train and test identities
  are different numbers, so the test identities are never trained on (the Re-ID setting);
* view = the number written with *other real samples* of its three digits (each view draws
  every digit from the real scans of that digit: different handwriting in every image, as a
  person changes pose between cameras), seen by one of 4 "cameras" that change the
  background (two-tone wall/floor with camera-specific texture and per-image clutter), the ink
  colour, the scale and the position, and blur;
* train and test identities draw their digits from disjoint halves of the scans (the first
  and the second half of sklearn's order), so test images show scans never seen in training.

Distractors (id 0000) are other numbers, in the gallery only. Identities differ in a single
digit as often as chance gives (300 of 1,000 numbers), so a model must read every digit; a
raw-pixel nearest neighbour mostly matches the camera (background, ink), not the number.

Defaults (the issue's set sizes): 300 train identities x 6 images over 2-4 of the 4 cameras;
150 test identities, 1 query + 3 gallery images each from distinct cameras, 75 distractors:
150 queries x 525 gallery images. 64 x 32 px (height x width), JPEG quality 95.

  python -m tools.real_reid --out /tmp/digits_reid        # writes + prints counts, pixel mAP
  python -m tools.real_reid --pretrain --out /tmp/digits_pretrain   # the 10-class pretraining set
  python main.py --config configs/reid_demo.py:real --workdir runs/reid_real \
      --config.data_dir=/tmp/digits_reid                 # (see docs/REID.md)

`--train_eval` also writes `<out>/train_ids/Market-1501`: the same train images, with each
train identity's first image as a query and the others as its gallery (no distractors):
retrieval on the TRAINING identities, which says whether the model fits them at all.

Library use: `write(out_dir, seed=0, ...)` -> the Market-1501 root; `ensure(...)` caches by
parameters (atomic, like the synthetic set).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

NUM_CAMERAS = 4
DIGITS_PER_ID = 3
MARKER = 'digits_reid.json'
VERSION = 1  # Bump when the rendering changes: it keys the cache folder.


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

  def key(self) -> str:
    blob = json.dumps({'version': VERSION, **dataclasses.asdict(self)}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def load_scans():
  """(images float32 [n, 8, 8] in [0, 1], digit labels int [n]) of sklearn's bundled digits."""
  try:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit('error: tools/real_reid.py needs scikit-learn (pip install -r requirements-dev.txt)')
  digits = load_digits()
  return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


@dataclasses.dataclass
class _Camera:
  wall: np.ndarray      # background colours (RGB 0..255)
  floor: np.ndarray
  horizon: float        # fraction of the height
  texture: str          # 'stripes' / 'checks' / 'noise' / 'plain'
  period: int
  ink: np.ndarray       # mean ink colour
  scale: float          # digit side in px
  blur: float           # 0..1: mix with a 3 x 3 box blur


def _cameras(seed: int) -> list[_Camera]:
  rng = np.random.default_rng([seed, 101])
  textures = ('stripes', 'checks', 'noise', 'plain')
  cameras = []
  for camera in range(NUM_CAMERAS):
    wall, floor = rng.uniform(60, 230, 3), rng.uniform(40, 200, 3)
    cameras.append(_Camera(
        wall=wall, floor=floor,
        horizon=float(rng.uniform(0.4, 0.75)), texture=textures[camera],
        period=int(rng.integers(3, 7)), ink=_ink(rng, wall, floor),
        scale=(9.0, 10.5, 12.0, 13.5)[camera], blur=(0.0, 0.5, 0.2, 0.8)[camera]))
  return cameras


def _ink(rng, wall, floor) -> np.ndarray:
  """A random ink colour whose brightness differs from the background's by >= ~90 levels
  (dark ink on a light scene, light ink on a dark one), as a legible camera would show it."""
  background = float(np.mean([wall.mean(), floor.mean()]))
  hue = rng.uniform(0, 1, 3)
  hue = hue / max(hue.mean(), 1e-3)
  level = rng.uniform(25, 60) if background > 128 else rng.uniform(200, 235)
  return np.clip(hue * level, 0, 255)


def _background(rng, camera: _Camera, height: int, width: int) -> np.ndarray:
  yy, xx = np.mgrid[:height, :width]
  horizon = int(round((camera.horizon + rng.uniform(-0.08, 0.08)) * height))
  image = np.where((yy < horizon)[..., None], camera.wall, camera.floor).astype(np.float32)
  if camera.texture == 'stripes':
    image *= np.where(((xx + rng.integers(camera.period)) // camera.period) % 2 == 0, 1.0,
                      0.8)[..., None]
  elif camera.texture == 'checks':
    image *= np.where(((xx // camera.period) + (yy // camera.period)) % 2 == 0, 1.0,
                      0.85)[..., None]
  elif camera.texture == 'noise':
    image += rng.normal(0, 18, (height, width, 1))
  for _ in range(int(rng.integers(0, 3))):  # clutter: a few random rectangles
    top, left = int(rng.integers(height)), int(rng.integers(width))
    image[top:top + int(rng.integers(2, 10)), left:left + int(rng.integers(2, 8))] = (
        rng.uniform(0, 255, 3))
  return image


def _resize(scan: np.ndarray, side: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = Image.fromarray(np.round(scan * 255).astype(np.uint8))
  return np.asarray(image.resize((side, side), Image.BILINEAR), np.float32) / 255.0


def render(rng, camera: _Camera, scans: list[np.ndarray], height: int, width: int,
           side: int | None = None) -> np.ndarray:
  """The digits `scans` (8 x 8, [0, 1]) stacked top to bottom on the camera's background;
  `side` (px) overrides the camera's digit size."""
  image = _background(rng, camera, height, width)
  if side is None:
    side = int(round(camera.scale * rng.uniform(0.9, 1.1) * height / 64))
  side = max(4, min(side, width - 2, (height - 2) // len(scans)))
  gap = int(rng.integers(0, 3))
  total = len(scans) * side + (len(scans) - 1) * gap
  top = int(rng.integers(0, max(1, height - total + 1)))
  left = int(rng.integers(0, max(1, width - side + 1)))
  ink = np.clip(camera.ink + rng.normal(0, 25, 3), 0, 255)
  for i, scan in enumerate(scans):
    alpha = _resize(scan, side)[..., None]
    y = top + i * (side + gap)
    patch = image[y:y + side, left:left + side]
    image[y:y + side, left:left + side] = (1 - alpha) * patch + alpha * ink
  if camera.blur > 0:
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode='edge')
    box = sum(padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)) / 9
    image = (1 - camera.blur) * image + camera.blur * box
  image = image * rng.uniform(0.85, 1.15)  # exposure
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def plan(params: Params, labels: np.ndarray):
  """[(folder, pid, camera, number, half)] in write order, plus the identity table."""
  if params.num_train_ids < 1 or params.num_test_ids < 1:
    raise ValueError('needs >= 1 train and >= 1 test identity')
  if params.images_per_train_id < 2 or not 1 <= params.gallery_per_test_id < NUM_CAMERAS:
    raise ValueError(f'images_per_train_id must be >= 2 and gallery_per_test_id in '
                     f'1..{NUM_CAMERAS - 1}')
  total = params.num_train_ids + params.num_test_ids + params.num_distractors
  if total > 10 ** DIGITS_PER_ID:
    raise ValueError(f'{total} identities + distractors need more than the '
                     f'{10 ** DIGITS_PER_ID} {DIGITS_PER_ID}-digit numbers')
  rng = np.random.default_rng([params.seed, 7])
  numbers = rng.permutation(10 ** DIGITS_PER_ID)[:total]
  train_numbers = numbers[:params.num_train_ids]
  test_numbers = numbers[params.num_train_ids:params.num_train_ids + params.num_test_ids]
  distractor_numbers = numbers[params.num_train_ids + params.num_test_ids:]
  pids = rng.permutation(np.arange(1, params.num_train_ids + params.num_test_ids + 1))
  train_pids, test_pids = pids[:params.num_train_ids], pids[params.num_train_ids:]
  items = []
  for pid, number in zip(train_pids, train_numbers):
    cameras = rng.permutation(NUM_CAMERAS)[:int(rng.integers(2, NUM_CAMERAS + 1))]
    for i in range(params.images_per_train_id):
      items.append(('bounding_box_train', int(pid), int(cameras[i % len(cameras)]), int(number), 0))
  for pid, number in zip(test_pids, test_numbers):
    cameras = rng.permutation(NUM_CAMERAS)[:1 + params.gallery_per_test_id]
    items.append(('query', int(pid), int(cameras[0]), int(number), 1))
    items += [('bounding_box_test', int(pid), int(c), int(number), 1) for c in cameras[1:]]
  for number in distractor_numbers:
    items.append(('bounding_box_test', 0, int(rng.integers(NUM_CAMERAS)), int(number), 1))
  del labels
  table = {'train': {int(p): int(n) for p, n in zip(train_pids, train_numbers)},
           'test': {int(p): int(n) for p, n in zip(test_pids, test_numbers)}}
  return items, table


def _digits_of(number: int) -> list[int]:
  return [int(c) for c in f'{number:0{DIGITS_PER_ID}d}']


def write(out_dir: str, params: Params = Params(), *, train_eval: bool = False) -> str:
  """Writes the set under `out_dir` (Market-1501-v15.09.15/...); returns that root."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  scans, labels = load_scans()
  half = len(scans) // 2
  pools = [[np.flatnonzero(labels[:half] == d) for d in range(10)],
           [half + np.flatnonzero(labels[half:] == d) for d in range(10)]]
  items, table = plan(params, labels)
  cameras = _cameras(params.seed)
  root = os.path.join(out_dir, 'Market-1501-v15.09.15')
  for folder in ('bounding_box_train', 'query', 'bounding_box_test'):
    os.makedirs(os.path.join(root, folder), exist_ok=True)
  written = []
  for index, (folder, pid, camera, number, which) in enumerate(items):
    rng = np.random.default_rng([params.seed, 9, index])
    pick = np.random.default_rng([params.seed, 13, pid, number]) if params.same_scans else rng
    chosen = [scans[pick.choice(pools[which][d])] for d in _digits_of(number)]
    image = render(rng, cameras[camera], chosen, params.height, params.width)
    name = f'{pid:04d}_c{camera + 1}s1_{index:06d}_00.jpg'
    path = os.path.join(root, folder, name)
    Image.fromarray(image).save(path, 'JPEG', quality=95, subsampling=0)
    written.append((folder, pid, camera, path))
  if train_eval:
    _write_train_eval(out_dir, written)
  meta = {'version': VERSION, 'params': dataclasses.asdict(params), 'source':
          'sklearn.datasets.load_digits (UCI optdigits, 1,797 scans, 43 writers)',
          'numbers': table, 'images': len(items)}
  with open(os.path.join(out_dir, MARKER), 'w') as f:
    json.dump(meta, f, indent=1)
  return root


def _write_train_eval(out_dir: str, written) -> None:
  """<out>/train_ids/Market-1501: the train images again (hard links), each train identity's
  first image a query, its images from other cameras the gallery (same-camera ones are junk
  to the protocol anyway)."""
  root = os.path.join(out_dir, 'train_ids', 'Market-1501')
  for folder in ('bounding_box_train', 'query', 'bounding_box_test'):
    os.makedirs(os.path.join(root, folder), exist_ok=True)
  seen = set()
  for folder, pid, _, path in written:
    if folder != 'bounding_box_train':
      continue
    name = os.path.basename(path)
    _link(path, os.path.join(root, 'bounding_box_train', name))
    _link(path, os.path.join(root, 'bounding_box_test' if pid in seen else 'query', name))
    seen.add(pid)


def _link(source: str, target: str) -> None:
  try:
    os.link(source, target)
  except OSError:
    shutil.copyfile(source, target)


def ensure(base_dir: str, params: Params = Params()) -> str:
  """`base_dir/digits_reid-<key>` holding the set (with train_ids/), written once, atomically.
  Returns that folder (config.data_dir for dataset=market1501)."""
  return _write_once(base_dir, f'digits_reid-{params.key()}', MARKER,
                     lambda folder: write(folder, params, train_eval=True))


def _write_once(base_dir: str, name: str, marker: str, write_into) -> str:
  """`base_dir/name`, made by `write_into(folder)` in a temporary folder and renamed (atomic:
  a concurrent or killed writer never leaves a half set under `name`), unless `marker` says
  it is there already."""
  final = os.path.join(base_dir, name)
  if os.path.isfile(os.path.join(final, marker)):
    return final
  os.makedirs(base_dir, exist_ok=True)
  temporary = tempfile.mkdtemp(prefix=f'.tmp-{name}-', dir=base_dir)
  try:
    write_into(temporary)
    try:
      os.rename(temporary, final)
    except OSError:
      if not os.path.isfile(os.path.join(final, marker)):
        raise
  finally:
    if os.path.isdir(temporary):
      shutil.rmtree(temporary, ignore_errors=True)
  return final


# --------------------------------------------------------------------------------------------
# A pretraining set: the "ImageNet" of this world (docs/REID.md "Real images")
# --------------------------------------------------------------------------------------------
PRETRAIN_MARKER = 'digits_pretrain.json'
PRETRAIN_CAMERA_SEEDS = (1000, 1001)  # 8 cameras, none of them the Re-ID set's 4


@dataclasses.dataclass(frozen=True)
class PretrainParams:
  train_per_class: int = 500
  test_per_class: int = 50
  height: int = 64
  min_side: int = 10  # digit size drawn from [min_side, max_side] px: objects at every scale,
  max_side: int = 40  # as in ImageNet (small digits alone are not learnt from scratch)
  width: int = 64    # square, as ImageNet is: the Re-ID model's 64 x 32 grid is resized to
  #                    from its 8 x 8 positions on loading, as the paper's 224 px to 256 x 128
  seed: int = 0

  def key(self) -> str:
    blob = json.dumps({'version': VERSION, 'pretrain': dataclasses.asdict(self)}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def write_pretrain(out_dir: str, params: PretrainParams = PretrainParams()) -> str:
  """A generic classification set for pretraining, in the imagefolder layout
  (`out_dir/{train,test}/<digit>/*.jpg`, dataset='imagefolder'): ONE real digit scan per
  image, label = the digit (10 classes), drawn by 8 cameras that are not the Re-ID set's.

  What it shares with the Re-ID set is only the world (digits on backgrounds), as ImageNet
  shares people and clothes with Market-1501: no identity, no 3-digit number, no camera of the
  Re-ID set, and only the FIRST half of the scans (the Re-ID train half), so the Re-ID test
  images' scans are never seen in pretraining either. Returns `out_dir`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  scans, labels = load_scans()
  half = len(scans) // 2
  pools = [np.flatnonzero(labels[:half] == d) for d in range(10)]
  cameras = [camera for seed in PRETRAIN_CAMERA_SEEDS for camera in _cameras(params.seed + seed)]
  index = 0
  for which, count in (('train', params.train_per_class), ('test', params.test_per_class)):
    for digit in range(10):
      folder = os.path.join(out_dir, which, str(digit))
      os.makedirs(folder, exist_ok=True)
      for _ in range(count):
        rng = np.random.default_rng([params.seed, 17, index])
        camera = cameras[int(rng.integers(len(cameras)))]
        side = int(rng.integers(params.min_side, params.max_side + 1))
        image = render(rng, camera, [scans[rng.choice(pools[digit])]], params.height,
                       params.width, side=side)
        Image.fromarray(image).save(os.path.join(folder, f'{index:06d}.jpg'), 'JPEG',
                                    quality=95, subsampling=0)
        index += 1
  with open(os.path.join(out_dir, PRETRAIN_MARKER), 'w') as f:
    json.dump({'version': VERSION, 'params': dataclasses.asdict(params), 'images': index,
               'source': 'sklearn.datasets.load_digits, first half of the scans'}, f, indent=1)
  return out_dir


def ensure_pretrain(base_dir: str, params: PretrainParams = PretrainParams()) -> str:
  """`base_dir/digits_pretrain-<key>`, written once, atomically (config.data_dir)."""
  return _write_once(base_dir, f'digits_pretrain-{params.key()}', PRETRAIN_MARKER,
                     lambda folder: write_pretrain(folder, params))


def pixel_baseline(data_dir: str) -> tuple[float, float]:
  """Raw-pixel nearest-neighbour (mAP, rank-1) of the set under `data_dir`."""
  from dca_jax.data import reid_sources, synthetic_reid  # pylint: disable=g-import-not-at-top
  dataset = reid_sources.read_reid('market1501', data_dir, False)
  return synthetic_reid.raw_pixel_map(dataset)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='folder to write (config.data_dir)')
  for field in dataclasses.fields(Params):
    parser.add_argument(f'--{field.name}', type=int, default=field.default)
  parser.add_argument('--train_eval', action='store_true',
                      help='also write <out>/train_ids/ (retrieval on the train identities)')
  parser.add_argument('--pretrain', action='store_true',
                      help='write the 10-class pretraining set instead (imagefolder layout: '
                           'configs/reid_demo.py:pretrain)')
  args = parser.parse_args(argv)
  if args.pretrain:
    if os.path.exists(os.path.join(args.out, PRETRAIN_MARKER)):
      sys.exit(f'error: {args.out} already holds a set ({PRETRAIN_MARKER}); choose another --out')
    write_pretrain(args.out, PretrainParams(seed=args.seed))
    print(json.dumps({'data_dir': args.out, 'dataset': 'imagefolder', 'num_classes': 10}))
    return
  params = Params(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Params)})
  if os.path.exists(os.path.join(args.out, MARKER)):
    sys.exit(f'error: {args.out} already holds a set ({MARKER}); choose another --out')
  start = time.time()
  try:
    write(args.out, params, train_eval=args.train_eval)
  except ValueError as e:
    sys.exit(f'error: {e}')
  seconds = time.time() - start
  mean_ap, rank1 = pixel_baseline(args.out)
  print(json.dumps({'data_dir': args.out, 'write_s': round(seconds, 1),
                    'raw_pixel_mAP': round(mean_ap, 4), 'raw_pixel_rank1': round(rank1, 4)}))


if __name__ == '__main__':
  main()
