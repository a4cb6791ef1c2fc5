"""DCAL on CUB-200-2011 with the paper's FGVC recipe (METHOD.md).

python main.py --config configs/cub.py --workdir runs/cub --config.data_dir=/data

fine-tunes the paper's weights for the backbone (hub.PAPER_WEIGHTS, fetched once and cached):
deit_tiny/small/base -> timm/deit_{tiny,small,base}_patch16_224.fb_in1k (ImageNet-1k),
vit_base -> timm/vit_base_patch16_224.orig_in21k, r50_vit_base ->
timm/vit_base_r50_s16_224.orig_in21k (ImageNet-21k); 224 px pretraining, position embeddings
resized to the 28 x 28 grid at 448 px. --config.pretrained_model=PATH|HUB_ID|none overrides.
"""
from dca_jax import config_lib, hub


def get_config(arg=None):
  """arg picks the backbone: deit_tiny (default), deit_small, deit_base, vit_base, r50_vit_base."""
  c = config_lib.fgvc_config(backbone=arg or 'deit_tiny')
  c.dataset = 'cub'
  c.data_source = 'tfds'       # or 'folder' with data_dir holding CUB_200_2011/
  c.num_classes = 200
  c.pretrained_model = hub.paper_weights(c.backbone)  # the paper's: fetched once, cached (docs/WEIGHTS.md)
  return c
