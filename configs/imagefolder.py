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
from configs import demo
from dca_jax import hub, tasks


def get_config(arg=None):
  if arg:  # the paper's recipe on a pretrained backbone
    c = tasks.task_config('fgvc', arg)
    c.pretrained_model = hub.default_weights(c.backbone)
  else:    # the demo's small DCAL (configs/demo.py), from scratch
    c = demo.get_config()
    c.eval_batch_size, c.eval_frequency, c.save_frequency = 32, 1, 1
  c.dataset, c.data_source = 'imagefolder', 'folder'
  c.num_classes = 0                      # as many as DATA/train/ has folders
  return c
