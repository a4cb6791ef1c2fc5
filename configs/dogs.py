"""DCAL on Stanford Dogs (120 breeds) with the paper's FGVC recipe (METHOD.md).

python main.py --config configs/dogs.py --workdir runs/dogs --config.data_dir=/data

TFDS `stanford_dogs` (12,000 / 8,580), or --config.data_source=folder with data_dir holding
Images/ and lists.tar's train_list.mat / test_list.mat (docs/DATA.md).
"""
from dca_jax import hub, tasks


def get_config(arg=None):
  """arg picks the backbone: deit_tiny (default), deit_small, deit_base, vit_base, r50_vit_base."""
  c = tasks.task_config('fgvc', arg or 'deit_tiny')
  c.dataset = 'dogs'
  c.data_source = 'tfds'       # or 'folder' with data_dir holding Images/ and the lists
  c.num_classes = 120
  # the paper's weights for the backbone (DINOv2/CLIP: their own), fetched once (docs/WEIGHTS.md)
  c.pretrained_model = hub.default_weights(c.backbone)
  return c
