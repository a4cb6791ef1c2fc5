"""The `embed` and `search` modes: Re-ID features of any images, and ranked galleries for them.

  python main.py --workdir W --mode embed --images DIR_OR_FILES     # -> W/embeddings.npz
  python main.py --workdir W --mode search --images QUERIES --gallery DIR
                                                   # -> W/search.jsonl, W/search/<query>.png
  ... --exported W/export/model.onnx               # the exported file instead of the checkpoint

The features are the retrieval feature exactly as `--mode eval` computes it (the neck side,
the mirror image averaged in with `reid_flip_test`, L2-normalised with `reid_normalize`): the
checkpoint's through `inference.forward_fn`, an exported file's through `serving`. Images are
read as the eval stream reads them (predict.py's path: files, folders, globs; an unreadable file
is one line and is skipped). Search ranks the gallery by the distance eval uses (squared
Euclidean; k-reciprocal re-ranked with `reid_rerank`) and leaves out of each query's ranking
only the gallery files identical to the query (same bytes), the protocol without cameras
(docs/REID_DATA.md). A gallery given as a folder of identity folders (DIR/<identity>/...) has
identities: each ranked image then says its own, and a query read from such a folder too is
framed green / red against them. Gallery features are cached in W/search_cache/ under a key
of the model and every gallery file's name, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
from PIL import Image

from dca_jax import checks
from dca_jax import drawing
from dca_jax import predict
from dca_jax import serving
from dca_jax import tasks
from dca_jax.data import reid_sources
from dca_jax.reid import metrics

CHUNK = 64  # images read and embedded at once (bounds the host memory of a large gallery)


# ============================================================================ the model
class Embedder:
  """`Embedder(images) -> {'feature' [n, D], 'rollout'?, 'glca_index'?}` of a checkpoint or an
  exported file, with the eval transform its images need and a key naming it for the cache."""

  def __init__(self, config, workdir: str, which: str = 'latest', exported: str = ''):
    self.rerank = False
    if exported:
      meta = serving.read_preprocessing(exported)
      if 'feature' not in meta.get('outputs', {}):
        raise ValueError(f'{exported} returns {sorted(meta.get("outputs", {}))}, not a Re-ID '
                         "'feature': embed and search need a Re-ID model's export")
      self._model = serving.ExportedModel(exported)
      self.transform = predict.exported_transform(meta)
      stat = os.stat(exported)
      self.key = f'exported {os.path.abspath(exported)} {stat.st_size} {stat.st_mtime_ns}'
      self.describe = f'{self._model.runtime} on {exported}'
      return
    config = checks.checked(config)
    if 'feature' not in tasks.get(config.task).export_outputs(config):
      raise ValueError(f'--mode embed and search rank Re-ID features; this is a task={config.task} '
                       'run (its images are classified: --mode predict)')
    self._model = predict.Predictor(config, workdir, which,
                                    outputs=('feature', 'rollout', 'glca_index'))
    self.transform = predict.eval_transform(config)
    self.rerank = bool(config.reid_rerank)
    self.key = (f'checkpoint {os.path.abspath(workdir)} {which} {self._model.step} '
                f'{config.to_json_best_effort(sort_keys=True)}')
    self.describe = f'{which} checkpoint, step {self._model.step}'

  def __call__(self, images: np.ndarray) -> dict:
    return {k: np.asarray(v) for k, v in self._model(images).items()}


def _embed_files(embedder: Embedder, paths) -> tuple[dict, list, list]:
  """({output: [n, ...]}, readable paths, [(path, reason)]), read and embedded CHUNK at once;
  only the first chunk's pictures' outputs (rollout) are kept beside the features."""
  outputs, kept, failed = {}, [], []
  for start in range(0, len(paths), CHUNK):
    loaded, bad = predict.load_images(paths[start:start + CHUNK], embedder.transform)
    failed += bad
    if not loaded:
      continue
    out = embedder(np.stack([image for _, image in loaded]))
    for name, value in out.items():
      outputs.setdefault(name, []).append(value)
    kept += [path for path, _ in loaded]
  return {k: np.concatenate(v) for k, v in outputs.items()}, kept, failed


def _need_images(paths, flag: str = '--images'):
  if not paths:
    raise ValueError(f'{flag} names no image file (files, folders or globs, comma-separated)')


# ============================================================================ embed
def run_embed(config, workdir: str, images, which: str = 'latest', exported: str = '') -> dict:
  """`--mode embed`: WORKDIR/embeddings.npz with `features` float32 [n, D] and `paths` [n] of
  the readable images (the others: one line each, and a count)."""
  paths = predict.image_paths(images)
  _need_images(paths)
  embedder = Embedder(config, workdir, which, exported)
  out, kept, failed = _embed_files(embedder, paths)
  if not kept:
    raise ValueError(f'none of the {len(paths)} image file(s) could be read')
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'embeddings.npz')
  features = out['feature'].astype(np.float32)
  np.savez(path, features=features, paths=np.asarray(kept))
  skipped = f'; {len(failed)} skipped (unreadable)' if failed else ''
  print(f'embed ({embedder.describe}): {len(kept)} image(s), features {features.shape[1]}-d'
        f'{skipped} -> {path}', flush=True)
  return {'features': features, 'paths': kept, 'failed': failed}


# ============================================================================ search
def identities(paths, folder: str):
  """The identity of each path under an identity folder (FOLDER/<identity>/...): its first
  component below `folder`; None for all when some file lies directly in `folder`."""
  if not folder or not os.path.isdir(folder):
    return None
  names = [os.path.relpath(p, folder).split(os.sep) for p in paths]
  if any(len(parts) < 2 for parts in names):
    return None
  return [parts[0] for parts in names]


def _gallery(embedder: Embedder, folder: str, workdir: str) -> dict:
  """The gallery's features, paths and content keys: from the cache when the model and every
  file (name, size, modification time) are the same as when it was stored."""
  paths = predict.image_paths([folder])
  _need_images(paths, '--gallery')
  listing = [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]
  key = hashlib.sha256(json.dumps([embedder.key, listing]).encode()).hexdigest()[:24]
  cache = os.path.join(workdir, 'search_cache', f'gallery_{key}.npz')
  if os.path.isfile(cache):
    with np.load(cache) as stored:
      print(f'gallery: {len(stored["paths"])} embedding(s) from the cache {cache}', flush=True)
      return {k: stored[k] for k in stored.files}
  out, kept, failed = _embed_files(embedder, paths)
  if not kept:
    raise ValueError(f'none of the {len(paths)} gallery image(s) could be read')
  gallery = {'feature': out['feature'].astype(np.float32), 'paths': np.asarray(kept),
             'content': np.asarray(reid_sources.content_keys(kept))}
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  np.savez(cache + '.tmp.npz', **gallery)
  os.replace(cache + '.tmp.npz', cache)
  print(f'gallery: {len(kept)} image(s) embedded'
        + (f', {len(failed)} skipped (unreadable)' if failed else '') + f' -> cache {cache}',
        flush=True)
  return gallery


def rank(query: dict, gallery: dict, top: int, rerank: bool) -> tuple[np.ndarray, np.ndarray]:
  """(order [q, k], distances [q, k]): the gallery by eval's distance, each query's identical
  files (same content key) left out; k = min(top, gallery size)."""
  dist = metrics.distance_matrix(query['feature'], gallery['feature'])
  if rerank:
    dist = metrics.re_ranking(dist, metrics.distance_matrix(query['feature'], query['feature']),
                              metrics.distance_matrix(gallery['feature'], gallery['feature']))
  same = query['content'][:, None] == gallery['content'][None, :]
  ranked = np.where(same, np.inf, dist)
  order = np.argsort(ranked, axis=1, kind='stable')[:, :min(top, dist.shape[1])]
  return order, np.take_along_axis(ranked, order, axis=1)


def _records(query_paths, query_ids, gallery, gallery_ids, order, distances) -> list[dict]:
  records = []
  for q, path in enumerate(query_paths):
    results = []
    for g, d in zip(order[q], distances[q]):
      if not np.isfinite(d):
        break  # only identical files were left
      entry = {'path': str(gallery['paths'][g]), 'distance': float(d)}
      if gallery_ids is not None:
        entry['identity'] = gallery_ids[g]
      results.append(entry)
    records.append({'query': path, 'identity': query_ids[q] if query_ids else None,
                    'results': results})
  return records


def _pictures(out_dir, query_images, query_out, records, transform, with_truth) -> int:
  """One ranking picture per query: the query, its attention map (a checkpoint's; an exported
  file's queries are drawn alone) and its ranked gallery, framed green / red when identities
  are known on both sides, else grey."""
  os.makedirs(out_dir, exist_ok=True)
  names = set()
  for q, record in enumerate(records):
    query = query_images[q]
    if 'rollout' in query_out:
      glca = query_out['glca_index'][q] if 'glca_index' in query_out else None
      query_map = drawing.attention_picture(query, query_out['rollout'][q], glca)
      query_map = query_map[:, query.shape[1]:]
    else:
      query_map = query
    shown, _ = predict.load_images([r['path'] for r in record['results']], transform)
    matches = ([r.get('identity') == record['identity'] for r in record['results']]
               if with_truth else None)
    picture = drawing.ranking_picture(query, query_map, [im for _, im in shown], matches)
    stem = os.path.splitext(os.path.basename(record['query']))[0] or 'query'
    name, k = stem, 1
    while name in names:
      name, k = f'{stem}_{k}', k + 1
    names.add(name)
    Image.fromarray(picture).save(os.path.join(out_dir, f'{name}.png'))
  return len(records)


def run_search(config, workdir: str, images, gallery: str, which: str = 'latest',
               exported: str = '', top: int = 10) -> list[dict]:
  """`--mode search`: each query's top `top` gallery images -> WORKDIR/search.jsonl and one
  ranking picture per query in WORKDIR/search/."""
  if not gallery:
    raise ValueError('--mode search needs --gallery DIR (the images to rank)')
  if not os.path.isdir(gallery):
    raise FileNotFoundError(f'--gallery {gallery}: no such directory')
  query_paths = predict.image_paths(images)
  _need_images(query_paths)
  embedder = Embedder(config, workdir, which, exported)
  found = _gallery(embedder, gallery, workdir)
  out, kept, failed = _embed_files(embedder, query_paths)
  if not kept:
    raise ValueError(f'none of the {len(query_paths)} query image(s) could be read')
  query = {'feature': out['feature'], 'content': np.asarray(reid_sources.content_keys(kept))}
  order, distances = rank(query, found, top, embedder.rerank)
  gallery_ids = identities([str(p) for p in found['paths']], gallery)
  query_ids = None
  for entry in images:  # queries read from one identity folder have identities too
    query_ids = query_ids or identities(kept, str(entry).strip())
  records = _records(kept, query_ids, found, gallery_ids, order, distances)
  path = os.path.join(workdir, 'search.jsonl')
  with open(path, 'w') as f:
    for record in records:
      f.write(json.dumps(record) + '\n')
  query_images = [im for _, im in predict.load_images(kept, embedder.transform)[0]]
  drawn = _pictures(os.path.join(workdir, 'search'), query_images, out, records,
                    embedder.transform, query_ids is not None and gallery_ids is not None)
  skipped = f', {len(failed)} skipped (unreadable)' if failed else ''
  print(f'search ({embedder.describe}): {len(kept)} quer{"y" if len(kept) == 1 else "ies"}'
        f'{skipped} x {len(found["paths"])} gallery image(s), top {order.shape[1]} -> {path}; '
        f'{drawn} picture(s) -> {os.path.join(workdir, "search")}', file=sys.stdout, flush=True)
  return records
