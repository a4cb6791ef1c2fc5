"""Google's ViT-B/16 (ImageNet-21k, original and AugReg) and the R50+ViT-B/16 hybrid.

Inception normalisation ([-1, 1]); the checkpoints come as Google `.npz` or as timm ports
(`vit_base_patch16_224.*`, `vit_base_r50_s16_224.*`). The `.npz` layout is converted by
`weights._convert_google`."""

from dca_jax.backbones import Family, Variant

_ORIG_IN21K = 'ImageNet-21k, 224 px (the original Google ViT release)'

FAMILY = Family('google', 'Google ViT / AugReg (npz or timm layout)', (
    Variant('vit_base', dict(width=768, depth=12, num_heads=12, mlp_dim=3072), 'inception',
            'vit_base_patch16_224',
            weights='timm/vit_base_patch16_224.orig_in21k',
            description=f'ViT-B/16, {_ORIG_IN21K}'),
    # R50+ViT-B/16: ResNet-v2 (3, 4, 9) stride 16, then a 1x1 "patch" embedding.
    Variant('r50_vit_base', dict(width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=1,
                                 resnet_layers=(3, 4, 9)), 'inception',
            'vit_base_r50_s16_224',
            weights='timm/vit_base_r50_s16_224.orig_in21k',
            description=f'R50+ViT-B/16 hybrid, {_ORIG_IN21K}'),
))
