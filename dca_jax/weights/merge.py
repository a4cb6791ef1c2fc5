"""Steps 4 and 5 of loading pretrained weights: merge the converted checkpoint strictly into
our parameter tree, and report what was loaded, initialised anew and left unused.

Every target parameter is loaded or listed as newly initialised; a shape mismatch raises;
`pos_embed`'s grid is resized to the model's (square or not).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from dca_jax.checkpoint import RUN_PREFIX
from dca_jax.errors import WeightLoadError
from dca_jax.weights import layouts, posemb

Path = Tuple[str, ...]


@dataclasses.dataclass
class _Merged:
  """What the merge did, leaf by leaf ('/'-joined names, in the target tree's order)."""
  values: Dict[Path, np.ndarray] = dataclasses.field(default_factory=dict)  # loaded leaves
  loaded: List[str] = dataclasses.field(default_factory=list)
  newly_initialized: List[str] = dataclasses.field(default_factory=list)
  missing: List[str] = dataclasses.field(default_factory=list)  # needed, not in the checkpoint
  used_sources: Set[Path] = dataclasses.field(default_factory=set)  # entries that were loaded
  notes: List[str] = dataclasses.field(default_factory=list)


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> Dict[Path, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, prefix + (str(key),)))
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


def replace_leaves(params: Mapping[str, Any], values: Mapping[Path, Any]):
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
  side = posemb.square_side(num_tokens)
  if side is None:
    raise WeightLoadError(
        f'{path}: cannot resize embed/pos_embed: checkpoint {sources} gives {checkpoint_shape}, '
        f'the model expects {target_shape}, whose {num_tokens} patches are no square grid '
        f'(pass grid_hw=(height, width))')
  return side, side


def _fit_posemb(value: np.ndarray, target_shape: Tuple[int, ...], entry: layouts.Entry,
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
  old_side = posemb.square_side(value.shape[1] - prefix)
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
  return posemb.resize_posemb(value, (height, width), method, num_prefix_tokens=prefix), note


def _loaded_value(entry: layouts.Entry, name: str, source: Path, leaf, converted: layouts.Converted,
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


def merge_into_params(flat_params: Mapping[Path, Any], converted: layouts.Converted, *,
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


def raise_if_missing(missing: Sequence[str], path: str):
  """Strict mode: backbone (or routed head) parameters the checkpoint lacks are an error."""
  if missing:
    shown = ', '.join(missing[:6]) + (' ...' if len(missing) > 6 else '')
    raise WeightLoadError(
        f'{path}: checkpoint lacks {len(missing)} parameter(s) the model needs: {shown} '
        f'(pass strict=False to keep them as initialised)')



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


def build_report(path: str, layout: layouts.Layout, converted: layouts.Converted, merged: _Merged,
                  load_head: bool) -> LoadReport:
  """The LoadReport: loaded / newly initialised leaves, unused keys with reasons, notes."""
  report = LoadReport(path=path, layout=layout.name, loaded=list(merged.loaded),
                      newly_initialized=list(merged.newly_initialized), notes=list(merged.notes))
  for source, entry in converted.entries.items():
    if source not in merged.used_sources:
      reason = _unused_entry_reason(source, load_head)
      report.unused.extend(f'{key}{reason}' for key in entry.sources)
  for key in converted.unknown:
    report.unused.append(key + _unknown_key_reason(layouts.without_prefix(key, layout.prefix)))
  if converted.num_prefix_tokens == 2:
    report.notes.append('distilled DeiT checkpoint: dist_token and its pos_embed slot dropped')
  return report
