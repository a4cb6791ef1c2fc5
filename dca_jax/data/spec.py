"""What the input reads of a config, read once: `InputSpec.from_config(config)`.

A frozen, typed record of every knob the data package uses (the streams, the sources, the
generated sets). A knob the config lacks takes config_lib's default (`base_config()`), so a
direct caller's partial config reads as the validated one would; nothing else in the data
package reads the config.
"""

from __future__ import annotations

import dataclasses
import types

from dca_jax import config_lib

_CASTS = {'int': int, 'float': float, 'str': str, 'bool': bool}


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """The input's knobs (config_lib.py documents each); two are resolved here: `input_width`
  (unset: `input_size`) and `normalization` ('auto': the backbone's)."""
  dataset: str
  data_source: str
  data_dir: str
  num_classes: int
  val_split: float
  verify_images: bool
  batch_size: int
  eval_batch_size: int
  seed: int
  input_size: int
  input_width: int
  resize_size: int
  test_crop: str
  train_interpolation: str
  normalization: str
  shuffle_buffer: int
  num_parallel_calls: int
  # Re-ID train stream
  num_instances: int
  crop_padding: int
  random_erasing: float
  random_erasing_fill: str
  random_erasing_max_area: float
  # the generated sets
  synthetic_num_train: int
  synthetic_num_test: int
  synthetic_image_size: int
  synthetic_seed: int
  synthetic_distractors: int
  synthetic_detail_size: float

  @classmethod
  def from_config(cls, config) -> InputSpec:
    """The spec of `config` (a ConfigDict or a dict); absent knobs take config_lib's defaults."""
    defaults = config_lib.base_config()

    def knob(name):
      return config[name] if name in config else defaults[name]

    values = {}
    for field in dataclasses.fields(cls):
      value = knob(field.name)
      values[field.name] = value if value is None else _CASTS[field.type](value)
    values['input_width'] = int(knob('input_width') or values['input_size'])
    values['normalization'] = config_lib.resolve_normalization(types.SimpleNamespace(
        normalization=values['normalization'], backbone=knob('backbone')))
    return cls(**values)
