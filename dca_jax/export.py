"""The `export` mode: a trained model as files another runtime serves, without dca_jax.

  python main.py --config C --workdir W --mode export [--format stablehlo,onnx] [--checkpoint best]
  python main.py --config C --workdir W --mode predict --exported W/export/model.onnx --images a.jpg

W/export/ receives
  model.stablehlo     `jax.export` of the inference function, serialised: a symbolic batch
                      dimension, lowered for CPU and CUDA; `jax.export.deserialize(...).call(x)`
  model.onnx          the same function through jax2onnx (opset ONNX_OPSET); onnxruntime runs it
  preprocessing.json  what the program expects (uint8 NHWC RGB of the input size, the host-side
                      resize/crop of the eval stream before it), what it returns, and from where

The exported function is `inference.forward_fn`, the one eval, predict and visualize run: uint8
pixels in, the task's outputs out (FGVC: SA, GLCA and combined probabilities; Re-ID: the
retrieval feature with the config's after_bn / flip / normalisation). The normalisation is
inside the program, so a client only decodes and resizes. The parameters are constants of the
program: one file is the whole model. See docs/EXPORT.md.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dca_jax import checks
from dca_jax import config_lib
from dca_jax import data
from dca_jax import tasks
from dca_jax.data import preprocess
from dca_jax.inference import forward_fn, load_for_inference
from dca_jax.models import build_model
from dca_jax.serving import FILES, INPUT_NAME, PREPROCESSING, ExportedModel

FORMATS = ('stablehlo', 'onnx')
# jax.export lowers once per platform into one artifact; the caller's device picks its lowering.
PLATFORMS = ('cpu', 'cuda', 'tpu')
# Opset 17: the lowest that holds every operator jax2onnx emits for DCAL (Einsum, TopK,
# GatherND, Erf, ...) and that TensorRT 8.6+, OpenVINO and onnxruntime >= 1.13 all read.
ONNX_OPSET = 17
# jax2onnx pins orbax-checkpoint<0.11.37, which dca_jax's >=0.12.8 excludes, though it never
# imports orbax: CI installs this version with --no-deps (.ci/run, docs/EXPORT.md).
JAX2ONNX_INSTALL = 'pip install onnx onnx-ir onnxruntime && pip install --no-deps jax2onnx==0.17.1'
_PROTOBUF_LIMIT = 2 ** 31 - 1  # bytes: beyond it the ONNX weights go to a model.onnx.data file
CHECK_IMAGES = 3               # export checks each file on this many images against JAX
OUTPUT_MEANINGS = {
    'probs': '(softmax(SA) + softmax(GLCA)) / 2 (SA alone without GLCA): the prediction',
    'sa_probs': 'softmax of the SA head', 'glca_probs': 'softmax of the GLCA head',
    'feature': 'the retrieval feature concat(SA, GLCA) as --mode eval computes it (compare '
               'by squared Euclidean distance)'}


def parse_formats(formats) -> tuple[str, ...]:
  """'stablehlo,onnx' or a list -> the formats in FORMATS order; one ValueError line if unknown."""
  if isinstance(formats, str):
    formats = formats.split(',')
  wanted = [f.strip().lower() for f in (formats or ()) if f.strip()]
  unknown = [f for f in wanted if f not in FORMATS]
  if unknown:
    raise ValueError(f'unknown export format {unknown[0]!r}; --format takes '
                     f'{", ".join(FORMATS)} (comma-separated)')
  if not wanted:
    raise ValueError(f'--format is empty; choose from {", ".join(FORMATS)}')
  return tuple(f for f in FORMATS if f in wanted)


# ============================================================================ the function
def export_config(config):
  """`config` as the exported program runs it: plain XLA attention (cuDNN's fused kernel is
  GPU-only and has no ONNX form), no rematerialisation (inference keeps no activations)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.attention_impl = 'xla'
  c.use_gradient_checkpointing = False
  return c


