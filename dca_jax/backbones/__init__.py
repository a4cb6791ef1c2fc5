"""The backbone registry: every variant `config.backbone` can name, one file per family.

A variant carries what belongs to it, the way timm's `_cfg` keeps a model's preprocessing with
it: its architecture (the `vit.ViTConfig` fields: width, depth, heads, MLP, patch, layer scale,
register tokens, pre-norm, LayerNorm eps, activation), the normalisation its pretraining used
(`imagenet` | `inception` | `clip` mean/std, what `config.normalization='auto'` picks), the image
interpolation and size of its pretraining, the timm architecture it matches, and its default
weights. A family adds the converter of its native checkpoint layout (`checkpoint_filter`:
e.g. Meta's DINOv2 `.pth` -> timm's state dict), applied by `dca_jax/weights.py` before the
shared timm -> ours renaming.

Families: `deit.py` (DeiT-T/S/B), `google.py` (ViT-B/16 in21k, R50+ViT-B/16), `dinov2.py`
(DINOv2 ViT-S/B/14 with and without registers), `clip.py` (CLIP ViT-B/16 image tower).
To add a family: a module with a `FAMILY` and its name in `_FAMILY_MODULES`.

Pure Python (no numpy, no JAX): the data package reads the normalisation from here, and data
must not import the models.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

# Per-channel (mean, std) of pixels in [0, 1]. `inception` is [-1, 1] (Google ViT, AugReg).
MEAN_STD = {
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    'inception': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    'clip': ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}
NORMALIZATIONS = tuple(MEAN_STD)
INTERPOLATIONS = ('bicubic', 'bilinear')


@dataclasses.dataclass(frozen=True)
class Variant:
  """One backbone `config.backbone` can name."""
  name: str
  arch: Mapping[str, Any]       # `vit.ViTConfig` fields (the rest keep their defaults)
  normalization: str            # imagenet | inception | clip: what its pretraining fed it
  timm_name: str                # the timm architecture with the same parameters
  interpolation: str = 'bicubic'  # its pretraining's image resize (timm pretrained_cfg)
  pretrained_size: int = 224    # px its position-embedding grid was learnt at
  weights: str = 'none'         # default pretrained weights (hub.KNOWN name) for configs
  description: str = ''
  family: str = ''              # set by the registry

  def __post_init__(self):
    if self.normalization not in MEAN_STD:
      raise ValueError(f'{self.name}: normalization {self.normalization!r} not in {NORMALIZATIONS}')
    if self.interpolation not in INTERPOLATIONS:
      raise ValueError(f'{self.name}: interpolation {self.interpolation!r} not in {INTERPOLATIONS}')


# A checkpoint filter: a flat {key: array} state dict -> timm's layout, or None when the
# checkpoint is not in the family's native layout (timm's `checkpoint_filter_fn` idea).
CheckpointFilter = Callable[[Mapping[str, Any]], Optional[Dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  description: str
  variants: Tuple[Variant, ...]
  checkpoint_filter: Optional[CheckpointFilter] = None


_FAMILY_MODULES = ('deit', 'google', 'dinov2', 'clip')


def _load() -> Tuple[Dict[str, Family], Dict[str, Variant]]:
  families, variants = {}, {}
  for module_name in _FAMILY_MODULES:
    family = importlib.import_module(f'{__name__}.{module_name}').FAMILY
    families[family.name] = family
    for variant in family.variants:
      if variant.name in variants:
        raise ValueError(f'backbone {variant.name!r} registered twice')
      variants[variant.name] = dataclasses.replace(variant, family=family.name)
  return families, variants


FAMILIES, VARIANTS = _load()


def names() -> Tuple[str, ...]:
  return tuple(VARIANTS)


def get(name: str) -> Variant:
  if name not in VARIANTS:
    raise ValueError(f'unknown backbone {name!r}; known: {", ".join(sorted(VARIANTS))}')
  return VARIANTS[name]


def family_of(name: str) -> Family:
  return FAMILIES[get(name).family]


def normalization(name: str) -> str:
  """The normalisation `config.normalization='auto'` picks for backbone `name`."""
  return get(name).normalization


def checkpoint_filters() -> Tuple[Tuple[str, CheckpointFilter], ...]:
  """(family name, filter) of every family with a native checkpoint layout."""
  return tuple((family.name, family.checkpoint_filter) for family in FAMILIES.values()
               if family.checkpoint_filter is not None)
