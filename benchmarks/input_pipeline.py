"""Throughput of the train input pipeline on this host (docs/DATA.md): CUB-layout photo-like
JPEGs (500 x 375, quality 90) written to a temp dir, the paper's train pipeline (resize 550,
random crop 448, flip, batch 16) timed after a warm-up; one JSON line.

    python -m benchmarks.input_pipeline [--num_images 600] [--batches 40] [--warmup 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import numpy as np
from PIL import Image


from dca_jax.data import folders
from dca_jax import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from dca_jax import data  # pylint: disable=g-import-not-at-top,wrong-import-position


def photo_like(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
  grid = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
  img = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), np.float32)
  detail = np.asarray(Image.fromarray(rng.integers(0, 256, (h // 4, w // 4, 3), np.uint8))
                      .resize((w, h), Image.BILINEAR), np.float32)
  img = 0.7 * img + 0.3 * detail + rng.normal(0, 6, size=(h, w, 3))
  return np.clip(img, 0, 255).astype(np.uint8)


def write_cub_like(base: str, num_images: int, size: tuple[int, int], num_classes: int = 20):
  rng = np.random.default_rng(0)
  root = os.path.join(base, 'CUB_200_2011')
  lines, labels, split = [], [], []
  for i in range(1, num_images + 1):
    c = i % num_classes
    rel = f'{c + 1:03d}.Class_{c}/img_{i:05d}.jpg'
    os.makedirs(os.path.join(root, 'images', os.path.dirname(rel)), exist_ok=True)
    Image.fromarray(photo_like(rng, *size)).save(os.path.join(root, 'images', rel),
                                                 quality=90)
    lines.append(f'{i} {rel}\n')
    labels.append(f'{i} {c + 1}\n')
    split.append(f'{i} {int(i % 5 != 0)}\n')
  for name, rows in (('images.txt', lines), ('image_class_labels.txt', labels),
                     ('train_test_split.txt', split)):
    with open(os.path.join(root, name), 'w') as f:
      f.writelines(rows)
  with open(os.path.join(root, 'classes.txt'), 'w') as f:
    f.writelines(f'{c + 1} {c + 1:03d}.Class_{c}\n' for c in range(num_classes))
  return root


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--num_images', type=int, default=600)
  ap.add_argument('--width', type=int, default=500)
  ap.add_argument('--height', type=int, default=375)
  ap.add_argument('--batch_size', type=int, default=16)
  ap.add_argument('--input_size', type=int, default=448)
  ap.add_argument('--resize_size', type=int, default=550)
  ap.add_argument('--warmup', type=int, default=8)
  ap.add_argument('--batches', type=int, default=40)
  args = ap.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    root = write_cub_like(tmp, args.num_images, (args.width, args.height))
    write_s = time.perf_counter() - t0
    files = [os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(root, 'images'))
             for f in fs]
    mean_kb = float(np.mean([os.path.getsize(f) for f in files]) / 1024)

    t0 = time.perf_counter()
    folders.scan_images(files)
    scan_s = time.perf_counter() - t0

    c = config_lib.base_config()
    c.dataset, c.data_source, c.data_dir = 'cub', 'folder', tmp
    c.num_classes = 20
    c.batch_size, c.input_size, c.resize_size = args.batch_size, args.input_size, args.resize_size
    t0 = time.perf_counter()
    inp = data.build_input(c)
    build_s = time.perf_counter() - t0
    it = inp.train_iter()
    t0 = time.perf_counter()
    for _ in range(args.warmup):
      batch = next(it)
    warm_s = time.perf_counter() - t0
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for _ in range(args.batches):
      batch = next(it)
    dt = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    del it  # Stop the prefetch threads before the temp dir goes away.
    assert batch['image'].shape == (args.batch_size, args.input_size, args.input_size, 3)
    ips = args.batches * args.batch_size / dt
    ipcs = args.batches * args.batch_size / cpu_s  # Images per core-second (all threads).
    print(json.dumps({
        'benchmark': 'train_input_pipeline', 'images_per_s': round(ips, 1),
        'images_per_cpu_s': round(ipcs, 1),
        'cores_for_300_img_s': round(300.0 / ipcs, 1),
        'host_cores': os.cpu_count(), 'load_avg_1m': round(os.getloadavg()[0], 2),
        'batch_size': args.batch_size,
        'input_size': args.input_size, 'resize_size': args.resize_size,
        'image_size': [args.width, args.height], 'mean_jpeg_kb': round(mean_kb, 1),
        'num_images': args.num_images, 'timed_batches': args.batches,
        'warmup_batches': args.warmup, 'warmup_s': round(warm_s, 2),
        'prescan_ms_per_image': round(1000 * scan_s / len(files), 3),
        'build_s': round(build_s, 2), 'write_s': round(write_s, 1)}))


if __name__ == '__main__':
  main()
