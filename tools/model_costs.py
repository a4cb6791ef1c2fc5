"""Parameter counts and inference FLOPs of DCAL against the SA-only ViT (docs/MODEL.md; paper: +9 %
params / +2 % FLOPs for DeiT-T): parameters from `jax.eval_shape`, FLOPs from XLA's cost
analysis of the compiled inference function (a multiply-add is 2), for each `glca_pool` and
both rollouts (vector chain, running product), with the model and alone. With --timm: every
registered backbone's count against timm's `create_model(name, img_size=, num_classes=)`
(docs/PARAMS.md; needs torch + timm beside jax), --write FILE replacing the table between
FILE's BACKBONE-TABLE markers.

  python -m tools.model_costs [--flops_variants deit_tiny --size 448 --num_classes 200]
  .venv-timm/bin/python -m tools.model_costs --timm [--write docs/PARAMS.md]
"""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
import numpy as np

from dca_jax import backbones, xla_costs
from dca_jax.models import dcal, vit


def count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def abstract_params(model, size, batch=1):
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  return jax.eval_shape(lambda k, x: model.init(k, x), key, images)['params'], images


def param_counts(variant, size, num_classes):
  cfg = vit.get_variant(variant)
  sa = count(abstract_params(vit.VisionTransformer(cfg, num_classes), size)[0])
  dc = abstract_params(dcal.DCAL(cfg, num_classes, num_glca_layers=1,
                                 num_pwca_layers=cfg.depth), size)[0]
  glca = count({k: dc[k] for k in ('glca_block', 'glca_norm', 'glca_head')})
  return sa, count(dc), glca


def timm_table(size, num_classes) -> str:
  """Each registered variant (`vit.VisionTransformer`) against the timm architecture its
  registry entry names; a line printed as each is counted."""
  import timm  # pylint: disable=g-import-not-at-top
  lines = [f'| variant | timm model | grid @ {size} | ours | of which ResNet stem | timm | equal |',
           '|---|---|---|---:|---:|---:|---|']  # the grid: patches per side (patch 14: 32)
  for v, entry in backbones.VARIANTS.items():
    cfg = vit.get_variant(v)
    params = abstract_params(vit.VisionTransformer(cfg, num_classes), size)[0]
    n, stem = count(params), count(params['embed'].get('stem', {}))
    t = sum(p.numel() for p in timm.create_model(entry.timm_name, pretrained=False, img_size=size,
                                                  num_classes=num_classes).parameters())
    lines.append(f'| {v} | `{entry.timm_name}` | {cfg.grid_size(size)}x{cfg.grid_size(size)} | '
                 f'{n:,} | {stem:,} | {t:,} | {"yes" if n == t else "NO"} |')
    print(lines[-1], flush=True)
  return '\n'.join(lines)


def write_table(path, text) -> None:
  with open(path) as f:
    doc = f.read()
  pattern = r'(<!-- BACKBONE-TABLE:BEGIN -->\n).*?(<!-- BACKBONE-TABLE:END -->)'
  if not re.search(pattern, doc, flags=re.S):
    raise SystemExit(f'{path}: no BACKBONE-TABLE markers')
  with open(path, 'w') as f:
    f.write(re.sub(pattern, lambda m: m.group(1) + text + '\n' + m.group(2), doc, flags=re.S))
  print(f'wrote {path}')


def flops(fn, *args):
  return xla_costs.flops(jax.jit(fn).lower(*args).compile())


DCAL_VARIANTS = {  # name -> DCAL keyword arguments
    'dcal_cls': dict(glca_pool='cls'),
    'dcal_mean': dict(glca_pool='mean'),
    'dcal_mean_running_product': dict(glca_pool='mean', rollout_impl='running_product'),
    'dcal_no_glca': dict(num_glca_layers=0),
}


