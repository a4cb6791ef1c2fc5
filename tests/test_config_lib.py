"""The knobs (dca_jax/config_lib.py): the paper's recipe numbers, the knob table of docs/CONFIG.md,
typed overrides, ranges and choices declared for every knob, JSON configs; and the one loader of
a run's config (dca_jax/config_files.py): an experiment file with its :arg, a JSON config, a
run's own config.json, overrides on top of each, every mistake one line."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, load_config

from dca_jax import checks, config_files, config_lib


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


@pytest.mark.parametrize('values,message', [
    ({'batch_size': 'four'}, "config.batch_size='four' in the JSON config is not of type int"),
    ({'fsdp': 1}, 'config.fsdp=1 in the JSON config is not of type bool'),
    ({'backbone_overrides': {'width': 'x'}},
     "config.backbone_overrides.width='x' in the JSON config is not of type int"),
])
def test_a_json_value_of_the_wrong_type_is_one_line_naming_the_knob(values, message):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.from_json(values)
  assert str(e.value) == message


def test_check_declared_needs_neither_jax_nor_numpy():
  """What the malloc tuning reads is checked before numpy or jax is imported
  (config_files.prepare): config_lib and check_declared import neither."""
  probe = ('import sys\nfrom dca_jax import config_files, config_lib\n'
           'config_lib.check_declared(config_lib.base_config())\n'
           'c = config_lib.base_config(); c.backbone = "vit_huge"\n'
           'try:\n  config_lib.check_declared(c)\nexcept config_lib.ConfigError as e:\n'
           '  print(e)\n'
           'print(sorted(m for m in ("numpy", "jax", "tensorflow") if m in sys.modules))\n')
  r = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, cwd=ROOT,
                     timeout=60)
  assert r.returncode == 0, r.stderr
  error, imported = r.stdout.splitlines()
  assert error.startswith("config.backbone='vit_huge' is not one of") and imported == '[]'


# ------------------------------------------------------------------------- config_files.load
def test_an_experiment_file_takes_its_arg_and_overrides_on_top():
  config, said = config_files.load('configs/cub.py:vit_base', [
      '--config.batch_size=8', '--config.backbone_overrides.resnet_layers=(1,)',
      '--noconfig.fsdp', '--config.input_width', '24'])
  assert said == ''
  assert (config.backbone, config.batch_size, config.input_width) == ('vit_base', 8, 24)
  assert config.backbone_overrides.resnet_layers == (1,) and config.fsdp is False
  assert config.num_classes == load_config('cub', 'vit_base').num_classes == 200
  with pytest.raises(AttributeError):
    config.new_key = 1   # locked: a misspelt key cannot be added later


def test_a_json_config_and_a_runs_own_load_the_same_way(tmp_path):
  saved = load_config('demo')
  (tmp_path / 'config.json').write_text(saved.to_json_best_effort())
  path = str(tmp_path / 'config.json')
  as_json, said = config_files.load(path, ['--config.eval_batch_size=7'])
  assert said == f'config: {path} (JSON; --config.KEY=VALUE overrides apply on top)'
  own, said = config_files.load(None, ['--config.eval_batch_size=7'], run_dir=str(tmp_path))
  assert said == (f"config: {path} (the run's own; --config.KEY=VALUE overrides apply on top)")
  saved.eval_batch_size = 7
  assert as_json.to_dict() == own.to_dict() == saved.to_dict()
  assert config_files.load(None, []) == (None, '')   # no spec, no run: no config


@pytest.mark.parametrize('spec,overrides,run_dir,message', [
    ('configs/nope.py', [], None, '--config configs/nope.py: no such file'),
    ('runs/nope.json', [], None, '--config runs/nope.json: no such file'),
    ('configs/cub.py', ['--config.batchsize=3'], None,
     "unknown config key 'batchsize'. Did you mean \"batch_size\" instead of \"batchsize\"? "
     '(every key is listed in dca_jax/config_lib.py)'),
    ('configs/cub.py', ['--config.batch_size=x'], None,
     "bad config override: flag --config.batch_size=x: invalid literal for int() with base 10: "
     "'x'"),
    ('configs/cub.py', ['stray'], None, 'unexpected argument(s) stray (each flag is '
     '--NAME=VALUE, each override --config.KEY=VALUE)'),
    (None, ['--config.batch_size=3'], None, '--config.batch_size=3: an override needs a config '
     '(--config configs/x.py, or a --workdir that holds a trained run)'),
    (None, [], 'EMPTY', '--config is needed: EMPTY/config.json does not exist (train into this '
     '--workdir first, or name the experiment file, e.g. --config configs/cub.py)'),
])
def test_each_mistake_in_loading_is_one_line(tmp_path, monkeypatch, spec, overrides, run_dir,
                                             message):
  monkeypatch.chdir(ROOT)
  if run_dir:
    run_dir = str(tmp_path)
    message = message.replace('EMPTY', run_dir)
  with pytest.raises(config_lib.ConfigError) as e:
    config_files.load(spec, overrides, run_dir=run_dir)
  assert str(e.value) == message


def test_an_experiment_files_bad_arg_is_one_line(tmp_path):
  (tmp_path / 'x.py').write_text(
      'from dca_jax import config_lib\n'
      'def get_config(arg=None):\n'
      '  raise config_lib.ConfigError(f"no variant {arg!r}")\n')
  (tmp_path / 'none.py').write_text('x = 1\n')
  with pytest.raises(config_lib.ConfigError, match=r"^--config .*x.py:big: no variant 'big'$"):
    config_files.load(f'{tmp_path}/x.py:big')
  with pytest.raises(config_lib.ConfigError, match=r'none.py: has no get_config\(\)$'):
    config_files.load(f'{tmp_path}/none.py')
