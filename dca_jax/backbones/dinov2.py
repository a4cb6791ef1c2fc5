"""DINOv2 ViT-S/14 and ViT-B/14 (Oquab et al. 2023), with and without 4 registers (Darcet et al.
2024): layer scale (a learned per-channel gamma on both residual branches), patch 14, 518 px
pretraining (a 37 x 37 position-embedding grid, resized to the fine-tuning grid on import),
ImageNet mean/std, bicubic.

Token layout: [CLS, registers..., patches]. Without registers the position embedding has a CLS
slot (timm `no_embed_class=False`); with registers it covers the patches only
(`no_embed_class=True`: timm folds Meta's CLS position into `cls_token`), and the registers have
none. Registers are not patches: DCAL's rollout map and GLCA's top-R exclude them
(docs/MODEL.md, "Register tokens").

Checkpoints: timm's (`timm/vit_{small,base}_patch14[_reg4]_dinov2.lvd142m`) or Meta's own
`dinov2_vit{s,b}14[_reg4]_pretrain.pth`, converted by `checkpoint_filter` exactly as timm's
`_convert_dinov2` does.
"""

from dca_jax.backbones import Family, Variant

_LVD = 'LVD-142M self-supervised, 518 px (DINOv2)'
_SMALL = dict(width=384, depth=12, num_heads=6, mlp_dim=1536, patch_size=14, layer_scale=True)
_BASE = dict(width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=14, layer_scale=True)
_REG4 = dict(num_registers=4, no_embed_class=True)


def _variant(name, arch, timm_name, what):
  return Variant(name, arch, 'imagenet', timm_name, interpolation='bicubic', pretrained_size=518,
                 weights=f'timm/{timm_name}.lvd142m', description=f'{what}, {_LVD}')


def checkpoint_filter(state):
  """Meta's DINOv2 state dict (`mask_token`, `register_tokens`, CLS slot in `pos_embed`) ->
  timm's (timm `_convert_dinov2`); None for any other checkpoint."""
  if 'mask_token' not in state:
    return None
  state = {key: value for key, value in state.items() if key != 'mask_token'}
  if 'register_tokens' in state:
    # timm's no_embed_class model: neither CLS nor the registers overlap the position table.
    state['reg_token'] = state.pop('register_tokens')
    pos_embed = state.pop('pos_embed')
    state['cls_token'] = state['cls_token'] + pos_embed[:, :1]
    state['pos_embed'] = pos_embed[:, 1:]
  if any('.mlp.w12.' in key for key in state):
    raise ValueError('DINOv2 checkpoint with a SwiGLU MLP (mlp.w12: ViT-g/14), which this '
                     'backbone does not implement')
  return state


FAMILY = Family('dinov2', 'DINOv2 (layer scale, patch 14, optional registers)', (
    _variant('dinov2_small', _SMALL, 'vit_small_patch14_dinov2', 'DINOv2 ViT-S/14'),
    _variant('dinov2_base', _BASE, 'vit_base_patch14_dinov2', 'DINOv2 ViT-B/14'),
    _variant('dinov2_small_reg4', dict(_SMALL, **_REG4), 'vit_small_patch14_reg4_dinov2',
             'DINOv2 ViT-S/14 with 4 registers'),
    _variant('dinov2_base_reg4', dict(_BASE, **_REG4), 'vit_base_patch14_reg4_dinov2',
             'DINOv2 ViT-B/14 with 4 registers'),
), checkpoint_filter=checkpoint_filter)
