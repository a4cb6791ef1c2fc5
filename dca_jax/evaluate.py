"""Evaluation: FGVC top-1 and Re-ID retrieval (mAP/CMC), for the train loop and the eval mode.

`Evaluator` runs one jitted step over a whole eval split (padded batches, each image counted
once). The eval, visualize and predict modes restore only what inference needs
(`load_for_inference`): parameters and the necks' statistics — no optimizer state, no train
input, no train step.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dca_jax import checkpoint as ckpt_lib
from dca_jax import config_lib
from dca_jax import distributed
from dca_jax.data import preprocess
from dca_jax.models import build_model, dcal


# ============================================================================ eval steps
def fgvc_eval_step(variables, batch, *, model, dtype, normalization):
  """Masked sums of correct predictions for SA, GLCA and SA+GLCA (padding counts nowhere)."""
  images = preprocess.device_normalize(batch['image'], normalization, dtype)
  out = model.apply(variables, images, train=False)
  mask = batch['mask'].astype(jnp.float32)
  label = batch['label']
  hits = lambda logits: jnp.sum((jnp.argmax(logits, -1) == label) * mask)
  sums = {'correct_sa': hits(out['sa_logits']), 'correct': hits(dcal.predict_probs(out)),
          'count': jnp.sum(mask)}
  if 'glca_logits' in out:
    sums['correct_glca'] = hits(out['glca_logits'])
  return sums


def reid_feature_step(variables, batch, *, model, dtype, normalization, after_bn: bool,
                      flip: bool, normalize: bool):
  """Retrieval features concat(SA, GLCA) of a batch (+ its pids, cameras, indices and mask)."""
  images = preprocess.device_normalize(batch['image'], normalization, dtype)

  def features(images):
    return dcal.reid_feature(model.apply(variables, images, train=False), after_bn=after_bn)

  feature = features(images)
  if flip:  # the mirror image's feature averaged in (before any normalisation)
    feature = 0.5 * (feature + features(images[:, :, ::-1, :]))
  if normalize:
    feature = feature / jnp.maximum(jnp.linalg.norm(feature, axis=-1, keepdims=True), 1e-12)
  return {'feature': feature, 'pid': batch['label'], 'camid': batch['camid'],
          'index': batch['index'], 'mask': batch['mask']}


# ============================================================================ Evaluator
class Evaluator:
  """`evaluator(variables)` -> the results dict of the config's task on its whole eval split.

  FGVC: accuracy (SA+GLCA), accuracy_sa, accuracy_glca, num_images. Re-ID: mAP, rank1/5/10,
  mINP, the numbers of queries, gallery images and skipped queries (no true match), with
  re-ranking when `reid_rerank`; on the synthetic set also the raw-pixel baseline's mAP.
  """

  def __init__(self, config, model, input_data, mesh, variables_sharding, *, dtype):
    self.config, self.input = config, input_data
    self.batch_sharding = distributed.data_sharding(mesh)
    replicated = distributed.replicated(mesh)
    normalization = config_lib.resolve_normalization(config)
    if config.task == 'fgvc':
      step = lambda v, b: fgvc_eval_step(v, b, model=model, dtype=dtype,
                                         normalization=normalization)
    else:
      step = lambda v, b: reid_feature_step(
          v, b, model=model, dtype=dtype, normalization=normalization,
          after_bn=config.reid_feature == 'after_bn', flip=config.reid_flip_test,
          normalize=config.reid_normalize)
    self._step = jax.jit(step, in_shardings=(variables_sharding, self.batch_sharding),
                         out_shardings=replicated)

  def __call__(self, variables) -> dict:
    if self.config.task == 'fgvc':
      return self._fgvc(variables)
    return self._reid(variables)

  def _batches(self, **split):
    for batch in self.input.eval_iter(**split):
      yield distributed.global_batch(batch, self.batch_sharding)

  def _fgvc(self, variables) -> dict:
    totals = None
    for batch in self._batches():
      sums = self._step(variables, batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals['count'])
    result = {'accuracy': float(totals['correct'] / count),
              'accuracy_sa': float(totals['correct_sa'] / count), 'num_images': int(count)}
    if 'correct_glca' in totals:
      result['accuracy_glca'] = float(totals['correct_glca'] / count)
    return result

  def features(self, variables, split: str) -> dict:
    """{'feature' [n, D], 'pid', 'camid', 'index' [n]} of every image of a Re-ID split (each
    once; 'index' is the image's position in the split)."""
    parts = []
    for batch in self._batches(split=split):
      out = jax.device_get(self._step(variables, batch))
      keep = np.asarray(out.pop('mask'), bool)
      parts.append({k: np.asarray(v)[keep] for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def _reid(self, variables) -> dict:
    from dca_jax.reid import metrics  # pylint: disable=g-import-not-at-top
    query, gallery = self.features(variables, 'query'), self.features(variables, 'gallery')
    ids = (query['pid'], gallery['pid'], query['camid'], gallery['camid'])
    result = _retrieval(metrics, query['feature'], gallery['feature'], ids,
                        rerank=self.config.reid_rerank)
    if self.config.dataset == 'synthetic_reid':
      result['pixel_baseline_mAP'] = self._pixel_baseline(metrics, ids)
    info = self.input.info
    result['dataset_version'] = getattr(info, 'version', self.config.dataset)
    return result

  def _pixel_baseline(self, metrics, ids) -> float:
    """mAP of nearest neighbours on the raw (normalised) eval pixels: what the model must beat."""
    pixels = {}
    for split in ('query', 'gallery'):
      rows = [b['image'][np.asarray(b['mask'], bool)] for b in self.input.eval_iter(split=split)]
      images = preprocess.normalize(np.concatenate(rows), self.config)
      pixels[split] = images.reshape(len(images), -1)
    return metrics.evaluate_features(pixels['query'], pixels['gallery'], *ids)['mAP']


def _retrieval(metrics, query_features, gallery_features, ids, *, rerank: bool) -> dict:
  """mAP/CMC/mINP (squared Euclidean distances, computed in blocks; or re-ranked)."""
  if rerank:
    dist = lambda a, b: metrics.distance_matrix(a, b)  # noqa: E731
    q_g = metrics.re_ranking(dist(query_features, gallery_features),
                             dist(query_features, query_features),
                             dist(gallery_features, gallery_features))
    stats = metrics.summarize(metrics.rank_stats(q_g, *ids), len(gallery_features))
  else:
    stats = metrics.evaluate_features(query_features, gallery_features, *ids)
  keys = ('mAP', 'rank1', 'rank5', 'rank10', 'mINP', 'num_query', 'num_gallery', 'num_skipped')
  result = {k: stats[k] for k in keys}
  result['reranked'] = bool(rerank)
  return result


def score(result: dict) -> float:
  """The number the best checkpoint is chosen by: top-1 (FGVC) or mAP (Re-ID)."""
  return float(result['accuracy'] if 'accuracy' in result else result['mAP'])


def summary_line(result: dict) -> str:
  """One line for the console, shared by the train loop and the eval mode."""
  if 'accuracy' in result:
    parts = [f'SA+GLCA {result["accuracy"]:.4f}', f'SA {result["accuracy_sa"]:.4f}']
    if 'accuracy_glca' in result:
      parts.append(f'GLCA {result["accuracy_glca"]:.4f}')
    return 'top-1 ' + ', '.join(parts) + f' on {result["num_images"]} test images'
  line = (f'mAP {result["mAP"]:.4f}, rank-1 {result["rank1"]:.4f}, rank-5 {result["rank5"]:.4f}, '
          f'rank-10 {result["rank10"]:.4f}, mINP {result["mINP"]:.4f}'
          + (' (re-ranked)' if result.get('reranked') else '')
          + f' on {result["num_query"]} queries ({result["num_skipped"]} without a match) x '
          f'{result["num_gallery"]} gallery images')
  if 'pixel_baseline_mAP' in result:
    line += f'; raw-pixel baseline mAP {result["pixel_baseline_mAP"]:.4f}'
  return line


# ============================================================================ inference
@dataclasses.dataclass
class InferenceModel:
  """A restored model for eval/visualize/predict: parameters (and neck statistics) only."""
  config: Any
  model: Any
  variables: dict
  variables_sharding: Any
  mesh: Any
  dtype: Any
  step: int
  which: str


def load_for_inference(config, workdir: str, which: str = 'latest') -> InferenceModel:
  """Restores the `latest` or `best` checkpoint of `workdir` for inference (read-only)."""
  config_lib.validate(config)
  directory = ckpt_lib.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise ckpt_lib.CheckpointError(f'no checkpoint in {directory}: train into this --workdir first')
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    damaged_best = ('; --checkpoint latest uses the newest intact one' if which == 'best' else '')
    try:  # damaged steps are named and skipped (never moved: a training may be writing)
      step = checkpointer.newest_intact_step(which)
    except ckpt_lib.DamagedCheckpointError as e:
      raise ckpt_lib.CheckpointError(f'{e}{damaged_best}') from None
    if step is None:
      raise ckpt_lib.CheckpointError(f'no {"intact " if checkpointer.all_steps() else ""}{which} '
                                     f'checkpoint in {directory}')
    dtype, precision = distributed.compute_dtype(config.precision)
    model = build_model(config, dtype=dtype)
    mesh = distributed.make_mesh()
    shape = (1, *config_lib.input_hw(config), 3)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape),
                                                 train=False))
    sharding = jax.tree.map(lambda x: distributed.state_sharding(mesh, x.shape, config.fsdp),
                            abstract)
    while True:
      try:
        variables = checkpointer.restore_variables(
            step, ckpt_lib.abstract_like(abstract, sharding),
            ckpt_lib.model_meta(config, loss_scale=precision == 'fp16'))
        break
      except ckpt_lib.DamagedCheckpointError as e:  # unreadable files of an unsealed step
        if which == 'best':
          raise ckpt_lib.CheckpointError(f'{e}{damaged_best}') from None
        print(checkpointer.report_damaged(step, e.reason, set_aside=False), flush=True)
        step = checkpointer.newest_intact_step(which, below=step)
        if step is None:
          raise ckpt_lib.CheckpointError(f'no intact checkpoint in {directory}') from None
  finally:
    checkpointer.close()
  return InferenceModel(config, model, variables, sharding, mesh, dtype, int(step), which)


def run_eval(config, workdir: str, which: str = 'latest', output: str = 'eval.json') -> dict:
  """The `eval` mode: whole-split metrics of a restored checkpoint -> WORKDIR/`output`."""
  from dca_jax import data  # pylint: disable=g-import-not-at-top  (TensorFlow: heavy import)
  restored = load_for_inference(config, workdir, which)
  input_data = data.build_input(config, process_index=jax.process_index(),
                                process_count=jax.process_count(), with_train=False)
  evaluator = Evaluator(config, restored.model, input_data, restored.mesh,
                        restored.variables_sharding, dtype=restored.dtype)
  result = evaluator(restored.variables)
  result.update(step=restored.step, checkpoint=which)
  if jax.process_index() == 0:
    path = os.path.join(workdir, output)
    with open(path, 'w') as f:
      json.dump(result, f, indent=2)
    print(f'eval ({which} checkpoint, step {restored.step}) {summary_line(result)} -> {path}',
          flush=True)
  return result
