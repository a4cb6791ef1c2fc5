"""Serving an exported model: the files `--mode export` writes, run without dca_jax's model.

    model = serving.ExportedModel('runs/cub/export/model.onnx')   # or model.stablehlo
    out = model(uint8_images)                                      # {'probs', ...} as numpy
    meta = serving.read_preprocessing('runs/cub/export/model.onnx')  # preprocessing.json

onnxruntime runs an .onnx file, `jax.export.deserialize` a .stablehlo one. The predict mode
serves through it (`--exported`), and export checks each file it writes with it.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

FILES = {'stablehlo': 'model.stablehlo', 'onnx': 'model.onnx'}
PREPROCESSING = 'preprocessing.json'
INPUT_NAME = 'images'


class ExportedModel:
  """An exported file, run without dca_jax's model: onnxruntime for .onnx, the deserialised
  jax.export for .stablehlo. `model(uint8 [n, H, W, 3])` -> {output name: numpy array}."""

  def __init__(self, path: str):
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise ValueError(f'exported model {self.path}: no such file (write it with --mode export)')
    ext = os.path.splitext(self.path)[1]
    if ext == '.onnx':
      try:
        import onnxruntime  # pylint: disable=g-import-not-at-top
      except ImportError:
        raise ValueError(f'{self.path}: running an .onnx file needs onnxruntime '
                         '(pip install onnxruntime)') from None
      self.runtime = f'onnxruntime {onnxruntime.__version__}'
      self._session = onnxruntime.InferenceSession(
          self.path, providers=onnxruntime.get_available_providers())
      self.names = [o.name for o in self._session.get_outputs()]
    elif ext == '.stablehlo':
      with open(self.path, 'rb') as f:
        self._exported = jax.export.deserialize(bytearray(f.read()))
      self.runtime = f'jax.export {jax.__version__}'
      tree = self._exported.out_tree
      self.names = sorted(tree.unflatten(range(tree.num_leaves)))
      self._call = jax.jit(self._exported.call)
    else:
      raise ValueError(f'exported model {self.path}: expected a .onnx or .stablehlo file')

  def __call__(self, images) -> dict[str, np.ndarray]:
    images = np.ascontiguousarray(images, np.uint8)
    if hasattr(self, '_session'):
      return dict(zip(self.names, self._session.run(None, {INPUT_NAME: images})))
    return {k: np.asarray(v) for k, v in jax.device_get(self._call(images)).items()}


def read_preprocessing(model_path: str) -> dict:
  path = os.path.join(os.path.dirname(os.path.abspath(model_path)), PREPROCESSING)
  if not os.path.isfile(path):
    raise ValueError(f'{path} is missing: the exported model\'s preprocessing is recorded there '
                     '(write the export directory with --mode export)')
  with open(path) as f:
    return json.load(f)
