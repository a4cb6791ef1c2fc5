"""The knobs (dca_jax/config_lib.py): the paper's recipe numbers, the knob table of docs/CONFIG.md,
typed overrides, ranges and choices declared for every knob, JSON configs."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, load_config

from dca_jax import checks, config_lib


def test_paper_recipe_numbers():
  c = load_config('cub')
  assert (c.batch_size, c.gradient_accumulation_steps) == (4, 4)   # the PyTorch guide's default
  assert config_lib.effective_batch_size(c) == 16
  assert config_lib.scaled_learning_rate(c) == pytest.approx(1.5625e-5)  # 5e-4 / 512 * 16
  assert (c.input_size, c.resize_size, c.top_k_ratio) == (448, 550, 0.1)
  assert (c.num_sa_layers, c.num_glca_layers, c.num_pwca_layers) == (12, 1, 12)
  assert c.weight_decay == 0.05 and c.num_epochs == 100 and c.use_gradient_checkpointing


def test_config_doc_knob_table_is_current():
  r = subprocess.run([sys.executable, '-m', 'tools.knob_table', '--check', 'docs/CONFIG.md'],
                     capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0, r.stderr


def test_backbone_overrides_are_typed_placeholders():
  c = config_lib.base_config()
  assert config_lib.backbone_overrides(c) == {}
  c.backbone_overrides.depth = 3        # what --config.backbone_overrides.depth=3 does
  assert config_lib.backbone_overrides(c) == {'depth': 3}
  with pytest.raises(TypeError):
    c.backbone_overrides.width = 'wide'
  c.backbone_overrides = dict(heads=2)
  with pytest.raises(ValueError, match='unknown backbone_overrides'):
    checks.checked(c)


def test_a_conv_stem_is_a_backbone_override():
  """resnet_layers puts a ResNet-v2 stem under any ViT; the checkpoint meta (JSON) compares
  equal to the config after a round trip, so a resumed run is not 'another model'."""
  import json  # pylint: disable=g-import-not-at-top

  from dca_jax.models import vit  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.backbone_overrides.update(dict(width=64, depth=2, num_heads=2, mlp_dim=64, patch_size=2,
                                   resnet_layers=(1,), resnet_width=32))
  checks.checked(c)
  settings = config_lib.model_settings(c)
  assert json.loads(json.dumps(settings)) == settings
  variant = vit.get_variant(c.backbone, config_lib.backbone_overrides(c))
  assert variant.resnet_layers == (1,) and variant.grid_size(64) == 8  # 64 px / (4 x 2)
  for bad in ((0,), ()):
    c.backbone_overrides.resnet_layers = bad
    with pytest.raises(ValueError, match='resnet_layers'):
      checks.checked(c)


@pytest.mark.parametrize('backbone,expected', [('deit_tiny', 'imagenet'), ('deit_base', 'imagenet'),
                                               ('vit_base', 'inception'),
                                               ('r50_vit_base', 'inception')])
def test_auto_normalization_follows_the_backbone(backbone, expected):
  c = load_config('cub')
  c.backbone = backbone                   # what --config.backbone=... does
  assert config_lib.resolve_normalization(c) == expected
  c.normalization = 'imagenet'            # an explicit choice is kept
  assert config_lib.resolve_normalization(c) == 'imagenet'
  from dca_jax.data import preprocess
  c.normalization = 'auto'
  x = np.full((2, 2, 3), 255, np.uint8)
  top = {'imagenet': (1 - 0.485) / 0.229, 'inception': 1.0}[expected]
  np.testing.assert_allclose(preprocess.normalize(x, c)[0, 0, 0], top, rtol=1e-5)


def test_every_numeric_knob_has_a_range_and_every_choice_its_values():
  defaults = config_lib.base_config()
  numeric = {k for k, v in defaults.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
  assert numeric | {'input_width'} == set(config_lib.RANGES)
  for key, allowed in config_lib.CHOICES.items():
    assert defaults[key] in allowed, key
  checks.checked(defaults)


def test_a_json_config_reads_back_every_knob_in_its_type():
  """A run's config.json (to_json_best_effort) loads back equal: tuples, nested dicts,
  placeholders left unset; an unknown key is one line."""
  import json  # pylint: disable=g-import-not-at-top

  from dca_jax import tasks  # pylint: disable=g-import-not-at-top
  c = tasks.task_config('reid', 'deit_tiny')
  c.dataset = 'market1501'
  c.backbone_overrides.resnet_layers = (1, 2)
  c.backbone_overrides.depth = 2
  c.evals = {'test': {'type': 'retrieval', 'prefix': ''}}
  back = config_lib.from_json(json.loads(c.to_json_best_effort()))
  assert back.to_dict() == c.to_dict()
  assert back.backbone_overrides.resnet_layers == (1, 2)
  fgvc = config_lib.from_json(json.loads(tasks.task_config('fgvc', 'deit_tiny').to_json()))
  assert fgvc.input_width is None
  fgvc.input_width = 24  # still an int placeholder
  with pytest.raises(config_lib.ConfigError, match='unknown config key.*batchsize'):
    config_lib.from_json({'batchsize': 4})
