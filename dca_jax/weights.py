"""Import of pretrained ViT / DeiT / R50+ViT weights into our Flax parameter tree.

Three source layouts are understood (see docs/WEIGHTS.md for the full mapping):

- Google ViT / AugReg `.npz` (`ViT-B_16.npz`, `R50+ViT-B_16.npz`, AugReg `*.npz`): Flax names
  (`Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/query/kernel` (D, heads, hd), ...,
  `embedding/kernel` HWIO, `cls`, `Transformer/posembed_input/pos_embedding` with the CLS slot,
  hybrid stem `conv_root`, `gn_root`, `block{s}/unit{u}/...`).
- timm / DeiT PyTorch state dicts (`.safetensors`, `.pth`, `.pt`, `.bin`):
  `blocks.{i}.attn.qkv.weight`
  (3D, D), `patch_embed.proj.weight` OIHW, `cls_token`, `pos_embed`, hybrid
  `patch_embed.backbone.stem.conv.weight`, `patch_embed.backbone.stages.{s}.blocks.{u}....`.
- A dca_jax run (a directory: its `--workdir`, its `checkpoints/` folder or one step folder):
  the `params` of its newest intact checkpoint, already in our names. The backbone and the GLCA
  block are loaded, the task's heads and necks are not (fine-tuning from your own pretraining
  or from a run on another set).

`load_pretrained` runs five steps, one function each: read the file (`read_checkpoint`), detect
the layout (`_detect_layout`), convert to our names (`_convert_checkpoint`: `embed/...`,
`block_{i}/...`, `norm`, `head`, see `dca_jax/models/vit.py` and `dca_jax/models/resnet.py`),
merge strictly into the target tree (`_merge_into_params`: every target parameter is loaded or
listed as newly initialised, shape mismatches raise, `pos_embed`'s grid is resized to the model's,
square or not) and build the report (`_build_report`: unused checkpoint keys with reasons).

Only numpy is needed for files (a run directory is read with Orbax, imported then): safetensors'
format and torch.save's (`.pth`, through a pickle reader that
admits only tensors and state dicts) are parsed here; torch.load is used where torch is installed.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pickle
import re
import struct
import zipfile
from typing import (Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Set,
                    Tuple, Union)

import numpy as np

PathLike = Union[str, os.PathLike]
Path = Tuple[str, ...]
Grid = Union[int, Tuple[int, int]]


class WeightLoadError(ValueError):
  """A checkpoint could not be read or does not fit the model (one clear line)."""


# --------------------------------------------------------------------------------------------
# Step 1: read the file
# --------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'I64': np.int64, 'I32': np.int32,
    'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}


def _bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
  """bfloat16 bit patterns (uint16) -> float32: they are float32's upper 16 bits."""
  return (raw.astype(np.uint32) << 16).view(np.float32)


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
    array = _bfloat16_to_float32(np.frombuffer(buffer, dtype='<u2'))
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


# --- PyTorch checkpoints without torch ------------------------------------------------------
# torch.save writes a pickle whose tensors are `torch._utils._rebuild_tensor_v2(storage, offset,
# size, stride, ...)` calls on storages named by persistent ids; the bytes of each storage live
# in the zip (`<archive>/data/<key>`, torch >= 1.6) or follow the pickle (the legacy format).
# The unpickler below admits only those globals (as torch.load(weights_only=True) does), so a
# JAX user reads DeiT's official .pth without installing torch, and a pickle that names any
# other code is refused before it runs.

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
      self.array = _bfloat16_to_float32(np.frombuffer(raw, dtype=order + 'u2'))
    else:
      dtype = np.dtype(_TORCH_STORAGES[self.name]).newbyteorder(order)
      self.array = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder('='))


class _TorchTensor(NamedTuple):
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
  return _TorchTensor(storage, int(offset), tuple(size), tuple(stride))


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




def _read_torch_without_torch(path: str):
  """torch.save's object (zip or legacy file) with `_TorchTensor` leaves, storages filled."""
  return (_torch_zip_state if zipfile.is_zipfile(path) else _torch_legacy_state)(path)


_TORCH_READ_ERRORS = (pickle.UnpicklingError, ValueError, KeyError, IndexError, TypeError,
                      EOFError, AttributeError, struct.error, zipfile.BadZipFile, OSError)


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
      state = _read_torch_without_torch(path)
    else:
      state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as error:  # pylint: disable=broad-except
    if torch is None and not isinstance(error, _TORCH_READ_ERRORS):
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
    if isinstance(tensor, _TorchTensor):
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
    return read_run(path)
  if not os.path.isfile(path):
    raise WeightLoadError(f'{path}: no such checkpoint file')
  with open(path, 'rb') as handle:
    head = handle.read(16)
  if not head:
    raise WeightLoadError(f'{path}: empty file')
  reader = {'npz': _read_npz, 'safetensors': _read_safetensors,
            'torch': _read_torch}[_sniff_format(path, head)]
  return reader(path)


RUN_PREFIX = 'params/'


