"""The markdown table of step_time rows (and matmul peaks, error lines) from JSON-lines files.

  python -m benchmarks.render_table benchmarks/results/cpu.jsonl

Beside each row's measured peak: the memory planner's formula on the row's own compiled step
(dca_jax/plan: arguments + outputs - aliases + temporaries) and the deviceless prediction for
the same card and settings in benchmarks/results/plan_gpu.jsonl (tools/memory_table.py).
"""

from __future__ import annotations

import json
import os
import sys

PLAN_ROWS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'plan_gpu.jsonl')
COLUMNS = ['row', 'backbone', 'px', 'tokens', 'batch x accum', 'remat', 'prec', 'branches',
           'attn', 'compile s', 'step s median [min, max]', 'img/s', 'GFLOP/img (XLA)',
           'achieved GFLOP/s']
MEMORY = ['peak mem GB', 'predicted GB (plan formula, this card)', 'predicted GB (deviceless)',
          'XLA temp GB', 'bwd residuals GB', 'load']


def _gb(x):
  return '' if x is None else f'{x / 2**30:.2f}'


def _planned(r):
  from dca_jax import plan  # pylint: disable=g-import-not-at-top
  parts = [r.get(f'xla_{k}_bytes') for k in ('argument', 'output', 'alias', 'temp')]
  return None if None in parts else plan.device_bytes(*parts)


def _key(r, card):
  remat = (r.get('remat_policy') or 'nothing_saveable') if r.get('remat') else 'off'
  return (card, r.get('precision'), r.get('attention_impl'), r.get('batch'), r.get('accum'),
          remat, _dcal(r))


def _dcal(r) -> bool:
  return bool(r.get('glca_M') or r.get('pwca_T'))


def deviceless(path=PLAN_ROWS) -> dict:
  """The committed deviceless ViT-B/16 448 px plan rows, by `_key` (the first lent card checks
  them)."""
  out = {}
  for d in (json.loads(line) for line in open(path)) if os.path.exists(path) else ():
    if (d.get('num_devices', 1) == 1 and d.get('backbone') == 'vit_base'
        and d.get('input') == '448x448' and d.get('memory_bytes')):
      out[(d['target'], d['precision'], d['attention_impl'], d['batch_size'], d['accumulation'],
           d['remat'], True)] = d['memory_bytes']
  return out


def _row(r, peak, planned) -> list:
  overrides = ''.join(f' {k}={v}' for k, v in (r.get('overrides') or {}).items())
  branches = f'DCAL (M={r["glca_M"]}, T={r["pwca_T"]})' if _dcal(r) else 'SA only'
  memory = r.get('peak_device_bytes', r.get('peak_rss_bytes'))
  cells = [r.get('label') or '', r['backbone'] + overrides, str(r['size']), str(r['tokens']),
           f'{r["batch"]} x {r["accum"]}', r['remat_policy'] if r['remat'] else 'off',
           r['precision'], branches, r['attention_impl'], f'{r["compile_s"]:.1f}',
           f'{r["step_s_median"]:.3f} [{r["step_s_min"]:.3f}, {r["step_s_max"]:.3f}]',
           f'{r["images_per_s"]:.3g}', f'{r["xla_flops_per_image"] / 1e9:.3g}',
           f'{r["achieved_flops_per_s"] / 1e9:.1f}']
  if peak is not None:
    cells.append(f'{100 * r["achieved_flops_per_s"] / peak:.0f}%' if peak else '')
  return cells + [_gb(memory) + ('' if 'peak_device_bytes' in r else ' (RSS)'), _gb(_planned(r)),
                  _gb(planned.get(_key(r, r.get('device')))), _gb(r.get('xla_temp_bytes')),
                  _gb(r.get('residual_bytes')), f'{r.get("load_start", "")}->{r.get("load_end", "")}']


def _ratios(steps) -> list:
  """DCAL / SA-only step time and FLOPs for rows that differ only in the branches."""
  key = lambda r: (r['backbone'], json.dumps(r.get('overrides')), r['size'], r['batch'],
                   r['accum'], r['remat'], r['precision'])
  sa = {key(r): r for r in steps if not _dcal(r)}
  return [f'- {r["backbone"]} {r["size"]} px, batch {r["batch"]}x{r["accum"]}, remat '
          f'{"on" if r["remat"] else "off"}, {r["precision"]}, attn {r["attention_impl"]}: '
          f'DCAL/SA step time **{r["step_s_median"] / sa[key(r)]["step_s_median"]:.2f}x**, XLA '
          f'FLOP ratio {r["xla_flops_per_step"] / sa[key(r)]["xla_flops_per_step"]:.2f}x (paper '
          'training time 3.8 h / 2.1 h = 1.8x)' for r in steps if _dcal(r) and key(r) in sa]


def render(paths) -> str:
  rows = [json.loads(line) for path in paths for line in open(path) if line.strip()]
  peaks = [r for r in rows if r.get('kind') == 'matmul_peak']
  steps = [r for r in rows if r.get('kind') == 'train_step']
  best = {}
  for p in peaks:
    best[p['dtype']] = max(best.get(p['dtype'], 0.0), p['flops_per_s'])
  # a row's ceiling: the peak of its dtype (fp16 runs at the bf16 rate on tensor cores) or fp32's
  peak_of = lambda r: best.get(r['precision'], best.get(
      'bf16' if r['precision'] == 'fp16' else 'fp32', best.get('fp32')))
  out = [f'- matmul peak ({p["dtype"]}, {p["n"]}x{p["n"]}, {p["device"]}): '
         f'**{p["flops_per_s"] / 1e9:.1f} GFLOP/s** median of {p["reps"]} (best '
         f'{p["flops_per_s_best"] / 1e9:.1f}; load {p["load_start"]}->{p["load_end"]})'
         for p in peaks] + ([''] if peaks else [])
  header = COLUMNS + (['% of matmul peak (same dtype)'] if best else []) + MEMORY
  out += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  planned = deviceless()
  out += ['| ' + ' | '.join(_row(r, peak_of(r) if best else None, planned)) + ' |' for r in steps]
  ratios = _ratios(steps)
  out += ['', 'DCAL / SA-only:'] + ratios if ratios else []
  out += [f'- row `{e.get("label")}` failed: {e.get("error", "")[:300]}'
          for e in rows if e.get('kind') == 'error']
  return '\n'.join(out)


if __name__ == '__main__':
  if len(sys.argv) < 2:
    sys.exit(__doc__)
  print(render(sys.argv[1:]))
