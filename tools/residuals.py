"""Bytes of residuals the DCAL train loss saves for the backward pass, per remat policy.

The full training loss (SA + GLCA + PWCA, uncertainty weighting, partner from `derangement`,
stochastic depth on) is traced abstractly with `jax.ad_checkpoint.saved_residuals`: nothing is
allocated, so ViT-B at 448 px costs only the trace. Residuals that are function arguments
(the parameters, the images) are held anyway and are reported separately; the "activations"
column is what remat is meant to shrink.

  python -m tools.residuals                         # ViT-B, 448 px, batch 4, fp32 + bf16
  python -m tools.residuals --backbone deit_tiny --batch 16 --dtypes fp32 --top 15
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import re


import jax  # pylint: disable=g-import-not-at-top
import jax.ad_checkpoint  # noqa: F401  (print_saved_residuals)
import jax.numpy as jnp

try:  # jax 0.10 exposes only print_saved_residuals publicly; the list it prints comes from here.
  from jax._src.ad_checkpoint import saved_residuals as _saved_residuals
except ImportError:  # pragma: no cover
  _saved_residuals = None

from dca_jax import losses
from dca_jax.models import dcal, vit

POLICIES = (None, 'full', 'nothing_saveable', 'dots_saveable', 'checkpoint_dots',
            'dots_with_no_batch_dims_saveable', 'checkpoint_dots_with_no_batch_dims',
            'everything_saveable')
DTYPES = {'fp32': jnp.float32, 'bf16': jnp.bfloat16}


def make_loss(model):
  def loss_fn(params, images, labels, key):
    k_pair, k_drop = jax.random.split(key)
    partner = dcal.derangement(k_pair, images.shape[0])
    out = model.apply({'params': params}, images, train=True, partner=partner,
                      rngs={'dropout': k_drop})
    return losses.dcal_loss(out, labels)[0]
  return loss_fn


def abstract_inputs(model, batch, size):
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)  # raw PRNGKey data
  partner = jax.ShapeDtypeStruct((batch,), jnp.int32)
  params = jax.eval_shape(
      lambda k, x, p: model.init({'params': k, 'dropout': k}, x, train=True, partner=p),
      key, images, partner)['params']
  return params, images, labels, key


class _Aval:
  """Shape/dtype parsed from print_saved_residuals' 'f32[4,785,768]' text (fallback path)."""

  def __init__(self, text):
    self.text = text
    m = re.match(r'([a-z]+?)(\d*)\[([\d,]*)\]', text)  # f32[4,785,768], bf16[...], bool[4]
    if m is None:
      raise ValueError(f'cannot parse residual aval {text!r}')
    self.itemsize = max(1, int(m.group(2) or 8) // 8)
    self.size = 1
    for d in filter(None, m.group(3).split(',')):
      self.size *= int(d)

  def str_short(self):
    return self.text


def saved_residuals(f, *args):
  """[(aval-like, description)]: jax's own list, or parsed from print_saved_residuals."""
  if _saved_residuals is not None:
    return _saved_residuals(f, *args)
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    jax.ad_checkpoint.print_saved_residuals(f, *args)
  return [(_Aval(line.split(' ', 1)[0]), line.split(' ', 1)[1])
          for line in buf.getvalue().splitlines() if line.strip()]


def nbytes(aval):
  if isinstance(aval, _Aval):
    return aval.size * aval.itemsize
  return aval.size * aval.dtype.itemsize


def residuals(backbone, size, batch, dtype, policy, num_classes):
  cfg = vit.get_variant(backbone)
  model = dcal.DCAL(cfg, num_classes=num_classes, num_glca_layers=1, num_pwca_layers=cfg.depth,
                    top_k_ratio=0.1, stochastic_depth_prob=0.1, dtype=dtype, remat_policy=policy)
  args = abstract_inputs(model, batch, size)
  res = saved_residuals(make_loss(model), *args)
  from_args = sum(nbytes(a) for a, src in res if src.startswith('from the argument'))
  acts = [(nbytes(a), a, src) for a, src in res if not src.startswith('from the argument')]
  return from_args, acts


def where(src):
  """'output of X from /path/file.py:123:4 (fn)' -> 'X @ file.py:123 (fn)'."""
  what, _, loc = src.partition(' from ')
  loc = loc.split('/')[-1]
  return f'{what.replace("output of ", "")} @ {loc}'


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--backbone', default='vit_base')
  p.add_argument('--size', type=int, default=448)
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--num_classes', type=int, default=200)
  p.add_argument('--dtypes', default='fp32,bf16')
  p.add_argument('--policies', default=','.join(str(x) for x in POLICIES))
  p.add_argument('--top', type=int, default=0, help='list the N largest residual sources per row')
  a = p.parse_args()
  mib = 2.0 ** -20
  print(f'DCAL train loss (SA + GLCA + PWCA T=L, uncertainty loss), {a.backbone}, {a.size} px, '
        f'batch {a.batch}, {a.num_classes} classes\n')
  print('| dtype | remat policy | activation residuals (MiB) | % of no remat | count '
        '| + argument residuals (params, images) (MiB) |')
  print('|---|---|---:|---:|---:|---:|')
  details = []
  for dname in a.dtypes.split(','):
    base = None
    for pol in a.policies.split(','):
      policy = None if pol in ('None', 'none', '') else pol
      from_args, acts = residuals(a.backbone, a.size, a.batch, DTYPES[dname], policy, a.num_classes)
      total = sum(n for n, _, _ in acts)
      base = total if policy is None else base
      print(f'| {dname} | {policy or "no remat"} | {total * mib:,.1f} | {100 * total / base:.1f}% '
            f'| {len(acts)} | {from_args * mib:,.1f} |', flush=True)
      if a.top:
        by_src = collections.defaultdict(lambda: [0, 0, None])
        for n, aval, src in acts:
          e = by_src[where(src)]
          e[0] += n
          e[1] += 1
          if e[2] is None or n > e[2][0]:
            e[2] = (n, aval.str_short())  # the largest of the group
        details.append((dname, policy, sorted(by_src.items(), key=lambda kv: -kv[1][0])[:a.top]))
  for dname, policy, rows in details:
    print(f'\n{dname}, {policy or "no remat"}: largest residual sources (MiB, count, largest shape)')
    for src, (n, c, (_, shape)) in rows:
      print(f'  {n * mib:10.1f}  x{c:<4d} {shape:28s} {src}')


if __name__ == '__main__':
  main()