def _run_step_dir(path: str) -> str:
  """The step folder that `path` (a workdir, its checkpoints/ folder or a step folder) means:
  for a run, its newest intact (sealed, files matching their record) step."""
  from dca_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, 'state')):
    sealed, why = ckpt_lib.verify_integrity(path)
    if sealed is False:
      raise WeightLoadError(f'{path}: damaged checkpoint ({why})')
    return path
  workdir = os.path.dirname(path) if os.path.basename(path) == 'checkpoints' else path
  if not os.path.isdir(ckpt_lib.checkpoint_dir(workdir)):
    raise WeightLoadError(f'{path}: a directory, but not a dca_jax run (no checkpoints/ folder '
                          'nor a step folder with state/)')
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    step = checkpointer.newest_intact_step('latest')
  except ckpt_lib.CheckpointError as e:
    raise WeightLoadError(f'{path}: {e}') from None
  finally:
    checkpointer.close()
  if step is None:
    raise WeightLoadError(f'{path}: the run has no intact checkpoint')
  return os.path.join(ckpt_lib.checkpoint_dir(workdir), str(step))


def read_run(path: PathLike) -> Dict[str, np.ndarray]:
  """The `params` of a dca_jax run's checkpoint as a flat {'params/<our path>': array} dict
  (host numpy, whatever mesh saved it); the optimizer state is not read."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from dca_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  step_dir = _run_step_dir(os.fspath(path))
  state_dir = os.path.join(step_dir, 'state')
  # The state item has no step-level metadata file of its own (the step has): Orbax says so.
  quiet = ckpt_lib._DropMessage('Metadata file does not exist')  # pylint: disable=protected-access
  logging.get_absl_logger().addFilter(quiet)
  try:
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(state_dir).item_metadata.tree
    params = tree['params']
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item={'params': jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), params)},
        restore_args={'params': jax.tree.map(
            lambda m: ocp.RestoreArgs(restore_type=np.ndarray), params)},
        partial_restore=True))['params']
  except Exception as e:  # pylint: disable=broad-except  (Orbax raises many types)
    first = (str(e).strip().splitlines() or [''])[0][:200]
    raise WeightLoadError(f'{step_dir}: cannot read its params: {type(e).__name__}: '
                          f'{first}') from None
  finally:
    logging.get_absl_logger().removeFilter(quiet)
  flat = jax.tree_util.tree_flatten_with_path(restored)[0]
  return {RUN_PREFIX + '/'.join(str(k.key) for k in keys): np.asarray(value)
          for keys, value in flat}


# --------------------------------------------------------------------------------------------
# Position-embedding resize (used by step 4)
# --------------------------------------------------------------------------------------------

POSEMB_METHODS = ('bicubic', 'bilinear')


def _cubic_antialias_kernel(distance: np.ndarray, a: float = -0.5) -> np.ndarray:
  """PIL's / ATen's antialiasing cubic filter (a = -0.5, support 2)."""
  distance = np.abs(distance)
  return np.where(distance < 1.0,
                  ((a + 2.0) * distance - (a + 3.0)) * distance * distance + 1.0,
                  np.where(distance < 2.0,
                           (((distance - 5.0) * distance + 8.0) * distance - 4.0) * a, 0.0))


def _bicubic_antialias_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of PyTorch's `interpolate(mode='bicubic', antialias=True,
  align_corners=False)` (ATen `_upsample_bicubic2d_aa`, PIL's filter: a = -0.5, support 2
  widened by the scale when shrinking, window clipped at the border and renormalised)."""
  scale = n_in / n_out
  support = 2.0 * scale if scale >= 1.0 else 2.0
  inverse_scale = 1.0 / scale if scale >= 1.0 else 1.0
  matrix = np.zeros((n_out, n_in), np.float64)
  for out_index in range(n_out):
    center = scale * (out_index + 0.5)
    first = max(int(center - support + 0.5), 0)  # C++ static_cast truncation (argument >= -0.5)
    stop = min(int(center + support + 0.5), n_in)
    inputs = np.arange(first, stop)
    taps = _cubic_antialias_kernel((inputs - center + 0.5) * inverse_scale)
    total = taps.sum()
    matrix[out_index, first:stop] = taps / total if total != 0 else taps
  return matrix


