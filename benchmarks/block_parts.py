"""Where one block's time goes: each part of a DeiT-T block at 448 px (B 4, N 785, D 192, 3 heads,
MLP 768, fp32), forward and forward+backward, ours (JAX) against PyTorch's (timm's), one side per
process; `benchmarks/run_block_parts.sh` alternates the sides and renders the table. Parts:
attention core, the four dense layers, the two LayerNorms, the exact GELU, the whole block, one
AdamW update of DeiT-T's parameters ("fwdbwd": the gradients of the output's sum).

  python -m benchmarks.block_parts --side jax --out benchmarks/results/block_parts.jsonl
  .venv-timm/bin/python -m benchmarks.block_parts --side torch --out ...
  python -m benchmarks.block_parts --render benchmarks/results/block_parts.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from benchmarks.machine import cpu_model, isa_flags, loadavg, median_seconds

B, N, D, HEADS, MLP = 4, 785, 192, 3, 768
PARTS = ('attention', 'dense', 'layernorm', 'gelu', 'block', 'adamw')


def deit_tiny_shapes():
  """DeiT-T's parameter shapes at 448 px (12 blocks, 200 classes)."""
  shapes = [(1, N, D), (1, 1, D), (D, 3, 16, 16), (D,), (D,), (D,), (200, D), (200,)]
  for _ in range(12):
    shapes += [(D,), (D,), (3 * D, D), (3 * D,), (D, D), (D,), (D,), (D,), (MLP, D), (MLP,),
               (D, MLP), (D,)]
  return shapes


