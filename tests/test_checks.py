"""The one validator (dca_jax/checks.py): every experiment config passes; an unknown key, a bad
choice, a value out of range or a bad pair is one line, in process and from main.py."""

import os
import pytest
from conftest import ROOT, load_config, run_main
from dca_jax import checks, config_lib


@pytest.mark.parametrize('name,classes', [('cub', 200), ('cars', 196), ('aircraft', 100),
                                          ('demo', 10), ('imagefolder', 0), ('reid_folder', 0)])
def test_experiment_configs_validate(name, classes):
  config = load_config(name)
  checks.checked(config)
  assert config.num_classes == classes


def test_unknown_key_and_bad_choice_are_named():
  c = config_lib.base_config()
  c.batchsize = 8
  with pytest.raises(ValueError, match='unknown config key.*batchsize'):
    checks.checked(c)
  c = config_lib.base_config()
  c.precision = 'fp8'
  with pytest.raises(ValueError, match="precision='fp8'"):
    checks.checked(c)


@pytest.mark.parametrize('key,value', [('log_every_steps', 0), ('eval_frequency', 0),
                                       ('remat_policy', 'save_only_these_names')])
def test_values_that_would_fail_late_fail_at_start(key, value):
  c = config_lib.base_config()
  c[key] = value
  with pytest.raises(ValueError, match=key):
    checks.checked(c)


@pytest.mark.parametrize('key,value', [
    ('num_classes', -1), ('learning_rate', -1.0), ('learning_rate', 0.0), ('top_k_ratio', 0.0),
    ('top_k_ratio', 1.5), ('random_erasing', 1.5), ('momentum', 1.0), ('label_smoothing', -0.1),
    ('input_width', 0), ('max_steps', -1), ('synthetic_detail_size', 0.6), ('num_glca_layers', 2),
    ('batch_size', 0), ('weight_decay', -0.01), ('stochastic_depth_prob', 1.0)])
def test_numeric_knob_out_of_range_is_one_line(key, value):
  c = config_lib.base_config()
  c[key] = value
  with pytest.raises(config_lib.ConfigError, match=rf'config\.{key}={value}') as e:
    checks.checked(c)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('override,message', [
    ('--config.num_classes=-1', 'config.num_classes=-1 is out of its range [0, inf]'),
    ('--config.learning_rate=-1', 'config.learning_rate=-1.0 is out of its range (0.0, inf]'),
])
def test_main_refuses_out_of_range_knobs_in_one_line(tmp_path, override, message):
  r = run_main(tmp_path, override, config=os.path.join(ROOT, 'configs', 'demo.py'), timeout=120)
  assert r.returncode != 0
  assert r.stderr.strip().splitlines() == [f'error: {message}'], r.stderr
  assert not os.listdir(tmp_path)  # nothing written
