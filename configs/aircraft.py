"""DCAL on FGVC-Aircraft, variant level (100 classes), paper recipe. No TFDS builder: folder only."""
from dca_jax import config_lib, hub


def get_config(arg=None):
  c = config_lib.fgvc_config(backbone=arg or 'deit_tiny')
  c.dataset = 'aircraft'
  c.data_source = 'folder'     # data_dir holds fgvc-aircraft-2013b/
  c.num_classes = 100
  c.pretrained_model = hub.paper_weights(c.backbone)  # the paper's: fetched once, cached (docs/WEIGHTS.md)
  return c
