"""Re-ID retrieval: query vs gallery features, mAP / CMC / mINP by the Market-1501 protocol
(dca_jax/reid/metrics.py), optionally k-reciprocal re-ranked."""

from __future__ import annotations

import jax
import numpy as np

from dca_jax import inference
from dca_jax.data import preprocess

KEYS = ('mAP', 'rank1', 'rank5', 'rank10', 'mINP', 'num_query', 'num_gallery', 'num_skipped')


class Evaluator:
  """Yields mAP, rank1/5/10, mINP, the numbers of queries, gallery images and skipped queries
  (no true match), 'reranked', the dataset version; with `pixel_baseline`, the raw-pixel
  nearest neighbour's mAP (what a model must beat). Features: `inference.forward_fn`'s
  'feature' (the config's reid_feature / reid_flip_test / reid_normalize)."""

  in_eval_mode = True
  METRICS = ('mAP', 'rank1', 'mINP')

  def __init__(self, context, pixel_baseline: bool = False, rerank=None):
    self.context = context
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
    query, gallery = self.features(variables, 'query'), self.features(variables, 'gallery')
    ids = (query['pid'], gallery['pid'], query['camid'], gallery['camid'])
    stats = metrics.retrieval(query['feature'], gallery['feature'], *ids, rerank=self.rerank)
    for key in KEYS:
      yield key, stats[key]
    yield 'reranked', self.rerank
    if self.pixel_baseline:
      yield 'pixel_baseline_mAP', self._pixel_baseline(metrics, ids)
    info = self.context.input.info
    yield 'dataset_version', getattr(info, 'version', self.context.config.dataset)
    yield 'protocol', getattr(info, 'protocol', '') or 'camera-aware'

  def _pixel_baseline(self, metrics, ids) -> float:
    """mAP of nearest neighbours on the raw (normalised) eval pixels."""
    pixels = {}
    for split in ('query', 'gallery'):
      rows = [b['image'][np.asarray(b['mask'], bool)]
              for b in self.context.input.eval_iter(split=split)]
      images = preprocess.normalize(np.concatenate(rows), self.context.config)
      pixels[split] = images.reshape(len(images), -1)
    return metrics.evaluate_features(pixels['query'], pixels['gallery'], *ids)['mAP']
