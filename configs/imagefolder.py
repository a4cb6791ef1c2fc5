"""DCAL on your own classes: DATA/train/<class>/*.jpg and DATA/test/<class>/*.jpg.

  python main.py --config configs/imagefolder.py --workdir runs/mine --config.data_dir=/data/mine
  python main.py --workdir runs/mine --mode eval                 # the run's own config.json
  python main.py --workdir runs/mine --mode predict --images /photos/new/

Without an argument: the demo's small DCAL (3 blocks, 64 wide, 56 px crops of a 64 px resize,
trained from scratch) — minutes on a laptop CPU, no download, a first check that the data is
read as you meant. With a backbone, `configs/imagefolder.py:deit_tiny` (or vit_base, ...): the
paper's FGVC recipe at 448 px, fine-tuning that backbone's ImageNet weights (fetched once and
cached; a GPU is the place for it). The number of classes is taken from the folders
(num_classes=0) and recorded in the run.
"""
from dca_jax import hub, tasks


def get_config(arg=None):
  c = tasks.task_config('fgvc', arg or 'deit_tiny')
  c.dataset, c.data_source = 'imagefolder', 'folder'
  c.num_classes = 0                      # as many as DATA/train/ has folders
  if arg:                                # the paper's recipe on a pretrained backbone
    c.pretrained_model = hub.default_weights(c.backbone)
    return c
  c.resize_size, c.input_size = 64, 56
  c.backbone_overrides.update(dict(width=64, depth=3, num_heads=4, mlp_dim=128, patch_size=8))
  c.num_sa_layers, c.num_glca_layers, c.num_pwca_layers = 3, 1, 3
  c.top_k_ratio = 0.2                    # 10 of 49 patches
  c.batch_size, c.gradient_accumulation_steps = 32, 1
  c.learning_rate = 0.048                # x 32/512 -> 3e-3
  c.max_grad_norm = 1.0
  c.num_epochs, c.warmup_epochs = 16, 1.0
  c.stochastic_depth_prob = 0.0
  c.use_gradient_checkpointing = False
  c.pretrained_model = 'none'
  c.eval_batch_size = 32
  c.log_every_steps = 20
  return c
