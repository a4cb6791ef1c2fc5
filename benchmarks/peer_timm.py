"""The PyTorch peer of `step_serve.py` (benchmarks/peers.py): timm's plain ViT train step.

Runs in a venv with torch and timm (no jax; `benchmarks/run_cpu_peers.sh` makes one): timm's
`deit_tiny_patch16_224(img_size=448)` (or any timm ViT), stochastic depth 0.1, 200 classes,
cross-entropy, AdamW with decay on kernels only (as `dca_jax.optim`), fp32, on synthetic
batches. Served as step_serve's (`machine.serve`): `step`, `fwd` = the loss under no_grad,
`fwdbwd` = no optimizer, `matmul` = an n x n torch.mm. FLOPs from `FlopCounterMode` (a
multiply-add counted as 2, as XLA counts).

  .venv-timm/bin/python -m benchmarks.peer_timm --serve --model deit_tiny_patch16_224 --size 448
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from benchmarks.machine import cpu_model, loadavg, serve


def adamw(model, lr: float, weight_decay: float):
  """No decay on biases, norm scales, pos_embed, cls_token (dca_jax.optim's rule)."""
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    skip = p.ndim <= 1 or name.endswith('.bias') or name in ('pos_embed', 'cls_token')
    (no_decay if skip else decay).append(p)
  return torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                            {'params': no_decay, 'weight_decay': 0.0}],
                           lr=lr, betas=(0.9, 0.999), eps=1e-8)


def make_parts(args) -> tuple:
  import timm  # pylint: disable=g-import-not-at-top
  torch.manual_seed(args.seed)
  model = timm.create_model(args.model, pretrained=False, img_size=args.size,
                            num_classes=args.num_classes, drop_path_rate=args.drop_path).train()
  opt = adamw(model, args.lr, args.weight_decay)
  r = np.random.default_rng(args.seed)
  x = torch.from_numpy(r.standard_normal((args.batch, 3, args.size, args.size), np.float32))
  y = torch.from_numpy(r.integers(0, args.num_classes, (args.batch,)).astype(np.int64))
  a, b = torch.randn(args.n, args.n), torch.randn(args.n, args.n)
  loss = lambda: F.cross_entropy(model(x), y)

  def step():
    opt.zero_grad(set_to_none=True)
    loss().backward()
    opt.step()

  def fwd():
    with torch.no_grad():
      loss()

  def fwdbwd():
    model.zero_grad(set_to_none=True)
    loss().backward()
  return model, {'step': step, 'fwd': fwd, 'fwdbwd': fwdbwd, 'matmul': lambda: torch.mm(a, b)}


def count_flops(parts, n: int) -> dict:
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
  out = {}
  for name in ('fwd', 'fwdbwd'):
    with FlopCounterMode(display=False) as counter:
      parts[name]()
    out[name] = float(counter.get_total_flops())
  # AdamW's element-wise update is not counted (nor by us: tiny)
  return {**out, 'step': out['fwdbwd'], 'matmul': 2.0 * n ** 3}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--serve', action='store_true', help='(the only mode; kept for old commands)')
  p.add_argument('--model', default='deit_tiny_patch16_224', help='timm model name')
  p.add_argument('--size', type=int, default=448)
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--num_classes', type=int, default=200)
  p.add_argument('--drop_path', type=float, default=0.1)
  p.add_argument('--lr', type=float, default=1.5625e-5, help="dca_jax's 5e-4 x 16 / 512")
  p.add_argument('--weight_decay', type=float, default=0.05)
  p.add_argument('--threads', type=int, default=os.cpu_count())
  p.add_argument('--warmup', type=int, default=1, help='untimed runs of each part first')
  p.add_argument('--n', type=int, default=2048, help='matmul size')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--label', default='')
  args = p.parse_args(argv)
  load0, t0 = loadavg(), time.perf_counter()
  torch.set_num_threads(args.threads)
  model, parts = make_parts(args)
  flops = count_flops(parts, args.n)
  for fn in list(parts.values()) * args.warmup:
    fn()
  import timm  # pylint: disable=g-import-not-at-top
  serve({'kind': 'ready', 'framework': 'torch', 'label': args.label, 'model': args.model,
         'size': args.size, 'batch': args.batch, 'num_classes': args.num_classes,
         'drop_path': args.drop_path, 'params': sum(q.numel() for q in model.parameters()),
         'flops': flops, 'matmul_n': args.n, 'threads': torch.get_num_threads(),
         'setup_s': round(time.perf_counter() - t0, 2), 'torch': torch.__version__,
         'timm': timm.__version__, 'cpu': cpu_model(), 'cpu_count': os.cpu_count(),
         'hostname': platform.node(), 'load_start': load0,
         'command': ' '.join(['python', *sys.argv])}, parts)
  return 0


if __name__ == '__main__':
  sys.exit(main())
