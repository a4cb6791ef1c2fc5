"""DCAL on NABirds (555 species) with the paper's FGVC recipe (METHOD.md). No TFDS builder:
folder only, data_dir holding nabirds/ (images/, images.txt, classes.txt, ...; docs/DATA.md).

python main.py --config configs/nabirds.py --workdir runs/nabirds --config.data_dir=/data
"""
from dca_jax import hub, tasks


def get_config(arg=None):
  """arg picks the backbone: deit_tiny (default), deit_small, deit_base, vit_base, r50_vit_base."""
  c = tasks.task_config('fgvc', arg or 'deit_tiny')
  c.dataset = 'nabirds'
  c.data_source = 'folder'     # data_dir holds nabirds/
  c.num_classes = 555          # the leaf classes that label images (ids not contiguous)
  # the paper's weights for the backbone (DINOv2/CLIP: their own), fetched once (docs/WEIGHTS.md)
  c.pretrained_model = hub.default_weights(c.backbone)
  return c
