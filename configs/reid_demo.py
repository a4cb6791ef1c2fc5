"""The embedded Re-ID demo: a small DCAL on the built-in synthetic Re-ID set, no download.

Person-like figures whose identity is a small two-colour emblem, seen by six "cameras" that
change background, colour cast and scale (dca_jax/data/synthetic_reid.py), written once as
JPEGs in the Market-1501 layout and read back by the Market-1501 reader. Test identities are
never trained on. Trains and evaluates on 2 idle CPU cores in under 3 minutes (figures with their
spread over seeds and thread counts in the README); eval.json also reports the raw-pixel
nearest-neighbour baseline of the same images.
  python main.py --config configs/reid_demo.py --workdir runs/reid_demo
  python main.py --config configs/reid_demo.py --workdir runs/reid_demo --mode eval
"""
from dca_jax import hub, tasks


def get_config(arg=None):
  """arg 'real': the from-scratch recipe for real images in a Market-1501 folder (issue #25;
  docs/REID.md "Real images"): set data_dir (and num_classes if not 300)."""
  c = tasks.task_config('reid', 'deit_tiny')
  c.dataset, c.data_source = 'synthetic_reid', 'synthetic'
  # 64 train identities (as many unseen test ones) and 32 epochs: with 32 identities and 16
  # epochs mAP spread 65.8-74.5 % over seeds and thread counts, with 64 and 24 71.5-77.7 %.
  c.num_classes = 64
  c.synthetic_num_train, c.synthetic_num_test, c.synthetic_image_size = 1600, 800, 64
  from_scratch(c)
  c.batch_size, c.num_instances = 64, 4      # 16 identities x 4 images
  c.num_epochs = 32
  c.eval_batch_size, c.eval_frequency, c.save_frequency = 200, 4, 32   # eval: the curve
  c.log_every_steps = 10
  if arg == 'real':
    return real_images(c)
  if arg == 'real_imagenet':
    return real_imagenet(real_images(c))
  if arg == 'pretrain':
    return pretrain()
  if arg:
    raise ValueError("configs/reid_demo.py takes no argument, 'real', 'real_imagenet' or "
                     f"'pretrain', got {arg!r}")
  return c


def from_scratch(c):
  """The demo's small DCAL and how it learns from scratch, on any Re-ID data (also
  configs/reid_folder.py without a backbone): a 3-block, 64-wide ViT at 64 x 32 px, AdamW,
  and the triplet on batch-standardised distances."""
  c.input_size, c.input_width = 64, 32       # 8 x 4 patches of 8 px
  c.backbone_overrides.update(dict(width=64, depth=3, num_heads=4, mlp_dim=128, patch_size=8))
  c.num_sa_layers, c.num_glca_layers, c.num_pwca_layers = 3, 1, 3
  c.top_k_ratio = 0.3                        # 10 of 32 patches
  c.crop_padding = 4
  # From scratch a tiny ViT learns far faster with AdamW than with the recipe's SGD (made for
  # ImageNet-pretrained weights): with SGD lr 0.05 the identity cross-entropy only fell from
  # 3.47 (chance) to ~2.8 in 24 epochs; AdamW reaches 60 % mAP in the same 24 epochs.
  c.optimizer, c.learning_rate, c.weight_decay = 'adamw', 3e-3, 0.05
  c.max_grad_norm = 1.0
  c.warmup_epochs = 1.0
  c.stochastic_depth_prob = 0.0
  # From scratch the raw triplet (TransReID's, for pretrained weights) can shrink every
  # distance instead of separating identities: all features one point, the loss stuck at
  # ln 2. Batch-standardised distances cannot shrink (losses.batch_hard_triplet).
  c.triplet_feature = 'batch_standardized'
  return c


def real_images(c):
  """The demo's model on real images (measured on tools/real_reid.py's handwriting set, 300
  identities x 6 images, docs/REID.md): the demo's batch-standardised triplet (the raw one
  collapses every feature onto one point within ~20 steps there), no random erasing or
  padding (on 64 x 32 px they wipe out the identity), AdamW lr 1e-3, 120 epochs (the paper's
  count; 18 steps an epoch on that set)."""
  c.dataset, c.data_source, c.num_classes = 'market1501', 'folder', 300
  c.random_erasing, c.crop_padding = 0.0, 0
  c.learning_rate = 1e-3
  c.num_epochs = 120
  c.eval_frequency, c.save_frequency = 20, 20
  return c


def real_imagenet(c):
  """`:real` with the paper's premise, an ImageNet-pretrained backbone: DeiT-T (12 blocks,
  width 192) with timm/deit_tiny_patch16_224.fb_in1k, the 64 x 32 images read at 128 x 64
  (8 x 4 patches of 16 px), and the paper's Re-ID optimiser for pretrained weights (SGD lr
  0.008 at batch 64, 5 warm-up epochs; tasks/reid.py). The data-specific choices of
  `:real` stay (no erasing or padding: they wipe out 10 px digits). Not run on the development
  machine (no weights can be downloaded there): docs/REID.md."""
  base = tasks.task_config('reid', 'deit_tiny')
  c.backbone, c.pretrained_model = base.backbone, hub.default_weights(base.backbone)
  c.backbone_overrides = base.backbone_overrides
  c.input_size, c.input_width = 128, 64
  c.num_sa_layers, c.num_glca_layers, c.num_pwca_layers = 12, 1, 12
  for key in ('optimizer', 'learning_rate', 'weight_decay', 'lr_reference_batch', 'warmup_epochs',
              'max_grad_norm', 'triplet_feature'):  # TransReID's raw triplet: for pretrained
    c[key] = base[key]
  return c


def pretrain():
  """The demo's backbone pretrained as a plain ViT classifier (SA only) on a generic set: for
  the real-image Re-ID run, what ImageNet is for the paper's (tools/real_reid.py
  `write_pretrain`: one real digit per 64 x 64 image, 10 classes, other cameras, only the
  scans of the Re-ID train half). Set data_dir; a run's workdir is then a Re-ID run's
  `pretrained_model`. Measured (docs/REID.md): from scratch this ViT does not learn the task
  in the steps a CPU affords (19.6 % top-1 after 1,170 steps), so it does not yet give the
  Re-ID run the prior that ImageNet weights give."""
  c = tasks.task_config('fgvc', 'deit_tiny')
  c.dataset, c.data_source, c.num_classes = 'imagefolder', 'folder', 10
  c.resize_size, c.input_size = 72, 64           # 8 x 8 patches of 8 px
  c.backbone_overrides.update(dict(width=64, depth=3, num_heads=4, mlp_dim=128, patch_size=8))
  c.num_sa_layers, c.num_glca_layers, c.num_pwca_layers = 3, 0, 0
  c.pretrained_model = 'none'
  c.batch_size, c.gradient_accumulation_steps = 64, 1
  c.optimizer, c.learning_rate, c.lr_reference_batch = 'adamw', 1e-3, 64
  c.weight_decay, c.max_grad_norm = 0.05, 1.0
  c.num_epochs, c.warmup_epochs = 10, 1.0
  c.stochastic_depth_prob = 0.0
  c.use_gradient_checkpointing = False
  c.eval_batch_size, c.eval_frequency, c.save_frequency = 250, 5, 5
  c.log_every_steps = 20
  return c