def _linear_align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of `scipy.ndimage.zoom(order=1)` (grid_mode=False: the corner samples
  are aligned, output o reads input o * (n_in - 1) / (n_out - 1))."""
  matrix = np.zeros((n_out, n_in), np.float64)
  if n_out == 1 or n_in == 1:
    matrix[:, 0] = 1.0
    return matrix
  position = np.arange(n_out) * ((n_in - 1) / (n_out - 1))
  below = np.clip(np.floor(position).astype(int), 0, n_in - 1)
  above = np.minimum(below + 1, n_in - 1)
  fraction = position - below
  matrix[np.arange(n_out), below] += 1.0 - fraction
  matrix[np.arange(n_out), above] += fraction
  return matrix


def _grid_height_width(grid: Grid) -> Tuple[int, int]:
  """(height, width) of a grid given as one side (square) or as (height, width)."""
  if isinstance(grid, (int, np.integer)):
    height = width = int(grid)
  else:
    height, width = (int(side) for side in grid)
  if height < 1 or width < 1:
    raise ValueError(f'grid must be positive, got {grid}')
  return height, width


def _square_side(num_tokens: int) -> Optional[int]:
  """g when num_tokens = g * g, else None."""
  side = int(round(math.sqrt(num_tokens)))
  return side if side * side == num_tokens else None


def resize_posemb(posemb: np.ndarray, new_grid: Grid, method: str = 'bicubic',
                  num_prefix_tokens: int = 1) -> np.ndarray:
  """Resizes a [1, prefix + g*g, D] position embedding to a new grid, square or not.

  `new_grid` is one side (square) or (height, width), e.g. (16, 8) for 256x128 Re-ID inputs at
  patch 16. The prefix (CLS) slots are kept as they are; only the square grid part is resampled,
  rows and columns separably:
  - 'bicubic': numerically timm's `resample_abs_pos_embed(new_size=(height, width))` (what
    `checkpoint_filter_fn` uses): `F.interpolate(mode='bicubic', antialias=True,
    align_corners=False)`, i.e. PyTorch's antialiased (PIL-style, a = -0.5) bicubic — *not* the
    a = -0.75 non-antialiased kernel.
  - 'bilinear': the original ViT code (`vit_jax/checkpoint.py`): `scipy.ndimage.zoom(order=1)`
    with zoom (height / g, width / g), bilinear with aligned corners.
  Computed in float64, returned in the input dtype.
  """
  if method not in POSEMB_METHODS:
    raise ValueError(f'unknown posemb interpolation {method!r}; use one of {POSEMB_METHODS}')
  new_height, new_width = _grid_height_width(new_grid)
  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f'posemb must be [1, tokens, D], got {posemb.shape}')
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
  old_side = _square_side(grid.shape[0])
  if old_side is None:
    raise ValueError(f'posemb grid of {grid.shape[0]} tokens is not square')
  if (old_side, old_side) == (new_height, new_width):
    return posemb.copy()
  make_matrix = _bicubic_antialias_matrix if method == 'bicubic' else _linear_align_corners_matrix
  rows = make_matrix(old_side, new_height)
  columns = make_matrix(old_side, new_width)
  table = grid.reshape(old_side, old_side, -1).astype(np.float64)
  table = np.einsum('hi,ijd->hjd', rows, table)
  table = np.einsum('wj,hjd->hwd', columns, table)
  table = table.reshape(1, new_height * new_width, -1).astype(posemb.dtype)
  return np.concatenate([prefix, table], axis=1)


# --------------------------------------------------------------------------------------------
# Step 2: detect the layout
# --------------------------------------------------------------------------------------------

_GOOGLE_PREFIXES = ('opt/target/', 'params/', 'model/')
_TIMM_PREFIXES = ('module.', 'model.')


class _Layout(NamedTuple):
  """Which naming a checkpoint uses, and the prefix its keys carry."""
  name: str    # 'google_npz', 'timm' or 'dca_jax'
  prefix: str  # e.g. 'opt/target/' or 'module.'; '' when none


def _detect_layout(checkpoint: Mapping[str, np.ndarray], path: str) -> _Layout:
  """The layout from the keys; an unknown one raises WeightLoadError."""
  for prefix in ('',) + _GOOGLE_PREFIXES:
    if f'{prefix}embedding/kernel' in checkpoint:
      return _Layout('google_npz', prefix)
  for prefix in ('',) + _TIMM_PREFIXES:
    if f'{prefix}patch_embed.proj.weight' in checkpoint or f'{prefix}cls_token' in checkpoint:
      return _Layout('timm', prefix)
  if f'{RUN_PREFIX}embed/pos_embed' in checkpoint:
    return _Layout('dca_jax', RUN_PREFIX)
  first = ', '.join(sorted(checkpoint)[:5])
  raise WeightLoadError(
      f'{path}: unrecognised checkpoint layout (no `embedding/kernel` (Google npz) nor '
      f'`patch_embed.proj.weight`/`cls_token` (timm) key); first keys: {first}')


# --------------------------------------------------------------------------------------------
# Step 3: convert to our parameter names
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Entry:
  """One of our parameters as the checkpoint gives it (before the merge's shape checks)."""
  value: np.ndarray
  sources: Tuple[str, ...]  # the checkpoint key(s) it came from
  note: str = ''            # the conversion applied, for error messages


@dataclasses.dataclass
class _Converted:
  """A checkpoint in our names."""
  entries: Dict[Path, _Entry]
  unknown: List[str]           # checkpoint keys (full) that no conversion rule took
  num_prefix_tokens: int = 1   # 2 for a distilled DeiT: its pos_embed is [cls, dist, grid]


class _KeyCollector:
  """Moves checkpoint keys (prefix stripped) to our paths, remembering which keys were taken."""

  def __init__(self, checkpoint: Mapping[str, np.ndarray], prefix: str):
    self.prefix = prefix
    self.weights = {key[len(prefix):]: value for key, value in checkpoint.items()
                    if key.startswith(prefix)}
    self.outside_prefix = [key for key in checkpoint if not key.startswith(prefix)]
    self.taken: Set[str] = set()
    self.entries: Dict[Path, _Entry] = {}

  def has(self, *keys: str) -> bool:
    return all(key in self.weights for key in keys)

  def put(self, ours: str, key: str, convert: Optional[Callable] = None, note: str = ''):
    """Our '/'-joined path <- one checkpoint key (converted), if the checkpoint has it."""
    if self.has(key):
      value = self.weights[key]
      self._add(ours, [key], convert(value) if convert else value, note)

  def put_joined(self, ours: str, keys: Sequence[str], join: Callable, note: str = ''):
    """Our path <- several checkpoint keys joined into one array, if the checkpoint has all."""
    if self.has(*keys):
      self._add(ours, keys, join([self.weights[key] for key in keys]), note)

  def _add(self, ours: str, keys: Sequence[str], value: np.ndarray, note: str):
    self.taken.update(keys)
    self.entries[tuple(ours.split('/'))] = _Entry(
        value, tuple(self.prefix + key for key in keys), note)

  def unknown(self) -> List[str]:
    return self.outside_prefix + [self.prefix + key for key in self.weights
                                  if key not in self.taken]


def _flatten_norm(value: np.ndarray) -> np.ndarray:
  # Old flax GroupNorm/LayerNorm params may be stored as (1, 1, 1, C).
  return value.reshape(-1) if value.ndim > 1 else value


def _oihw_to_hwio(value: np.ndarray) -> np.ndarray:
  return np.transpose(value, (2, 3, 1, 0))


def _transpose(value: np.ndarray) -> np.ndarray:
  return value.T  # PyTorch Linear (out, in) -> Dense kernel (in, out)


def _block_indices(keys, pattern: str) -> List[int]:
  """Sorted block numbers i of the keys matching `pattern` (its group 1)."""
  return sorted({int(match.group(1)) for key in keys for match in [re.match(pattern, key)]
                 if match})


def _convert_google_block(keys: _KeyCollector, index: int, num_heads: int, path: str):
  """Transformer/encoderblock_{index}/... -> block_{index}/...; checks the npz head count."""
  source, ours = f'Transformer/encoderblock_{index}/', f'block_{index}/'
  attention = source + 'MultiHeadDotProductAttention_1/'
  for layer_norm, norm in (('LayerNorm_0', 'norm1'), ('LayerNorm_2', 'norm2')):
    for name in ('scale', 'bias'):
      keys.put(f'{ours}{norm}/{name}', f'{source}{layer_norm}/{name}', _flatten_norm)
  for dense in range(2):
    for name in ('kernel', 'bias'):
      keys.put(f'{ours}mlp/fc{dense + 1}/{name}', f'{source}MlpBlock_3/Dense_{dense}/{name}')
  qkv_kernels = [f'{attention}{name}/kernel' for name in ('query', 'key', 'value')]
  qkv_biases = [f'{attention}{name}/bias' for name in ('query', 'key', 'value')]
  query_kernel = keys.weights.get(qkv_kernels[0])
  if (keys.has(*qkv_kernels) and query_kernel.ndim == 3
      and query_kernel.shape[1] != num_heads):
    raise WeightLoadError(
        f'{path}: {keys.prefix}{qkv_kernels[0]} has {query_kernel.shape[1]} heads but the model '
        f'has num_heads={num_heads}')
  keys.put_joined(
      f'{ours}attn/qkv/kernel', qkv_kernels,
      lambda kernels: np.concatenate([kernel.reshape(kernel.shape[0], -1) for kernel in kernels],
                                     axis=1),
      'query|key|value (D, heads, hd) -> (D, 3D)')
  keys.put_joined(f'{ours}attn/qkv/bias', qkv_biases,
                  lambda biases: np.concatenate([bias.reshape(-1) for bias in biases]))
  keys.put(f'{ours}attn/proj/kernel', f'{attention}out/kernel',
           lambda kernel: kernel.reshape(-1, kernel.shape[-1]), '(heads, hd, D) -> (D, D)')
  keys.put(f'{ours}attn/proj/bias', f'{attention}out/bias')


def _convert_google(keys: _KeyCollector, num_heads: int, path: str):
  """Google/AugReg npz -> our paths."""
  keys.put('embed/patch_embed/kernel', 'embedding/kernel')
  keys.put('embed/patch_embed/bias', 'embedding/bias')
  keys.put('embed/cls_token', 'cls')
  keys.put('embed/pos_embed', 'Transformer/posembed_input/pos_embedding')
  keys.put('norm/scale', 'Transformer/encoder_norm/scale')
  keys.put('norm/bias', 'Transformer/encoder_norm/bias')
  keys.put('head/kernel', 'head/kernel')
  keys.put('head/bias', 'head/bias')
  # Hybrid ResNet stem: top-level in vit_jax; some re-exports nest it under `embedding/`.
  for key in list(keys.weights):
    if re.match(r'^(embedding/)?(conv_root|gn_root|block\d+/unit\d+)/', key):
      relative = key[len('embedding/'):] if key.startswith('embedding/') else key
      is_norm = relative.split('/')[-2].startswith('gn')
      keys.put('embed/stem/' + relative, key, _flatten_norm if is_norm else None)
  for index in _block_indices(keys.weights, r'^Transformer/encoderblock_(\d+)/'):
    _convert_google_block(keys, index, num_heads, path)


def _convert_timm_stem_unit(keys: _KeyCollector, key: str):
  """patch_embed.backbone.stages.{s}.blocks.{u}.* -> embed/stem/block{s+1}/unit{u+1}/*."""
  match = re.match(r'^patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.(.+)$', key)
  if not match:
    return
  stage, unit, rest = int(match.group(1)), int(match.group(2)), match.group(3)
  ours = f'embed/stem/block{stage + 1}/unit{unit + 1}/'
  conv = re.match(r'^conv(\d)\.weight$', rest)
  norm = re.match(r'^norm(\d)\.(weight|bias)$', rest)
  if conv:
    keys.put(ours + f'conv{conv.group(1)}/kernel', key, _oihw_to_hwio, 'OIHW -> HWIO')
  elif norm:
    keys.put(ours + f'gn{norm.group(1)}/' + ('scale' if norm.group(2) == 'weight' else 'bias'),
             key)
  elif rest == 'downsample.conv.weight':
    keys.put(ours + 'conv_proj/kernel', key, _oihw_to_hwio, 'OIHW -> HWIO')
  elif rest in ('downsample.norm.weight', 'downsample.norm.bias'):
    keys.put(ours + 'gn_proj/' + ('scale' if rest.endswith('weight') else 'bias'), key)


def _convert_timm(keys: _KeyCollector):
  """timm/DeiT state dict -> our paths."""
  keys.put('embed/patch_embed/kernel', 'patch_embed.proj.weight', _oihw_to_hwio, 'OIHW -> HWIO')
  keys.put('embed/patch_embed/bias', 'patch_embed.proj.bias')
  keys.put('embed/cls_token', 'cls_token')
  keys.put('embed/reg_token', 'reg_token')        # DINOv2 reg4: [1, registers, D]
  keys.put('embed/pos_embed', 'pos_embed')
  keys.put('embed/norm_pre/scale', 'norm_pre.weight')  # CLIP's pre-norm
  keys.put('embed/norm_pre/bias', 'norm_pre.bias')
  keys.put('norm/scale', 'norm.weight')
  keys.put('norm/bias', 'norm.bias')
  keys.put('head/kernel', 'head.weight', _transpose, 'transposed')
  keys.put('head/bias', 'head.bias')
  stem = 'patch_embed.backbone.stem.'
  keys.put('embed/stem/conv_root/kernel', stem + 'conv.weight', _oihw_to_hwio, 'OIHW -> HWIO')
  keys.put('embed/stem/gn_root/scale', stem + 'norm.weight')
  keys.put('embed/stem/gn_root/bias', stem + 'norm.bias')
  for key in list(keys.weights):
    _convert_timm_stem_unit(keys, key)
  for index in _block_indices(keys.weights, r'^blocks\.(\d+)\.'):
    source, ours = f'blocks.{index}.', f'block_{index}/'
    for norm in ('norm1', 'norm2'):
      keys.put(f'{ours}{norm}/scale', f'{source}{norm}.weight')
      keys.put(f'{ours}{norm}/bias', f'{source}{norm}.bias')
    for linear in ('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2'):
      module = linear.replace('.', '/')
      keys.put(f'{ours}{module}/kernel', f'{source}{linear}.weight', _transpose, 'transposed')
      keys.put(f'{ours}{module}/bias', f'{source}{linear}.bias')
    for scale in ('ls1', 'ls2'):  # layer scale (DINOv2, DeiT-III)
      keys.put(f'{ours}{scale}/gamma', f'{source}{scale}.gamma')


def _convert_run(keys: _KeyCollector):
  """A dca_jax run's params are in our names already: its backbone and GLCA block are taken;
  its heads and necks (another task's label space) stay behind as unused."""
  for key in list(keys.weights):
    top = key.split('/')[0]
    if top in ('embed', 'norm', 'glca_block') or re.fullmatch(r'block_\d+', top):
      keys.put(key, key)


def _convert_checkpoint(checkpoint: Mapping[str, np.ndarray], layout: _Layout, vit_config,
                        path: str) -> _Converted:
  """Checkpoint keys -> our '/'-paths (values converted: transposes, qkv joined, ...)."""
  keys = _KeyCollector(checkpoint, layout.prefix)
  if layout.name == 'google_npz':
    _convert_google(keys, vit_config.num_heads, path)
  elif layout.name == 'dca_jax':
    _convert_run(keys)
  else:
    _convert_timm(keys)
  # DeiT distilled: pos_embed holds [cls, dist, grid]; the merge keeps cls and the grid. A
  # no_embed_class model (DINOv2 reg4) has a table of the grid alone, as its checkpoints do.
  distilled = layout.name == 'timm' and keys.has('dist_token')
  prefix = 0 if getattr(vit_config, 'no_embed_class', False) else 2 if distilled else 1
  return _Converted(keys.entries, keys.unknown(), num_prefix_tokens=prefix)


def _apply_family_filters(checkpoint: Dict[str, np.ndarray],
                          path: str) -> Tuple[Dict[str, np.ndarray], Optional[str]]:
  """A family's native layout (Meta's DINOv2, OpenAI's CLIP) -> timm's, by the family's
  `checkpoint_filter` (dca_jax/backbones/); (checkpoint, family name or None)."""
  from dca_jax import backbones  # pylint: disable=g-import-not-at-top
  for family, checkpoint_filter in backbones.checkpoint_filters():
    try:
      converted = checkpoint_filter(checkpoint)
    except ValueError as error:
      raise WeightLoadError(f'{path}: {error}') from None
    if converted is not None:
      return {key: np.asarray(value) for key, value in converted.items()}, family
  return checkpoint, None


# Checkpoint features our backbone does not implement: loading around them would silently give a
# different network, so they are refused (strict) rather than just reported.
_UNSUPPORTED = [
    (re.compile(r'gamma_[12]$'), 'CaiT-style layer scale (gamma_1/gamma_2)'),
    (re.compile(r'(^|\.)(q_norm|k_norm)\.'), 'q/k normalisation'),
    (re.compile(r'^fc_norm\.'), 'global-pool fc_norm'),
    (re.compile(r'^attn_pool\.|^MAPHead_0/'), 'attention-pool (MAP) head'),
]

# Features the backbone implements but the model's ViTConfig may have switched off: a
# checkpoint entry of one that finds no target leaf means the configured backbone is another
# network than the checkpoint's (e.g. DINOv2 weights into `deit_small`), refused when strict.
_OPTIONAL_FEATURES = [
    (re.compile(r'^block_\d+/ls[12]/'), 'layer scale (ls1/ls2.gamma)', 'layer_scale'),
    (re.compile(r'^embed/reg_token$'), 'register tokens (reg_token)', 'num_registers'),
    (re.compile(r'^embed/norm_pre/'), 'a pre-norm (norm_pre)', 'pre_norm'),
]


def _refuse_features_the_model_lacks(converted: '_Converted', targets: Set[Path], path: str):
  """Strict mode: a checkpoint entry of a feature the configured backbone has switched off
  (`targets`: the model's leaf paths; a block beyond its depth is reported, not refused). Run
  before the merge, whose shape errors (e.g. a position table without a CLS slot) would hide
  the reason."""
  modules = {target[0] for target in targets}
  for source, entry in converted.entries.items():
    if source in targets or source[0] not in modules:
      continue
    for pattern, feature, field in _OPTIONAL_FEATURES:
      if pattern.search('/'.join(source)):
        raise WeightLoadError(
            f'{path}: checkpoint uses {feature} ({entry.sources[0]}) but the backbone config has '
            f'no {field}: pick the backbone these weights are for (dca_jax/backbones/, e.g. a '
            'dinov2_* or clip_* one), or pass strict=False to load around it')


def _without_prefix(key: str, prefix: str) -> str:
  return key[len(prefix):] if key.startswith(prefix) else key


def _refuse_unsupported_features(unknown: Sequence[str], prefix: str, path: str):
  """Raises for the first checkpoint key of a feature our backbone lacks (strict mode)."""
  for key in unknown:
    for pattern, feature in _UNSUPPORTED:
      if pattern.search(_without_prefix(key, prefix)):
        raise WeightLoadError(f'{path}: checkpoint uses {feature} ({key}), which this backbone '
                              'does not implement (pass strict=False to load around it)')


# --------------------------------------------------------------------------------------------
# Step 4: merge into the target tree (shape checks, position-embedding resize)
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Merged:
  """What the merge did, leaf by leaf ('/'-joined names, in the target tree's order)."""
  values: Dict[Path, np.ndarray] = dataclasses.field(default_factory=dict)  # loaded leaves
  loaded: List[str] = dataclasses.field(default_factory=list)
  newly_initialized: List[str] = dataclasses.field(default_factory=list)
  missing: List[str] = dataclasses.field(default_factory=list)  # needed, not in the checkpoint
  used_sources: Set[Path] = dataclasses.field(default_factory=set)  # entries that were loaded
  notes: List[str] = dataclasses.field(default_factory=list)


def _flatten(tree: Mapping[str, Any], prefix: Path = ()) -> Dict[Path, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix + (str(key),)))
    else:
      flat[prefix + (str(key),)] = value
  return flat


