"""DCAL on Market-1501 (751 train identities), the paper's Re-ID recipe (docs/REID.md).

python main.py --config configs/market1501.py --workdir runs/market --config.data_dir=/data
fine-tunes the paper's ImageNet-21k ViT-B/16 (timm/vit_base_patch16_224.orig_in21k, fetched once
and cached; TransReID's in21k+in1k file is timm/vit_base_patch16_224.orig_in21k_ft_in1k).
data_dir holds Market-1501-v15.09.15/ (bounding_box_train/, query/, bounding_box_test/).
"""
from dca_jax import hub, tasks


def get_config(arg=None):
  """arg picks the backbone (default vit_base, as in the paper's Re-ID table)."""
  c = tasks.task_config('reid', arg or 'vit_base')
  c.dataset = 'market1501'
  c.num_classes = 751
  # the paper's weights for the backbone (DINOv2/CLIP: their own), fetched once (docs/WEIGHTS.md)
  c.pretrained_model = hub.default_weights(c.backbone)
  return c
