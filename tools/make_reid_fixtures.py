"""tests/fixtures/reid_metrics.npz: seeded Re-ID cases and the reference libraries' outputs
(docs/REID.md, "Equal to the reference libraries"): torchreid 0.2.5 (python `evaluate_rank`,
`re_ranking`, `compute_distance_matrix`), pyppbox-torchreid 1.4.1.0 (its compiled `rank_cy`) and
fastreid 1.4.0 (python and its `rank_cy.pyx` compiled here). Their `__init__`s import whole
training stacks, so the metric modules are loaded from the installed files by path.

  .venv-timm/bin/python -m tools.make_reid_fixtures [--out tests/fixtures/reid_metrics.npz]
  .venv-timm/bin/python -m tools.make_reid_fixtures --bench   # speed against the references
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import io
import os
import tempfile
import time
import warnings

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RERANK_PARAMS = ((20, 6, 0.3), (6, 3, 0.5), (5, 1, 0.0))  # k1 = 5: round(2.5) = 2 (banker's)
MAX_RANK = 50


def package_dir(name: str) -> str:
  # find_spec of a top-level package locates it without running its __init__.
  return os.path.dirname(importlib.util.find_spec(name).origin)


def load(name: str, path: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # "Cython evaluation unavailable": injected below
    spec.loader.exec_module(module)
  return module


def build_fastreid_cython(pyx: str, build_dir: str):
  from Cython.Build import cythonize
  from setuptools import Extension, setup
  src = os.path.join(build_dir, 'rank_cy.pyx')
  with open(pyx) as f, open(src, 'w') as g:
    g.write(f.read())
  cwd = os.getcwd()
  os.chdir(build_dir)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      setup(name='fastreid_rank_cy', script_args=['build_ext', '--inplace', '-q'],
            ext_modules=cythonize([Extension('rank_cy', ['rank_cy.pyx'],
                                             include_dirs=[np.get_include()])],
                                  quiet=True, language_level=3))
  finally:
    os.chdir(cwd)
  so = [f for f in os.listdir(build_dir) if f.startswith('rank_cy') and f.endswith('.so')][0]
  # An extension's module name must end with the name it was built as (PyInit_rank_cy).
  return load('fastreid_ref.rank_cy', os.path.join(build_dir, so))


class References:
  """The reference functions, loaded from the installed packages."""

  def __init__(self, build_dir: str):
    tr = package_dir('torchreid')
    pp = package_dir('pyppbox_torchreid')
    fr = package_dir('fastreid')
    self.tr_rank = load('torchreid_rank', os.path.join(tr, 'reid/metrics/rank.py'))
    self.tr_rerank = load('torchreid_rerank', os.path.join(tr, 'reid/utils/rerank.py'))
    self.tr_distance = load('torchreid_distance', os.path.join(tr, 'reid/metrics/distance.py'))
    self.pp_rank = load('pyppbox_rank', os.path.join(pp, 'metrics/rank.py'))
    so = [f for f in os.listdir(os.path.join(pp, 'metrics/rank_cylib')) if f.endswith('.so')][0]
    self.pp_rank.evaluate_cy = load('pyppbox_ref.rank_cy',
                                    os.path.join(pp, 'metrics/rank_cylib', so)).evaluate_cy
    self.pp_rank.IS_CYTHON_AVAI = True
    self.fr_rank = load('fastreid_rank', os.path.join(fr, 'evaluation/rank.py'))
    self.fr_rank.evaluate_cy = build_fastreid_cython(
        os.path.join(fr, 'evaluation/rank_cylib/rank_cy.pyx'), build_dir).evaluate_cy
    self.fr_rank.IS_CYTHON_AVAI = True
    self.fr_rerank = load('fastreid_rerank', os.path.join(fr, 'evaluation/rerank.py'))
    self.versions = {p: importlib.metadata.version(p) for p in
                     ('torchreid', 'pyppbox-torchreid', 'fastreid', 'numpy', 'torch', 'Cython')}

  def distance(self, a, b, metric):
    return self.tr_distance.compute_distance_matrix(torch.from_numpy(a), torch.from_numpy(b),
                                                    metric).numpy()

  def evaluate(self, dist, ids, max_rank=MAX_RANK) -> dict:
    """Every reference path on one case: {name: value} to store under the case's prefix."""
    args = (dist,) + tuple(ids) + (max_rank,)
    with contextlib.redirect_stdout(io.StringIO()):  # "Note: number of gallery samples ..."
      cmc, m_ap = self.tr_rank.evaluate_rank(*args, use_cython=False)
      cy_cmc, cy_map = self.pp_rank.evaluate_rank(*args, use_cython=True)
      fr_cmc, fr_ap, fr_inp = self.fr_rank.evaluate_rank(*args, use_cython=False)
      fc_cmc, fc_ap, fc_inp = self.fr_rank.evaluate_rank(*args, use_cython=True)
    return dict(tr_py_cmc=cmc, tr_py_map=m_ap, tr_cy_cmc=cy_cmc, tr_cy_map=cy_map,
                fr_py_cmc=fr_cmc, fr_py_ap=np.asarray(fr_ap), fr_py_inp=np.asarray(fr_inp),
                fr_cy_cmc=fc_cmc, fr_cy_ap=np.asarray(fc_ap), fr_cy_inp=np.asarray(fc_inp))


