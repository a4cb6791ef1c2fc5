"""Ablation grids: config variants x seeds, each trained and evaluated by the normal main.py.

  python -m tools.ablate --grid paper --seeds 0,1,2                  # the paper's ablations, demo
  python -m tools.ablate --grid paper --variants dcal_local_rollout,dcal_local_random --seeds 0,1,2
  python -m tools.ablate --config configs/cub.py --grid selection --seeds 0,1,2 \
      --set data_dir=/data --set pretrained_model=/w/deit_tiny.safetensors --out runs/ablate_cub
  python -m tools.ablate --grid paper --table_only                   # re-write the table
  python -m tools.ablate --grid selection --variants dcal_local_rollout \
      --test_time random:glca_select=random --test_time last_layer:glca_select=last_layer

Each run is `main.py --mode train` then `main.py --mode eval` (the restored checkpoint) into
OUT/<variant>/seed_<s>, with `--config.seed=<s>` and the variant's `--config.KEY=VALUE`
overrides after the common `--set` ones. A finished run appends one JSON line to
OUT/results.jsonl; a rerun skips finished runs and resumes an interrupted one from its
checkpoint, so a grid can be stopped and continued. OUT/table.md holds mean ± std over the
seeds of the SA+GLCA, SA and GLCA top-1 and the wall time (train + eval) per variant.
`--jobs 2` runs two at a time, one CPU thread each (on 2 cores it finishes a grid sooner than
one two-thread run at a time; wall times are then per single-thread run).

`--test_time NAME:KEY=VALUE[,KEY=VALUE]` evaluates every finished run of the chosen variants
once more with those knobs changed at test time only (the checkpoint is the one trained as the
variant says), into OUT/<variant>/seed_<s>/eval_NAME.json, and writes OUT/test_time.md: e.g. a
model trained with rollout-selected local queries, evaluated with random ones.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_NO_GLCA = {'num_glca_layers': 0}
_NO_PWCA = {'num_pwca_layers': 0}


def _dcal(pool, select='rollout', **extra):
  return {'glca_pool': pool, 'glca_select': select, **extra}


# Named grids: variant name -> overrides (on top of the config file and --set).
GRIDS = {
    # The paper's ablation table (DeiT-T, CUB; Table 4-6) on the config given.
    'paper': {
        'sa_only': {**_NO_GLCA, **_NO_PWCA},
        'sa_pwca': dict(_NO_GLCA),
        'sa_glca_local': {**_NO_PWCA, **_dcal('local')},
        'dcal_cls': _dcal('cls'),  # every glca_select gives the same model under 'cls'
        **{f'dcal_{pool}_{select}': _dcal(pool, select) for pool in ('mean', 'local')
           for select in ('rollout', 'random', 'last_layer')},
        'dcal_local_rollout_all_blocks': _dcal('local', rollout_layers='all'),
        **{f'dcal_local_r{int(100 * r)}': _dcal('local', top_k_ratio=r)
           for r in (0.05, 0.1, 0.3)},
        # few local queries: where a random pick should most often miss the decisive patch
        'dcal_local_random_r5': _dcal('local', 'random', top_k_ratio=0.05),
        'dcal_lw_lr_x10': {'loss_weights_lr_multiplier': 10.0},
    },
    # Only what separates selections: the pooled readings with each selection.
    'selection': {f'dcal_{pool}_{select}': _dcal(pool, select) for pool in ('mean', 'local')
                  for select in ('rollout', 'random', 'last_layer')},
    # Loss-weight learning rate (the uncertainty weights barely move at the paper's lr).
    'loss_weights': {f'dcal_lw_lr_x{m:g}': {'loss_weights_lr_multiplier': m}
                     for m in (1.0, 10.0, 100.0)},
}


def parse_set(items):
  """['key=value', ...] -> [(key, value)] in order (values stay strings, as on the CLI)."""
  out = []
  for item in items or ():
    if '=' not in item:
      raise SystemExit(f'error: --set {item!r} is not KEY=VALUE')
    key, value = item.split('=', 1)
    out.append((key.strip(), value.strip()))
  return out


def _flag(key, value) -> str:
  return f'--config.{key}={json.dumps(value) if isinstance(value, bool) else value}'


def _config_flags(common, seed, overrides) -> list:
  """The --config.* flags of one run: the common --set values, the seed, the variant's knobs
  (`overrides`: (key, value) pairs, later ones win)."""
  return ([_flag(k, v) for k, v in common] + [f'--config.seed={seed}']
          + [_flag(k, v) for k, v in overrides])


def _main_py(config, workdir, mode, flags, env=None):
  """Runs `main.py --mode MODE` on `workdir`, its output appended to workdir/ablate.log."""
  cmd = [sys.executable, os.path.join(ROOT, 'main.py'), f'--config={config}',
         f'--workdir={workdir}', f'--mode={mode}'] + flags
  with open(os.path.join(workdir, 'ablate.log'), 'a') as log:
    log.write(' '.join(cmd) + '\n')
    log.flush()
    code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
  if code:
    raise RuntimeError(f'{workdir}: main.py --mode {mode} {" ".join(flags)} exited {code} '
                       f'(see {log.name})')


def run_one(config, workdir, seed, overrides, common, *, threads: int):
  """Train + eval one variant/seed with main.py; returns the result record (raises on failure)."""
  flags = _config_flags(common, seed, overrides.items())
  env = dict(os.environ)
  if threads == 1:
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen=false').strip()
    env['TF_NUM_INTRAOP_THREADS'] = env['TF_NUM_INTEROP_THREADS'] = '1'
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  for mode in ('train', 'eval'):
    _main_py(config, workdir, mode, flags, env)
  with open(os.path.join(workdir, 'eval.json')) as f:
    result = json.load(f)
  return {'accuracy': result['accuracy'], 'accuracy_sa': result['accuracy_sa'],
          'accuracy_glca': result.get('accuracy_glca'), 'num_images': result['num_images'],
          'wall_s': time.time() - start, 'threads': threads, **_loss_weights(workdir)}


def parse_test_time(items):
  """['name:key=value,key=value', ...] -> [(name, [(key, value), ...])]."""
  out = []
  for item in items or ():
    if ':' not in item:
      raise SystemExit(f'error: --test_time {item!r} is not NAME:KEY=VALUE[,KEY=VALUE]')
    name, pairs = item.split(':', 1)
    out.append((name.strip(), parse_set(pairs.split(','))))
  return out


def eval_again(config, workdir, seed, overrides, common, name, swaps):
  """`main.py --mode eval` of a finished run with `swaps` changed; returns its results."""
  path = os.path.join(workdir, f'eval_{name}.json')
  if not os.path.exists(path):
    flags = _config_flags(common, seed, list(overrides.items()) + list(swaps))
    _main_py(config, workdir, 'eval', flags + [f'--eval_out=eval_{name}.json'])
  with open(path) as f:
    return json.load(f)


def _paired(recs, test, key):
  """`key` of the swapped evaluation and its per-seed difference to the run as trained (same
  weights, same test set: the seed noise of training cancels)."""
  swapped = [r['test_time'][test][key] for r in recs]
  if any(v is None for v in swapped):
    return '–'
  diff = [s - r[key] for s, r in zip(swapped, recs)]
  return f"{_pct(swapped)} (Δ {_pct(diff)})"


def write_test_time_table(path, variants, results, tests, header) -> str:
  """One row per trained variant: as trained, then each swap with its paired difference, for
  SA+GLCA and for the GLCA branch alone (the branch the selection feeds)."""
  rows = [header, '', '| trained as | seeds | branch | evaluated as trained | '
          + ' | '.join(f'evaluated with {name} ({", ".join(f"{k}={v}" for k, v in swaps)})'
                       for name, swaps in tests) + ' |',
          '|---|---|---|---|' + '---|' * len(tests)]
  for variant in variants:
    recs = [r for (v, _), r in sorted(results.items()) if v == variant and 'test_time' in r]
    if not recs:
      continue
    seeds = ','.join(str(r['seed']) for r in recs)
    for branch, key in (('SA+GLCA', 'accuracy'), ('GLCA', 'accuracy_glca')):
      cells = [_pct([r[key] for r in recs])] + [_paired(recs, name, key) for name, _ in tests]
      rows.append(f'| {variant} | {seeds} | {branch} | ' + ' | '.join(cells) + ' |')
  text = '\n'.join(rows) + '\n'
  with open(path, 'w') as f:
    f.write(text)
  return text


def _loss_weights(workdir) -> dict:
  """The last logged uncertainty weights w_b of a run (what the weighting ended at)."""
  last = {}
  path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(path):
    for line in open(path):
      rec = json.loads(line)
      last.update({k.split('/')[-1]: v for k, v in rec.items() if k.startswith('train/w_')})
  return last


def load_results(path):
  done = {}
  if os.path.exists(path):
    for line in open(path):
      rec = json.loads(line)
      done[(rec['variant'], rec['seed'])] = rec
  return done


def _pct(values):
  values = [v for v in values if v is not None]
  if not values:
    return '–'
  a = 100 * np.asarray(values, np.float64)
  return f'{a.mean():.1f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.1f}'


def write_table(path, variants, results, header: str) -> str:
  rows = [header, '',
          '| variant | overrides | seeds | SA+GLCA top-1 % | SA % | GLCA % | w_sa / w_glca / w_pwca | '
          'wall s (train+eval) |',
          '|---|---|---|---|---|---|---|---|']
  for name, overrides in variants.items():
    recs = [r for (v, _), r in sorted(results.items()) if v == name]
    if not recs:
      continue
    ws = ' / '.join(f'{np.mean([r[k] for r in recs]):.2f}' if all(k in r for r in recs) else '–'
                    for k in ('w_sa', 'w_glca', 'w_pwca'))
    over = ', '.join(f'{k}={v}' for k, v in overrides.items()) or '(config as is)'
    rows.append(f'| {name} | {over} | {",".join(str(r["seed"]) for r in recs)} '
                f'| **{_pct([r["accuracy"] for r in recs])}** | {_pct([r["accuracy_sa"] for r in recs])} '
                f'| {_pct([r["accuracy_glca"] for r in recs])} | {ws} '
                f'| {np.mean([r["wall_s"] for r in recs]):.0f} |')
  text = '\n'.join(rows) + '\n'
  with open(path, 'w') as f:
    f.write(text)
  return text


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default=os.path.join(ROOT, 'configs', 'demo.py'))
  p.add_argument('--grid', default='paper', choices=sorted(GRIDS))
  p.add_argument('--variants', default='', help='comma-separated subset of the grid (default all)')
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='override for every run (repeatable), e.g. --set num_epochs=24')
  p.add_argument('--out', default=os.path.join(ROOT, 'runs', 'ablate'))
  p.add_argument('--jobs', type=int, default=1, help='runs at a time (1 thread each if > 1)')
  p.add_argument('--threads', type=int, default=0,
                 help='1 = one compute thread per run (default when --jobs > 1, or when another '
                      'grid shares the machine); 0 = all cores')
  p.add_argument('--table_only', action='store_true')
  p.add_argument('--test_time', action='append', default=[], metavar='NAME:KEY=VALUE[,...]',
                 help='evaluate finished runs again with these knobs changed (repeatable)')
  a = p.parse_args()

  grid = GRIDS[a.grid]
  names = [v.strip() for v in a.variants.split(',') if v.strip()] or list(grid)
  unknown = [n for n in names if n not in grid]
  if unknown:
    raise SystemExit(f'error: unknown variant(s) {unknown} in grid {a.grid}: {", ".join(grid)}')
  variants = {n: grid[n] for n in names}
  seeds = [int(s) for s in a.seeds.split(',') if s.strip()]
  common = parse_set(a.set)
  os.makedirs(a.out, exist_ok=True)
  results_path = os.path.join(a.out, 'results.jsonl')
  results = load_results(results_path)
  header = (f'Config `{os.path.relpath(a.config, ROOT)}`'
            + (' with ' + ', '.join(f'`{k}={v}`' for k, v in common) if common else '')
            + f'; seeds {a.seeds}; mean ± std (sample) over seeds.')

  todo = [(n, s) for n in variants for s in seeds if (n, s) not in results]
  if not a.table_only and todo:
    threads = a.threads or (1 if a.jobs > 1 else 0)
    print(f'{len(todo)} run(s) to do, {len(results)} already in {results_path}', flush=True)

    def job(item):
      name, seed = item
      rec = run_one(a.config, os.path.join(a.out, name, f'seed_{seed}'), seed, variants[name],
                    common, threads=threads)
      return {'variant': name, 'seed': seed, 'overrides': variants[name],
              'common': dict(common), **rec}

    with concurrent.futures.ThreadPoolExecutor(max(1, a.jobs)) as pool:
      futures = {pool.submit(job, item): item for item in todo}
      for fut in concurrent.futures.as_completed(futures):
        name, seed = futures[fut]
        try:
          rec = fut.result()
        except RuntimeError as e:
          print(f'FAILED {name} seed {seed}: {e}', flush=True)
          continue
        with open(results_path, 'a') as f:
          f.write(json.dumps(rec) + '\n')
        results[(name, seed)] = rec
        print(f'{name} seed {seed}: SA+GLCA {rec["accuracy"]:.3f} SA {rec["accuracy_sa"]:.3f} '
              f'GLCA {rec["accuracy_glca"]} ({rec["wall_s"]:.0f} s)', flush=True)
  print(write_table(os.path.join(a.out, 'table.md'), variants, results, header))
  tests = parse_test_time(a.test_time)
  if tests:
    for (name, seed), rec in sorted(results.items()):
      if name in variants:
        workdir = os.path.join(a.out, name, f'seed_{seed}')
        rec['test_time'] = {test: eval_again(a.config, workdir, seed, variants[name], common, test,
                                             swaps) for test, swaps in tests}
    print(write_test_time_table(os.path.join(a.out, 'test_time.md'), variants, results, tests,
                                header))


if __name__ == '__main__':
  main()
