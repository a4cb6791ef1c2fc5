"""Step 1 of loading pretrained weights: read a file (or a run) into {key: numpy array}.

`.npz` (np.load(allow_pickle=False)), `.safetensors` (parsed here), PyTorch `.pth/.pt/.bin`
(torch.load(weights_only=True) where torch is installed, else torch_pickle.py), or a directory:
a dca_jax run (dca_jax/checkpoint/runs.py). The format is sniffed from the content.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
from typing import Any, Dict, Mapping, Union

import numpy as np

from dca_jax import checkpoint
from dca_jax.errors import WeightLoadError
from dca_jax.weights import torch_pickle

PathLike = Union[str, os.PathLike]


_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'I64': np.int64, 'I32': np.int32,
    'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}


def _sniff_format(path: str, head: bytes) -> str:
  """'npz', 'safetensors' or 'torch' from the first bytes (the extension is only a fallback)."""
  extension = os.path.splitext(path)[1].lower()
  if head[:4] in (b'PK\x03\x04', b'PK\x05\x06'):
    try:
      with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
      raise WeightLoadError(f'{path}: corrupt or truncated zip archive ({error})') from None
    if any(name.endswith('data.pkl') for name in names):
      return 'torch'
    if any(name.endswith('.npy') for name in names):
      return 'npz'
    raise WeightLoadError(f'{path}: zip archive that is neither a .npz nor a PyTorch checkpoint')
  if len(head) >= 9:
    (header_length,) = struct.unpack('<Q', head[:8])
    if head[8:9] == b'{' and 0 < header_length < 100 * 2 ** 20:
      return 'safetensors'
  if head[:1] == b'\x80' or extension in ('.pth', '.pt', '.bin'):
    return 'torch'  # legacy (non-zip) torch.save pickle, vetted by the restricted reader
  if extension == '.safetensors':
    return 'safetensors'
  raise WeightLoadError(
      f'{path}: unknown checkpoint format (expected .npz, .safetensors or a PyTorch .pth/.pt/.bin)')


def _read_npz(path: str) -> Dict[str, np.ndarray]:
  """All arrays of an npz; object (pickled) arrays are refused."""
  arrays = {}
  try:
    with np.load(path, allow_pickle=False) as npz:
      for key in npz.files:
        arrays[key] = np.asarray(npz[key])
  except ValueError as error:
    if 'pickle' in str(error).lower() or 'object arrays' in str(error).lower():
      raise WeightLoadError(
          f'{path}: npz holds pickled object arrays, which are refused (allow_pickle=False)'
      ) from None
    raise WeightLoadError(f'{path}: corrupt npz ({error})') from None
  except (zipfile.BadZipFile, OSError, EOFError, KeyError) as error:
    raise WeightLoadError(
        f'{path}: corrupt or truncated npz ({type(error).__name__}: {error})') from None
  return arrays


def _safetensors_tensor(name: str, meta: Mapping[str, Any], data: memoryview) -> np.ndarray:
  """One tensor from its safetensors header entry; ValueError when it does not fit the data."""
  dtype, shape, (begin, end) = meta['dtype'], tuple(meta['shape']), meta['data_offsets']
  if end > len(data) or begin > end:
    raise ValueError(f'tensor {name!r} data [{begin}, {end}) past the end of the data '
                     f'({len(data)} bytes): truncated file')
  buffer = data[begin:end]
  if dtype == 'BF16':
    array = torch_pickle.bfloat16_to_float32(np.frombuffer(buffer, dtype='<u2'))
  elif dtype in _SAFETENSORS_DTYPES:
    array = np.frombuffer(buffer, dtype=np.dtype(_SAFETENSORS_DTYPES[dtype]).newbyteorder('<'))
  else:
    raise ValueError(f'tensor {name!r} has unsupported dtype {dtype}')
  if array.size != math.prod(shape):
    raise ValueError(f'tensor {name!r}: {array.size} elements for shape {shape}')
  return array.reshape(shape).astype(array.dtype.newbyteorder('='), copy=True)


def _read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """Our own safetensors parser (8-byte header length, JSON header, raw little-endian data)."""
  with open(path, 'rb') as handle:
    raw = handle.read()
  try:
    if len(raw) < 8:
      raise ValueError('file shorter than the 8-byte header length')
    (header_length,) = struct.unpack('<Q', raw[:8])
    if 8 + header_length > len(raw):
      raise ValueError(f'header length {header_length} runs past the end of the file '
                       f'({len(raw)} bytes)')
    header = json.loads(raw[8:8 + header_length].decode('utf-8'))
    data = memoryview(raw)[8 + header_length:]
    return {name: _safetensors_tensor(name, meta, data)
            for name, meta in header.items() if name != '__metadata__'}
  except (ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error) as error:
    raise WeightLoadError(f'{path}: corrupt or truncated safetensors file ({error})') from None


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def _read_torch(path: str) -> Dict[str, np.ndarray]:
  """A PyTorch state dict (CPU), unwrapped from `model` / `state_dict` / `model_ema`: through
  torch.load(weights_only=True) where torch is installed, else our restricted unpickler."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    torch = None
  try:
    if torch is None:
      state = torch_pickle.read(path)
    else:
      state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as error:  # pylint: disable=broad-except
    if torch is None and not isinstance(error, torch_pickle.READ_ERRORS):
      raise
    raise WeightLoadError(f'{path}: cannot read PyTorch checkpoint '
                          f'({type(error).__name__}: {_first_line(error)})') from None
  for wrapper in ('model', 'state_dict', 'model_ema'):
    if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
      state = state[wrapper]
      break
  if not isinstance(state, Mapping):
    raise WeightLoadError(
        f'{path}: PyTorch checkpoint is a {type(state).__name__}, not a state dict')
  arrays = {}
  for key, tensor in state.items():
    if isinstance(tensor, torch_pickle.Tensor):
      try:
        arrays[str(key)] = tensor.numpy()
      except ValueError as error:
        raise WeightLoadError(f'{path}: cannot read PyTorch checkpoint ({key}: {error})') from None
    elif torch is not None and isinstance(tensor, torch.Tensor):
      tensor = tensor.detach().cpu()
      if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()  # numpy has no bfloat16
      arrays[str(key)] = tensor.numpy().copy()
  if not arrays:
    raise WeightLoadError(f'{path}: PyTorch checkpoint holds no tensors')
  return arrays


def read_checkpoint(path: PathLike) -> Dict[str, np.ndarray]:
  """Reads a checkpoint into a flat {key: numpy array} dict (format sniffed from the content).

  A directory is a dca_jax run (`read_run`). Files:
  `.npz` (np.load(allow_pickle=False)), `.safetensors`, PyTorch `.pth/.pt/.bin`
  (torch.load(weights_only=True) on CPU, or without torch our restricted unpickler; `{'model':
  ...}` / `{'state_dict': ...}` unwrapped).
  Raises WeightLoadError (one line naming the file) for missing, unknown, corrupt or truncated
  files. bfloat16 tensors are widened to float32.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    return checkpoint.read_run(path)
  if not os.path.isfile(path):
    raise WeightLoadError(f'{path}: no such checkpoint file')
  with open(path, 'rb') as handle:
    head = handle.read(16)
  if not head:
    raise WeightLoadError(f'{path}: empty file')
  reader = {'npz': _read_npz, 'safetensors': _read_safetensors,
            'torch': _read_torch}[_sniff_format(path, head)]
  return reader(path)
