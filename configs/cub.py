"""DCAL on CUB-200-2011 with the paper's FGVC recipe (METHOD.md).

python main.py --config configs/cub.py --workdir runs/cub \
    --config.data_dir=/data --config.pretrained_model=/weights/deit_tiny.safetensors
"""
from dca_jax import config_lib


def get_config(arg=None):
  """arg picks the backbone: deit_tiny (default), deit_small, deit_base, vit_base, r50_vit_base."""
  c = config_lib.fgvc_config(backbone=arg or 'deit_tiny')
  c.dataset = 'cub'
  c.data_source = 'tfds'       # or 'folder' with data_dir holding CUB_200_2011/
  c.num_classes = 200
  return c
