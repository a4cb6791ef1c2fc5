"""Import of pretrained ViT / DeiT / R50+ViT weights into our Flax parameter tree.

Two source layouts are understood (see docs/WEIGHTS.md for the full mapping):

- Google ViT / AugReg `.npz` (`ViT-B_16.npz`, `R50+ViT-B_16.npz`, AugReg `*.npz`): Flax names
  (`Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/query/kernel` (D, heads, hd), ...,
  `embedding/kernel` HWIO, `cls`, `Transformer/posembed_input/pos_embedding` with the CLS slot,
  hybrid stem `conv_root`, `gn_root`, `block{s}/unit{u}/...`).
- timm / DeiT PyTorch state dicts (`.safetensors`, `.pth`, `.pt`, `.bin`): `blocks.{i}.attn.qkv.weight`
  (3D, D), `patch_embed.proj.weight` OIHW, `cls_token`, `pos_embed`, hybrid
  `patch_embed.backbone.stem.conv.weight`, `patch_embed.backbone.stages.{s}.blocks.{u}....`.

Both are converted to our names (`embed/...`, `block_{i}/...`, `norm`, `head`, see
`dca_jax/models/vit.py` and `dca_jax/models/resnet.py`) and merged strictly into a target tree:
every target parameter is loaded or listed as newly initialised, shape mismatches raise
(`pos_embed` excepted: its grid is resized), and unused checkpoint keys are reported.

Only numpy (and safetensors' format, parsed here) is needed; PyTorch is imported lazily for `.pth`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
import zipfile
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]
Path = Tuple[str, ...]


class WeightLoadError(ValueError):
  """A checkpoint could not be read or does not fit the model (one clear line)."""


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'I64': np.int64, 'I32': np.int32,
    'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
  return (raw.astype(np.uint32) << 16).view(np.float32)


def _sniff_format(path: str, head: bytes) -> str:
  ext = os.path.splitext(path)[1].lower()
  if head[:4] == b'PK\x03\x04' or head[:4] == b'PK\x05\x06':
    try:
      with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise WeightLoadError(f'{path}: corrupt or truncated zip archive ({e})') from None
    if any(n.endswith('.npy') for n in names) and not any(n.endswith('data.pkl') for n in names):
      return 'npz'
    if any(n.endswith('data.pkl') for n in names):
      return 'torch'
    raise WeightLoadError(f'{path}: zip archive that is neither a .npz nor a PyTorch checkpoint')
  if len(head) >= 9:
    (n,) = struct.unpack('<Q', head[:8])
    if head[8:9] == b'{' and 0 < n < 100 * 2 ** 20:
      return 'safetensors'
  if head[:1] == b'\x80' or ext in ('.pth', '.pt', '.bin'):
    return 'torch'  # legacy (non-zip) torch.save pickle; torch.load(weights_only=True) vets it
  if ext == '.safetensors':
    return 'safetensors'
  raise WeightLoadError(
      f'{path}: unknown checkpoint format (expected .npz, .safetensors or a PyTorch .pth/.pt/.bin)')


def _read_npz(path: str) -> Dict[str, np.ndarray]:
  out = {}
  try:
    with np.load(path, allow_pickle=False) as f:
      for k in f.files:
        out[k] = np.asarray(f[k])
  except ValueError as e:
    if 'pickle' in str(e).lower() or 'object arrays' in str(e).lower():
      raise WeightLoadError(
          f'{path}: npz holds pickled object arrays, which are refused (allow_pickle=False)') from None
    raise WeightLoadError(f'{path}: corrupt npz ({e})') from None
  except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
    raise WeightLoadError(f'{path}: corrupt or truncated npz ({type(e).__name__}: {e})') from None
  return out


def _read_safetensors(path: str) -> Dict[str, np.ndarray]:
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    if len(raw) < 8:
      raise ValueError('file shorter than the 8-byte header length')
    (n,) = struct.unpack('<Q', raw[:8])
    if 8 + n > size:
      raise ValueError(f'header length {n} runs past the end of the file ({size} bytes)')
    header = json.loads(raw[8:8 + n].decode('utf-8'))
    data = memoryview(raw)[8 + n:]
    out = {}
    for k, meta in header.items():
      if k == '__metadata__':
        continue
      dtype, shape, (begin, end) = meta['dtype'], tuple(meta['shape']), meta['data_offsets']
      if end > len(data) or begin > end:
        raise ValueError(f'tensor {k!r} data [{begin}, {end}) past the end of the data '
                         f'({len(data)} bytes): truncated file')
      buf = data[begin:end]
      if dtype == 'BF16':
        arr = _bf16_to_f32(np.frombuffer(buf, dtype='<u2'))
      elif dtype in _SAFETENSORS_DTYPES:
        arr = np.frombuffer(buf, dtype=np.dtype(_SAFETENSORS_DTYPES[dtype]).newbyteorder('<'))
      else:
        raise ValueError(f'tensor {k!r} has unsupported dtype {dtype}')
      if arr.size != math.prod(shape):
        raise ValueError(f'tensor {k!r}: {arr.size} elements for shape {shape}')
      out[k] = arr.reshape(shape).astype(arr.dtype.newbyteorder('='), copy=True)
    return out
  except (ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error) as e:
    raise WeightLoadError(f'{path}: corrupt or truncated safetensors file ({e})') from None


def _read_torch(path: str) -> Dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise WeightLoadError(f'{path}: reading PyTorch checkpoints needs torch installed '
                          '(or convert it to .safetensors)') from None
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise WeightLoadError(f'{path}: cannot read PyTorch checkpoint ({type(e).__name__}: {msg})') \
        from None
  for wrapper in ('model', 'state_dict', 'model_ema'):
    if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
      obj = obj[wrapper]
      break
  if not isinstance(obj, Mapping):
    raise WeightLoadError(f'{path}: PyTorch checkpoint is a {type(obj).__name__}, not a state dict')
  out = {}
  for k, v in obj.items():
    if isinstance(v, torch.Tensor):
      v = v.detach().cpu()
      if v.dtype == torch.bfloat16:
        v = v.float()
      out[str(k)] = v.numpy().copy()
  if not out:
    raise WeightLoadError(f'{path}: PyTorch checkpoint holds no tensors')
  return out


def read_checkpoint(path: PathLike) -> Dict[str, np.ndarray]:
  """Reads a checkpoint into a flat {key: numpy array} dict (format sniffed from the content).

  `.npz` (np.load(allow_pickle=False)), `.safetensors`, PyTorch `.pth/.pt/.bin`
  (torch.load(weights_only=True) on CPU, `{'model': ...}` / `{'state_dict': ...}` unwrapped).
  Raises WeightLoadError (one line naming the file) for missing, unknown, corrupt or truncated
  files. bfloat16 tensors are widened to float32.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise WeightLoadError(f'{path}: no such checkpoint file')
  with open(path, 'rb') as f:
    head = f.read(16)
  if not head:
    raise WeightLoadError(f'{path}: empty file')
  fmt = _sniff_format(path, head)
  reader = {'npz': _read_npz, 'safetensors': _read_safetensors, 'torch': _read_torch}[fmt]
  return reader(path)