def _rebuild(tree: Mapping[str, Any], values: Mapping[Path, Any],
             prefix: Path = ()) -> Dict[str, Any]:
  """A new nested dict shaped like `tree`, with `values` in place of those leaves."""
  out = {}
  for key, value in tree.items():
    here = prefix + (str(key),)
    out[key] = (_rebuild(value, values, here) if isinstance(value, Mapping)
                else values.get(here, value))
  return out


def _replace_leaves(params: Mapping[str, Any], values: Mapping[Path, Any]):
  """`params` with `values` swapped in, as a new tree (FrozenDict in -> FrozenDict out)."""
  rebuilt = _rebuild(params, values)
  if not isinstance(params, dict) and hasattr(params, 'unfreeze'):
    return type(params)(rebuilt)
  return rebuilt


def _is_backbone(path: Path) -> bool:
  return path[0] in ('embed', 'norm') or re.fullmatch(r'block_\d+', path[0]) is not None


def _target_grid(num_tokens: int, grid_hw: Optional[Tuple[int, int]], checkpoint_shape,
                 target_shape, sources: str, path: str) -> Tuple[int, int]:
  """The model's (height, width) patch grid: grid_hw, or the square its token count makes."""
  if grid_hw is not None:
    if grid_hw[0] * grid_hw[1] != num_tokens:
      raise WeightLoadError(
          f'{path}: grid_hw={tuple(grid_hw)} gives {grid_hw[0] * grid_hw[1]} patches but the '
          f"model's embed/pos_embed {target_shape} holds {num_tokens}")
    return tuple(grid_hw)
  side = _square_side(num_tokens)
  if side is None:
    raise WeightLoadError(
        f'{path}: cannot resize embed/pos_embed: checkpoint {sources} gives {checkpoint_shape}, '
        f'the model expects {target_shape}, whose {num_tokens} patches are no square grid '
        f'(pass grid_hw=(height, width))')
  return side, side


