"""A generated Re-ID set (`dataset='synthetic_reid'`), written as JPEGs in the Market-1501 layout.

Every image is a person-like figure (head, torso with arms, legs, shoes) seen by one of six
"cameras". What is shared and what tells identities apart:

* identity = a small two-colour emblem on the chest (top half colour A, bottom half colour B
  from a palette of saturated hues; about 1/4 of the torso area). Train and test identities
  use different (A, B) codes, so retrieval of unseen test identities needs a model that reads
  the emblem (the Re-ID setting: test ids are never trained on);
* clothes: each identity wears one of only 4 shirt/trousers combinations, so many identities
  share the overall look; skin and hair vary per image;
* cameras change what dominates the raw pixels: a camera-specific background (wall/floor
  colours, stripes) with per-image clutter, a per-channel colour cast and brightness, and the
  person's scale and position. An identity is seen by 1-4 cameras, and the protocol ignores
  same-camera matches, so a raw-pixel nearest neighbour mostly finds another person of the
  same camera (measured mAP in docs/REID_DATA.md; `raw_pixel_map`).

The emblem is centred and left-right symmetric, so the horizontal flip keeps the identity.
Files follow Market-1501 naming (`0002_c1s1_000451_03.jpg`), with distractors (id 0: background
crops and figure fragments, gallery only) and junk (id -1: zoomed partial bodies, dropped by
the reader) like the real set, and are read back through `reid_sources.read_market1501`.

Sizes: `num_train_ids` (config.num_classes) train identities and as many test identities;
`num_train` train images; `num_test` query + gallery images (distractors included, junk extra).
Image height `image_size`, width image_size // 2. Deterministic from the seed; generated once
per parameter set into `base_dir` (config.data_dir, else a folder under tempfile.gettempdir()),
atomically (a temp folder renamed into place), so concurrent processes never see half a set.

    python -m dca_jax.data.synthetic_reid --num_classes 32 --num_train 1600 --num_test 800
prints the counts, the generation time and the raw-pixel nearest-neighbour mAP / rank-1.
"""

from __future__ import annotations

import colorsys
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np

from dca_jax.data.errors import DataError

GENERATOR_VERSION = 2  # Bump when the rendering changes: it keys the cache folder.
NUM_CAMERAS = 6
SUPERSAMPLE = 4
DISTRACTOR_FRACTION = 0.06  # of num_test (gallery, id 0)
JUNK_FRACTION = 0.03        # of num_test, extra files (id -1)
QUERIES_PER_ID = 3          # one query image from each of up to 3 of the identity's cameras
MARKER = 'synthetic_reid.json'

SHIRTS = ((150, 60, 55), (60, 85, 140))       # muted red / blue
TROUSERS = ((50, 50, 55), (150, 135, 100))    # dark grey / khaki
SKINS = ((230, 190, 160), (200, 150, 110), (140, 95, 65))
HAIRS = ((35, 25, 20), (110, 75, 40), (200, 180, 120))


