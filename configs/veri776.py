"""DCAL on VeRi-776 (576 train vehicle identities), 256 x 256 input, the paper's Re-ID recipe.

data_dir holds VeRi/ (image_train/, image_query/, image_test/). See docs/REID.md.
"""
from dca_jax import hub, tasks


def get_config(arg=None):
  c = tasks.task_config('reid', arg or 'vit_base')
  c.dataset = 'veri776'
  c.num_classes = 576
  # the paper's weights for the backbone (DINOv2/CLIP: their own), fetched once (docs/WEIGHTS.md)
  c.pretrained_model = hub.default_weights(c.backbone)
  c.input_size, c.input_width = 256, 256
  return c