def _fit_posemb(value: np.ndarray, target_shape: Tuple[int, ...], entry: _Entry,
                num_prefix_tokens: int, method: str, grid_hw: Optional[Tuple[int, int]],
                path: str) -> Tuple[np.ndarray, Optional[str]]:
  """The checkpoint's pos_embed on the model's grid: (value, a note when it was resized).

  The CLS slot is kept, a distilled DeiT's dist slot dropped, the checkpoint's square grid
  resampled to the model's (height, width) when they differ. `num_prefix_tokens` 0: a table
  of the grid alone (timm `no_embed_class`, DINOv2 reg4), model and checkpoint alike.
  """
  sources = '+'.join(entry.sources)
  if value.ndim == 2:
    value = value[None]
  if value.ndim != 3 or len(target_shape) != 3 or value.shape[-1] != target_shape[-1]:
    raise WeightLoadError(f'{path}: shape mismatch for embed/pos_embed: checkpoint {sources} '
                          f'gives {value.shape}, the model expects {target_shape}')
  if num_prefix_tokens == 2:
    value = np.concatenate([value[:, :1], value[:, 2:]], axis=1)  # drop the dist slot
  prefix = min(num_prefix_tokens, 1)  # the CLS slot, when the table has one
  if grid_hw is None and value.shape == target_shape:
    return value, None  # same grid (square or not, e.g. a Re-ID checkpoint): nothing to resize
  height, width = _target_grid(target_shape[1] - prefix, grid_hw, value.shape, target_shape,
                               sources, path)
  old_side = _square_side(value.shape[1] - prefix)
  if old_side is None and value.shape == target_shape:
    return value, None  # a non-square checkpoint grid of the model's size: taken as the same grid
  if old_side is None:
    raise WeightLoadError(
        f'{path}: cannot resize embed/pos_embed: checkpoint {sources} gives {value.shape}, whose '
        f'{value.shape[1] - prefix} patches are no square grid; the model expects {target_shape}')
  if (old_side, old_side) == (height, width):
    return value, None
  note = (f'embed/pos_embed grid resized {old_side}x{old_side} -> {height}x{width} '
          f'({method})')
  return resize_posemb(value, (height, width), method, num_prefix_tokens=prefix), note


