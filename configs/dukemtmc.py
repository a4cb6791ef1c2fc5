"""DCAL on DukeMTMC-reID (702 train identities), the paper's Re-ID recipe (docs/REID.md).

The set was withdrawn by its authors; the layout is supported for those who hold it.
data_dir holds DukeMTMC-reID/ (bounding_box_train/, query/, bounding_box_test/).
"""
from dca_jax import hub, tasks


def get_config(arg=None):
  c = tasks.task_config('reid', arg or 'vit_base')
  c.dataset = 'dukemtmc'
  c.num_classes = 702
  # the paper's weights for the backbone (DINOv2/CLIP: their own), fetched once (docs/WEIGHTS.md)
  c.pretrained_model = hub.default_weights(c.backbone)
  return c