def clustered_features(rng, ids, dim, noise=0.8):
  """(qf, gf): identity centres + a camera bias + noise; ids <= 0 (distractors) are random."""
  q_pids, g_pids, q_camids, g_camids = ids
  pids, camids = np.concatenate([q_pids, g_pids]), np.concatenate([q_camids, g_camids])
  centres = {p: rng.normal(size=dim) for p in np.unique(pids)}
  cams = {c: 0.4 * rng.normal(size=dim) for c in np.unique(camids)}
  f = np.stack([(centres[p] if p > 0 else rng.normal(size=dim)) + cams[c]
                + noise * rng.normal(size=dim) for p, c in zip(pids, camids)]).astype(np.float32)
  return f[:len(q_pids)], f[len(q_pids):]


def market_case(rng):
  """40 queries, 240 gallery: junk, same-camera matches, distractors (0, -1), skipped queries."""
  g_pids, g_cams = [], []
  for pid in range(1, 24):  # ids 1..23: 4-10 gallery images over 6 cameras
    for _ in range(rng.integers(4, 11)):
      g_pids.append(pid)
      g_cams.append(rng.integers(1, 7))
  g_pids += [24] * 5  # id 24 only in camera 2: its camera-2 query has nothing but junk
  g_cams += [2] * 5
  n_fill = 240 - len(g_pids)
  g_pids += [0] * (n_fill - 12) + [-1] * 12  # distractors
  g_cams += list(rng.integers(1, 7, size=n_fill))
  q_pids = list(rng.integers(1, 24, size=34)) + [24, 24, 25, 26, 27, 28]  # 25..28: not in gallery
  q_cams = list(rng.integers(1, 7, size=34)) + [2, 3, 1, 4, 5, 6]
  ids = [np.asarray(x, np.int64) for x in (q_pids, g_pids, q_cams, g_cams)]
  assert len(g_pids) == 240
  return ids


def random_case(rng, nq=30, ng=200, num_ids=15, num_cams=3):
  """Uniform random distances, few ids and cameras: many junk items and many hits per query."""
  ids = (rng.integers(1, num_ids + 1, nq), rng.integers(1, num_ids + 1, ng),
         rng.integers(1, num_cams + 1, nq), rng.integers(1, num_cams + 1, ng))
  return rng.random((nq, ng)).astype(np.float32), [np.asarray(x, np.int64) for x in ids]


def small_gallery_case(rng, nq=8, ng=30):
  """Gallery smaller than max_rank; no gallery item shares a query's (pid, cam): no junk."""
  g_pids = np.repeat(np.arange(1, 7), 5)
  g_cams = np.tile(np.arange(1, 6), 6)
  q_pids = np.array([1, 2, 3, 4, 5, 6, 2, 9])  # 9: no match, skipped
  q_cams = np.full(nq, 7)
  return (rng.random((nq, ng)).astype(np.float32),
          [np.asarray(x, np.int64) for x in (q_pids, g_pids, q_cams, g_cams)])


def rerank_ids(rng, nq, ng, num_ids):
  g_pids = rng.integers(1, num_ids + 1, ng)
  g_pids[:8] = 0  # a few distractors
  return [np.asarray(x, np.int64) for x in (rng.integers(1, num_ids + 1, nq), g_pids,
                                            rng.integers(1, 5, nq), rng.integers(1, 5, ng))]


