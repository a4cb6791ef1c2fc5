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

`load_pretrained` runs five steps, one module each: read the file (formats.py; torch's format
without torch: torch_pickle.py; a run: dca_jax/checkpoint/runs.py), detect the layout and
convert to our names (layouts.py: `embed/...`, `block_{i}/...`, `norm`, `head`, see
dca_jax/models/vit.py and resnet.py), merge strictly into the target tree and build the report
(merge.py: every target parameter is loaded or listed as newly initialised, shape mismatches
raise, `pos_embed`'s grid is resized to the model's by posemb.py, square or not; unused
checkpoint keys are reported with reasons).

Only numpy is needed for files (a run directory is read with Orbax, imported then): safetensors'
format and torch.save's (`.pth`, through a pickle reader that
admits only tensors and state dicts) are parsed here; torch.load is used where torch is installed.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from dca_jax.errors import WeightLoadError
from dca_jax.weights import formats, layouts, merge, posemb
from dca_jax.weights.formats import read_checkpoint
from dca_jax.weights.merge import LoadReport
from dca_jax.weights.posemb import POSEMB_METHODS, resize_posemb

__all__ = ['LoadReport', 'POSEMB_METHODS', 'WeightLoadError', 'load_pretrained',
           'read_checkpoint', 'resize_posemb']

PathLike = Union[str, os.PathLike]



def _check_options(posemb_interpolation: str, grid_hw) -> Optional[Tuple[int, int]]:
  """Validates the resize options; returns grid_hw as a (height, width) tuple or None."""
  if posemb_interpolation not in posemb.POSEMB_METHODS:
    raise ValueError(f'posemb_interpolation must be one of {posemb.POSEMB_METHODS}, '
                     f'got {posemb_interpolation!r}')
  if grid_hw is None:
    return None
  if isinstance(grid_hw, (int, np.integer)) or len(grid_hw) != 2:
    raise ValueError(f'grid_hw must be (height, width), got {grid_hw!r}')
  return posemb.grid_height_width(grid_hw)


def load_pretrained(path: PathLike, params: Mapping[str, Any], vit_config, *,
                    posemb_interpolation: str = 'bicubic',
                    grid_hw: Optional[Tuple[int, int]] = None, load_head: bool = False,
                    head_name: Union[str, Sequence[str]] = 'head',
                    strict: bool = True) -> Tuple[Any, merge.LoadReport]:
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
  checkpoint = formats.read_checkpoint(path)
  checkpoint, family = layouts.apply_family_filters(checkpoint, path)
  layout = layouts.detect_layout(checkpoint, path)
  converted = layouts.convert_checkpoint(checkpoint, layout, vit_config, path)
  flat_params = merge.flatten(params)
  if strict:
    layouts.refuse_unsupported_features(converted.unknown, layout.prefix, path)
    layouts.refuse_features_the_model_lacks(converted, set(flat_params), path)
  merged = merge.merge_into_params(flat_params, converted, heads=heads, load_head=load_head,
                              posemb_interpolation=posemb_interpolation, grid_hw=grid_hw,
                              path=path)
  if strict:
    merge.raise_if_missing(merged.missing, path)
  report = merge.build_report(path, layout, converted, merged, load_head)
  if family is not None:
    report.notes.append(f'{family} native checkpoint layout converted to timm\'s first')
  return merge.replace_leaves(params, merged.values), report