def inference_flops(variant, size, num_classes, batch=1):
  cfg = vit.get_variant(variant)
  out = {}
  vit_model = vit.VisionTransformer(cfg, num_classes)
  p, x = abstract_params(vit_model, size, batch)
  out['sa_vit'] = flops(lambda p, x: vit_model.apply({'params': p}, x), p, x)
  for name, kwargs in DCAL_VARIANTS.items():
    model = dcal.DCAL(cfg, num_classes, num_pwca_layers=cfg.depth, **kwargs)
    p, x = abstract_params(model, size, batch)
    # predict_probs is what evaluation runs; no partner -> no PWCA at inference.
    out[name] = flops(lambda p, x, m=model: dcal.predict_probs(m.apply({'params': p}, x)), p, x)
  n = cfg.num_patches(size) + cfg.num_prefix_tokens  # CLS (+ registers) + patches
  k = cfg.depth - 1  # the blocks before GLCA
  maps = [jax.ShapeDtypeStruct((batch, n, n), jnp.float32)] * k
  for impl in ('vector', 'running_product'):
    out[f'rollout_{impl}'] = flops(lambda m, impl=impl: dcal.rollout_cls_row(m, impl), maps)
  # analytic multiply-adds x 2: K-1 vector-matrix products | K-2 (N+1)^3 products + one vector
  out['rollout_vector_analytic'] = 2.0 * batch * (k - 1) * n ** 2
  out['rollout_running_product_analytic'] = 2.0 * batch * ((k - 2) * n ** 3 + n ** 2)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--size', type=int, default=448)
  p.add_argument('--num_classes', type=int, default=200)
  p.add_argument('--param_variants', default=','.join(vit.VARIANTS))
  p.add_argument('--flops_variants', default='deit_tiny,vit_base')
  p.add_argument('--timm', action='store_true', help="the backbones' counts against timm's")
  p.add_argument('--write', default='', help='with --timm: a file with BACKBONE-TABLE markers')
  a = p.parse_args()
  if a.timm:
    text = timm_table(a.size, a.num_classes)
    if a.write:
      write_table(a.write, text)
    return

  print(f'## Parameters at {a.size} px, {a.num_classes} classes (jax.eval_shape)\n')
  print('| backbone | SA-only ViT | DCAL (SA+GLCA; PWCA adds none) | GLCA block+norm+head | DCAL / SA |')
  print('|---|---:|---:|---:|---:|')
  for v in a.param_variants.split(','):
    try:
      sa, dc, glca = param_counts(v, a.size, a.num_classes)
    except Exception as e:  # pylint: disable=broad-except
      print(f'| {v} | n/a ({type(e).__name__}: {e}) | | | |')
      continue
    print(f'| {v} | {sa / 1e6:.3f} M | {dc / 1e6:.3f} M | {glca / 1e6:.3f} M | +{100 * (dc / sa - 1):.1f}% |',
          flush=True)

  print(f'\n## Inference FLOPs at {a.size} px, batch 1 (XLA cost analysis, CPU)\n')
  print('| backbone | SA-only ViT | DCAL glca_pool=cls (no rollout) | DCAL glca_pool=mean (vector '
        'rollout) | same, running-product rollout | DCAL, GLCA off | rollout alone, vector (XLA / '
        'analytic) | rollout alone, running product (XLA / analytic) |')
  print('|---|---:|---:|---:|---:|---:|---:|---:|')
  for v in filter(None, a.flops_variants.split(',')):
    f = inference_flops(v, a.size, a.num_classes)
    g = 1e9
    rel = lambda key: f"{f[key] / g:.2f} G (+{100 * (f[key] / f['sa_vit'] - 1):.1f}%)"
    print(f"| {v} | {f['sa_vit'] / g:.2f} G | {rel('dcal_cls')} | {rel('dcal_mean')} "
          f"| {rel('dcal_mean_running_product')} | {rel('dcal_no_glca')} "
          f"| {f['rollout_vector'] / 1e6:.1f} M / {f['rollout_vector_analytic'] / 1e6:.1f} M "
          f"| {f['rollout_running_product'] / g:.2f} G / "
          f"{f['rollout_running_product_analytic'] / g:.2f} G |", flush=True)


if __name__ == '__main__':
  main()
