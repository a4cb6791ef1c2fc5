"""Object re-identification: retrieval mAP / CMC of concat(SA, GLCA) features (Market-1501,
DukeMTMC-reID, MSMT17, VeRi-776). See docs/REID.md."""

from __future__ import annotations

from dca_jax.errors import ConfigError

METRIC = 'mAP'
PICTURES = 'rankings'   # --mode visualize: each query's rollout and ranked gallery (visualize.py)


def datasets() -> tuple[str, ...]:
  from dca_jax.data import registry  # pylint: disable=g-import-not-at-top  (no TensorFlow)
  return registry.names(task='reid')


def configure(c) -> None:
  """The paper's Re-ID recipe (TransReID's ViT-B settings, docs/METHOD.md); datasets set the
  rest (persons 256 x 128, vehicles 256 x 256)."""
  c.task, c.data_source = 'reid', 'folder'
  c.bnneck = True  # TransReID's BatchNorm neck before each classifier
  c.input_size, c.input_width = 256, 128
  c.top_k_ratio = 0.3
  c.optimizer, c.momentum, c.weight_decay = 'sgd', 0.9, 1e-4
  # batch 64 = 16 identities x 4 images, lr 0.008 at that batch, 5 warm-up epochs, cosine
  c.batch_size, c.num_instances, c.gradient_accumulation_steps = 64, 4, 1
  c.learning_rate, c.lr_reference_batch = 0.008, 64
  c.num_epochs, c.warmup_epochs = 120, 5.0
  # TransReID's scheduler (solver/scheduler_factory.py), train resize (T.Resize interpolation=3)
  # and classifier init (weights_init_classifier); random erasing's 1/3 is the default already
  c.warmup_factor, c.min_lr_factor, c.warmup_prefix = 0.01, 0.002, False
  c.train_interpolation = 'bicubic'
  c.classifier_init_std = 0.001
  c.use_gradient_checkpointing = False   # batch 64 at 256 x 128 (128 tokens) fits a 24 GB GPU
  c.eval_batch_size, c.eval_frequency, c.save_frequency = 256, 10, 10


def check(config) -> None:
  if config.batch_size % config.num_instances:
    raise ConfigError(f'config.batch_size={config.batch_size} is not a multiple of '
                      f'config.num_instances={config.num_instances}: a Re-ID batch is P '
                      'identities x K images')


def default_evals(config) -> dict:
  """Retrieval on query/gallery; with val_split > 0 also on the held-out train identities
  ('val/mAP', what `best` is then chosen by); the attention pictures."""
  from dca_jax.data import registry  # pylint: disable=g-import-not-at-top  (no TensorFlow)
  # A generated set: the raw-pixel baseline says how hard it is.
  evals = {'test': {'type': 'retrieval', 'prefix': '',
                    'pixel_baseline': registry.get(config.dataset).generated}}
  if config.val_split > 0:
    evals['val'] = {'type': 'retrieval', 'split': 'val', 'prefix': 'val/'}
  evals['attention'] = {'type': 'attention', 'num_images': 4, 'split': 'query'}
  return evals


def bnneck(config) -> bool:
  return bool(config.bnneck)


def partners(rng, labels, num_images: int, groups: int):
  """P x K batches: a partner of another identity (a same-identity 'distractor' would be a
  positive)."""
  from dca_jax.models import dcal  # pylint: disable=g-import-not-at-top
  del num_images
  return dcal.other_label_partners(rng, labels, groups)


LOSS_TERMS = ('ce', 'triplet')


def loss_options(config) -> dict:
  """Per branch, the batch-hard triplet loss beside the CE (`config.loss_terms` overrides)."""
  return {'terms': config.loss_terms or ','.join(LOSS_TERMS),
          'triplet_margin': config.triplet_margin, 'triplet_feature': config.triplet_feature}


def batch_fits(config, batch_size: int) -> bool:
  return batch_size % config.num_instances == 0


def protocol(config, info) -> dict:
  """How its retrieval figures are measured (eval.json's `measured_on`): the junk rule
  (camera-aware: the same id seen by the same camera; no-camera: the identical image only),
  re-ranking, the mirror image, the feature."""
  return {'cameras': getattr(info, 'protocol', '') or 'camera-aware',
          're_ranking': bool(config.reid_rerank), 'flip': bool(config.reid_flip_test),
          'feature': config.reid_feature, 'normalized': bool(config.reid_normalize),
          'distance': 'squared euclidean'}


def summary_line(result: dict) -> str:
  line = (f'mAP {result["mAP"]:.4f}, rank-1 {result["rank1"]:.4f}, rank-5 {result["rank5"]:.4f}, '
          f'rank-10 {result["rank10"]:.4f}, mINP {result["mINP"]:.4f}'
          + (' (re-ranked)' if result.get('reranked') else '')
          + f' on {result["num_query"]} queries ({result["num_skipped"]} without a match) x '
          f'{result["num_gallery"]} gallery images'
          + (f', {result["protocol"]} protocol' if result.get('protocol') else ''))
  if 'pixel_baseline_mAP' in result:
    line += f'; raw-pixel baseline mAP {result["pixel_baseline_mAP"]:.4f}'
  return line


def eval_transform(image, config):
  """uint8 [h, w, 3] tensor -> the uint8 image the Re-ID eval stream makes (a resize)."""
  from dca_jax import config_lib  # pylint: disable=g-import-not-at-top
  from dca_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  height, width = config_lib.input_hw(config)
  return preprocess.reid_eval_transform(image, height=height, width=width)


def export_outputs(config) -> tuple[str, ...]:
  """What --mode export serialises: the retrieval feature as evaluated (inference.OUTPUTS)."""
  del config
  return ('feature',)


def export_transform(config) -> dict:
  """The eval stream's host-side steps before the model, for the export's preprocessing.json."""
  from dca_jax import config_lib  # pylint: disable=g-import-not-at-top
  height, width = config_lib.input_hw(config)
  return {'eval_transform': {'input_size': height, 'input_width': width},
          'host_preprocessing': ['decode to RGB', f'resize to {height} x {width} (bilinear, '
                                 'antialiased when shrinking: tf.image.resize)',
                                 'round, clip to [0, 255], uint8']}
