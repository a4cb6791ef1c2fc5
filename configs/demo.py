"""The embedded demo: a small DCAL on the built-in synthetic fine-grained dataset.

Ten classes that differ only by a small two-colour detail at a random place among look-alike
distractors (dca_jax/data/synthetic.py). Trains, saves, restores and evaluates end to end on
2 CPU cores in about 2 minutes, no download (figures in the README):
  python main.py --config configs/demo.py --workdir runs/demo
  python main.py --config configs/demo.py --workdir runs/demo --mode eval
"""
from dca_jax import config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.dataset = c.data_source = 'synthetic'
  c.num_classes = 10
  c.synthetic_num_train, c.synthetic_num_test, c.synthetic_image_size = 3000, 500, 64
  c.resize_size, c.input_size = 64, 56
  c.backbone = 'deit_tiny'
  c.backbone_overrides.update(dict(width=64, depth=3, num_heads=4, mlp_dim=128, patch_size=8))
  c.num_sa_layers, c.num_glca_layers, c.num_pwca_layers = 3, 1, 3
  c.top_k_ratio = 0.2                    # 10 of 49 patches
  c.batch_size, c.gradient_accumulation_steps = 32, 1
  c.learning_rate = 0.048                # x 32/512 -> 3e-3
  c.max_grad_norm = 1.0
  c.weight_decay = 0.05
  c.num_epochs, c.warmup_epochs = 16, 1.0
  c.stochastic_depth_prob = 0.0
  c.use_gradient_checkpointing = False
  c.precision = 'auto'
  c.eval_batch_size = 100
  c.eval_frequency = 8
  c.save_frequency = 8
  c.log_every_steps = 20
  return c
