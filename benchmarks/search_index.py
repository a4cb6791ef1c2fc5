"""`--mode search` at scale (docs/REID.md, "Scale"): the gallery index search uses
(dca_jax/reid/index.py) built, saved and searched on random clustered L2-normalised features,
against exact search; one JSON line (index and its tuned knob, build seconds, size on disk, ms
per query, recall@10 against faiss brute force, exact ms per query, peak RSS, the machine).

  python -m benchmarks.search_index [--index flat|ivf|hnsw] [--num_gallery 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import faiss
import numpy as np

from benchmarks.machine import cpu_model, loadavg
from dca_jax.reid import index as gallery_index

_CHUNK = 1 << 14  # rows generated at once: no float64 copy of the whole set


def clustered(rng, ids: np.ndarray, centres: np.ndarray, noise: float) -> np.ndarray:
  """float32 [len(ids), D]: each row its identity's centre + noise, L2-normalised."""
  dim = centres.shape[1]
  features = np.empty((len(ids), dim), np.float32)
  for start in range(0, len(ids), _CHUNK):
    rows = slice(start, min(start + _CHUNK, len(ids)))
    block = rng.standard_normal((rows.stop - rows.start, dim), np.float32)
    block *= np.float32(noise / np.sqrt(dim))
    block += centres[ids[rows]]
    block /= np.linalg.norm(block, axis=1, keepdims=True)
    features[rows] = block
  return features


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_gallery', type=int, default=1_000_000)
  parser.add_argument('--num_query', type=int, default=1000)
  parser.add_argument('--dim', type=int, default=768)
  parser.add_argument('--per_identity', type=int, default=20)
  parser.add_argument('--noise', type=float, default=1.0)
  parser.add_argument('--index', choices=gallery_index.KINDS, default='auto')
  parser.add_argument('--top', type=int, default=10)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workdir', default='',
                      help='where the index is saved (default: a temporary folder, removed)')
  return parser


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
  return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


def main(argv=None) -> dict:
  args = _parser().parse_args(argv)
  rng = np.random.default_rng(args.seed)
  start = time.perf_counter()
  identities = max(1, args.num_gallery // args.per_identity)
  centres = rng.standard_normal((identities, args.dim), np.float32)
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  gallery = clustered(rng, rng.permutation(np.arange(args.num_gallery) % identities), centres,
                      args.noise)
  queries = clustered(rng, rng.integers(0, identities, args.num_query), centres, args.noise)
  generated = time.perf_counter() - start
  kind = gallery_index.resolve(args.index, args.num_gallery)
  start = time.perf_counter()
  built = gallery_index.build(gallery, kind)
  build_seconds = time.perf_counter() - start
  folder = args.workdir or tempfile.mkdtemp(prefix='search_index_')
  try:
    built.save(os.path.join(folder, 'gallery'))
    size = sum(os.path.getsize(os.path.join(folder, f'gallery.{x}')) for x in ('faiss', 'npz'))
  finally:
    if not args.workdir:
      shutil.rmtree(folder, ignore_errors=True)
  start = time.perf_counter()
  _, found = built.search(queries, args.top)
  search_ms = 1000 * (time.perf_counter() - start) / args.num_query
  start = time.perf_counter()
  _, exact = faiss.knn(queries, gallery, args.top)
  exact_ms = 1000 * (time.perf_counter() - start) / args.num_query
  peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  record = {
      'index': built.describe(), 'kind': kind, 'knob': built.knob,
      'shape': [args.num_gallery, args.dim], 'num_query': args.num_query, 'top': args.top,
      'per_identity': args.per_identity, 'noise': args.noise,
      f'recall_at_{args.top}': round(_recall(found, exact), 4),
      'ms_per_query': round(search_ms, 3), 'exact_ms_per_query': round(exact_ms, 3),
      'build_seconds': round(build_seconds, 2), 'index_bytes': size,
      'index_gib': round(size / 2**30, 3), 'peak_rss_gib': round(peak_kib / 2**20, 3),
      'generate_seconds': round(generated, 2), 'threads': faiss.omp_get_max_threads(),
      'faiss': faiss.__version__, 'numpy': np.__version__, 'cpu': cpu_model(),
      'loadavg': loadavg()}
  print(json.dumps(record), flush=True)
  return record


if __name__ == '__main__':
  main(sys.argv[1:])