def build(refs: References) -> dict:
  rng = np.random.default_rng(20220601)
  out = {}

  def put(prefix, values):
    for k, v in values.items():
      out[f'{prefix}_{k}'] = np.asarray(v)

  # 1. Market-like case from clustered features, torchreid's squared euclidean distances.
  ids = market_case(rng)
  qf, gf = clustered_features(rng, ids, 8)
  dist = refs.distance(qf, gf, 'euclidean')
  put('market', dict(qf=qf, gf=gf, dist=dist, q_pids=ids[0], g_pids=ids[1], q_camids=ids[2],
                     g_camids=ids[3]))
  put('market', refs.evaluate(dist, ids))
  # 2. Random distances, many hits and junk. 3. Gallery (30) smaller than max_rank (50).
  for name, (dist, ids) in (('random', random_case(rng)), ('small', small_gallery_case(rng))):
    put(name, dict(dist=dist, q_pids=ids[0], g_pids=ids[1], q_camids=ids[2], g_camids=ids[3]))
    put(name, refs.evaluate(dist, ids))
  # 4. Re-ranking inputs for both metrics (torchreid distances of clustered features).
  for metric, nq, ng, num_ids in (('euclidean', 12, 80, 16), ('cosine', 10, 70, 14)):
    ids = rerank_ids(rng, nq, ng, num_ids)
    qf, gf = clustered_features(rng, ids, 16)
    dists = dict(q_g=refs.distance(qf, gf, metric), q_q=refs.distance(qf, qf, metric),
                 g_g=refs.distance(gf, gf, metric))
    prefix = f'rr_{metric}'
    put(prefix, dict(qf=qf, gf=gf, q_pids=ids[0], g_pids=ids[1], q_camids=ids[2],
                     g_camids=ids[3], **dists))
    for k1, k2, lam in RERANK_PARAMS:
      final = refs.tr_rerank.re_ranking(dists['q_g'], dists['q_q'], dists['g_g'], k1, k2, lam)
      same = refs.fr_rerank.re_ranking(dists['q_g'], dists['q_q'], dists['g_g'], k1, k2, lam)
      assert np.array_equal(final, same), 'torchreid and fast-reid re_ranking disagree'
      tag = f'{prefix}_k{k1}_{k2}'
      out[f'{tag}_final'] = final
      res = refs.evaluate(final, ids)
      out[f'{tag}_cmc'], out[f'{tag}_map'] = res['tr_py_cmc'], np.asarray(res['tr_py_map'])
  out['rerank_params'] = np.asarray(RERANK_PARAMS, np.float64)
  out['versions'] = np.asarray([f'{k}=={v}' for k, v in refs.versions.items()])
  return out


def bench(refs: References):
  from dca_jax.reid import metrics

  def timed(fn, *args, **kw):
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
      r = fn(*args, **kw)
    return r, time.perf_counter() - t

  rng = np.random.default_rng(0)
  nq, ng = 1000, 15000
  dist, ids = random_case(rng, nq, ng, num_ids=700, num_cams=6)
  ours, t_ours = timed(metrics.evaluate_rank, dist, *ids)
  py, t_py = timed(refs.tr_rank.evaluate_rank, dist, *ids, use_cython=False)
  cy, t_cy = timed(refs.pp_rank.evaluate_rank, dist, *ids, use_cython=True)
  fr, t_fr = timed(refs.fr_rank.evaluate_rank, dist, *ids, use_cython=True)
  print(f'evaluate_rank {nq}x{ng}: ours {t_ours:.2f} s, torchreid python {t_py:.2f} s, '
        f'torchreid cython {t_cy:.2f} s, fast-reid cython {t_fr:.2f} s; '
        f'|dmAP| {abs(ours[1] - py[1]):.2e}, |dcmc| {np.abs(ours[0] - py[0]).max():.2e}, '
        f'|dmINP| vs fast-reid {abs(ours[2] - np.mean(fr[2])):.2e}')
  nq, ng = 300, 2700
  ids = rerank_ids(rng, nq, ng, 400)
  qf, gf = clustered_features(rng, ids, 32)
  d = [refs.distance(a, b, 'euclidean') for a, b in ((qf, gf), (qf, qf), (gf, gf))]
  ours, t_ours = timed(metrics.re_ranking, *d)
  ref, t_ref = timed(refs.tr_rerank.re_ranking, *d)
  print(f're_ranking {nq}+{ng}: ours {t_ours:.2f} s, torchreid {t_ref:.2f} s, '
        f'max |diff| {np.abs(ours - ref).max():.2e}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default=os.path.join(ROOT, 'tests/fixtures/reid_metrics.npz'))
  parser.add_argument('--bench', action='store_true', help='time ours vs the references instead')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as build_dir:
    refs = References(build_dir)
    print('references:', ', '.join(f'{k} {v}' for k, v in refs.versions.items()))
    if args.bench:
      bench(refs)
      return
    out = build(refs)
  np.savez_compressed(args.out, **out)
  print(f'wrote {args.out}: {len(out)} arrays, {os.path.getsize(args.out) / 1024:.0f} KiB')


if __name__ == '__main__':
  main()