def _loaded_value(entry: _Entry, name: str, source: Path, leaf, converted: _Converted,
                  merged: _Merged, *, posemb_interpolation: str,
                  grid_hw: Optional[Tuple[int, int]], path: str) -> np.ndarray:
  """The entry's value for one target leaf: pos_embed fitted, shape checked, leaf dtype."""
  value = np.asarray(entry.value)
  target_shape = tuple(leaf.shape)
  if source == ('embed', 'pos_embed'):
    value, note = _fit_posemb(value, target_shape, entry, converted.num_prefix_tokens,
                              posemb_interpolation, grid_hw, path)
    if note:
      merged.notes.append(note)
  if value.shape != target_shape:
    how = f' ({entry.note})' if entry.note else ''
    raise WeightLoadError(
        f'{path}: shape mismatch for {name}: checkpoint {"+".join(entry.sources)}{how} gives '
        f'{value.shape}, the model expects {target_shape}')
  return np.asarray(value).astype(np.dtype(leaf.dtype), copy=True)


def _merge_into_params(flat_params: Mapping[Path, Any], converted: _Converted, *,
                       heads: Sequence[str], load_head: bool, posemb_interpolation: str,
                       grid_hw: Optional[Tuple[int, int]], path: str) -> _Merged:
  """Decides every target leaf: loaded from its entry, or newly initialised (and maybe missing).

  Leaves of the modules in `heads` take the checkpoint's `head` when load_head is set.
  """
  merged = _Merged()
  for target_path, leaf in flat_params.items():
    name = '/'.join(target_path)
    is_head = target_path[0] in heads
    if is_head and not load_head:
      merged.newly_initialized.append(name)
      continue
    source = ('head',) + target_path[1:] if is_head else target_path
    entry = converted.entries.get(source)
    if entry is None:
      if is_head or _is_backbone(target_path):
        merged.missing.append(name)
      merged.newly_initialized.append(name)
      continue
    merged.values[target_path] = _loaded_value(
        entry, name, source, leaf, converted, merged,
        posemb_interpolation=posemb_interpolation, grid_hw=grid_hw, path=path)
    merged.used_sources.add(source)
    merged.loaded.append(name)
  return merged


