"""The `embed` and `search` modes: Re-ID features of any images, and ranked galleries for them.

  python main.py --workdir W --mode embed --images DIR_OR_FILES     # -> W/embeddings.npz
  python main.py --workdir W --mode search --images QUERIES --gallery DIR
                                                   # -> W/search.jsonl, W/search/<query>.png
  python main.py --workdir W --mode search --images q.npz --gallery g.npz   # features: no model
  ... --index flat|ivf|hnsw|auto                   # the gallery's index (reid/index.py)
  ... --out NAME                                   # another file (search: NAME's folder too)
  ... --exported W/export/model.onnx               # the exported file instead of the checkpoint

The features are the retrieval feature exactly as `--mode eval` computes it (the neck side,
the mirror image averaged in with `reid_flip_test`, L2-normalised with `reid_normalize`): the
checkpoint's through `inference.forward_fn`, an exported file's through `serving`. Images are
read as the eval stream reads them (predict.py's path: files, folders, globs; an unreadable file
is one line and is skipped). Either side may instead be an .npz of features (`features` [N, D],
optionally `paths` and `ids`, as `--mode embed` writes; its rows are named by `paths`, or by
their index without it): with both, no model is loaded.

Search ranks the gallery by the distance eval uses (squared Euclidean; k-reciprocal re-ranked
with `reid_rerank`) through the gallery's index (W/search_index/: exact `flat` by default up to
`reid.index.FLAT_MAX` vectors, approximate IVF or HNSW above; reused, grown or rebuilt as the
gallery changes), and leaves out of each query's ranking only the gallery items identical to
the query (same file bytes; same feature bytes where a side is an .npz), the protocol without
cameras (docs/REID_DATA.md). A gallery given as a folder of identity folders (DIR/<identity>/...)
or an .npz with `ids` has identities: each result then says its own, and a query with one
(from such a folder, or an .npz's `ids`) is framed green / red against them. Query images get a
picture each, named after the query (`<stem>.png`, `<stem>_2.png` for a second query of that
name), recorded in the query's search.jsonl line (`picture`), showing the query's name and each
result's rank, distance and identity (results that are no readable image file, e.g. .npz rows
without `paths`, are left out of the picture, not of the record); queries from an .npz get no
picture. Gallery images' features are cached in W/search_cache/ per file (name, size,
modification time) under a key of the model: new files are embedded, the others read back. A
run that fails writes no output file (the old one stays whole).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from PIL import Image

from dca_jax import checks
from dca_jax import drawing
from dca_jax import predict
from dca_jax import serving
from dca_jax.data import reid_labels, reid_sources
from dca_jax.reid import index as gallery_index
from dca_jax.reid import metrics

CHUNK = 64  # images read and embedded at once (bounds the host memory of a large gallery)
RANK_ELEMENTS = 1 << 26  # query x gallery distances the exact ranking holds at once (256 MB)
COPY_SLACK = 16  # an .npz side: results looked at beyond top_k for byte-identical query copies


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
    outputs = predict.mode_outputs(config, 'embed')
    if not outputs:
      raise ValueError(f'--mode embed and search rank Re-ID features; this is a task={config.task} '
                       'run (its images are classified: --mode predict)')
    self._model = predict.Predictor(config, workdir, which, outputs=outputs)
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
def run_embed(config, workdir: str, images, which: str = 'latest', exported: str = '',
              out: str = 'embeddings.npz') -> dict:
  """`--mode embed`: WORKDIR/`out` (npz) with `features` float32 [n, D] and `paths` [n] of the
  readable images (the others: one line each, and a count), and their `ids` and `cameras` [n]
  where a known layout gives them for every one (data/reid_labels.py; a line says which)."""
  paths = predict.image_paths(images)
  _need_images(paths)
  embedder = Embedder(config, workdir, which, exported)
  outputs, kept, failed = _embed_files(embedder, paths)
  if not kept:
    raise ValueError(f'none of the {len(paths)} image file(s) could be read')
  path = predict.output_path(workdir, out)
  features = outputs['feature'].astype(np.float32)
  labels, said = reid_labels.image_labels(images, kept)
  predict.write_atomically(  # np.savez adds .npz to a name without it
      path, lambda tmp: np.savez(tmp, features=features, paths=np.asarray(kept), **labels),
      '.npz')
  skipped = f'; {len(failed)} skipped (unreadable)' if failed else ''
  print(said, flush=True)
  print(f'embed ({embedder.describe}): {len(kept)} image(s), features {features.shape[1]}-d'
        f'{skipped} -> {path}', flush=True)
  return {'features': features, 'paths': kept, 'failed': failed, **labels}


# ============================================================================ search: the sides
def features_file(entries, flag: str) -> str:
  """The .npz of features `entries` names (one entry ending .npz), '' when they name images."""
  entries = [str(e).strip() for e in (entries or ()) if str(e).strip()]
  if not any(e.lower().endswith('.npz') for e in entries):
    return ''
  if len(entries) > 1:
    raise ValueError(f'{flag} {",".join(entries)}: give one .npz of features, or images (files, '
                     'folders, globs), not both nor several .npz')
  return entries[0]


def identities(paths, folder: str):
  """The identity of each path under an identity folder (FOLDER/<identity>/...): its first
  component below `folder`; None for all when some file lies directly in `folder`."""
  if not folder or not os.path.isdir(folder):
    return None
  names = [os.path.relpath(p, folder).split(os.sep) for p in paths]
  if any(len(parts) < 2 for parts in names):
    return None
  return [parts[0] for parts in names]


def _npz_side(path: str, flag: str) -> dict:
  """An .npz side: its features, names (`paths`, else the row index), ids, row keys (what makes
  two rows the same item) and stamps (the index's name of each row)."""
  found = gallery_index.load_features(path, flag)
  keys = gallery_index.row_keys(found['features'])
  names = found['paths'] or list(range(len(keys)))
  return {'feature': found['features'], 'names': names, 'ids': found['ids'], 'keys': keys,
          'stamps': gallery_index.stamps(f'{i} {n} {k}' for i, (n, k) in enumerate(zip(names,
                                                                                   keys))),
          'source': f'features {os.path.abspath(path)}', 'what': f'{flag} {path}'}


def _query_images(embedder: Embedder, paths, images) -> tuple[dict, dict, list]:
  """(the query side, the model's outputs, the unreadable files) of query images."""
  outputs, kept, failed = _embed_files(embedder, paths)
  if not kept:
    raise ValueError(f'none of the {len(paths)} query image(s) could be read')
  ids = None
  for entry in images:  # queries read from one identity folder have identities too
    ids = ids or identities(kept, str(entry).strip())
  side = {'feature': outputs['feature'], 'names': kept, 'ids': ids,
          'files': reid_sources.content_keys(kept),
          'what': f'--images (embedded by {embedder.describe})'}
  return side, outputs, failed


def _same_width(query: dict, gallery: dict) -> None:
  width_q, width_g = query['feature'].shape[1], gallery['feature'].shape[1]
  if width_q != width_g:
    raise ValueError(f'feature widths differ: {query["what"]} has {width_q}-d features, '
                     f'{gallery["what"]} {width_g}-d (the same model must embed both)')


def _read_cache(cache: str) -> dict:
  """The gallery cache's arrays (empty ones when there is none, or an older kind of cache)."""
  empty = {'feature': None, 'paths': [], 'content': [], 'stamps': np.zeros(0, np.uint64),
           'failed': np.zeros(0, np.uint64)}
  if not os.path.isfile(cache):
    return empty
  with np.load(cache) as stored:
    return {k: stored[k] for k in stored.files} if 'stamps' in stored.files else empty


def _merged(old: dict, paths, row_stamps, out: dict, kept) -> dict:
  """The gallery's rows in listing order: a file's cached row while its stamp is cached, else
  its new embedding (unreadable files left out)."""
  cached = {s: i for i, s in enumerate(old['stamps'].tolist())}
  stamp_of = dict(zip(paths, row_stamps))
  fresh = {p: len(cached) + i for i, p in enumerate(kept)}
  take = [cached[s] if s in cached else fresh[p]
          for p, s in zip(paths, row_stamps) if s in cached or p in fresh]
  if not take:
    raise ValueError(f'none of the {len(paths)} gallery image(s) could be read')
  pool = [f for f in (old['feature'], out.get('feature')) if f is not None and len(f)]
  names = [str(p) for p in old['paths']] + list(kept)
  files = [str(c) for c in old['content']] + reid_sources.content_keys(kept)
  pool_stamps = old['stamps'].tolist() + [stamp_of[p] for p in kept]
  return {'feature': np.concatenate(pool).astype(np.float32)[take],
          'names': [names[i] for i in take], 'files': [files[i] for i in take],
          'stamps': np.asarray([pool_stamps[i] for i in take], np.uint64)}


def _gallery(embedder: Embedder, folder: str, workdir: str, query: dict) -> dict:
  """The gallery folder's side: each file's feature from the cache while its name, size and
  modification time are what they were (under this model), the new files embedded; the cache
  rewritten when anything changed, once the widths are checked against the queries'."""
  paths = predict.image_paths([folder])
  _need_images(paths, '--gallery')
  row_stamps = gallery_index.stamps(f'{os.path.abspath(p)} {os.path.getsize(p)} '
                                    f'{os.stat(p).st_mtime_ns}' for p in paths).tolist()
  source = json.dumps([embedder.key, os.path.abspath(folder)])
  cache = os.path.join(workdir, 'search_cache',
                       f'gallery_{hashlib.sha256(source.encode()).hexdigest()[:24]}.npz')
  old = _read_cache(cache)
  skip = set(old['failed'].tolist())
  known = set(old['stamps'].tolist()) | skip   # cached, or unreadable as it is now
  todo = [p for p, s in zip(paths, row_stamps) if s not in known]
  out, kept, failed = _embed_files(embedder, todo) if todo else ({}, [], [])
  gallery = _merged(old, paths, row_stamps, out, kept)
  gallery.update(ids=identities(gallery['names'], folder), source=source,
                 what=f'--gallery {folder} (embedded by {embedder.describe})')
  _same_width(query, gallery)
  stamp_of = dict(zip(paths, row_stamps))
  unreadable = (skip & set(row_stamps)) | {stamp_of[p] for p, _ in failed}
  if todo or len(gallery['stamps']) != len(old['stamps']):
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    np.savez(cache + '.tmp.npz', feature=gallery['feature'], paths=np.asarray(gallery['names']),
             content=np.asarray(gallery['files']), stamps=gallery['stamps'],
             failed=np.asarray(sorted(unreadable), np.uint64))
    os.replace(cache + '.tmp.npz', cache)
  reused = len(gallery['names']) - len(kept)
  said = ([f'{reused} embedding(s) from the cache'] if reused else []) + (
      [f'{len(kept)} image(s) embedded'] if kept else []) + (
      [f'{len(unreadable)} skipped (unreadable)'] if unreadable else [])
  print(f'gallery: {", ".join(said)}' + (f' -> cache {cache}' if todo else f' ({cache})'),
        flush=True)
  return gallery


# ============================================================================ search: ranking
def _content_codes(query: dict, gallery: dict) -> None:
  """Sets each side's `content`: int codes, equal for the same item: the file's bytes when both
  sides are image files, else the feature vector's bytes (`_drop_copies` then compares the
  files a result and its query name, where both do)."""
  if 'files' in query and 'files' in gallery:
    keys = [np.asarray(query['files']), np.asarray(gallery['files'])]
  else:
    keys = [side['keys'] if 'keys' in side else gallery_index.row_keys(side['feature'])
            for side in (query, gallery)]
  _, codes = np.unique(np.concatenate(keys), return_inverse=True)
  codes = codes.ravel()
  query['content'], gallery['content'] = codes[:len(keys[0])], codes[len(keys[0]):]


def _file_key(name):
  """The content key of the file `name` (an .npz's `paths` entry), None where it is not one."""
  try:
    return (reid_sources.content_keys([name])[0]
            if isinstance(name, str) and os.path.isfile(name) else None)
  except OSError:
    return None


def _drop_copies(query: dict, gallery: dict, order, distances, top: int):
  """(order, distances) cut to `top`, without the results whose file is the query's byte for byte
  where a side is an .npz: its features, from another batch, may differ from the image's in the
  last bits. Files are read only for the results looked at (a large .npz gallery stays unread)."""
  query_files = query.get('files') or [_file_key(n) for n in query['names']]
  known = dict(enumerate(gallery['files'])) if 'files' in gallery else {}
  width = min(top, order.shape[1])
  kept_order = np.zeros((len(order), width), np.int64)
  kept = np.full((len(order), width), np.inf, np.float32)
  for q, own in enumerate(query_files):
    found = 0
    for g, d in zip(order[q], distances[q]):
      if found == width or not np.isfinite(d):
        break
      if own is not None:
        if int(g) not in known:
          known[int(g)] = _file_key(gallery['names'][g])
        if known[int(g)] == own:
          continue
      kept_order[q, found], kept[q, found] = g, d
      found += 1
  return kept_order, kept


def _top(ranked: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(order, values) of each row's k smallest, exactly `np.argsort(kind='stable')[:, :k]`'s: a
  large row is cut to the entries up to its k-th value (ties included) before the stable sort."""
  if 4 * k >= ranked.shape[1]:
    order = np.argsort(ranked, axis=1, kind='stable')[:, :k]
  else:
    kth = np.partition(ranked, k - 1, axis=1)[:, k - 1]
    order = np.empty((len(ranked), k), np.int64)
    for q, (row, cut) in enumerate(zip(ranked, kth)):
      candidates = np.flatnonzero(row <= cut)   # ascending: the stable sort keeps ties in order
      if len(candidates) < k:  # NaN at the cut: the full sort
        order[q] = np.argsort(row, kind='stable')[:k]
      else:
        order[q] = candidates[np.argsort(row[candidates], kind='stable')[:k]]
  return order, np.take_along_axis(ranked, order, axis=1)


def rank(query: dict, gallery: dict, top: int, rerank: bool) -> tuple[np.ndarray, np.ndarray]:
  """(order [q, k], distances [q, k]): the gallery by eval's distance, each query's identical
  items (same `content`) left out; k = min(top, gallery size). Without re-ranking the queries
  are ranked in blocks of at most RANK_ELEMENTS distances (one block: the whole matrix)."""
  qf, gf = query['feature'], gallery['feature']
  k = min(top, len(gf))
  if rerank:
    dist = metrics.re_ranking(metrics.distance_matrix(qf, gf), metrics.distance_matrix(qf, qf),
                              metrics.distance_matrix(gf, gf))
    same = query['content'][:, None] == gallery['content'][None, :]
    return _top(np.where(same, np.inf, dist), k)
  step = max(1, RANK_ELEMENTS // len(gf))
  parts = []
  for start in range(0, len(qf), step):
    block = slice(start, start + step)
    same = query['content'][block, None] == gallery['content'][None, :]
    parts.append(_top(np.where(same, np.inf, metrics.distance_matrix(qf[block], gf)), k))
  return np.concatenate([o for o, _ in parts]), np.concatenate([d for _, d in parts])


def _near(query: dict, gallery: dict, index, positions: np.ndarray, top: int):
  """(order [q, k], distances [q, k]; inf where fewer were found) from an approximate index:
  enough neighbours asked for that each query's identical items can be dropped."""
  content = gallery['content'][positions]   # index order
  copies = np.bincount(content, minlength=int(query['content'].max()) + 1)
  k = min(top, len(positions))
  distances, rows = index.search(query['feature'], min(k + int(copies[query['content']].max()),
                                                       len(positions)))
  order, found = np.zeros((len(rows), k), np.int64), np.full((len(rows), k), np.inf, np.float32)
  for q, (row, dist) in enumerate(zip(rows, distances)):
    keep = (row >= 0) & (content[np.maximum(row, 0)] != query['content'][q])
    kept = row[keep][:k]
    order[q, :len(kept)], found[q, :len(kept)] = positions[kept], dist[keep][:k]
  return order, found


def _ranked(query: dict, gallery: dict, workdir: str, kind: str, top: int, rerank: bool):
  """(order, distances, the index): the gallery's index made current (reid/index.py `sync`), then
  ranked exactly on its vectors (flat) or through it; with an .npz side, COPY_SLACK more
  candidates for `_drop_copies` to leave the query's copies out of."""
  _content_codes(query, gallery)
  mixed = not ('files' in query and 'files' in gallery)
  wide = top + COPY_SLACK if mixed else top
  resolved = gallery_index.resolve(kind, len(gallery['feature']), exact=rerank)
  key = hashlib.sha256(gallery['source'].encode()).hexdigest()[:24]
  index, positions = gallery_index.sync(
      os.path.join(workdir, 'search_index', f'gallery_{kind}_{key}'), resolved,
      gallery['stamps'], gallery['feature'])
  if resolved != 'flat':
    order, distances = _near(query, gallery, index, positions, wide)
  else:
    indexed = {'feature': index.vectors(), 'content': gallery['content'][positions]}
    order, distances = rank(query, indexed, wide, rerank)
    order = positions[order]
  if mixed:
    order, distances = _drop_copies(query, gallery, order, distances, top)
  return order, distances, index


def _records(query: dict, gallery: dict, order, distances) -> list[dict]:
  records = []
  for q, name in enumerate(query['names']):
    results = []
    for g, d in zip(order[q], distances[q]):
      if not np.isfinite(d):
        break  # only identical items were left
      entry = {'path': gallery['names'][g], 'distance': float(d)}
      if gallery['ids'] is not None:
        entry['identity'] = gallery['ids'][g]
      results.append(entry)
    records.append({'query': name, 'identity': None if query['ids'] is None else query['ids'][q],
                    'results': results})
  return records


# ============================================================================ search: pictures
def picture_names(query_paths) -> list[str]:
  """`<stem>.png` per query, the second of a name `<stem>_2.png` (and so on), unique."""
  names, taken = [], set()
  for path in query_paths:
    stem = os.path.splitext(os.path.basename(path))[0] or 'query'
    name, k = stem, 1
    while name in taken:
      k += 1
      name = f'{stem}_{k}'
    taken.add(name)
    names.append(f'{name}.png')
  return names


def _captions(record) -> tuple[str, list]:
  """(the query's caption, each result's lines: rank and distance, identity where known)."""
  query = os.path.basename(str(record['query']))
  if record.get('identity') is not None:
    query += f' (id {record["identity"]})'
  results = [[f'#{rank} d={r["distance"]:.3f}'] + ([f'id {r["identity"]}'] if 'identity' in r
                                                    else [])
             for rank, r in enumerate(record['results'], 1)]
  return query, results


def _pictures(query_images, query_out, records, transform, with_truth) -> int:
  """One ranking picture per query, at its record's `picture`: the query, its attention map
  (a checkpoint's; an exported file's queries are drawn alone) and its ranked gallery, framed
  green / red when identities are known on both sides, else grey; captioned. Results that are
  no image file (an .npz's rows without `paths`) are left out of the picture."""
  for q, record in enumerate(records):
    query = query_images[q]
    if 'rollout' in query_out:
      glca = query_out['glca_index'][q] if 'glca_index' in query_out else None
      query_map = drawing.attention_picture(query, query_out['rollout'][q], glca)
      query_map = query_map[:, query.shape[1]:]
    else:
      query_map = query
    files = [r['path'] for r in record['results']
             if isinstance(r['path'], str) and os.path.isfile(r['path'])]
    loaded = dict(predict.load_images(files, transform)[0])
    shown = [i for i, r in enumerate(record['results']) if r['path'] in loaded]
    matches = ([record['results'][i].get('identity') == record['identity'] for i in shown]
               if with_truth else None)
    query_caption, captions = _captions(record)
    picture = drawing.ranking_picture(
        query, query_map, [loaded[record['results'][i]['path']] for i in shown], matches,
        query_caption=query_caption, captions=[captions[i] for i in shown])
    os.makedirs(os.path.dirname(record['picture']) or '.', exist_ok=True)
    Image.fromarray(picture).save(record['picture'])
  return len(records)


def pictures_folder(path: str) -> str:
  """Where search draws its pictures: beside its `--out` file, named after it without the
  extension (search.jsonl -> search/)."""
  root, ext = os.path.splitext(path)
  return root if ext else f'{path}_pictures'


# ============================================================================ search
def _sides(config, workdir, images, gallery, which, exported):
  """(the embedder or None, query side, the model's query outputs, unreadable queries, gallery
  side), each checked: the queries are read before the gallery, so that queries that cannot be
  read leave nothing behind."""
  if not gallery:
    raise ValueError('--mode search needs --gallery DIR (the images to rank) or an .npz of '
                     'features')
  query_file = features_file(images, '--images')
  gallery_file = features_file([gallery], '--gallery')
  if not gallery_file and not os.path.isdir(gallery):
    raise FileNotFoundError(f'--gallery {gallery}: no such directory')
  query_paths = [] if query_file else predict.image_paths(images)
  if not query_file:
    _need_images(query_paths)
  embedder = None if query_file and gallery_file else Embedder(config, workdir, which, exported)
  if query_file:
    query, outputs, failed = _npz_side(query_file, '--images'), {}, []
  else:
    query, outputs, failed = _query_images(embedder, query_paths, images)
  if gallery_file:
    found = _npz_side(gallery_file, '--gallery')
    _same_width(query, found)
  else:
    found = _gallery(embedder, gallery, workdir, query)
  return embedder, query, outputs, failed, found


def run_search(config, workdir: str, images, gallery: str, which: str = 'latest',
               exported: str = '', top: int = 10, out: str = 'search.jsonl',
               index: str = 'auto') -> list[dict]:
  """`--mode search`: each query's top `top` gallery items -> WORKDIR/`out` (search.jsonl) and,
  for query images, one ranking picture per query in the folder beside it (`pictures_folder`:
  WORKDIR/search/). `images` / `gallery` name images or an .npz of features; `index` is the
  gallery index's kind (reid/index.py: auto, flat, ivf, hnsw)."""
  gallery_index.resolve(index, 0)   # a bad --index before any work
  embedder, query, outputs, failed, found = _sides(config, workdir, images, gallery, which,
                                                   exported)
  rerank = embedder.rerank if embedder is not None else False
  order, distances, used = _ranked(query, found, workdir, index, top, rerank)
  records = _records(query, found, order, distances)
  path = predict.output_path(workdir, out)
  folder = pictures_folder(path)
  drawn = 'no pictures (the queries are an .npz of features)'
  if outputs:
    for record, name in zip(records, picture_names(query['names'])):
      record['picture'] = os.path.join(folder, name)
    query_images = [im for _, im in predict.load_images(query['names'], embedder.transform)[0]]
    count = _pictures(query_images, outputs, records, embedder.transform,
                      query['ids'] is not None and found['ids'] is not None)
    drawn = f'{count} picture(s) -> {folder}'
  predict.write_jsonl(path, records)  # last: the records name pictures that are on disk
  skipped = f', {len(failed)} skipped (unreadable)' if failed else ''
  queries = len(records)
  print(f'search ({embedder.describe if embedder else "stored features"}): {queries} '
        f'quer{"y" if queries == 1 else "ies"}{skipped} x {len(found["names"])} gallery item(s), '
        f'{used.describe()}, top {order.shape[1]} -> {path}; {drawn}', flush=True)
  return records
