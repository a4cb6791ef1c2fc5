"""`build_input`: this host's streams (streams.py) of the config's dataset, by one registry
look-up (registry.py): the entry builds its source from `config.data_source` and gives the
streams of its task (`Input`; `ReidInput` for Re-ID).
"""

from __future__ import annotations

# Imported for their registrations too: the datasets they read register on import.
from dca_jax.data import fgvc_readers, generated, registry, reid_sources  # noqa: F401
from dca_jax.data.errors import DataError
from dca_jax.data.spec import InputSpec
from dca_jax.data.streams import Input


def _check_hosts(spec: InputSpec, process_index: int, process_count: int) -> None:
  """What depends on the process count (the rest is checked at the entry: dca_jax/checks.py)."""
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index={process_index} not in [0, {process_count})')
  for key in ('batch_size', 'eval_batch_size'):
    if getattr(spec, key) % process_count:
      raise DataError(f'config.{key}={getattr(spec, key)} must be a multiple of the process '
                      f'count {process_count}')


def build_input(config, process_index: int = 0, process_count: int = 1, *,
                with_train: bool = True) -> Input:
  """Builds this host's input for `config` (an ml_collections ConfigDict from config_lib; its
  knobs read once into an `InputSpec`). The dataset belongs to the config's task (checked at
  the entry, dca_jax/checks.py).

  with_train=False (eval, visualize, predict): the train split is listed but never pre-scanned
  or read.
  """
  spec = InputSpec.from_config(config)
  entry = registry.get(spec.dataset)
  _check_hosts(spec, process_index, process_count)
  return entry.build(spec, process_index, process_count, with_train)