def inference_function(config, variables):
  """(fn, output names): fn(images uint8 [B, H, W, 3]) -> {name: float32 [B, ...]}, the task's
  export outputs of `inference.forward_fn` with `variables` as constants, in float32 (whatever
  `precision` trained: ONNX CPU kernels have no bf16, and float32 is the reference)."""
  c = export_config(config)
  outputs = tasks.get(c.task).export_outputs(c)
  forward = forward_fn(build_model(c, dtype=jnp.float32), c, jnp.float32, outputs)
  constants = jax.device_get(variables)

  def fn(images):
    return forward(constants, images)

  names = sorted(jax.eval_shape(fn, input_spec(c, 1)))  # the order a dict's leaves flatten in
  return fn, names


def input_spec(config, batch=None) -> jax.ShapeDtypeStruct:
  """uint8 [batch, H, W, 3]; `batch` None: the symbolic dimension 'batch'."""
  if batch is None:
    batch = jax.export.symbolic_shape('batch')[0]
  return jax.ShapeDtypeStruct((batch, *config_lib.input_hw(config), 3), jnp.uint8)


# ============================================================================ writers
def write_stablehlo(fn, spec, path: str) -> dict:
  exported = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(spec)
  blob = exported.serialize()
  with open(path, 'wb') as f:
    f.write(blob)
  return {'file': os.path.basename(path), 'bytes': len(blob), 'platforms': list(PLATFORMS),
          'calling_convention_version': exported.calling_convention_version,
          'load': 'jax.export.deserialize(bytearray(open(file, "rb").read())).call(images)'}


def _import_jax2onnx():
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top
    import onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f'--format onnx needs the jax2onnx converter ({e.name} is not installed): '
                     f'{JAX2ONNX_INSTALL}') from None
  return jax2onnx, onnx


def write_onnx(fn, spec, names: Sequence[str], path: str) -> dict:
  jax2onnx, onnx = _import_jax2onnx()
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  # jax2onnx logs each optional plugin it cannot import (Equinox, dm-pix: not ours) with a
  # traceback, and onnx_ir warns on untyped shape constants: neither concerns this graph.
  quiet = [logging.getLogger(n) for n in ('jax2onnx', 'onnx_ir')]
  levels = [q.level for q in quiet]
  for q in quiet:
    q.setLevel(logging.ERROR)
  try:
    proto = jax2onnx.to_onnx(fn, [spec], model_name='dcal', opset=ONNX_OPSET,
                             input_names=[INPUT_NAME], output_names=list(names))
  finally:
    for q, level in zip(quiet, levels):
      q.setLevel(level)
  external = proto.ByteSize() > _PROTOBUF_LIMIT
  for stale in (path, path + '.data'):
    if os.path.exists(stale):
      os.remove(stale)
  onnx.save_model(proto, path, save_as_external_data=external, all_tensors_to_one_file=True,
                  location=os.path.basename(path) + '.data')
  size = os.path.getsize(path) + (os.path.getsize(path + '.data') if external else 0)
  return {'file': os.path.basename(path), 'bytes': size, 'opset': ONNX_OPSET,
          'external_data': os.path.basename(path) + '.data' if external else None,
          'converter': f'jax2onnx {metadata.version("jax2onnx")}',
          'load': 'onnxruntime.InferenceSession(file).run(None, {"images": images})'}


# ============================================================================ the mode
def _class_names(config):
  """The dataset's class names, or None when its data cannot be read here (export needs only
  the checkpoint; the names are a convenience for clients)."""
  try:
    return [str(n) for n in data.build_input(config, with_train=False).info.class_names]
  except (data.DataError, FileNotFoundError, OSError) as e:
    print(f'export: class names not recorded ({e})', flush=True)
    return None


def check_images(config, count: int = CHECK_IMAGES) -> np.ndarray:
  """Fixed uint8 images that exercise the whole value range (export's self-check)."""
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (count, *config_lib.input_hw(config), 3), dtype=np.uint8)


def _max_difference(a: dict, b: dict) -> float:
  return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64))))
             for k in a)


