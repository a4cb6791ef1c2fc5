"""Steps 2 and 3 of loading pretrained weights: detect a checkpoint's layout, convert it to our
parameter names.

Google ViT / AugReg npz (Flax names, qkv as (D, heads, head_dim), HWIO convs), timm / DeiT
state dicts (packed qkv (3D, D), OIHW convs; DINOv2's and CLIP's native layouts first converted
to timm's by their backbone family) and a dca_jax run (already in our names). Checkpoint
features our backbone does not implement, or that the configured variant switched off, are
refused rather than loaded around.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Set, Tuple

import numpy as np

from dca_jax import backbones
from dca_jax.checkpoint import RUN_PREFIX
from dca_jax.errors import WeightLoadError

Path = Tuple[str, ...]


_GOOGLE_PREFIXES = ('opt/target/', 'params/', 'model/')
_TIMM_PREFIXES = ('module.', 'model.')


class Layout(NamedTuple):
  """Which naming a checkpoint uses, and the prefix its keys carry."""
  name: str    # 'google_npz', 'timm' or 'dca_jax'
  prefix: str  # e.g. 'opt/target/' or 'module.'; '' when none


def detect_layout(checkpoint: Mapping[str, np.ndarray], path: str) -> Layout:
  """The layout from the keys; an unknown one raises WeightLoadError."""
  for prefix in ('',) + _GOOGLE_PREFIXES:
    if f'{prefix}embedding/kernel' in checkpoint:
      return Layout('google_npz', prefix)
  for prefix in ('',) + _TIMM_PREFIXES:
    if f'{prefix}patch_embed.proj.weight' in checkpoint or f'{prefix}cls_token' in checkpoint:
      return Layout('timm', prefix)
  if f'{RUN_PREFIX}embed/pos_embed' in checkpoint:
    return Layout('dca_jax', RUN_PREFIX)
  first = ', '.join(sorted(checkpoint)[:5])
  raise WeightLoadError(
      f'{path}: unrecognised checkpoint layout (no `embedding/kernel` (Google npz) nor '
      f'`patch_embed.proj.weight`/`cls_token` (timm) key); first keys: {first}')



@dataclasses.dataclass
class Entry:
  """One of our parameters as the checkpoint gives it (before the merge's shape checks)."""
  value: np.ndarray
  sources: Tuple[str, ...]  # the checkpoint key(s) it came from
  note: str = ''            # the conversion applied, for error messages


@dataclasses.dataclass
class Converted:
  """A checkpoint in our names."""
  entries: Dict[Path, Entry]
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
    self.entries: Dict[Path, Entry] = {}

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
    self.entries[tuple(ours.split('/'))] = Entry(
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


def convert_checkpoint(checkpoint: Mapping[str, np.ndarray], layout: Layout, vit_config,
                        path: str) -> Converted:
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
  return Converted(keys.entries, keys.unknown(), num_prefix_tokens=prefix)


def apply_family_filters(checkpoint: Dict[str, np.ndarray],
                          path: str) -> Tuple[Dict[str, np.ndarray], Optional[str]]:
  """A family's native layout (Meta's DINOv2, OpenAI's CLIP) -> timm's, by the family's
  `checkpoint_filter` (dca_jax/backbones/); (checkpoint, family name or None)."""
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


def refuse_features_the_model_lacks(converted: 'Converted', targets: Set[Path], path: str):
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


def without_prefix(key: str, prefix: str) -> str:
  return key[len(prefix):] if key.startswith(prefix) else key


def refuse_unsupported_features(unknown: Sequence[str], prefix: str, path: str):
  """Raises for the first checkpoint key of a feature our backbone lacks (strict mode)."""
  for key in unknown:
    for pattern, feature in _UNSUPPORTED:
      if pattern.search(without_prefix(key, prefix)):
        raise WeightLoadError(f'{path}: checkpoint uses {feature} ({key}), which this backbone '
                              'does not implement (pass strict=False to load around it)')
