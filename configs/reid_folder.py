"""Re-ID on your own data: DATA/{train,query,gallery}/<identity>/<image>, cameras optional
(DATA/cameras.csv); docs/REID_DATA.md, "Your own data".

  python main.py --config configs/reid_folder.py:vit_base --workdir runs/mine \\
      --config.data_dir=/data/mine           # the paper's Re-ID recipe on ImageNet ViT-B (GPU)
  python main.py --config configs/reid_folder.py --workdir runs/mine_cpu \\
      --config.data_dir=/data/mine           # the Re-ID demo's small DCAL from scratch (CPU)
  python main.py --workdir runs/mine --mode search --images new/ --gallery /data/mine/gallery

The number of train identities is taken from the folders (num_classes=0). With a backbone:
persons at 256 x 128 (set --config.input_width=256 for vehicles); without: 64 x 32 and the
demo's from-scratch settings (configs/reid_demo.py `from_scratch`: AdamW, the triplet on
batch-standardised distances).
"""
from configs import reid_demo
from dca_jax import hub, tasks


def get_config(arg=None):
  c = tasks.task_config('reid', arg or 'deit_tiny')
  c.dataset, c.data_source = 'reid_folder', 'folder'
  c.num_classes = 0
  if arg:                                   # the paper's recipe on a pretrained backbone
    c.pretrained_model = hub.default_weights(c.backbone)
    return c
  reid_demo.from_scratch(c)                 # the demo's model, optimiser and triplet
  c.pretrained_model = 'none'
  c.batch_size, c.num_instances = 32, 4
  c.num_epochs = 24
  c.eval_batch_size, c.eval_frequency, c.save_frequency = 64, 8, 8
  c.log_every_steps = 10
  return c