def _raise_if_missing(missing: Sequence[str], path: str):
  """Strict mode: backbone (or routed head) parameters the checkpoint lacks are an error."""
  if missing:
    shown = ', '.join(missing[:6]) + (' ...' if len(missing) > 6 else '')
    raise WeightLoadError(
        f'{path}: checkpoint lacks {len(missing)} parameter(s) the model needs: {shown} '
        f'(pass strict=False to keep them as initialised)')


# --------------------------------------------------------------------------------------------
# Step 5: the report
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LoadReport:
  """What `load_pretrained` did. Paths are our '/'-joined parameter names; `unused` holds
  checkpoint keys (with a reason in parentheses where there is one)."""
  path: str
  layout: str
  loaded: List[str] = dataclasses.field(default_factory=list)
  newly_initialized: List[str] = dataclasses.field(default_factory=list)
  unused: List[str] = dataclasses.field(default_factory=list)
  notes: List[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    def modules(names):
      # Collapse to module level for readability: block_3/attn/qkv/kernel -> block_3/attn/qkv.
      collapsed = []
      for name in names:
        module = name.rsplit('/', 1)[0] if '/' in name else name
        if module not in collapsed:
          collapsed.append(module)
      return collapsed

    lines = [f'Loaded {len(self.loaded)} parameter arrays from {self.path} ({self.layout} layout).']
    if self.newly_initialized:
      lines.append(f'Newly initialised ({len(self.newly_initialized)}): '
                   + ', '.join(modules(self.newly_initialized)))
    if self.unused:
      lines.append(f'Unused checkpoint keys ({len(self.unused)}): ' + ', '.join(self.unused))
    lines.extend(f'Note: {note}' for note in self.notes)
    return '\n'.join(lines)


def _unused_entry_reason(source: Path, load_head: bool) -> str:
  """Why a converted entry found no target leaf ('' when there is no known reason)."""
  if source[0] == 'head' and not load_head:
    return ' (head not loaded: load_head=False)'
  if re.fullmatch(r'block_\d+', source[0]):
    return ' (block beyond the model depth)'
  if source[:2] == ('embed', 'stem'):
    return ' (ResNet stem: the model has none or fewer units)'
  return ''


def _unknown_key_reason(key: str) -> str:
  """Why a checkpoint key was not converted ('' when there is no known reason)."""
  if key == 'dist_token' or key.startswith('head_dist.'):
    return ' (DeiT distillation token/head: dropped, the CLS path is kept)'
  if key.startswith('pre_logits'):
    return ' (pre-logits representation layer: not used)'
  if key.startswith(RUN_PREFIX):
    return " (the run's task head / neck: not loaded)"
  return ''


def _build_report(path: str, layout: _Layout, converted: _Converted, merged: _Merged,
                  load_head: bool) -> LoadReport:
  """The LoadReport: loaded / newly initialised leaves, unused keys with reasons, notes."""
  report = LoadReport(path=path, layout=layout.name, loaded=list(merged.loaded),
                      newly_initialized=list(merged.newly_initialized), notes=list(merged.notes))
  for source, entry in converted.entries.items():
    if source not in merged.used_sources:
      reason = _unused_entry_reason(source, load_head)
      report.unused.extend(f'{key}{reason}' for key in entry.sources)
  for key in converted.unknown:
    report.unused.append(key + _unknown_key_reason(_without_prefix(key, layout.prefix)))
  if converted.num_prefix_tokens == 2:
    report.notes.append('distilled DeiT checkpoint: dist_token and its pos_embed slot dropped')
  return report


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------

def _check_options(posemb_interpolation: str, grid_hw) -> Optional[Tuple[int, int]]:
  """Validates the resize options; returns grid_hw as a (height, width) tuple or None."""
  if posemb_interpolation not in POSEMB_METHODS:
    raise ValueError(f'posemb_interpolation must be one of {POSEMB_METHODS}, '
                     f'got {posemb_interpolation!r}')
  if grid_hw is None:
    return None
  if isinstance(grid_hw, (int, np.integer)) or len(grid_hw) != 2:
    raise ValueError(f'grid_hw must be (height, width), got {grid_hw!r}')
  return _grid_height_width(grid_hw)


def load_pretrained(path: PathLike, params: Mapping[str, Any], vit_config, *,
                    posemb_interpolation: str = 'bicubic',
                    grid_hw: Optional[Tuple[int, int]] = None, load_head: bool = False,
                    head_name: Union[str, Sequence[str]] = 'head',
                    strict: bool = True) -> Tuple[Any, LoadReport]:
  """Loads a Google npz or timm/DeiT checkpoint into a copy of `params`.

  Args:
    path: `.npz`, `.safetensors`, `.pth`/`.pt`/`.bin` file.
    params: our parameter tree (plain nested dict or FrozenDict; the `params` collection of
      `vit.VisionTransformer` or of the DCAL model). Never modified.
    vit_config: the backbone's `ViTConfig` (used to check the npz head count).
    posemb_interpolation: 'bicubic' (timm's) or 'bilinear' (original ViT code) for resizing the
      position-embedding grid when the model's grid differs from the checkpoint's.
    grid_hw: the model's patch grid (height, width), e.g. (16, 8) for 256x128 Re-ID inputs at
      patch 16. None: square, inferred from the token count of the model's `pos_embed`.
    load_head: also load the classifier (`head`) — only for parity tests / same label space;
      otherwise every head is left as initialised (reported newly initialised).
    head_name: our head module name(s) that receive the checkpoint head when load_head=True.
    strict: a backbone parameter (`embed/*`, `block_{i}/*`, `norm/*`) missing from the checkpoint,
      a checkpoint feature we don't implement (q/k norm, ...) or one the configured backbone has
      switched off (layer scale, registers, pre-norm into e.g. `deit_small`) raises; with
      strict=False they are only reported.

  Returns:
    (new params tree of the same structure, LoadReport). Loaded leaves are host numpy arrays in
    the target leaf's dtype (put them on devices/shardings yourself); the rest are the original
    leaves, untouched.
  """
  path = os.fspath(path)
  grid_hw = _check_options(posemb_interpolation, grid_hw)
  heads = (head_name,) if isinstance(head_name, str) else tuple(head_name)
  checkpoint = read_checkpoint(path)
  checkpoint, family = _apply_family_filters(checkpoint, path)
  layout = _detect_layout(checkpoint, path)
  converted = _convert_checkpoint(checkpoint, layout, vit_config, path)
  flat_params = _flatten(params)
  if strict:
    _refuse_unsupported_features(converted.unknown, layout.prefix, path)
    _refuse_features_the_model_lacks(converted, set(flat_params), path)
  merged = _merge_into_params(flat_params, converted, heads=heads, load_head=load_head,
                              posemb_interpolation=posemb_interpolation, grid_hw=grid_hw,
                              path=path)
  if strict:
    _raise_if_missing(merged.missing, path)
  report = _build_report(path, layout, converted, merged, load_head)
  if family is not None:
    report.notes.append(f'{family} native checkpoint layout converted to timm\'s first')
  return _replace_leaves(params, merged.values), report
