"""Re-ID on your own data: DATA/{train,query,gallery}/<identity>/<image>, cameras optional
(DATA/cameras.csv); docs/REID_DATA.md, "Your own data".

  python main.py --config configs/reid_folder.py:vit_base --workdir runs/mine \\
      --config.data_dir=/data/mine           # the paper's Re-ID recipe on ImageNet ViT-B (GPU)
  python main.py --config configs/reid_folder.py --workdir runs/mine_cpu \\
      --config.data_dir=/data/mine           # the Re-ID demo's small DCAL from scratch (CPU)
  python main.py --workdir runs/mine --mode search --images new/ --gallery /data/mine/gallery

The number of train identities is taken from the folders (num_classes=0); persons at
256 x 128 (set --config.input_width=256 for vehicles).
"""
from dca_jax import hub, tasks


def get_config(arg=None):
  c = tasks.task_config('reid', arg or 'deit_tiny')
  c.dataset, c.data_source = 'reid_folder', 'folder'
  c.num_classes = 0
  if arg:                                   # the paper's recipe on a pretrained backbone
    c.pretrained_model = hub.default_weights(c.backbone)
    return c
  # the Re-ID demo's model and optimiser (configs/reid_demo.py), from scratch
  c.input_size, c.input_width = 64, 32
  c.backbone_overrides.update(dict(width=64, depth=3, num_heads=4, mlp_dim=128, patch_size=8))
  c.num_sa_layers, c.num_glca_layers, c.num_pwca_layers = 3, 1, 3
  c.crop_padding = 4
  c.batch_size, c.num_instances = 32, 4
  c.optimizer, c.learning_rate, c.weight_decay = 'adamw', 3e-3, 0.05
  c.max_grad_norm = 1.0
  c.num_epochs, c.warmup_epochs = 24, 1.0
  c.stochastic_depth_prob = 0.0
  c.pretrained_model = 'none'
  c.eval_batch_size, c.eval_frequency, c.save_frequency = 64, 8, 8
  c.log_every_steps = 10
  return c
