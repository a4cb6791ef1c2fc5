"""The gallery index of `--mode search` (faiss), and the feature files search reads.

  flat  exact: every gallery vector (faiss IndexFlatL2; search ranks its vectors with
        `metrics.distance_matrix`, the distances of eval and of search without an index)
  ivf   IndexIVFFlat: nlist ~ 4 sqrt(N) k-means lists, `nprobe` of them scanned per query
  hnsw  IndexHNSWFlat: a graph of M = 32 links per vector, `efSearch` candidates per query
  auto  flat up to FLAT_MAX vectors (and whenever re-ranking needs every distance), ivf above

The approximate kinds tune their knob when built: the smallest power of two whose recall@10
on a sample of gallery vectors (as queries, themselves left out) reaches RECALL_TARGET,
doubled for margin (the sample is gallery vectors, not new queries). Distances are squared
Euclidean, as eval's. An index is saved as PATH.faiss (faiss's file) and PATH.npz (a 64-bit
stamp per indexed row, in index order, and the kind, width, knob and training size): `sync`
reuses it while the gallery's stamps are the same, adds the new rows when the gallery only
grew, and rebuilds it otherwise (or when an IVF's lists were trained on under half its rows).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile

import faiss
import numpy as np

from dca_jax import errors
from dca_jax.reid import evaluate

KINDS = ('auto', 'flat', 'ivf', 'hnsw')
# auto: exact up to here. Batched, exact search is one matrix product: 6.7 ms a query at
# 1M x 768 on 2 Intel Xeon cores, recall 1 (benchmarks/search_index.py), where IVF tuned for
# recall@10 0.995 on clustered features needed every list (139 ms a query).
FLAT_MAX = 1_000_000
RECALL_TARGET = 0.995      # the tuning's recall@10 on the sample (the goal is 0.99 on queries)
TUNE_SAMPLE = 1000         # gallery vectors the knob is tuned on (recall to ~0.001)
TUNE_K = 10
IVF_TRAIN_PER_LIST = 64    # k-means on at most 64 vectors a list (256,000 of 1M), 10 rounds
IVF_NITER = 10
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
_KNOB = {'ivf': 'nprobe', 'hnsw': 'efSearch'}
_KNOB_START = {'ivf': 1, 'hnsw': 16}


# ============================================================================ feature files
def load_features(path: str, flag: str) -> dict:
  """{'features' float32 [N, D], 'paths' [N] str or None, 'ids' [N] list or None} of an .npz
  (np.savez: `features`, optionally `paths` and `ids`; `--mode embed` writes one), checked:
  a file that cannot be used is one line (errors.DataError)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{flag} {path}: no such file')
  found = evaluate.read_npz(path, f'{flag} {path}', ('features',), ('paths', 'ids'),
                            'features [N, D] and optionally paths [N], ids [N] (--mode embed '
                            'writes one)')
  if found['paths'] is not None:
    found['paths'] = [str(v) for v in found['paths'].tolist()]
  if found['ids'] is not None:
    found['ids'] = found['ids'].tolist()
  return found


def _hash64(data: bytes) -> int:
  return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), 'little')


def stamps(names) -> np.ndarray:
  """uint64 [n]: a 64-bit hash of each string (a gallery row's identity for `sync`)."""
  return np.array([_hash64(str(n).encode()) for n in names], np.uint64).reshape(-1)


def row_keys(features: np.ndarray) -> np.ndarray:
  """uint64 [n]: a 64-bit hash of each row's bytes (bit-identical vectors share it)."""
  features = np.ascontiguousarray(features, np.float32)
  return np.array([_hash64(row.tobytes()) for row in features], np.uint64).reshape(-1)


def file_stamps(features: np.ndarray, paths) -> np.ndarray:
  """uint64 [n]: each row of a feature file by its index, path and bytes (a file that only grew
  keeps the stamps of its first rows)."""
  features = np.ascontiguousarray(features, np.float32)
  paths = paths or [''] * len(features)
  return np.array([_hash64(f'{i}\0{p}\0'.encode() + row.tobytes())
                   for i, (p, row) in enumerate(zip(paths, features))], np.uint64).reshape(-1)


# ============================================================================ the index
def resolve(kind: str, n: int, exact: bool = False) -> str:
  """The kind `kind` stands for with `n` gallery vectors (`exact`: re-ranking needs them all)."""
  if kind not in KINDS:
    raise ValueError(f'--index {kind}: choose one of {", ".join(KINDS)}')
  if kind == 'auto':
    return 'flat' if exact or n <= FLAT_MAX else 'ivf'
  if exact and kind != 'flat':
    raise ValueError(f'--index {kind} finds near neighbours, but k-reciprocal re-ranking '
                     '(reid_rerank) needs every distance: use --index flat (or auto), or '
                     '--config.reid_rerank=False')
  return kind


