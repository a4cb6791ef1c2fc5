"""Fine-grained visual categorisation: top-1 of SA + GLCA (CUB, Cars, Aircraft, ...)."""

from __future__ import annotations

from dca_jax.errors import ConfigError

METRIC = 'accuracy'
PICTURES = 'classes'    # --mode visualize: rollout maps with the top-3 classes (visualize.py)


def datasets() -> tuple[str, ...]:
  from dca_jax.data import registry  # pylint: disable=g-import-not-at-top  (no TensorFlow)
  return registry.names(task='fgvc')


def configure(c) -> None:
  """The paper's FGVC recipe is what the base config's defaults are (docs/METHOD.md)."""
  c.task = 'fgvc'


def check(config) -> None:
  for key in ('input_size', 'input_width'):
    if config[key] is not None and config[key] > config.resize_size:
      raise ConfigError(f'config.{key}={config[key]} exceeds config.resize_size='
                        f'{config.resize_size} (the crop is taken from the resized image)')


def default_evals(config) -> dict:
  evals = {'test': {'type': 'classification', 'split': 'test', 'prefix': ''}}
  if config.test_flip:  # beside the single crop: 'flip/accuracy' next to 'accuracy'
    evals['flip'] = {'type': 'classification', 'split': 'test', 'flip': True, 'prefix': 'flip/'}
  if config.val_split > 0:
    evals['val'] = {'type': 'classification', 'split': 'val'}
  evals['attention'] = {'type': 'attention', 'num_images': 4}
  return evals


def bnneck(config) -> bool:
  del config
  return False


def partners(rng, labels, num_images: int, groups: int):
  """A derangement within each group: every image's partner is another image."""
  from dca_jax.models import dcal  # pylint: disable=g-import-not-at-top
  del labels
  return dcal.derangement_per_group(rng, num_images, groups)


LOSS_TERMS = ('ce',)


def loss_options(config) -> dict:
  """Per branch, the CE (`config.loss_terms` overrides: losses.TERMS)."""
  return {'terms': config.loss_terms or ','.join(LOSS_TERMS)}


def batch_fits(config, batch_size: int) -> bool:
  del config, batch_size
  return True


def protocol(config, info) -> dict:
  """How its test figures are measured (eval.json's `measured_on`)."""
  del info
  return {'crop': config.test_crop, 'flip_averaged_also': bool(config.test_flip),
          'val_split': float(config.val_split)}


def _top1(result: dict, prefix: str = '') -> str:
  parts = [f'SA+GLCA {result[prefix + "accuracy"]:.4f}', f'SA {result[prefix + "accuracy_sa"]:.4f}']
  if prefix + 'accuracy_glca' in result:
    parts.append(f'GLCA {result[prefix + "accuracy_glca"]:.4f}')
  return ', '.join(parts)


def summary_line(result: dict) -> str:
  line = f'top-1 {_top1(result)} on {result["num_images"]} test images'
  if 'flip/accuracy' in result:
    line += f'; flip-averaged {_top1(result, "flip/")}'
  if 'val/accuracy' in result:
    line += f'; val {result["val/accuracy"]:.4f} on {result["val/num_images"]} images'
  return line


def eval_transform(image, config):
  """uint8 [h, w, 3] tensor -> the uint8 eval crop the FGVC eval stream makes (test_crop)."""
  from dca_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  return preprocess.eval_transform(image, resize_size=int(config.resize_size),
                                   input_size=int(config.input_size), test_crop=config.test_crop,
                                   input_width=config.input_width)


def export_outputs(config) -> tuple[str, ...]:
  """What --mode export serialises: the SA+GLCA prediction and each head's (inference.OUTPUTS;
  'glca_probs' is left out of a model without GLCA)."""
  del config
  return ('probs', 'sa_probs', 'glca_probs')


def export_transform(config) -> dict:
  """The eval stream's host-side steps before the model, for the export's preprocessing.json:
  the knobs `load_image_for_eval` reads and the steps in words."""
  from dca_jax import config_lib  # pylint: disable=g-import-not-at-top
  height, width = config_lib.input_hw(config)
  size = int(config.resize_size)
  resize = 'bilinear, antialiased when shrinking (tf.image.resize)'
  if config.test_crop == 'center_crop':
    steps = [f'resize to {size} x {size} ({resize})',
             f'centre crop {height} x {width} (top {(size - height) // 2}, '
             f'left {(size - width) // 2})']
  else:
    steps = [f'resize to {height} x {width} ({resize})']
  return {'eval_transform': {'input_size': height, 'input_width': width, 'resize_size': size,
                             'test_crop': config.test_crop},
          'host_preprocessing': ['decode to RGB'] + steps + ['round, clip to [0, 255], uint8']}
