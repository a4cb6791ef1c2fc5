"""Re-ID retrieval: query vs gallery features, mAP / CMC / mINP by the Market-1501 protocol
(dca_jax/reid/metrics.py), optionally k-reciprocal re-ranked; and a collapse monitor on the
same features (`embedding_spread`)."""

from __future__ import annotations

import sys

import jax
import numpy as np

from dca_jax import inference
from dca_jax.data import preprocess

KEYS = ('mAP', 'rank1', 'rank5', 'rank10', 'mINP', 'num_query', 'num_gallery', 'num_skipped')
# Below this median squared distance between L2-normalised features (2 = orthogonal, 0 = one
# point) the embeddings are one vector: cos > 0.9995 between most pairs, an angle under 2 deg.
# A raw-triplet collapse from scratch measured 5e-7 to 2e-4 between all pairs (docs/REID.md);
# features that separate identities sit orders of magnitude above.
COLLAPSED_SPREAD = 1e-3
SPLITS = {'test': ('query', 'gallery'), 'val': ('val_query', 'val_gallery')}  # (query, gallery)
SPREAD_SAMPLE = 1024  # features the median is taken over: 0.5 M pairs, a few ms


def embedding_spread(features, max_items: int = SPREAD_SAMPLE) -> float:
  """Median pairwise squared distance of the L2-normalised `features` [n, D] (an evenly spaced
  sample of at most `max_items`). Normalised here whatever reid_normalize says, so the figure
  reads the same for every run; the median ignores a few odd images (distractors, duplicates)."""
  f = np.asarray(features, np.float64)
  if len(f) > max_items:
    f = f[np.linspace(0, len(f) - 1, max_items).round().astype(int)]
  if len(f) < 2:
    return float('nan')
  f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
  d = np.maximum(2.0 - 2.0 * (f @ f.T), 0.0)  # float64: distances of 1e-7 survive
  return float(np.median(d[np.triu_indices(len(f), 1)]))


def collapse_warning(spread: float, config) -> str | None:
  """The one warning line for collapsed embeddings, or None when they are spread."""
  if not spread < COLLAPSED_SPREAD:  # NaN (too few features) is not a collapse
    return None
  hint = ('the raw triplet is not learning: from scratch set '
          '--config.triplet_feature=batch_standardized' if config.triplet_feature == 'raw'
          else 'the model does not tell the images apart')
  return (f'warning: Re-ID embeddings collapsed (median pairwise squared distance {spread:.1e} '
          f'of the L2-normalised eval features, under {COLLAPSED_SPREAD:g}): {hint} '
          '(docs/REID.md, "Collapsed embeddings")')


class Evaluator:
  """Yields mAP, rank1/5/10, mINP, the numbers of queries, gallery images and skipped queries
  (no true match), 'embedding_spread' (collapse monitor: one warning line the first time it
  is under COLLAPSED_SPREAD), 'reranked', the dataset version; with `pixel_baseline`, the
  raw-pixel nearest neighbour's mAP (what a model must beat). Features: `inference.forward_fn`'s
  'feature' (the config's reid_feature / reid_flip_test / reid_normalize).

  split: 'test' (query vs gallery), or 'val' (val_query vs val_gallery: held-out train
  identities, `config.val_split`, dca_jax/data/reid_val.py)."""

  in_eval_mode = True
  METRICS = ('mAP', 'rank1', 'mINP')

  def __init__(self, context, pixel_baseline: bool = False, rerank=None, split: str = 'test'):
    if split not in SPLITS:
      raise ValueError(f"retrieval split={split!r}: expected one of {sorted(SPLITS)}")
    self.context = context
    self.query_split, self.gallery_split = SPLITS[split]
    self.warned = False  # the collapse warning: once a run, the metric at every evaluation
    self.pixel_baseline = bool(pixel_baseline)
    self.rerank = bool(context.config.reid_rerank if rerank is None else rerank)
    forward = inference.forward_fn(context.model, context.config, context.dtype, ('feature',))

    def step(variables, batch):
      return {'feature': forward(variables, batch['image'])['feature'], 'pid': batch['label'],
              'camid': batch['camid'], 'index': batch['index'], 'mask': batch['mask']}

    self._step = context.jit(step)

  def features(self, variables, split: str) -> dict:
    """{'feature' [n, D], 'pid', 'camid', 'index' [n]} of every image of a Re-ID split (each
    once; 'index' is the image's position in the split)."""
    parts = []
    for batch in self.context.batches(split=split):
      out = jax.device_get(self._step(variables, batch))
      keep = np.asarray(out.pop('mask'), bool)
      parts.append({k: np.asarray(v)[keep] for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def run(self, variables):
    from dca_jax.reid import metrics  # pylint: disable=g-import-not-at-top
    query = self.features(variables, self.query_split)
    gallery = self.features(variables, self.gallery_split)
    ids = (query['pid'], gallery['pid'], query['camid'], gallery['camid'])
    stats = metrics.retrieval(query['feature'], gallery['feature'], *ids, rerank=self.rerank)
    for key in KEYS:
      yield key, stats[key]
    yield 'embedding_spread', self._spread(query['feature'], gallery['feature'])
    yield 'reranked', self.rerank
    if self.pixel_baseline:
      yield 'pixel_baseline_mAP', self._pixel_baseline(metrics, ids)
    info = self.context.input.info
    yield 'dataset_version', getattr(info, 'version', self.context.config.dataset)
    yield 'protocol', getattr(info, 'protocol', '') or 'camera-aware'

  def _spread(self, query, gallery) -> float:
    """embedding_spread of query + gallery; the first collapse prints its warning line."""
    spread = embedding_spread(np.concatenate([query, gallery]))
    line = collapse_warning(spread, self.context.config)
    if line and not self.warned and jax.process_index() == 0:
      import tqdm  # pylint: disable=g-import-not-at-top
      tqdm.tqdm.write(line, file=sys.stderr)  # above an open epoch bar, not through it
      self.warned = True
    return spread

  def _pixel_baseline(self, metrics, ids) -> float:
    """mAP of nearest neighbours on the raw (normalised) eval pixels."""
    pixels = []
    for split in (self.query_split, self.gallery_split):
      rows = [b['image'][np.asarray(b['mask'], bool)]
              for b in self.context.input.eval_iter(split=split)]
      images = preprocess.normalize(np.concatenate(rows), self.context.config)
      pixels.append(images.reshape(len(images), -1))
    return metrics.evaluate_features(*pixels, *ids)['mAP']
