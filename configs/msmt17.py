"""DCAL on MSMT17 (1,041 train identities; train + val lists merged), the paper's Re-ID recipe.

data_dir holds MSMT17_V1/ or MSMT17_V2/ (the version read is recorded in eval.json: it moves
published mAP by several points). See docs/REID.md.
"""
from dca_jax import hub, tasks


def get_config(arg=None):
  c = tasks.task_config('reid', arg or 'vit_base')
  c.dataset = 'msmt17'
  c.num_classes = 1041
  # the paper's weights for the backbone (DINOv2/CLIP: their own), fetched once (docs/WEIGHTS.md)
  c.pretrained_model = hub.default_weights(c.backbone)
  return c
