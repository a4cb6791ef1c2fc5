"""The Re-ID recipe's details against TransReID's code (damo-cv/TransReID, which DCAL's Re-ID
recipe follows): train resize, random-erasing area, classifier init (the schedule's start and
floor are in test_optim.py). Cheap: numpy/PIL references, tiny JPEG layouts, eval_shape."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_reid_config
from PIL import Image

from dca_jax import data, tasks
from dca_jax.data import preprocess
from dca_jax.models import build_model, dcal

try:
  from tests import reid_layouts  # pylint: disable=g-import-not-at-top
except ImportError:
  import reid_layouts  # pylint: disable=g-import-not-at-top


def test_reid_config_carries_transreids_settings():
  """configs/*/vit_base.yml + config/defaults.py + solver/scheduler_factory.py ('type 2') +
  make_dataloader.py (T.Resize(interpolation=3), timm RandomErasing(mode='pixel')) +
  make_model.py (weights_init_classifier: normal std 0.001)."""
  c = tasks.task_config('reid', 'vit_base')
  assert (c.warmup_factor, c.min_lr_factor, c.warmup_epochs) == (0.01, 0.002, 5.0)
  assert not c.warmup_prefix  # timm's CosineLRScheduler default, which TransReID keeps
  assert (c.train_interpolation, c.classifier_init_std) == ('bicubic', 0.001)
  assert (c.random_erasing, c.random_erasing_fill, c.crop_padding) == (0.5, 'random', 10)
  assert c.random_erasing_max_area == pytest.approx(1 / 3)
  f = tasks.task_config('fgvc', 'deit_tiny')  # FGVC keeps timm's head init and bilinear resizes
  assert (f.train_interpolation, f.classifier_init_std) == ('bilinear', 0.02)


@pytest.mark.parametrize('shape', [(24, 12), (60, 30)])  # enlarged and shrunk to 32 x 16
def test_train_resize_matches_pils_bicubic_eval_pils_bilinear(shape):
  """TransReID's train T.Resize(interpolation=3) is PIL's bicubic; its test T.Resize PIL's
  bilinear (both antialiased when shrinking). Noise tells the kernels apart: they differ by
  several grey levels on average, the implementations of one kernel by under one."""
  image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
  pil = {m: np.asarray(Image.fromarray(image).resize((16, 32), f), np.float64)
         for m, f in (('bicubic', Image.BICUBIC), ('bilinear', Image.BILINEAR))}
  for method in ('bicubic', 'bilinear'):
    ours = preprocess.to_uint8(preprocess._resize(image, 32, 16, method=method)).numpy()
    other = 'bilinear' if method == 'bicubic' else 'bicubic'
    assert np.abs(ours - pil[method]).mean() < 1.0
    assert np.abs(ours - pil[other]).mean() > 3.0
  eval_image = preprocess.reid_eval_transform(image, height=32, width=16).numpy()
  assert np.abs(eval_image - pil['bilinear']).mean() < 1.0


def _erased_fractions(max_area, draws=40):
  image = np.full((64, 32, 3), 5.0, np.float32)
  fractions = []
  for n in range(draws):
    out = preprocess.random_erase(image, np.array([n, 3]), 1.0, 'mean', max_area=max_area)
    fractions.append((out.numpy() != 5.0).any(-1).mean())
  return np.array(fractions)


def test_random_erasing_area_is_uniform_up_to_max_area():
  """timm's RandomErasing (TransReID's): area ~ U(0.02, max_area) of the image, 1/3 by
  default. Side rounding moves an area by a few %."""
  default = _erased_fractions(1 / 3)
  assert default.max() <= 1 / 3 * 1.08 and default.max() > 0.25
  assert np.mean(default) == pytest.approx((0.02 + 1 / 3) / 2, abs=0.04)
  small = _erased_fractions(0.1)
  assert small.max() <= 0.1 * 1.15 and small.min() >= 0.02 * 0.8
  with pytest.raises(ValueError, match='max_area'):
    preprocess.random_erase(np.zeros((8, 8, 3), np.float32), np.array([0, 1]), 1.0,
                            max_area=0.01)


def test_reid_train_stream_reads_the_interpolation_and_erasing_area_knobs(tmp_path):
  lay = reid_layouts.write_market1501(tmp_path)
  base = dict(dataset=lay.dataset, data_source='folder', data_dir=lay.data_dir,
              num_classes=len(lay.train_pids), crop_padding=0, batch_size=8,
              random_erasing_fill='mean', normalization='imagenet')
  first = lambda **o: next(data.build_input(tiny_reid_config(**base, **o)).train_iter())['image']
  bilinear = first(random_erasing=0.0, train_interpolation='bilinear')
  bicubic = first(random_erasing=0.0, train_interpolation='bicubic')
  assert np.abs(bilinear.astype(int) - bicubic).mean() > 1.0  # the layout's images are upscaled
  erased = [(first(random_erasing=1.0, random_erasing_max_area=a, train_interpolation='bicubic')
             != bicubic).any(-1).mean(axis=(1, 2)) for a in (0.05, 1 / 3)]
  assert erased[0].max() <= 0.05 * 1.25 and erased[1].max() > 0.1


def test_classifier_init_std_reaches_both_heads():
  """classifier_init_std -> build_model -> DCAL -> the SA and GLCA classifiers (traced with
  eval_shape: no compile), and the kernels' spread is that std."""
  seen = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, dcal.Classifier):
      seen[context.module.name] = context.module.init_std
    return next_fun(*args, **kwargs)

  model = build_model(tiny_reid_config(classifier_init_std=0.001))
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 16, 3))))
  assert seen == {'head': 0.001, 'glca_head': 0.001}
  for std in (0.001, 0.02):
    kernel = dcal.Classifier(512, bnneck=True, init_std=std).init(
        jax.random.key(0), jnp.zeros((1, 64)), train=False)['params']['kernel']
    assert float(jnp.std(kernel)) == pytest.approx(std, rel=0.05)
