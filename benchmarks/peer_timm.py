"""The PyTorch peer of `step_serve.py`: timm's plain ViT train step on synthetic batches.

Runs in a venv with torch and timm (no jax; `benchmarks/run_cpu_peers.sh` makes one). The step
is what a timm user runs for the plain classifier our SA-only step matches: timm's
`deit_tiny_patch16_224(img_size=448)` (or any timm ViT name), the same stochastic depth (0.1)
and classes (200), cross-entropy, AdamW (lr 1.5625e-5, betas 0.9/0.999, eps 1e-8, weight decay
0.05 on kernels only: not on biases, norms, pos_embed, cls_token, as `dca_jax.optim`), fp32,
`torch.set_num_threads(--threads)`.

  # standalone: one JSON line (medians of the timed steps)
  python -m benchmarks.peer_timm --model deit_tiny_patch16_224 --size 448 --batch 4 --steps 5
  # peer mode for benchmarks/peers.py: one '@@ {ready}' line, then one timed command per stdin
  # line (step | fwd | fwdbwd | matmul | quit), each answered by '@@ {cmd, s, minflt, user_s, sys_s, maxrss_mb}'
  python -m benchmarks.peer_timm --serve ...

`fwd` is the loss's forward under `torch.no_grad()` (train mode, drop path on), `fwdbwd` the
forward and backward without the optimizer, `matmul` an n x n `torch.mm` (MKL's fp32 rate).
FLOPs come from `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and
scaled_dot_product_attention, a multiply-add counted as 2, as XLA counts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from benchmarks.machine import cpu_model, loadavg

SERVE_PREFIX = '@@ '






def reply(rec: dict) -> None:
  sys.stdout.write(SERVE_PREFIX + json.dumps(rec) + '\n')
  sys.stdout.flush()


def make_optimizer(model, lr: float, weight_decay: float):
  """AdamW with decay on kernels only (dca_jax.optim.NO_DECAY_PATTERNS: biases, norm scales,
  pos_embed, cls_token get none)."""
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    skip = p.ndim <= 1 or name.endswith('.bias') or name in ('pos_embed', 'cls_token')
    (no_decay if skip else decay).append(p)
  return torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                            {'params': no_decay, 'weight_decay': 0.0}],
                           lr=lr, betas=(0.9, 0.999), eps=1e-8)


def build(args):
  import timm  # pylint: disable=g-import-not-at-top
  torch.manual_seed(args.seed)
  model = timm.create_model(args.model, pretrained=False, img_size=args.size,
                            num_classes=args.num_classes, drop_path_rate=args.drop_path)
  model.train()
  opt = make_optimizer(model, args.lr, args.weight_decay)
  r = np.random.default_rng(args.seed)
  # NCHW, as timm takes it (our JAX step takes NHWC: same data, each framework's own layout)
  x = torch.from_numpy(r.standard_normal((args.batch, 3, args.size, args.size), np.float32))
  y = torch.from_numpy(r.integers(0, args.num_classes, (args.batch,)).astype(np.int64))
  return model, opt, x, y


def make_parts(model, opt, x, y, n: int):
  def fwd_loss():
    return F.cross_entropy(model(x), y)

  def step():
    opt.zero_grad(set_to_none=True)
    fwd_loss().backward()
    opt.step()

  def fwd():
    with torch.no_grad():
      fwd_loss()

  def fwdbwd():
    model.zero_grad(set_to_none=True)
    fwd_loss().backward()

  a, b = torch.randn(n, n), torch.randn(n, n)

  def matmul():
    torch.mm(a, b)

  return {'step': step, 'fwd': fwd, 'fwdbwd': fwdbwd, 'matmul': matmul}


def count_flops(parts, n: int) -> dict:
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
  out = {}
  for name in ('fwd', 'fwdbwd'):
    with FlopCounterMode(display=False) as counter:
      parts[name]()
    out[name] = float(counter.get_total_flops())
  out['step'] = out['fwdbwd']  # AdamW's element-wise update is not counted (nor by us: tiny)
  out['matmul'] = 2.0 * n ** 3
  return out


def timed(fn) -> dict:
  """Wall seconds, minor page faults, CPU seconds (user, system), peak RSS after one call."""
  r0 = resource.getrusage(resource.RUSAGE_SELF)
  s = time.perf_counter()
  fn()
  dt = time.perf_counter() - s
  r1 = resource.getrusage(resource.RUSAGE_SELF)
  return {'s': dt, 'minflt': r1.ru_minflt - r0.ru_minflt, 'user_s': r1.ru_utime - r0.ru_utime,
          'sys_s': r1.ru_stime - r0.ru_stime, 'maxrss_mb': r1.ru_maxrss / 1024}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', default='deit_tiny_patch16_224', help='timm model name')
  p.add_argument('--size', type=int, default=448)
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--num_classes', type=int, default=200)
  p.add_argument('--drop_path', type=float, default=0.1)
  # dca_jax's default recipe at effective batch 16: 5e-4 * 16 / 512
  p.add_argument('--lr', type=float, default=1.5625e-5)
  p.add_argument('--weight_decay', type=float, default=0.05)
  p.add_argument('--threads', type=int, default=os.cpu_count())
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--warmup', type=int, default=1, help='untimed runs of each part first')
  p.add_argument('--n', type=int, default=2048, help='matmul size')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--label', default='')
  p.add_argument('--serve', action='store_true')
  args = p.parse_args(argv)

  load0 = loadavg()
  torch.set_num_threads(args.threads)
  t0 = time.perf_counter()
  model, opt, x, y = build(args)
  parts = make_parts(model, opt, x, y, args.n)
  flops = count_flops(parts, args.n)
  for _ in range(args.warmup):
    for fn in parts.values():
      fn()
  import timm  # pylint: disable=g-import-not-at-top
  info = {'kind': 'ready', 'framework': 'torch', 'label': args.label, 'model': args.model,
          'size': args.size, 'batch': args.batch, 'num_classes': args.num_classes,
          'drop_path': args.drop_path, 'params': sum(q.numel() for q in model.parameters()),
          'flops': flops, 'matmul_n': args.n, 'threads': torch.get_num_threads(),
          'setup_s': round(time.perf_counter() - t0, 2), 'torch': torch.__version__,
          'timm': timm.__version__, 'cpu': cpu_model(), 'cpu_count': os.cpu_count(),
          'hostname': platform.node(), 'load_start': load0,
          'command': ' '.join(['python', *sys.argv])}
  if args.serve:
    reply(info)
    for line in sys.stdin:
      name = line.strip()
      if name == 'quit':
        break
      if name not in parts:
        reply({'cmd': name, 'error': f'unknown command; known: {", ".join(parts)}'})
        continue
      reply(dict(cmd=name, **timed(parts[name])))
    return 0
  times = [timed(parts['step'])['s'] for _ in range(args.steps)]
  info.update(kind='timm_step', step_s_median=float(np.median(times)), step_s_min=min(times),
              step_s_max=max(times), steps_timed=len(times), load_end=loadavg())
  print(json.dumps(info))
  return 0


if __name__ == '__main__':
  sys.exit(main())
