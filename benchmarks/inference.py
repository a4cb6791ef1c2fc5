"""Inference speed of DCAL (the eval/predict forward: softmax(SA) + softmax(GLCA)), img/s.

  python -m benchmarks.inference                          # DeiT-T 448 px, batch 8, the variants
  (cd /path/to/old/checkout && python -m benchmarks.inference --label before)

Times the jitted forward of random images for the DCAL variants that differ in what they
compute: glca_pool=cls (no attention maps, rollout, selection or local query rows: only GLCA's
CLS query), glca_pool=mean with the code's default rollout (now the vector chain), and with the
running product. Run from another checkout (e.g. a `git worktree` of the commit before a
change), the module times that checkout's model code; variants it lacks are skipped. Medians of `--repeats` calls after one warm-up call; XLA's FLOP count alongside.
Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time

import jax

from benchmarks.machine import cpu_model, loadavg
from dca_jax.models import dcal, vit

VARIANTS = {  # None: the plain ViT; else DCAL's keyword arguments (the code's defaults otherwise)
    'sa_only_vit': None,
    'dcal_cls': dict(glca_pool='cls'),
    'dcal_mean': dict(glca_pool='mean'),
    'dcal_mean_running_product': dict(glca_pool='mean', rollout_impl='running_product'),
}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--label', default='after')
  parser.add_argument('--backbone', default='deit_tiny')
  parser.add_argument('--size', type=int, default=448)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--num_classes', type=int, default=200)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--variants', default=','.join(VARIANTS))
  args = parser.parse_args()

  config = vit.get_variant(args.backbone)
  images = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, 3))
  fields = set(inspect.signature(dcal.DCAL).parameters)
  for name in args.variants.split(','):
    kwargs = VARIANTS[name]
    if kwargs is None:
      model = vit.VisionTransformer(config, args.num_classes)
      forward = lambda v, x, m=model: jax.nn.softmax(m.apply(v, x))
    else:
      if not set(kwargs) <= fields:
        print(json.dumps({'label': args.label, 'variant': name, 'skipped': 'not in this code'}))
        continue
      model = dcal.DCAL(config, args.num_classes, **kwargs)
      forward = lambda v, x, m=model: dcal.predict_probs(m.apply(v, x))
    variables = jax.jit(model.init)(jax.random.key(1), images[:1])
    compiled = jax.jit(forward).lower(variables, images).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    jax.block_until_ready(compiled(variables, images))
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(variables, images))
      times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    print(json.dumps({'label': args.label, 'variant': name, 'backbone': args.backbone,
                      'size': args.size, 'batch': args.batch, 'median_s': round(median, 4),
                      'images_per_s': round(args.batch / median, 2),
                      'gflop_per_image': round(cost['flops'] / args.batch / 1e9, 3),
                      'load_avg': loadavg(), 'cpu': cpu_model(),
                      'jax': jax.__version__}), flush=True)


if __name__ == '__main__':
  main()
