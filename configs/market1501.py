"""DCAL on Market-1501 (751 train identities), the paper's Re-ID recipe (docs/REID.md).

python main.py --config configs/market1501.py --workdir runs/market \
    --config.data_dir=/data --config.pretrained_model=/weights/ViT-B_16.npz
data_dir holds Market-1501-v15.09.15/ (bounding_box_train/, query/, bounding_box_test/).
"""
from dca_jax import config_lib


def get_config(arg=None):
  """arg picks the backbone (default vit_base, as in the paper's Re-ID table)."""
  c = config_lib.reid_config(backbone=arg or 'vit_base')
  c.dataset = 'market1501'
  c.num_classes = 751
  return c
