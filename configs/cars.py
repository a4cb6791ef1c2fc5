"""DCAL on Stanford Cars (196 classes) with the paper's FGVC recipe (METHOD.md)."""
from dca_jax import hub, tasks


def get_config(arg=None):
  c = tasks.task_config('fgvc', arg or 'deit_tiny')
  c.dataset = 'cars'
  c.data_source = 'tfds'       # or 'folder' with data_dir holding the devkit layout
  c.num_classes = 196
  # the paper's weights for the backbone (DINOv2/CLIP: their own), fetched once (docs/WEIGHTS.md)
  c.pretrained_model = hub.default_weights(c.backbone)
  return c
