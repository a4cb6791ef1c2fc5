"""The generated sets, registered: 'synthetic' (FGVC, synthetic.py: in memory) and
'synthetic_reid' (Re-ID, synthetic_reid.py: written once as a Market-1501 layout, then read by
its reader). Both are read from data_source='synthetic' and deterministic from
config.synthetic_seed.
"""

from __future__ import annotations

import os

from dca_jax.data import builders, registry, reid_sources, sources, streams, synthetic
from dca_jax.data.errors import DataError


def synthetic_fgvc(spec, process_index: int, process_count: int, with_train: bool):
  """The generated FGVC set, config.num_classes classes (0: its default)."""
  del process_index, process_count, with_train  # generated whole, deterministically
  made = synthetic.generate(
      spec.num_classes or synthetic.DEFAULT_CLASSES, spec.synthetic_num_train,
      spec.synthetic_num_test, spec.synthetic_image_size, spec.synthetic_seed,
      spec.synthetic_distractors, spec.synthetic_detail_size)
  if not len(made.train_labels) or not len(made.test_labels):
    raise DataError('synthetic split is empty: set config.synthetic_num_train / '
                    'synthetic_num_test > 0')
  source = sources.ArraySource({'train': made.train_images, 'test': made.test_images},
                               {'train': made.train_labels, 'test': made.test_labels},
                               spec.val_split)
  return builders.classes(spec, source, made.class_names)


def synthetic_reid(spec, process_index: int, process_count: int, with_train: bool):
  """The generated Re-ID set, config.num_classes train identities (0: its default), written
  once per parameter set under config.data_dir (else a temp folder)."""
  del process_index, process_count
  # Imported here so that `python -m dca_jax.data.synthetic_reid` runs without a warning.
  from dca_jax.data import synthetic_reid as generator  # pylint: disable=g-import-not-at-top
  folder = generator.ensure(generator.params_from_config(spec), spec.data_dir)  # its knobs
  dataset = reid_sources.read_market1501(
      folder, builders.verify(spec, with_train),
      version=f'synthetic_reid (Market-1501 layout, {os.path.basename(folder)})')
  return builders.identities(spec, dataset)


registry.register('synthetic', task='fgvc', sources={'synthetic': synthetic_fgvc},
                  input_class=streams.Input, generated=True)
registry.register('synthetic_reid', task='reid', sources={'synthetic': synthetic_reid},
                  input_class=streams.ReidInput, generated=True)