def export_model(config, variables, out_dir: str, formats=FORMATS, *, meta=None,
                 class_names=None) -> dict:
  """Writes the formats' files and preprocessing.json into `out_dir`; returns the JSON's dict.
  `class_names`: recorded for clients of a model that outputs probabilities.

  Each written file is run once on CHECK_IMAGES fixed images by its own runtime and compared
  with the jitted function (recorded as 'check'; onnxruntime missing: the ONNX check is
  skipped and says so)."""
  formats = parse_formats(formats)
  if 'onnx' in formats:
    _import_jax2onnx()  # before any work: a missing converter is one line, not a late failure
  c = export_config(config)
  task = tasks.get(c.task)
  fn, names = inference_function(c, variables)
  spec = input_spec(c)
  os.makedirs(out_dir, exist_ok=True)
  files, check = {}, {}
  images = check_images(c)
  want = {k: np.asarray(v) for k, v in jax.device_get(jax.jit(fn)(images)).items()}
  for fmt in formats:
    start = time.perf_counter()
    path = os.path.join(out_dir, FILES[fmt])
    if fmt == 'stablehlo':
      files[fmt] = write_stablehlo(fn, spec, path)
    else:
      files[fmt] = write_onnx(fn, spec, names, path)
    files[fmt]['export_seconds'] = round(time.perf_counter() - start, 2)
    try:
      got = ExportedModel(path)(images)
    except ValueError as e:  # onnxruntime not installed: the file is written, not checked
      check[fmt] = f'not checked: {e}'
      continue
    if sorted(got) != names:
      raise ValueError(f'{path}: outputs {sorted(got)} differ from the function\'s {names}')
    check[fmt] = {'max_abs_difference': _max_difference(want, got), 'images': len(images)}
  h, w = config_lib.input_hw(c)
  normalization = config_lib.resolve_normalization(c)
  mean, std = ((preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD) if normalization == 'imagenet'
               else ((0.5,) * 3, (0.5,) * 3))  # 'inception': [-1, 1]
  result = {
      'task': c.task,
      'input': {'name': INPUT_NAME, 'shape': ['batch', h, w, 3], 'dtype': 'uint8',
                'layout': 'NHWC', 'channels': 'RGB'},
      'normalization': {'name': normalization, 'mean': list(mean), 'std': list(std),
                        'applied': 'inside the exported program: (pixels / 255 - mean) / std'},
      **task.export_transform(c),
      'outputs': {k: {'shape': ['batch', int(want[k].shape[-1])], 'dtype': 'float32',
                      'meaning': OUTPUT_MEANINGS[k]} for k in names},
      'class_names': list(class_names) if class_names is not None and 'probs' in names else None,
      'compute_dtype': 'float32',
      'files': files,
      'check': check,
  }
  result.update(meta or {})
  with open(os.path.join(out_dir, PREPROCESSING), 'w') as f:
    json.dump(result, f, indent=2)
  return result


def run_export(config, workdir: str, formats=FORMATS, which: str = 'latest') -> dict:
  """The `export` mode: the restored checkpoint -> WORKDIR/export/."""
  config = checks.checked(config)
  formats = parse_formats(formats)
  if 'onnx' in formats:
    try:
      _import_jax2onnx()
    except ValueError as e:  # what can be written is: ONNX alone asked for is the error
      if formats == ('onnx',):
        raise
      formats = tuple(f for f in formats if f != 'onnx')
      print(f'export: ONNX skipped: {e}', flush=True)
  restored = load_for_inference(config, workdir, which)
  config = restored.config  # num_classes=0: the checkpoint's
  out_dir = os.path.join(workdir, 'export')
  with_probs = 'probs' in tasks.get(config.task).export_outputs(config)
  names = _class_names(config) if with_probs else None
  result = export_model(config, restored.variables, out_dir, formats, class_names=names,
                        meta={'step': restored.step, 'checkpoint': which,
                              'workdir': os.path.abspath(workdir)})
  for fmt, info in result['files'].items():
    check = result['check'][fmt]
    verdict = (f'max |difference| to JAX {check["max_abs_difference"]:.2e} on '
               f'{check["images"]} images' if isinstance(check, dict) else check)
    print(f'export ({which} checkpoint, step {restored.step}): {fmt} '
          f'{info["bytes"] / 1e6:.2f} MB -> {os.path.join(out_dir, info["file"])} ({verdict})',
          flush=True)
  print(f'export: preprocessing -> {os.path.join(out_dir, PREPROCESSING)}', flush=True)
  return result
