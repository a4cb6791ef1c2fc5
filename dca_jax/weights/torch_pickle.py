"""PyTorch checkpoints read without torch: a restricted unpickler for torch.save's formats.

torch.save writes a pickle whose tensors are `torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, ...)` calls on storages named by persistent ids; the bytes of each storage live in
the zip (`<archive>/data/<key>`, torch >= 1.6) or follow the pickle (the legacy format). The
unpickler here admits only those globals (as torch.load(weights_only=True) does), so a JAX user
reads DeiT's official .pth without installing torch, and a pickle that names any other code is
refused before it runs.
"""

from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np


def bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
  """bfloat16 bit patterns (uint16) -> float32: they are float32's upper 16 bits."""
  return (raw.astype(np.uint32) << 16).view(np.float32)


_TORCH_STORAGES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': 'bfloat16', 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}
_TORCH_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_TORCH_LEGACY_PROTOCOL = 1001


class _TorchStorageType(NamedTuple):
  name: str  # e.g. 'FloatStorage' (the global `torch.FloatStorage` in the pickle)


class _TorchStorage:
  """A storage named in the pickle; its bytes are attached once they have been read."""

  def __init__(self, storage_type: _TorchStorageType, key: str, numel: int):
    if not isinstance(storage_type, _TorchStorageType):
      raise ValueError(f'storage {key!r} has no storage type')
    self.name, self.key, self.numel = storage_type.name, key, int(numel)
    self.array: Optional[np.ndarray] = None

  @property
  def itemsize(self) -> int:
    dtype = _TORCH_STORAGES[self.name]
    return 2 if dtype == 'bfloat16' else np.dtype(dtype).itemsize

  def attach(self, raw: bytes, little_endian: bool) -> None:
    if len(raw) < self.numel * self.itemsize:
      raise ValueError(f'storage {self.key!r}: {len(raw)} bytes for {self.numel} '
                       f'{self.name} elements (truncated file)')
    raw = raw[:self.numel * self.itemsize]
    order = '<' if little_endian else '>'
    if _TORCH_STORAGES[self.name] == 'bfloat16':
      self.array = bfloat16_to_float32(np.frombuffer(raw, dtype=order + 'u2'))
    else:
      dtype = np.dtype(_TORCH_STORAGES[self.name]).newbyteorder(order)
      self.array = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder('='))


class Tensor(NamedTuple):
  storage: _TorchStorage
  offset: int
  size: Tuple[int, ...]
  stride: Tuple[int, ...]

  def numpy(self) -> np.ndarray:
    data = self.storage.array
    size, stride = tuple(int(s) for s in self.size), tuple(int(s) for s in self.stride)
    if data is None:
      raise ValueError(f'storage {self.storage.key!r} has no data')
    if len(size) != len(stride) or min(size + stride, default=0) < 0:
      raise ValueError(f'tensor of size {size} and stride {stride}')
    last = self.offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else -1
    if self.offset < 0 or last >= data.size:
      raise ValueError(f'tensor of size {size}, stride {stride} at offset {self.offset} runs '
                       f'past its storage of {data.size} elements (truncated or corrupt)')
    view = np.lib.stride_tricks.as_strided(
        data[self.offset:], size, tuple(s * data.itemsize for s in stride), writeable=False)
    return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor(_v2): requires_grad, hooks and metadata do not matter here."""
  if not isinstance(storage, _TorchStorage):
    raise ValueError('a tensor without a storage')
  return Tensor(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
  """torch._utils._rebuild_parameter(_with_state): an nn.Parameter is its tensor here."""
  return data


_TORCH_GLOBALS = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    **{('torch', name): _TorchStorageType(name) for name in _TORCH_STORAGES},
}


class _TorchUnpickler(pickle.Unpickler):
  """Admits only the globals of a state dict; storages are collected for their bytes."""

  def __init__(self, handle, storages: Dict[str, _TorchStorage]):
    super().__init__(handle)
    self.storages = storages

  def find_class(self, module, name):
    if (module, name) not in _TORCH_GLOBALS:
      raise pickle.UnpicklingError(
          f'the pickle names {module}.{name}, which is refused (only tensors, parameters and '
          'state dicts are read without torch)')
    return _TORCH_GLOBALS[(module, name)]

  def persistent_load(self, pid):
    # ('storage', type, key, location, numel) in a zip; the legacy format adds view_metadata
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == 'storage'):
      raise pickle.UnpicklingError(f'unknown persistent id {str(pid)[:80]}')
    if len(pid) == 6 and pid[5] is not None:
      raise pickle.UnpicklingError('storage views (torch < 1.0 legacy files) are not read')
    _, storage_type, key, _, numel = pid[:5]
    key = str(key)
    if key not in self.storages:
      self.storages[key] = _TorchStorage(storage_type, key, numel)
    return self.storages[key]


def _torch_zip_state(path: str):
  """(unpickled object, storages) of a zip-format torch.save file, storages filled."""
  storages: Dict[str, _TorchStorage] = {}
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [name for name in names if name.endswith('data.pkl')]
    prefix = pickles[0][:-len('data.pkl')]
    little = True
    if prefix + 'byteorder' in names:
      little = archive.read(prefix + 'byteorder').decode().strip() != 'big'
    with archive.open(pickles[0]) as handle:
      state = _TorchUnpickler(handle, storages).load()
    for key, storage in storages.items():
      storage.attach(archive.read(f'{prefix}data/{key}'), little)
  return state


def _torch_legacy_state(path: str):
  """The legacy (non-zip) torch.save format: magic, protocol, sys_info, the object, the storage
  keys, then each storage as an int64 element count and its bytes."""
  storages: Dict[str, _TorchStorage] = {}
  with open(path, 'rb') as handle:
    header = [_TorchUnpickler(handle, {}).load() for _ in range(3)]
    if header[0] != _TORCH_LEGACY_MAGIC or header[1] != _TORCH_LEGACY_PROTOCOL:
      raise ValueError('not a torch.save file (no legacy magic number)')
    little = bool(header[2].get('little_endian', True)) if isinstance(header[2], dict) else True
    state = _TorchUnpickler(handle, storages).load()
    keys = _TorchUnpickler(handle, {}).load()
    for key in keys:
      storage = storages[str(key)]
      (numel,) = struct.unpack('<q' if little else '>q', handle.read(8))
      if numel != storage.numel:
        raise ValueError(f'storage {key!r} holds {numel} elements, the pickle says {storage.numel}')
      storage.attach(handle.read(numel * storage.itemsize), little)
  return state




def read(path: str):
  """torch.save's object (zip or legacy file) with `Tensor` leaves, storages filled."""
  return (_torch_zip_state if zipfile.is_zipfile(path) else _torch_legacy_state)(path)


READ_ERRORS = (pickle.UnpicklingError, ValueError, KeyError, IndexError, TypeError,
                      EOFError, AttributeError, struct.error, zipfile.BadZipFile, OSError)
