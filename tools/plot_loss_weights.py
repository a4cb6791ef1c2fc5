"""The uncertainty loss weights w_b (and each branch's loss) over training, from runs'
metrics.jsonl (docs/ABLATIONS.md); each argument is LABEL=WORKDIR. Left: w_sa, w_glca, w_pwca
per run; right: the branch losses L_b, whose optimum weight is log L_b.

  python -m tools.plot_loss_weights --out docs/images/loss_weights.png \
      x1=runs/ablate/dcal_cls/seed_0 x10=runs/ablate/dcal_lw_lr_x10/seed_0
"""

from __future__ import annotations

import argparse
import json
import math
import os

BRANCHES = ('sa', 'glca', 'pwca')
STYLES = ('-', '--', ':')


def read_run(workdir: str) -> dict:
  """{'step': [...], 'w_sa': [...], 'ce_sa': [...], ...} of the train records."""
  series = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if 'train/loss' not in record:
        continue
      series.setdefault('step', []).append(record['step'])
      for branch in BRANCHES:
        for name in (f'w_{branch}', f'ce_{branch}', f'triplet_{branch}'):
          if f'train/{name}' in record:
            series.setdefault(name, []).append(record[f'train/{name}'])
  return series


def branch_loss(series: dict, branch: str):
  ce = series.get(f'ce_{branch}')
  if ce is None:
    return None
  triplet = series.get(f'triplet_{branch}', [0.0] * len(ce))
  return [a + b for a, b in zip(ce, triplet)]


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('runs', nargs='+', help='LABEL=WORKDIR')
  parser.add_argument('--out', required=True)
  args = parser.parse_args()
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
  colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for index, item in enumerate(args.runs):
    label, workdir = item.split('=', 1)
    series = read_run(workdir)
    colour = colours[index % len(colours)]
    for branch, style in zip(BRANCHES, STYLES):
      weights = series.get(f'w_{branch}')
      if weights is None:
        continue
      left.plot(series['step'], weights, style, color=colour, label=f'{label}: w_{branch}')
      loss = branch_loss(series, branch)
      right.plot(series['step'], [math.log(max(v, 1e-9)) for v in loss], style, color=colour,
                 label=f'{label}: log L_{branch}')
      print(f'{label} w_{branch}: {weights[0]:+.3f} at step {series["step"][0]} -> '
            f'{weights[-1]:+.3f} at step {series["step"][-1]} (log L_{branch} at the end '
            f'{math.log(max(loss[-1], 1e-9)):+.2f})')
  left.set(xlabel='micro-step', ylabel='w_b', title='uncertainty weights w_b')
  right.set(xlabel='micro-step', ylabel='log L_b', title='log of each branch loss (optimal w_b)')
  for ax in (left, right):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig.savefig(args.out)
  print(f'-> {args.out}')


if __name__ == '__main__':
  main()
