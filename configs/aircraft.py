"""DCAL on FGVC-Aircraft, variant level (100 classes), paper recipe; folder only (no TFDS)."""
from dca_jax import hub, tasks


def get_config(arg=None):
  c = tasks.task_config('fgvc', arg or 'deit_tiny')
  c.dataset = 'aircraft'
  c.data_source = 'folder'     # data_dir holds fgvc-aircraft-2013b/
  c.num_classes = 100
  # the paper's weights for the backbone (DINOv2/CLIP: their own), fetched once (docs/WEIGHTS.md)
  c.pretrained_model = hub.default_weights(c.backbone)
  return c
