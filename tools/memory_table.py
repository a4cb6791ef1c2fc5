"""The memory tables of docs/MEMORY.md, compiled without the card: deviceless compiles of the real
train step (`dca_jax.plan.measure`), one JSON line per row, resumable (rows already in --out are
skipped). Targets come from the planner's registry (`plan.registry.targets`): an XLA GPU target
spec of SPECS (xla/backends/gpu/target_config/specs/ in openxla/xla) per card of the GPU groups,
`tpu:<topology>` for the `tpu` group (CUB ViT-B/16 448 px, bf16, effective batch 16 per chip; a
row is TOPOLOGY/BATCH_PER_CHIP/REMAT[/fsdp], `TPU_GRID` or --rows). The venvs (jax[cuda12],
libtpu): tools/accelerator_venvs.sh.

  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_gpu_enable_triton_gemm=false .venv-cuda/bin/python \
      -m tools.memory_table --specs SPECS --groups core,cards \
      --out benchmarks/results/plan_gpu.jsonl
  JAX_PLATFORMS=cpu .venv-tpu/bin/python -m tools.memory_table --groups tpu \
      --rows v5e:2x2/4/off,v4:2x2x1/4/off --out benchmarks/results/plan_tpu.jsonl
  python -m tools.memory_table --render benchmarks/results/plan_gpu.jsonl [--specs SPECS]
  python -m tools.memory_table --render benchmarks/results/plan_tpu.jsonl
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os


SPECS = {'v100': 'v100.txtpb', 'a100_40': 'a100_sxm_40.txtpb', 'a100_80': 'a100_sxm_80.txtpb',
         'h100': 'h100_sxm.txtpb', 'h200': 'h200.txtpb'}
SPLITS = ((4, 4), (2, 8), (8, 2), (16, 1))   # the seed's rows: default, conservative, fast, paper
REMAT = ('nothing_saveable', 'off')
# The PyTorch memory guide's hand-written figures (ViT-B/16 448 px, fp16, its checkpointing).
SEED_GB = {(4, 4): '~14-15 GB (remat on)', (2, 8): '~10-12 GB (remat on)',
           (8, 2): '~22-24 GB (remat off)', (16, 1): '~40-45 GB (remat off)'}
TPU_GRID = ('v5e:2x2/4/off', 'v5e:2x2/4/nothing_saveable', 'v5e:2x2/16/off',
            'v5e:2x2/16/nothing_saveable', 'v5p:2x2x1/4/off', 'v5p:2x2x1/4/nothing_saveable',
            'v5p:2x2x1/16/off', 'v4:2x2x1/4/off', 'v4:2x2x1/4/nothing_saveable', 'v6e:2x2/4/off',
            'v6e:2x2/4/nothing_saveable', 'v5e:4x4/4/off', 'v5e:4x4/4/off/fsdp')
EFFECTIVE_PER_CHIP = 16


ALL = [(b, a, remat) for b, a in SPLITS for remat in REMAT]


def _rows(group, card, precision, attn, cells, topology='1x1x1', **recipe):
  """A row per (batch, accumulation, remat) of `cells`: ViT-B on CUB unless `recipe` says."""
  recipe = {'config': 'cub', 'backbone': 'vit_base', 'precision': precision,
            'attention_impl': attn, **recipe}
  return [(group, card, recipe, topology, b, a, remat) for b, a, remat in cells]


def grid(groups):
  """(group, card, recipe overrides, topology, batch, accumulation, remat) rows, in order."""
  rows = []
  if 'core' in groups:  # H100: the seed's rows, bf16 + cuDNN (ours) and fp16 + XLA (the seed's)
    for precision, attn in (('bf16', 'cudnn'), ('fp16', 'xla')):
      rows += _rows('core', 'h100', precision, attn, ALL)
    rows += _rows('core', 'h100', 'bf16', 'cudnn',  # the middle remat level, default recipe
                  [(b, a, 'dots_with_no_batch_dims_saveable') for b, a in SPLITS])
  if 'cards' in groups:  # the recipe each card would run (V100: fp16, it has no bf16 units)
    for card, precision, attn in (('a100_80', 'bf16', 'cudnn'), ('v100', 'fp16', 'xla')):
      rows += _rows('cards', card, precision, attn, ALL)
    # same GPU architecture, other memory size: two rows each show whether the compile differs
    for card in ('a100_40', 'h200'):
      rows += _rows('cards', card, 'bf16', 'cudnn', ((4, 4, 'nothing_saveable'), (16, 1, 'off')))
    rows += _rows('cards', 'v100', 'fp16', 'cudnn',  # does flash attention exist on sm_70?
                  [(4, 4, 'nothing_saveable')])
  for backbone in ('deit_tiny', 'deit_small', 'r50_vit_base') if 'backbones' in groups else ():
    rows += _rows('backbones', 'h100', 'bf16', 'cudnn', [(4, 4, r) for r in REMAT],
                  backbone=backbone)
  if 'reid' in groups:  # Re-ID recipe: ViT-B 256 x 128, batch 64 = 16 ids x 4, SGD
    rows += _rows('reid', 'h100', 'bf16', 'cudnn', [(64, 1, r) for r in REMAT],
                  config='market1501')
  # 8 GPUs, effective batch 16 = 2 per device: replicated vs FSDP
  for fsdp in (False, True) if 'multi' in groups else ():
    rows += _rows('multi', 'h100', 'bf16', 'cudnn', [(16, 1, r) for r in REMAT], '1x1x8',
                  fsdp=fsdp)
  if 'extra' in groups:  # H100: the other two precision x attention pairs
    for precision, attn in (('bf16', 'xla'), ('fp16', 'cudnn')):
      rows += _rows('extra', 'h100', precision, attn, ALL)
  return rows


def jobs(args, done):
  """(key, target, recipe, candidate, the row's own fields) for each row not in `done`; the
  targets from the planner's registry, each made once (a TPU row's batch is per chip)."""
  from dca_jax import plan  # pylint: disable=g-import-not-at-top
  from dca_jax.plan import registry  # pylint: disable=g-import-not-at-top
  target_of = functools.cache(lambda value, topology: registry.targets([value], topology)[0])
  groups = args.groups.split(',')
  for group, card, recipe, topology, b, a, remat in grid(groups):
    key = json.dumps([group, card, recipe, topology, b, a, remat], sort_keys=True)
    if key not in done:
      yield (key, target_of(os.path.join(args.specs, SPECS[card]), topology), recipe,
             plan.Candidate(b, a, remat), dict(group=group, card=card, topology=topology))
  for key in (args.rows.split(',') if args.rows else TPU_GRID) if 'tpu' in groups else ():
    topology, per_chip, remat, *fsdp = key.split('/')
    if key in done:
      continue
    target, per_chip = target_of('tpu:' + topology, '1x1x1'), int(per_chip)
    yield (key, target, dict(config='cub', backbone='vit_base', precision='bf16',
                             fsdp=fsdp == ['fsdp']),
           plan.Candidate(per_chip * target.num_devices, EFFECTIVE_PER_CHIP // per_chip, remat),
           dict(topology=topology, per_chip_batch=per_chip,
                host_flops_per_chip=lambda row, n=target.num_devices: row.flops / n))


def build_config(recipe):
  """configs/<recipe's config>.py with the recipe's other keys as overrides (main.py's loader)."""
  from dca_jax import config_files  # pylint: disable=g-import-not-at-top
  return config_files.load(f'configs/{recipe["config"]}.py', [
      f'--config.{k}={v}' for k, v in recipe.items() if k != 'config'])[0]


def run(args):
  """Each row not yet in --out: the real train step compiled for its target, judged, printed
  and appended (the planner's record, the row's key and fields beside it)."""
  from dca_jax import plan  # pylint: disable=g-import-not-at-top
  done = set()
  if os.path.exists(args.out):
    with open(args.out) as f:
      done = {json.loads(line).get('key') for line in f if line.strip()}
  for key, target, recipe, candidate, fields in jobs(args, done):
    config = build_config(recipe)
    row = plan.measure(config, candidate, target, config.precision)
    plan.judge(row, target, config.precision, config.plan_memory_margin, config.plan_mfu)
    rec = row.record(plan.candidate_config(config, row.candidate), target, config.precision)
    rec.update({k: v(row) if callable(v) else v for k, v in dict(key=key, **fields).items()})
    print(plan.format_row(row, target), flush=True)
    with open(args.out, 'a') as f:
      f.write(json.dumps(rec, default=float) + '\n')


def _cell(r):
  if r.get('error'):
    return 'error'
  return f'{r["memory_gib"]:.2f}'


# Which rows stand for which card in the recommendation: the card's own, or (same GPU
# architecture, other memory size) its sibling's, which the 'cards' group checks are equal.
RECOMMEND = (('v100', 'v100', 'fp16', 'xla'), ('a100_40', 'a100_80', 'bf16', 'cudnn'),
             ('a100_80', 'a100_80', 'bf16', 'cudnn'), ('h100', 'h100', 'bf16', 'cudnn'),
             ('h200', 'h100', 'bf16', 'cudnn'))


def recommendations(recs, specs_dir):
  """Per card: the planner's choice for ViT-B/16 448 px, effective batch 16, over the rows
  compiled for it (`plan.judge` + `plan.recommend`, JAX's default 75 % pool, 10 % kept free)."""
  from dca_jax import plan  # pylint: disable=g-import-not-at-top
  out = ['| card | usable GiB (75 % pool, 10 % free) | precision, attention | recommended '
         '| predicted GiB | implied ms / update @ 0.4 | rows from |', '|---|---|---|---|---|---|---|']
  for card, source, precision, attn in RECOMMEND:
    with open(os.path.join(specs_dir, SPECS[card])) as f:
      spec = plan.read_gpu_spec(f.read())
    target = plan.Target(name=card, backend='gpu-deviceless', platform='gpu', devices=(None,),
                         memory_bytes=int(spec['memory_bytes'] * 0.75),
                         physical_memory_bytes=spec['memory_bytes'], peak_flops=spec['peak_flops'])
    rows = []
    for r in recs:
      if (r['card'] == source and r['group'] in ('core', 'cards') and r['precision'] == precision
          and r['attention_impl'] == attn and r.get('memory_bytes')):
        row = plan.Row(plan.Candidate(r['batch_size'], r['accumulation'], r['remat']),
                       memory_bytes=r['memory_bytes'], flops=r['flops'])
        rows.append(plan.judge(row, target, precision, 0.1, 0.4))
    best = plan.recommend(rows)
    usable = target.memory_bytes * 0.9 / plan.GIB
    if best is None:
      out.append(f'| {card} | {usable:.1f} | {precision}, {attn} | nothing fits ({len(rows)} rows) '
                 f'| | | {source} |')
      continue
    c = best.candidate
    out.append(f'| {card} | {usable:.1f} | {precision}, {attn} | {c.batch_size} x {c.accumulation}, '
               f'remat {c.remat} | {best.memory_bytes / plan.GIB:.2f} | {best.update_s * 1e3:.0f} '
               f'| {source} ({len(rows)} candidates) |')
  return out


def _fill_times(recs, specs_dir):
  """Implied times from the card's peak where a row was written without one."""
  from dca_jax import plan  # pylint: disable=g-import-not-at-top
  for r in recs:
    if r.get('update_s') is None or not math.isfinite(r['update_s']):
      with open(os.path.join(specs_dir, SPECS[r['card']])) as f:
        peak = plan.read_gpu_spec(f.read())['peak_flops'].get(r['precision'])
      if peak and r.get('flops') and math.isfinite(r['flops']):
        r['update_s'] = r['flops'] / r['num_devices'] / (peak * 0.4) * r['accumulation']


def _tflop(r):
  return f'{r["flops"] / 1e12:.2f}' if r.get('flops') and math.isfinite(r['flops']) else ''


def render_gpu(recs, specs_dir=''):
  if specs_dir:
    _fill_times(recs, specs_dir)
  by = {}
  for r in recs:
    by.setdefault(r['group'], []).append(r)
  out = []
  core = by.get('core', []) + by.get('extra', []) + by.get('cards', [])
  if core:
    out += ['| card | precision | attention | batch x accum | remat | predicted GiB / device '
            '| fits (of usable) | TFLOP / micro-step | implied ms / update @ MFU 0.4 | seed guide |',
            '|---|---|---|---|---|---|---|---|---|---|']
    for r in core:
      seed = SEED_GB.get((r['batch_size'], r['accumulation']), '') if r['card'] == 'h100' and \
          r['precision'] == 'fp16' and r['attention_impl'] == 'xla' else ''
      time_ms = f'{r["update_s"] * 1e3:.0f}' if r.get('update_s') and math.isfinite(
          r['update_s']) else ''
      err = f' ({r["error"][:80]})' if r.get('error') else ''
      out.append(f'| {r["target"]} | {r["precision"]} | {r["attention_impl"]} | '
                 f'{r["batch_size"]} x {r["accumulation"]} | {r["remat"]} | {_cell(r)}{err} | '
                 f'{"yes" if r["fits"] else "no"} ({r["usable_gib"]:.0f}) | {_tflop(r)} | '
                 f'{time_ms} | {seed} |')
  rest = by.get('backbones', []) + by.get('reid', []) + by.get('multi', [])
  if rest:
    out += ['', '| setting | target | batch x accum | remat | predicted GiB / device | '
            'TFLOP / micro-step (all devices) | collective output MiB / device | fused attention calls |',
            '|---|---|---|---|---|---|---|---|']
    for r in rest:
      setting = f'{r["backbone"]} {r["input"]} {r["task"]}' + (' fsdp' if r['fsdp'] else '')
      comm = sum(r.get('collectives', {}).values()) / 2 ** 20
      fused = sum(r.get('fused_attention', {}).values())
      out.append(f'| {setting} | {r["target"]} | {r["batch_size"]} x {r["accumulation"]} | '
                 f'{r["remat"]} | {_cell(r)} | {_tflop(r)} | {comm:.0f} | {fused} |')
  if specs_dir:
    out += [''] + recommendations(recs, specs_dir)
  return out


def render_tpu(recs):
  lines = ['| topology | chips (hosts) | batch / chip x accumulation | remat | FSDP | GiB / chip '
           '(of available) | TFLOP / chip: compiled (model) | compiler remat | ms / update at '
           'MFU 0.4 |', '|---|---|---|---|---|---|---|---|---|']
  for r in recs:
    device, model = r['device_flops'] / 1e12, r['host_flops_per_chip'] / 1e12
    # Windowed einsums (FSDP over hosts) hide their FLOPs from the cost analysis: no figure.
    compiled = f'{device:.2f}' if math.isfinite(device) else 'n/a'
    update = f'{r["update_s"] * 1e3:.0f}' if math.isfinite(r['update_s']) else ''
    lines.append(f'| {r["topology"]} | {r["num_devices"]} ({r["hosts"]}) | '
                 f'{r["per_chip_batch"]} x {r["accumulation"]} | {r["remat"]} | '
                 f'{"yes" if r["fsdp"] else "no"} | {r["memory_gib"]:.2f} ({r["usable_gib"]:.2f})'
                 f'{"" if r["fits"] else ", does not fit"} | {compiled} ({model:.2f}) | '
                 f'{"yes" if r["compiler_remat"] else "no"} | {update} |')
  return lines


def render(path, specs_dir=''):
  """The markdown of a results file: the GPU tables of its GPU rows, the TPU table of its TPU
  rows (the backend each row was compiled for, as `plan` records it)."""
  with open(path) as f:
    recs = [json.loads(line) for line in f if line.strip()]
  gpu = [r for r in recs if r['backend'] != 'tpu-deviceless']
  tpu = [r for r in recs if r['backend'] == 'tpu-deviceless']
  return '\n'.join((render_gpu(gpu, specs_dir) if gpu else [])
                   + ([''] if gpu and tpu else []) + (render_tpu(tpu) if tpu else []))


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--specs', default='', help='folder holding the XLA GPU target specs')
  p.add_argument('--groups', default='core,cards,backbones,reid,multi,extra',
                 help='GPU: core,cards,backbones,reid,multi,extra; TPU: tpu')
  p.add_argument('--rows', default='', help='tpu group: TOPOLOGY/BATCH_PER_CHIP/REMAT[/fsdp],...')
  p.add_argument('--out', default='', help='the JSONL file rows are appended to')
  p.add_argument('--render', default='', help='print the markdown tables of this JSONL file')
  args = p.parse_args()
  if args.render:
    print(render(args.render, args.specs))
  elif not args.out:
    p.error('--out is needed to measure (or --render FILE)')
  else:
    run(args)


if __name__ == '__main__':
  main()