# --------------------------------------------------------------------------------------------
# Position-embedding resize
# --------------------------------------------------------------------------------------------

def _cubic_aa(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  x = np.abs(x)
  return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                  np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0))


def _bicubic_aa_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of PyTorch's `interpolate(mode='bicubic', antialias=True,
  align_corners=False)` (ATen `_upsample_bicubic2d_aa`, PIL's filter: a = -0.5, support 2
  widened by the scale when shrinking, window clipped at the border and renormalised)."""
  scale = n_in / n_out
  support = 2.0 * scale if scale >= 1.0 else 2.0
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    center = scale * (i + 0.5)
    xmin = max(int(center - support + 0.5), 0)  # C++ static_cast truncation (argument >= -0.5)
    xmax = min(int(center + support + 0.5), n_in)
    j = np.arange(xmin, xmax)
    w = _cubic_aa((j - center + 0.5) * invscale)
    total = w.sum()
    m[i, xmin:xmax] = w / total if total != 0 else w
  return m


def _linear_align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of `scipy.ndimage.zoom(order=1)` (grid_mode=False: the corner samples
  are aligned, output o reads input o * (n_in - 1) / (n_out - 1))."""
  m = np.zeros((n_out, n_in), np.float64)
  if n_out == 1 or n_in == 1:
    m[:, 0] = 1.0
    return m
  pos = np.arange(n_out) * ((n_in - 1) / (n_out - 1))
  lo = np.clip(np.floor(pos).astype(int), 0, n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = pos - lo
  m[np.arange(n_out), lo] += 1.0 - frac
  m[np.arange(n_out), hi] += frac
  return m


POSEMB_METHODS = ('bicubic', 'bilinear')


def resize_posemb(posemb: np.ndarray, new_grid: int, method: str = 'bicubic',
                  num_prefix_tokens: int = 1) -> np.ndarray:
  """Resizes a [1, prefix + g*g, D] position embedding to a new_grid x new_grid grid.

  The prefix (CLS) slots are kept as they are; only the square grid part is resampled.
  - 'bicubic': numerically timm's `resample_abs_pos_embed` (what `checkpoint_filter_fn` uses):
    `F.interpolate(mode='bicubic', antialias=True, align_corners=False)`, i.e. PyTorch's
    antialiased (PIL-style, a = -0.5) bicubic — *not* the a = -0.75 non-antialiased kernel.
  - 'bilinear': the original ViT code (`vit_jax/checkpoint.py`): `scipy.ndimage.zoom(order=1)`,
    bilinear with aligned corners.
  Computed in float64, returned in the input dtype.
  """
  if method not in POSEMB_METHODS:
    raise ValueError(f'unknown posemb interpolation {method!r}; use one of {POSEMB_METHODS}')
  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f'posemb must be [1, tokens, D], got {posemb.shape}')
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
  g_old = int(round(math.sqrt(grid.shape[0])))
  if g_old * g_old != grid.shape[0]:
    raise ValueError(f'posemb grid of {grid.shape[0]} tokens is not square')
  if g_old == new_grid:
    return posemb.copy()
  make = _bicubic_aa_matrix if method == 'bicubic' else _linear_align_corners_matrix
  m = make(g_old, new_grid)
  g = grid.reshape(g_old, g_old, -1).astype(np.float64)
  g = np.einsum('ij,jkd->ikd', m, g)   # rows
  g = np.einsum('lk,ikd->ild', m, g)   # columns
  g = g.reshape(1, new_grid * new_grid, -1).astype(posemb.dtype)
  return np.concatenate([prefix, g], axis=1)


# --------------------------------------------------------------------------------------------
# Layout conversion: checkpoint keys -> our flat paths
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Entry:
  value: np.ndarray
  sources: Tuple[str, ...]
  note: str = ''


def _squeeze_norm(w: np.ndarray) -> np.ndarray:
  # Old flax GroupNorm/LayerNorm params may be stored as (1, 1, 1, C).
  return w.reshape(-1) if w.ndim > 1 else w


_GOOGLE_PREFIXES = ('opt/target/', 'params/', 'model/')
_TIMM_PREFIXES = ('module.', 'model.')

# Checkpoint features our backbone does not implement: loading around them would silently give a
# different network, so they are refused (strict) rather than just reported.
_UNSUPPORTED = [
    (re.compile(r'(^|\.)ls[12]\.gamma$|gamma_[12]$'), 'layer scale (DeiT-III/CaiT)'),
    (re.compile(r'(^|\.)(q_norm|k_norm)\.'), 'q/k normalisation'),
    (re.compile(r'^norm_pre\.|^fc_norm\.'), 'pre-norm / global-pool fc_norm'),
    (re.compile(r'^reg_token$'), 'register tokens'),
    (re.compile(r'^attn_pool\.|^MAPHead_0/'), 'attention-pool (MAP) head'),
]


def _detect_layout(ckpt: Mapping[str, np.ndarray]) -> Tuple[str, str]:
  for prefix in ('',) + _GOOGLE_PREFIXES:
    if f'{prefix}embedding/kernel' in ckpt:
      return 'google_npz', prefix
  for prefix in ('',) + _TIMM_PREFIXES:
    if f'{prefix}patch_embed.proj.weight' in ckpt or f'{prefix}cls_token' in ckpt:
      return 'timm', prefix
  return 'unknown', ''


def _convert_google(ckpt: Mapping[str, np.ndarray], prefix: str, num_heads: int,
                    path: str) -> Tuple[Dict[Path, _Entry], List[str]]:
  """Google/AugReg npz -> our paths. Returns (entries, keys it did not understand)."""
  w = {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}
  outside = [k for k in ckpt if not k.startswith(prefix)]
  used = set()
  out: Dict[Path, _Entry] = {}

  def take(key):
    used.add(key)
    return w[key]

  def put(dst: str, key: str, fn=None, note=''):
    if key in w:
      v = take(key)
      out[tuple(dst.split('/'))] = _Entry(fn(v) if fn else v, (prefix + key,), note)

  put('embed/patch_embed/kernel', 'embedding/kernel')
  put('embed/patch_embed/bias', 'embedding/bias')
  put('embed/cls_token', 'cls')
  put('embed/pos_embed', 'Transformer/posembed_input/pos_embedding')
  put('norm/scale', 'Transformer/encoder_norm/scale')
  put('norm/bias', 'Transformer/encoder_norm/bias')
  put('head/kernel', 'head/kernel')
  put('head/bias', 'head/bias')

  # Hybrid ResNet stem (top-level in vit_jax; some re-exports nest it under `embedding/`).
  stem_keys = [k for k in w if re.match(r'^(embedding/)?(conv_root|gn_root|block\d+/unit\d+)/', k)]
  for k in stem_keys:
    rel = k[len('embedding/'):] if k.startswith('embedding/') else k
    parts = rel.split('/')
    fn = _squeeze_norm if parts[-2].startswith('gn') else None
    put('embed/stem/' + rel, k, fn)

  block_ids = sorted({int(m.group(1)) for k in w
                      for m in [re.match(r'^Transformer/encoderblock_(\d+)/', k)] if m})
  for i in block_ids:
    bp = f'Transformer/encoderblock_{i}/'
    mha = bp + 'MultiHeadDotProductAttention_1/'
    for ln, dst in (('LayerNorm_0', 'norm1'), ('LayerNorm_2', 'norm2')):
      for p in ('scale', 'bias'):
        put(f'block_{i}/{dst}/{p}', f'{bp}{ln}/{p}', _squeeze_norm)
    for r in range(2):
      for p in ('kernel', 'bias'):
        put(f'block_{i}/mlp/fc{r + 1}/{p}', f'{bp}MlpBlock_3/Dense_{r}/{p}')
    qkv_k = [f'{mha}{n}/kernel' for n in ('query', 'key', 'value')]
    qkv_b = [f'{mha}{n}/bias' for n in ('query', 'key', 'value')]
    if all(k in w for k in qkv_k):
      ks = [take(k) for k in qkv_k]
      if ks[0].ndim == 3 and ks[0].shape[1] != num_heads:
        raise WeightLoadError(
            f'{path}: {prefix}{qkv_k[0]} has {ks[0].shape[1]} heads but the model has '
            f'num_heads={num_heads}')
      out[(f'block_{i}', 'attn', 'qkv', 'kernel')] = _Entry(
          np.concatenate([k.reshape(k.shape[0], -1) for k in ks], axis=1),
          tuple(prefix + k for k in qkv_k), 'query|key|value (D, heads, hd) -> (D, 3D)')
    if all(k in w for k in qkv_b):
      out[(f'block_{i}', 'attn', 'qkv', 'bias')] = _Entry(
          np.concatenate([take(k).reshape(-1) for k in qkv_b]), tuple(prefix + k for k in qkv_b))
    put(f'block_{i}/attn/proj/kernel', f'{mha}out/kernel',
        lambda v: v.reshape(-1, v.shape[-1]), '(heads, hd, D) -> (D, D)')
    put(f'block_{i}/attn/proj/bias', f'{mha}out/bias')
  unknown = outside + [prefix + k for k in w if k not in used]
  return out, unknown


def _oihw_to_hwio(v: np.ndarray) -> np.ndarray:
  return np.transpose(v, (2, 3, 1, 0))


def _convert_timm(ckpt: Mapping[str, np.ndarray], prefix: str,
                  path: str) -> Tuple[Dict[Path, _Entry], List[str], Dict[str, Any]]:
  """timm/DeiT state dict -> our paths. Returns (entries, unknown keys, extras)."""
  w = {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}
  outside = [k for k in ckpt if not k.startswith(prefix)]
  used = set()
  out: Dict[Path, _Entry] = {}

  def put(dst: str, key: str, fn=None, note=''):
    if key in w:
      used.add(key)
      v = w[key]
      out[tuple(dst.split('/'))] = _Entry(fn(v) if fn else v, (prefix + key,), note)

  t = lambda v: v.T  # PyTorch Linear (out, in) -> Dense kernel (in, out)
  put('embed/patch_embed/kernel', 'patch_embed.proj.weight', _oihw_to_hwio, 'OIHW -> HWIO')
  put('embed/patch_embed/bias', 'patch_embed.proj.bias')
  put('embed/cls_token', 'cls_token')
  put('embed/pos_embed', 'pos_embed')
  put('norm/scale', 'norm.weight')
  put('norm/bias', 'norm.bias')
  put('head/kernel', 'head.weight', t, 'transposed')
  put('head/bias', 'head.bias')

  bb = 'patch_embed.backbone.'
  put('embed/stem/conv_root/kernel', bb + 'stem.conv.weight', _oihw_to_hwio, 'OIHW -> HWIO')
  put('embed/stem/gn_root/scale', bb + 'stem.norm.weight')
  put('embed/stem/gn_root/bias', bb + 'stem.norm.bias')
  for k in list(w):
    m = re.match(r'^patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.(.+)$', k)
    if not m:
      continue
    s, u, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    dst = f'embed/stem/block{s + 1}/unit{u + 1}/'
    conv = re.match(r'^conv(\d)\.weight$', rest)
    norm = re.match(r'^norm(\d)\.(weight|bias)$', rest)
    if conv:
      put(dst + f'conv{conv.group(1)}/kernel', k, _oihw_to_hwio, 'OIHW -> HWIO')
    elif norm:
      put(dst + f'gn{norm.group(1)}/' + ('scale' if norm.group(2) == 'weight' else 'bias'), k)
    elif rest == 'downsample.conv.weight':
      put(dst + 'conv_proj/kernel', k, _oihw_to_hwio, 'OIHW -> HWIO')
    elif rest in ('downsample.norm.weight', 'downsample.norm.bias'):
      put(dst + 'gn_proj/' + ('scale' if rest.endswith('weight') else 'bias'), k)

  block_ids = sorted({int(m.group(1)) for k in w for m in [re.match(r'^blocks\.(\d+)\.', k)] if m})
  for i in block_ids:
    bp, dp = f'blocks.{i}.', f'block_{i}/'
    for n in ('norm1', 'norm2'):
      put(dp + f'{n}/scale', bp + f'{n}.weight')
      put(dp + f'{n}/bias', bp + f'{n}.bias')
    for lin in ('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2'):
      d = lin.replace('.', '/')
      put(dp + f'{d}/kernel', bp + f'{lin}.weight', t, 'transposed')
      put(dp + f'{d}/bias', bp + f'{lin}.bias')

  extras = {'num_prefix_tokens': 1}
  if 'dist_token' in w:
    # DeiT distilled: pos_embed holds [cls, dist, grid]; we keep cls and the grid, drop dist.
    extras['num_prefix_tokens'] = 2
    extras['dist'] = True
  unknown = outside + [prefix + k for k in w if k not in used]
  return out, unknown, extras


# --------------------------------------------------------------------------------------------
# Merge into the target tree
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
    def group(paths):
      # Collapse to module level for readability: block_3/attn/qkv/kernel -> block_3/attn/qkv.
      mods = []
      for p in paths:
        m = p.rsplit('/', 1)[0] if '/' in p else p
        if m not in mods:
          mods.append(m)
      return mods

    lines = [f'Loaded {len(self.loaded)} parameter arrays from {self.path} ({self.layout} layout).']
    if self.newly_initialized:
      lines.append(f'Newly initialised ({len(self.newly_initialized)}): '
                   + ', '.join(group(self.newly_initialized)))
    if self.unused:
      lines.append(f'Unused checkpoint keys ({len(self.unused)}): ' + ', '.join(self.unused))
    lines.extend(f'Note: {n}' for n in self.notes)
    return '\n'.join(lines)


def _flatten(tree: Mapping[str, Any], prefix: Path = ()) -> Dict[Path, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (str(k),)))
    else:
      out[prefix + (str(k),)] = v
  return out


def _rebuild(tree: Mapping[str, Any], new: Mapping[Path, Any], prefix: Path = ()) -> Dict[str, Any]:
  out = {}
  for k, v in tree.items():
    p = prefix + (str(k),)
    out[k] = _rebuild(v, new, p) if isinstance(v, Mapping) else new.get(p, v)
  return out


def _is_backbone(path: Path) -> bool:
  return path[0] in ('embed', 'norm') or re.fullmatch(r'block_\d+', path[0]) is not None


def load_pretrained(path: PathLike, params: Mapping[str, Any], vit_config, *,
                    posemb_interpolation: str = 'bicubic', load_head: bool = False,
                    head_name: Union[str, Sequence[str]] = 'head',
                    strict: bool = True):
  """Loads a Google npz or timm/DeiT checkpoint into a copy of `params`.

  Args:
    path: `.npz`, `.safetensors`, `.pth`/`.pt`/`.bin` file.
    params: our parameter tree (plain nested dict or FrozenDict; the `params` collection of
      `vit.VisionTransformer` or of the DCAL model). Never modified.
    vit_config: the backbone's `ViTConfig` (used to check heads and the hybrid stem).
    posemb_interpolation: 'bicubic' (timm's) or 'bilinear' (original ViT code) for resizing the
      position-embedding grid when the model's grid differs from the checkpoint's.
    load_head: also load the classifier (`head`) — only for parity tests / same label space;
      otherwise every head is left as initialised (reported newly initialised).
    head_name: our head module name(s) that receive the checkpoint head when load_head=True.
    strict: a backbone parameter (`embed/*`, `block_{i}/*`, `norm/*`) missing from the checkpoint
      or a checkpoint feature we don't implement (layer scale, ...) raises; with strict=False they
      are only reported.

  Returns:
    (new params tree of the same structure, LoadReport). Loaded leaves are host numpy arrays in
    the target leaf's dtype (put them on devices/shardings yourself); the rest are the original
    leaves, untouched.
  """
  path = os.fspath(path)
  if posemb_interpolation not in POSEMB_METHODS:
    raise ValueError(f'posemb_interpolation must be one of {POSEMB_METHODS}, '
                     f'got {posemb_interpolation!r}')
  heads = (head_name,) if isinstance(head_name, str) else tuple(head_name)
  ckpt = read_checkpoint(path)
  layout, prefix = _detect_layout(ckpt)
  extras: Dict[str, Any] = {'num_prefix_tokens': 1}
  if layout == 'google_npz':
    entries, unknown = _convert_google(ckpt, prefix, vit_config.num_heads, path)
  elif layout == 'timm':
    entries, unknown, extras = _convert_timm(ckpt, prefix, path)
  else:
    first = ', '.join(sorted(ckpt)[:5])
    raise WeightLoadError(
        f'{path}: unrecognised checkpoint layout (no `embedding/kernel` (Google npz) nor '
        f'`patch_embed.proj.weight`/`cls_token` (timm) key); first keys: {first}')

  report = LoadReport(path=path, layout=layout)
  if strict:
    for key in unknown:
      bare = key[len(prefix):] if key.startswith(prefix) else key
      for pat, what in _UNSUPPORTED:
        if pat.search(bare):
          raise WeightLoadError(f'{path}: checkpoint uses {what} ({key}), which this backbone '
                                'does not implement (pass strict=False to load around it)')

  frozen = None
  if not isinstance(params, dict) and hasattr(params, 'unfreeze'):
    frozen = type(params)
  flat = _flatten(params)
  new: Dict[Path, Any] = {}
  used_entries = set()
  missing: List[Tuple[str, str]] = []

  for tpath, leaf in flat.items():
    name = '/'.join(tpath)
    is_head = tpath[0] in heads
    src = ('head',) + tpath[1:] if is_head else tpath
    if is_head and not load_head:
      report.newly_initialized.append(name)
      continue
    entry = entries.get(src)
    if entry is None:
      if _is_backbone(tpath) or is_head:
        missing.append((name, '/'.join(src)))
      report.newly_initialized.append(name)
      continue
    used_entries.add(src)
    value = np.asarray(entry.value)
    tshape = tuple(leaf.shape)
    if src == ('embed', 'pos_embed') and value.shape != tshape:
      value = _fit_posemb(value, tshape, extras['num_prefix_tokens'], posemb_interpolation,
                          entry, path, report)
    elif src == ('embed', 'pos_embed') and extras['num_prefix_tokens'] != 1:
      value = _fit_posemb(value, tshape, extras['num_prefix_tokens'], posemb_interpolation,
                          entry, path, report)
    if value.shape != tshape:
      how = f' ({entry.note})' if entry.note else ''
      raise WeightLoadError(
          f'{path}: shape mismatch for {name}: checkpoint {"+".join(entry.sources)}{how} gives '
          f'{value.shape}, the model expects {tshape}')
    new[tpath] = np.asarray(value).astype(np.dtype(leaf.dtype), copy=True)
    report.loaded.append(name)

  if missing and strict:
    shown = ', '.join(f'{n}' for n, _ in missing[:6]) + (' ...' if len(missing) > 6 else '')
    raise WeightLoadError(
        f'{path}: checkpoint lacks {len(missing)} parameter(s) the model needs: {shown} '
        f'(pass strict=False to keep them as initialised)')

  for src, entry in entries.items():
    if src in used_entries:
      continue
    why = ''
    if src[0] == 'head' and not load_head:
      why = ' (head not loaded: load_head=False)'
    elif re.fullmatch(r'block_\d+', src[0]):
      why = ' (block beyond the model depth)'
    elif src[:2] == ('embed', 'stem'):
      why = ' (ResNet stem: the model has none or fewer units)'
    report.unused.extend(f'{s}{why}' for s in entry.sources)
  for key in unknown:
    bare = key[len(prefix):] if key.startswith(prefix) else key
    why = ''
    if bare == 'dist_token' or bare.startswith('head_dist.'):
      why = ' (DeiT distillation token/head: dropped, the CLS path is kept)'
    elif bare.startswith('pre_logits'):
      why = ' (pre-logits representation layer: not used)'
    report.unused.append(f'{key}{why}')
  if extras.get('dist'):
    report.notes.append('distilled DeiT checkpoint: dist_token and its pos_embed slot dropped')

  out = _rebuild(params, new)
  if frozen is not None:
    out = frozen(out)
  return out, report


def _fit_posemb(value, tshape, num_prefix, method, entry, path, report):
  src = '+'.join(entry.sources)
  if value.ndim == 2:
    value = value[None]
  if value.ndim != 3 or len(tshape) != 3 or value.shape[-1] != tshape[-1]:
    raise WeightLoadError(f'{path}: shape mismatch for embed/pos_embed: checkpoint {src} gives '
                          f'{value.shape}, the model expects {tshape}')
  if num_prefix == 2:
    value = np.concatenate([value[:, :1], value[:, 2:]], axis=1)  # drop the dist slot
  n_old, n_new = value.shape[1] - 1, tshape[1] - 1
  g_old, g_new = int(round(math.sqrt(n_old))), int(round(math.sqrt(n_new)))
  if g_old * g_old != n_old or g_new * g_new != n_new:
    raise WeightLoadError(f'{path}: cannot resize embed/pos_embed: checkpoint {src} gives '
                          f'{value.shape}, the model expects {tshape} (grids must be square)')
  if g_old != g_new:
    value = resize_posemb(value, g_new, method)
    report.notes.append(f'embed/pos_embed grid resized {g_old}x{g_old} -> {g_new}x{g_new} '
                        f'({method})')
  return value
