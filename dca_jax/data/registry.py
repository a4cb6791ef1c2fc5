"""The one list of the datasets dca_jax reads: `register(name, ...)`, `get(name)`, `names()`.

Each entry names its task, the sources it can be read from (`config.data_source` -> a builder,
builders.py), the streams it gives (`input_class`: streams.Input, streams.ReidInput or a new
task's) and, where it has them, its folder reader, its TFDS name and its Re-ID layout. So
`data.build_input` is one look-up, `entry.build(spec, ...)`, and a task's dataset list is
`names(task)`.

The built-in datasets register where they are read: the FGVC layouts and TFDS builders at the
end of fgvc_readers.py, the Re-ID layouts by their `@layout` reader in reid_sources.py, the
generated sets in generated.py; `dca_jax.data` imports the three, so any import of this module
(which imports the package first) sees them all. A new dataset is one `register` call, from
any module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

from dca_jax.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class Entry:
  """A registered dataset."""
  name: str                       # config.dataset
  task: str                       # the task that reads it (config.task; dca_jax/tasks/)
  # config.data_source -> (spec, process_index, process_count, with_train) -> (source, DataInfo)
  sources: Mapping[str, Callable]
  input_class: type               # (spec, source, info, process_index, process_count) -> Input
  read: Optional[Callable] = None   # its folder reader (the official layout), if any
  tfds_name: str = ''             # its TFDS builder, if any
  generated: bool = False         # made by dca_jax (synthetic sets: a raw-pixel baseline says
                                  # how hard it is)
  layout: Any = None              # a Re-ID layout: how its folder is found (reid_sources.Layout)

  def build(self, spec, process_index: int, process_count: int, with_train: bool):
    """This host's input of the dataset, read from `spec.data_source`."""
    build_source = self.sources.get(spec.data_source)
    if build_source is None:
      others = names(self.task, source=spec.data_source)
      hint = f' (data_source={spec.data_source!r} reads {", ".join(others)})' if others else ''
      raise DataError(f'dataset={self.name!r} needs data_source='
                      f'{" or ".join(map(repr, self.sources))}, got {spec.data_source!r}: set '
                      f'data_source={next(iter(self.sources))!r}{hint}')
    source, info = build_source(spec, process_index, process_count, with_train)
    return self.input_class(spec, source, info, process_index, process_count)


_ENTRIES: dict[str, Entry] = {}


def register(name: str, *, task: str, sources: Mapping[str, Callable], input_class: type,
             **details) -> Entry:
  """Adds dataset `name` (details: the other `Entry` fields); a name is registered once."""
  if name in _ENTRIES:
    raise DataError(f'dataset {name!r} is registered already (as a {_ENTRIES[name].task} '
                    'dataset)')
  if not sources:
    raise DataError(f'dataset {name!r}: no source to read it from')
  entry = Entry(name, task, dict(sources), input_class, **details)
  _ENTRIES[name] = entry
  return entry


def get(name: str) -> Entry:
  """The entry of dataset `name`; DataError (one line) naming the known ones."""
  if name not in _ENTRIES:
    raise DataError(f'config.dataset={name!r} is not a dataset dca_jax reads: one of {names()}')
  return _ENTRIES[name]


def names(task: Optional[str] = None, *, source: Optional[str] = None) -> tuple[str, ...]:
  """The datasets (of `task`; readable from `source`), in the order they registered."""
  return tuple(name for name, entry in _ENTRIES.items()
               if (task is None or entry.task == task)
               and (source is None or source in entry.sources))


def entries() -> tuple[Entry, ...]:
  return tuple(_ENTRIES.values())

