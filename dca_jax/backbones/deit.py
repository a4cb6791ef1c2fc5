"""DeiT-T/S/B (Touvron et al. 2021): the plain pre-LN ViT, ImageNet-1k, ImageNet mean/std.

timm: `deit_{tiny,small,base}_patch16_224`; their checkpoints are timm's layout already (a
distilled DeiT's `dist_token` is dropped by the importer)."""

from dca_jax.backbones import Family, Variant

_DEIT = 'ImageNet-1k, 224 px (DeiT)'

FAMILY = Family('deit', 'DeiT (ImageNet-1k, timm layout)', (
    Variant('deit_tiny', dict(width=192, depth=12, num_heads=3, mlp_dim=768), 'imagenet',
            'deit_tiny_patch16_224', weights='timm/deit_tiny_patch16_224.fb_in1k',
            description=f'DeiT-T/16, {_DEIT}'),
    Variant('deit_small', dict(width=384, depth=12, num_heads=6, mlp_dim=1536), 'imagenet',
            'deit_small_patch16_224', weights='timm/deit_small_patch16_224.fb_in1k',
            description=f'DeiT-S/16, {_DEIT}'),
    Variant('deit_base', dict(width=768, depth=12, num_heads=12, mlp_dim=3072), 'imagenet',
            'deit_base_patch16_224', weights='timm/deit_base_patch16_224.fb_in1k',
            description=f'DeiT-B/16, {_DEIT}'),
))