@dataclasses.dataclass(frozen=True)
class Params:
  num_train_ids: int
  num_train: int
  num_test: int
  image_size: int
  seed: int

  @property
  def width(self) -> int:
    return max(2, self.image_size // 2)

  def key(self) -> str:
    blob = json.dumps({'version': GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def emblem_palette(num_codes: int) -> np.ndarray:
  """k >= 4 saturated hues with k * k >= num_codes ordered (top, bottom) pairs."""
  size = 4
  while size * size < num_codes:
    size += 1
  hues = [colorsys.hsv_to_rgb(i / size, 1.0, 1.0) for i in range(size)]
  return np.round(np.asarray(hues) * 255).astype(np.float32)


@dataclasses.dataclass
class Camera:
  wall: np.ndarray       # background colour above the horizon
  floor: np.ndarray      # below
  horizon: float         # fraction of the height
  stripe_period: float   # px of the wall stripes (0 = none)
  gain: np.ndarray       # per-channel colour cast
  scale: float           # person height / image height
  centre: float          # person centre x / width


def cameras(seed: int) -> list[Camera]:
  """The set's six cameras, drawn from `seed` (tools/real_reid.py films its digits with them)."""
  rng = np.random.default_rng([seed, 11])
  out = []
  for camera in range(NUM_CAMERAS):
    out.append(Camera(
        wall=rng.uniform(40, 220, 3), floor=rng.uniform(40, 220, 3),
        horizon=rng.uniform(0.45, 0.8), stripe_period=float(rng.choice([0, 3, 5, 8])),
        gain=rng.uniform(0.75, 1.25, 3) * rng.uniform(0.8, 1.15),
        scale=[0.62, 0.7, 0.78, 0.86, 0.92, 0.74][camera], centre=rng.uniform(0.4, 0.6)))
  return out


# ----------------------------------------------------------------------------- rendering
def _fill(canvas, top, bottom, left, right, colour):
  """Fills the rectangle [top, bottom) x [left, right) (rounded, clipped to the canvas)."""
  height, width = canvas.shape[:2]
  top, bottom = max(0, int(round(top))), min(height, int(round(bottom)))
  left, right = max(0, int(round(left))), min(width, int(round(right)))
  if bottom > top and right > left:
    canvas[top:bottom, left:right] = colour


def _ellipse(canvas, centre_y, centre_x, radius_y, radius_x, colour, top_only=False):
  """Fills an ellipse; top_only: only above 0.2 radius_y over the centre (hair)."""
  height, width = canvas.shape[:2]
  top = max(0, int(centre_y - radius_y))
  bottom = min(height, int(np.ceil(centre_y + radius_y)) + 1)
  left = max(0, int(centre_x - radius_x))
  right = min(width, int(np.ceil(centre_x + radius_x)) + 1)
  if bottom <= top or right <= left:
    return
  rows, cols = np.ogrid[top:bottom, left:right]
  inside = ((rows - centre_y) / radius_y) ** 2 + ((cols - centre_x) / radius_x) ** 2 <= 1.0
  if top_only:
    inside = inside & (rows <= centre_y - 0.2 * radius_y)
  canvas[top:bottom, left:right][inside] = colour


def background(rng, camera: Camera, height: int, width: int) -> np.ndarray:
  canvas = np.empty((height, width, 3), np.float32)
  horizon = int(camera.horizon * height)
  canvas[:horizon] = camera.wall
  canvas[horizon:] = camera.floor
  if camera.stripe_period:
    period = camera.stripe_period * SUPERSAMPLE
    stripes = (np.arange(width) // period) % 2 == 1
    canvas[:horizon, stripes] *= 0.8
  for _ in range(int(rng.integers(2, 5))):  # Per-image clutter: muted boxes.
    box_height, box_width = rng.uniform(0.1, 0.35) * height, rng.uniform(0.15, 0.5) * width
    y, x = rng.uniform(0, height - box_height), rng.uniform(-0.2 * width, width - 0.5 * box_width)
    _fill(canvas, y, y + box_height, x, x + box_width, rng.uniform(30, 230, 3))
  return canvas


def _figure(canvas, rng, *, feet_y, centre_x, height, shirt, trousers, emblem):
  """Draws one person (supersampled pixel units); emblem = (top colour, bottom colour)|None."""
  skin = np.asarray(SKINS[rng.integers(len(SKINS))], np.float32) * rng.uniform(0.9, 1.1)
  hair = HAIRS[rng.integers(len(HAIRS))]
  top = feet_y - height
  half = 0.12 * height * rng.uniform(0.92, 1.08)                  # torso half-width
  torso_top, torso_bottom = top + 0.15 * height, top + 0.54 * height
  spread = rng.uniform(0.0, 0.05) * height                        # legs apart
  swing = rng.uniform(-0.03, 0.03) * height                       # arms forward/back
  leg_width = 0.09 * height
  shirt = np.asarray(shirt, np.float32) * rng.uniform(0.92, 1.08)
  trousers = np.asarray(trousers, np.float32) * rng.uniform(0.92, 1.08)
  # Legs and shoes.
  for side in (-1, 1):
    inner = centre_x + side * spread / 2
    outer = inner + side * leg_width
    left, right = min(inner, outer), max(inner, outer)
    _fill(canvas, torso_bottom - 0.02 * height, feet_y - 0.035 * height, left, right, trousers)
    _fill(canvas, feet_y - 0.035 * height, feet_y, left - 0.01 * height, right + 0.01 * height,
          (30, 30, 30))
  # Arms, torso, head.
  arm_width = 0.05 * height
  for side in (-1, 1):
    left = centre_x + side * half + (0 if side > 0 else -arm_width)
    _fill(canvas, torso_top + 0.02 * height + swing, torso_top + 0.36 * height + swing, left,
          left + arm_width, shirt * 0.85)
    _fill(canvas, torso_top + 0.36 * height + swing, torso_top + 0.41 * height + swing, left,
          left + arm_width, skin)
  _fill(canvas, torso_top, torso_bottom, centre_x - half, centre_x + half, shirt)
  _ellipse(canvas, top + 0.075 * height, centre_x, 0.075 * height, 0.062 * height, skin)
  _ellipse(canvas, top + 0.075 * height, centre_x, 0.08 * height, 0.066 * height, hair,
           top_only=True)
  if emblem is not None:
    emblem_width, emblem_height = 0.2 * height, 0.18 * height
    emblem_top = torso_top + 0.07 * height
    left, right = centre_x - emblem_width / 2, centre_x + emblem_width / 2
    _fill(canvas, emblem_top, emblem_top + emblem_height / 2, left, right, emblem[0])
    _fill(canvas, emblem_top + emblem_height / 2, emblem_top + emblem_height, left, right,
          emblem[1])


def finish(canvas, rng, camera: Camera, height: int, width: int) -> np.ndarray:
  """Box-downsamples the supersampled canvas, then the camera's colour cast and noise."""
  factor = SUPERSAMPLE
  rows = canvas.reshape(height, factor, width * factor * 3).sum(axis=1)  # Two cheap 1-axis sums.
  small = rows.reshape(height, width, factor, 3).sum(axis=2) / float(factor * factor)
  out = small * (camera.gain * rng.uniform(0.9, 1.1)) + rng.normal(0.0, 4.0, (height, width, 3))
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def render(rng, camera: Camera, height: int, width: int, *, kind: str = 'person', shirt=None,
           trousers=None, emblem=None) -> np.ndarray:
  """uint8 [height, width, 3]. kind: person | distractor (background / fragment) | junk
  (partial)."""
  canvas_height, canvas_width = height * SUPERSAMPLE, width * SUPERSAMPLE
  canvas = background(rng, camera, canvas_height, canvas_width)
  clothes = dict(shirt=shirt, trousers=trousers)
  if kind == 'person':
    person_height = canvas_height * camera.scale * rng.uniform(0.94, 1.06)
    feet_y = canvas_height - rng.uniform(0.01, 0.06) * canvas_height
    centre_x = canvas_width * (camera.centre + rng.uniform(-0.12, 0.12))
    _figure(canvas, rng, feet_y=feet_y, centre_x=centre_x, height=person_height,
            emblem=emblem, **clothes)
  elif kind == 'junk':  # A zoomed, cut-off body: the person is 2-3x taller than the crop.
    person_height = canvas_height * rng.uniform(2.0, 3.0)
    _figure(canvas, rng, feet_y=canvas_height * rng.uniform(1.3, 2.0),
            centre_x=canvas_width * rng.uniform(0.3, 0.7), height=person_height,
            emblem=emblem, **clothes)
  elif kind == 'distractor':  # Background only, or a figure mostly out of the crop.
    if rng.random() < 0.5:
      _figure(canvas, rng, feet_y=canvas_height - 0.02 * canvas_height,
              centre_x=canvas_width * rng.choice([-0.35, 1.35]),
              height=canvas_height * camera.scale, emblem=None, **clothes)
  else:
    raise ValueError(kind)
  return finish(canvas, rng, camera, height, width)


# ----------------------------------------------------------------------------- the set
@dataclasses.dataclass
class _Item:
  folder: str   # bounding_box_train | query | bounding_box_test
  pid: int      # Market pid (-1 junk, 0 distractor)
  cam: int      # 0-based
  kind: str
  look: tuple   # (shirt id, trousers id, emblem code) or ()


def _spread(total: int, parts: int) -> list[int]:
  """`total` split into `parts` counts that differ by at most one."""
  return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _check_sizes(params: Params) -> int:
  """DataError naming the knob when the sizes cannot make a set; the number of distractors."""
  if params.num_train_ids < 1:
    raise DataError(f'synthetic_reid needs config.num_classes >= 1 train identities, got '
                    f'{params.num_train_ids}')
  if params.num_train < params.num_train_ids:
    raise DataError(f'config.synthetic_num_train={params.num_train} gives some of the '
                    f'{params.num_train_ids} train identities (config.num_classes) no image')
  num_test_ids = params.num_train_ids
  num_distractors = max(1, int(round(DISTRACTOR_FRACTION * params.num_test)))
  per_test_id = (params.num_test - num_distractors) // max(1, num_test_ids)
  if per_test_id < 3:
    raise DataError(f'config.synthetic_num_test={params.num_test} is too small for '
                    f'{num_test_ids} test identities (needs >= 3 images each plus '
                    f'{num_distractors} distractors: >= {3 * num_test_ids + num_distractors})')
  if params.image_size < 16:
    raise DataError(f'config.synthetic_image_size={params.image_size} is too small (>= 16 px)')
  return num_distractors


def plan(params: Params) -> tuple[list[_Item], dict]:
  """What to write: one _Item per file, in a fixed order; plus the identity table."""
  num_distractors = _check_sizes(params)
  rng = np.random.default_rng([params.seed, 3])
  num_test_ids = params.num_train_ids
  num_ids = params.num_train_ids + num_test_ids
  pids = rng.permutation(np.arange(1, num_ids + 1))        # Train and test ids interleave.
  palette = emblem_palette(num_ids)
  codes = rng.permutation(len(palette) ** 2)[:num_ids]
  looks = {int(pid): (int(rng.integers(len(SHIRTS))), int(rng.integers(len(TROUSERS))),
                      int(code)) for pid, code in zip(pids, codes)}
  train_ids = sorted(pids[:params.num_train_ids])
  test_ids = sorted(pids[params.num_train_ids:])
  items = []
  for pid, count in zip(train_ids, _spread(params.num_train, len(train_ids))):
    cameras = rng.permutation(NUM_CAMERAS)[:int(np.clip(count // 3, 1, 4))]
    items += [_Item('bounding_box_train', int(pid), int(cameras[i % len(cameras)]), 'person',
                    looks[int(pid)]) for i in range(count)]
  rest = params.num_test - num_distractors
  for pid, count in zip(test_ids, _spread(rest, len(test_ids))):
    cameras = rng.permutation(NUM_CAMERAS)[:int(np.clip(count // 3, 2, 4))]
    num_queries = min(QUERIES_PER_ID, len(cameras) - 1)  # The last camera: gallery only.
    for i in range(count):  # Images 0..num_queries-1 are the first of distinct cameras.
      folder = 'query' if i < num_queries else 'bounding_box_test'
      items.append(_Item(folder, int(pid), int(cameras[i % len(cameras)]), 'person',
                         looks[int(pid)]))
  for _ in range(num_distractors):
    items.append(_Item('bounding_box_test', 0, int(rng.integers(NUM_CAMERAS)), 'distractor',
                       (int(rng.integers(len(SHIRTS))), int(rng.integers(len(TROUSERS))), -1)))
  for _ in range(max(1, int(round(JUNK_FRACTION * params.num_test)))):
    pid = int(rng.choice(test_ids))
    items.append(_Item('bounding_box_test', -1, int(rng.integers(NUM_CAMERAS)), 'junk',
                       looks[pid]))
  table = {'train_pids': [int(x) for x in train_ids], 'test_pids': [int(x) for x in test_ids],
           'palette_size': len(palette),
           'looks': {str(pid): look for pid, look in looks.items()}}
  return items, table


def _write(params: Params, folder: str) -> dict:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  items, table = plan(params)
  views = cameras(params.seed)
  palette = emblem_palette(len(table['train_pids']) + len(table['test_pids']))
  palette_size = len(palette)
  counts = {}
  for subfolder in ('bounding_box_train', 'query', 'bounding_box_test'):
    os.makedirs(os.path.join(folder, subfolder))
  for number, item in enumerate(items):
    rng = np.random.default_rng([params.seed, 5, number])
    shirt, trousers, code = item.look
    emblem = None if code < 0 else (palette[code // palette_size], palette[code % palette_size])
    image = render(rng, views[item.cam], params.image_size, params.width, kind=item.kind,
                   shirt=SHIRTS[shirt], trousers=TROUSERS[trousers], emblem=emblem)
    pid = '-1' if item.pid < 0 else f'{item.pid:04d}'
    name = f'{pid}_c{item.cam + 1}s1_{number:06d}_00.jpg'
    Image.fromarray(image).save(os.path.join(folder, item.folder, name), 'JPEG', quality=95,
                                subsampling=0)  # 4:4:4: keep the small emblem's colours.
    key = f'{item.folder}/{item.kind}'
    counts[key] = counts.get(key, 0) + 1
  meta = {'generator_version': GENERATOR_VERSION, 'params': dataclasses.asdict(params),
          'counts': counts, **table}
  with open(os.path.join(folder, MARKER), 'w') as f:
    json.dump(meta, f, indent=1)
  return meta


def default_base_dir() -> str:
  return os.path.join(tempfile.gettempdir(), 'dca_jax_synthetic_reid')


def ensure(params: Params, base_dir: str = '') -> str:
  """The folder holding the set for `params` (Market-1501 layout), generating it if needed."""
  plan(params)  # Bad sizes fail before anything is written.
  return write_once(base_dir or default_base_dir(), f'synthetic_reid-{params.key()}', MARKER,
                    lambda folder: _write(params, folder))


def write_once(base_dir: str, name: str, marker: str, write_into) -> str:
  """`base_dir/name`, made by `write_into(folder)` in a temporary folder renamed into place
  (atomic: a concurrent or killed writer never leaves half a set under `name`), unless
  `marker` says it is there already. Also tools/real_reid.py's cache."""
  final = os.path.join(base_dir, name)
  if os.path.isfile(os.path.join(final, marker)):
    return final
  os.makedirs(base_dir, exist_ok=True)
  temporary = tempfile.mkdtemp(prefix=f'.tmp-{name}-', dir=base_dir)
  try:
    write_into(temporary)
    try:
      os.rename(temporary, final)  # Atomic: readers see nothing or the whole set.
    except OSError:
      if not os.path.isfile(os.path.join(final, marker)):
        raise  # Not a lost race with another process: a real error.
  finally:
    if os.path.isdir(temporary):
      shutil.rmtree(temporary, ignore_errors=True)
  return final


DEFAULT_TRAIN_IDS = 32  # generated when config.num_classes is 0 ("from the data")


def params_from_config(config) -> Params:
  """The set's Params from the config knobs (num_classes train identities, synthetic_*)."""
  return Params(num_train_ids=int(config.num_classes) or DEFAULT_TRAIN_IDS,
                num_train=int(config.synthetic_num_train),
                num_test=int(config.synthetic_num_test),
                image_size=int(config.synthetic_image_size),
                seed=int(config.synthetic_seed))


# ----------------------------------------------------------------------------- baseline
def retrieval_map(distances: np.ndarray, query_pids, query_camids, gallery_pids,
                  gallery_camids) -> tuple[float, float]:
  """(mAP, rank-1) of a [num_query, num_gallery] distance matrix under the Market protocol
  (`dca_jax.reid.metrics`: same-id same-camera gallery images ignored, queries with no match
  skipped)."""
  from dca_jax.reid import metrics  # pylint: disable=g-import-not-at-top
  stats = metrics.summarize(metrics.rank_stats(distances, query_pids, gallery_pids, query_camids,
                                               gallery_camids), distances.shape[1])
  return stats['mAP'], stats['rank1']


def raw_pixel_map(dataset, height: int | None = None, width: int | None = None):
  """Nearest-neighbour retrieval on raw pixels (Euclidean on the per-image standardised
  pixels) of a ReidDataset's query vs gallery: (mAP, rank-1)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def load(paths):
    out = []
    for path in paths:
      with Image.open(path) as image:
        image = image.convert('RGB')
        if height:
          image = image.resize((width, height), Image.BILINEAR)
        pixels = np.asarray(image, np.float32).reshape(-1)
      out.append((pixels - pixels.mean()) / (pixels.std() + 1e-6))
    return np.stack(out)

  query, gallery = load(dataset.query.paths), load(dataset.gallery.paths)
  distances = ((query ** 2).sum(1)[:, None] + (gallery ** 2).sum(1)[None, :] -
               2 * query @ gallery.T)
  return retrieval_map(distances, dataset.query.pids, dataset.query.camids,
                       dataset.gallery.pids, dataset.gallery.camids)


def main(argv=None) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  from dca_jax.data import reid_sources  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_classes', type=int, default=32)
  parser.add_argument('--num_train', type=int, default=1600)
  parser.add_argument('--num_test', type=int, default=800)
  parser.add_argument('--image_size', type=int, default=64)
  parser.add_argument('--seed', type=int, default=42)
  parser.add_argument('--base_dir', default='')
  args = parser.parse_args(argv)
  params = Params(args.num_classes, args.num_train, args.num_test, args.image_size, args.seed)
  base_dir = args.base_dir or tempfile.mkdtemp(prefix='synthetic_reid_check-')
  start = time.time()
  folder = ensure(params, base_dir)
  generate_seconds = time.time() - start
  dataset = reid_sources.read_market1501(folder, verify_images=False)
  mean_ap, rank1 = raw_pixel_map(dataset)
  print(json.dumps({'folder': folder, 'generate_s': round(generate_seconds, 2),
                    'train_images': len(dataset.train), 'train_ids': dataset.num_train_ids,
                    'query': len(dataset.query), 'gallery': len(dataset.gallery),
                    'distractors': int((dataset.gallery.pids == 0).sum()),
                    'junk': dataset.num_junk, 'raw_pixel_mAP': round(mean_ap, 4),
                    'raw_pixel_rank1': round(rank1, 4)}))


if __name__ == '__main__':
  main()
