"""Parameter counts of the backbone variants at 448 px, 200 classes: ours (`jax.eval_shape`) vs
timm's `create_model(name, img_size=448, num_classes=200)`; --write replaces the table between
the BACKBONE-TABLE markers of the file. Needs torch + timm and jax:

  .venv-timm/bin/python -m tools.param_counts [--write docs/PARAMS.md]
"""

from __future__ import annotations

import argparse
import math
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dca_jax import backbones  # noqa: E402
from dca_jax.models import vit  # noqa: E402

IMG, CLASSES = 448, 200
# Each registered variant and the timm architecture its registry entry names.
TIMM_NAMES = {name: variant.timm_name for name, variant in backbones.VARIANTS.items()}


def ours(variant):
  cfg = vit.get_variant(variant)
  model = vit.VisionTransformer(cfg, num_classes=CLASSES)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, IMG, IMG, 3)))
  leaves = jax.tree_util.tree_leaves(shapes['params'])
  total = sum(math.prod(s.shape) for s in leaves)
  stem = shapes['params']['embed'].get('stem')
  stem_n = sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(stem)) if stem else 0
  return total, stem_n, cfg.grid_size(IMG)


def timm_count(name):
  import timm  # pylint: disable=g-import-not-at-top
  m = timm.create_model(name, pretrained=False, img_size=IMG, num_classes=CLASSES)
  return sum(p.numel() for p in m.parameters())


def table():
  lines = [f'| variant | timm model | grid @ {IMG} | ours | of which ResNet stem | timm | equal |',
           '|---|---|---|---:|---:|---:|---|']  # the grid: patches per side (patch 14: 32)
  for v, name in TIMM_NAMES.items():
    n, stem, grid = ours(v)
    t = timm_count(name)
    lines.append(f'| {v} | `{name}` | {grid}x{grid} | {n:,} | {stem:,} | {t:,} | '
                 f'{"yes" if n == t else "NO"} |')
    print(lines[-1], flush=True)
  return '\n'.join(lines)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--write', default=None, help='markdown file with BACKBONE-TABLE markers')
  args = ap.parse_args()
  text = table()
  if args.write:
    with open(args.write) as f:
      doc = f.read()
    pattern = r'(<!-- BACKBONE-TABLE:BEGIN -->\n).*?(<!-- BACKBONE-TABLE:END -->)'
    if not re.search(pattern, doc, flags=re.S):
      raise SystemExit(f'{args.write}: no BACKBONE-TABLE markers')
    new = re.sub(pattern, lambda m: m.group(1) + text + '\n' + m.group(2), doc, flags=re.S)
    with open(args.write, 'w') as f:
      f.write(new)
    print(f'wrote {args.write}')


if __name__ == '__main__':
  main()
