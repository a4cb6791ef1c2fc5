"""Configs: every experiment file loads and validates; bad keys/values fail clearly; README table."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from dca_jax import config_lib


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize('name,classes', [('cub', 200), ('cars', 196), ('aircraft', 100),
                                          ('demo', 10)])
def test_experiment_configs_validate(name, classes):
  config = _load(name)
  config_lib.validate(config)
  assert config.num_classes == classes


def test_paper_recipe_numbers():
  c = _load('cub')
  assert (c.batch_size, c.gradient_accumulation_steps) == (4, 4)   # the PyTorch guide's default
  assert config_lib.effective_batch_size(c) == 16
  assert config_lib.scaled_learning_rate(c) == pytest.approx(1.5625e-5)  # 5e-4 / 512 * 16
  assert (c.input_size, c.resize_size, c.top_k_ratio) == (448, 550, 0.1)
  assert (c.num_sa_layers, c.num_glca_layers, c.num_pwca_layers) == (12, 1, 12)
  assert c.weight_decay == 0.05 and c.num_epochs == 100 and c.use_gradient_checkpointing


def test_unknown_key_and_bad_choice_are_named():
  c = config_lib.base_config()
  c.batchsize = 8
  with pytest.raises(ValueError, match='unknown config key.*batchsize'):
    config_lib.validate(c)
  c = config_lib.base_config()
  c.precision = 'fp8'
  with pytest.raises(ValueError, match="precision='fp8'"):
    config_lib.validate(c)


def test_readme_knob_table_is_current():
  r = subprocess.run([sys.executable, '-m', 'tools.knob_table', '--check', 'README.md'],
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
    config_lib.validate(c)



def test_a_conv_stem_is_a_backbone_override():
  """resnet_layers puts a ResNet-v2 stem under any ViT; the checkpoint meta (JSON) compares
  equal to the config after a round trip, so a resumed run is not 'another model'."""
  import json  # pylint: disable=g-import-not-at-top
  from dca_jax.models import vit  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.backbone_overrides.update(dict(width=64, depth=2, num_heads=2, mlp_dim=64, patch_size=2,
                                   resnet_layers=(1,), resnet_width=32))
  config_lib.validate(c)
  settings = config_lib.model_settings(c)
  assert json.loads(json.dumps(settings)) == settings
  variant = vit.get_variant(c.backbone, config_lib.backbone_overrides(c))
  assert variant.resnet_layers == (1,) and variant.grid_size(64) == 8  # 64 px / (4 x 2)
  for bad in ((0,), ()):
    c.backbone_overrides.resnet_layers = bad
    with pytest.raises(ValueError, match='resnet_layers'):
      config_lib.validate(c)

@pytest.mark.parametrize('key,value', [('log_every_steps', 0), ('eval_frequency', 0),
                                       ('remat_policy', 'save_only_these_names')])
def test_values_that_would_fail_late_fail_at_start(key, value):
  c = config_lib.base_config()
  c[key] = value
  with pytest.raises(ValueError, match=key):
    config_lib.validate(c)


@pytest.mark.parametrize('backbone,expected', [('deit_tiny', 'imagenet'), ('deit_base', 'imagenet'),
                                               ('vit_base', 'inception'),
                                               ('r50_vit_base', 'inception')])
def test_auto_normalization_follows_the_backbone(backbone, expected):
  c = _load('cub')
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
  config_lib.validate(defaults)


@pytest.mark.parametrize('key,value', [
    ('num_classes', 0), ('learning_rate', -1.0), ('learning_rate', 0.0), ('top_k_ratio', 0.0),
    ('top_k_ratio', 1.5), ('random_erasing', 1.5), ('momentum', 1.0), ('label_smoothing', -0.1),
    ('input_width', 0), ('max_steps', -1), ('synthetic_detail_size', 0.6), ('num_glca_layers', 2),
    ('batch_size', 0), ('weight_decay', -0.01), ('stochastic_depth_prob', 1.0)])
def test_numeric_knob_out_of_range_is_one_line(key, value):
  c = config_lib.base_config()
  c[key] = value
  with pytest.raises(config_lib.ConfigError, match=rf'config\.{key}={value}') as e:
    config_lib.validate(c)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('override,message', [
    ('--config.num_classes=0', 'config.num_classes=0 is out of its range'),
    ('--config.learning_rate=-1', 'config.learning_rate=-1.0 is out of its range'),
])
def test_main_refuses_out_of_range_knobs_in_one_line(tmp_path, override, message):
  r = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), '--config',
                      os.path.join(ROOT, 'configs', 'demo.py'), '--workdir', str(tmp_path),
                      override], capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert r.returncode != 0
  assert r.stderr.strip().splitlines() == [f'error: {message} [1, inf]'] or \
      r.stderr.strip().splitlines() == [f'error: {message} (0.0, inf]'], r.stderr
  assert not os.listdir(tmp_path)  # nothing written
