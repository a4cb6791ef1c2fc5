"""Re-ID evaluation at a dataset's shape on random clustered features (docs/REID.md, "Scale"):
time and peak memory of `dca_jax.reid.evaluate` (re-ranked by default); one JSON line.

  python -m benchmarks.reid_scale                                  # MSMT17: 11,659 x 82,161, 768-d
  python -m benchmarks.reid_scale --num_query 3368 --num_gallery 15913 --no_rerank   # Market
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np

from benchmarks.machine import cpu_model, loadavg
from dca_jax.reid import evaluate

_CHUNK = 1 << 14  # rows generated at once: no float64 copy of the whole set


def clustered_split(rng, num_items: int, centres: np.ndarray, noise: float,
                    num_cameras: int) -> dict:
  """{'features' float32 [n, D], 'ids', 'cameras'}: each image its identity's centre + noise."""
  ids = rng.integers(0, len(centres), num_items)
  features = np.empty((num_items, centres.shape[1]), np.float32)
  for start in range(0, num_items, _CHUNK):
    stop = min(start + _CHUNK, num_items)
    features[start:stop] = rng.standard_normal((stop - start, centres.shape[1]), np.float32)
    features[start:stop] *= np.float32(noise)
    features[start:stop] += centres[ids[start:stop]]
  return {'features': features, 'ids': ids, 'cameras': rng.integers(0, num_cameras, num_items)}


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_query', type=int, default=11659)
  parser.add_argument('--num_gallery', type=int, default=82161)
  parser.add_argument('--dim', type=int, default=768)
  parser.add_argument('--identities', type=int, default=3060)
  parser.add_argument('--cameras', type=int, default=15)
  parser.add_argument('--noise', type=float, default=3.0)
  parser.add_argument('--no_rerank', action='store_true')
  parser.add_argument('--k1', type=int, default=20)
  parser.add_argument('--k2', type=int, default=6)
  parser.add_argument('--lambda', dest='lambda_value', type=float, default=0.3)
  parser.add_argument('--seed', type=int, default=0)
  return parser


def main(argv=None) -> dict:
  args = _parser().parse_args(argv)
  start = time.perf_counter()
  rng = np.random.default_rng(args.seed)
  centres = rng.standard_normal((args.identities, args.dim), np.float32)
  query = clustered_split(rng, args.num_query, centres, args.noise, args.cameras)
  gallery = clustered_split(rng, args.num_gallery, centres, args.noise, args.cameras)
  generated = time.perf_counter() - start
  record = evaluate.evaluate(query, gallery, rerank=not args.no_rerank, k1=args.k1, k2=args.k2,
                             lambda_value=args.lambda_value)
  peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  record.update(shape=[args.num_query, args.num_gallery, args.dim], identities=args.identities,
                cameras=args.cameras, noise=args.noise, generate_seconds=round(generated, 2),
                peak_rss_gib=round(peak_kib / 2**20, 3),
                features_gib=round(4 * (args.num_query + args.num_gallery) * args.dim / 2**30, 3),
                numpy=np.__version__, cpu=cpu_model(), loadavg=loadavg())
  print(json.dumps(record), flush=True)
  return record


if __name__ == '__main__':
  main(sys.argv[1:])
