"""DCAL on CUB-200-2011 with the paper's FGVC recipe (METHOD.md).

python main.py --config configs/cub.py --workdir runs/cub --config.data_dir=/data

fine-tunes the paper's weights for the backbone (hub.PAPER_WEIGHTS, fetched once and cached):
deit_tiny/small/base -> timm/deit_{tiny,small,base}_patch16_224.fb_in1k (ImageNet-1k),
vit_base -> timm/vit_base_patch16_224.orig_in21k, r50_vit_base ->
timm/vit_base_r50_s16_224.orig_in21k (ImageNet-21k); 224 px pretraining, position embeddings
resized to the 28 x 28 grid at 448 px. --config.pretrained_model=PATH|HUB_ID|none overrides.

Beyond the paper (dca_jax/backbones/, docs/MODEL.md "Backbones"): configs/cub.py:dinov2_base
(also dinov2_small, dinov2_{small,base}_reg4) fine-tunes timm/vit_*_patch14*_dinov2.lvd142m
(518 px pretraining: 37 x 37 position grid resized to 32 x 32 at 448 px, patch 14);
configs/cub.py:clip_base (LAION-2B) or clip_base_quickgelu (OpenAI) the CLIP ViT-B/16 image
tower. The normalisation follows the backbone (imagenet for DINOv2, CLIP's mean/std for CLIP);
the rest is the paper's FGVC recipe, untuned for these backbones.
"""
from dca_jax import hub, tasks


def get_config(arg=None):
  """arg picks the backbone: deit_tiny (default), deit_small, deit_base, vit_base, r50_vit_base;
  dinov2_small, dinov2_base, dinov2_small_reg4, dinov2_base_reg4, clip_base,
  clip_base_quickgelu."""
  c = tasks.task_config('fgvc', arg or 'deit_tiny')
  c.dataset = 'cub'
  c.data_source = 'tfds'       # or 'folder' with data_dir holding CUB_200_2011/
  c.num_classes = 200
  # the paper's weights for its backbones, the registry entry's for the others: fetched once,
  # cached (docs/WEIGHTS.md)
  c.pretrained_model = hub.default_weights(c.backbone)
  return c