def nlist(n: int) -> int:
  """IVF lists for n vectors: ~4 sqrt(n), and at least 39 training vectors a list (faiss)."""
  return max(1, min(int(round(4 * np.sqrt(n))), n // 39))


class GalleryIndex:
  """A faiss index of `kind` over gallery rows named by `stamps` (index order), with its tuned
  knob (nprobe / efSearch; 0 for flat) and the rows its IVF lists were trained on."""

  def __init__(self, index, kind: str, row_stamps: np.ndarray, knob: int = 0,
               trained: int = 0, recall: float = 1.0):
    self.index, self.kind, self.stamps = index, kind, np.asarray(row_stamps, np.uint64)
    self.knob, self.trained, self.recall = int(knob), int(trained), float(recall)
    self._apply_knob()

  @property
  def width(self) -> int:
    return int(self.index.d)

  def __len__(self) -> int:
    return int(self.index.ntotal)

  def describe(self) -> str:
    if self.kind == 'flat':
      return 'flat (exact)'
    detail = f'nlist {faiss.extract_index_ivf(self.index).nlist}, ' if self.kind == 'ivf' else (
        f'M {HNSW_M}, ')
    return (f'{self.kind} ({detail}{_KNOB[self.kind]} {self.knob}; tuned recall@{TUNE_K} '
            f'{self.recall:.3f})')

  def _apply_knob(self) -> None:
    if self.kind in _KNOB:
      faiss.ParameterSpace().set_index_parameter(self.index, _KNOB[self.kind], self.knob)

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(squared distances float32 [q, k], index rows int64 [q, k]; -1 where fewer were found)."""
    return self.index.search(np.ascontiguousarray(queries, np.float32), k)

  def vectors(self) -> np.ndarray:
    """float32 [n, D], index order: the vectors as added (bit-exact for flat)."""
    return self.index.reconstruct_n(0, len(self))

  def add(self, features: np.ndarray, row_stamps: np.ndarray) -> None:
    self.index.add(np.ascontiguousarray(features, np.float32))
    self.stamps = np.concatenate([self.stamps, np.asarray(row_stamps, np.uint64)])

  def tune(self, features: np.ndarray, seed: int = 0) -> None:
    """The knob: see the module's doc (features: the indexed vectors, index order)."""
    n = len(features)
    k = min(TUNE_K, n - 1)
    if self.kind not in _KNOB:
      return
    if k < 1:  # one vector: nothing to find but itself
      self.knob = 1
      self._apply_knob()
      return
    sample = np.sort(np.random.default_rng(seed).choice(n, min(TUNE_SAMPLE, n), replace=False))
    queries = np.ascontiguousarray(features[sample], np.float32)
    _, exact = faiss.knn(queries, np.ascontiguousarray(features, np.float32), k + 1)
    limit = faiss.extract_index_ivf(self.index).nlist if self.kind == 'ivf' else 4096
    value = min(_KNOB_START[self.kind], limit)
    while True:
      self.knob = value
      self._apply_knob()
      self.recall = _recall(exact, self.search(queries, k + 1)[1], sample, k)
      if self.recall >= RECALL_TARGET or value >= limit:
        break
      value = min(2 * value, limit)
    if value < limit:  # the margin, and the recall it has on the sample
      self.knob = min(2 * value, limit)
      self._apply_knob()
      self.recall = _recall(exact, self.search(queries, k + 1)[1], sample, k)

  def save(self, path: str) -> None:
    """PATH.faiss and PATH.npz, each replaced whole (`load` checks that they agree)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    faiss.write_index(self.index, f'{path}.faiss.tmp')
    meta = json.dumps({'kind': self.kind, 'width': self.width, 'knob': self.knob,
                       'trained': self.trained, 'recall': self.recall, 'rows': len(self),
                       'faiss': faiss.__version__})
    np.savez(f'{path}.tmp.npz', stamps=self.stamps, meta=np.asarray(meta))
    os.replace(f'{path}.faiss.tmp', f'{path}.faiss')
    os.replace(f'{path}.tmp.npz', f'{path}.npz')

  @classmethod
  def load(cls, path: str):
    """The index saved at PATH, or None when there is none or its two files do not agree (a
    save cut short): it is then rebuilt."""
    try:
      index = faiss.read_index(f'{path}.faiss')
      with np.load(f'{path}.npz', allow_pickle=False) as stored:
        row_stamps, meta = stored['stamps'], json.loads(str(stored['meta']))
    except (RuntimeError, OSError, ValueError, KeyError, zipfile.BadZipFile):
      return None
    if meta.get('rows') != index.ntotal or len(row_stamps) != index.ntotal:
      return None
    return cls(index, meta['kind'], row_stamps, meta['knob'], meta['trained'], meta['recall'])


def _recall(exact: np.ndarray, found: np.ndarray, sample: np.ndarray, k: int) -> float:
  """Mean recall@k of `found` against `exact` (both k+1 wide), each sample's own row left out."""
  hits = 0
  for own, truth, got in zip(sample, exact, found):
    truth = [r for r in truth if r != own][:k]
    got = [r for r in got if r != own and r >= 0][:k]
    hits += len(set(truth) & set(got))
  return hits / (k * len(sample))


def build(features: np.ndarray, kind: str, row_stamps=None, seed: int = 0) -> GalleryIndex:
  """A new index of `kind` (flat / ivf / hnsw) over `features` [n, D], knob tuned."""
  features = np.ascontiguousarray(features, np.float32)
  n, width = features.shape
  if kind == 'ivf':
    index = faiss.index_factory(width, f'IVF{nlist(n)},Flat')
    clustering = faiss.extract_index_ivf(index).cp
    clustering.niter, clustering.seed = IVF_NITER, 1234 + seed
    clustering.min_points_per_centroid = 1   # faiss's warning: nlist() keeps 39 a list
    clustering.max_points_per_centroid = IVF_TRAIN_PER_LIST
    index.train(features)
  elif kind == 'hnsw':
    index = faiss.IndexHNSWFlat(width, HNSW_M)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
  elif kind == 'flat':
    index = faiss.IndexFlatL2(width)
  else:
    raise ValueError(f'unknown index kind {kind!r}: choose one of flat, ivf, hnsw')
  index.add(features)
  row_stamps = np.arange(n, dtype=np.uint64) if row_stamps is None else row_stamps
  built = GalleryIndex(index, kind, row_stamps, trained=n)
  built.tune(features, seed)
  return built


def sync(path: str, kind: str, row_stamps: np.ndarray, features: np.ndarray,
         say=print) -> tuple[GalleryIndex, np.ndarray]:
  """(the index saved at `path` made current for a gallery of rows `row_stamps` (unique) with
  `features`, the gallery row of each index row): reused, grown or rebuilt (the module's doc);
  saved when it changed. An index that holds this gallery's rows at another width is not its
  own (a foreign file): one line, nothing changed."""
  row_stamps = np.asarray(row_stamps, np.uint64)
  stored = GalleryIndex.load(path)
  held = _positions(row_stamps, stored.stamps) if stored is not None else None
  if stored is not None and (held >= 0).any() and stored.width != features.shape[1]:
    raise errors.DataError(f'{path}.faiss holds {stored.width}-d vectors but the gallery\'s '
                           f'features are {features.shape[1]}-d: it is not this gallery\'s '
                           'index (delete it to build a new one)')
  where = f'{path}.faiss'
  if stored is not None and stored.kind == kind and (held >= 0).all():
    new = np.setdiff1d(np.arange(len(row_stamps)), held)
    if not len(new):
      say(f'index: {stored.describe()} of {len(stored)} vector(s), reused ({where})')
      return stored, held
    if kind != 'ivf' or len(row_stamps) <= 2 * stored.trained:
      stored.add(features[new], row_stamps[new])
      stored.save(path)
      say(f'index: {stored.describe()}, {len(new)} new vector(s) added to the {len(held)} '
          f'it held -> {where}')
      return stored, np.concatenate([held, new])
  built = build(features, kind, row_stamps)
  built.save(path)
  why = ('' if stored is None else ' (rebuilt: it was ' + stored.kind + ')' if stored.kind != kind
         else ' (rebuilt: gallery rows gone or changed)' if not (held >= 0).all()
         else ' (rebuilt: the gallery more than doubled since its lists were trained)')
  say(f'index: {built.describe()} of {len(built)} vector(s) built{why} -> {where}')
  return built, np.arange(len(row_stamps))


def _positions(row_stamps: np.ndarray, wanted: np.ndarray) -> np.ndarray:
  """The position in `row_stamps` of each of `wanted`, -1 where it is not there."""
  if not len(row_stamps):
    return np.full(len(wanted), -1, np.int64)
  order = np.argsort(row_stamps, kind='stable')
  ordered = row_stamps[order]
  at = np.clip(np.searchsorted(ordered, wanted), 0, len(ordered) - 1)
  return np.where(ordered[at] == wanted, order[at], -1).astype(np.int64)
