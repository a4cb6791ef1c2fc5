"""Can the demo's ViT learn to READ a digit from scratch? The skill the real-image Re-ID set
needs (docs/REID.md "Real images", issue #25), measured on a plain 10-class task.

The set is tools/real_reid.py's pretraining set (`write_pretrain`: one real handwritten digit
per 64 x 64 image, 10-40 px at a random place, drawn by 8 cameras that change background,
texture, clutter and ink; 500 train images a class). Every model here is trained the same way
(AdamW lr 1e-3, warm-up 100 steps then cosine, weight decay 0.05, batch 64 drawn with one
seed), on the same images, and its test top-1 printed every 200 steps:

  cnn          3 conv layers (32-64-64, 3 x 3, ReLU, 2 x 2 max-pool) + global max-pool: a
               network with translation built in (the control)
  vit          the demo's ViT (width 64, 3 blocks, 4 heads, patch 8), CLS head: what DCAL
               trains in configs/reid_demo.py
  hybrid       the same ViT on a ResNet-v2 stem (root conv + 1 bottleneck of width 32, patch 2:
               the same 8 x 8 grid; `backbone_overrides.resnet_layers=(1,)`)
  vit_centred  the ViT on sklearn's digits scaled to fill the frame, white on black (no
               camera, no search): does the ViT learn at all?

  python -m benchmarks.digits_pretrain_probe --model cnn --steps 600
  python -m benchmarks.digits_pretrain_probe --model vit --steps 1000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from PIL import Image  # noqa: E402

from dca_jax.data import sources  # noqa: E402
from dca_jax.models import vit  # noqa: E402
from tools import real_reid  # noqa: E402

DEMO_VIT = dict(width=64, depth=3, num_heads=4, mlp_dim=128, patch_size=8)


class SmallCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    for width in (32, 64, 64):
      x = nn.max_pool(nn.relu(nn.Conv(width, (3, 3))(x)), (2, 2), (2, 2))
    return nn.Dense(10)(x.max(axis=(1, 2)))


def _model(name: str):
  if name == 'cnn':
    return SmallCNN()
  overrides = dict(DEMO_VIT)
  if name == 'hybrid':
    overrides.update(patch_size=2, resnet_layers=(1,), resnet_width=32)
  return vit.VisionTransformer(vit.get_variant('deit_tiny', overrides), 10)


def _folder(root: str, which: str):
  """(images in [-1, 1], labels) of one split, listed by the project's imagefolder reader."""
  split = getattr(sources.read_folder('imagefolder', root), which)
  images = [np.asarray(Image.open(path).convert('RGB'), np.float32) / 127.5 - 1
            for path in split.paths]
  return np.stack(images), np.asarray(split.labels)


def _centred(train_count: int = 1500):
  scans, labels = real_reid.load_scans()
  images = np.stack([np.asarray(Image.fromarray((s * 255).astype(np.uint8)).resize(
      (64, 64), Image.BILINEAR), np.float32) / 127.5 - 1 for s in scans])
  images = np.repeat(images[..., None], 3, -1)
  return (images[:train_count], labels[:train_count]), (images[train_count:],
                                                        labels[train_count:])


def probe(name: str, steps: int, seed: int, data_base: str) -> list[dict]:
  if name == 'vit_centred':
    (x_train, y_train), (x_test, y_test) = _centred()
  else:
    params = real_reid.PretrainParams(train_per_class=500)
    root = real_reid.ensure_pretrain(data_base, params)
    (x_train, y_train), (x_test, y_test) = _folder(root, 'train'), _folder(root, 'test')
  model = _model('vit' if name == 'vit_centred' else name)
  variables = model.init(jax.random.key(seed), x_train[:1])
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 100, steps, 0.0),
                   weight_decay=0.05)
  opt_state = tx.init(variables)

  @jax.jit
  def step(variables, opt_state, x, y):
    def loss_fn(v):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply(v, x), y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(variables)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss

  predict = jax.jit(lambda v, x: model.apply(v, x).argmax(-1))
  rng = np.random.default_rng(seed)
  rows, start = [], time.time()
  for i in range(steps):
    batch = rng.integers(0, len(x_train), 64)
    variables, opt_state, loss = step(variables, opt_state, x_train[batch], y_train[batch])
    if (i + 1) % 200 == 0 or i + 1 == steps:
      top1 = float(np.mean(np.asarray(predict(variables, x_test)) == y_test))
      rows.append({'model': name, 'seed': seed, 'step': i + 1, 'train_ce': round(float(loss), 3),
                   'test_top1': round(top1, 3), 'seconds': round(time.time() - start, 1)})
      print(json.dumps(rows[-1]), flush=True)
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', choices=('cnn', 'vit', 'hybrid', 'vit_centred'), required=True)
  parser.add_argument('--steps', type=int, default=1000)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--data_base', default=os.path.join(tempfile.gettempdir(),
                                                          'dca_jax_real_reid'))
  parser.add_argument('--out', default='', help='append the rows (JSON lines) to this file')
  args = parser.parse_args(argv)
  rows = probe(args.model, args.steps, args.seed, args.data_base)
  if args.out:
    with open(args.out, 'a') as f:
      f.writelines(json.dumps(row) + '\n' for row in rows)


if __name__ == '__main__':
  main()