def jax_parts(repeats: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from dca_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  from dca_jax.models import vit  # pylint: disable=g-import-not-at-top
  jit = xla_cpu.jit   # the compile options training uses on this CPU

  rng = np.random.default_rng(0)
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32) * 0.02)
  x, h = arr(B, N, D) * 50, arr(B, N, MLP) * 50
  q, k, v = (arr(B, N, HEADS, D // HEADS) * 50 for _ in range(3))
  dense_w = dict(qkv=(arr(D, 3 * D), arr(3 * D)), proj=(arr(D, D), arr(D)),
                 fc1=(arr(D, MLP), arr(MLP)), fc2=(arr(MLP, D), arr(D)))
  ln_w = (jnp.ones(D), jnp.zeros(D))
  block = vit.EncoderBlock(width=D, num_heads=HEADS, mlp_dim=MLP)
  block_params = block.init(jax.random.key(0), x)

  def dense(w, x):
    lin = lambda name, t: t @ w[name][0] + w[name][1]
    return lin('proj', lin('qkv', x)[..., :D]) + lin('fc2', lin('fc1', x))

  def layernorm(w, x):
    return vit._layer_norm(vit._layer_norm(x, *w, vit.LN_EPS), *w, vit.LN_EPS)  # pylint: disable=protected-access

  forwards = {
      'attention': (lambda w, q, k, v: vit.attention(q, k, v)[0], (None, q, k, v)),
      'dense': (dense, (dense_w, x)),
      'layernorm': (layernorm, (ln_w, x)),
      'gelu': (lambda w, h: vit.gelu_exact(h), (None, h)),
      'block': (lambda w, x: block.apply(w, x)[0], (block_params, x)),
  }
  out = {}
  for part, (fn, args) in forwards.items():
    fwd = jit(fn)
    nondiff = args[0] is None
    grad = jit(jax.grad(lambda *a, fn=fn: fn(*a).sum(),
                        argnums=tuple(range(1 if nondiff else 0, len(args)))))
    out[part, 'fwd'] = median_seconds(lambda: jax.block_until_ready(fwd(*args)), repeats)
    out[part, 'fwdbwd'] = median_seconds(lambda: jax.block_until_ready(grad(*args)), repeats)
  params = [arr(*s) for s in deit_tiny_shapes()]
  grads = [arr(*s) for s in deit_tiny_shapes()]
  tx = optax.adamw(1e-4, weight_decay=0.05)
  state = [params, tx.init(params)]

  def apply(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  update = jit(apply, donate_argnums=(0, 1))  # in place, as PyTorch's optimizer

  def step():
    state[0], state[1] = update(state[0], state[1], grads)
    jax.block_until_ready(state[0])

  out['adamw', 'fwd'] = median_seconds(step, repeats)
  return out


def torch_parts(repeats: int) -> dict:
  import timm.models.vision_transformer as tvit  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  arr = lambda *shape: torch.randn(*shape).requires_grad_()  # activations: unit scale
  x, h = arr(B, N, D), arr(B, N, MLP)
  q, k, v = (arr(B, HEADS, N, D // HEADS) for _ in range(3))  # timm's layout
  lins = dict(qkv=torch.nn.Linear(D, 3 * D), proj=torch.nn.Linear(D, D),
              fc1=torch.nn.Linear(D, MLP), fc2=torch.nn.Linear(MLP, D))
  norms = torch.nn.LayerNorm(D, eps=1e-6), torch.nn.LayerNorm(D, eps=1e-6)
  block = tvit.Block(D, HEADS, mlp_ratio=MLP / D, qkv_bias=True)
  gelu = torch.nn.GELU()

  forwards = {
      'attention': (lambda: F.scaled_dot_product_attention(q, k, v), (q, k, v)),
      'dense': (lambda: lins['proj'](lins['qkv'](x)[..., :D]) + lins['fc2'](lins['fc1'](x)),
                [x] + [p for m in lins.values() for p in m.parameters()]),
      'layernorm': (lambda: norms[1](norms[0](x)),
                    [x] + [p for m in norms for p in m.parameters()]),
      'gelu': (lambda: gelu(h), (h,)),
      'block': (lambda: block(x), [x] + list(block.parameters())),
  }
  out = {}
  for part, (fn, leaves) in forwards.items():
    def fwdbwd(fn=fn, leaves=leaves):
      for leaf in leaves:
        leaf.grad = None
      fn().sum().backward()
    with torch.no_grad():
      out[part, 'fwd'] = median_seconds(fn, repeats)
    out[part, 'fwdbwd'] = median_seconds(fwdbwd, repeats)
  params = [torch.nn.Parameter(torch.randn(*s) * 0.02) for s in deit_tiny_shapes()]
  for p in params:
    p.grad = torch.randn_like(p) * 0.02
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
  out['adamw', 'fwd'] = median_seconds(opt.step, repeats)
  return out


def side_of(rec: dict) -> str:
  """'torch', or our side named by its dots library ('ours, eigen dots'; rows of older runs,
  before the choice existed, ran YNNPACK's)."""
  return 'torch' if rec['side'] == 'torch' else f'ours, {rec.get("dots", "ynnpack")} dots'


def render(path: str) -> str:
  """Median over rounds per (cpu, side, part, pass); ours / PyTorch's, one column pair per
  library XLA:CPU ran our dots with (`dots` of the jax rows, dca_jax/xla_cpu.py)."""
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  lines = []
  for cpu in dict.fromkeys((r['cpu'], r['isa']) for r in records):
    rows = [r for r in records if (r['cpu'], r['isa']) == cpu]
    def ms(side, key, rows=rows):
      values = [r['ms'][key] for r in rows if side_of(r) == side and key in r['ms']]
      return statistics.median(values) if values else float('nan')
    ours = [x for x in dict.fromkeys(map(side_of, rows)) if x != 'torch']
    rounds = sum(r['side'] == 'torch' for r in rows)
    head = ''.join(f' {x} ms |' for x in ours) + ' PyTorch ms |' + ''.join(
        f' {x} / PyTorch |' for x in ours)
    lines += [f'{cpu[0]} ({cpu[1]}), {rows[0]["threads"]} threads, {rounds} round(s):', '',
              '| part | pass |' + head, '|---|---|' + '---|' * (2 * len(ours) + 1)]
    for part in PARTS:
      for pas in ('fwd', 'fwdbwd') if part != 'adamw' else ('update',):
        key = f'{part}/{"fwd" if pas == "update" else pas}'
        a, b = [ms(x, key) for x in ours], ms('torch', key)
        lines.append(f'| {part} | {pas} |' + ''.join(f' {t:.1f} |' for t in a) + f' {b:.1f} |'
                     + ''.join(f' {t / b:.2f}x |' for t in a))
    lines.append('')
  return '\n'.join(lines)


def dots_of(side: str) -> dict:
  if side != 'jax':
    return {}
  from dca_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  return {'dots': xla_cpu.dots_library()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--side', choices=('jax', 'torch'))
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--out', default='benchmarks/results/block_parts.jsonl')
  parser.add_argument('--render', default='', help='print the markdown table of this file')
  args = parser.parse_args()
  if args.render:
    print(render(args.render))
    return
  load = loadavg()
  timed = (jax_parts if args.side == 'jax' else torch_parts)(args.repeats)
  rec = dict(side=args.side, cpu=cpu_model(), isa=isa_flags(), threads=os.cpu_count(),
             load_before=load, repeats=args.repeats, **dots_of(args.side),
             ms={f'{part}/{pas}': round(1e3 * t, 3) for (part, pas), t in timed.items()})
  print(json.dumps(rec), flush=True)
  with open(args.out, 'a') as f:
    f.write(json.dumps(rec) + '\n')


if __name__ == '__main__':
  main()
