"""DCAL on Oxford-IIIT Pets (37 breeds) with the paper's FGVC recipe (METHOD.md).

python main.py --config configs/pets.py --workdir runs/pets --config.data_dir=/data

TFDS `oxford_iiit_pet` (trainval 3,680 / test 3,669), or --config.data_source=folder with
data_dir holding images/ and annotations/{trainval,test}.txt (docs/DATA.md).
"""
from dca_jax import hub, tasks


def get_config(arg=None):
  """arg picks the backbone: deit_tiny (default), deit_small, deit_base, vit_base, r50_vit_base."""
  c = tasks.task_config('fgvc', arg or 'deit_tiny')
  c.dataset = 'pets'
  c.data_source = 'tfds'       # or 'folder' with data_dir holding images/ and annotations/
  c.num_classes = 37
  # the paper's weights for the backbone (DINOv2/CLIP: their own), fetched once (docs/WEIGHTS.md)
  c.pretrained_model = hub.default_weights(c.backbone)
  return c
