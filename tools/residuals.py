"""Bytes the train step's backward pass keeps, per remat policy and precision.

The loss is the step's own (`dca_jax.train_step.build(config, mesh).loss`: every branch, the
task's loss terms, PWCA partners, drop path), traced abstractly with jax's `saved_residuals`, so
ViT-B at 448 px costs only the trace. Residuals that are function arguments (the parameters,
the images) are held anyway and reported apart; the "activations" column is what remat shrinks.

  python -m tools.residuals                      # configs/cub.py:vit_base: 448 px, batch 4
  python -m tools.residuals --config configs/cub.py --config.batch_size=16 --dtypes fp32 --top 15
"""

from __future__ import annotations

import collections
import os

from absl import app, flags
from ml_collections import config_flags

from benchmarks import common
from dca_jax import distributed, train_step

POLICIES = ('None', 'full', 'nothing_saveable', 'dots_saveable', 'checkpoint_dots',
            'dots_with_no_batch_dims_saveable', 'checkpoint_dots_with_no_batch_dims',
            'everything_saveable')
FLAGS = flags.FLAGS


def residuals(config, precision: str, policy: str) -> list:
  """[(bytes, where, is an argument)] of the step's loss under `policy` ('None': no remat)."""
  c = config.copy_and_resolve_references()
  c.pretrained_model = 'none'
  c.use_gradient_checkpointing = policy != 'None'
  c.remat_policy = policy if policy != 'None' else c.remat_policy
  built = train_step.build(c, distributed.make_mesh(), precision=precision)
  state = built.abstract_state
  return common.residuals(built, state.params, state.batch_stats, built.abstract_batch())


def where(src: str) -> str:
  """'output of X from /path/file.py:123:4 (fn)' -> 'X @ file.py:123:4 (fn)'."""
  what, _, loc = src.partition(' from ')
  return f'{what.replace("output of ", "")} @ {loc.split("/")[-1]}'


def largest(found, top: int) -> list:
  """The `top` largest activation sources: (where, MiB, count)."""
  by = collections.defaultdict(lambda: [0, 0])
  for n, src, is_arg in found:
    if not is_arg:
      by[where(src)][0] += n
      by[where(src)][1] += 1
  return sorted(((k, n / 2**20, c) for k, (n, c) in by.items()), key=lambda x: -x[1])[:top]


def main(argv):
  del argv
  c = FLAGS.config
  print(f'The train step\'s loss ({FLAGS["config"].config_filename}: {c.backbone}, '
        f'{c.input_size} px, batch {c.batch_size}, GLCA M={c.num_glca_layers}, PWCA '
        f'T={c.num_pwca_layers})\n')
  print('| dtype | remat policy | activation residuals (MiB) | % of no remat | count '
        '| + argument residuals (params, images) (MiB) |\n|---|---|---:|---:|---:|---:|')
  details = []
  for dtype in FLAGS.dtypes:
    base = None
    for policy in FLAGS.policies:
      found = residuals(c, dtype, policy)
      acts = [n for n, _, is_arg in found if not is_arg]
      base = sum(acts) if base is None else base
      print(f'| {dtype} | {"no remat" if policy == "None" else policy} | {sum(acts) / 2**20:,.1f} '
            f'| {100 * sum(acts) / base:.1f}% | {len(acts)} '
            f'| {sum(n for n, _, is_arg in found if is_arg) / 2**20:,.1f} |', flush=True)
      if FLAGS.top:
        details.append((dtype, policy, largest(found, FLAGS.top)))
  for dtype, policy, rows in details:
    print(f'\n{dtype}, {policy}: largest residual sources (MiB, count)')
    for src, mib, count in rows:
      print(f'  {mib:10.1f}  x{count:<4d} {src}')


if __name__ == '__main__':
  config_flags.DEFINE_config_file(
      'config', os.path.join(common.ROOT, 'configs', 'cub.py:vit_base'),
      'the experiment; any knob as --config.KEY=VALUE', lock_config=True)
  flags.DEFINE_list('dtypes', ['fp32', 'bf16'], 'precisions, one table row each')
  flags.DEFINE_list('policies', list(POLICIES), "remat policies ('None': no remat)")
  flags.DEFINE_integer('top', 0, 'list the N largest residual sources per row')
  app.run(main)
