"""CLIP ViT-B/16 image tower (Radford et al. 2021; OpenCLIP LAION-2B): a pre-norm ViT — a
LayerNorm (`norm_pre`) on the embedded tokens before the first block — with LayerNorm eps 1e-5,
no patch-embedding bias, CLIP's mean/std, bicubic, 224 px.

OpenAI's weights were trained with QuickGELU (x * sigmoid(1.702 x)): `clip_base_quickgelu`
(timm `vit_base_patch16_clip_quickgelu_224`) is the network they fit. LAION-2B's use the exact
GELU: `clip_base` (timm `vit_base_patch16_clip_224`). timm's `head` is CLIP's image projection
(768 -> 512, zero bias); it is not loaded unless asked (`load_head`).

Checkpoints: timm's (`timm/vit_base_patch16_clip_224.{openai,laion2b}`) or OpenAI's own state
dict (`visual.*` keys), converted by `checkpoint_filter` exactly as timm's
`_convert_openai_clip` does (the text tower is left out).
"""

from dca_jax.backbones import Family, Variant

_ARCH = dict(width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16, pre_norm=True,
             patch_bias=False, norm_eps=1e-5)

# timm's renames of OpenAI's keys, in its order (the first match of 'ln_' after 'ln_pre/post').
_SWAPS = (('conv1', 'patch_embed.proj'), ('positional_embedding', 'pos_embed'),
          ('transformer.resblocks.', 'blocks.'), ('ln_pre', 'norm_pre'), ('ln_post', 'norm'),
          ('ln_', 'norm'), ('in_proj_', 'qkv.'), ('out_proj', 'proj'), ('mlp.c_fc', 'mlp.fc1'),
          ('mlp.c_proj', 'mlp.fc2'))


def checkpoint_filter(state, prefix='visual.'):
  """OpenAI's CLIP state dict (`visual.class_embedding`, ...) -> timm's; None for any other."""
  if 'module.visual.class_embedding' in state:
    prefix = 'module.visual.'
  if prefix + 'class_embedding' not in state:
    return None
  import numpy as np  # pylint: disable=g-import-not-at-top
  out = {}
  for key, value in state.items():
    if not key.startswith(prefix):
      continue  # the text tower
    key = key[len(prefix):]
    for old, new in _SWAPS:
      key = key.replace(old, new)
    if key == 'proj':
      key, value = 'head.weight', np.asarray(value).T
      out['head.bias'] = np.zeros(value.shape[0], value.dtype)
    elif key == 'class_embedding':
      key, value = 'cls_token', np.asarray(value)[None, None]
    elif key == 'pos_embed':
      value = np.asarray(value)[None]
    out[key] = value
  return out


FAMILY = Family('clip', 'CLIP image towers (pre-norm, QuickGELU for OpenAI)', (
    Variant('clip_base', _ARCH, 'clip', 'vit_base_patch16_clip_224', interpolation='bicubic',
            weights='timm/vit_base_patch16_clip_224.laion2b',
            description='CLIP ViT-B/16 image tower, LAION-2B (OpenCLIP), 224 px'),
    Variant('clip_base_quickgelu', dict(_ARCH, activation='quick_gelu'), 'clip',
            'vit_base_patch16_clip_quickgelu_224', interpolation='bicubic',
            weights='timm/vit_base_patch16_clip_224.openai',
            description='CLIP ViT-B/16 image tower, OpenAI WIT-400M, 224 px (QuickGELU)'),
), checkpoint_filter=checkpoint_filter)
