"""The one dataset registry (dca_jax/data/registry.py) and the input spec (dca_jax/data/spec.py):
what is registered, that a dataset registered from outside builds its streams, one-line errors,
the spec's defaults are config_lib's, and the `dataset` knob's help names the registry's sets."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import one_line_error, tiny_config

from dca_jax import checks, config_lib, data, tasks
from dca_jax.data import generated, registry, reid_sources, sources, streams
from dca_jax.data.spec import InputSpec

FGVC = ('cub', 'cars', 'aircraft', 'nabirds', 'dogs', 'pets', 'imagefolder', 'synthetic')
REID = ('market1501', 'dukemtmc', 'veri776', 'msmt17', 'reid_folder', 'synthetic_reid')


@pytest.fixture
def scratch_registry(monkeypatch):
  """The registry as it is, restored after the test (its registrations are the test's)."""
  monkeypatch.setattr(registry, '_ENTRIES', dict(registry._ENTRIES))  # pylint: disable=protected-access


def test_every_dataset_is_registered_with_its_task_sources_and_tfds_name():
  assert registry.names(task='fgvc') == FGVC == tasks.get('fgvc').datasets()
  assert registry.names(task='reid') == REID == tasks.get('reid').datasets()
  assert sorted(registry.names()) == sorted(FGVC + REID)
  assert registry.names(source='tfds') == ('cub', 'cars', 'dogs', 'pets')
  assert {name: registry.get(name).tfds_name for name in registry.names(source='tfds')} == {
      'cub': 'caltech_birds2011', 'cars': 'cars196', 'dogs': 'stanford_dogs',
      'pets': 'oxford_iiit_pet'}
  assert registry.names(source='synthetic') == ('synthetic', 'synthetic_reid')
  assert [n for n in registry.names() if registry.get(n).generated] == ['synthetic',
                                                                       'synthetic_reid']
  for name in registry.names(source='folder'):
    entry = registry.get(name)
    assert entry.read is not None and entry.input_class is (
        streams.ReidInput if entry.task == 'reid' else streams.Input), name
    assert (entry.layout is not None) == (entry.task == 'reid'), name  # how a Re-ID root is found
  assert registry.get('reid_folder').layout == reid_sources.Layout('identity folder', 'gallery', [])


def test_unknown_dataset_wrong_source_and_a_second_registration_are_one_line(scratch_registry):
  one_line_error(lambda: registry.get('cub200'),
                 r"config.dataset='cub200' is not a dataset dca_jax reads: one of \('cub'",
                 data.DataError)
  one_line_error(lambda: data.build_input(tiny_config(dataset='cub200')), 'cub200',
                 data.DataError)
  one_line_error(lambda: checks.checked(tiny_config(dataset='cub200')),
                 "config.dataset='cub200' is not a fgvc dataset: one of", config_lib.ConfigError)
  one_line_error(lambda: data.build_input(tiny_config(dataset='aircraft', data_source='tfds')),
                 r"dataset='aircraft' needs data_source='folder', got 'tfds': set "
                 r"data_source='folder' \(data_source='tfds' reads cub, cars, dogs, pets\)",
                 data.DataError)
  one_line_error(lambda: registry.register('cub', task='fgvc', sources={'folder': print},
                                           input_class=streams.Input),
                 "dataset 'cub' is registered already", data.DataError)


def _grey_levels(spec, process_index, process_count, with_train):
  """A tiny in-memory set: image k is filled with grey level 20 k, its label k % 3."""
  del process_index, process_count, with_train
  images = {split: np.stack([np.full((12, 12, 3), 20 * k, np.uint8) for k in range(n)])
            for split, n in (('train', 12), ('test', 5))}
  labels = {split: np.arange(len(images[split]), dtype=np.int32) % 3 for split in images}
  source = sources.ArraySource(images, labels, spec.val_split)
  info = sources.DataInfo(num_classes=3, class_names=['a', 'b', 'c'],
                          num_train=source.num_train, num_test=source.num_test)
  return source, info


def test_a_dataset_registered_from_outside_builds_its_streams(scratch_registry):
  entry = registry.register('grey_levels', task='fgvc', sources={'synthetic': _grey_levels},
                            input_class=streams.Input, generated=True)
  assert registry.get('grey_levels') is entry and 'grey_levels' in tasks.get('fgvc').datasets()
  config = tiny_config(dataset='grey_levels', data_source='synthetic', num_classes=3,
                       resize_size=32, test_crop='resize', eval_batch_size=2)
  checks.checked(config)  # a dataset of the task's, as far as the one validator can tell
  inp = data.build_input(config)
  assert (inp.info.num_train, inp.steps_per_epoch, inp.eval_steps) == (12, 3, 3)
  batch = next(inp.train_iter())
  assert batch['image'].shape == (4, 32, 32, 3) and set(batch['label'].tolist()) <= {0, 1, 2}
  batches = list(inp.eval_iter(with_index=True))
  mask = np.concatenate([b['mask'] for b in batches])
  index = np.concatenate([b['index'] for b in batches])[mask]
  grey = np.concatenate([b['image'][:, 0, 0, 0] for b in batches])[mask]
  assert index.tolist() == [0, 1, 2, 3, 4] and grey.tolist() == [0, 20, 40, 60, 80]
  assert np.concatenate([b['label'] for b in batches])[mask].tolist() == [0, 1, 2, 0, 1]
  one_line_error(lambda: data.build_input(tiny_config(dataset='grey_levels', data_source='tfds')),
                 "dataset='grey_levels' needs data_source='synthetic', got 'tfds'",
                 data.DataError)


def test_builders_are_the_registered_sources():
  """A folder layout's builder reads with the entry's reader; TFDS with the entry's name."""
  cub, market = registry.get('cub'), registry.get('market1501')
  assert set(cub.sources) == {'folder', 'tfds'} and set(market.sources) == {'folder'}
  assert cub.read.__name__ == 'read_cub' and market.read is reid_sources.read_market1501
  assert registry.get('synthetic').sources == {'synthetic': generated.synthetic_fgvc}
  assert registry.get('synthetic_reid').sources == {'synthetic': generated.synthetic_reid}


# ------------------------------------------------------------------------------ the input spec
def test_spec_defaults_are_config_libs():
  """A knob the config lacks reads as config_lib's default (seed 42, not a second default)."""
  base = config_lib.base_config()
  assert InputSpec.from_config({}) == InputSpec.from_config(base)
  spec = InputSpec.from_config({})
  assert spec.seed == base.seed and spec.shuffle_buffer == base.shuffle_buffer
  assert spec.input_width == base.input_size     # unset input_width: square
  assert spec.normalization == config_lib.resolve_normalization(base)  # 'auto' resolved
  for field in ('dataset', 'data_source', 'val_split', 'verify_images', 'test_crop',
                'num_instances', 'random_erasing_max_area', 'synthetic_seed'):
    assert getattr(spec, field) == base[field], field


def test_spec_reads_the_config_once_typed_and_frozen():
  config = tiny_config(input_width=16, normalization='inception', seed=3, val_split=0.2)
  spec = InputSpec.from_config(config)
  assert (spec.input_size, spec.input_width, spec.seed, spec.normalization) == (
      32, 16, 3, 'inception')
  assert isinstance(spec.val_split, float) and isinstance(spec.batch_size, int)
  with pytest.raises(AttributeError):
    spec.seed = 4  # frozen: what the input read cannot change under it
  config.seed = 5
  assert spec.seed == 3


# ------------------------------------------------------------------------------ the docs
def _help_datasets() -> dict:
  """{task: {dataset}} of the `dataset` knob's help ('fgvc: cub | ... ; reid: ...')."""
  listed = {}
  for part in config_lib.KNOBS['dataset'].doc.split(';'):
    task, names = part.split(':', 1)
    listed[task.strip()] = {re.match(r'\s*(\w+)', name).group(1) for name in names.split('|')}
  return listed


def test_the_dataset_knobs_help_names_exactly_the_registered_datasets():
  assert _help_datasets() == {task: set(registry.names(task=task)) for task in ('fgvc', 'reid')}
